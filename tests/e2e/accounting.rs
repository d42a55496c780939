//! Accounting: every token counted once against the replica's ground truth, the usage chunk
//! removed unless asked for, cut-short requests estimated, the ledger durable across SIGKILL.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::common::*;

fn chat(stream: bool, include_usage: bool, tokens: u32) -> Value {
    let mut b = json!({"model": MODEL, "max_tokens": tokens, "stream": stream,
        "messages": [{"role": "user", "content": format!("count to {tokens}")}]});
    if include_usage {
        b["stream_options"] = json!({"include_usage": true});
    }
    b
}

#[tokio::test]
async fn ledger_totals_equal_the_replicas_ground_truth() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let mut expected_requests = 0;
    for (i, (stream, usage)) in [
        (false, false),
        (true, false),
        (true, true),
        (false, false),
        (true, true),
    ]
    .into_iter()
    .enumerate()
    {
        let r = gw.chat(chat(stream, usage, 3 + i as u32)).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        expected_requests += 1;
    }
    for (stream, tokens) in [(false, 4), (true, 6)] {
        let r = gw
            .messages(
                json!({"model": MODEL, "max_tokens": tokens, "stream": stream,
                "messages": [{"role": "user", "content": "Hello there"}]}),
            )
            .await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        expected_requests += 1;
    }
    let stats = sim.stats();
    let (requests, input, output, estimated) = gw.usage_totals_of(expected_requests).await;
    assert_eq!(requests, expected_requests);
    assert_eq!(estimated, 0);
    assert_eq!(
        input,
        stats.prompt_tokens(),
        "input tokens match the replica's own count"
    );
    assert_eq!(
        output,
        stats.completion_tokens(),
        "output tokens match the replica's own count"
    );

    let by: Value = gw.usage("bucket=day&by=key,model").await;
    let row = by["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["requests"].as_u64() > Some(0))
        .unwrap();
    assert_eq!(row["key_id"], "team-a");
    assert_eq!(row["model"], MODEL);
    // 0.5 $/Mtok input (cached 0.1), 1.5 $/Mtok output; the simulator reports no cached tokens.
    let cost = (input * 500 + output * 1500 + 500) / 1000;
    assert_eq!(row["cost_micros"].as_u64().unwrap(), cost);
}

#[tokio::test]
async fn the_usage_chunk_is_removed_unless_the_client_asked() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let text = gw.chat(chat(true, false, 3)).await.text().await.unwrap();
    assert_eq!(
        sim.stats().last_request().unwrap().body["stream_options"]["include_usage"],
        true
    );
    let data = sse_data(&text);
    assert_eq!(data.last().unwrap(), "[DONE]");
    assert!(
        !text.contains("\"prompt_tokens\""),
        "no usage reaches a client that did not ask: {text}"
    );
    assert!(data.iter().all(|d| !d.contains("\"choices\":[]")));

    let text = gw.chat(chat(true, true, 3)).await.text().await.unwrap();
    let data = sse_data(&text);
    let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn answers_carry_the_clients_model_name() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let v: Value = gw.chat(chat(false, false, 2)).await.json().await.unwrap();
    assert_eq!(v["model"], MODEL);
    let text = gw.chat(chat(true, true, 2)).await.text().await.unwrap();
    for d in sse_data(&text).iter().filter(|d| *d != "[DONE]") {
        let chunk: Value = serde_json::from_str(d).unwrap();
        assert_eq!(chunk["model"], MODEL, "{d}");
    }
}

#[tokio::test]
async fn a_client_leaving_mid_stream_is_billed_as_estimated_from_what_was_relayed() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let mut body = chat(true, false, 50);
    body["sim"] = json!({"token_delay_ms": 50});
    let r = gw.chat(body).await;
    let mut stream = r.bytes_stream();
    let mut seen = String::new();
    while seen.matches("\"content\":\"").count() < 4 {
        seen.push_str(&String::from_utf8_lossy(
            &stream.next().await.unwrap().unwrap(),
        ));
    }
    drop(stream);
    assert!(sim.stats().wait_cancelled(1, Duration::from_secs(10)).await);
    let generated = sim.stats().completion_tokens();
    // The record is written when tollgate has seen the disconnect.
    let (requests, input, output, estimated) = gw.usage_totals_of(1).await;
    assert_eq!((requests, estimated), (1, 1));
    assert!(input > 0, "input comes from the prompt estimate");
    assert!(
        (3..=generated).contains(&output),
        "output {output} is what was relayed (replica generated {generated})"
    );
}

/// A whole answer takes 5 s; the client leaves once the replica works on it. Nothing was
/// relayed, yet it is billed at its output cap (2 choices × 200), marked estimated, and that
/// is what the key's budget counts: leaving early never makes a request cheaper.
#[tokio::test]
async fn a_whole_answer_the_client_leaves_is_billed_at_its_output_cap() {
    let sim = sim().await;
    let gw = Gateway::start(&config_with(
        &sim,
        "budget = { usd = 10.0, period = \"monthly\" }",
    ));
    let body = json!({"model": MODEL, "max_tokens": 200, "n": 2, "sim": {"ttft_ms": 5000},
        "messages": [{"role": "user", "content": "Hello"}]});
    let asked = tokio::spawn(
        client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .header("x-request-id", "left-early")
            .json(&body)
            .send(),
    );
    let deadline = Deadline::after(SETTLE_LIMIT);
    while sim.stats().requests() < 1 {
        deadline
            .pause(|| "the replica got the request".into())
            .await;
    }
    asked.abort();
    gw.wait_key_idle("team-a", "the cut request ended").await;

    let (requests, input, output, estimated) = gw.usage_totals_of(1).await;
    assert_eq!((requests, output, estimated), (1, 400, 1));
    assert!(input > 0, "input comes from the prompt estimate");
    let (status, cost): (i64, i64) = gw
        .ledger()
        .query_row(
            "SELECT status, cost_nanos FROM usage WHERE request_id = 'left-early'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(status, 499);
    let cost = cost as u64;
    assert_eq!(
        cost,
        input * 500 + 400 * 1_500,
        "$0.5/M input, $1.5/M output"
    );
    let key = gw.key_state("team-a").await;
    let spent = key["budget"]["spent_usd"].as_f64().unwrap();
    assert!((spent - cost as f64 / 1e9).abs() < 1e-12, "{key}");
    assert_eq!(key["budget"]["reserved_usd"], 0.0, "{key}");
}

#[tokio::test]
async fn a_whole_answer_without_usage_is_billed_from_its_text() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let mut body = chat(false, false, 5);
    body["sim"] = json!({"no_usage": true});
    let answer: Value = gw.chat(body).await.json().await.unwrap();
    assert!(answer.get("usage").is_none(), "the replica reported none");
    let text = answer["choices"][0]["message"]["content"].as_str().unwrap();
    let (requests, input, output, estimated) = gw.usage_totals_of(1).await;
    assert_eq!((requests, estimated), (1, 1));
    assert!(input > 0, "input comes from the prompt estimate");
    assert_eq!(output, text.len().div_ceil(4) as u64, "four bytes a token");

    // An Anthropic client is shown the same estimates it is billed.
    let m: Value = gw
        .messages(
            json!({"model": MODEL, "max_tokens": 5, "sim": {"no_usage": true},
            "messages": [{"role": "user", "content": "Hello there"}]}),
        )
        .await
        .json()
        .await
        .unwrap();
    let text = m["content"][0]["text"].as_str().unwrap();
    assert_eq!(m["usage"]["output_tokens"], text.len().div_ceil(4) as u64);
    let (requests, input_after, output_after, estimated) = gw.usage_totals_of(2).await;
    assert_eq!((requests, estimated), (2, 2));
    assert_eq!(m["usage"]["input_tokens"], input_after - input);
    assert_eq!(m["usage"]["output_tokens"], output_after - output);
}

#[tokio::test]
async fn refusals_leave_no_rows_and_replica_errors_bill_nothing() {
    let sim = sim().await;
    let config = standard_config(&[sim.addr()], "").replacen(
        "models = [\"*\"]\n",
        "models = [\"*\"]\nrpm = 3\n",
        1,
    );
    let gw = Gateway::start(&config);
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&hello())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = gw
        .chat(json!({"model": "no/such", "messages": [{"role": "user", "content": "x"}]}))
        .await;
    assert_eq!(r.status(), 404);

    // The replica refuses: the client gets its error and the request costs nothing.
    let mut failing = hello();
    failing["sim"] = json!({"fail_status": 400});
    let r = gw.chat(failing).await;
    assert_eq!(r.status(), 400);
    let mut ok = hello();
    ok["max_tokens"] = json!(4);
    assert_eq!(gw.chat(ok.clone()).await.status(), 200);
    assert_eq!(gw.chat(ok.clone()).await.status(), 200);
    assert_eq!(gw.chat(ok).await.status(), 429, "rpm = 3");

    let (requests, input, output, estimated) = gw.usage_totals_of(3).await;
    assert_eq!(
        (requests, input, output, estimated),
        (3, sim.stats().prompt_tokens(), 8, 0),
        "the two answered requests, and the one the replica refused at no cost"
    );
    assert_eq!(sim.stats().requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_at_most_the_last_moments_and_double_counts_nothing() {
    let sim = sim().await;
    let gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let url = gw.url("/v1/chat/completions");
    // Eight clients send requests with their own ids and note when each one completed.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let (url, stop) = (url.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut done = Vec::new();
            for i in 0.. {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let id = format!("load-{worker}-{i}");
                let r = c
                    .post(&url)
                    .bearer_auth(KEY)
                    .header("x-request-id", &id)
                    .json(&hello())
                    .send()
                    .await;
                let Ok(r) = r else { break };
                if r.status() != 200 || r.bytes().await.is_err() {
                    break;
                }
                done.push((id, std::time::Instant::now()));
            }
            done
        }));
    }
    // Let the load run until a few hundred requests completed, then SIGKILL.
    let deadline = Deadline::after(Duration::from_secs(60));
    while sim.stats().completed() < 300 {
        deadline
            .pause(|| {
                format!(
                    "300 requests completed under load (only {})",
                    sim.stats().completed()
                )
            })
            .await;
    }
    let mut gw = gw;
    gw.kill();
    let killed_at = std::time::Instant::now();
    let gw = gw.restart();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut completed = Vec::new();
    for t in tasks {
        completed.extend(t.await.unwrap());
    }
    let rows: Value = {
        let path = gw
            .config_path()
            .parent()
            .unwrap()
            .join("state")
            .join("usage.sqlite");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args([
                "usage",
                "-c",
                gw.config_path().to_str().unwrap(),
                "--bucket",
                "day",
                "--json",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(path.exists());
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let recorded: u64 = rows["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["requests"].as_u64().unwrap())
        .sum();
    let ids = ledger_request_ids(&gw);
    assert_eq!(ids.len() as u64, recorded, "no request is counted twice");
    // Every request that completed well before the kill (100 ms) is in the ledger.
    let window = Duration::from_millis(100);
    let missing: Vec<_> = completed
        .iter()
        .filter(|(id, at)| killed_at.duration_since(*at) > window && !ids.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "lost {} of {} completed requests",
        missing.len(),
        completed.len()
    );
    assert!(
        recorded as usize <= completed.len() + 8,
        "at most the in-flight ones beyond completions"
    );
}

#[tokio::test]
async fn a_graceful_stop_writes_every_record_before_exiting() {
    let sim = sim().await;
    let mut gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    for i in 0..20 {
        let r = client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .header("x-request-id", format!("stop-{i}"))
            .json(&hello())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // SIGTERM straight after the last answer: the writer's pending window must be flushed.
    gw.stop();
    let ids = ledger_request_ids(&gw);
    assert_eq!(ids.len(), 20, "{ids:?}");
}

#[tokio::test]
async fn a_stream_cut_by_shutdown_is_still_recorded() {
    cut_streams_are_recorded(1, Gateway::stop).await;
}

/// Enough streams that Pingora's workers are still dropping them when it returns.
#[tokio::test]
async fn streams_cut_by_a_fast_stop_are_still_recorded() {
    cut_streams_are_recorded(64, Gateway::interrupt).await;
}

/// Starts `n` streams, stops tollgate with `stop` while each has relayed one token, and
/// checks that every one has its row, billed from what was relayed.
async fn cut_streams_are_recorded(n: usize, stop: fn(&mut Gateway)) {
    let sim = sim().await;
    let mut gw = Gateway::start(&standard_config(&[sim.addr()], ""));
    let mut streams = Vec::new();
    for i in 0..n {
        let r = client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .header("x-request-id", format!("cut-by-shutdown-{i}"))
            .json(&json!({"model": MODEL, "stream": true, "max_tokens": 3,
                "sim": {"token_delay_ms": 60_000},
                "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        let mut body = r.bytes_stream();
        let mut seen = String::new();
        while !seen.contains("\"content\":\"The\"") {
            let chunk = body.next().await.expect("the first token arrives").unwrap();
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
        streams.push(body);
    }
    // The grace period (0 s here, none at all for SIGINT) ends with the streams running.
    stop(&mut gw);
    let log = gw.stderr();
    let conn = gw.ledger();
    for i in 0..n {
        let (output, estimated): (i64, bool) = conn
            .query_row(
                "SELECT output_tokens, estimated FROM usage WHERE request_id = ?1",
                [format!("cut-by-shutdown-{i}")],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap_or_else(|e| panic!("cut request {i} has no row: {e}"));
        let id = format!("\"request_id\":\"cut-by-shutdown-{i}\"");
        assert!(
            log.lines()
                .any(|l| l.contains(&id) && l.contains("\"error\":\"cut_at_shutdown\"")),
            "cut request {i} has its access-log line"
        );
        assert_eq!(
            (output, estimated),
            (1, true),
            "billed from what was relayed"
        );
    }
}

/// Request ids in the ledger, read straight from the SQLite file.
fn ledger_request_ids(gw: &Gateway) -> HashSet<String> {
    let conn = gw.ledger();
    let mut stmt = conn.prepare("SELECT request_id FROM usage").unwrap();
    let ids = stmt.query_map([], |r| r.get::<_, String>(0)).unwrap();
    ids.map(Result::unwrap).collect()
}
