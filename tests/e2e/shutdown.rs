//! SIGTERM with a grace period: listeners closed at once, idle connections closed, requests
//! in flight finished and recorded, and the exit when the grace period is over.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

/// The grace period of these tests: much longer than the requests left in flight take, even
/// on a loaded machine.
const GRACE: Duration = Duration::from_secs(10);

fn config_with_grace(sim: &SimReplica) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nthreads = 2\ngrace_period_secs = {}\n\n{}",
        GRACE.as_secs(),
        standard_config(&[sim.addr()], "")
    )
}

/// Sends `GET /v1/models` on `conn` and reads the whole answer (framed by content-length),
/// leaving the connection open and idle.
async fn models_on(conn: &mut TcpStream) -> String {
    let request =
        format!("GET /v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\n\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(SETTLE_LIMIT, conn.read(&mut buf))
            .await
            .expect("the answer comes")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_string)
                })
                .and_then(|v| v.trim().parse().ok())
                .expect("a content-length");
            if seen.len() >= end + 4 + length {
                return text;
            }
        }
    }
}

/// Waits until a new connection to `addr` is refused; a connection accepted or reset meanwhile
/// (the signal is handled asynchronously) is dropped and the look repeated.
async fn refused_soon(addr: std::net::SocketAddr, what: &str) {
    let deadline = Deadline::after(SETTLE_LIMIT);
    loop {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            // A connection that sat in the accept queue as the listener closed is reset; the
            // next one shows whether the port is closed.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("{what}: connecting failed otherwise than refused: {e}"),
            Ok(conn) => drop(conn),
        }
        deadline
            .pause(|| format!("{what} refuses new connections"))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_the_listeners_and_lets_requests_in_flight_finish() {
    let sim = sim().await;
    let mut gw = Gateway::start(&config_with_grace(&sim));

    // A client connection kept alive between requests, idle when the signal comes.
    let mut idle = TcpStream::connect(gw.public).await.unwrap();
    assert!(models_on(&mut idle).await.starts_with("HTTP/1.1 200"));

    // A stream of 20 tokens, 100 ms apart, that has relayed its first token; and a whole
    // answer whose generation takes 2 s.
    let stream = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("x-request-id", "drained-stream")
        .json(&json!({"model": MODEL, "stream": true, "max_tokens": 20,
            "sim": {"token_delay_ms": 100},
            "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut body = stream.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("\"content\":\"The\"") {
        let chunk = body.next().await.expect("the first token arrives").unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let whole = tokio::spawn(
        client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .header("x-request-id", "drained-answer")
            .json(
                &json!({"model": MODEL, "max_tokens": 5, "sim": {"ttft_ms": 2000},
                "messages": [{"role": "user", "content": "hi"}]}),
            )
            .send(),
    );
    let deadline = Deadline::after(SETTLE_LIMIT);
    while sim.stats().requests() < 2 {
        deadline
            .pause(|| "the whole answer's request reached the replica".into())
            .await;
    }

    gw.signal("TERM");
    let signalled = Instant::now();

    // New connections are refused on both listeners: they are closed, not left unanswered.
    refused_soon(gw.public, "the public listener").await;
    refused_soon(gw.admin, "the admin listener").await;
    // The idle kept-alive connection is closed by tollgate.
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(SETTLE_LIMIT, idle.read(&mut buf))
        .await
        .expect("the idle connection is closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "{}", String::from_utf8_lossy(&buf[..n]));

    // The requests in flight end as if nothing happened.
    while let Some(chunk) = body.next().await {
        seen.push_str(&String::from_utf8_lossy(
            &chunk.expect("the stream is not cut"),
        ));
    }
    let streamed = signalled.elapsed();
    let events = sse_data(&seen);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{seen}");
    assert!(events.iter().all(|e| !e.contains("\"error\"")), "{seen}");
    let content: String = events[..events.len() - 1]
        .iter()
        .filter_map(|e| {
            serde_json::from_str::<Value>(e).ok()?["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(content.split_whitespace().count(), 20, "{content}");
    let whole = whole.await.unwrap().unwrap();
    assert_eq!(whole.status(), 200);
    let answer: Value = whole.json().await.unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 5);
    assert!(
        streamed < GRACE,
        "the stream ended {streamed:?} after the signal, within the grace period"
    );

    // The process waits out the whole grace period (Pingora sleeps through it, whatever is
    // still running), then stops its runtimes and exits cleanly.
    let status = gw
        .exit_within(GRACE + EXIT_LIMIT)
        .await
        .unwrap_or_else(|| panic!("no exit within the grace period and {EXIT_LIMIT:?}"));
    let exited = signalled.elapsed();
    assert!(status.success(), "{status}");
    assert!(
        exited >= GRACE,
        "exited {exited:?} after SIGTERM, before the {GRACE:?} grace period ended"
    );

    // Both requests were recorded in full, and logged as answered.
    let conn = gw.ledger();
    for (id, output) in [("drained-stream", 20), ("drained-answer", 5)] {
        let row: (i64, i64, bool) = conn
            .query_row(
                "SELECT status, output_tokens, estimated FROM usage WHERE request_id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap_or_else(|e| panic!("{id} has no ledger row: {e}"));
        assert_eq!(row, (200, output, false), "{id}");
        let line = gw.access_line(id).await;
        assert_eq!(
            (&line["status"], &line["error"]),
            (&json!(200), &json!("-")),
            "{line}"
        );
    }
}
