//! The README's status table end to end, for the codes no other area covers: the body's
//! missing and mistyped fields, the token and concurrency limits (with `retry-after`), and a
//! replica's 502 handed to another replica.

use serde_json::{json, Value};

use crate::common::*;

/// The `retry-after` of a 429, in seconds.
fn retry_after(r: &reqwest::Response) -> u64 {
    r.headers()
        .get("retry-after")
        .unwrap_or_else(|| panic!("a 429 says when to retry: {:?}", r.headers()))
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_missing_or_mistyped_field_is_400_with_its_code_and_param() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let cases = [
        (
            json!({"model": MODEL}),
            "missing_required_parameter",
            "messages",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            "missing_required_parameter",
            "model",
        ),
        (
            json!({"model": MODEL, "messages": "hi"}),
            "invalid_type",
            "messages",
        ),
        (
            json!({"model": 3, "messages": [{"role": "user", "content": "hi"}]}),
            "invalid_type",
            "model",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}),
            "invalid_type",
            "stream",
        ),
    ];
    for (body, code, param) in cases {
        let r = gw.chat(body.clone()).await;
        assert_eq!(r.status(), 400, "{body}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], code, "{body}: {e}");
        assert_eq!(e["error"]["param"], param, "{body}: {e}");
        assert_eq!(e["error"]["type"], "invalid_request_error", "{body}: {e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(param),
            "the message names the field: {e}"
        );
    }
    assert_eq!(sim.stats().requests(), 0);
    let text = gw
        .metrics_until(|t| {
            series(t, r#"tollgate_errors_total{code="invalid_type",model="-"}"#) == Some(3.0)
        })
        .await;
    assert_eq!(
        series(
            &text,
            r#"tollgate_errors_total{code="missing_required_parameter",model="-"}"#
        ),
        Some(2.0),
        "{text}"
    );
}

#[tokio::test]
async fn over_the_tpm_is_429_rate_limit_tokens_with_retry_after() {
    let sim = sim().await;
    let gw = Gateway::start(&config_with(&sim, "tpm = 1000"));
    // 81 + 600 reserved of 1,000: a second one does not fit this minute.
    let r = gw.chat(ask(600)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-remaining-tokens"], "319");
    // Settled at what it used, 6 + 600: still no room for another 81 + 600.
    gw.wait_key_idle("team-a", "the first request settles")
        .await;
    let r = gw.chat(ask(600)).await;
    assert_eq!(r.status(), 429);
    let retry = retry_after(&r);
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(r.headers()["x-ratelimit-limit-tokens"], "1000");
    assert_eq!(r.headers()["x-ratelimit-remaining-tokens"], "394");
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "rate_limit_tokens");
    assert_eq!(e["error"]["type"], "rate_limit_error");
    assert_eq!(e["error"]["param"], Value::Null);
    let message = e["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("API key 'team-a': 1000 tokens per minute")
            && message.contains("lower max_tokens"),
        "{message}"
    );
    // Anthropic's dialect says the same in its own shape.
    let r = gw
        .messages(json!({"model": MODEL, "max_tokens": 600, "messages": [{"role": "user", "content": "Hello"}]}))
        .await;
    assert_eq!(r.status(), 429);
    assert!(retry_after(&r) >= 1);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "rate_limit_error");
    // What still fits passes.
    assert_eq!(gw.chat(ask(300)).await.status(), 200);
    assert_eq!(sim.stats().requests(), 2);
    let text = gw
        .metrics_until(|t| {
            series(
                t,
                r#"tollgate_limit_rejections_total{key="team-a",kind="tokens"}"#,
            ) == Some(2.0)
        })
        .await;
    assert_eq!(
        series(
            &text,
            r#"tollgate_errors_total{code="rate_limit_tokens",model="test/model"}"#
        ),
        Some(2.0),
        "{text}"
    );
}

#[tokio::test]
async fn over_max_concurrent_is_429_concurrency_limit_until_the_slot_is_free() {
    let sim = sim().await;
    let gw = Gateway::start(&config_with(&sim, "max_concurrent = 1"));
    // A stream in prefill for a minute holds the key's one slot: its header has come, so the
    // replica has it.
    let held = gw
        .chat(json!({"model": MODEL, "stream": true, "max_tokens": 3,
            "sim": {"ttft_ms": 60_000},
            "messages": [{"role": "user", "content": "Hello"}]}))
        .await;
    assert_eq!(held.status(), 200);
    assert_eq!(sim.stats().requests(), 1);

    let r = gw.chat(ask(3)).await;
    assert_eq!(r.status(), 429);
    assert!(retry_after(&r) >= 1);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "concurrency_limit");
    assert_eq!(e["error"]["type"], "rate_limit_error");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("API key 'team-a': 1 requests at once"),
        "{e}"
    );
    assert_eq!(sim.stats().requests(), 1, "refused before any replica");

    // The client leaves: the slot is freed when tollgate has ended the request.
    drop(held);
    gw.wait_key_idle("team-a", "the held request ended").await;
    assert_eq!(gw.chat(ask(3)).await.status(), 200);
    let text = gw
        .metrics_until(|t| {
            series(
                t,
                r#"tollgate_limit_rejections_total{key="team-a",kind="concurrency"}"#,
            ) == Some(1.0)
        })
        .await;
    assert_eq!(
        series(
            &text,
            r#"tollgate_errors_total{code="concurrency_limit",model="test/model"}"#
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn a_replica_answering_502_hands_the_request_to_another() {
    let bad_gateway = http_response(
        "502 Bad Gateway",
        "application/json",
        r#"{"error":{"message":"engine restarting","type":"server_error","code":502}}"#,
    );
    let ok = http_response(
        "200 OK",
        "application/json",
        &completion_json("Hello again", 6, 0, 2),
    );
    let replicas = ScriptedReplicas::start(2, vec![bad_gateway, ok]).await;
    let gw = Gateway::start(&standard_config(&replicas.addrs, ""));
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("x-request-id", "retried-502")
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Hello again");
    assert_eq!(v["model"], MODEL);

    let tried = replicas.answered();
    assert_eq!(tried.len(), 2, "{tried:?}");
    assert_ne!(tried[0], tried[1], "the retry goes to the other replica");
    let attempts = |replica: std::net::SocketAddr, outcome: &str| {
        format!(r#"tollgate_upstream_attempts_total{{outcome="{outcome}",replica="{replica}"}}"#)
    };
    let text = gw
        .metrics_until(|t| series(t, &attempts(tried[1], "ok")) == Some(1.0))
        .await;
    assert_eq!(
        series(&text, &attempts(tried[0], "failed")),
        Some(1.0),
        "{text}"
    );
    assert_eq!(series(&text, &attempts(tried[0], "ok")), None, "{text}");
    assert_eq!(series(&text, &attempts(tried[1], "failed")), None, "{text}");
    assert!(!text.contains("tollgate_errors_total{"), "{text}");

    // Billed once, to the replica that answered; logged with both attempts.
    assert_eq!(gw.usage_totals_of(1).await, (1, 6, 2, 0));
    let line = gw.access_line("retried-502").await;
    assert_eq!(line["attempts"], 2, "{line}");
    assert_eq!(line["replica"], tried[1].to_string(), "{line}");
    assert_eq!(line["status"], 200, "{line}");
}

#[tokio::test]
async fn a_replicas_error_keeps_its_status_message_and_string_code_in_the_clients_dialect() {
    // An engine's own error with a string code and a param: kept, in OpenAI's shape.
    let invalid = CannedReplica::answering(
        "400 Bad Request",
        "application/json",
        r#"{"object":"error","message":"temperature must be at most 2","type":"BadRequestError","param":"temperature","code":"invalid_temperature"}"#,
    )
    .await;
    let gw = Gateway::start(&standard_config(&[invalid.addr], ""));
    let r = gw.chat(hello()).await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(
        e,
        json!({"error": {"message": "temperature must be at most 2",
            "type": "invalid_request_error", "param": "temperature",
            "code": "invalid_temperature"}})
    );
    let r = gw
        .messages(json!({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(
        e,
        json!({"type": "error", "error": {"type": "invalid_request_error",
            "message": "temperature must be at most 2"}})
    );

    // A replica's 429 (not retried: only 502 and 503 are) is a rate limit error.
    let limited = CannedReplica::answering(
        "429 Too Many Requests",
        "application/json",
        r#"{"error":"queue full"}"#,
    )
    .await;
    let gw = Gateway::start(&standard_config(&[limited.addr], ""));
    let r = gw.chat(hello()).await;
    assert_eq!(r.status(), 429);
    let e: Value = r.json().await.unwrap();
    assert_eq!(
        e,
        json!({"error": {"message": "queue full", "type": "rate_limit_error",
            "param": null, "code": "replica_error"}})
    );
    assert_eq!(limited.answered(), 1);
}
