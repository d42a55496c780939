//! `count_tokens` and `GET /v1/models` have a limit of their own per key
//! (`server.metadata_rpm`), counted apart from the key's chat `rpm`.

use serde_json::{json, Value};

use crate::common::*;

fn models(gw: &Gateway, key: &str) -> reqwest::RequestBuilder {
    client().get(gw.url("/v1/models")).bearer_auth(key)
}

fn count_tokens(gw: &Gateway) -> reqwest::RequestBuilder {
    client()
        .post(gw.url("/v1/messages/count_tokens"))
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "Hello"}]}))
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[tokio::test]
async fn metadata_endpoints_have_their_own_limit_apart_from_rpm() {
    let sim = sim().await;
    let server = "[server]\nlisten = \"127.0.0.1:0\"\ngrace_period_secs = 0\nmetadata_rpm = 3\n\n";
    let gw = Gateway::start(&format!("{server}{}", config_with(&sim, "rpm = 2")));

    // Three metadata requests fit, counting down; they leave the chat rpm alone.
    for (i, left) in ["2", "1", "0"].into_iter().enumerate() {
        let r = match i {
            1 => count_tokens(&gw).send().await.unwrap(),
            _ => models(&gw, KEY).send().await.unwrap(),
        };
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-ratelimit-limit-requests"), "3");
        assert_eq!(header(&r, "x-ratelimit-remaining-requests"), left);
        assert_eq!(header(&r, "anthropic-ratelimit-requests-remaining"), left);
    }

    // The fourth is refused in each dialect, saying when to retry.
    let r = count_tokens(&gw).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = header(&r, "retry-after").parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(header(&r, "anthropic-ratelimit-requests-limit"), "3");
    assert_eq!(header(&r, "anthropic-ratelimit-requests-remaining"), "0");
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["type"], "error");
    assert_eq!(e["error"]["type"], "rate_limit_error");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(
        message
            .contains("3 requests per minute to POST /v1/messages/count_tokens and GET /v1/models"),
        "{message}"
    );
    let r = models(&gw, KEY).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "rate_limit_metadata");
    assert_eq!(e["error"]["type"], "rate_limit_error");

    // Chat requests still have their whole rpm, and use none of the metadata window.
    for _ in 0..2 {
        let r = gw.chat(ask(3)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-ratelimit-limit-requests"), "2");
    }
    let r = gw.chat(ask(3)).await;
    assert_eq!(r.status(), 429);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "rate_limit_requests");
    // Another key has a window of its own.
    let r = models(&gw, NARROW_KEY).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "2");

    let text = gw
        .metrics_until(|t| {
            series(
                t,
                r#"tollgate_limit_rejections_total{key="team-a",kind="metadata"}"#,
            ) == Some(2.0)
        })
        .await;
    assert_eq!(
        series(
            &text,
            r#"tollgate_limit_rejections_total{key="team-a",kind="requests"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sim.stats().requests(), 2);
}

#[tokio::test]
async fn the_metadata_limit_is_on_by_default() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let r = models(&gw, KEY).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "600");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "599");
}
