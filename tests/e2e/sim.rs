//! `tollgate sim` as a process: the switches a fleet test flips (health, reset mode), the
//! prefix cache a router is judged by, and the vLLM metrics it serves.

use std::io::{Read, Write};
use std::time::Duration;

use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn health_can_be_switched_to_failing_and_back() {
    let sim = SimProcess::start(&[]);
    let health = || async {
        client()
            .get(sim.url("/health"))
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(health().await, 200);
    let switches = sim.control("/sim/health", json!({"healthy": false})).await;
    assert_eq!(switches, json!({"healthy": false, "reset": false}));
    assert_eq!(health().await, 503);
    // Only the check fails: the model still answers, as an engine whose check is wrong does.
    let answer = client()
        .post(sim.url("/v1/chat/completions"))
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    sim.control("/sim/health", json!({"healthy": true})).await;
    assert_eq!(health().await, 200);
}

/// Sends one chat request on `stream` and reads its answer to the end of its
/// Content-Length; what came back before an error or a close otherwise.
fn raw_chat(stream: &mut std::net::TcpStream) -> (Vec<u8>, std::io::Result<()>) {
    let body = json!({"messages": [{"role": "user", "content": "hi"}]}).to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: sim\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    if let Err(e) = stream.write_all(request.as_bytes()) {
        return (Vec::new(), Err(e));
    }
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = answer_end(&seen) {
            assert_eq!(end, seen.len(), "nothing after the answer");
            return (seen, Ok(()));
        }
        match stream.read(&mut buf) {
            Ok(0) => {
                let closed = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
                return (seen, Err(closed));
            }
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) => return (seen, Err(e)),
        }
    }
}

/// Where a Content-Length answer in `bytes` ends, once it is all there.
fn answer_end(bytes: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(bytes).ok()?;
    let head_end = text.find("\r\n\r\n")? + 4;
    let length: usize = text[..head_end].lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    })?;
    (bytes.len() >= head_end + length).then_some(head_end + length)
}

#[tokio::test]
async fn reset_mode_resets_model_requests_before_any_byte() {
    let sim = SimProcess::start(&[]);
    let addr = sim.addr;
    // A connection opened and used before reset mode, as a proxy's idle pool holds.
    let mut pooled = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let (answer, end) = raw_chat(&mut stream);
        end.unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 200"));
        stream
    })
    .await
    .unwrap();

    let switches = sim.control("/sim/reset", json!({"on": true})).await;
    assert_eq!(switches, json!({"healthy": true, "reset": true}));
    let (old, new) = tokio::task::spawn_blocking(move || {
        let old = raw_chat(&mut pooled);
        let mut fresh = std::net::TcpStream::connect(addr).unwrap();
        fresh
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        (old, raw_chat(&mut fresh))
    })
    .await
    .unwrap();
    for (seen, end) in [old, new] {
        assert!(seen.is_empty(), "{}", String::from_utf8_lossy(&seen));
        let err = end.expect_err("a reset");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    }
    // The control path, the check and the metrics keep answering.
    let health = client().get(sim.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let metrics = client().get(sim.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 200);

    sim.control("/sim/reset", json!({"on": false})).await;
    let answer = client()
        .post(sim.url("/v1/chat/completions"))
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
}

/// A chat request whose system prompt is 104 tokens (4 role tokens and 400 characters): six
/// 16-token blocks of it can be cached, the seventh mixes in the user's turn.
fn with_system(user: &str) -> serde_json::Value {
    json!({"model": MODEL, "max_tokens": 3, "messages": [
        {"role": "system", "content": "You answer in one line. ".repeat(16) + "Be kind, please."},
        {"role": "user", "content": user},
    ]})
}

#[tokio::test]
async fn cached_tokens_from_the_prefix_cache_reach_the_client() {
    let sim = SimReplica::start(SimOptions {
        kv_cache_tokens: 10_000,
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let usage = |v: &serde_json::Value| {
        let u = &v["usage"];
        (
            u["prompt_tokens"].as_u64().unwrap(),
            u["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap(),
        )
    };
    let first: serde_json::Value = gw.chat(with_system("Hello")).await.json().await.unwrap();
    assert_eq!(usage(&first), (104 + 4 + 2, 0));
    // Another user turn after the same system prompt: its six blocks are cached.
    let second: serde_json::Value = gw
        .chat(with_system("What is new?"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(usage(&second), (104 + 4 + 3, 96));

    // In a stream, the final usage chunk says the same.
    let mut body = with_system("Hello");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let text = gw.chat(body).await.text().await.unwrap();
    let data = sse_data(&text);
    let last: serde_json::Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(usage(&last), (110, 96));
    assert_eq!(sim.stats().cached_tokens(), 96 + 96);
}

#[tokio::test]
async fn batch_slots_queue_requests_and_metrics_show_it() {
    let sim = SimProcess::start(&["--batch-slots", "1", "--kv-cache-tokens", "1600"]);
    // The first holds the only slot for a minute; the second waits for it.
    let mut held = Vec::new();
    for _ in 0..2 {
        let url = sim.url("/v1/chat/completions");
        let mut body = with_system("Hello");
        body["sim"] = json!({"ttft_ms": 60_000});
        held.push(tokio::spawn(async move {
            client().post(url).json(&body).send().await
        }));
    }
    let deadline = Deadline::after(SETTLE_LIMIT);
    let text = loop {
        let text = client()
            .get(sim.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if series(
            &text,
            "vllm:num_requests_waiting{model_name=\"tollgate-sim\"}",
        ) == Some(1.0)
        {
            break text;
        }
        deadline.pause(|| text).await;
    };
    let value = |name: &str| series(&text, &format!("{name}{{model_name=\"tollgate-sim\"}}"));
    assert_eq!(value("vllm:num_requests_running"), Some(1.0));
    // The running request's 110 prompt tokens, of 1,600.
    assert_eq!(value("vllm:kv_cache_usage_perc"), Some(110.0 / 1600.0));
    assert_eq!(value("vllm:prefix_cache_queries_total"), Some(110.0));
    assert_eq!(value("vllm:prefix_cache_hits_total"), Some(0.0));
    assert!(value("sim:request_load_seconds_total").is_some_and(|v| v > 0.0));
    assert_eq!(value("sim:request_queue_seconds_total"), Some(0.0));
    for request in held {
        request.abort();
    }
}

#[tokio::test]
async fn uncached_prompt_tokens_cost_prefill_time() {
    // 10 ms a token: the 110-token prompt takes 1.1 s to prefill, its cached part none.
    let sim = SimProcess::start(&[
        "--kv-cache-tokens",
        "1600",
        "--prefill-us-per-token",
        "10000",
    ]);
    let timed = || async {
        let started = std::time::Instant::now();
        let resp = client()
            .post(sim.url("/v1/chat/completions"))
            .json(&with_system("Hello"))
            .send()
            .await
            .unwrap();
        let v: serde_json::Value = resp.json().await.unwrap();
        (
            started.elapsed(),
            v["usage"]["prompt_tokens_details"]["cached_tokens"].clone(),
        )
    };
    let (cold, cached) = timed().await;
    assert_eq!(cached, 0);
    assert!(cold >= Duration::from_millis(1100), "{cold:?}");
    // 96 tokens cached, 14 to compute: 140 ms.
    let (warm, cached) = timed().await;
    assert_eq!(cached, 96);
    assert!(warm >= Duration::from_millis(140), "{warm:?}");
    assert!(
        warm < cold - Duration::from_millis(500),
        "{warm:?} vs {cold:?}"
    );
}
