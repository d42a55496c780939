//! Deadlines for slow clients: a request head must arrive within `server.head_timeout_ms`,
//! a body at `server.body_min_bytes_per_sec` after `server.body_timeout_ms`, however often
//! their bytes come. The trickles below are the workload: a client pausing between bytes.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;
use crate::raw::*;

/// The pause between two bytes, or header lines, of a trickling client.
const TRICKLE: Duration = Duration::from_millis(300);

/// Pingora's deadline for each read of a request: a trickle never reaches it.
const PER_READ: Duration = Duration::from_secs(60);

fn quick_deadlines(sim: &SimReplica) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nthreads = 2\ngrace_period_secs = 0\nhead_timeout_ms = 1000\nbody_timeout_ms = 1000\n\n{}",
        standard_config(&[sim.addr()], "")
    )
}

/// Writes `first` on a new connection, then `next(i)` every `TRICKLE` until tollgate
/// answers or closes; returns what it sent back and when, from the first write.
async fn trickle(
    gw: &Gateway,
    first: String,
    next: impl Fn(usize) -> Vec<u8> + Send + 'static,
) -> (Vec<u8>, Duration) {
    let s = TcpStream::connect(gw.public)
        .await
        .expect("tollgate accepts");
    trickle_on(s, first, next).await
}

/// `trickle` on a connection already open.
async fn trickle_on(
    s: TcpStream,
    first: String,
    next: impl Fn(usize) -> Vec<u8> + Send + 'static,
) -> (Vec<u8>, Duration) {
    let (mut rx, mut tx) = s.into_split();
    let started = Instant::now();
    tx.write_all(first.as_bytes()).await.unwrap();
    let writer = tokio::spawn(async move {
        for i in 0.. {
            tokio::time::sleep(TRICKLE).await;
            if tx.write_all(&next(i)).await.is_err() {
                return;
            }
        }
    });
    let mut got = Vec::new();
    let read = tokio::time::timeout(RAW_LIMIT, rx.read_to_end(&mut got)).await;
    let elapsed = started.elapsed();
    writer.abort();
    assert!(
        read.is_ok(),
        "still open after {RAW_LIMIT:?}: the trickle was never cut"
    );
    (got, elapsed)
}

fn header_line(i: usize) -> Vec<u8> {
    format!("x-line-{i}: {}\r\n", "a".repeat(20)).into_bytes()
}

#[tokio::test]
async fn a_head_sent_one_line_at_a_time_is_cut_at_the_head_deadline() {
    let sim = sim().await;
    let gw = Gateway::start(&quick_deadlines(&sim));
    let (got, elapsed) = trickle(
        &gw,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: tollgate\r\n".into(),
        header_line,
    )
    .await;
    // Closed, with nothing sent: the head never ended, so there is no request to answer.
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
    assert!(
        elapsed < Duration::from_secs(5),
        "{elapsed:?}, per read: {PER_READ:?}"
    );

    // A connection that sends nothing at all is a head not arriving either.
    let started = Instant::now();
    let mut idle = TcpStream::connect(gw.public).await.unwrap();
    assert!(read_to_close(&mut idle).await.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    let text = gw
        .metrics_until(|t| series(t, "tollgate_client_timeouts_total{phase=\"head\"}") == Some(2.0))
        .await;
    assert_eq!(sim.stats().requests(), 0, "{text}");
    let log = gw.stderr();
    assert!(
        log.lines()
            .any(|l| l.contains("request head not complete within server.head_timeout_ms")),
        "{log}"
    );
}

#[tokio::test]
async fn a_body_sent_one_byte_at_a_time_is_408_in_the_clients_dialect() {
    let sim = sim().await;
    let gw = Gateway::start(&quick_deadlines(&sim));
    for (path, dialect) in [
        ("/v1/chat/completions", "openai"),
        ("/v1/messages", "anthropic"),
    ] {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: tollgate\r\nAuthorization: Bearer {KEY}\r\nx-api-key: {KEY}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{"
        );
        let (got, elapsed) = trickle(&gw, head, |_| b" ".to_vec()).await;
        let r = RawResponse::parse(&got);
        assert_eq!(r.status, 408, "{dialect}: {}", r.text());
        assert!(
            elapsed < Duration::from_secs(5),
            "{dialect}: {elapsed:?}, per read: {PER_READ:?}"
        );
        let body = r.json();
        let message = match dialect {
            "openai" => {
                assert_eq!(body["error"]["code"], "request_timeout");
                &body["error"]["message"]
            }
            _ => {
                assert_eq!(body["type"], "error");
                &body["error"]["message"]
            }
        };
        let message = message.as_str().unwrap();
        assert!(
            message.contains("too slowly") && message.contains("8192 bytes"),
            "{message}"
        );
        assert_eq!(r.header("connection"), Some("close"));
    }
    let text = gw
        .metrics_until(|t| series(t, "tollgate_client_timeouts_total{phase=\"body\"}") == Some(2.0))
        .await;
    assert_eq!(sim.stats().requests(), 0, "{text}");
}

/// Reads one response framed by Content-Length from a kept-alive connection.
async fn read_one(s: &mut TcpStream) -> RawResponse {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(RAW_LIMIT, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let r = RawResponse::parse(&got);
            let length: usize = r.header("content-length").unwrap().parse().unwrap();
            if got.len() >= end + 4 + length {
                return r;
            }
        }
    }
}

#[tokio::test]
async fn a_kept_alive_connection_may_idle_between_requests_longer_than_the_head_deadline() {
    let sim = sim().await;
    let gw = Gateway::start(&quick_deadlines(&sim));
    let mut s = TcpStream::connect(gw.public).await.unwrap();
    for _ in 0..2 {
        s.write_all(&post("1.1", "/v1/chat/completions", &hello()))
            .await
            .unwrap();
        let r = read_one(&mut s).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("connection"), Some("keep-alive"));
        // Idle past the head deadline: the next head's clock starts with its first byte.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    // A normal body far larger than the trickles is read well within its pace.
    let big = serde_json::json!({"model": MODEL, "max_tokens": 4,
        "messages": [{"role": "user", "content": "x ".repeat(500_000)}]});
    s.write_all(&post("1.1", "/v1/chat/completions", &big))
        .await
        .unwrap();
    let r = read_one(&mut s).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let text = gw.metrics().await;
    assert_eq!(
        series(&text, "tollgate_client_timeouts_total{phase=\"head\"}"),
        Some(0.0),
        "{text}"
    );

    // The same connection's next head, one line at a time: cut at its own deadline.
    let first = "GET /v1/models HTTP/1.1\r\nHost: tollgate\r\n".to_string();
    let (got, elapsed) = trickle_on(s, first, header_line).await;
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    gw.metrics_until(|t| series(t, "tollgate_client_timeouts_total{phase=\"head\"}") == Some(1.0))
        .await;
}
