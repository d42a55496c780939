//! Routing: model lookup, least-in-flight spreading, retries on refused connections, and the
//! 502 / 503 / 504 contract.

use serde_json::{json, Value};

use crate::common::*;

#[tokio::test]
async fn an_unknown_model_is_404_model_not_found() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let r = gw
        .chat(json!({"model": "no/such", "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "model_not_found");
    assert_eq!(e["error"]["param"], "model");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("GET /v1/models"));
}

#[tokio::test]
async fn concurrent_requests_spread_over_idle_replicas() {
    let (a, b) = (sim().await, sim().await);
    let gw = Gateway::start(&standard_config(&[a.addr(), b.addr()], ""));
    // Each request holds its replica for a while, so least-in-flight must alternate.
    let mut body = hello();
    body["sim"] = json!({"ttft_ms": 300});
    let calls = (0..6).map(|_| gw.chat(body.clone()));
    for r in futures_util::future::join_all(calls).await {
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        a.stats().requests(),
        3,
        "least-in-flight splits 6 concurrent requests 3/3"
    );
    assert_eq!(b.stats().requests(), 3);
}

#[tokio::test]
async fn a_refusing_replica_is_skipped_and_the_request_retried() {
    let live = sim().await;
    let gw = Gateway::start(&standard_config(&[refused_addr(), live.addr()], ""));
    for _ in 0..4 {
        let r = gw.chat(hello()).await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    assert_eq!(live.stats().requests(), 4);
}

#[tokio::test]
async fn every_replica_refusing_is_502() {
    let gw = Gateway::start(&standard_config(&[refused_addr(), refused_addr()], ""));
    let r = gw.chat(hello()).await;
    assert_eq!(r.status(), 502);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "upstream_unreachable");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("2 attempt"));
}

#[tokio::test]
async fn a_replica_closing_without_an_answer_is_502_and_not_retried() {
    let (a, b) = (sim().await, sim().await);
    let gw = Gateway::start(&standard_config(&[a.addr(), b.addr()], ""));
    let mut body = hello();
    body["sim"] = json!({"reset_after": 0});
    let r = gw.chat(body).await;
    assert_eq!(r.status(), 502);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "upstream_error");
    // The request reached a model: sending it again could run it twice.
    assert_eq!(a.stats().requests() + b.stats().requests(), 1);
}

#[tokio::test]
async fn a_pool_without_replicas_is_503() {
    let gw = Gateway::start(&standard_config(&[], ""));
    let r = gw.chat(hello()).await;
    assert_eq!(r.status(), 503);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "no_healthy_replica");
}

#[tokio::test]
async fn a_replica_that_does_not_answer_in_time_is_504() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(
        &[sim.addr()],
        "timeouts = { first_byte_ms = 200 }",
    ));
    let mut body = hello();
    body["sim"] = json!({"stall_ms": 20_000});
    let r = gw.chat(body).await;
    assert_eq!(r.status(), 504);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "upstream_timeout");
}

#[tokio::test]
async fn upstream_error_bodies_pass_through_unchanged() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let mut body = hello();
    body["sim"] = json!({"fail_status": 503});
    let r = gw.chat(body).await;
    assert_eq!(r.status(), 503);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "sim_error");
}

#[tokio::test]
async fn upstream_connections_are_pooled_and_reused() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    for i in 0..20 {
        let mut body = hello();
        body["stream"] = json!(i % 2 == 1);
        let r = gw.chat(body).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    assert_eq!(sim.stats().requests(), 20);
    // Sequential requests share one pooled connection. Pingora's pool can, rarely, fail to
    // hand a just-released connection back ("failed to acquire reusable stream") when its
    // idle watcher has not let go yet; that costs a new connection, never a request.
    let connections = sim.stats().connections();
    assert!(
        connections <= 3,
        "20 sequential requests opened {connections} upstream connections"
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let c = client();
    let r = c
        .get(gw.url("/v1/nothing"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "unknown_url"
    );
    let r = c
        .get(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "method_not_allowed"
    );
}

// Blocking socket I/O below: the replica needs a runtime thread of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    use std::io::{Read, Write};
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let body = hello().to_string();
    let one = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = std::net::TcpStream::connect(gw.public).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    // Both requests in one write: the second is already waiting while the first is served.
    s.write_all(format!("{one}{one}").as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&got)
        .matches("HTTP/1.1 200")
        .count()
        < 2
    {
        let n = s.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "connection closed: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(sim.stats().requests(), 2);
}
