//! Live counters of one key or one model: sliding windows of requests and tokens, requests in
//! flight, and spend in the current budget period. Each key has its own small lock, held for
//! the few hundred nanoseconds of a check-and-reserve; there is no global lock.

use std::sync::{Mutex, MutexGuard};

use super::period;
use super::window::Window;
use super::{Crossed, RateView};
use crate::config::{Budget, Limits, Period};

#[derive(Default)]
pub struct Counters {
    state: Mutex<State>,
}

#[derive(Default)]
pub(super) struct State {
    pub requests: Window,
    pub tokens: Window,
    /// Requests to the metadata endpoints (`metadata.rs`), apart from `requests`.
    pub metadata: Window,
    pub inflight: u64,
    pub spend: Spend,
    /// When the counted period ends (`None`: it never does, or no period is counted yet),
    /// kept with it so admissions and settlements compare instead of doing calendar work.
    period_end: Option<i64>,
    /// While the budget is rebuilt from the ledger: what settled since the ledger was asked.
    rebuild: Option<Rebuild>,
}

/// A budget rebuild under way (see `Held::begin_rebuild`).
struct Rebuild {
    /// The period being rebuilt: `[period_start, period_end)`.
    period_start: i64,
    period_end: Option<i64>,
    /// Cost of requests of that period settled since the ledger was asked: their records
    /// came after the question, so the answer does not hold them.
    settled: u64,
    /// Alert thresholds fired for that period since the ledger was asked: their rows too
    /// came after the question.
    fired: Vec<f64>,
}

/// Spend of the current budget period, in nano-dollars.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Spend {
    pub period_start: i64,
    pub spent: u64,
    /// Worst-case cost of requests admitted and not yet settled.
    pub reserved: u64,
    /// Bit i set: the budget's i-th alert threshold already fired this period.
    pub alerted: u32,
    /// The config generation (`Registry::generation`) whose budget this spend is counted
    /// for. A request still holding an older config whose budget has another period never
    /// rolls it: its roll would reset what a reload rebuilt.
    pub generation: u64,
    /// The kind of period counted (`None` before any budget was seen).
    pub period: Option<Period>,
}

impl Counters {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the counters torn (plain integers),
        // so a poisoned lock is used as it is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds the counters (admissions and settlements of this key wait) while a budget
    /// rebuild starts: only for as long as it takes to mark it and to put the question in
    /// the ledger's queue, never across a read of the ledger.
    pub fn hold(&self) -> Held<'_> {
        Held(self.lock())
    }

    pub fn inflight(&self) -> u64 {
        self.lock().inflight
    }

    /// Requests and tokens in the last 60 seconds.
    pub fn window(&self, now_sec: u64) -> (u64, u64) {
        let mut s = self.lock();
        (s.requests.sum(now_sec), s.tokens.sum(now_sec))
    }

    pub fn spend(&self, budget: Option<&Budget>, now_ms: i64, generation: u64) -> Spend {
        let mut s = self.lock();
        if let Some(b) = budget {
            s.roll(b, now_ms, generation);
        }
        s.spend
    }

    /// Ends a rebuild: the spend is what the ledger answered plus what settled into the
    /// period since it was asked. Of the budget's thresholds `alert_at`, those fired are the
    /// ones the ledger answered (`ledger_fired`) and those fired since it was asked.
    /// Reservations of requests in flight are kept.
    pub fn finish_rebuild(&self, from_ledger: Spend, alert_at: &[f64], ledger_fired: &[f64]) {
        let mut s = self.lock();
        let (since, fired) = s
            .rebuild
            .take()
            .map_or((0, Vec::new()), |r| (r.settled, r.fired));
        let alerted = alert_at
            .iter()
            .enumerate()
            .filter(|(_, t)| (ledger_fired.iter().chain(&fired)).any(|f| (*f - **t).abs() < 1e-9))
            .fold(0u32, |mask, (i, _)| mask | (1 << i));
        s.period_end = from_ledger
            .period
            .and_then(|kind| period::end(kind, from_ledger.period_start));
        s.spend = Spend {
            spent: from_ledger.spent.saturating_add(since),
            reserved: s.spend.reserved,
            alerted,
            ..from_ledger
        };
    }

    /// Drops a rebuild that failed; the spend stays as it was.
    pub fn abandon_rebuild(&self) {
        self.lock().rebuild = None;
    }
}

/// Counters held while the ledger is asked for a budget rebuild (see `Counters::hold`).
pub struct Held<'a>(MutexGuard<'a, State>);

impl Held<'_> {
    /// Marks the start of a rebuild of the period starting at `period_start`: from here on,
    /// what settles into that period is counted apart, to be added to the ledger's answer.
    /// The ledger must be asked before the hold ends (requests hand their record under the
    /// same lock, see `Ticket::settle_with`).
    pub fn begin_rebuild(&mut self, period_start: i64, period_end: Option<i64>) {
        self.0.rebuild = Some(Rebuild {
            period_start,
            period_end,
            settled: 0,
            fired: Vec::new(),
        });
    }
}

impl State {
    /// A request that started at `started_ms` settled `nanos` and fired the alerts
    /// `crossed`: counted for a rebuild under way if it belongs to the period rebuilt.
    pub fn note_rebuild(&mut self, started_ms: i64, nanos: u64, crossed: &[Crossed]) {
        if let Some(r) = &mut self.rebuild {
            if started_ms >= r.period_start && r.period_end.is_none_or(|end| started_ms < end) {
                r.settled = r.settled.saturating_add(nanos);
            }
            r.fired.extend(
                crossed
                    .iter()
                    .filter(|c| c.period_start == r.period_start)
                    .map(|c| c.threshold),
            );
        }
    }

    /// (limit, remaining, seconds until empty) of the requests and tokens windows: what the
    /// next request would see, for rate-limit headers.
    pub fn rate_view(&mut self, limits: &Limits, now: u64) -> RateView {
        let one = |w: &mut Window, limit: u64| {
            (limit, limit.saturating_sub(w.sum(now)), w.until_empty(now))
        };
        RateView {
            requests: limits.rpm.map(|l| one(&mut self.requests, l)),
            tokens: limits.tpm.map(|l| one(&mut self.tokens, l)),
        }
    }

    /// Starts a new budget period when `now_ms` left the current one. `generation` is the
    /// config the budget comes from; an older one than the spend's leaves it alone.
    pub fn roll(&mut self, budget: &Budget, now_ms: i64, generation: u64) {
        let same_kind = self.spend.period == Some(budget.period);
        if generation < self.spend.generation && !same_kind {
            return;
        }
        self.spend.generation = self.spend.generation.max(generation);
        let within =
            now_ms >= self.spend.period_start && self.period_end.is_none_or(|end| now_ms < end);
        if same_kind && within {
            return;
        }
        let start = period::start(budget.period, now_ms);
        // Only ever forward within a kind: a request whose clock was read just before the
        // period began must not take the spend back to the one before.
        if !same_kind || start > self.spend.period_start {
            self.start_period(budget.period, start);
        }
    }

    /// Makes sure the period counted is not over at `at_ms`, rolling it on by its own kind:
    /// a request that settles into a period no admission has rolled to yet (one on an older
    /// config, just after a period ended) starts it instead of being counted in the last.
    pub fn catch_up(&mut self, at_ms: i64) {
        let Some(kind) = self.spend.period else {
            return;
        };
        if self.period_end.is_some_and(|end| at_ms >= end) {
            self.start_period(kind, period::start(kind, at_ms));
        }
    }

    fn start_period(&mut self, kind: Period, start: i64) {
        self.period_end = period::end(kind, start);
        // Requests still in flight keep their reservations; they settle into the period
        // they started in, which is over, so they only release them.
        self.spend = Spend {
            period_start: start,
            period: Some(kind),
            reserved: self.spend.reserved,
            generation: self.spend.generation,
            ..Spend::default()
        };
    }
}
