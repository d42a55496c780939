//! Limits and budgets through the real server: exact under concurrency, headers in both
//! dialects, 402/429 bodies, durable spend, counters kept across reloads, alerts once.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_admits_exactly_what_fits_under_64_concurrent_requests() {
    let sim = sim().await;
    // Worst case per request: 81 × 500 + 1000 × 1500 nano-dollars = $0.0015405; room for 10.5.
    let gw = Gateway::start(&config_with(
        &sim,
        "budget = { usd = 0.01617525, period = \"monthly\" }",
    ));
    let mut body = ask(1000);
    body["sim"] = json!({"ttft_ms": 400});
    let calls = (0..64).map(|_| gw.chat(body.clone()));
    let responses = futures_util::future::join_all(calls).await;
    let ok = responses.iter().filter(|r| r.status() == 200).count();
    let refused: Vec<_> = responses
        .into_iter()
        .filter(|r| r.status() == 402)
        .collect();
    assert_eq!((ok, refused.len()), (10, 54));
    let e: Value = refused.into_iter().next().unwrap().json().await.unwrap();
    assert_eq!(e["error"]["code"], "budget_exceeded");
    assert!(e["error"]["message"].as_str().unwrap().contains("team-a"));

    // Every admitted request is settled and recorded once tollgate has finished it; the
    // refused ones leave no row.
    assert_eq!(gw.usage_totals_of(10).await.0, 10);
    let spent: u64 = gw.usage("bucket=day").await["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["cost_micros"].as_u64().unwrap())
        .sum();
    assert!(
        spent <= 16_176,
        "the ledger never shows spend above the budget: {spent} µ$"
    );
    let key: Value = gw.key_state("team-a").await;
    assert_eq!(key["budget"]["reserved_usd"], 0.0);
    assert!(key["budget"]["spent_usd"].as_f64().unwrap() <= 0.01617525);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_holds_exactly_under_concurrency_and_429_says_when_to_retry() {
    let sim = sim().await;
    let gw = Gateway::start(&config_with(&sim, "rpm = 5"));
    let responses = futures_util::future::join_all((0..20).map(|_| gw.chat(ask(4)))).await;
    assert_eq!(responses.iter().filter(|r| r.status() == 200).count(), 5);
    let limited = responses.into_iter().find(|r| r.status() == 429).unwrap();
    let retry: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(limited.headers()["x-ratelimit-remaining-requests"], "0");
    let e: Value = limited.json().await.unwrap();
    assert_eq!(e["error"]["code"], "rate_limit_requests");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("5 requests per minute"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_holds_exactly_under_concurrency() {
    let sim = sim().await;
    // Each request reserves 81 prompt + 100 output tokens: 1000 tokens per minute fit 5.
    let gw = Gateway::start(&config_with(&sim, "tpm = 1000"));
    let mut body = ask(100);
    body["sim"] = json!({"ttft_ms": 300});
    let responses = futures_util::future::join_all((0..30).map(|_| gw.chat(body.clone()))).await;
    assert_eq!(responses.iter().filter(|r| r.status() == 200).count(), 5);
    let limited = responses.iter().find(|r| r.status() == 429).unwrap();
    assert!(limited.headers().contains_key("retry-after"));
    assert_eq!(limited.headers()["x-ratelimit-limit-tokens"], "1000");
}

#[tokio::test]
async fn headers_count_down_in_both_dialects() {
    let sim = sim().await;
    let gw = Gateway::start(&config_with(&sim, "rpm = 3\ntpm = 10000"));
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let r = gw.chat(ask(10)).await;
        assert_eq!(r.status(), 200);
        let h = r.headers();
        assert_eq!(h["x-ratelimit-limit-requests"], "3");
        assert_eq!(h["anthropic-ratelimit-requests-limit"], "3");
        assert_eq!(
            h["x-ratelimit-remaining-requests"],
            h["anthropic-ratelimit-requests-remaining"]
        );
        assert!(h["anthropic-ratelimit-requests-reset"]
            .to_str()
            .unwrap()
            .ends_with('Z'));
        assert_eq!(h["x-ratelimit-limit-tokens"], "10000");
        remaining.push(
            h["x-ratelimit-remaining-requests"]
                .to_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(remaining, ["2", "1", "0"]);
    let r = gw.messages(json!({"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "Hello"}]})).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["type"], "error");
    assert_eq!(e["error"]["type"], "rate_limit_error");
}

#[tokio::test]
async fn a_request_that_can_never_fit_the_tpm_gets_400_not_429() {
    let sim = sim().await;
    let gw = Gateway::start(&config_with(&sim, "tpm = 1000"));
    let r = gw.chat(ask(5000)).await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "max_tokens_too_large");
    assert_eq!(e["error"]["param"], "max_tokens");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Lower max_tokens"));
    assert_eq!(gw.chat(ask(500)).await.status(), 200);
}

#[tokio::test]
async fn the_replica_never_generates_more_than_was_reserved() {
    let sim = sim().await;
    let config = config_with(&sim, "tpm = 1000").replace(
        "max_output_tokens = 4096",
        "max_output_tokens = 40\ndefault_max_tokens = 12",
    );
    let gw = Gateway::start(&config);
    let no_cap = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hello"}]});

    // No max_tokens: the model's default is reserved and sent, so usage cannot pass it.
    let r = gw.chat(no_cap.clone()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-ratelimit-remaining-tokens"],
        "907",
        "81 + 12 reserved"
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 12);
    let sent = sim.stats().last_request().unwrap().body;
    assert_eq!(sent["max_tokens"], 12);

    // Above max_output_tokens: capped there (in whichever field the client used).
    let r = gw
        .chat(json!({"model": MODEL, "max_completion_tokens": 900, "messages": [{"role": "user", "content": "Hello"}]}))
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 40);
    let sent = sim.stats().last_request().unwrap().body;
    assert_eq!(sent["max_completion_tokens"], 40);

    // Anthropic's required max_tokens is capped the same way.
    let r = gw.messages(json!({"model": MODEL, "max_tokens": 5000, "messages": [{"role": "user", "content": "Hello"}]})).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["output_tokens"], 40);
    assert_eq!(v["stop_reason"], "max_tokens");
}

#[tokio::test]
async fn a_cap_the_client_never_set_leaves_room_for_the_prompt_and_fits_tpm() {
    let sim = sim().await;
    let config = standard_config(&[sim.addr()], "").replace(
        "context_tokens = 32768\nmax_output_tokens = 4096",
        "context_tokens = 1000\nmax_output_tokens = 1000",
    );
    let gw = Gateway::start(&config);
    // 200 bytes of prompt: at most 64 + 8 + 4 + 200 = 276 tokens. Engines refuse a prompt
    // plus cap past the 1,000-token window, so the cap sent leaves the prompt room.
    let long = json!({"model": MODEL, "messages": [{"role": "user", "content": "x".repeat(200)}]});
    assert_eq!(gw.chat(long).await.status(), 200);
    let sent = sim.stats().last_request().unwrap().body;
    assert_eq!(sent["max_tokens"], 1000 - 276);
    // Longer prompts never get a larger cap, and prompt plus cap always fit the window.
    let mut last = 1000;
    for bytes in [300, 500, 700, 800, 900] {
        let body =
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x".repeat(bytes)}]});
        assert_eq!(gw.chat(body).await.status(), 200);
        let sent = sim.stats().last_request().unwrap().body["max_tokens"]
            .as_u64()
            .unwrap();
        let bound = 76 + bytes as u64;
        assert!(sent <= last, "{bytes} bytes: {sent} after {last}");
        assert!(
            bound + sent <= 1000,
            "{bytes} bytes: the prompt keeps its room"
        );
        last = sent;
    }
    drop(gw);

    // The model's default (4,096 here) can never fit tpm = 700: 700 − 81 is sent instead,
    // where the request used to be refused for a cap the client never set.
    let gw = Gateway::start(&config_with(&sim, "tpm = 700"));
    let short = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hello"}]});
    assert_eq!(gw.chat(short).await.status(), 200);
    assert_eq!(sim.stats().last_request().unwrap().body["max_tokens"], 619);
}

#[tokio::test]
async fn every_choice_of_n_is_reserved() {
    let sim = sim().await;
    let gw = Gateway::start(&config_with(&sim, "tpm = 1000"));
    let with_n = |n: Value| {
        json!({"model": MODEL, "n": n, "max_tokens": 100,
            "messages": [{"role": "user", "content": "Hello"}]})
    };
    let r = gw.chat(with_n(json!(4))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-ratelimit-remaining-tokens"],
        "519",
        "81 + 4 × 100 reserved"
    );
    // 81 + 10 × 100 can never fit in 1,000 tokens a minute.
    let r = gw.chat(with_n(json!(10))).await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "max_tokens_too_large");
    for bad in [json!(0), json!(129), json!(1.5), json!("2")] {
        let r = gw.chat(with_n(bad.clone())).await;
        assert_eq!(r.status(), 400, "n = {bad}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], "n", "n = {bad}");
    }
}

#[tokio::test]
async fn an_output_cap_engines_could_read_as_none_is_refused_and_two_caps_agree() {
    let sim = sim().await;
    let gw = Gateway::start(&config_with(&sim, "tpm = 100000"));
    // Engines take `max_completion_tokens or max_tokens`: a 0 would fall through to the
    // other field, or to the whole context, past what was reserved.
    let r = gw
        .chat(
            json!({"model": MODEL, "max_completion_tokens": 0, "max_tokens": 50000,
            "messages": [{"role": "user", "content": "Hello"}]}),
        )
        .await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "max_completion_tokens");
    assert_eq!(e["error"]["code"], "invalid_value");
    assert_eq!(sim.stats().requests(), 0);

    // Two caps: the reserved one reaches the replica in both fields.
    let r = gw
        .chat(
            json!({"model": MODEL, "max_completion_tokens": 10, "max_tokens": 3000,
            "messages": [{"role": "user", "content": "Hello"}]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-ratelimit-remaining-tokens"],
        "99909",
        "81 + 10 reserved"
    );
    let sent = sim.stats().last_request().unwrap().body;
    assert_eq!(
        (&sent["max_completion_tokens"], &sent["max_tokens"]),
        (&json!(10), &json!(10))
    );
}

#[tokio::test]
async fn output_caps_past_any_price_are_refused_cleanly() {
    let sim = sim().await;
    // test/other publishes no max_output_tokens: the client's cap is taken as it is.
    let gw = Gateway::start(&config_with(&sim, "tpm = 1000").replace(
        "slug = \"test/other\"\npool = \"main\"",
        "slug = \"test/other\"\npool = \"main\"\nprice = { input_per_mtok = 1, output_per_mtok = 1000 }",
    ));
    let huge = json!({"model": "test/other", "max_tokens": u64::MAX, "messages": [{"role": "user", "content": "Hello"}]});
    let r = gw.chat(huge).await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "max_tokens_too_large");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&u64::MAX.to_string()),
        "the worst case saturates instead of wrapping: {e}"
    );
    let gw2 = Gateway::start(&config_with(&sim, "budget = { usd = 1.0, period = \"daily\" }").replace(
        "slug = \"test/other\"\npool = \"main\"",
        "slug = \"test/other\"\npool = \"main\"\nprice = { input_per_mtok = 1, output_per_mtok = 1000 }",
    ));
    let huge = json!({"model": "test/other", "max_tokens": u64::MAX / 1000, "messages": [{"role": "user", "content": "Hello"}]});
    let r = gw2.chat(huge).await;
    assert_eq!(
        r.status(),
        402,
        "a worst case past u64 nano-dollars does not fit"
    );
    let small = json!({"model": "test/other", "max_tokens": 10, "messages": [{"role": "user", "content": "Hello"}]});
    assert_eq!(gw2.chat(small).await.status(), 200, "the key still works");
}

#[tokio::test]
async fn budget_402_in_the_anthropic_dialect_and_clamping() {
    let sim = sim().await;
    let gw = Gateway::start(&config_with(
        &sim,
        "budget = { usd = 0.0001, period = \"daily\", clamp_max_tokens = true }",
    ));
    // $0.0001 pays 81 prompt tokens and 39 output tokens at $1.5/M (rounded down).
    let r = gw.chat(ask(4000)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tollgate-max-tokens-clamped"], "39");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 39);
    assert_eq!(sim.stats().last_request().unwrap().body["max_tokens"], 39);
    let r = gw.messages(json!({"model": MODEL, "max_tokens": 4000, "messages": [{"role": "user", "content": "Hello"}]})).await;
    assert_eq!(r.status(), 402);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["type"], "error");
    assert_eq!(e["error"]["type"], "billing_error");
}

#[tokio::test]
async fn a_restart_keeps_spend_and_a_reload_keeps_counters() {
    let sim = sim().await;
    let gw = Gateway::start(&config_with(
        &sim,
        "rpm = 4\nbudget = { usd = 0.01, period = \"monthly\" }",
    ));
    for _ in 0..2 {
        assert_eq!(gw.chat(ask(100)).await.status(), 200);
    }
    let before: Value = gw.key_state("team-a").await;
    let spent = before["budget"]["spent_usd"].as_f64().unwrap();
    assert!(spent > 0.0);
    assert_eq!(before["usage"]["requests_last_minute"], 2);

    // Reload with a new limit value: the window is kept, the new limit applies at once.
    let path = gw.config_path();
    let original = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, original.replace("rpm = 4", "rpm = 3")).unwrap();
    assert_eq!(gw.reload().await, 200);
    assert_eq!(gw.chat(ask(100)).await.status(), 200);
    assert_eq!(
        gw.chat(ask(100)).await.status(),
        429,
        "3 requests in the window with rpm = 3"
    );

    // A config that fails validation is refused and the running one stays.
    std::fs::write(&path, "[[pools]]\nname = 1\n").unwrap();
    assert_eq!(gw.reload().await, 400);

    std::fs::write(&path, original).unwrap();
    let spent_before_kill: f64 = {
        let v: Value = gw.key_state("team-a").await;
        v["budget"]["spent_usd"].as_f64().unwrap()
    };
    // Let the writer catch up, then kill without warning.
    gw.usage("bucket=day").await;
    let gw = gw.kill_and_restart();
    let after: Value = gw.key_state("team-a").await;
    assert_eq!(
        after["budget"]["spent_usd"].as_f64().unwrap(),
        spent_before_kill,
        "spend rebuilt from the ledger"
    );
}

#[tokio::test]
async fn a_budget_a_reload_adds_or_changes_starts_from_the_ledger() {
    let sim = sim().await;
    let gw = Gateway::start(&config_with(&sim, ""));
    // Each: 6 × $0.5/M + 100 × $1.5/M = $0.000153.
    for _ in 0..2 {
        assert_eq!(gw.chat(ask(100)).await.status(), 200);
    }
    let path = gw.config_path();
    let original = std::fs::read_to_string(&path).unwrap();
    let with_budget = |period: &str| {
        original.replacen(
            "models = [\"*\"]\n",
            &format!("models = [\"*\"]\nbudget = {{ usd = 0.0004, period = \"{period}\" }}\n"),
            1,
        )
    };
    std::fs::write(&path, with_budget("daily")).unwrap();
    assert_eq!(gw.reload().await, 200);
    let spent = |v: Value| v["budget"]["spent_usd"].as_f64().unwrap();
    assert_eq!(
        spent(gw.key_state("team-a").await),
        0.000306,
        "today's spend so far"
    );
    assert_eq!(
        gw.chat(ask(100)).await.status(),
        402,
        "$0.000094 left cannot pay a $0.000153 worst case"
    );

    // A new period counts what the ledger holds for it, not a fresh zero.
    std::fs::write(&path, with_budget("monthly")).unwrap();
    assert_eq!(gw.reload().await, 200);
    assert_eq!(spent(gw.key_state("team-a").await), 0.000306);
    assert_eq!(gw.chat(ask(100)).await.status(), 402);
}

#[tokio::test]
async fn a_soft_budget_alerts_once_per_threshold_with_a_signed_webhook() {
    let sim = sim().await;
    let hook = WebhookSink::start().await;
    let config = format!(
        "[alerts]\nwebhook_url = \"http://{}/hook\"\nwebhook_secret_env = \"TG_TEST_HOOK_SECRET\"\n\n{}",
        hook.addr,
        config_with(&sim, "budget = { usd = 0.000005, period = \"daily\", enforce = false, alert_at = [0.5, 1.0] }")
    );
    let gw = Gateway::try_start_with_env(&config, &[("TG_TEST_HOOK_SECRET", "s3cret")]).unwrap();
    // Each request costs 6 × $0.5/M + 4 × $1.5/M = $0.000009: both thresholds at once.
    for _ in 0..3 {
        assert_eq!(
            gw.chat(ask(4)).await.status(),
            200,
            "a soft budget never refuses"
        );
    }
    let mut alerts = Vec::new();
    for _ in 0..2 {
        alerts.push(
            hook.next(Duration::from_secs(10))
                .await
                .expect("an alert arrives"),
        );
    }
    for (headers, body) in &alerts {
        let sig = headers
            .get("x-tollgate-signature")
            .unwrap()
            .to_str()
            .unwrap();
        assert_eq!(
            sig,
            tollgate::webhook::sign("s3cret", body),
            "the signature verifies"
        );
    }
    let mut thresholds: Vec<f64> = alerts
        .iter()
        .map(|(_, b)| {
            serde_json::from_str::<Value>(b).unwrap()["threshold"]
                .as_f64()
                .unwrap()
        })
        .collect();
    // Each alert is delivered on its own; they may arrive in either order.
    thresholds.sort_by(f64::total_cmp);
    assert_eq!(thresholds, [0.5, 1.0]);
    gw.usage("bucket=day").await;
    let gw = gw.kill_and_restart();
    assert_eq!(gw.chat(ask(4)).await.status(), 200);
    // A threshold crossed is counted as the request settles, before it leaves the in-flight
    // gauge: none is counted after the restart.
    let metrics = gw
        .metrics_until(|t| series(t, "tollgate_requests_in_flight") == Some(0.0))
        .await;
    assert!(
        metrics.contains("tollgate_budget_spent_usd{key=\"team-a\"}"),
        "{metrics}"
    );
    assert!(
        all_series(&metrics, "tollgate_budget_alerts_total").is_empty(),
        "a restart does not fire an alert twice: {metrics}"
    );
    assert!(
        hook.next(Duration::from_millis(1500)).await.is_none(),
        "a restart does not fire an alert twice"
    );
}

#[tokio::test]
async fn an_unreachable_webhook_is_logged_without_its_url() {
    let sim = sim().await;
    let hook = refused_addr();
    let config = format!(
        "[alerts]\nwebhook_url = \"http://{hook}/services/T0KEN-IN-PATH\"\n\n{}",
        config_with(
            &sim,
            "budget = { usd = 0.000001, period = \"daily\", enforce = false, alert_at = [1.0] }"
        )
    );
    let gw = Gateway::start(&config);
    assert_eq!(gw.chat(ask(4)).await.status(), 200);
    let deadline = Deadline::after(SETTLE_LIMIT);
    while !gw.stderr().contains("budget webhook unreachable") {
        deadline
            .pause(|| format!("the failed delivery is logged; stderr:\n{}", gw.stderr()))
            .await;
    }
    let log = gw.stderr();
    assert!(!log.contains("T0KEN-IN-PATH"), "{log}");
    assert!(!log.contains(&hook.to_string()), "{log}");
}
