//! Config reloads by each of the three triggers (SIGHUP, `POST /admin/reload`, a saved file):
//! requests in flight finish on the config they started with, and a file that fails
//! validation is refused, reported, and leaves the running limits in force.

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::common::*;

#[derive(Clone, Copy, Debug)]
pub enum Trigger {
    Hangup,
    Post,
    FileChange,
}

/// The standard config with `key_extra` lines in team-a's entry. The file is watched only
/// for the `FileChange` trigger: otherwise saving the file would reload it a second time.
pub fn config(sim: &SimReplica, trigger: Trigger, key_extra: &str) -> String {
    let watch = matches!(trigger, Trigger::FileChange);
    let body = standard_config(&[sim.addr()], "").replacen(
        "models = [\"*\"]\n",
        &format!("models = [\"*\"]\n{key_extra}\n"),
        1,
    );
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nthreads = 2\ngrace_period_secs = 0\nreload_on_change = {watch}\n\n{body}"
    )
}

const RELOADS_OK: &str = r#"tollgate_config_reloads_total{outcome="ok"}"#;
const RELOADS_REFUSED: &str = r#"tollgate_config_reloads_total{outcome="refused"}"#;

/// Saves `text` as the config file and reloads it with `trigger`; returns once the reload
/// has been counted, as `outcome`, the `nth` time. `POST /admin/reload`'s answer is returned.
pub async fn save_and_reload(
    gw: &Gateway,
    text: &str,
    trigger: Trigger,
    (outcome, nth): (&str, f64),
) -> Option<(u16, Value)> {
    std::fs::write(gw.config_path(), text).unwrap();
    let answer = match trigger {
        Trigger::Hangup => {
            gw.signal("HUP");
            None
        }
        Trigger::Post => {
            let r = client()
                .post(gw.admin_url("/admin/reload"))
                .send()
                .await
                .expect("admin answers");
            Some((r.status().as_u16(), r.json().await.expect("JSON answer")))
        }
        // The file is looked at every second and read once it stayed the same for one look.
        Trigger::FileChange => None,
    };
    let (counted, other) = match outcome {
        "ok" => (RELOADS_OK, RELOADS_REFUSED),
        _ => (RELOADS_REFUSED, RELOADS_OK),
    };
    let text = gw.metrics_until(|t| series(t, counted) == Some(nth)).await;
    assert_eq!(series(&text, other), None, "{trigger:?}: {text}");
    answer
}

#[tokio::test]
async fn a_sighup_reload_lets_requests_in_flight_finish() {
    requests_in_flight_finish_across_a_reload(Trigger::Hangup).await;
}

#[tokio::test]
async fn an_admin_reload_lets_requests_in_flight_finish() {
    requests_in_flight_finish_across_a_reload(Trigger::Post).await;
}

#[tokio::test]
async fn a_saved_file_reload_lets_requests_in_flight_finish() {
    requests_in_flight_finish_across_a_reload(Trigger::FileChange).await;
}

/// A stream and a whole answer are in flight on `test/model` when a reload removes that
/// model (renamed `test/renamed`): both finish in full on the config they started with,
/// and are billed; a request after the reload sees the new config.
async fn requests_in_flight_finish_across_a_reload(trigger: Trigger) {
    let sim = sim().await;
    let gw = Gateway::start(&config(&sim, trigger, ""));
    let original = std::fs::read_to_string(gw.config_path()).unwrap();

    // 120 tokens 50 ms apart: six seconds, far longer than any trigger takes to reload.
    let stream = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("x-request-id", "in-flight-stream")
        .json(&json!({"model": MODEL, "stream": true, "max_tokens": 120,
            "sim": {"token_delay_ms": 50},
            "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let stream = tokio::spawn(async move {
        let mut text = String::new();
        let mut body = stream.bytes_stream();
        while let Some(chunk) = body.next().await {
            text.push_str(&String::from_utf8_lossy(
                &chunk.expect("the stream is not cut"),
            ));
        }
        text
    });
    let whole = tokio::spawn(
        client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .header("x-request-id", "in-flight-answer")
            .json(
                &json!({"model": MODEL, "max_tokens": 5, "sim": {"ttft_ms": 6000},
                "messages": [{"role": "user", "content": "hi"}]}),
            )
            .send(),
    );
    let deadline = Deadline::after(SETTLE_LIMIT);
    while sim.stats().requests() < 2 {
        deadline
            .pause(|| "both requests reached the replica".into())
            .await;
    }

    let renamed = original.replacen("slug = \"test/model\"", "slug = \"test/renamed\"", 1);
    let answer = save_and_reload(&gw, &renamed, trigger, ("ok", 1.0)).await;
    if let Some((status, body)) = answer {
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, json!({"status": "ok", "message": "config reloaded"}));
    }
    assert!(
        !stream.is_finished() && !whole.is_finished(),
        "{trigger:?}: both requests are still in flight after the reload"
    );
    // The new config serves new requests at once.
    assert_eq!(gw.chat(hello()).await.status(), 404, "{trigger:?}");
    let mut renamed_model = hello();
    renamed_model["model"] = json!("test/renamed");
    renamed_model["max_tokens"] = json!(3);
    assert_eq!(gw.chat(renamed_model).await.status(), 200, "{trigger:?}");

    let text = stream.await.unwrap();
    let events = sse_data(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    assert!(events.iter().all(|e| !e.contains("\"error\"")), "{text}");
    let tokens = events
        .iter()
        .filter(|e| e.contains("\"content\":\"") && !e.contains("\"content\":\"\""))
        .count();
    assert_eq!(tokens, 120, "{trigger:?}: {text}");
    let whole = whole.await.unwrap().unwrap();
    assert_eq!(whole.status(), 200, "{trigger:?}");
    let answer: Value = whole.json().await.unwrap();
    assert_eq!(
        answer["model"], MODEL,
        "answered under the name it was asked by"
    );
    assert_eq!(answer["usage"]["completion_tokens"], 5);

    // Billed under the model and price they started with.
    assert_eq!(gw.usage_totals_of(3).await.0, 3, "{trigger:?}");
    let conn = gw.ledger();
    for (id, output) in [("in-flight-stream", 120), ("in-flight-answer", 5)] {
        let (model, status, tokens, cost): (String, i64, i64, i64) = conn
            .query_row(
                "SELECT model, status, output_tokens, cost_nanos FROM usage WHERE request_id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap_or_else(|e| panic!("{trigger:?}: {id} has no ledger row: {e}"));
        assert_eq!(
            (model.as_str(), status, tokens),
            (MODEL, 200, output),
            "{id}"
        );
        assert!(
            cost >= output * 1500,
            "{id}: billed at $1.5/M output: {cost}"
        );
    }
}

#[tokio::test]
async fn a_refused_sighup_reload_keeps_the_running_limits() {
    a_refused_reload_keeps_the_running_limits(Trigger::Hangup).await;
}

#[tokio::test]
async fn a_refused_admin_reload_keeps_the_running_limits() {
    a_refused_reload_keeps_the_running_limits(Trigger::Post).await;
}

#[tokio::test]
async fn a_refused_saved_file_keeps_the_running_limits() {
    a_refused_reload_keeps_the_running_limits(Trigger::FileChange).await;
}

/// rpm = 2, then a file that would raise it to 100 but names a pool that does not exist:
/// refused, reported, and the third request of the minute is still a 429.
async fn a_refused_reload_keeps_the_running_limits(trigger: Trigger) {
    let sim = sim().await;
    let gw = Gateway::start(&config(&sim, trigger, "rpm = 2"));
    let original = std::fs::read_to_string(gw.config_path()).unwrap();
    let mut ask = hello();
    ask["max_tokens"] = json!(3);
    for _ in 0..2 {
        assert_eq!(gw.chat(ask.clone()).await.status(), 200);
    }

    let invalid = original.replacen("rpm = 2", "rpm = 100", 1).replacen(
        "pool = \"main\"",
        "pool = \"nowhere\"",
        1,
    );
    let problem = "models[0].pool: \"nowhere\" is not a defined pool";
    let answer = save_and_reload(&gw, &invalid, trigger, ("refused", 1.0)).await;
    if let Some((status, body)) = answer {
        assert_eq!(status, 400, "{body}");
        let message = body["error"].as_str().unwrap_or_default();
        assert!(message.contains(problem), "{body}");
    }
    // Logged with its reason, just after it is counted.
    let logged = problem.replace('"', "\\\"");
    let deadline = Deadline::after(SETTLE_LIMIT);
    loop {
        let log = gw.stderr();
        if log
            .lines()
            .any(|l| l.contains("config reload refused") && l.contains(&logged))
        {
            break;
        }
        deadline
            .pause(|| format!("{trigger:?}: the refusal is logged with its reason:\n{log}"))
            .await;
    }

    let r = gw.chat(ask.clone()).await;
    assert_eq!(r.status(), 429, "{trigger:?}: rpm = 2 still holds");
    assert_eq!(r.headers()["x-ratelimit-limit-requests"], "2");
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "rate_limit_requests");
    let key = gw.key_state("team-a").await;
    assert_eq!(key["limits"]["rpm"], 2, "{key}");
    assert_eq!(sim.stats().requests(), 2);
}
