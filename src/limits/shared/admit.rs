//! The request path of cluster mode: a request is admitted against this node's quota of its
//! key and model when the quota holds enough (`quota.rs`), else in Redis, in one round trip
//! that grants the quota more; its settlement is made against the quota, and what the quota
//! owes Redis rides with a lane's next batch.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::quota::{self, Need, Pool, Return, Terms};
use super::{
    budget_hash, lane, lua_int, model_prefix, period, reply, Decision, KeyNames, Lease, ModelNames,
    Pools, Shared, NONE,
};
use crate::config::{Budget, Key, Limits};
use crate::limits::{Demand, Spend};

impl Shared {
    /// Checks every limit of the key (and the model's, if given) and the key's budget, and
    /// reserves the request's worst case: against this node's quota when it holds enough
    /// (`quota.rs`), else in Redis, one round trip that also grants the quota more.
    pub async fn admit(
        self: &Arc<Self>,
        key: &Key,
        model: Option<(&Limits, &str)>,
        demand: Demand,
        now_ms: i64,
    ) -> Decision {
        if !self.is_up() {
            return Decision::Down(self.settings.on_redis_down);
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        let pool = self.pool(key, model.map(|m| m.1));
        let terms = Terms::of(key, model.map(|m| m.0));
        let budget = key
            .budget
            .as_ref()
            .map(|b| budget_hash(&key.id, period::start(b.period, now_ms)));
        let need = Need {
            tokens: demand.tokens(),
            nanos: demand.worst_nanos(),
            budget: budget.as_deref(),
        };
        let asked_at = Instant::now();
        let (held, ask) = match pool.take(epoch, terms, &need, asked_at) {
            Ok(held) => {
                let (tokens, nanos) = (need.tokens, need.nanos);
                return self.admitted(key, pool, epoch, held, tokens, nanos, None);
            }
            Err(partly) => partly,
        };
        let base = format!(
            "{}{}",
            self.prefix(epoch),
            self.seq.fetch_add(1, Ordering::Relaxed)
        );
        let (k, m) = (&key.limits, model.map_or(&NONE, |m| m.0));
        let b = key.budget.as_ref();
        let nums = [
            k.rpm.map_or(0, lua_int),
            k.tpm.map_or(0, lua_int),
            k.max_concurrent.map_or(0, lua_int),
            u64::from(model.is_some()),
            m.rpm.map_or(0, lua_int),
            m.tpm.map_or(0, lua_int),
            m.max_concurrent.map_or(0, lua_int),
            u64::from(b.is_some()),
            b.map_or(0, |b| lua_int(b.nanos)),
            u64::from(b.is_some_and(|b| b.enforce)),
            u64::from(b.is_some_and(|b| b.clamp_max_tokens)),
            lua_int(demand.input_tokens),
            lua_int(demand.output_tokens),
            demand.choices.max(1),
            lua_int(demand.input_cost()),
            lua_int(demand.prices.output),
            crate::limits::MIN_CLAMPED_OUTPUT,
            ask.units,
            u64::from(ask.slots.is_some()),
            ask.slots.unwrap_or(0),
            u64::from(ask.nanos.is_some()),
            ask.nanos.map_or(0, lua_int),
            self.settings.expected_nodes.get(),
        ];
        let (tx, rx) = tokio::sync::oneshot::channel();
        lane::send(
            self,
            lane::Op {
                pool: pool.clone(),
                budget: budget.clone(),
                kind: lane::Kind::Grant {
                    base: base.clone(),
                    hold: self.hold_id(epoch),
                    nums,
                    reply: tx,
                },
            },
        );
        let Ok(answer) = rx.await else {
            pool.put_back(held, &need);
            return Decision::Down(self.settings.on_redis_down);
        };
        let fields = reply::Fields::of(&answer);
        let Some((granted, clamped, (spent, reserved))) = fields.granted(&demand) else {
            pool.put_back(held, &need);
            return reply::refusal(key, &fields, now_ms);
        };
        pool.saw_spend(spent, reserved);
        // What the request took from the grant is the grant's unit: clamped, if a budget
        // clamped it.
        let tokens = if held.rate.is_some() {
            need.tokens
        } else {
            granted.tokens
        };
        let nanos = if held.nanos {
            need.nanos
        } else {
            granted.unit_nanos
        };
        let Some(held) = pool.granted(
            epoch,
            &granted,
            held,
            &ask,
            &need,
            &base,
            budget.as_deref(),
            asked_at,
        ) else {
            return Decision::Down(self.settings.on_redis_down);
        };
        self.admitted(key, pool, epoch, held, tokens, nanos, clamped)
    }

    #[allow(clippy::too_many_arguments)]
    fn admitted(
        self: &Arc<Self>,
        key: &Key,
        pool: Arc<Pool>,
        epoch: u64,
        held: quota::Held,
        tokens: u64,
        nanos: u64,
        clamped: Option<u64>,
    ) -> Decision {
        let (requests, key_tokens, spent, reserved) = pool.seen();
        Decision::Admitted {
            view: reply::view(key, requests, 60, key_tokens, 60),
            lease: Lease {
                pool,
                epoch,
                held,
                tokens,
                nanos,
                spend: Spend {
                    spent,
                    reserved,
                    ..Spend::default()
                },
                shared: self.clone(),
            },
            clamped,
        }
    }

    /// This node's quota of a key and a model with limits (`None`: the key's alone).
    fn pool(&self, key: &Key, model: Option<&str>) -> Arc<Pool> {
        let find = |pools: &Pools| {
            pools.get(&*key.id).and_then(|pairs| {
                pairs
                    .iter()
                    .find(|(m, _)| m.as_deref() == model)
                    .map(|(_, p)| p.clone())
            })
        };
        if let Some(pool) = find(&self.pools.load()) {
            return pool;
        }
        let _one = self.new_pool.lock().unwrap_or_else(|e| e.into_inner());
        let pools = self.pools.load_full();
        if let Some(pool) = find(&pools) {
            return pool;
        }
        let known = self.names.load();
        let names = known
            .keys
            .get(&key.id)
            .cloned()
            .unwrap_or_else(|| Arc::new(KeyNames::of(&key.id)));
        let model_names = model.map(|slug| {
            known
                .models
                .get(slug)
                .cloned()
                .unwrap_or_else(|| Arc::new(ModelNames::with_prefix(&model_prefix(slug))))
        });
        let pool = Arc::new(Pool::new(key.id.clone(), names, model_names));
        let mut next = (*pools).clone();
        next.entry(key.id.clone())
            .or_default()
            .push((model.map(str::to_string), pool.clone()));
        self.pools.store(Arc::new(next));
        pool
    }

    /// Settles a request admitted against this node's quota, here: what it freed stays in
    /// the quota, or rides with the next batch of this thread's lane when the quota is
    /// tight, with what it spent. Redis down: its holdings lapse after their TTL; what it
    /// cost is in this node's ledger.
    pub(crate) fn settle(
        self: &Arc<Self>,
        lease: Lease,
        used_tokens: u64,
        used_nanos: u64,
        budget: Option<&Budget>,
        started_ms: i64,
    ) {
        let period_start = budget.map(|b| period::start(b.period, started_ms));
        let hash = period_start.map(|s| budget_hash(&lease.pool.key_id, s));
        let owed = lease.pool.settle(
            lease.epoch,
            lease.held,
            lease.tokens,
            lease.nanos,
            used_tokens,
            used_nanos,
            hash.as_deref()
                .zip(budget)
                .zip(period_start)
                .map(|((h, b), s)| (h, b, s)),
        );
        self.send_returns(&lease.pool, owed);
    }

    /// What names this node's slots and holds under one Redis connection: renewals extend
    /// only the current one's, so what an older one held lapses.
    pub(super) fn prefix(&self, epoch: u64) -> String {
        format!("{}e{epoch}:", self.lease_prefix)
    }

    /// This node's budget holds under one Redis connection.
    pub(super) fn hold_id(&self, epoch: u64) -> String {
        format!("{}h", self.prefix(epoch))
    }

    /// Frees a request's slot ahead of its settlement, once the replica has answered in
    /// full, so that a client sending requests one after the other never finds its
    /// previous one still counted.
    pub(crate) fn free_slot(self: &Arc<Self>, lease: &mut Lease) {
        if let Some(slot) = lease.held.slot.take() {
            let owed = lease.pool.free_slot(lease.epoch, slot);
            self.send_returns(&lease.pool, owed);
        }
    }

    /// Sends what a pool owes Redis, on this thread's lane; kept for later while Redis is
    /// down.
    pub(super) fn send_returns(self: &Arc<Self>, pool: &Arc<Pool>, owed: Vec<Return>) {
        if owed.is_empty() {
            return;
        }
        if !self.is_up() {
            pool.owe(owed);
            return;
        }
        for mut r in owed {
            // The script unpacks an operation's arguments onto Lua's stack, which holds a
            // few thousand: slots beyond a batch's worth go back in operations of their own.
            while r.slots.len() > SLOTS_PER_RETURN {
                let rest = r.slots.split_off(SLOTS_PER_RETURN);
                let first = Return {
                    epoch: r.epoch,
                    slots: std::mem::replace(&mut r.slots, rest),
                    ..Return::default()
                };
                self.send_return(pool, first);
            }
            self.send_return(pool, r);
        }
    }

    fn send_return(self: &Arc<Self>, pool: &Arc<Pool>, r: Return) {
        lane::send(
            self,
            lane::Op {
                pool: pool.clone(),
                budget: r.budget.clone(),
                kind: lane::Kind::Return(r),
            },
        );
    }
}

/// The most slots one return operation carries.
const SLOTS_PER_RETURN: usize = 1000;
