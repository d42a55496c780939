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
