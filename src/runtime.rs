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
        let due: Vec<_> = self
            .config
            .keys()
            .filter_map(|key| {
                let budget = key.budget.as_ref()?;
                let counters = self.limits.key(&key.id)?;
                (previous.is_none() || !carries_on(&key.id, budget)).then(|| {
                    let start = limits::period::start(budget.period, now);
                    (key, budget, counters, start)
                })
            })
            .collect();
        if due.is_empty() {
            return Ok(0);
        }
        // Records of requests that already ended must be in the file to be counted.
        ledger.flush();
        // One pass over the ledger per period start (a handful: today, this week…).
        let mut spends: HashMap<i64, HashMap<String, account::query::KeySpend>> = HashMap::new();
        let mut seeded = 0;
        for (key, budget, counters, period_start) in due {
            let by_key = match spends.entry(period_start) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(account::query::spend_since(ledger.path(), period_start)?)
                }
            };
            let spend = by_key.get(&*key.id).cloned().unwrap_or_default();
            let alerted = budget
                .alert_at
                .iter()
                .enumerate()
                .filter(|(_, t)| spend.fired.iter().any(|f| (*f - **t).abs() < 1e-9))
                .fold(0u32, |mask, (i, _)| mask | (1 << i));
            counters.seed(limits::Spend {
                period_start,
                spent: spend.spent_nanos,
                reserved: 0,
                alerted,
            });
            seeded += 1;
        }
        Ok(seeded)
    }
}
