//! The concurrency target and the waiting queue: FIFO, bounded, timed, left at once by a
//! client that goes.

use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use crate::common::*;

/// A stream whose first token is a minute away: it holds its replica's slot until dropped.
fn holding() -> Value {
    let mut body = hello();
    body["stream"] = json!(true);
    body["sim"] = json!({"ttft_ms": 60_000});
    body
}

async fn waiting(gw: &Gateway, n: u32) {
    gw.metrics_until(|m| {
        series(m, "tollgate_queue_waiting_requests{pool=\"main\"}") == Some(f64::from(n))
    })
    .await;
}

/// A chat request tagged `id`, sent in the background; its id goes into `done` when its
/// answer has been read.
fn send(gw: &Gateway, id: &str, done: &Arc<Mutex<Vec<String>>>) -> tokio::task::JoinHandle<u16> {
    let (url, id, done) = (gw.url("/v1/chat/completions"), id.to_string(), done.clone());
    tokio::spawn(async move {
        let r = client()
            .post(url)
            .bearer_auth(KEY)
            .header("x-request-id", &id)
            .json(&hello())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let _ = r.bytes().await;
        done.lock().unwrap().push(id);
        status
    })
}

#[tokio::test]
async fn with_every_replica_at_its_target_requests_wait_in_order_and_overflow_is_429() {
    let (a, b) = (sim().await, sim().await);
    let gw = Gateway::start(&standard_config(
        &[a.addr(), b.addr()],
        "max_inflight_per_replica = 1\nqueue = { max_waiting = 4, timeout_ms = 30000 }",
    ));
    let first = gw.chat(holding()).await;
    let second = gw.chat(holding()).await;
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    assert_eq!(
        (a.stats().requests(), b.stats().requests()),
        (1, 1),
        "one each"
    );

    let done = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (i, id) in ["w1", "w2", "w3", "w4"].into_iter().enumerate() {
        tasks.push(send(&gw, id, &done));
        waiting(&gw, i as u32 + 1).await;
    }
    assert_eq!(a.stats().requests() + b.stats().requests(), 2, "four wait");

    // One more is refused at once, in the client's dialect.
    let r = gw.chat(hello()).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "queue_full");
    assert_eq!(e["error"]["type"], "rate_limit_error");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("already waiting"));
    let r = gw
        .messages(json!({"model": MODEL, "max_tokens": 8,
            "messages": [{"role": "user", "content": "Hello"}]}))
        .await;
    assert_eq!(r.status(), 429);
    let e: Value = r.json().await.unwrap();
    assert_eq!(
        (e["type"].as_str(), e["error"]["type"].as_str()),
        (Some("error"), Some("rate_limit_error"))
    );

    // The second in line leaves: its place is gone at once.
    tasks.remove(1).abort();
    waiting(&gw, 3).await;

    // One slot frees: the rest are served one at a time, first come first served.
    drop(first);
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(*done.lock().unwrap(), ["w1", "w3", "w4"]);
    let line = gw.access_line("w4").await;
    assert!(line["queue_ms"].as_f64().unwrap() > 0.0, "{line}");
    let m = gw.metrics().await;
    assert_eq!(
        series(&m, "tollgate_queue_wait_seconds_count{pool=\"main\"}"),
        Some(3.0),
        "{m}"
    );
    drop(second);
}

#[tokio::test]
async fn a_wait_past_the_queue_timeout_is_503_no_capacity_and_costs_nothing() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(
        &[sim.addr()],
        "max_inflight_per_replica = 1\nqueue = { timeout_ms = 150 }",
    ));
    let held = gw.chat(holding()).await;
    assert_eq!(held.status(), 200);
    let r = gw.chat(hello()).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "no_capacity");
    assert!(e["error"]["message"].as_str().unwrap().contains("within"));
    let r = gw
        .messages(json!({"model": MODEL, "max_tokens": 8,
            "messages": [{"role": "user", "content": "Hello"}]}))
        .await;
    assert_eq!(r.status(), 503);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "overloaded_error", "{e}");
    assert_eq!(sim.stats().requests(), 1, "nothing reached the replica");
    // The waits released their reservations: only the held stream is in flight.
    let deadline = Deadline::after(SETTLE_LIMIT);
    loop {
        let key = gw.key_state("team-a").await;
        if key["usage"]["in_flight"] == 1 {
            break;
        }
        deadline
            .pause(|| format!("only the held stream in flight: {key}"))
            .await;
    }
    drop(held);
    gw.wait_key_idle("team-a", "nothing in flight").await;
}
