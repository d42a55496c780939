//! Everything derived from one config snapshot, swapped as a unit.

use std::collections::{BTreeSet, HashMap};

use crate::account::ledger::SpendByKey;
use crate::account::Ledger;
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
        let router = Router::build(&config, previous.map(|p| &p.router), metrics.fleet());
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
    /// Each budget's spend in its current period as this node counts it, and the
    /// thresholds fired: what seeds Redis when it holds none (cluster mode).
    pub fn budget_spends(&self) -> Vec<(std::sync::Arc<str>, i64, u64, Vec<f64>)> {
        let now = limits::now_ms();
        self.config
            .keys()
            .filter_map(|key| {
                let budget = key.budget.as_ref()?;
                let spend =
                    self.limits
                        .key(&key.id)?
                        .spend(Some(budget), now, self.limits.generation);
                let fired = budget
                    .alert_at
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| spend.alerted & (1 << i) != 0)
                    .map(|(_, t)| *t)
                    .collect();
                Some((key.id.clone(), spend.period_start, spend.spent, fired))
            })
            .collect()
    }

    /// Makes this runtime the one whose health checks run, after it was stored as the one
    /// in use; `previous`'s stop (a reload).
    pub fn take_over(&self, previous: Option<&Runtime>) {
        if let Some(p) = previous {
            p.router.stop_checks();
        }
        self.router.start_checks(&self.config);
    }

    /// Rebuilds from the ledger each budget's spend in its current period and the alerts
    /// already fired, so neither a restart nor a reload resets a budget or repeats an alert.
    /// With `previous` (a reload), only budgets whose counters cannot carry on are rebuilt:
    /// keys that are new, that gained a budget, or whose period or thresholds changed.
    /// Reservations of requests in flight are kept. Returns how many budgets were rebuilt.
    ///
    /// Exact while requests run, without holding any counter across a read of the ledger:
    /// each key's counters are held only to mark the rebuild and to queue the question to
    /// the ledger writer, which answers with exactly the records handed over before it. A
    /// request hands its record in the same step as it settles (`Ticket::settle_with`), so
    /// it is either in the answer or settles after the mark and is added to it. Nothing
    /// changes unless every answer comes.
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
        // A rebuild that a period boundary overtakes is done again for the new period.
        for _ in 0..3 {
            if let Some(rebuilt) = self.rebuild_budgets(ledger, &carries_on, previous.is_some())? {
                return Ok(rebuilt);
            }
        }
        Err("budget periods kept ending during the rebuild; try again".into())
    }

    /// One attempt of `seed_budgets`; `None` when a rebuilt period ended meanwhile (nothing
    /// was changed then).
    fn rebuild_budgets(
        &self,
        ledger: &Ledger,
        carries_on: &dyn Fn(&str, &Budget) -> bool,
        reload: bool,
    ) -> Result<Option<usize>, String> {
        let now = limits::now_ms();
        let mut due: Vec<_> = self
            .config
            .keys()
            .filter_map(|key| {
                let budget = key.budget.as_ref()?;
                let counters = self.limits.key(&key.id)?;
                (!reload || !carries_on(&key.id, budget)).then(|| {
                    let start = limits::period::start(budget.period, now);
                    let end = limits::period::end(budget.period, now);
                    (&*key.id, budget, counters, (start, end))
                })
            })
            .collect();
        if due.is_empty() {
            return Ok(Some(0));
        }
        // One order for every holder of several keys' counters.
        due.sort_unstable_by_key(|d| d.0);
        let periods: BTreeSet<(i64, Option<i64>)> = due.iter().map(|d| d.3).collect();
        let asked: Vec<_> = {
            let mut held: Vec<_> = due.iter().map(|d| d.2.hold()).collect();
            for (h, d) in held.iter_mut().zip(&due) {
                h.begin_rebuild(d.3 .0, d.3 .1);
            }
            // One pass over the ledger per period (a handful: today, this week…).
            periods
                .iter()
                .map(|&(start, end)| ((start, end), ledger.ask_spend_since(start, end)))
                .collect()
        };
        let abandon = || {
            for d in &due {
                d.2.abandon_rebuild();
            }
        };
        let mut spends: HashMap<(i64, Option<i64>), SpendByKey> = HashMap::new();
        for (period, answer) in asked {
            match answer.wait() {
                Ok(by_key) => {
                    spends.insert(period, by_key);
                }
                Err(e) => {
                    abandon();
                    return Err(e);
                }
            }
        }
        let later = limits::now_ms();
        if due.iter().any(|d| d.3 .1.is_some_and(|end| later >= end)) {
            abandon();
            return Ok(None);
        }
        for (id, budget, counters, period) in &due {
            let spend = spends
                .get(period)
                .and_then(|by_key| by_key.get(*id))
                .cloned()
                .unwrap_or_default();
            counters.finish_rebuild(
                limits::Spend {
                    period_start: period.0,
                    spent: spend.spent_nanos,
                    reserved: 0,
                    alerted: 0,
                    generation: self.limits.generation,
                    period: Some(budget.period),
                },
                &budget.alert_at,
                &spend.fired,
            );
        }
        Ok(Some(due.len()))
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::account::ledger::SpendAnswer;
    use crate::account::{record_id, UsageRecord};
    use crate::config;
    use crate::limits::{Demand, Ticket};
    use crate::vocab::Usage;

    fn config(budget: &str) -> Snapshot {
        config::parse(&format!(
            "[[pools]]\nname = \"p\"\n[[models]]\nslug = \"m\"\npool = \"p\"\n\
             price = {{ input_per_mtok = 1.0, output_per_mtok = 2.0 }}\n[[keys]]\nid = \"k\"\n\
             sha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n\
             models = [\"*\"]\n{budget}\n"
        ))
        .unwrap()
    }

    fn admit(runtime: &Runtime) -> Ticket {
        let key = runtime.config.key_by_id("k").unwrap();
        let model = runtime.config.model("m").unwrap();
        let demand = Demand {
            input_tokens: 10,
            output_tokens: 10,
            choices: 1,
            prices: model.token_prices,
            per_request: 0,
        };
        let (ticket, _) = limits::admit(
            key,
            runtime.limits.key("k").unwrap(),
            model,
            runtime.limits.model("m").unwrap(),
            demand,
            limits::now_ms(),
            runtime.limits.generation,
        )
        .unwrap();
        ticket
    }

    /// Settles `ticket` at `nanos`, handing its ledger row in the same step.
    fn finish(ledger: &Ledger, ticket: Ticket, nanos: u64) -> limits::Settlement {
        let now = limits::now_ms();
        let row = UsageRecord {
            id: record_id(now),
            request_id: "r".into(),
            ts_ms: now,
            key_id: "k".into(),
            model: "m".into(),
            surface: "chat_completions",
            status: 200,
            usage: Usage::default(),
            cost_nanos: nanos,
            estimated: false,
            ttft_ms: None,
            duration_ms: 1.0,
            replica: None,
            queue_ms: None,
            deployed: None,
        };
        ticket.settle_with(0, nanos, now, || ledger.record(row))
    }

    fn spent(runtime: &Runtime) -> u64 {
        let key = runtime.config.key_by_id("k").unwrap();
        runtime
            .limits
            .key("k")
            .unwrap()
            .spend(
                key.budget.as_ref(),
                limits::now_ms(),
                runtime.limits.generation,
            )
            .spent
    }

    /// A fresh ledger (in its directory, removed when dropped) and metrics.
    fn ledger() -> (tempfile::TempDir, Ledger, Metrics) {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path(), Default::default()).unwrap();
        (dir, ledger, Metrics::new())
    }

    /// A rebuild of this month's spend started by hand, as `rebuild_budgets` does it: the
    /// counters marked and the ledger asked under the hold. Returns the month's start.
    fn ask_for_month(counters: &limits::Counters, ledger: &Ledger) -> (i64, SpendAnswer) {
        let start = limits::period::start(config::Period::Monthly, limits::now_ms());
        let mut held = counters.hold();
        held.begin_rebuild(start, None);
        let answer = ledger.ask_spend_since(start, None);
        drop(held);
        (start, answer)
    }

    /// Ends that rebuild with `spent` from the ledger, for a budget alerting at `alert_at`.
    fn finish_month(counters: &limits::Counters, start: i64, spent: u64, alert_at: &[f64]) {
        let from_ledger = limits::Spend {
            period_start: start,
            spent,
            period: Some(config::Period::Monthly),
            ..limits::Spend::default()
        };
        counters.finish_rebuild(from_ledger, alert_at, &[]);
    }

    #[test]
    fn a_request_settling_while_the_ledger_is_asked_counts_once() {
        let (_dir, ledger, metrics) = ledger();
        let runtime = Runtime::new(
            config("budget = { usd = 1.0, period = \"monthly\" }"),
            None,
            &metrics,
        );
        let counters = runtime.limits.key("k").unwrap();
        finish(&ledger, admit(&runtime), 10_000);
        let running = admit(&runtime);

        // The rebuild's steps, with a settlement between the question and the answer.
        let (start, answer) = ask_for_month(counters, &ledger);
        finish(&ledger, running, 7_000);
        let from_ledger = answer.wait().unwrap();
        assert_eq!(
            from_ledger["k"].spent_nanos, 10_000,
            "the answer is as of the question"
        );
        finish_month(counters, start, from_ledger["k"].spent_nanos, &[]);
        assert_eq!(spent(&runtime), 17_000, "each request once");
        ledger.close();
    }

    #[test]
    fn an_alert_fired_while_the_ledger_is_asked_does_not_fire_again() {
        let (_dir, ledger, metrics) = ledger();
        let runtime = Runtime::new(
            config("budget = { usd = 1.0, period = \"monthly\", alert_at = [0.5] }"),
            None,
            &metrics,
        );
        let counters = runtime.limits.key("k").unwrap();
        let running = admit(&runtime);

        let (start, answer) = ask_for_month(counters, &ledger);
        // Half the budget settles after the question: the alert fires now, and its row
        // reaches the ledger after the answer was taken.
        let crossed = finish(&ledger, running, 600_000_000).crossed;
        assert_eq!(crossed.len(), 1);
        let from_ledger = answer.wait().unwrap();
        assert!(from_ledger.get("k").is_none_or(|s| s.fired.is_empty()));
        finish_month(counters, start, 0, &[0.5]);
        assert_eq!(spent(&runtime), 600_000_000);
        let next = finish(&ledger, admit(&runtime), 1_000);
        assert!(next.crossed.is_empty(), "the 50% alert fired once already");
        ledger.close();
    }

    #[test]
    fn a_reload_that_gives_a_key_a_budget_keeps_what_its_running_requests_cost() {
        let (_dir, ledger, metrics) = ledger();
        let old = Runtime::new(config(""), None, &metrics);
        finish(&ledger, admit(&old), 10_000);
        let running = admit(&old);
        let new = Runtime::new(
            config("budget = { usd = 1.0, period = \"monthly\" }"),
            Some(&old),
            &metrics,
        );
        assert_eq!(new.seed_budgets(&ledger, Some(&old.config)), Ok(1));
        assert_eq!(spent(&new), 10_000);
        finish(&ledger, running, 7_000);
        assert_eq!(spent(&new), 17_000);
        // Reloading the same config again rebuilds nothing and keeps the spend.
        let again = Runtime::new(
            config("budget = { usd = 1.0, period = \"monthly\" }"),
            Some(&new),
            &metrics,
        );
        assert_eq!(again.seed_budgets(&ledger, Some(&new.config)), Ok(0));
        assert_eq!(spent(&again), 17_000);
        ledger.close();
    }

    #[test]
    fn a_rebuild_the_ledger_cannot_answer_changes_nothing() {
        let (_dir, ledger, metrics) = ledger();
        let old = Runtime::new(
            config("budget = { usd = 1.0, period = \"daily\" }"),
            None,
            &metrics,
        );
        finish(&ledger, admit(&old), 10_000);
        let running = admit(&old);
        ledger.close();
        let new = Runtime::new(
            config("budget = { usd = 1.0, period = \"monthly\" }"),
            Some(&old),
            &metrics,
        );
        let refused = new.seed_budgets(&ledger, Some(&old.config));
        assert!(refused.unwrap_err().contains("stopped"));
        // The running config's spend is as it was, and nothing is left marked.
        assert_eq!(spent(&old), 10_000);
        finish(&ledger, running, 7_000);
        assert_eq!(spent(&old), 17_000);
    }
}
