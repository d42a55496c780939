//! The shape of a request body, checked before anything is parsed or forwarded: how deep it
//! nests and whether an object repeats a key, on both surfaces.

use serde_json::Value;

use crate::common::*;

/// POSTs `body` as it is to `path` with `KEY`; (status, answer).
async fn post_raw(gw: &Gateway, path: &str, body: String) -> (u16, Value) {
    let r = client()
        .post(gw.url(path))
        .bearer_auth(KEY)
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request reaches tollgate");
    let status = r.status().as_u16();
    (status, r.json().await.expect("a JSON answer"))
}

/// A valid request for either surface whose unknown field `engine_args` nests `depth` deep.
fn nested(depth: usize) -> String {
    format!(
        r#"{{"model":"{MODEL}","max_tokens":8,"messages":[{{"role":"user","content":"Hi"}}],"engine_args":{}1{}}}"#,
        "[".repeat(depth),
        "]".repeat(depth)
    )
}

#[tokio::test]
async fn a_value_nested_100000_deep_in_an_unknown_field_is_refused_on_both_surfaces() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let (status, body) = post_raw(&gw, "/v1/chat/completions", nested(100_000)).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "json_too_deep");
    assert_eq!(body["error"]["param"], "engine_args");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("more than 127 levels"),
        "{body}"
    );
    let (status, body) = post_raw(&gw, "/v1/messages", nested(100_000)).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'engine_args'"),
        "{body}"
    );
    assert_eq!(sim.stats().requests(), 0, "the replica saw a refused body");
    // Just under the limit (the body's object and one array level above the value's), the
    // value reaches the replica as the client wrote it.
    let (status, body) = post_raw(&gw, "/v1/chat/completions", nested(125)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(sim.stats().requests(), 1);
}

#[tokio::test]
async fn a_repeated_key_is_refused_on_both_surfaces_naming_it() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    // Which output cap would count? The Messages surface used to take the last one.
    let twice = format!(
        r#"{{"model":"{MODEL}","max_tokens":1,"messages":[{{"role":"user","content":"Hi"}}],"max_tokens":4096}}"#
    );
    let (status, body) = post_raw(&gw, "/v1/messages", twice.clone()).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("'max_tokens' appears more than once"),
        "{message}"
    );
    let (status, body) = post_raw(&gw, "/v1/chat/completions", twice).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "duplicate_key");
    assert_eq!(body["error"]["param"], "max_tokens");
    // Deep inside a message, where the type of a part decides what tollgate checks.
    let part = format!(
        r#"{{"model":"{MODEL}","max_tokens":8,"messages":[{{"role":"user","content":[{{"type":"text","text":"Hi","type":"image"}}]}}]}}"#
    );
    let (status, body) = post_raw(&gw, "/v1/messages", part.clone()).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'messages[0].content[0]'"),
        "{body}"
    );
    let (status, body) = post_raw(&gw, "/v1/chat/completions", part).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "messages[0].content[0].type");
    assert_eq!(sim.stats().requests(), 0, "the replica saw a refused body");
}
