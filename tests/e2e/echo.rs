//! Error messages repeat at most a bounded part of what the client sent: a 5 MB model name,
//! a long path or block type gets a small error body, in the client's dialect.

use serde_json::{json, Value};

use crate::common::*;

/// Far below anything proportional to the input; the message is about 300 bytes.
const SMALL: usize = 1024;

#[tokio::test]
async fn a_5_mb_model_name_gets_a_small_404_in_both_dialects() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let name = format!("org/{}", "m".repeat(5 * 1024 * 1024));

    let r = gw
        .chat(json!({"model": name, "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(r.status(), 404);
    let body = r.bytes().await.unwrap();
    assert!(body.len() < SMALL, "{} bytes", body.len());
    let e: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(e["error"]["code"], "model_not_found");
    assert_eq!(e["error"]["param"], "model");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("The model 'org/mmm"), "{message}");
    assert!(
        message.contains(&format!("… ({} bytes)", name.len())),
        "{message}"
    );
    assert!(message.ends_with("GET /v1/models lists the models you can use."));

    for path in ["/v1/messages", "/v1/messages/count_tokens"] {
        let r = client()
            .post(gw.url(path))
            .header("x-api-key", KEY)
            .json(&json!({"model": name, "max_tokens": 5,
                "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
        let body = r.bytes().await.unwrap();
        assert!(body.len() < SMALL, "{path}: {} bytes", body.len());
        let e: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(e["type"], "error", "{path}");
        assert_eq!(e["error"]["type"], "not_found_error", "{path}");
    }
    assert_eq!(sim.stats().requests(), 0);
}

#[tokio::test]
async fn long_paths_and_block_types_are_cut_in_messages() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    // URIs are limited to 64 KiB by the client library; 16 KiB is past any sane path.
    let long = "x".repeat(16 * 1024);

    // A model slug in the catalog's path, and a path tollgate does not serve.
    for (path, status) in [
        (format!("/v1/models/{long}"), 404),
        (format!("/v1/{long}"), 404),
    ] {
        let r = client()
            .get(gw.url(&path))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status);
        let body = r.text().await.unwrap();
        assert!(body.len() < SMALL, "{} bytes: {:.300}", body.len(), body);
        assert!(body.contains("… (16"), "{body}");
    }

    // A content block type the Messages API does not know.
    let r = gw
        .messages(
            json!({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user",
            "content": [{"type": long, "text": "hi"}]}]}),
        )
        .await;
    assert_eq!(r.status(), 400);
    let body = r.text().await.unwrap();
    assert!(body.len() < SMALL, "{} bytes", body.len());
    assert!(
        body.contains("unsupported content block type"),
        "{body:.300}"
    );

    assert_eq!(sim.stats().requests(), 0);
}
