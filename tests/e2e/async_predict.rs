//! Async predict: submit → signed webhook → SUCCEEDED, priority order under a busy replica,
//! cancel, capacity, expiry, retries with backoff on 503, sync keeping priority over a deep
//! async queue, a `kill -9` with queued and running work, the payload cap and other keys.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;
use crate::fakes::WebhookSink;

const OTHER_KEY: &str = "tg-test-key-other-team";
const SECRETS: &str = "s3cret-new,s3cret-old";

/// Model `abcd1234`, production on one replica with a concurrency target of 1. `team-a`
/// (`KEY`) and `team-o` (`OTHER_KEY`) may both call it.
fn config(replica: SocketAddr, async_extra: &str) -> String {
    format!(
        r#"[async]
webhook_secret_env = "TG_ASYNC_SECRET"
{async_extra}

[[pools]]
name = "prod"
replicas = ["{replica}"]
max_inflight_per_replica = 1
queue = {{ max_waiting = 64, timeout_ms = 30000 }}

[[deployed_models]]
id = "abcd1234"
environments = {{ production = "dep-a" }}

[[deployed_models.deployments]]
id = "dep-a"
pool = "prod"

[[keys]]
id = "team-a"
sha256 = "{}"
deployed_models = ["abcd1234"]

[[keys]]
id = "team-o"
sha256 = "{}"
deployed_models = ["abcd1234"]
"#,
        sha256_hex(KEY),
        sha256_hex(OTHER_KEY)
    )
}

fn start(replica: SocketAddr, async_extra: &str) -> Gateway {
    Gateway::try_start_with_env(
        &config(replica, async_extra),
        &[("TG_ASYNC_SECRET", SECRETS)],
    )
    .unwrap_or_else(|e| panic!("tollgate did not start: {e}"))
}

fn call(gw: &Gateway, method: reqwest::Method, key: &str, path: &str) -> reqwest::RequestBuilder {
    client()
        .request(method, gw.url(&format!("/model/abcd1234{path}")))
        .header("authorization", format!("Api-Key {key}"))
}

async fn submit(gw: &Gateway, body: Value) -> String {
    let r = call(gw, reqwest::Method::POST, KEY, "/production/async_predict")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    let v: Value = r.json().await.unwrap();
    v["request_id"].as_str().unwrap().to_string()
}

async fn status(gw: &Gateway, id: &str) -> Value {
    let r = call(
        gw,
        reqwest::Method::GET,
        KEY,
        &format!("/async_request/{id}"),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// Polls the request's status until `done` holds for it.
async fn status_until(
    gw: &Gateway,
    id: &str,
    limit: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Deadline::after(limit);
    loop {
        let s = status(gw, id).await;
        if done(&s) {
            return s;
        }
        deadline
            .pause(|| format!("request {id} is still {s}"))
            .await;
    }
}

fn is(status: &'static str) -> impl Fn(&Value) -> bool {
    move |s| s["status"] == status
}

fn hook_url(hook: &WebhookSink) -> String {
    format!("http://{}/hook", hook.addr)
}

/// The next webhook, its signature checked against both secrets.
async fn next_hook(hook: &WebhookSink) -> Value {
    let (headers, body) = hook
        .next(Duration::from_secs(20))
        .await
        .expect("a webhook arrives");
    let sig = headers
        .get("x-tollgate-signature")
        .expect("signed")
        .to_str()
        .unwrap();
    let expected: Vec<String> = SECRETS
        .split(',')
        .map(|s| tollgate::webhook::sign(s, &body))
        .collect();
    assert_eq!(
        sig,
        expected.join(","),
        "one v1= value per secret, each verifies"
    );
    serde_json::from_str(&body).unwrap()
}

/// Holds the replica's one slot with a sync predict of `ms`.
fn hold(gw: &Gateway, ms: u64) -> tokio::task::JoinHandle<u16> {
    let r = call(gw, reqwest::Method::POST, KEY, "/production/predict")
        .header("x-sim-delay-ms", ms.to_string())
        .json(&json!({"hold": true}));
    tokio::spawn(async move { r.send().await.map_or(0, |r| r.status().as_u16()) })
}

async fn wait_predictions(sim: &SimReplica, n: u64) {
    let deadline = Deadline::after(Duration::from_secs(10));
    while sim.stats().predictions() < n {
        deadline.pause(|| format!("{n} predictions expected")).await;
    }
}

#[tokio::test]
async fn submit_runs_and_delivers_a_signed_webhook_seen_only_by_its_key() {
    let sim = sim().await;
    let hook = WebhookSink::start().await;
    let gw = start(sim.addr(), "");
    let id = submit(
        &gw,
        json!({"model_input": {"prompt": "hi"}, "webhook_endpoint": hook_url(&hook)}),
    )
    .await;
    assert_eq!(id.len(), 32);
    let body = next_hook(&hook).await;
    assert_eq!(body["request_id"], id.as_str());
    assert_eq!(body["model_id"], "abcd1234");
    assert_eq!(body["deployment_id"], "dep-a");
    assert_eq!(body["type"], "async_request_completed");
    assert_eq!(
        body["data"],
        json!({"prompt": "hi"}),
        "the sim echoes model_input"
    );
    assert_eq!(body["errors"], json!([]));
    let s = status_until(&gw, &id, Duration::from_secs(5), |s| {
        s["webhook_status"] == "SUCCEEDED"
    })
    .await;
    assert_eq!(s["status"], "SUCCEEDED");
    for field in ["created_at", "status_at"] {
        assert!(s[field].as_str().unwrap().ends_with('Z'), "{s}");
    }
    let out = call(
        &gw,
        reqwest::Method::GET,
        KEY,
        &format!("/async_request/{id}/output"),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(out.status(), 200);
    assert_eq!(out.json::<Value>().await.unwrap(), json!({"prompt": "hi"}));

    // One ledger record, when the request ended, with its time in queue.
    let deadline = Deadline::after(Duration::from_secs(5));
    let rows = loop {
        let rows: Vec<(String, String, i64, Option<f64>, i64)> = gw
            .ledger()
            .prepare("SELECT request_id, surface, status, queue_ms, bytes_out FROM usage")
            .unwrap()
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        if !rows.is_empty() {
            break rows;
        }
        deadline.pause(|| "a ledger record".into()).await;
    };
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (rows[0].0.as_str(), rows[0].1.as_str(), rows[0].2),
        (id.as_str(), "async_predict", 200)
    );
    assert!(rows[0].3.is_some_and(|q| q >= 0.0));
    assert_eq!(rows[0].4, json!({"prompt": "hi"}).to_string().len() as i64);

    let m = gw
        .metrics_until(|m| m.contains("tollgate_async_webhooks_total{result=\"delivered\"} 1"))
        .await;
    assert_eq!(
        series(
            &m,
            "tollgate_async_requests_total{deployment=\"dep-a\",status=\"SUCCEEDED\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        series(
            &m,
            "tollgate_async_time_in_queue_seconds_count{deployment=\"dep-a\"}"
        ),
        Some(1.0)
    );

    // Operators read the queue from its database while tollgate runs.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("async")
            .args(args)
            .arg("-c")
            .arg(gw.config_path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let shown: Value = serde_json::from_str(&cli(&["show", &id])).unwrap();
    assert_eq!(shown["status"], "SUCCEEDED");
    assert_eq!(shown["key_id"], "team-a");
    assert_eq!(shown["webhook_host"], "127.0.0.1");
    assert!(cli(&["list"]).contains(&format!("{id}  SUCCEEDED")));

    // Another key: the request does not exist for it, whatever it asks.
    for (method, path) in [
        (reqwest::Method::GET, format!("/async_request/{id}")),
        (reqwest::Method::DELETE, format!("/async_request/{id}")),
        (reqwest::Method::GET, format!("/async_request/{id}/output")),
    ] {
        let r = call(&gw, method, OTHER_KEY, &path).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert!(r.text().await.unwrap().contains("No async request"));
    }
    let q: Value = call(
        &gw,
        reqwest::Method::GET,
        KEY,
        "/production/async_queue_status",
    )
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(
        q,
        json!({"model_id": "abcd1234", "deployment_id": "dep-a", "num_queued_requests": 0, "num_in_progress_requests": 0})
    );
}

#[tokio::test]
async fn bad_fields_and_large_payloads_are_refused_with_the_reason() {
    let sim = sim().await;
    let gw = start(sim.addr(), "max_payload_bytes = 1024");
    let cases = [
        (json!({"priority": 1}), "model_input is required"),
        (
            json!({"model_input": 1, "priority": 5}),
            "priority must be an integer from 0 to 2",
        ),
        (
            json!({"model_input": 1, "max_time_in_queue_seconds": 5}),
            "max_time_in_queue_seconds must be an integer from 10 to 259200",
        ),
        (
            json!({"model_input": 1, "inference_retry_config": {"max_attempts": 0}}),
            "inference_retry_config.max_attempts must be an integer from 1 to 10",
        ),
        (
            json!({"model_input": 1, "webhook_endpoint": "http://hooks.example.com/x"}),
            "https",
        ),
    ];
    for (body, says) in cases {
        let r = call(&gw, reqwest::Method::POST, KEY, "/production/async_predict")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let e: Value = r.json().await.unwrap();
        assert!(e["error"].as_str().unwrap().contains(says), "{e}");
    }
    let big = json!({"model_input": "x".repeat(2000)}).to_string();
    let r = call(&gw, reqwest::Method::POST, KEY, "/production/async_predict")
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let e: Value = r.json().await.unwrap();
    assert!(
        e["error"].as_str().unwrap().starts_with(&format!(
            "payload size of {} bytes exceeds maximum size of 1024 bytes",
            big.len()
        )),
        "{e}"
    );
    assert_eq!(
        sim.stats().predictions(),
        0,
        "nothing refused reached the replica"
    );
}

#[tokio::test]
async fn priority_orders_a_busy_replicas_queue_and_only_queued_requests_cancel() {
    let sim = sim().await;
    let hook = WebhookSink::start().await;
    let gw = start(sim.addr(), "max_queued = 3");
    sim.set_predict_fault(None, 300);
    let busy = hold(&gw, 700);
    wait_predictions(&sim, 1).await;
    let sub = |priority: u64| json!({"model_input": {"p": priority}, "priority": priority, "webhook_endpoint": hook_url(&hook)});
    let low = submit(&gw, sub(2)).await;
    let doomed = submit(&gw, sub(1)).await;
    let mid = submit(&gw, sub(1)).await;
    // The cap counts queued requests: a fourth is refused.
    let r = call(&gw, reqwest::Method::POST, KEY, "/production/async_predict")
        .json(&sub(0))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.text().await.unwrap().contains("CAPACITY_EXCEEDED"));
    let r: Value = call(
        &gw,
        reqwest::Method::DELETE,
        KEY,
        &format!("/async_request/{doomed}"),
    )
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(r["canceled"], true, "{r}");
    assert_eq!(status(&gw, &doomed).await["status"], "CANCELED");
    assert_eq!(status(&gw, &doomed).await["webhook_status"], "CANCELED");
    let high = submit(&gw, sub(0)).await;

    // Once the sync request ends, the highest priority runs first; cancel it while it runs.
    status_until(&gw, &high, Duration::from_secs(10), is("IN_PROGRESS")).await;
    let r: Value = call(
        &gw,
        reqwest::Method::DELETE,
        KEY,
        &format!("/async_request/{high}"),
    )
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(r["canceled"], false, "{r}");
    assert!(
        r["message"].as_str().unwrap().contains("IN_PROGRESS"),
        "{r}"
    );
    assert_eq!(busy.await.unwrap(), 200);
    let order: Vec<String> = [
        next_hook(&hook).await,
        next_hook(&hook).await,
        next_hook(&hook).await,
    ]
    .iter()
    .map(|b| b["request_id"].as_str().unwrap().to_string())
    .collect();
    assert_eq!(order, [high, mid, low], "priority 0, then 1, then 2");
}

#[tokio::test]
async fn sync_requests_keep_priority_over_a_deep_async_queue() {
    let sim = sim().await;
    let gw = start(sim.addr(), "");
    sim.set_predict_fault(None, 150);
    let busy = hold(&gw, 300);
    wait_predictions(&sim, 1).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(submit(&gw, json!({"model_input": {"i": i}})).await);
    }
    assert_eq!(busy.await.unwrap(), 200);
    // A sync request now waits at most for the async run that holds the slot.
    let started = Instant::now();
    let r = call(&gw, reqwest::Method::POST, KEY, "/production/predict")
        .json(&json!({"sync": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let waited = started.elapsed();
    let q: Value = call(&gw, reqwest::Method::GET, KEY, "/async_queue_status")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        q["num_queued_requests"].as_u64().unwrap() >= 15,
        "the sync request went ahead of the async queue: {q}, after {waited:?}"
    );
    assert!(waited < Duration::from_millis(1500), "{waited:?}");
}

#[tokio::test]
async fn retries_back_off_on_503_and_fail_with_the_code_when_attempts_run_out() {
    let sim = sim().await;
    let hook = WebhookSink::start().await;
    let gw = start(sim.addr(), "");
    sim.set_predict_fault(Some(503), 0);
    let started = Instant::now();
    let id = submit(&gw, json!({"model_input": {"a": 1}, "webhook_endpoint": hook_url(&hook),
        "inference_retry_config": {"max_attempts": 3, "initial_delay_ms": 300, "max_delay_ms": 1000}})).await;
    wait_predictions(&sim, 2).await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the first retry waits initial_delay_ms"
    );
    sim.set_predict_fault(None, 0);
    let body = next_hook(&hook).await;
    assert_eq!(body["request_id"], id.as_str());
    assert_eq!(body["data"], json!({"a": 1}));
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "300 ms, then 600 ms"
    );
    assert_eq!(sim.stats().predictions(), 3);

    sim.set_predict_fault(Some(503), 0);
    let id = submit(
        &gw,
        json!({"model_input": {"a": 2}, "webhook_endpoint": hook_url(&hook),
        "inference_retry_config": {"max_attempts": 2, "initial_delay_ms": 50}}),
    )
    .await;
    let body = next_hook(&hook).await;
    assert_eq!(body["data"], Value::Null);
    assert_eq!(body["errors"][0]["code"], "MODEL_UNAVAILABLE", "{body}");
    let s = status(&gw, &id).await;
    assert_eq!(s["status"], "FAILED");
    assert_eq!(sim.stats().predictions(), 5);
}

#[tokio::test]
async fn a_request_not_started_in_time_expires() {
    let sim = sim().await;
    let hook = WebhookSink::start().await;
    let gw = start(sim.addr(), "");
    let busy = hold(&gw, 11_500);
    wait_predictions(&sim, 1).await;
    let id = submit(&gw, json!({"model_input": 1, "max_time_in_queue_seconds": 10, "webhook_endpoint": hook_url(&hook)})).await;
    let s = status_until(&gw, &id, Duration::from_secs(12), |s| {
        s["status"] != "QUEUED"
    })
    .await;
    assert_eq!(s["status"], "EXPIRED", "{s}");
    let body = next_hook(&hook).await;
    assert_eq!(body["errors"][0]["code"], "EXPIRED");
    assert_eq!(busy.await.unwrap(), 200);
    assert_eq!(
        sim.stats().predictions(),
        1,
        "the expired request never ran"
    );
}

#[tokio::test]
async fn after_kill_9_queued_requests_resume_and_the_running_one_fails() {
    let sim = sim().await;
    let hook = WebhookSink::start().await;
    let gw = start(sim.addr(), "");
    sim.set_predict_fault(None, 1500);
    let running = submit(
        &gw,
        json!({"model_input": {"n": 0}, "webhook_endpoint": hook_url(&hook)}),
    )
    .await;
    status_until(&gw, &running, Duration::from_secs(5), is("IN_PROGRESS")).await;
    let queued = [
        submit(
            &gw,
            json!({"model_input": {"n": 1}, "webhook_endpoint": hook_url(&hook)}),
        )
        .await,
        submit(
            &gw,
            json!({"model_input": {"n": 2}, "webhook_endpoint": hook_url(&hook)}),
        )
        .await,
    ];
    let gw = gw.kill_and_restart();
    sim.set_predict_fault(None, 0);
    let s = status(&gw, &running).await;
    assert_eq!(s["status"], "FAILED", "{s}");
    assert_eq!(s["errors"][0]["code"], "INTERNAL_SERVER_ERROR");
    for id in &queued {
        status_until(&gw, id, Duration::from_secs(10), |s| {
            s["webhook_status"] == "SUCCEEDED"
        })
        .await;
    }
    // Three webhooks: the interrupted one (delivered after the restart) and the two queued.
    let mut seen = Vec::new();
    for _ in 0..3 {
        let b = next_hook(&hook).await;
        seen.push((
            b["request_id"].as_str().unwrap().to_string(),
            b["errors"].clone(),
        ));
    }
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    // Each ended request is one ledger record, the interrupted one too.
    let deadline = Deadline::after(Duration::from_secs(5));
    loop {
        let statuses: Vec<(String, i64)> = gw
            .ledger()
            .prepare("SELECT request_id, status FROM usage WHERE surface = 'async_predict' ORDER BY request_id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        if statuses.len() == 3 {
            assert!(statuses.contains(&(running.clone(), 500)), "{statuses:?}");
            break;
        }
        deadline
            .pause(|| format!("three ledger records, got {statuses:?}"))
            .await;
    }
    let mut expected = vec![
        (
            running.clone(),
            json!([{"code": "INTERNAL_SERVER_ERROR", "message": "tollgate stopped while this request ran; it was not run again"}]),
        ),
        (queued[0].clone(), json!([])),
        (queued[1].clone(), json!([])),
    ];
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn a_reload_keeps_the_queue_and_changes_its_cap() {
    let sim = sim().await;
    let gw = start(sim.addr(), "max_queued = 1");
    let busy = hold(&gw, 1500);
    wait_predictions(&sim, 1).await;
    let first = submit(&gw, json!({"model_input": 1})).await;
    let refused = call(&gw, reqwest::Method::POST, KEY, "/production/async_predict")
        .json(&json!({"model_input": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    let text = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(
        gw.config_path(),
        text.replace("max_queued = 1", "max_queued = 5"),
    )
    .unwrap();
    assert_eq!(gw.reload().await, 200);
    assert_eq!(
        status(&gw, &first).await["status"],
        "QUEUED",
        "the queue survives the reload"
    );
    let second = submit(&gw, json!({"model_input": 2})).await;
    assert_eq!(busy.await.unwrap(), 200);
    for id in [first, second] {
        status_until(&gw, &id, Duration::from_secs(5), is("SUCCEEDED")).await;
    }
}
