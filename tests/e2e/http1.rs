//! HTTP/1 as the client speaks it: the Host field RFC 9112 requires of HTTP/1.1, and the
//! framing an HTTP/1.0 client can read.

use crate::common::*;
use crate::raw::*;

#[tokio::test]
async fn http_1_1_without_host_is_400_in_the_clients_dialect_and_http_1_0_is_served() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let models = |version: &str, extra: &str| {
        format!("GET /v1/models HTTP/{version}\r\nAuthorization: Bearer {KEY}\r\n{extra}\r\n")
    };

    let r = exchange(gw.public, models("1.1", "").as_bytes()).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let body = r.json();
    assert_eq!(body["error"]["code"], "missing_host");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("Host"), "{message}");
    assert!(r.header("x-request-id").is_some());

    // The Anthropic SDK's header: Anthropic's error shape.
    let r = exchange(
        gw.public,
        models("1.1", "anthropic-version: 2023-06-01\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let body = r.json();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "invalid_request_error");

    // The same request with Host, and HTTP/1.0 without it, are served.
    let r = exchange(
        gw.public,
        models("1.1", "Host: tollgate\r\nConnection: close\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = exchange(gw.public, models("1.0", "").as_bytes()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["data"][0]["id"], MODEL);
    let r = exchange(gw.public, &post("1.0", "/v1/chat/completions", &hello())).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn an_http_1_0_stream_is_delimited_by_closing_the_connection_never_chunked() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let mut ask = hello();
    ask["stream"] = serde_json::json!(true);
    ask["max_tokens"] = serde_json::json!(16);

    let r = exchange(gw.public, &post("1.0", "/v1/chat/completions", &ask)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("transfer-encoding"), None, "{:?}", r.headers);
    assert_eq!(r.header("content-length"), None, "{:?}", r.headers);
    assert_eq!(r.header("connection"), Some("close"), "{:?}", r.headers);
    let body = r.text();
    // The events themselves, with no chunk-size lines between them, up to [DONE].
    assert!(body.starts_with("data: {"), "{body}");
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
    let content: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<serde_json::Value>(d).expect("a JSON event"))
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert!(!content.is_empty(), "{body}");

    let r = exchange(gw.public, &post("1.0", "/v1/messages", &ask)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("transfer-encoding"), None, "{:?}", r.headers);
    assert_eq!(r.header("connection"), Some("close"), "{:?}", r.headers);
    let body = r.text();
    assert!(body.starts_with("event: message_start\n"), "{body}");
    assert!(body.contains("event: content_block_delta\n"), "{body}");
    assert!(
        body.trim_end()
            .ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}"),
        "{body}"
    );

    // HTTP/1.1 keeps its chunked stream.
    let r = exchange(
        gw.public,
        &post_with("1.1", "/v1/chat/completions", "Connection: close\r\n", &ask),
    )
    .await;
    assert_eq!(
        r.header("transfer-encoding"),
        Some("chunked"),
        "{:?}",
        r.headers
    );
}
