//! The request body: the cap (413 before any upstream work), 100-continue, validation.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

fn small_cap_config(sim: &SimReplica) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_body_bytes = 2048\n\n{}",
        standard_config(&[sim.addr()], "")
    )
}

fn padded(bytes: usize) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": "x".repeat(bytes)}]})
}

#[tokio::test]
async fn content_length_over_the_cap_is_413_and_never_reaches_a_replica() {
    let sim = sim().await;
    let gw = Gateway::start(&small_cap_config(&sim));
    let r = gw.chat(padded(4096)).await;
    assert_eq!(r.status(), 413);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "request_too_large");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("2048 bytes"));
    let r = gw.chat(padded(1000)).await;
    assert_eq!(r.status(), 200, "a body under the cap passes");
    assert_eq!(sim.stats().requests(), 1);
}

#[tokio::test]
async fn chunked_body_over_the_cap_is_413() {
    let sim = sim().await;
    let gw = Gateway::start(&small_cap_config(&sim));
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        vec![Ok(vec![b' '; 1500]), Ok(vec![b' '; 1500])];
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(sim.stats().requests(), 0);
}

// Blocking socket I/O below: the replica needs a runtime thread of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_then_the_request_served() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let body = hello().to_string();
    let mut s = TcpStream::connect(gw.public).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    )
    .unwrap();
    let mut buf = [0u8; 25];
    s.read_exact(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 100 Continue"));
    s.write_all(body.as_bytes()).unwrap();
    let mut rest = [0u8; 12];
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("HTTP/1.1 200") {
        let n = s.read(&mut rest).unwrap();
        assert!(
            n > 0,
            "connection closed early: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&rest[..n]);
    }
}

// Blocking socket I/O below: the replica needs a runtime thread of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_content_length_is_read_and_a_client_leaving_mid_body_is_not_a_400() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let body = hello().to_string();
    let head = |length: &str| {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
        )
    };
    // The same length twice, merged into one field (RFC 9110 §8.6): read as that length.
    let mut s = TcpStream::connect(gw.public).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let n = body.len();
    write!(s, "{}{body}", head(&format!("{n}, {n}"))).unwrap();
    let mut got = [0u8; 12];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"HTTP/1.1 200");

    // Half a body, then the client closes: it left; nobody is told the body was bad.
    let mut s = TcpStream::connect(gw.public).unwrap();
    write!(s, "{}{}", head(&n.to_string()), &body[..n / 2]).unwrap();
    s.shutdown(std::net::Shutdown::Both).unwrap();
    drop(s);
    let text = gw
        .metrics_until(|t| t.contains("code=\"client_disconnected\""))
        .await;
    assert!(text.contains("code=\"client_disconnected\""), "{text}");
    assert!(!text.contains("code=\"body_read_error\""), "{text}");
}

#[tokio::test]
async fn invalid_bodies_get_400_naming_the_field() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let c = client();
    let send = |body: String| {
        c.post(gw.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let r = send("{not json".into()).await.unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "invalid_json");
    for (body, param) in [
        (
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            "model",
        ),
        (json!({"model": MODEL}), "messages"),
        (json!({"model": 3, "messages": []}), "model"),
        (
            json!({"model": MODEL, "messages": [{"role": "user"}], "stream": "yes"}),
            "stream",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user"}], "max_tokens": "ten"}),
            "max_tokens",
        ),
    ] {
        let r = send(body.to_string()).await.unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], param, "{body}");
        assert_eq!(e["error"]["type"], "invalid_request_error");
    }
    assert_eq!(sim.stats().requests(), 0);
}

#[tokio::test]
async fn unknown_fields_are_forwarded_and_model_rewritten() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let mut body = hello();
    body["top_k"] = json!(20);
    body["chat_template_args"] = json!({"enable_thinking": false});
    body["temperature"] = json!(0.25);
    let r = gw.chat(body).await;
    assert_eq!(r.status(), 200);
    let seen = sim.stats().last_request().unwrap().body;
    assert_eq!(seen["model"], "served-model");
    assert_eq!(seen["top_k"], 20);
    assert_eq!(
        seen["chat_template_args"],
        json!({"enable_thinking": false})
    );
    assert_eq!(seen["temperature"], 0.25);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["object"], "chat.completion");
}
