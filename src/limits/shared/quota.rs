//! A node's quota: blocks of a (key, model) pair's limits that Redis granted this node, so
//! that most requests are admitted and settled here, with no round trip.
//!
//! - **Rate units**: requests and their tokens, counted in Redis's window at the second of
//!   the grant. They are spent only within that second, measured from when the grant was
//!   asked for (`until`), so a request admitted here is in the window exactly where Redis
//!   counted it. What a second leaves unused is given back to that second.
//! - **Slots**: members of the lease sets of the scopes with `max_concurrent`, held by this
//!   node and renewed with its leases. A request takes a free one and puts it back.
//! - **Nano-dollars**: a hold on the budget, counted in its `reserved`. A request takes its
//!   worst case from it, and its settlement moves what it used to `spent`.
//!
//! Redis grants no node more than its share of what is free (`lua.rs`), and never less than
//! the asking request needs. Near a limit a grant is one request's worth, and the pool is
//! *tight*: whatever a request frees goes back to Redis at once, for any node to use. Far
//! from it, what is free stays here while this node uses it, and goes back when a tick finds
//! it idle. Every limit is counted in Redis before a request is admitted, so the nodes
//! together never pass one.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{KeyNames, ModelNames};
use crate::config::{Budget, Key, Limits};

/// The fewest rate units a grant asks for.
const FEWEST_UNITS: u64 = 4;
/// The most: Lua counts in doubles, and no node admits a million requests a second.
const MOST_UNITS: u64 = 1 << 20;
/// How long a busy quota keeps what it spent before telling Redis (alerts wait as long).
const SPEND_EVERY: Duration = Duration::from_secs(1);

/// The limits a pool's grants were made under: a reload that changes them gives back what
/// is free, and grants again under the new ones.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Terms {
    pub key: [u64; 3],
    pub model: Option<[u64; 3]>,
    /// Budget nanos, enforce, clamp.
    pub budget: Option<(u64, bool, bool)>,
}

impl Terms {
    pub fn of(key: &Key, model: Option<&Limits>) -> Terms {
        let l = |l: &Limits| {
            [
                l.rpm.unwrap_or(0),
                l.tpm.unwrap_or(0),
                l.max_concurrent.unwrap_or(0),
            ]
        };
        Terms {
            key: l(&key.limits),
            model: model.map(l),
            budget: key
                .budget
                .as_ref()
                .map(|b| (b.nanos, b.enforce, b.clamp_max_tokens)),
        }
    }

    /// Whether a request needs a slot: some scope limits concurrency.
    pub fn slots(&self) -> bool {
        self.key[2] > 0 || self.model.is_some_and(|m| m[2] > 0)
    }
}

/// What one request needs of a pool.
pub(super) struct Need<'a> {
    pub tokens: u64,
    pub nanos: u64,
    /// The budget hash of the current period, when the key has a budget.
    pub budget: Option<&'a str>,
}

/// What a request took from the pool.
#[derive(Default)]
pub(super) struct Held {
    /// The second its rate unit was counted in, if it took one.
    pub rate: Option<u64>,
    pub slot: Option<String>,
    pub nanos: bool,
}

/// What to ask Redis for, with what the request still lacks.
pub(super) struct Ask {
    pub units: u64,
    pub slots: Option<u64>,
    pub nanos: Option<u64>,
}

/// A grant as Redis answered it.
pub(super) struct Granted {
    pub sec: u64,
    /// Milliseconds into `sec` when Redis granted it.
    pub ms: u64,
    pub units: u64,
    /// Tokens per unit (the clamped request's, when a budget clamped it).
    pub tokens: u64,
    pub slots: u64,
    pub nanos: u64,
    /// The unit's nano-dollars.
    pub unit_nanos: u64,
    pub key_requests: u64,
    pub key_tokens: u64,
}

/// What this node owes Redis for one budget hash (or none): sent as one `r` operation.
#[derive(Default)]
pub(super) struct Return {
    /// The Redis connection whose hold it gives back to (`Shared::hold_id`).
    pub epoch: u64,
    pub budget: Option<String>,
    pub spent: u64,
    /// Nano-dollars leaving the hold: spent, or given back.
    pub leaving: u64,
    pub release: bool,
    pub slots: Vec<String>,
    /// (second, requests, tokens) to take off the windows.
    pub corrections: Vec<(u64, u64, u64)>,
    /// The budget (nanos, period start, thresholds) whose alerts the answer may fire.
    pub alerts: Option<(u64, i64, Vec<f64>)>,
}

impl Return {
    /// Adds a correction, to the one of the same second when there is one: a second's
    /// settlements go back as one.
    fn correct(&mut self, sec: u64, requests: u64, tokens: u64) {
        match self.corrections.iter_mut().rev().find(|c| c.0 == sec) {
            Some(c) => {
                c.1 += requests;
                c.2 += tokens;
            }
            None => self.corrections.push((sec, requests, tokens)),
        }
    }

    fn is_empty(&self) -> bool {
        self.slots.is_empty()
            && self.corrections.is_empty()
            && self.spent == 0
            && self.leaving == 0
            && !self.release
    }
}

pub(super) struct Pool {
    pub key_id: Arc<str>,
    pub names: Arc<KeyNames>,
    pub model: Option<Arc<ModelNames>>,
    /// The lane its operations go through (`lane::send`).
    pub lane: Mutex<Option<tokio::sync::mpsc::UnboundedSender<super::lane::Op>>>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The Redis connection (`Shared::epoch`) the pool's holdings belong to.
    epoch: u64,
    terms: Terms,
    /// The second the rate units were counted in, and until when (here) they may be spent.
    sec: u64,
    until: Option<Instant>,
    requests: u64,
    tokens: u64,
    /// Requests admitted in `sec`, and in the second before it.
    admitted: u64,
    admitted_before: u64,
    /// Admitted since the last tick.
    busy: bool,
    /// When a tick last sent what the pool owed.
    flushed: Option<Instant>,
    /// The last grant was one request's worth where more was asked: a limit is near.
    tight: bool,
    free_slots: Vec<String>,
    in_use: u64,
    /// The budget hash of the hold, and what of it no request holds.
    hold: Option<String>,
    free_nanos: u64,
    owed: Return,
    /// Returns for other budget hashes (a period that ended, a hold dropped).
    retired: Vec<Return>,
    /// The key's window totals and spend as the last grant saw them, less what is unused here.
    key_requests: u64,
    key_tokens: u64,
    spent: u64,
    reserved: u64,
}

impl Pool {
    pub fn new(key_id: Arc<str>, names: Arc<KeyNames>, model: Option<Arc<ModelNames>>) -> Pool {
        Pool {
            key_id,
            names,
            model,
            lane: Mutex::new(None),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain counters and lists: a panic cannot leave them torn.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes what the pool has of the request's needs. `Ok`: everything, the request is
    /// admitted here. `Err`: what it holds, and what to ask Redis for.
    pub fn take(
        &self,
        epoch: u64,
        terms: Terms,
        need: &Need,
        now: Instant,
    ) -> Result<Held, (Held, Ask)> {
        let mut st = self.lock();
        st.renew(epoch, terms, need.budget);
        let mut held = Held::default();
        if st.until.is_some_and(|u| now < u) && st.requests >= 1 && st.tokens >= need.tokens {
            st.requests -= 1;
            st.tokens -= need.tokens;
            st.admitted += 1;
            held.rate = Some(st.sec);
        }
        if terms.slots() {
            held.slot = st.free_slots.pop();
            if held.slot.is_some() {
                st.in_use += 1;
            }
        }
        if need.budget.is_some() && st.free_nanos >= need.nanos {
            st.free_nanos -= need.nanos;
            held.nanos = true;
        }
        st.busy = true;
        let lacks_slot = terms.slots() && held.slot.is_none();
        let lacks_nanos = need.budget.is_some() && !held.nanos;
        if held.rate.is_some() && !lacks_slot && !lacks_nanos {
            return Ok(held);
        }
        // About two seconds' worth at the rate this pair has been admitted at.
        let want = (2 * st.admitted.max(st.admitted_before)).clamp(FEWEST_UNITS, MOST_UNITS);
        let ask = Ask {
            units: if held.rate.is_some() { 0 } else { want },
            slots: lacks_slot.then(|| (st.in_use / 2).max(2)),
            nanos: lacks_nanos.then(|| want.saturating_mul(need.nanos).min(1 << 53)),
        };
        Err((held, ask))
    }

    /// Puts back what a refused request held.
    pub fn put_back(&self, held: Held, need: &Need) {
        let mut st = self.lock();
        if let Some(sec) = held.rate {
            if sec == st.sec {
                st.requests += 1;
                st.tokens += need.tokens;
                st.admitted = st.admitted.saturating_sub(1);
            } else {
                st.owed.correct(sec, 1, need.tokens);
            }
        }
        if let Some(slot) = held.slot {
            st.in_use = st.in_use.saturating_sub(1);
            st.free_slots.push(slot);
        }
        if held.nanos {
            st.free_nanos += need.nanos;
        }
    }

    /// Adds a grant to the pool and completes the request's holdings from it: its tokens
    /// (clamped or not) and nano-dollars are the grant's unit. `None`: the grant came over a
    /// Redis connection that has been replaced since; what it granted is left to lapse.
    #[allow(clippy::too_many_arguments)]
    pub fn granted(
        &self,
        epoch: u64,
        g: &Granted,
        mut held: Held,
        asked: &Ask,
        need: &Need,
        slot_base: &str,
        budget: Option<&str>,
        asked_at: Instant,
    ) -> Option<Held> {
        let mut st = self.lock();
        if epoch < st.epoch {
            drop(st);
            self.put_back(held, need);
            return None;
        }
        if epoch > st.epoch {
            st.reset(epoch);
        }
        let mut units = g.units;
        let took = held.rate.is_none() && units > 0;
        if took {
            held.rate = Some(g.sec);
            units -= 1;
        }
        if g.units > 0 {
            let until = asked_at + Duration::from_millis(1000u64.saturating_sub(g.ms));
            if g.sec > st.sec || (st.until.is_none() && g.sec == st.sec) {
                st.expire();
                if g.sec > st.sec {
                    st.admitted_before = if g.sec == st.sec + 1 { st.admitted } else { 0 };
                    st.admitted = 0;
                    st.sec = g.sec;
                }
                st.until = Some(until);
            }
            if g.sec == st.sec {
                st.requests += units;
                st.tokens += units.saturating_mul(g.tokens);
                st.until = st.until.max(Some(until));
                st.admitted += u64::from(took);
            } else if units > 0 {
                st.owed
                    .correct(g.sec, units, units.saturating_mul(g.tokens));
            }
            st.key_requests = g.key_requests.saturating_sub(st.requests);
            st.key_tokens = g.key_tokens.saturating_sub(st.tokens);
        }
        if asked.slots.is_some() && held.slot.is_none() && g.slots > 0 {
            held.slot = Some(format!("{slot_base}#1"));
            st.in_use += 1;
            st.free_slots
                .extend((2..=g.slots).map(|i| format!("{slot_base}#{i}")));
        }
        if asked.nanos.is_some() && !held.nanos && g.nanos >= g.unit_nanos {
            if st.hold.as_deref() != budget {
                st.drop_hold();
                st.hold = budget.map(str::to_string);
            }
            st.free_nanos += g.nanos - g.unit_nanos;
            held.nanos = true;
        }
        // Near a limit, a node's share of what is free is one request's worth.
        st.tight = (asked.units > 1 && g.units <= 1)
            || asked.slots.is_some_and(|s| s > 1 && g.slots <= 1)
            || asked
                .nanos
                .is_some_and(|n| n > g.unit_nanos && g.nanos < g.unit_nanos.saturating_mul(2));
        Some(held)
    }

    /// Settles a request admitted against this pool: what it freed stays here, or goes back
    /// to Redis at once when the pool is tight. Returns what is owed now, if anything is.
    #[allow(clippy::too_many_arguments)]
    pub fn settle(
        &self,
        epoch: u64,
        held: Held,
        tokens: u64,
        nanos: u64,
        used_tokens: u64,
        used_nanos: u64,
        budget: Option<(&str, &Budget, i64)>,
    ) -> Vec<Return> {
        let mut st = self.lock();
        let ours = st.epoch == epoch;
        if let Some(slot) = held.slot {
            st.free_slot(epoch, slot);
        }
        let unused = tokens.saturating_sub(used_tokens);
        match held.rate {
            Some(sec) if ours && unused > 0 => {
                if sec == st.sec && st.until.is_some_and(|u| Instant::now() < u) {
                    st.tokens += unused;
                } else {
                    st.owed.correct(sec, 0, unused);
                }
            }
            _ => {}
        }
        if let Some((hash, b, period_start)) = budget {
            let alerts = Some((b.nanos, period_start, b.alert_at.clone()));
            if ours && held.nanos && st.hold.as_deref() == Some(hash) {
                st.owed.spent += used_nanos;
                st.owed.leaving += used_nanos.min(nanos);
                let free = nanos.saturating_sub(used_nanos);
                if st.tight {
                    st.owed.leaving += free;
                } else {
                    st.free_nanos += free;
                }
                st.owed.alerts = alerts;
                st.spent += used_nanos;
            } else {
                // Its hold is gone (a period that ended, or Redis lost): only the spend.
                st.retired.push(Return {
                    epoch,
                    budget: Some(hash.to_string()),
                    spent: used_nanos,
                    alerts,
                    ..Return::default()
                });
            }
        }
        st.owing_if_tight()
    }

    /// Frees a request's slot ahead of its settlement, once the replica has answered in
    /// full. Returns what is owed now, if anything is.
    pub fn free_slot(&self, epoch: u64, slot: String) -> Vec<Return> {
        let mut st = self.lock();
        st.free_slot(epoch, slot);
        st.owing_if_tight()
    }

    /// A tick: rate units whose second is over go back, and so does whatever is free, if
    /// the pool was idle since the last tick or is tight.
    pub fn tick(&self, epoch: u64, now: Instant) -> Vec<Return> {
        let mut st = self.lock();
        if epoch > st.epoch {
            st.reset(epoch);
        }
        if st.until.is_some_and(|u| now >= u) {
            st.expire();
        }
        let idle = !st.busy || st.tight;
        if idle {
            let slots = std::mem::take(&mut st.free_slots);
            st.owed.slots.extend(slots);
            let free = std::mem::take(&mut st.free_nanos);
            st.owed.leaving += free;
        }
        st.busy = false;
        // What other nodes could use goes at once. Spend alone can wait: moving it from the
        // hold to `spent` leaves what the budget has free as it was.
        let due = idle
            || !st.retired.is_empty()
            || !st.owed.slots.is_empty()
            || !st.owed.corrections.is_empty()
            || st
                .flushed
                .is_none_or(|at| now.saturating_duration_since(at) >= SPEND_EVERY);
        if !due {
            return Vec::new();
        }
        st.flushed = Some(now);
        st.owing()
    }

    /// Owes again what could not be sent (Redis went away).
    pub fn owe(&self, owed: Vec<Return>) {
        self.lock().retired.extend(owed);
    }

    /// The key's windows as this pool last saw them: (requests, tokens) counted.
    pub fn seen(&self) -> (u64, u64, u64, u64) {
        let st = self.lock();
        (st.key_requests, st.key_tokens, st.spent, st.reserved)
    }

    /// Notes the spend a grant's answer saw.
    pub fn saw_spend(&self, spent: u64, reserved: u64) {
        let mut st = self.lock();
        st.spent = spent;
        st.reserved = reserved;
    }
}

impl State {
    /// Brings the pool to the connection and terms of this request: holdings of a Redis
    /// connection that is gone are forgotten (Redis lapses them), and free holdings under
    /// other terms or of another budget period go back.
    fn renew(&mut self, epoch: u64, terms: Terms, budget: Option<&str>) {
        if epoch > self.epoch {
            self.reset(epoch);
        }
        if self.terms != terms {
            self.terms = terms;
            self.expire();
            let slots = std::mem::take(&mut self.free_slots);
            self.owed.slots.extend(slots);
            self.drop_hold();
        }
        if self.hold.is_some() && self.hold.as_deref() != budget {
            self.drop_hold();
        }
    }

    /// A new Redis connection: what the pool held under the old one goes back (Redis may
    /// have kept it through a timeout), and is never used again. Renewals extend only the
    /// current connection's holdings, so whatever does not reach Redis lapses.
    fn free_slot(&mut self, epoch: u64, slot: String) {
        self.in_use = self.in_use.saturating_sub(1);
        // A slot of a connection that is gone goes back too: Redis may still hold it.
        if self.tight || self.epoch != epoch {
            self.owed.slots.push(slot);
        } else {
            self.free_slots.push(slot);
        }
    }

    fn reset(&mut self, epoch: u64) {
        self.expire();
        let slots = std::mem::take(&mut self.free_slots);
        self.owed.slots.extend(slots);
        self.drop_hold();
        let owed = std::mem::take(&mut self.owed);
        if !owed.is_empty() {
            self.retired.push(Return {
                epoch: self.epoch,
                ..owed
            });
        }
        self.epoch = epoch;
        self.tight = false;
        self.requests = 0;
        self.tokens = 0;
    }

    /// The rate units left of the current second go back to it.
    fn expire(&mut self) {
        if self.requests > 0 || self.tokens > 0 {
            let (sec, r, t) = (self.sec, self.requests, self.tokens);
            self.owed.correct(sec, r, t);
        }
        self.requests = 0;
        self.tokens = 0;
        self.until = None;
    }

    /// Releases the budget hold: what no request holds goes back, and so, later, does the
    /// rest, which the requests holding it settle as spend only.
    fn drop_hold(&mut self) {
        if let Some(hash) = self.hold.take() {
            let mut owed = std::mem::take(&mut self.owed);
            let mut kept = Return {
                slots: std::mem::take(&mut owed.slots),
                corrections: std::mem::take(&mut owed.corrections),
                ..Return::default()
            };
            owed.budget = Some(hash);
            owed.epoch = self.epoch;
            owed.leaving += std::mem::take(&mut self.free_nanos);
            owed.release = true;
            kept.budget = None;
            self.retired.push(owed);
            self.owed = kept;
        }
    }

    /// What a tight pool owes, at once: others may be waiting for it. A pool that is not
    /// tight keeps it for the next tick.
    fn owing_if_tight(&mut self) -> Vec<Return> {
        if self.tight {
            self.owing()
        } else {
            Vec::new()
        }
    }

    /// Everything owed, as operations: the current hold's (with the slots and corrections)
    /// and the retired ones.
    fn owing(&mut self) -> Vec<Return> {
        let mut out = std::mem::take(&mut self.retired);
        let mut owed = std::mem::take(&mut self.owed);
        owed.budget = self.hold.clone();
        owed.epoch = self.epoch;
        if !owed.is_empty() {
            out.push(owed);
        }
        out
    }
}

#[cfg(test)]
mod tests;
