//! Admission and settlement against the rules: exact under concurrency, sliding, settled.

use std::sync::Arc;

use super::*;
use crate::config;

const NOW: i64 = 1_795_000_000_000;

fn setup(key_extra: &str, model_extra: &str) -> (Arc<Key>, Arc<Model>, Registry) {
    let text = format!(
        r#"
[[pools]]
name = "p"
[[models]]
slug = "m"
pool = "p"
price = {{ input_per_mtok = 1.0, output_per_mtok = 2.0 }}
{model_extra}
[[keys]]
id = "k"
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
models = ["*"]
{key_extra}
"#
    );
    let s = config::parse(&text).unwrap();
    let registry = Registry::build(&s, None);
    (
        s.key_by_id("k").unwrap().clone(),
        s.model("m").unwrap().clone(),
        registry,
    )
}

fn demand(model: &Model, input: u64, output: u64) -> Demand {
    Demand {
        input_tokens: input,
        output_tokens: output,
        choices: 1,
        prices: model.token_prices,
        per_request: 0,
    }
}

fn try_admit(
    key: &Key,
    model: &Model,
    r: &Registry,
    d: Demand,
    now: i64,
) -> Result<(Ticket, RateView), LimitError> {
    admit(
        key,
        r.key("k").unwrap(),
        model,
        r.model("m").unwrap(),
        d,
        now,
        r.generation,
    )
}

#[test]
fn concurrent_admissions_never_pass_the_budget() {
    // Worst case per request: 1000 in × $1/M + 1000 out × $2/M = $0.003; $0.0305 fits 10.
    let (key, model, r) = setup("budget = { usd = 0.0305, period = \"daily\" }", "");
    let r = Arc::new(r);
    let threads: Vec<_> = (0..64)
        .map(|_| {
            let (key, model, r) = (key.clone(), model.clone(), r.clone());
            std::thread::spawn(move || {
                try_admit(&key, &model, &r, demand(&model, 1000, 1000), NOW)
                    .ok()
                    .map(|(t, _)| t)
            })
        })
        .collect();
    let tickets: Vec<Ticket> = threads
        .into_iter()
        .filter_map(|t| t.join().unwrap())
        .collect();
    assert_eq!(tickets.len(), 10);
    for t in tickets {
        t.settle(2000, 3_000_000, NOW + 1);
    }
    let spend = r.key("k").unwrap().spend(key.budget.as_ref(), NOW + 2, 0);
    assert_eq!((spend.spent, spend.reserved), (30_000_000, 0));
    let refused = try_admit(&key, &model, &r, demand(&model, 1000, 1000), NOW + 3)
        .err()
        .unwrap();
    assert!(
        matches!(
            refused,
            LimitError::Budget {
                retry_after: Some(_),
                ..
            }
        ),
        "{refused:?}"
    );
}

#[test]
fn settling_below_the_reservation_frees_room() {
    let (key, model, r) = setup("budget = { usd = 0.0035, period = \"total\" }", "");
    let (t, _) = try_admit(&key, &model, &r, demand(&model, 1000, 1000), NOW).unwrap();
    assert!(try_admit(&key, &model, &r, demand(&model, 1000, 1000), NOW).is_err());
    t.settle(1010, 400_000, NOW);
    assert!(try_admit(&key, &model, &r, demand(&model, 1000, 1000), NOW).is_ok());
}

#[test]
fn clamping_lowers_max_tokens_to_what_the_budget_pays_for() {
    let (key, model, r) = setup(
        "budget = { usd = 0.002, period = \"daily\", clamp_max_tokens = true }",
        "",
    );
    // $0.002 − 1000 in × $1/M = $0.001 left for output at $2/M: 500 tokens.
    let (t, _) = try_admit(&key, &model, &r, demand(&model, 1000, 4000), NOW).unwrap();
    assert_eq!(t.clamped_output, Some(500));
    drop(t);
    // The dropped ticket kept its worst case: nothing is left, not even a minimal answer.
    let e = try_admit(&key, &model, &r, demand(&model, 1000, 4000), NOW)
        .err()
        .unwrap();
    assert!(matches!(e, LimitError::Budget { .. }));
}

#[test]
fn a_clamp_shares_what_the_budget_pays_for_among_the_choices() {
    let (key, model, r) = setup(
        "budget = { usd = 0.002, period = \"daily\", clamp_max_tokens = true }",
        "",
    );
    // $0.001 left for output at $2/M is 500 tokens in all: 125 for each of 4 choices.
    let d = Demand {
        choices: 4,
        ..demand(&model, 1000, 4000)
    };
    let (t, _) = try_admit(&key, &model, &r, d, NOW).unwrap();
    assert_eq!(t.clamped_output, Some(125));
}

#[test]
fn rpm_holds_exactly_and_slides() {
    let (key, model, r) = setup("rpm = 5", "");
    let mut held = Vec::new();
    for i in 0..5 {
        held.push(try_admit(&key, &model, &r, demand(&model, 1, 1), NOW + i * 1000).unwrap());
    }
    let e = try_admit(&key, &model, &r, demand(&model, 1, 1), NOW + 5_000)
        .err()
        .unwrap();
    assert_eq!(
        e,
        LimitError::Limited {
            kind: LimitKind::Requests,
            scope: Scope::Key,
            limit: 5,
            retry_after: 55
        }
    );
    assert!(
        try_admit(&key, &model, &r, demand(&model, 1, 1), NOW + 60_000).is_ok(),
        "the first request left the window"
    );
    let (_, view) = &held[4];
    assert_eq!(view.requests, Some((5, 0, 60)));
}

#[test]
fn tpm_refuses_with_400_what_can_never_fit_and_429_what_can_later() {
    let (key, model, r) = setup("tpm = 1000", "");
    assert_eq!(
        try_admit(&key, &model, &r, demand(&model, 10, 1000), NOW).err(),
        Some(LimitError::TooLarge {
            scope: Scope::Key,
            limit: 1000,
            need: 1010
        })
    );
    let (t, view) = try_admit(&key, &model, &r, demand(&model, 100, 500), NOW).unwrap();
    assert_eq!(view.tokens, Some((1000, 400, 60)));
    assert!(matches!(
        try_admit(&key, &model, &r, demand(&model, 100, 500), NOW).err(),
        Some(LimitError::Limited {
            kind: LimitKind::Tokens,
            ..
        })
    ));
    t.settle(150, 0, NOW);
    assert!(
        try_admit(&key, &model, &r, demand(&model, 100, 500), NOW).is_ok(),
        "settled with 150 actual tokens"
    );
}

#[test]
fn concurrency_is_per_key_and_per_model() {
    let (key, model, r) = setup("max_concurrent = 2", "limits = { max_concurrent = 3 }");
    let a = try_admit(&key, &model, &r, demand(&model, 1, 1), NOW).unwrap();
    let _b = try_admit(&key, &model, &r, demand(&model, 1, 1), NOW).unwrap();
    let e = try_admit(&key, &model, &r, demand(&model, 1, 1), NOW)
        .err()
        .unwrap();
    assert!(matches!(
        e,
        LimitError::Limited {
            kind: LimitKind::Concurrency,
            scope: Scope::Key,
            limit: 2,
            ..
        }
    ));
    drop(a);
    let _c = try_admit(&key, &model, &r, demand(&model, 1, 1), NOW).unwrap();
    assert_eq!(r.model("m").unwrap().inflight(), 2);
}

#[test]
fn a_freed_slot_admits_the_next_request_and_is_not_freed_twice() {
    let (key, model, r) = setup("max_concurrent = 1", "limits = { max_concurrent = 1 }");
    let d = demand(&model, 1, 1);
    let mut first = try_admit(&key, &model, &r, d, NOW).unwrap().0;
    assert!(
        try_admit(&key, &model, &r, d, NOW).is_err(),
        "one at a time"
    );
    // The replica has answered: the next request is admitted before the first settles.
    first.free_slot();
    first.free_slot();
    let second = try_admit(&key, &model, &r, d, NOW).unwrap().0;
    let _ = first.settle(2, 0, NOW);
    assert_eq!(
        r.key("k").unwrap().inflight(),
        1,
        "settling frees nothing more"
    );
    assert_eq!(r.model("m").unwrap().inflight(), 1);
    assert!(
        try_admit(&key, &model, &r, d, NOW).is_err(),
        "the second still runs"
    );
    drop(second);
    assert_eq!(r.key("k").unwrap().inflight(), 0);
    assert!(try_admit(&key, &model, &r, d, NOW).is_ok());
}

#[test]
fn each_alert_threshold_crosses_once_per_period() {
    let (key, model, r) = setup(
        "budget = { usd = 0.01, period = \"daily\", enforce = false, alert_at = [0.5, 1.0] }",
        "",
    );
    let cost = |n| {
        let (t, _) = try_admit(&key, &model, &r, demand(&model, 0, 0), NOW).unwrap();
        t.settle(0, n, NOW).crossed
    };
    assert!(cost(4_000_000).is_empty());
    let crossed = cost(2_000_000);
    assert_eq!(
        crossed.iter().map(|c| c.threshold).collect::<Vec<_>>(),
        vec![0.5]
    );
    assert!(cost(1_000_000).is_empty());
    let crossed = cost(9_000_000);
    assert_eq!(crossed.len(), 1);
    assert_eq!(crossed[0].threshold, 1.0);
    assert!(
        cost(9_000_000).is_empty(),
        "a soft budget keeps admitting and alerts once"
    );
}

#[test]
fn a_reload_keeps_counters_of_keys_that_still_exist() {
    let (key, model, r) = setup("rpm = 1", "");
    let _t = try_admit(&key, &model, &r, demand(&model, 1, 1), NOW).unwrap();
    let s = config::parse(
        "[[pools]]\nname = \"p\"\n[[models]]\nslug = \"m\"\npool = \"p\"\n[[keys]]\nid = \"k\"\nsha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nmodels = [\"*\"]\nrpm = 2\n",
    )
    .unwrap();
    let r2 = Registry::build(&s, Some(&r));
    let key2 = s.key_by_id("k").unwrap();
    assert_eq!(r2.key("k").unwrap().inflight(), 1, "the same counters");
    assert!(
        admit(
            key2,
            r2.key("k").unwrap(),
            s.model("m").unwrap(),
            r2.model("m").unwrap(),
            demand(&model, 1, 1),
            NOW,
            r2.generation
        )
        .is_ok(),
        "the new limit applies at once"
    );
}

#[test]
fn a_request_that_outlives_its_period_never_touches_the_next_one() {
    const DAY: i64 = 86_400_000;
    let (key, model, r) = setup("budget = { usd = 1.0, period = \"daily\" }", "");
    let spend = |now| r.key("k").unwrap().spend(key.budget.as_ref(), now, 0);
    // Admitted late on day 1; still running on day 2.
    let (late, _) = try_admit(&key, &model, &r, demand(&model, 10, 10), NOW).unwrap();
    let (dropped, _) = try_admit(&key, &model, &r, demand(&model, 10, 10), NOW).unwrap();
    let next_day = NOW + DAY;
    let (today, _) = try_admit(&key, &model, &r, demand(&model, 10, 10), next_day).unwrap();
    today.settle(20, 5_000, next_day);
    assert_eq!(spend(next_day).spent, 5_000);

    // Settled or dropped on day 2, the day-1 requests only release their reservations.
    late.settle(20, 7_000, next_day);
    drop(dropped);
    let s = spend(next_day);
    assert_eq!((s.spent, s.reserved), (5_000, 0));
}

#[test]
fn token_counts_past_u64_saturate_instead_of_wrapping() {
    let (key, model, r) = setup("tpm = 1000\nbudget = { usd = 1.0, period = \"daily\" }", "");
    let err = try_admit(&key, &model, &r, demand(&model, 5, u64::MAX), NOW)
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            LimitError::Budget {
                worst_nanos: u64::MAX,
                ..
            }
        ),
        "{err:?}"
    );
    let (key, model, r) = setup("tpm = 1000", "");
    let err = try_admit(&key, &model, &r, demand(&model, 5, u64::MAX), NOW)
        .err()
        .unwrap();
    assert_eq!(
        err,
        LimitError::TooLarge {
            scope: Scope::Key,
            limit: 1000,
            need: u64::MAX
        }
    );
}

#[test]
fn a_rebuilt_budget_is_never_rolled_back_by_a_request_on_the_older_config() {
    const DAY: i64 = 86_400_000;
    let (daily, model, r) = setup("budget = { usd = 1.0, period = \"daily\" }", "");
    // Admitted under the daily budget, still running when a reload makes it monthly.
    let (running, _) = try_admit(&daily, &model, &r, demand(&model, 10, 10), NOW).unwrap();
    let s = config::parse(
        "[[pools]]\nname = \"p\"\n[[models]]\nslug = \"m\"\npool = \"p\"\nprice = { input_per_mtok = 1.0, output_per_mtok = 2.0 }\n[[keys]]\nid = \"k\"\nsha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nmodels = [\"*\"]\nbudget = { usd = 1.0, period = \"monthly\" }\n",
    )
    .unwrap();
    let r2 = Registry::build(&s, Some(&r));
    let monthly = s.key_by_id("k").unwrap();
    let month_start = period::start(monthly.budget.as_ref().unwrap().period, NOW);
    assert!(month_start < NOW - DAY, "the month began before yesterday");
    r2.key("k").unwrap().finish_rebuild(
        Spend {
            period_start: month_start,
            spent: 900_000_000,
            reserved: 0,
            alerted: 0,
            generation: r2.generation,
            period: Some(config::Period::Monthly),
        },
        &[],
        &[],
    );
    // A request that loaded the old config before the swap admits with the daily budget:
    // it must not roll the rebuilt monthly spend back to a fresh day.
    let (late, _) = try_admit(&daily, &model, &r, demand(&model, 10, 10), NOW).unwrap();
    let spend = |reg: &Registry, b: &Budget, g| reg.key("k").unwrap().spend(Some(b), NOW, g);
    assert_eq!(
        spend(&r2, monthly.budget.as_ref().unwrap(), r2.generation).spent,
        900_000_000
    );
    // Both started within the month: their cost lands in it.
    running.settle(20, 5_000, NOW);
    late.settle(20, 7_000, NOW);
    let s = spend(&r2, monthly.budget.as_ref().unwrap(), r2.generation);
    assert_eq!((s.spent, s.reserved), (900_012_000, 0));
    // The older config's view leaves it as it is.
    assert_eq!(
        spend(&r, daily.budget.as_ref().unwrap(), r.generation).spent,
        900_012_000
    );
}

/// The registry after a reload to `budget` (same key and model), and that key.
fn reloaded(r: &Registry, budget: &str) -> (Registry, Arc<Key>) {
    let s = config::parse(&format!(
        "[[pools]]\nname = \"p\"\n[[models]]\nslug = \"m\"\npool = \"p\"\nprice = {{ input_per_mtok = 1.0, output_per_mtok = 2.0 }}\n[[keys]]\nid = \"k\"\nsha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nmodels = [\"*\"]\n{budget}\n"
    ))
    .unwrap();
    (
        Registry::build(&s, Some(r)),
        s.key_by_id("k").unwrap().clone(),
    )
}

#[test]
fn a_request_on_the_older_config_just_after_midnight_counts_in_the_new_day() {
    const DAY: i64 = 86_400_000;
    let midnight = (NOW / DAY + 1) * DAY;
    // Same daily budget before and after a reload at 23:59:59.
    let (old, model, r) = setup("budget = { usd = 1.0, period = \"daily\" }", "");
    let (r2, new) = reloaded(&r, "budget = { usd = 1.0, period = \"daily\" }");
    let admit_on = |key: &Key, reg: &Registry, at| {
        admit(
            key,
            reg.key("k").unwrap(),
            &model,
            reg.model("m").unwrap(),
            demand(&model, 1, 1),
            at,
            reg.generation,
        )
        .unwrap()
        .0
    };
    admit_on(&new, &r2, midnight - 500).settle(2, 3_000, midnight - 400);
    // A request that loaded the older config admits after midnight, settles, and the day's
    // spend holds it once the new config's next request rolls.
    admit_on(&old, &r, midnight + 500).settle(2, 5_000, midnight + 600);
    admit_on(&new, &r2, midnight + 700).settle(2, 0, midnight + 800);
    let day = r2
        .key("k")
        .unwrap()
        .spend(new.budget.as_ref(), midnight + 900, r2.generation);
    assert_eq!((day.period_start, day.spent), (midnight, 5_000));

    // Now the older config is monthly and the new daily: the older one cannot roll, but
    // what it settles after midnight still starts the new day instead of landing in the last.
    let (monthly, _, r) = setup("budget = { usd = 1.0, period = \"monthly\" }", "");
    let (r2, daily) = reloaded(&r, "budget = { usd = 1.0, period = \"daily\" }");
    admit_on(&daily, &r2, midnight - 500).settle(2, 3_000, midnight - 400);
    admit_on(&monthly, &r, midnight + 500).settle(2, 5_000, midnight + 600);
    let day = r2
        .key("k")
        .unwrap()
        .spend(daily.budget.as_ref(), midnight + 900, r2.generation);
    assert_eq!((day.period_start, day.spent), (midnight, 5_000));
}

#[test]
fn a_clock_read_just_before_the_period_began_never_takes_the_spend_back() {
    const DAY: i64 = 86_400_000;
    let midnight = (NOW / DAY + 1) * DAY;
    let (key, model, r) = setup("budget = { usd = 1.0, period = \"daily\" }", "");
    let (today, _) = try_admit(&key, &model, &r, demand(&model, 1, 1), midnight + 100).unwrap();
    today.settle(2, 4_000, midnight + 150);
    // Another worker read the clock a moment before midnight.
    let (late, _) = try_admit(&key, &model, &r, demand(&model, 1, 1), midnight - 1).unwrap();
    late.settle(2, 9_000, midnight + 160);
    let s = r
        .key("k")
        .unwrap()
        .spend(key.budget.as_ref(), midnight + 200, 0);
    assert_eq!((s.period_start, s.spent), (midnight, 4_000));
}
