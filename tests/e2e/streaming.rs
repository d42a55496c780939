//! Forwarding: exact framing for JSON, event-by-event relay for SSE, cancellation on client
//! disconnect, and a clean error event when a replica breaks mid-stream.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::common::*;

#[tokio::test]
async fn non_streaming_responses_keep_exact_framing() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let r = gw.chat(hello()).await;
    assert_eq!(r.status(), 200);
    let declared: usize = r.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let bytes = r.bytes().await.unwrap();
    assert_eq!(bytes.len(), declared);
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    // No max_tokens asked: the model's output cap (max_output_tokens, 4096) applies.
    assert_eq!(v["usage"]["completion_tokens"], 4096);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn a_stream_is_relayed_with_every_event_and_the_usage_chunk_when_asked() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let r = gw
        .chat(json!({"model": MODEL, "stream": true, "max_tokens": 5,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = r.text().await.unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| {
            c["choices"].get(0)?["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(content.split_whitespace().count(), 5);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 5);
}

#[tokio::test]
async fn each_event_reaches_the_client_before_the_next_is_produced() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    // The replica pauses a minute after each token: unless tollgate relays the first
    // token at once, the client cannot see it within the 10 s allowed below.
    let r = gw
        .chat(json!({"model": MODEL, "stream": true, "max_tokens": 3,
            "sim": {"token_delay_ms": 60_000},
            "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    let mut body = r.bytes_stream();
    let mut seen = String::new();
    let first_token = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(chunk) = body.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            if seen.contains("\"content\":\"The\"") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        first_token,
        Ok(true),
        "first token not relayed promptly; got: {seen}"
    );
    // Leaving mid-stream must stop the replica at once.
    drop(body);
    assert!(
        sim.stats().wait_cancelled(1, Duration::from_secs(10)).await,
        "the replica did not see the cancellation"
    );
}

#[tokio::test]
async fn a_client_leaving_during_prefill_cancels_the_replica() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(
            &json!({"model": MODEL, "stream": true, "sim": {"ttft_ms": 60_000},
            "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    // The header comes before prefill: the replica has the request, and its first token is
    // a minute away. The client hangs up now.
    assert_eq!(r.status(), 200);
    assert_eq!(sim.stats().requests(), 1);
    drop(r);
    assert!(sim.stats().wait_cancelled(1, Duration::from_secs(10)).await);
}

#[tokio::test]
async fn a_replica_breaking_mid_stream_ends_it_with_an_error_event() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let r = gw
        .chat(
            json!({"model": MODEL, "stream": true, "max_tokens": 10, "sim": {"reset_after": 3},
            "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let text = r
        .text()
        .await
        .expect("the stream ends cleanly, not with a cut connection");
    let data = sse_data(&text);
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_error", "{text}");
    assert!(data.iter().any(|d| d.contains("\"content\":\"The\"")));
}

#[tokio::test]
async fn a_client_that_stops_reading_is_given_up_and_frees_its_slot() {
    use tokio::io::AsyncWriteExt;
    let sim = sim().await;
    let config = standard_config(&[sim.addr()], "")
        .replacen(
            "models = [\"*\"]\n",
            "models = [\"*\"]\nmax_concurrent = 1\n",
            1,
        )
        .replace(
            "[[pools]]",
            "[server]\nlisten = \"127.0.0.1:0\"\ngrace_period_secs = 0\nclient_write_timeout_ms = 300\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[[pools]]",
        );
    let gw = Gateway::start(&config);
    // A long stream to a client that never reads: once the socket buffers fill, tollgate's
    // writes stall, and after client_write_timeout_ms it gives the client up.
    let body = json!({"model": "test/other", "stream": true, "max_tokens": 2_000_000,
        "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(gw.public).await.unwrap();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stalled.write_all(request.as_bytes()).await.unwrap();
    assert!(
        sim.stats().wait_cancelled(1, Duration::from_secs(20)).await,
        "the replica was told to stop"
    );
    // The key's one concurrency slot is free again while the stalled socket is still open
    // (freed as the request ends, just after the replica was told).
    gw.wait_key_idle("team-a", "the stalled request ended")
        .await;
    let r = gw.chat(json!({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(r.status(), 200);
    drop(stalled);
}

// The idle bound is between two pieces of a stream, not on the stream: a stream longer than
// `idle_ms` (and than `first_byte_ms`) whose tokens come often runs to its end; one whose
// replica then falls silent ends with an error event that names `idle_ms`. Margins are wide:
// every delay that must overrun one only grows under load.
#[tokio::test]
async fn idle_ms_bounds_the_gap_between_tokens_not_the_stream() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(
        &[sim.addr()],
        "timeouts = { first_byte_ms = 300, idle_ms = 1000, total_ms = 20000 }",
    ));
    let stream = |tokens: u32, delay_ms: u64| {
        json!({"model": MODEL, "stream": true, "max_tokens": tokens,
            "sim": {"token_delay_ms": delay_ms},
            "messages": [{"role": "user", "content": "hi"}]})
    };
    let r = gw.chat(stream(20, 100)).await;
    assert_eq!(r.status(), 200);
    let events = sse_data(&r.text().await.unwrap());
    assert_ran_to_done(&events);

    let r = gw.chat(stream(3, 4000)).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains("idle_ms"), "{text}");
}
