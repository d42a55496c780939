//! Every metric the README lists, asserted exactly after a scripted mix of outcomes through
//! one gateway, against the ledger where the ledger is the source of truth; and the access
//! log: one line per request, never a prompt or a key.

use std::collections::BTreeMap;

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::common::*;

const PROMPT_MARK: &str = "prompt-marker-5b1e9c";
const SYSTEM_MARK: &str = "system-marker-0d47a2";
/// team-a's daily budget in nano-dollars ($0.005).
const BUDGET_NANOS: i64 = 5_000_000;
const OVERLOADED: &str =
    r#"{"error":{"message":"overloaded","type":"server_error","param":null,"code":503}}"#;

/// `main` is one simulated replica; `flaky` is two replicas whose first answer, whichever
/// is tried first, is a 503 and every later one a 200. team-a may use every model and has a
/// budget; team-b only `test/other`, one request a minute.
fn config(sim: &SimReplica, flaky: &ScriptedReplicas) -> String {
    let price =
        "price = { input_per_mtok = 0.5, cached_input_per_mtok = 0.1, output_per_mtok = 1.5 }";
    format!(
        r#"[[pools]]
name = "main"
replicas = ["{sim}"]

[[pools]]
name = "flaky"
replicas = ["{a}", "{b}"]

[[models]]
slug = "{MODEL}"
pool = "main"
upstream_model = "served-model"
max_output_tokens = 4096
{price}

[[models]]
slug = "test/other"
pool = "main"

[[models]]
slug = "test/flaky"
pool = "flaky"
{price}

[[keys]]
id = "team-a"
sha256 = "{ka}"
models = ["*"]
budget = {{ usd = 0.005, period = "daily" }}

[[keys]]
id = "team-b"
sha256 = "{kb}"
models = ["test/other"]
rpm = 1
"#,
        sim = sim.addr(),
        a = flaky.addrs[0],
        b = flaky.addrs[1],
        ka = sha256_hex(KEY),
        kb = sha256_hex(NARROW_KEY),
    )
}

/// A chat request with the markers in its system and user messages.
fn ask(model: &str, max_tokens: u32) -> Value {
    json!({"model": model, "max_tokens": max_tokens, "messages": [
        {"role": "system", "content": format!("You answer briefly. {SYSTEM_MARK}")},
        {"role": "user", "content": format!("Say hello. {PROMPT_MARK}")}]})
}

async fn send(gw: &Gateway, key: &str, id: &str, body: &Value) -> reqwest::Response {
    client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("x-request-id", id)
        .json(body)
        .send()
        .await
        .expect("request reaches tollgate")
}

/// The series of metric `name` as a map from labels to value.
fn family(text: &str, name: &str) -> BTreeMap<String, f64> {
    all_series(text, name).into_iter().collect()
}

fn expect(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
    pairs.iter().map(|(l, v)| (l.to_string(), *v)).collect()
}

/// USD as Prometheus shows it, in nano-dollars.
fn nanos(usd: f64) -> i64 {
    (usd * 1e9).round() as i64
}

#[tokio::test]
async fn every_listed_metric_is_exact_after_a_scripted_mix() {
    let sim = sim().await;
    let ok = http_response(
        "200 OK",
        "application/json",
        &completion_json("Hi there", 9, 4, 2),
    );
    let busy = http_response("503 Service Unavailable", "application/json", OVERLOADED);
    let flaky = ScriptedReplicas::start(2, vec![busy, ok]).await;
    let gw = Gateway::start(&config(&sim, &flaky));

    // 1. A whole answer.
    let r = send(&gw, KEY, "mix-json", &ask(MODEL, 5)).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    // 2. A stream, with reasoning before the answer.
    let mut body = ask(MODEL, 7);
    body["stream"] = json!(true);
    body["sim"] = json!({"reasoning_tokens": 2});
    let r = send(&gw, KEY, "mix-stream", &body).await;
    assert_eq!(r.status(), 200);
    let mut text = String::new();
    let mut chunks = r.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    let events = sse_data(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    let output_events = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter(|c| {
            let delta = &c["choices"][0]["delta"];
            ["content", "reasoning_content"]
                .iter()
                .any(|f| delta[*f].as_str().is_some_and(|s| !s.is_empty()))
        })
        .count() as f64;
    // 3, 4. team-b's one request of the minute, then a 429.
    let r = send(&gw, NARROW_KEY, "mix-other", &ask("test/other", 3)).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let r = send(&gw, NARROW_KEY, "mix-429", &ask("test/other", 3)).await;
    assert_eq!(r.status(), 429);
    // 5. A worst case ($0.006) past what is left of team-a's $0.005.
    let r = send(&gw, KEY, "mix-402", &ask(MODEL, 4000)).await;
    assert_eq!(r.status(), 402);
    // Every earlier request has settled, so the budget gauges are set last by the next.
    gw.metrics_until(|t| series(t, "tollgate_requests_in_flight") == Some(0.0))
        .await;
    // 6. The first replica tried answers 503; the other answers.
    let r = send(&gw, KEY, "mix-retry", &ask("test/flaky", 4)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap()["usage"]["total_tokens"],
        11
    );
    let tried = flaky.answered();
    assert_eq!(tried.len(), 2, "{tried:?}");
    let (failed, answered) = (tried[0].to_string(), tried[1].to_string());

    // Four requests reached a model: four ledger rows. Then every series has settled.
    assert_eq!(gw.usage_totals_of(4).await.0, 4);
    let text = gw
        .metrics_until(|t| {
            let served: f64 = family(t, "tollgate_requests_total").values().sum();
            served == 6.0
                && series(t, "tollgate_requests_in_flight") == Some(0.0)
                && series(t, "tollgate_ledger_queue_records") == Some(0.0)
        })
        .await;

    let requests = |class: &str, model: &str| {
        format!(r#"{{endpoint="chat_completions",model="{model}",status_class="{class}"}}"#)
    };
    assert_eq!(
        family(&text, "tollgate_requests_total"),
        expect(&[
            (&requests("2xx", "test/flaky"), 1.0),
            (&requests("2xx", MODEL), 2.0),
            (&requests("4xx", MODEL), 1.0),
            (&requests("2xx", "test/other"), 1.0),
            (&requests("4xx", "test/other"), 1.0),
        ]),
        "{text}"
    );
    let by_model = |model: &str| format!(r#"{{endpoint="chat_completions",model="{model}"}}"#);
    assert_eq!(
        family(&text, "tollgate_request_duration_seconds_count"),
        expect(&[
            (&by_model("test/flaky"), 1.0),
            (&by_model(MODEL), 3.0),
            (&by_model("test/other"), 2.0),
        ]),
        "{text}"
    );
    let model = |m: &str| format!(r#"{{model="{m}"}}"#);
    // The replica's header: once per request that got one, after the retry for the retried.
    assert_eq!(
        family(&text, "tollgate_upstream_first_byte_seconds_count"),
        expect(&[
            (&model("test/flaky"), 1.0),
            (&model(MODEL), 2.0),
            (&model("test/other"), 1.0),
        ]),
        "{text}"
    );
    assert_eq!(
        family(&text, "tollgate_errors_total"),
        expect(&[
            (r#"{code="budget_exceeded",model="test/model"}"#, 1.0),
            (r#"{code="rate_limit_requests",model="test/other"}"#, 1.0),
        ]),
        "the 503 that was retried is no error of the request: {text}"
    );
    let attempt =
        |replica: &str, outcome: &str| format!(r#"{{outcome="{outcome}",replica="{replica}"}}"#);
    assert_eq!(
        family(&text, "tollgate_upstream_attempts_total"),
        expect(&[
            (&attempt(&sim.addr().to_string(), "ok"), 3.0),
            (&attempt(&failed, "failed"), 1.0),
            (&attempt(&answered, "ok"), 1.0),
        ]),
        "{text}"
    );
    // Time to first token and the gaps between tokens: streams only.
    assert_eq!(
        family(&text, "tollgate_time_to_first_token_seconds_count"),
        expect(&[
            (&model("test/flaky"), 0.0),
            (&model(MODEL), 1.0),
            (&model("test/other"), 0.0),
        ]),
        "{text}"
    );
    assert_eq!(
        family(&text, "tollgate_inter_token_latency_seconds_count"),
        expect(&[
            (&model("test/flaky"), 0.0),
            (&model(MODEL), output_events - 1.0),
            (&model("test/other"), 0.0),
        ]),
        "one gap between each two of the stream's {output_events} output events: {text}"
    );
    assert_eq!(
        family(&text, "tollgate_limit_rejections_total"),
        expect(&[
            (r#"{key="team-a",kind="budget"}"#, 1.0),
            (r#"{key="team-b",kind="requests"}"#, 1.0),
        ]),
        "{text}"
    );
    assert_eq!(series(&text, "tollgate_ledger_queue_records"), Some(0.0));
    assert_eq!(series(&text, "tollgate_requests_in_flight"), Some(0.0));

    // Tokens: each kind of each key and model equals the ledger's sum.
    let usage = gw.usage("bucket=day&by=key,model").await;
    let mut from_ledger = BTreeMap::new();
    for row in usage["data"].as_array().unwrap() {
        for (kind, field) in [
            ("cached_input", "cached_input_tokens"),
            ("input", "input_tokens"),
            ("output", "output_tokens"),
            ("reasoning", "reasoning_tokens"),
        ] {
            let n = row[field].as_u64().unwrap();
            if n > 0 {
                let labels = format!(
                    r#"{{key="{}",kind="{kind}",model="{}"}}"#,
                    row["key_id"].as_str().unwrap(),
                    row["model"].as_str().unwrap()
                );
                *from_ledger.entry(labels).or_insert(0.0) += n as f64;
            }
        }
    }
    assert_eq!(
        family(&text, "tollgate_tokens_total"),
        from_ledger,
        "{usage}"
    );
    for kind in [
        r#"{key="team-a",kind="cached_input",model="test/flaky"}"#,
        r#"{key="team-a",kind="reasoning",model="test/model"}"#,
    ] {
        assert!(
            from_ledger.contains_key(kind),
            "every kind is covered: {kind}"
        );
    }

    // Spend and the budget: team-a's exact cost in the ledger; team-b's model is free.
    let conn = gw.ledger();
    let spent: i64 = conn
        .query_row(
            "SELECT SUM(cost_nanos) FROM usage WHERE key_id = 'team-a'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(spent > 0);
    let by_key = gw.usage("bucket=day&by=key").await;
    // Rows per day of the last 24 hours, the empty one included.
    let micros: u64 = by_key["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["key_id"] == "team-a")
        .map(|r| r["cost_micros"].as_u64().unwrap())
        .sum();
    assert_eq!(micros as i64, (spent + 500) / 1000, "{by_key}");
    let spend = family(&text, "tollgate_spend_usd_total");
    assert_eq!(spend.keys().collect::<Vec<_>>(), [r#"{key="team-a"}"#]);
    assert_eq!(nanos(spend[r#"{key="team-a"}"#]), spent, "{text}");
    let budget_spent = family(&text, "tollgate_budget_spent_usd");
    assert_eq!(
        budget_spent.keys().collect::<Vec<_>>(),
        [r#"{key="team-a"}"#]
    );
    assert_eq!(nanos(budget_spent[r#"{key="team-a"}"#]), spent, "{text}");
    let remaining = family(&text, "tollgate_budget_remaining_usd");
    assert_eq!(remaining.keys().collect::<Vec<_>>(), [r#"{key="team-a"}"#]);
    assert_eq!(
        nanos(remaining[r#"{key="team-a"}"#]),
        BUDGET_NANOS - spent,
        "{text}"
    );

    // The rows: the four answered requests, the retried one from the replica that answered.
    let mut stmt = conn
        .prepare("SELECT request_id, status, output_tokens, replica FROM usage ORDER BY request_id")
        .unwrap();
    let rows: Vec<(String, i64, i64, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let sim_addr = sim.addr().to_string();
    assert_eq!(
        rows,
        [
            ("mix-json".to_string(), 200, 5, sim_addr.clone()),
            ("mix-other".to_string(), 200, 3, sim_addr.clone()),
            ("mix-retry".to_string(), 200, 2, answered.clone()),
            ("mix-stream".to_string(), 200, 7, sim_addr),
        ]
    );
    assert_eq!(output_events, 7.0, "one stream event per output token");

    // One access-log line per request, with its outcome; never a prompt or a key.
    let log = gw.stderr();
    let access: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["target"] == "tollgate::access")
        .map(|l| l["fields"].clone())
        .collect();
    let outcome = |f: &Value| {
        (
            f["request_id"].as_str().unwrap().to_string(),
            f["status"].as_u64().unwrap(),
            f["error"].as_str().unwrap().to_string(),
            f["attempts"].as_u64().unwrap(),
        )
    };
    // Lines are written as requests end, which need not be the order they were sent in.
    let mut seen: Vec<_> = access.iter().map(outcome).collect();
    seen.sort();
    let line = |id: &str, status: u64, error: &str, attempts: u64| {
        (id.to_string(), status, error.to_string(), attempts)
    };
    assert_eq!(
        seen,
        [
            line("mix-402", 402, "budget_exceeded", 0),
            line("mix-429", 429, "rate_limit_requests", 0),
            line("mix-json", 200, "-", 1),
            line("mix-other", 200, "-", 1),
            line("mix-retry", 200, "-", 2),
            line("mix-stream", 200, "-", 1),
        ],
        "{log}"
    );
    let retried = access
        .iter()
        .find(|f| f["request_id"] == "mix-retry")
        .unwrap();
    assert_eq!(retried["replica"], answered.as_str());
    assert_eq!(retried["key_id"], "team-a");
    assert_eq!(retried["model"], "test/flaky");
    for secret in [PROMPT_MARK, SYSTEM_MARK, KEY, NARROW_KEY] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}
