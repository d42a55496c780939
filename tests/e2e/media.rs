//! Images, audio and video: refused for a model that does not take them, and media URLs a
//! replica would fetch held to the model's `media_urls` policy, on both surfaces, before
//! anything reaches a replica.

use serde_json::{json, Value};

use crate::common::*;

const VISION: &str = "test/vision";
const INLINE_ONLY: &str = "test/inline";

/// The standard config plus a vision model (default `media_urls`, public_only) and one that
/// takes inline images only.
fn config(sim: &SimReplica) -> String {
    format!(
        "{}\n[[models]]\nslug = \"{VISION}\"\npool = \"main\"\ninput_modalities = [\"text\", \"image\"]\n\n[[models]]\nslug = \"{INLINE_ONLY}\"\npool = \"main\"\ninput_modalities = [\"text\", \"image\"]\nmedia_urls = \"none\"\n",
        standard_config(&[sim.addr()], "")
    )
}

fn chat_image(model: &str, url: &str) -> Value {
    json!({"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": url}}]}]})
}

fn messages_image(model: &str, source: Value) -> Value {
    json!({"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": source}]}]})
}

const PNG: &str = "iVBORw0KGgo=";

#[tokio::test]
async fn a_text_only_model_refuses_an_image_part_on_both_surfaces() {
    let sim = sim().await;
    let gw = Gateway::start(&config(&sim));
    let r = gw
        .chat(chat_image(MODEL, &format!("data:image/png;base64,{PNG}")))
        .await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unsupported_modality", "{body}");
    assert_eq!(body["error"]["param"], "messages[0].content[1]");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("image_url"), "{message}");
    assert!(
        message.contains("'test/model' takes only text"),
        "{message}"
    );
    // Without a type, engines infer it from the key: still an image.
    let mut untyped = chat_image(MODEL, "http://93.184.215.14/cat.png");
    untyped["messages"][0]["content"][1] =
        json!({"image_url": {"url": "http://93.184.215.14/x.png"}});
    assert_eq!(gw.chat(untyped).await.status(), 400);
    let r = gw
        .messages(messages_image(
            MODEL,
            json!({"type": "base64", "media_type": "image/png", "data": PNG}),
        ))
        .await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("an image part"), "{message}");
    assert!(message.contains("'test/model'"), "{message}");
    // An audio part is no image, and this model takes no audio either.
    let audio = json!({"model": VISION, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]});
    let body: Value = gw.chat(audio).await.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unsupported_modality", "{body}");
    assert_eq!(
        sim.stats().requests(),
        0,
        "the replica saw a refused request"
    );
    // Text alone still passes.
    assert_eq!(gw.chat(hello()).await.status(), 200);
}

#[tokio::test]
async fn a_metadata_url_is_refused_on_both_surfaces_and_never_reaches_the_replica() {
    let sim = sim().await;
    let gw = Gateway::start(&config(&sim));
    for url in [
        "http://169.254.169.254/latest/meta-data/",
        // The same address, spelled as one decimal number and as an IPv4-mapped IPv6 one.
        "http://2852039166/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/latest/meta-data/",
        "http://metadata.google.internal/computeMetadata/v1/",
        // A name refused once resolved (to loopback).
        "http://localhost:8080/x.png",
        "file:///etc/passwd",
    ] {
        let r = gw.chat(chat_image(VISION, url)).await;
        assert_eq!(r.status(), 400, "{url}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "media_url_refused", "{url}: {body}");
        assert_eq!(body["error"]["param"], "messages[0].content[1]");
        let r = gw
            .messages(messages_image(VISION, json!({"type": "url", "url": url})))
            .await;
        assert_eq!(r.status(), 400, "{url}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("is refused"),
            "{url}: {body}"
        );
    }
    let body: Value = gw
        .chat(chat_image(
            VISION,
            "http://169.254.169.254/latest/meta-data/",
        ))
        .await
        .json()
        .await
        .unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("a cloud metadata address"),
        "{body}"
    );
    assert_eq!(sim.stats().requests(), 0, "the replica saw a refused URL");
}

#[tokio::test]
async fn a_public_address_and_inline_data_reach_the_replica() {
    let sim = sim().await;
    let gw = Gateway::start(&config(&sim));
    let public = "http://93.184.215.14/cat.png";
    let r = gw.chat(chat_image(VISION, public)).await;
    assert_eq!(r.status(), 200);
    let up = sim.stats().last_request().unwrap().body;
    assert_eq!(up["messages"][0]["content"][1]["image_url"]["url"], public);
    let r = gw
        .messages(messages_image(
            VISION,
            json!({"type": "url", "url": public}),
        ))
        .await;
    assert_eq!(r.status(), 200);
    let inline = format!("data:image/png;base64,{PNG}");
    assert_eq!(gw.chat(chat_image(VISION, &inline)).await.status(), 200);
    assert_eq!(sim.stats().requests(), 3);
}

#[tokio::test]
async fn media_urls_none_takes_inline_data_only() {
    let sim = sim().await;
    let gw = Gateway::start(&config(&sim));
    let r = gw
        .chat(chat_image(INLINE_ONLY, "http://93.184.215.14/cat.png"))
        .await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("inline only"),
        "{body}"
    );
    let r = gw
        .messages(messages_image(
            INLINE_ONLY,
            json!({"type": "base64", "media_type": "image/png", "data": PNG}),
        ))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(sim.stats().requests(), 1);
}
