//! The response header a client of the Model API sees: the replica's fields reach it only
//! when tollgate means to send them, on whole answers and streams, on both surfaces.

use serde_json::json;

use crate::common::*;

/// A replica answer with fields no client should see: its server, a cookie, an internal
/// token, a rate-limit field of its own. And a `retry-after`, which a client may use.
fn leaky(content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\nServer: uvicorn\r\nSet-Cookie: replica-session=s3cr3t; Path=/\r\nX-Internal-Token: internal-token-value\r\nx-ratelimit-remaining-tokens: 7\r\nVia: 1.1 gpu-node-7\r\nretry-after: 3\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn chunk(delta: serde_json::Value, finish: Option<&str>) -> String {
    let c = json!({"id": "c", "object": "chat.completion.chunk", "created": 1,
        "model": "served-model", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
    format!("data: {c}\n\n")
}

fn stream_body() -> String {
    let usage = json!({"id": "c", "object": "chat.completion.chunk", "created": 1,
        "model": "served-model", "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}});
    format!(
        "{}{}data: {usage}\n\ndata: [DONE]\n\n",
        chunk(json!({"role": "assistant", "content": "Hi"}), None),
        chunk(json!({}), Some("stop"))
    )
}

#[tokio::test]
async fn replica_fields_reach_clients_only_through_the_allowlist() {
    let whole =
        CannedReplica::start(leaky("application/json", &completion_json("Hi", 5, 0, 1))).await;
    let stream = CannedReplica::start(leaky("text/event-stream", &stream_body())).await;
    let config = format!(
        r#"[[pools]]
name = "whole"
replicas = ["{}"]

[[pools]]
name = "stream"
replicas = ["{}"]

[[models]]
slug = "{MODEL}"
pool = "whole"
upstream_model = "served-model"

[[models]]
slug = "test/other"
pool = "stream"
upstream_model = "served-model"

{}"#,
        whole.addr,
        stream.addr,
        standard_keys().replacen("models = [\"*\"]\n", "models = [\"*\"]\nrpm = 100\n", 1)
    );
    let gw = Gateway::start(&config);
    let messages = |model: &str, stream: bool| {
        json!({"model": model, "max_tokens": 16, "stream": stream,
            "messages": [{"role": "user", "content": "Hello"}]})
    };
    let cases = [
        (
            "chat",
            gw.chat(messages(MODEL, false)).await,
            "application/json",
        ),
        (
            "chat stream",
            gw.chat(messages("test/other", true)).await,
            "text/event-stream",
        ),
        (
            "messages",
            gw.messages(messages(MODEL, false)).await,
            "application/json",
        ),
        (
            "messages stream",
            gw.messages(messages("test/other", true)).await,
            "text/event-stream",
        ),
    ];
    for (what, r, content_type) in cases {
        let h = r.headers().clone();
        let body = r.text().await.unwrap();
        assert!(body.contains("Hi"), "{what}: {body}");
        for hidden in [
            "server",
            "set-cookie",
            "x-internal-token",
            "via",
            "x-ratelimit-remaining-tokens",
        ] {
            assert!(
                h.get(hidden).is_none(),
                "{what}: the replica's {hidden} reached the client: {h:?}"
            );
        }
        let text = format!("{h:?}");
        assert!(
            !text.contains("s3cr3t") && !text.contains("internal-token-value"),
            "{what}: {text}"
        );
        // tollgate's own fields stay, and those of the replica's a client may use.
        let get = |n: &str| {
            h.get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        assert!(
            get("content-type").starts_with(content_type),
            "{what}: {h:?}"
        );
        assert!(!get("x-request-id").is_empty(), "{what}: {h:?}");
        assert_eq!(get("request-id"), get("x-request-id"), "{what}");
        assert_eq!(get("x-ratelimit-limit-requests"), "100", "{what}: {h:?}");
        assert_eq!(
            get("anthropic-ratelimit-requests-limit"),
            "100",
            "{what}: {h:?}"
        );
        assert_eq!(get("retry-after"), "3", "{what}: {h:?}");
    }
}
