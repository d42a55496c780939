//! Streaming answers: event order, usage chunks, tools, reasoning, pacing and cancellation.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use super::{chat, joined, read_sse, start, user};
use crate::sim::SimOptions;

#[tokio::test]
async fn events_in_order_with_usage_chunk() {
    let sim = start(SimOptions::default()).await;
    let body = json!({"model": "m", "messages": user("hi"), "max_tokens": 3, "stream": true,
        "stream_options": {"include_usage": true}});
    let sse = read_sse(chat(&sim, body).await).await;
    assert!(sse.done);
    let events = &sse.events;
    assert_eq!(events.len(), 6, "{events:#?}");
    for e in events {
        assert_eq!(e["object"], "chat.completion.chunk");
        assert_eq!(e["id"], events[0]["id"]);
        assert_eq!(e["created"], events[0]["created"]);
        assert_eq!(e["model"], "m");
    }
    assert_eq!(
        events[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let tokens: Vec<_> = events[1..4]
        .iter()
        .map(|e| e["choices"][0]["delta"]["content"].clone())
        .collect();
    assert_eq!(tokens, ["The", " quick", " brown"]);
    let finish = &events[4]["choices"][0];
    assert_eq!(finish["delta"], json!({}));
    assert_eq!(finish["finish_reason"], "length");
    assert_eq!(finish["stop_reason"], Value::Null);
    for e in &events[..5] {
        assert_eq!(e["usage"], Value::Null);
        assert!(e.get("usage").is_some());
    }
    assert_eq!(events[5]["choices"], json!([]));
    assert_eq!(events[5]["usage"]["prompt_tokens"], 5);
    assert_eq!(events[5]["usage"]["completion_tokens"], 3);
    assert_eq!(events[5]["usage"]["total_tokens"], 8);
    let stats = sim.stats();
    assert_eq!(
        (
            stats.completed(),
            stats.completion_tokens(),
            stats.prompt_tokens()
        ),
        (1, 3, 5)
    );
}

#[tokio::test]
async fn no_usage_unless_asked_and_stop_in_stream() {
    let sim = start(SimOptions::default()).await;
    let body = json!({"messages": user("hi"), "max_tokens": 20, "stream": true, "stop": "jumps"});
    let sse = read_sse(chat(&sim, body).await).await;
    assert!(sse.done);
    assert!(sse.events.iter().all(|e| e.get("usage").is_none()));
    assert_eq!(joined(&sse.events, "content"), "The quick brown fox ");
    let last = &sse.events.last().unwrap()["choices"][0];
    assert_eq!(last["finish_reason"], "stop");
    assert_eq!(last["stop_reason"], "jumps");
    assert_eq!(sim.stats().completion_tokens(), 5);
}

#[tokio::test]
async fn tool_calls_stream_in_pieces() {
    let sim = start(SimOptions::default()).await;
    let tools = json!([{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "required": ["query", "limit"],
        "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}}}}}]);
    let body = json!({"messages": user("find"), "tools": tools, "stream": true,
        "stream_options": {"include_usage": true}});
    let sse = read_sse(chat(&sim, body).await).await;
    let calls: Vec<&Value> = sse
        .events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["tool_calls"].get(0))
        .collect();
    let head = calls[0];
    assert_eq!(head["index"], 0);
    assert!(head["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(head["type"], "function");
    assert_eq!(head["function"], json!({"name": "lookup", "arguments": ""}));
    let pieces: Vec<&str> = calls[1..]
        .iter()
        .map(|c| c["function"]["arguments"].as_str().unwrap())
        .collect();
    assert!(pieces.len() > 1 && pieces.iter().all(|p| p.len() <= 8));
    assert_eq!(pieces.concat(), r#"{"limit":1,"query":"sim"}"#);
    let finish = &sse.events[sse.events.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "tool_calls");
    let usage = &sse.events.last().unwrap()["usage"];
    assert_eq!(
        usage["completion_tokens"],
        pieces.concat().len().div_ceil(4)
    );
}

#[tokio::test]
async fn reasoning_then_content_with_running_usage() {
    let sim = start(SimOptions::default()).await;
    let body = json!({"messages": user("hi"), "max_tokens": 5, "stream": true,
        "sim": {"reasoning_tokens": 2, "include_usage_every_chunk": true}});
    let sse = read_sse(chat(&sim, body).await).await;
    let events = &sse.events;
    assert_eq!(joined(events, "reasoning_content"), "Let me");
    assert_eq!(joined(events, "content"), "The quick brown");
    assert!(events[1]["choices"][0]["delta"]
        .get("reasoning_content")
        .is_some());
    let completion: Vec<u64> = events
        .iter()
        .map(|e| e["usage"]["completion_tokens"].as_u64().unwrap())
        .collect();
    assert_eq!(completion, [0, 1, 2, 3, 4, 5, 5]);
    let last = events.last().unwrap();
    assert_eq!(
        last["usage"]["completion_tokens_details"]["reasoning_tokens"],
        2
    );
    assert!(last["choices"][0]["finish_reason"].is_string());
}

#[tokio::test]
async fn time_to_first_token_is_honoured() {
    let sim = start(SimOptions {
        ttft: Duration::from_millis(60),
        ..SimOptions::default()
    })
    .await;
    let began = Instant::now();
    let body = json!({"messages": user("hi"), "max_tokens": 3, "sim": {"token_delay_ms": 10}});
    chat(&sim, body).await.text().await.unwrap();
    assert!(began.elapsed() >= Duration::from_millis(80));
    let began = Instant::now();
    let body = json!({"messages": user("hi"), "max_tokens": 3, "stream": true,
        "sim": {"token_delay_ms": 10}});
    read_sse(chat(&sim, body).await).await;
    assert!(began.elapsed() >= Duration::from_millis(80));
}

#[tokio::test]
async fn client_departure_cancels_generation() {
    let sim = start(SimOptions::default()).await;
    let body = json!({"messages": user("hi"), "max_tokens": 100_000, "stream": true,
        "sim": {"token_delay_ms": 5}});
    let resp = chat(&sim, body).await;
    let mut chunks = resp.bytes_stream();
    let mut seen = Vec::new();
    // Each event arrives while the generator is still running: read three, then leave.
    while seen.windows(6).filter(|w| w == b"data: ").count() < 3 {
        seen.extend_from_slice(&chunks.next().await.unwrap().unwrap());
    }
    drop(chunks);
    let stats = sim.stats();
    assert!(stats.wait_cancelled(1, Duration::from_secs(10)).await);
    assert_eq!(
        (stats.cancelled(), stats.completed(), stats.running()),
        (1, 0, 0)
    );
    let generated = stats.completion_tokens();
    assert!((2..1000).contains(&generated), "{generated}");
    assert_eq!(stats.prompt_tokens(), 5);
}
