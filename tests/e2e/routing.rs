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
    // Each stream holds its replica until its client leaves (the first token is a minute
    // away; the header comes at once), so all six are in flight together however slowly
    // they arrive, and least-in-flight must alternate.
    let mut body = hello();
    body["stream"] = json!(true);
    body["sim"] = json!({"ttft_ms": 60_000});
    let calls = (0..6).map(|_| gw.chat(body.clone()));
    let held = futures_util::future::join_all(calls).await;
    for r in &held {
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        (a.stats().requests(), b.stats().requests()),
        (3, 3),
        "least-in-flight splits 6 concurrent requests 3/3"
    );
    drop(held);
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
    // Without health checks, the first request is what finds both replicas refusing.
    let gw = Gateway::start(&standard_config(
        &[refused_addr(), refused_addr()],
        "health = { enabled = false }",
    ));
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
async fn a_replica_closing_without_an_answer_is_retried_on_another_then_502() {
    let (a, b) = (sim().await, sim().await);
    let gw = Gateway::start(&standard_config(&[a.addr(), b.addr()], ""));
    let mut body = hello();
    body["sim"] = json!({"reset_after": 0});
    let r = gw.chat(body).await;
    assert_eq!(r.status(), 502);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "upstream_error");
    // Closed before one byte of an answer: inference has no side effect to repeat, so the
    // other replica got it too (and closed as well, as this request asks).
    assert_eq!((a.stats().requests(), b.stats().requests()), (1, 1));
}

#[tokio::test]
async fn a_pool_without_replicas_is_503() {
    let gw = Gateway::start(&standard_config(&[], ""));
    let r = gw.chat(hello()).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
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
    // A stream's header comes before prefill: a replica that sends none in first_byte_ms is
    // stuck.
    let mut body = hello();
    body["stream"] = json!(true);
    body["sim"] = json!({"stall_ms": 20_000});
    let r = gw.chat(body).await;
    assert_eq!(r.status(), 504);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "upstream_timeout");
}

#[tokio::test]
async fn upstream_errors_keep_status_and_message_in_the_openai_shape() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    for (status, kind) in [(400, "invalid_request_error"), (503, "api_error")] {
        let mut body = hello();
        body["sim"] = json!({"fail_status": status});
        let r = gw.chat(body).await;
        assert_eq!(r.status(), status);
        let e: Value = r.json().await.unwrap();
        // The engine's own type and its numeric code are not OpenAI's: rewritten.
        assert_eq!(
            e["error"],
            json!({"message": "simulated failure", "type": kind, "param": null, "code": "replica_error"})
        );
    }
    // vLLM's older shape, and FastAPI's validation errors, keep their message too.
    let replica = CannedReplica::answering(
        "422 Unprocessable Entity",
        "application/json",
        r#"{"detail":[{"loc":["body","messages",0,"content"],"msg":"Field required"}]}"#,
    )
    .await;
    let gw = Gateway::start(&standard_config(&[replica.addr], ""));
    let r = gw.chat(hello()).await;
    assert_eq!(r.status(), 422);
    let e: Value = r.json().await.unwrap();
    assert_eq!(
        e["error"]["message"],
        "body.messages.0.content: Field required"
    );
    assert_eq!(e["error"]["type"], "invalid_request_error");

    // A replica refusing tollgate's own credentials is the gateway's fault, not the
    // client's key: 502, in either dialect.
    let replica = CannedReplica::answering(
        "401 Unauthorized",
        "application/json",
        r#"{"error":"Unauthorized"}"#,
    )
    .await;
    let gw = Gateway::start(&standard_config(&[replica.addr], ""));
    let r = gw.chat(hello()).await;
    assert_eq!(r.status(), 502);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "replica_auth_failed");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("upstream_api_key_env"));
    let r = gw
        .messages(json!({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(r.status(), 502);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "api_error");
}

#[tokio::test]
async fn of_a_replicas_header_fields_the_client_gets_the_content_type_and_tollgates_request_id() {
    // A replica that answers with fields of its own, connection-scoped ones, and a request id.
    let body = r#"{"id":"c1","object":"chat.completion","model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;
    let replica = CannedReplica::start(format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-replica: a\r\n\
         keep-alive: timeout=5\r\nx-replica: b\r\nconnection: keep-alive, X-Hop-Only\r\n\
         x-hop-only: 1\r\n\
         x-request-id: replica-own\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ))
    .await;
    let addr = replica.addr;
    let gw = Gateway::start(&standard_config(&[addr], ""));
    let r = gw.chat(hello()).await;
    assert_eq!(r.status(), 200);
    for name in ["x-replica", "keep-alive", "x-hop-only"] {
        assert!(r.headers().get(name).is_none(), "{name}: {:?}", r.headers());
    }
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(request_id.starts_with("req_"), "{request_id}");
    assert_eq!(r.headers()["content-type"], "application/json");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["usage"]["total_tokens"], 5);
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
    assert_eq!(r.headers()["allow"], "POST");
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

const OVERLOADED: &str =
    r#"{"error":{"message":"overloaded","type":"server_error","param":null,"code":503}}"#;

#[tokio::test]
async fn a_replica_answering_503_hands_the_request_to_another() {
    let busy =
        CannedReplica::answering("503 Service Unavailable", "application/json", OVERLOADED).await;
    let live = sim().await;
    let gw = Gateway::start(&standard_config(&[busy.addr, live.addr()], ""));
    // Ties between idle replicas are broken at random: over 16 requests the busy one is
    // picked first about half the time (never, with odds of 1 in 65536).
    for _ in 0..16 {
        let r = gw.chat(hello()).await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    assert_eq!(live.stats().requests(), 16);
    assert!(busy.answered() > 0);
}

#[tokio::test]
async fn when_every_replica_answers_503_the_last_answer_reaches_the_client() {
    let a =
        CannedReplica::answering("503 Service Unavailable", "application/json", OVERLOADED).await;
    let b =
        CannedReplica::answering("503 Service Unavailable", "application/json", OVERLOADED).await;
    let gw = Gateway::start(&standard_config(&[a.addr, b.addr], ""));
    let r = gw.chat(hello()).await;
    assert_eq!(r.status(), 503);
    let e: Value = r.json().await.unwrap();
    assert_eq!(
        e["error"]["message"], "overloaded",
        "the replica's own message"
    );
    assert_eq!(
        (a.answered(), b.answered()),
        (1, 1),
        "each replica tried once"
    );
}

// Every delay that must fit under a limit leaves it a second or more, for a loaded machine;
// every delay that must overrun one only grows under load.
#[tokio::test]
async fn each_timeout_bounds_its_own_phase() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(
        &[sim.addr()],
        "timeouts = { first_byte_ms = 2500, idle_ms = 1000, total_ms = 5000 }",
    ));
    // Prefill longer than idle_ms: a stream's first token is due within first_byte_ms.
    let r = gw
        .chat(
            json!({"model": MODEL, "stream": true, "max_tokens": 3, "sim": {"ttft_ms": 1500},
            "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    let events = sse_data(&r.text().await.unwrap());
    assert_ran_to_done(&events);

    // A whole answer arrives when it is all generated: longer than first_byte_ms is fine,
    // longer than total_ms is a 504 that says so.
    let mut long = hello();
    long["max_tokens"] = json!(3);
    long["sim"] = json!({"ttft_ms": 3000});
    assert_eq!(gw.chat(long.clone()).await.status(), 200);
    long["sim"] = json!({"ttft_ms": 30_000});
    let r = gw.chat(long).await;
    assert_eq!(r.status(), 504);
    let e: Value = r.json().await.unwrap();
    assert!(
        e["error"]["message"].as_str().unwrap().contains("total_ms"),
        "{e}"
    );

    // A stream whose first token does not come within first_byte_ms ends with an error event.
    let r = gw
        .chat(
            json!({"model": MODEL, "stream": true, "max_tokens": 3, "sim": {"ttft_ms": 3500},
            "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains("first_byte_ms"), "{text}");
}

#[tokio::test]
async fn a_rewritten_event_stream_does_not_keep_the_replicas_length() {
    let events = concat!(
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"served-model\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"served-model\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"served-model\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1,\"total_tokens\":4}}\n\n",
        "data: [DONE]\n\n"
    );
    let replica = CannedReplica::answering("200 OK", "text/event-stream", events).await;
    let gw = Gateway::start(&standard_config(&[replica.addr], ""));
    let r = gw
        .chat(json!({"model": MODEL, "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(r.status(), 200);
    let declared = r.headers().get("content-length").cloned();
    let body = r
        .bytes()
        .await
        .expect("the body ends where its framing says");
    if let Some(n) = declared {
        assert_eq!(n.to_str().unwrap(), body.len().to_string());
    }
    let data = sse_data(&String::from_utf8_lossy(&body));
    assert_eq!(
        data.len(),
        3,
        "the usage chunk the client did not ask for is gone: {data:?}"
    );
    assert!(
        data[0].contains(&format!("\"model\":\"{MODEL}\"")),
        "{data:?}"
    );
}

#[tokio::test]
async fn a_replica_that_refused_with_503_bills_nothing_when_no_other_answers() {
    let busy =
        CannedReplica::answering("503 Service Unavailable", "application/json", OVERLOADED).await;
    // The busy replica is soon ejected, and the short wait for room ends in 503.
    let gw = Gateway::start(&standard_config(
        &[busy.addr, refused_addr()],
        "queue = { timeout_ms = 100 }",
    ));
    // Whichever replica is tried first, no model worked on these requests.
    for _ in 0..8 {
        let r = gw.chat(hello()).await;
        assert!([502, 503].contains(&r.status().as_u16()), "{}", r.status());
    }
    let (requests, input, output, estimated) = gw.usage_totals_of(8).await;
    assert_eq!((requests, input, output, estimated), (8, 0, 0, 0));
}
