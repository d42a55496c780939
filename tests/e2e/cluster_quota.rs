//! Cluster mode's quotas: far from its limits a node admits against blocks Redis granted it,
//! with no round trip per request, and gives back exactly what it did not use; near them,
//! the nodes together still never pass a limit.

use std::time::Duration;

use crate::cluster::{burst, connected, count, ledgers, nodes, one_node};
use crate::common::*;
use crate::redis::Redis;

/// One field of a hash, as a number (`None`: absent).
fn hget(redis: &Redis, key: &str, field: &str) -> Option<i64> {
    let answer = redis.command(&["HGET", key, field]);
    answer.split("\r\n").nth(1).and_then(|v| v.parse().ok())
}

/// An integer reply (`ZCARD` and the like).
fn integer(redis: &Redis, args: &[&str]) -> i64 {
    let answer = redis.command(args);
    answer
        .trim_start_matches(':')
        .trim_end()
        .parse()
        .unwrap_or_else(|_| panic!("{args:?} answered {answer:?}"))
}

/// Script calls Redis has run since it started.
fn script_calls(redis: &Redis) -> u64 {
    let info = redis.command(&["INFO", "commandstats"]);
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// team-a's budget period (`total`) in Redis.
const BUDGET: &str = "tollgate:k:team-a:b:0";
const WINDOW: &str = "tollgate:k:team-a:w";
const SLOTS: &str = "tollgate:k:team-a:ls";

/// Waits until the node has given back everything it holds: the window counts the
/// requests admitted and no more, no slot is taken, nothing is reserved, and Redis holds
/// the spend of every ledger.
async fn given_back(redis: &Redis, admitted: i64, spent: i64) {
    let deadline = Deadline::after(Duration::from_secs(10));
    loop {
        let seen = (
            hget(redis, WINDOW, "rt"),
            integer(redis, &["ZCARD", SLOTS]),
            hget(redis, BUDGET, "reserved").unwrap_or(0),
            hget(redis, BUDGET, "spent"),
        );
        if seen == (Some(admitted), 0, 0, Some(spent)) {
            return;
        }
        deadline
            .pause(|| {
                format!(
                    "(requests, slots, reserved, spent) {seen:?}, want \
                     ({admitted}, 0, 0, {spent})"
                )
            })
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn far_from_its_limits_a_node_admits_without_a_round_trip_and_gives_back_the_rest() {
    let redis = Redis::start();
    let sim = sim().await;
    let gw = one_node(
        &redis,
        &sim,
        "reject",
        2000,
        "rpm = 100000\ntpm = 100000000\nmax_concurrent = 50\n\
         budget = { usd = 100.0, period = \"total\" }",
    )
    .await;
    let before = script_calls(&redis);
    for _ in 0..60 {
        let r = gw.chat(ask(16)).await;
        assert_eq!(r.status(), 200);
        assert!(r.headers().contains_key("x-ratelimit-remaining-requests"));
    }
    let calls = script_calls(&redis) - before;
    assert!(
        calls < 20,
        "60 requests took {calls} script calls: most should be admitted by the node"
    );
    let (rows, cost) = ledgers(std::slice::from_ref(&gw), 60).await;
    assert_eq!(rows, 60);
    given_back(&redis, 60, cost as i64).await;
    // The window counts exactly what was admitted: the next request sees it.
    let r = gw.chat(ask(16)).await;
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "99939");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quotas_of_three_nodes_never_pass_an_rpm_and_every_request_it_allows_gets_in() {
    let redis = Redis::start();
    let sim = sim().await;
    // 60 a minute over three nodes: the first grants are several requests each.
    let gws = nodes(&redis, &sim, "rpm = 60", "reject");
    connected(&gws).await;
    let mut admitted = 0;
    let deadline = Deadline::after(Duration::from_secs(20));
    while admitted < 60 {
        let results = burst(&gws, ask(4)).await;
        assert!(
            results
                .iter()
                .all(|r| r.0 == 200 || (r.0 == 429 && r.1 == "rate_limit_requests")),
            "{results:?}"
        );
        admitted += count(&results, 200);
        assert!(admitted <= 60, "three nodes admitted {admitted} of 60");
        if admitted < 60 {
            // What a node holds unused goes back when its second ends.
            deadline
                .pause(|| format!("{admitted} of 60 admitted"))
                .await;
        }
    }
    let (rows, _) = ledgers(&gws, 60).await;
    assert_eq!(rows, 60);
    assert_eq!(count(&burst(&gws, ask(4)).await, 200), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quotas_of_three_nodes_never_pass_a_budget_and_give_back_every_reservation() {
    let redis = Redis::start();
    let sim = sim().await;
    // ask(100) reserves 81 × 500 + 100 × 1500 = 190,500 nano-dollars and costs less: the
    // budget holds 40 worst cases, so the first grants are blocks of several.
    let budget_nanos = 40 * 190_500u64;
    let usd = budget_nanos as f64 / 1e9;
    let gws = nodes(
        &redis,
        &sim,
        &format!("budget = {{ usd = {usd}, period = \"total\" }}\nmax_concurrent = 30"),
        "reject",
    );
    connected(&gws).await;
    let mut admitted = 0;
    let deadline = Deadline::after(Duration::from_secs(30));
    loop {
        // Nothing held by any node before the burst: Redis alone decides its refusals.
        let quiet = hget(&redis, BUDGET, "reserved").unwrap_or(0) == 0;
        let results = burst(&gws, ask(100)).await;
        assert!(
            results.iter().all(|r| r.0 == 200
                || (r.0 == 402 && r.1 == "budget_exceeded")
                || (r.0 == 429 && r.1 == "concurrency_limit")),
            "{results:?}"
        );
        let now = count(&results, 200);
        admitted += now;
        if now == 0 && quiet {
            break;
        }
        if now == 0 {
            // Refused while nodes still held parts of the budget: they give them back
            // once idle.
            deadline
                .pause(|| format!("{admitted} admitted, the holds given back"))
                .await;
        }
    }
    let (_, spent) = ledgers(&gws, admitted as u64).await;
    assert!(
        spent <= budget_nanos,
        "three nodes spent {spent} nano-dollars of a {budget_nanos} budget"
    );
    assert!(
        budget_nanos - spent < 190_500,
        "{spent} of {budget_nanos} spent, and a request was refused with room for it"
    );
    // Once idle, every node has given back its slots and holds, and Redis's spend is the
    // ledgers' to the nano-dollar.
    let deadline = Deadline::after(Duration::from_secs(10));
    loop {
        let seen = (
            integer(&redis, &["ZCARD", SLOTS]),
            hget(&redis, BUDGET, "reserved").unwrap_or(0),
            hget(&redis, BUDGET, "spent"),
        );
        if seen == (0, 0, Some(spent as i64)) {
            break;
        }
        deadline
            .pause(|| {
                format!(
                    "(slots, reserved, spent) {seen:?}, ledgers {spent} {}",
                    redis.command(&["ZRANGE", SLOTS, "0", "-1"])
                )
            })
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_that_lowers_a_limit_holds_at_once_despite_the_quota_a_node_held() {
    let redis = Redis::start();
    let sim = sim().await;
    let gw = one_node(&redis, &sim, "reject", 2000, "rpm = 100000").await;
    for _ in 0..10 {
        assert_eq!(gw.chat(ask(4)).await.status(), 200);
    }
    // The node holds thousands of this second's requests; the new limit allows 2 more.
    let config = std::fs::read_to_string(gw.config_path()).expect("config");
    std::fs::write(gw.config_path(), config.replace("rpm = 100000", "rpm = 12"))
        .expect("config written");
    assert_eq!(gw.reload().await, 200);
    let mut admitted = 10;
    let deadline = Deadline::after(Duration::from_secs(10));
    while admitted < 12 {
        match gw.chat(ask(4)).await.status().as_u16() {
            200 => admitted += 1,
            // What the node held goes back with its next tick; until then Redis counts it.
            429 => {
                deadline
                    .pause(|| format!("{admitted} of 12 admitted"))
                    .await
            }
            other => panic!("status {other}"),
        }
    }
    for _ in 0..5 {
        let r = gw.chat(ask(4)).await;
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_request_after_another_never_finds_the_last_still_holding_the_only_slot() {
    let redis = Redis::start();
    let sim = sim().await;
    let gw = one_node(&redis, &sim, "reject", 2000, "max_concurrent = 1").await;
    // Each request's slot is freed once the replica has answered, before its last bytes
    // reach the client, and goes back to Redis ahead of the next request's grant: a limit
    // of one is tight, so nothing stays on the node.
    let client = client();
    for i in 0..30 {
        let r = client
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&ask(4))
            .send()
            .await
            .expect("an answer");
        assert_eq!(r.status(), 200, "request {i}");
        r.bytes().await.expect("the whole answer");
    }
}
