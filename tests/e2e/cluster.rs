//! Cluster mode: three real tollgate processes, each with its own state directory, sharing
//! one real redis-server. Limits and budgets hold across the nodes, and a node keeps
//! serving when Redis goes away.

use std::time::Duration;

use futures_util::future::join_all;

use crate::common::*;
use crate::redis::Redis;

/// `[cluster]` for node `n` against `redis`. The timeout is generous: the test machine runs
/// three nodes, a replica and Redis on a few cores, and a slow answer must not read as down.
fn cluster(redis: &Redis, n: usize, on_down: &str, timeout_ms: u64) -> String {
    format!(
        "[cluster]\nredis_url = \"{}\"\nnode_id = \"node-{n}\"\non_redis_down = \"{on_down}\"\n\
         timeout_ms = {timeout_ms}\nexpected_nodes = 3\nlease_ttl_ms = 3000\n\n",
        redis.url()
    )
}

/// Three nodes in front of `sim`, team-a's entry given `key_extra`.
pub(crate) fn nodes(
    redis: &Redis,
    sim: &SimReplica,
    key_extra: &str,
    on_down: &str,
) -> Vec<Gateway> {
    (0..3)
        .map(|n| {
            Gateway::start(&format!(
                "{}{}",
                cluster(redis, n, on_down, 2000),
                config_with(sim, key_extra)
            ))
        })
        .collect()
}

/// One node (`node-0`) in front of `sim`, team-a's entry given `key_extra`, connected.
pub(crate) async fn one_node(
    redis: &Redis,
    sim: &SimReplica,
    on_down: &str,
    timeout_ms: u64,
    key_extra: &str,
) -> Gateway {
    let gw = Gateway::start(&format!(
        "{}{}",
        cluster(redis, 0, on_down, timeout_ms),
        config_with(sim, key_extra)
    ));
    connected(std::slice::from_ref(&gw)).await;
    gw
}

/// Waits until every node has its connection to Redis (a node starts without it when Redis
/// is slow to answer, and connects in the background).
pub(crate) async fn connected(nodes: &[Gateway]) {
    let deadline = Deadline::after(Duration::from_secs(10));
    for gw in nodes {
        while redis_up(gw).await != Some(1.0) {
            deadline
                .pause(|| "every node connected to Redis".into())
                .await;
        }
    }
}

/// 64 requests at once, spread round robin over `nodes`: (status, error code) of each.
pub(crate) async fn burst(nodes: &[Gateway], body: serde_json::Value) -> Vec<(u16, String)> {
    connected(nodes).await;
    let client = client();
    let calls = (0..64).map(|i| {
        let client = client.clone();
        let url = nodes[i % nodes.len()].url("/v1/chat/completions");
        let body = body.clone();
        async move {
            let r = client
                .post(url)
                .bearer_auth(KEY)
                .json(&body)
                .send()
                .await
                .expect("an answer");
            let status = r.status().as_u16();
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            (
                status,
                v["error"]["code"].as_str().unwrap_or("").to_string(),
            )
        }
    });
    join_all(calls).await
}

pub(crate) fn count(results: &[(u16, String)], status: u16) -> usize {
    results.iter().filter(|r| r.0 == status).count()
}

/// What every node's ledger holds for team-a: (requests, cost in nano-dollars).
pub(crate) async fn ledgers(nodes: &[Gateway], admitted: u64) -> (u64, u64) {
    let deadline = Deadline::after(Duration::from_secs(10));
    loop {
        let mut total = (0, 0);
        for gw in nodes {
            let (n, cost): (u64, u64) = gw
                .ledger()
                .query_row(
                    "SELECT COUNT(*), COALESCE(SUM(cost_nanos), 0) FROM usage WHERE status = 200",
                    [],
                    |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
                )
                .unwrap_or((0, 0));
            total.0 += n;
            total.1 += cost;
        }
        if total.0 >= admitted {
            return total;
        }
        deadline
            .pause(|| format!("{admitted} rows in the ledgers, saw {total:?}"))
            .await;
    }
}

/// A replica that waits `ttft` before its first token, so requests overlap.
async fn slow_sim(ttft: Duration) -> SimReplica {
    SimReplica::start(SimOptions {
        ttft,
        ..SimOptions::default()
    })
    .await
    .expect("sim")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_budget_shared_by_three_nodes_is_never_passed() {
    let redis = Redis::start();
    let sim = slow_sim(Duration::from_millis(300)).await;
    // ask(100) reserves 81 × 500 + 100 × 1500 = 190,500 nano-dollars: the budget pays for
    // exactly 10 worst cases.
    let budget_nanos = 10 * 190_500u64;
    let usd = budget_nanos as f64 / 1e9;
    let gws = nodes(
        &redis,
        &sim,
        &format!("budget = {{ usd = {usd}, period = \"total\" }}"),
        "reject",
    );
    let results = burst(&gws, ask(100)).await;
    let admitted = count(&results, 200);
    let refused = results
        .iter()
        .filter(|r| r.0 == 402 && r.1 == "budget_exceeded")
        .count();
    assert_eq!(
        admitted + refused,
        64,
        "only admissions and budget refusals: {results:?}"
    );
    assert!(admitted >= 8, "at least 8 of 64 admitted, got {admitted}");
    let (rows, spent) = ledgers(&gws, admitted as u64).await;
    assert_eq!(rows, admitted as u64);
    assert!(
        spent <= budget_nanos,
        "three nodes spent {spent} nano-dollars of a {budget_nanos} budget"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rpm_shared_by_three_nodes_admits_exactly_the_limit() {
    let redis = Redis::start();
    let sim = sim().await;
    let gws = nodes(&redis, &sim, "rpm = 10", "reject");
    let results = burst(&gws, ask(16)).await;
    assert_eq!(count(&results, 200), 10, "{results:?}");
    assert!(
        results
            .iter()
            .all(|r| r.0 == 200 || (r.0 == 429 && r.1 == "rate_limit_requests")),
        "{results:?}"
    );
    // The headers are the cluster's: a fourth request to any node sees none remaining.
    let r = gws[2].chat(ask(16)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
    assert!(r.headers().contains_key("retry-after"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_concurrent_shared_by_three_nodes_is_never_passed() {
    let redis = Redis::start();
    let sim = slow_sim(Duration::from_millis(1500)).await;
    let stats = sim.stats();
    let gws = nodes(&redis, &sim, "max_concurrent = 5", "reject");
    let watch = {
        let stats = stats.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            for _ in 0..400 {
                peak = peak.max(stats.running());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            peak
        })
    };
    let results = burst(&gws, ask(16)).await;
    // Every request arrived within the first one's 1.5 s: exactly 5 slots were free.
    assert_eq!(count(&results, 200), 5, "{results:?}");
    assert!(
        results
            .iter()
            .all(|r| r.0 == 200 || (r.0 == 429 && r.1 == "concurrency_limit")),
        "{results:?}"
    );
    assert!(watch.await.expect("watch") <= 5);
    // Slots come back at settlement: the next request is admitted.
    let r = gws[1].chat(ask(16)).await;
    assert_eq!(r.status(), 200);
}

/// Requests to `gw` one after another until told to stop: (status, error code) of each.
fn load(
    gw: &Gateway,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(u16, String)>> {
    let url = gw.url("/v1/chat/completions");
    tokio::spawn(async move {
        let client = client();
        let mut seen = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let r = client
                .post(&url)
                .bearer_auth(KEY)
                .json(&ask(16))
                .send()
                .await
                .expect("an answer");
            let status = r.status().as_u16();
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            seen.push((
                status,
                v["error"]["code"].as_str().unwrap_or("").to_string(),
            ));
        }
        seen
    })
}

/// One request's (status, error code, retry-after).
async fn one(gw: &Gateway) -> (u16, String, Option<String>) {
    let r = gw.chat(ask(16)).await;
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    (
        status,
        v["error"]["code"].as_str().unwrap_or("").to_string(),
        retry,
    )
}

async fn redis_up(gw: &Gateway) -> Option<f64> {
    series(&gw.metrics().await, "tollgate_cluster_redis_up")
}

/// Redis killed under load and brought back on the same port, with `on_down`: the node
/// keeps answering, says so in its metrics, and shares its limits again by itself.
async fn survives_redis_restart(on_down: &str) -> (Vec<(u16, String)>, Gateway) {
    let mut redis = Redis::start();
    let sim = sim().await;
    let gw = one_node(&redis, &sim, on_down, 200, "rpm = 100000").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let running = load(&gw, stop.clone());
    assert_eq!(one(&gw).await.0, 200);

    redis.kill();
    let deadline = Deadline::after(Duration::from_secs(10));
    while redis_up(&gw).await != Some(0.0) {
        deadline.pause(|| "the node saw Redis go".into()).await;
    }
    let during = one(&gw).await;
    match on_down {
        "reject" => {
            assert_eq!((during.0, during.1.as_str()), (503, "limits_unavailable"));
            assert_eq!(during.2.as_deref(), Some("1"));
        }
        _ => assert_eq!(during.0, 200, "local keeps serving: {during:?}"),
    }
    let metrics = gw.metrics().await;
    assert!(series(&metrics, "tollgate_cluster_fallback_total").unwrap_or(0.0) >= 1.0);

    redis.restart();
    let deadline = Deadline::after(Duration::from_secs(10));
    while redis_up(&gw).await != Some(1.0) {
        deadline
            .pause(|| "the node saw Redis come back".into())
            .await;
    }
    let fallbacks = series(&gw.metrics().await, "tollgate_cluster_fallback_total");
    assert_eq!(one(&gw).await.0, 200);
    // Admitted by Redis again: nothing more decided without it.
    assert_eq!(
        series(&gw.metrics().await, "tollgate_cluster_fallback_total"),
        fallbacks
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = running.await.expect("load");
    assert!(gw.stderr().contains("redis unreachable"));
    assert!(gw.stderr().contains("redis answers"));
    (seen, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reject_answers_503_while_redis_is_down_and_recovers() {
    let (seen, _gw) = survives_redis_restart("reject").await;
    assert!(seen
        .iter()
        .all(|r| r.0 == 200 || (r.0 == 503 && r.1 == "limits_unavailable")));
    assert!(seen.iter().any(|r| r.0 == 503), "the load saw the outage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_keeps_serving_while_redis_is_down_and_recovers() {
    let (seen, _gw) = survives_redis_restart("local").await;
    assert!(seen.iter().all(|r| r.0 == 200), "{seen:?}");
}

async fn alerts_fired(nodes: &[Gateway]) -> f64 {
    let mut total = 0.0;
    for gw in nodes {
        total += all_series(&gw.metrics().await, "tollgate_budget_alerts_total")
            .iter()
            .map(|s| s.1)
            .sum::<f64>();
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_threshold_alerts_once_across_the_cluster() {
    let redis = Redis::start();
    let sim = sim().await;
    // Each ask(4) costs 6 × 500 + 4 × 1500 = 9,000 nano-dollars; half the budget is 15,000.
    let gws = nodes(
        &redis,
        &sim,
        "budget = { usd = 0.00003, period = \"daily\", enforce = false, alert_at = [0.5] }",
        "reject",
    );
    connected(&gws).await;
    for round in 0..3 {
        for gw in &gws {
            assert_eq!(gw.chat(ask(4)).await.status(), 200, "round {round}");
        }
    }
    let deadline = Deadline::after(Duration::from_secs(10));
    while alerts_fired(&gws).await < 1.0 {
        deadline.pause(|| "the 50% alert fired".into()).await;
    }
    // Every node settled every request (each saw the threshold passed), and still one alert.
    ledgers(&gws, 9).await;
    for gw in &gws {
        assert_eq!(gw.chat(ask(4)).await.status(), 200);
    }
    ledgers(&gws, 12).await;
    assert_eq!(alerts_fired(&gws).await, 1.0);
    let logged = gws
        .iter()
        .map(|gw| gw.stderr().matches("budget threshold crossed").count())
        .sum::<usize>();
    assert_eq!(logged, 1);

    // The three ledgers read as one: a state directory and two files.
    let (rows, cost) = ledgers(&gws, 12).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "usage", "--json", "--bucket", "day", "--by", "key", "--ledger",
        ])
        .arg(gws[0].state_dir())
        .arg(gws[1].state_dir().join("usage.sqlite"))
        .arg(gws[2].state_dir().join("usage.sqlite"))
        .output()
        .expect("tollgate usage runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let data = report["data"].as_array().expect("rows");
    let sum = |f: &str| data.iter().map(|r| r[f].as_u64().unwrap_or(0)).sum::<u64>();
    assert_eq!(sum("requests"), rows);
    assert_eq!(sum("cost_micros"), (cost + 500) / 1000);
    assert!(data.iter().all(|r| r["key_id"] == "team-a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_that_lost_its_data_is_seeded_from_the_ledger() {
    let mut redis = Redis::start();
    let sim = sim().await;
    // ask(4) reserves 81 × 500 + 4 × 1500 = 46,500 and costs 9,000 nano-dollars: two fit
    // a budget of 60,000, a third does not (18,000 + 46,500).
    let budget = "budget = { usd = 0.00006, period = \"daily\" }";
    let gw = one_node(&redis, &sim, "reject", 2000, budget).await;
    // The first request's settlement reaches Redis just after its answer: until then its
    // worst case still holds the budget, and the second waits for it.
    let deadline = Deadline::after(Duration::from_secs(10));
    let mut admitted = 0;
    while admitted < 2 {
        match gw.chat(ask(4)).await.status().as_u16() {
            200 => admitted += 1,
            402 => {
                deadline
                    .pause(|| "the first settlement landed".into())
                    .await
            }
            other => panic!("status {other}"),
        }
    }
    ledgers(std::slice::from_ref(&gw), 2).await;
    redis.restart();
    let gw = gw.kill_and_restart();
    connected(std::slice::from_ref(&gw)).await;
    let r = gw.chat(ask(4)).await;
    assert_eq!(r.status(), 402, "the spend came back from the ledger");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_running_request_keeps_its_slot_and_a_dead_node_frees_it_within_the_ttl() {
    let redis = Redis::start();
    let sim = slow_sim(Duration::from_secs(6)).await;
    let stats = sim.stats();
    let config = |n| {
        format!(
            "{}{}",
            cluster(&redis, n, "reject", 2000)
                .replace("lease_ttl_ms = 3000", "lease_ttl_ms = 1500"),
            config_with(&sim, "max_concurrent = 1")
        )
    };
    let mut a = Gateway::start(&config(0));
    let b = Gateway::start(&config(1));
    connected(std::slice::from_ref(&a)).await;
    connected(std::slice::from_ref(&b)).await;
    let url = a.url("/v1/chat/completions");
    let held = tokio::spawn(async move {
        let _ = client()
            .post(url)
            .bearer_auth(KEY)
            .json(&ask(16))
            .send()
            .await;
    });
    let deadline = Deadline::after(Duration::from_secs(10));
    while stats.running() < 1 {
        deadline
            .pause(|| "node a's request reached the replica".into())
            .await;
    }
    // Twice the lease's TTL: only renewals keep the slot taken.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let (status, code, _) = one(&b).await;
    assert_eq!((status, code.as_str()), (429, "concurrency_limit"));

    a.kill();
    let killed = std::time::Instant::now();
    let deadline = Deadline::after(Duration::from_secs(10));
    loop {
        let sent = killed.elapsed();
        let (status, code, _) = one(&b).await;
        if status != 429 {
            assert_eq!(status, 200, "{code}");
            // The lease was renewed at most a third of its TTL before the kill, and lapses
            // 1.5 s after that renewal; the rest is slack for a busy machine.
            assert!(
                sent < Duration::from_secs(4),
                "freed {sent:?} after the kill"
            );
            break;
        }
        deadline
            .pause(|| "node b got the dead node's slot".into())
            .await;
    }
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_models_rpm_and_a_keys_tpm_hold_across_three_nodes() {
    let redis = Redis::start();
    let sim = sim().await;
    let model_rpm = (0..3)
        .map(|n| {
            Gateway::start(&format!(
                "{}{}",
                cluster(&redis, n, "reject", 2000),
                config_with(&sim, "").replacen(
                    "upstream_model = \"served-model\"\n",
                    "upstream_model = \"served-model\"\nlimits = { rpm = 7 }\n",
                    1
                )
            ))
        })
        .collect::<Vec<_>>();
    let results = burst(&model_rpm, ask(16)).await;
    assert_eq!(count(&results, 200), 7, "{results:?}");
    assert!(
        results
            .iter()
            .all(|r| r.0 == 200 || (r.0 == 429 && r.1 == "rate_limit_requests")),
        "{results:?}"
    );
    drop(model_rpm);

    // ask(16) reserves 81 + 16 = 97 tokens: 970 a minute fit 10 worst cases at once, and
    // more as settlements lower each to what it used. A fresh Redis, so the model's window
    // above is not counted here.
    let redis = Redis::start();
    let gws = nodes(&redis, &sim, "tpm = 970", "reject");
    let results = burst(&gws, ask(16)).await;
    let admitted = count(&results, 200);
    assert!(admitted >= 10, "{results:?}");
    assert!(
        results
            .iter()
            .all(|r| r.0 == 200 || (r.0 == 429 && r.1 == "rate_limit_tokens")),
        "{results:?}"
    );
    ledgers(&gws, admitted as u64).await;
    let used: i64 = gws
        .iter()
        .map(|gw| {
            gw.ledger()
                .query_row(
                    "SELECT COALESCE(SUM(input_tokens + output_tokens), 0) FROM usage",
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .expect("sum")
        })
        .sum();
    assert!(
        used <= 970,
        "three nodes used {used} tokens of 970 in one minute"
    );
}

/// The shared request window forgets what is older than a minute, whether Redis holds it as
/// seconds alone (written by an older node) or with the running total the nodes keep.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_shared_request_window_forgets_what_is_older_than_a_minute() {
    let redis = Redis::start();
    let sim = sim().await;
    // A limit this low grants the node one request at a time: each request reads Redis.
    let gw = one_node(&redis, &sim, "reject", 2000, "rpm = 10").await;
    let remaining = || async {
        let r = gw.chat(ask(16)).await;
        assert_eq!(r.status(), 200);
        r.headers()["x-ratelimit-remaining-requests"]
            .to_str()
            .expect("a number")
            .to_string()
    };
    let window = "tollgate:k:team-a:w";
    let now = redis.now_secs();
    let ago = |s: i64| format!("r{}", now - s);
    // 50 requests 70 s ago, 7 requests 30 s ago: the 7 and this one count.
    redis.command(&["HSET", window, &ago(70), "50", &ago(30), "7"]);
    assert_eq!(remaining().await, "2");
    // Five more, counted 61 s before `now` into a total last brought up to date 2 s ago:
    // they have left the window by the time of the next request.
    let two_ago = (now - 2).to_string();
    redis.command(&["HSET", window, &ago(61), "5", "rt", "13", "l", &two_ago]);
    assert_eq!(remaining().await, "1");
}
