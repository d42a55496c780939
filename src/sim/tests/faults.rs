//! Injected failures: error statuses, stalls, and connections broken mid-answer.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};

use super::{chat, client, start, url, user};
use crate::sim::SimOptions;

#[tokio::test]
async fn fail_status_answers_at_once() {
    let sim = start(SimOptions {
        ttft: Duration::from_secs(60),
        ..SimOptions::default()
    })
    .await;
    let body = json!({"messages": user("hi"), "stream": true, "sim": {"fail_status": 503}});
    let resp = chat(&sim, body).await;
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    let error = json!({"error": {"message": "simulated failure", "type": "sim_error",
        "param": null, "code": 503}});
    assert_eq!(body, error);
    assert_eq!(sim.stats().completed(), 0);
}

#[tokio::test]
async fn stall_holds_back_the_headers() {
    let sim = start(SimOptions::default()).await;
    let err = client()
        .post(url(&sim, "/v1/chat/completions"))
        .timeout(Duration::from_millis(200))
        .json(&json!({"messages": user("hi"), "sim": {"stall_ms": 60_000}}))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
}

#[tokio::test]
async fn reset_breaks_the_stream_mid_way() {
    let sim = start(SimOptions::default()).await;
    let body = json!({"messages": user("hi"), "max_tokens": 10, "stream": true,
        "sim": {"reset_after": 2}});
    let resp = chat(&sim, body).await;
    assert_eq!(resp.status(), 200);
    let mut chunks = resp.bytes_stream();
    let mut seen = Vec::new();
    let error = loop {
        match chunks.next().await {
            Some(Ok(bytes)) => seen.extend_from_slice(&bytes),
            Some(Err(err)) => break err,
            None => panic!(
                "stream ended cleanly after {}",
                String::from_utf8_lossy(&seen)
            ),
        }
    };
    assert!(error.is_body() || error.is_decode(), "{error}");
    let seen = String::from_utf8(seen).unwrap();
    assert!(seen.contains(r#""content":" quick""#), "{seen}");
    assert!(
        !seen.contains(r#""content":" brown""#) && !seen.contains("[DONE]"),
        "{seen}"
    );
    let stats = sim.stats();
    assert_eq!(
        (
            stats.completed(),
            stats.cancelled(),
            stats.completion_tokens()
        ),
        (0, 0, 2)
    );
}

#[tokio::test]
async fn reset_without_stream_sends_nothing() {
    let sim = start(SimOptions::default()).await;
    let err = client()
        .post(url(&sim, "/v1/chat/completions"))
        .json(&json!({"messages": user("hi"), "sim": {"reset_after": 0}}))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_request() && !err.is_timeout(), "{err}");
    // The replica keeps serving on new connections.
    let ok = chat(&sim, json!({"messages": user("hi")})).await;
    assert_eq!(ok.status(), 200);
}
