//! Admission against per-key and per-model limits and budgets: reserve the worst case when a
//! request arrives, settle with what it really used when it ends, so concurrent requests can
//! never overshoot a limit or a budget.

mod admission;
mod counters;
mod headers;
mod metadata;
pub mod period;
pub mod shared;
mod window;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub use admission::{
    admit_call, admit_call_shared, admit_request, admit_request_shared, Admission, Ask, Refusal,
};
pub use counters::{Counters, Spend};
pub use headers::rate_headers;
pub use metadata::admit_metadata;

use crate::config::{Budget, Key, Limits, Model, Snapshot};
use crate::vocab::TokenPrices;

/// The counters of every configured key and model, by id. Built with each config snapshot;
/// counters of ids that still exist are carried over, so a reload keeps them.
#[derive(Default)]
pub struct Registry {
    keys: HashMap<String, Arc<Counters>>,
    models: HashMap<String, Arc<Counters>>,
    /// Counts the configs: each reload's registry is one more than the one it replaces.
    pub generation: u64,
    /// Cluster mode: the limits and budgets counted in Redis (`[cluster]`); the counters
    /// above then serve only while Redis is down.
    pub shared: Option<Arc<shared::Shared>>,
}

impl Registry {
    pub fn build(snapshot: &Snapshot, previous: Option<&Registry>) -> Registry {
        let carry = |map: Option<&HashMap<String, Arc<Counters>>>, id: &str| {
            map.and_then(|m| m.get(id).cloned()).unwrap_or_default()
        };
        Registry {
            keys: snapshot
                .keys()
                .map(|k| (k.id.to_string(), carry(previous.map(|p| &p.keys), &k.id)))
                .collect(),
            models: snapshot
                .models
                .iter()
                .map(|m| {
                    (
                        m.slug.to_string(),
                        carry(previous.map(|p| &p.models), &m.slug),
                    )
                })
                .collect(),
            generation: previous.map_or(0, |p| p.generation + 1),
            shared: previous
                .and_then(|p| p.shared.clone())
                .inspect(|s| s.track(snapshot)),
        }
    }

    pub fn key(&self, id: &str) -> Option<&Arc<Counters>> {
        self.keys.get(id)
    }

    pub fn model(&self, slug: &str) -> Option<&Arc<Counters>> {
        self.models.get(slug)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Requests,
    Tokens,
    Concurrency,
    /// Requests to the metadata endpoints: `count_tokens` and `/v1/models`.
    Metadata,
}

impl LimitKind {
    pub fn label(self) -> &'static str {
        match self {
            LimitKind::Requests => "requests",
            LimitKind::Tokens => "tokens",
            LimitKind::Concurrency => "concurrency",
            LimitKind::Metadata => "metadata",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Key,
    Model,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq)]
pub enum LimitError {
    /// Over a limit now; fits again in `retry_after` seconds (429).
    Limited {
        kind: LimitKind,
        scope: Scope,
        limit: u64,
        retry_after: u64,
    },
    /// The request's worst case alone exceeds the tokens-per-minute limit (400).
    TooLarge { scope: Scope, limit: u64, need: u64 },
    /// The budget cannot pay for the request's worst case (402).
    Budget {
        budget_nanos: u64,
        spent_nanos: u64,
        worst_nanos: u64,
        retry_after: Option<u64>,
    },
    /// Cluster mode with `on_redis_down = "reject"`: Redis did not answer in time (503).
    Unavailable,
}

/// What one request may use at most.
#[derive(Debug, Clone, Copy)]
pub struct Demand {
    pub input_tokens: u64,
    /// The output cap of each choice.
    pub output_tokens: u64,
    /// Choices generated (OpenAI's `n`), each up to `output_tokens`; at least 1.
    pub choices: u64,
    pub prices: TokenPrices,
    /// A price per call (deployed models), in nano-dollars, on top of the tokens'.
    pub per_request: u64,
}

impl Demand {
    /// A deployed model's call: no tokens, its price per call.
    pub fn call(price_nanos: u64) -> Demand {
        Demand {
            input_tokens: 0,
            output_tokens: 0,
            choices: 1,
            prices: TokenPrices::default(),
            per_request: price_nanos,
        }
    }

    fn output_total(&self) -> u64 {
        self.output_tokens.saturating_mul(self.choices.max(1))
    }

    fn tokens(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_total())
    }

    /// Cost if no input is cached and every allowed output token is generated. Saturates:
    /// a worst case past `u64::MAX` nano-dollars fits no budget either way.
    fn worst_nanos(&self) -> u64 {
        self.input_cost()
            .saturating_add(self.output_total().saturating_mul(self.prices.output))
    }

    fn input_cost(&self) -> u64 {
        self.input_tokens
            .saturating_mul(self.prices.input)
            .saturating_add(self.per_request)
    }
}

/// The key's requests and tokens windows after admission, for rate-limit headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateView {
    /// (limit, remaining, seconds until the window is empty)
    pub requests: Option<(u64, u64, u64)>,
    pub tokens: Option<(u64, u64, u64)>,
}

/// An admitted request's reservation; `settle` replaces it with actual use. Dropping it
/// unsettled keeps the worst case counted.
pub struct Ticket {
    key: Arc<Counters>,
    /// Only for models with limits: other models take no shared lock at all.
    model: Option<Arc<Counters>>,
    budget: Option<Budget>,
    at_sec: u64,
    /// When the request started (ms): the budget period its cost belongs to.
    started_ms: i64,
    tokens: u64,
    nanos: u64,
    /// `max_tokens` lowered to what the budget pays for, when clamping applied.
    pub clamped_output: Option<u64>,
    settled: bool,
    /// The request still counts in the key's and the model's `max_concurrent`: until
    /// `free_slot`, or its settlement.
    slot: bool,
    /// Admitted by Redis (cluster mode): settled there. The key's counters then only add
    /// the cost to this node's spend, which `on_redis_down = "local"` counts against.
    lease: Option<shared::Lease>,
}

/// A budget threshold crossed by a settled request.
#[derive(Debug, Clone, PartialEq)]
pub struct Crossed {
    pub threshold: f64,
    pub spent_nanos: u64,
    pub budget_nanos: u64,
    pub period_start: i64,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

const NO_LIMITS: Limits = Limits {
    rpm: None,
    tpm: None,
    max_concurrent: None,
};

/// The fewest output tokens worth clamping to; below this the request is refused instead.
const MIN_CLAMPED_OUTPUT: u64 = 16;

/// Checks every limit of the key and the model and, if all pass, reserves the request's worst
/// case in one step under the key's and the model's locks (always taken in that order).
pub fn admit(
    key: &Key,
    key_counters: &Arc<Counters>,
    model: &Model,
    model_counters: &Arc<Counters>,
    demand: Demand,
    now_ms: i64,
    generation: u64,
) -> Result<(Ticket, RateView), LimitError> {
    let model = (!model.limits.is_empty()).then_some((&model.limits, model_counters));
    admit_scoped(key, key_counters, model, demand, now_ms, generation)
}

/// `admit` against the key's limits and, if given, a model's limits and counters.
pub fn admit_scoped(
    key: &Key,
    key_counters: &Arc<Counters>,
    model: Option<(&Limits, &Arc<Counters>)>,
    demand: Demand,
    now_ms: i64,
    generation: u64,
) -> Result<(Ticket, RateView), LimitError> {
    let own = KeyLimits {
        limits: &key.limits,
        budget: key.budget.as_ref(),
    };
    admit_within(own, key_counters, model, demand, now_ms, generation)
}

/// The limits and budget a key is admitted against: its own, or a share of them.
#[derive(Clone, Copy)]
pub(crate) struct KeyLimits<'a> {
    pub limits: &'a Limits,
    pub budget: Option<&'a Budget>,
}

fn admit_within(
    key: KeyLimits<'_>,
    key_counters: &Arc<Counters>,
    model: Option<(&Limits, &Arc<Counters>)>,
    mut demand: Demand,
    now_ms: i64,
    generation: u64,
) -> Result<(Ticket, RateView), LimitError> {
    let now = (now_ms / 1000).max(0) as u64;
    let model_limits = model.map_or(&NO_LIMITS, |m| m.0);
    let model_counters = model.map(|m| m.1);
    let mut k = key_counters.lock();
    let mut m = model_counters.map(|c| c.lock());
    check_requests(key.limits, &mut k, Scope::Key, now)?;
    if let Some(m) = m.as_deref_mut() {
        check_requests(model_limits, m, Scope::Model, now)?;
    }
    let mut clamped_output = None;
    if let Some(b) = key.budget {
        k.roll(b, now_ms, generation);
        let spend = k.spend;
        let committed = spend.spent.saturating_add(spend.reserved);
        let available = b.nanos.saturating_sub(committed);
        if b.enforce && demand.worst_nanos() > available {
            let input_cost = demand.input_cost();
            // Per choice: each of them may generate the clamped cap.
            let affordable = match demand.prices.output {
                0 => demand.output_tokens,
                p => available.saturating_sub(input_cost) / p.saturating_mul(demand.choices.max(1)),
            };
            if b.clamp_max_tokens
                && input_cost < available
                && affordable >= MIN_CLAMPED_OUTPUT.min(demand.output_tokens)
            {
                demand.output_tokens = affordable.min(demand.output_tokens);
                clamped_output = Some(demand.output_tokens);
            } else {
                return Err(LimitError::Budget {
                    budget_nanos: b.nanos,
                    spent_nanos: committed,
                    worst_nanos: demand.worst_nanos(),
                    retry_after: period::end(b.period, now_ms)
                        .map(|e| ((e - now_ms).max(0) as u64).div_ceil(1000)),
                });
            }
        }
    }
    check_tokens(key.limits, &mut k, Scope::Key, now, demand.tokens())?;
    if let Some(m) = m.as_deref_mut() {
        check_tokens(model_limits, m, Scope::Model, now, demand.tokens())?;
    }
    let nanos = demand.worst_nanos();
    for state in std::iter::once(&mut *k).chain(m.as_deref_mut()) {
        state.inflight += 1;
        state.requests.add(now, 1);
        state.tokens.add(now, demand.tokens());
    }
    k.spend.reserved = k.spend.reserved.saturating_add(nanos);
    let view = k.rate_view(key.limits, now);
    drop(m);
    drop(k);
    Ok((
        Ticket {
            key: key_counters.clone(),
            model: model_counters.cloned(),
            budget: key.budget.cloned(),
            at_sec: now,
            started_ms: now_ms,
            tokens: demand.tokens(),
            nanos,
            clamped_output,
            settled: false,
            slot: true,
            lease: None,
        },
        view,
    ))
}

/// The key's windows as the next request would see them (for headers on refusals).
pub fn view(key: &Key, counters: &Counters, now_ms: i64) -> RateView {
    let now = (now_ms / 1000).max(0) as u64;
    counters.lock().rate_view(&key.limits, now)
}

fn check_tokens(
    limits: &Limits,
    state: &mut counters::State,
    scope: Scope,
    now: u64,
    need: u64,
) -> Result<(), LimitError> {
    match limits
        .tpm
        .map(|tpm| (tpm, state.tokens.wait_for(now, need, tpm)))
    {
        None | Some((_, Some(0))) => Ok(()),
        Some((limit, None)) => Err(LimitError::TooLarge { scope, limit, need }),
        Some((limit, Some(s))) => Err(LimitError::Limited {
            kind: LimitKind::Tokens,
            scope,
            limit,
            retry_after: s,
        }),
    }
}

fn check_requests(
    limits: &Limits,
    state: &mut counters::State,
    scope: Scope,
    now: u64,
) -> Result<(), LimitError> {
    if let Some(max) = limits.max_concurrent {
        if state.inflight >= max {
            return Err(LimitError::Limited {
                kind: LimitKind::Concurrency,
                scope,
                limit: max,
                retry_after: 1,
            });
        }
    }
    if let Some(rpm) = limits.rpm {
        if let Some(s @ 1..) = state.requests.wait_for(now, 1, rpm) {
            return Err(LimitError::Limited {
                kind: LimitKind::Requests,
                scope,
                limit: rpm,
                retry_after: s,
            });
        }
    }
    Ok(())
}

/// What settling a request left behind: the key's spend right after it (for the budget
/// gauges, read under the same lock) and the budget thresholds it crossed.
#[derive(Debug, Default)]
pub struct Settlement {
    pub spend: Spend,
    pub crossed: Vec<Crossed>,
}

impl Ticket {
    /// Replaces the reservation with what the request used. The thresholds crossed fire once
    /// per key and period.
    pub fn settle(self, tokens: u64, nanos: u64, now_ms: i64) -> Settlement {
        self.settle_with(tokens, nanos, now_ms, || ())
    }

    /// `settle`, calling `handed` under the key's lock first: the request's ledger record
    /// is handed over in the same step as its cost lands in the counters, so a budget rebuilt
    /// from the ledger (`Runtime::seed_budgets`) sees each request either in the ledger or
    /// in the counters, never in both nor in neither.
    pub fn settle_with(
        mut self,
        tokens: u64,
        nanos: u64,
        now_ms: i64,
        handed: impl FnOnce(),
    ) -> Settlement {
        self.settled = true;
        self.release(tokens, nanos, now_ms, handed)
    }

    /// The replica has answered in full: the request no longer counts against
    /// `max_concurrent`, though its cost is settled only once the client has the answer.
    /// Freed before the answer's last bytes are written, so a client sending requests one
    /// after the other never finds its previous one still counted.
    pub fn free_slot(&mut self) {
        if !self.slot {
            return;
        }
        self.slot = false;
        if let Some(lease) = &mut self.lease {
            lease.shared().clone().free_slot(lease);
            return;
        }
        let mut k = self.key.lock();
        k.inflight = k.inflight.saturating_sub(1);
        drop(k);
        if let Some(model) = &self.model {
            let mut m = model.lock();
            m.inflight = m.inflight.saturating_sub(1);
        }
    }

    /// The request's period is the one it started in (by default, its admission).
    pub fn set_started_ms(&mut self, started_ms: i64) {
        self.started_ms = started_ms;
    }

    fn release(
        &mut self,
        tokens: u64,
        nanos: u64,
        now_ms: i64,
        handed: impl FnOnce(),
    ) -> Settlement {
        if let Some(lease) = self.lease.take() {
            return self.release_shared(lease, tokens, nanos, handed);
        }
        let now = (now_ms / 1000).max(0) as u64;
        let mut crossed = Vec::new();
        let spend = {
            let mut k = self.key.lock();
            handed();
            if self.slot {
                k.inflight = k.inflight.saturating_sub(1);
            }
            k.tokens.settle(now, self.at_sec, self.tokens, tokens);
            k.spend.reserved = k.spend.reserved.saturating_sub(self.nanos);
            // Spend belongs to the period the request started in, as in the ledger: the one
            // counted now if it started within it (a reload may have given the budget
            // another period since, or given the key its budget), else one that is over, and
            // then the request only releases its reservation. No roll here: this ticket's
            // budget may be older than the config's, and a roll to `now_ms` would start a
            // period the admissions have not seen yet.
            k.catch_up(self.started_ms);
            if self.started_ms >= k.spend.period_start {
                k.spend.spent = k.spend.spent.saturating_add(nanos);
                if let Some(b) = &self.budget {
                    for (i, &t) in b.alert_at.iter().enumerate() {
                        let bit = 1u32 << i;
                        if k.spend.alerted & bit == 0 && k.spend.spent as f64 >= t * b.nanos as f64
                        {
                            k.spend.alerted |= bit;
                            crossed.push(Crossed {
                                threshold: t,
                                spent_nanos: k.spend.spent,
                                budget_nanos: b.nanos,
                                period_start: k.spend.period_start,
                            });
                        }
                    }
                }
            }
            k.note_rebuild(self.started_ms, nanos, &crossed);
            k.spend
        };
        if let Some(model) = &self.model {
            let mut m = model.lock();
            if self.slot {
                m.inflight = m.inflight.saturating_sub(1);
            }
            m.tokens.settle(now, self.at_sec, self.tokens, tokens);
        }
        Settlement { spend, crossed }
    }
}

impl Ticket {
    /// A ticket of a request Redis admitted.
    pub(crate) fn shared(
        key: &Key,
        key_counters: &Arc<Counters>,
        lease: shared::Lease,
        started_ms: i64,
        tokens: u64,
        nanos: u64,
        clamped_output: Option<u64>,
    ) -> Ticket {
        Ticket {
            key: key_counters.clone(),
            model: None,
            budget: key.budget.clone(),
            at_sec: (started_ms / 1000).max(0) as u64,
            started_ms,
            tokens,
            nanos,
            clamped_output,
            settled: false,
            slot: true,
            lease: Some(lease),
        }
    }

    /// Settles in Redis, off the request path, and adds the cost to this node's own spend
    /// (what a fallback to local counting starts from). Thresholds crossed are reported by
    /// the cluster (`Shared::on_crossed`), once across every node.
    fn release_shared(
        &mut self,
        lease: shared::Lease,
        tokens: u64,
        nanos: u64,
        handed: impl FnOnce(),
    ) -> Settlement {
        {
            let mut k = self.key.lock();
            handed();
            k.catch_up(self.started_ms);
            if self.started_ms >= k.spend.period_start {
                k.spend.spent = k.spend.spent.saturating_add(nanos);
            }
            k.note_rebuild(self.started_ms, nanos, &[]);
        }
        let mut spend = lease.spend;
        spend.spent = spend.spent.saturating_add(nanos);
        spend.reserved = spend.reserved.saturating_sub(self.nanos);
        let shared = lease.shared().clone();
        shared.settle(lease, tokens, nanos, self.budget.as_ref(), self.started_ms);
        Settlement {
            spend,
            crossed: Vec::new(),
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.settled {
            // Counted at its worst case, at the time it was admitted.
            let (tokens, nanos, at_ms) = (self.tokens, self.nanos, self.at_sec as i64 * 1000);
            self.release(tokens, nanos, at_ms, || ());
        }
    }
}

#[cfg(test)]
mod tests;
