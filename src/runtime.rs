//! Everything derived from one config snapshot, swapped as a unit.

use std::collections::HashMap;

use crate::account::{self, Ledger};
use crate::config::{Budget, Snapshot};
use crate::limits::{self, Registry};
use crate::metrics::{Meters, Metrics};
use crate::route::Router;

pub struct Runtime {
    pub config: Snapshot,
    pub router: Router,
    /// Limit and budget counters by key and model id; carried over from `previous`.
    pub limits: Registry,
    /// Metric handles by model, key and key × model.
    pub meters: Meters,
}

impl Runtime {
    pub fn new(config: Snapshot, previous: Option<&Runtime>, metrics: &Metrics) -> Self {
        let router = Router::build(&config, previous.map(|p| &p.router));
        let limits = Registry::build(&config, previous.map(|p| &p.limits));
        let meters = Meters::build(metrics, &config);
        Runtime {
            meters,
            config,
            router,
            limits,
        }
    }
}

impl Runtime {
    /// Rebuilds from the ledger each budget's spend in its current period and the alerts
    /// already fired, so neither a restart nor a reload resets a budget or repeats an alert.
    /// With `previous` (a reload), only budgets whose counters cannot carry on are rebuilt:
    /// keys that are new, that gained a budget, or whose period or thresholds changed.
    /// Reservations of requests in flight are kept. Returns how many budgets were rebuilt.
    ///
    /// Exact even while requests run: the keys' counters are held from before the ledger is
    /// flushed until they are seeded, and a request hands its record to the ledger before it
    /// settles, so every request that settled before the hold is in what is read, and every
    /// other one settles after the seed. Nothing is changed unless every read succeeds.
    pub fn seed_budgets(
        &self,
        ledger: &Ledger,
        previous: Option<&Snapshot>,
    ) -> Result<usize, String> {
        let before: HashMap<&str, Option<&Budget>> = previous
            .map(|p| p.keys().map(|k| (&*k.id, k.budget.as_ref())).collect())
            .unwrap_or_default();
        let carries_on =
            |id: &str, budget: &Budget| {
                before.get(id).copied().flatten().is_some_and(|old| {
                    old.period == budget.period && old.alert_at == budget.alert_at
                })
            };
        let now = limits::now_ms();
        let mut due: Vec<_> = self
            .config
            .keys()
            .filter_map(|key| {
                let budget = key.budget.as_ref()?;
                let counters = self.limits.key(&key.id)?;
                (previous.is_none() || !carries_on(&key.id, budget)).then(|| {
                    (
                        &*key.id,
                        budget,
                        counters,
                        limits::period::start(budget.period, now),
                    )
                })
            })
            .collect();
        if due.is_empty() {
            return Ok(0);
        }
        // One order for every holder of several keys' counters.
        due.sort_unstable_by_key(|d| d.0);
        let mut held: Vec<_> = due.iter().map(|d| d.2.hold()).collect();
        ledger.flush();
        // One pass over the ledger per period start (a handful: today, this week…).
        let mut spends: HashMap<i64, HashMap<String, account::query::KeySpend>> = HashMap::new();
        for &(_, _, _, period_start) in &due {
            if let std::collections::hash_map::Entry::Vacant(e) = spends.entry(period_start) {
                e.insert(account::query::spend_since(ledger.path(), period_start)?);
            }
        }
        for ((id, budget, _, period_start), counters) in due.iter().zip(&mut held) {
            let spend = spends
                .get(period_start)
                .and_then(|by_key| by_key.get(*id))
                .cloned()
                .unwrap_or_default();
            let alerted = budget
                .alert_at
                .iter()
                .enumerate()
                .filter(|(_, t)| spend.fired.iter().any(|f| (*f - **t).abs() < 1e-9))
                .fold(0u32, |mask, (i, _)| mask | (1 << i));
            counters.seed(limits::Spend {
                period_start: *period_start,
                spent: spend.spent_nanos,
                reserved: 0,
                alerted,
                generation: self.limits.generation,
            });
        }
        Ok(due.len())
    }
}
