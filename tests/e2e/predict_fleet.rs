//! Deployed models with their fleet, limits and accounting: promotion by reload under load,
//! key limits, per-call prices and ledger rows, wake, retries before the body, a client
//! leaving, an aiohttp replica, the demo's predict example, session affinity, and an
//! unreachable fleet.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;

use crate::common::*;
use crate::predict::{deployed_config, error_of, predict, two_replicas, STAGING_KEY};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_by_reload_under_load_fails_no_request() {
    let (prod, dev) = two_replicas().await;
    let server = "[server]\nlisten = \"127.0.0.1:0\"\nreload_on_change = false\n\n";
    let before = format!("{server}{}", deployed_config(prod.addr(), dev.addr(), ""));
    let gw = std::sync::Arc::new(Gateway::start(&before));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (gw, stop, done) = (gw.clone(), stop.clone(), done_tx.clone());
        workers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = predict(&gw, "/production/predict")
                    .header("x-sim-delay-ms", "20")
                    .body("{}")
                    .send()
                    .await;
                let status = r.as_ref().map_or(0, |r| r.status().as_u16());
                let host = r
                    .ok()
                    .and_then(|r| r.headers().get("x-echo-host").cloned())
                    .map(|h| h.to_str().unwrap_or("").to_string());
                seen.push((status, host));
                let _ = done.send(());
            }
            seen
        }));
    }
    for _ in 0..20 {
        done_rx.recv().await;
    }
    // Promotion: production now points at the staging deployment.
    let after = before.replace(
        "production = \"dep-a\", staging = \"dep-b\"",
        "production = \"dep-b\", staging = \"dep-b\"",
    );
    let answer =
        crate::reload::save_and_reload(&gw, &after, crate::reload::Trigger::Post, ("ok", 1.0))
            .await;
    assert_eq!(answer.map(|a| a.0), Some(200));
    let r = predict(&gw, "/production/predict")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["x-echo-host"].to_str().unwrap(),
        dev.addr().to_string()
    );
    for _ in 0..20 {
        done_rx.recv().await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    assert!(all.iter().all(|(s, _)| *s == 200), "{all:?}");
    let (old, new) = (Some(prod.addr().to_string()), Some(dev.addr().to_string()));
    assert!(all.iter().any(|(_, h)| *h == old));
    assert_eq!(
        all.last().unwrap().1,
        new,
        "new requests go to the promoted deployment"
    );
}

#[tokio::test]
async fn key_limits_and_a_per_call_price_apply_and_every_call_is_one_ledger_row() {
    let (prod, dev) = two_replicas().await;
    let config = deployed_config(
        prod.addr(),
        dev.addr(),
        "price = { per_request_usd = 0.002 }",
    )
    .replacen(
        "deployed_models = [\"abcd1234\"]\n",
        "deployed_models = [\"abcd1234\"]\nbudget = { usd = 0.005, period = \"daily\" }\n",
        1,
    )
    .replacen(
        "deployed_models = [\"abcd1234/staging\"]\n",
        "deployed_models = [\"abcd1234/staging\"]\nrpm = 1\n",
        1,
    );
    let gw = Gateway::start(&config);
    // Budget: two calls at $0.002 fit $0.005, a third would not.
    for want in [200, 200, 402] {
        let r = predict(&gw, "/production/predict")
            .body("abc")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), want);
        if want == 402 {
            assert!(error_of(r).await.contains("budget"));
        } else {
            assert_eq!(r.text().await.unwrap(), "abc");
        }
    }
    // rpm = 1 for the staging key: its second call in the minute is refused.
    let staging = |body: &'static str| {
        client()
            .post(gw.url("/model/abcd1234/environments/staging/predict"))
            .header("authorization", format!("Api-Key {STAGING_KEY}"))
            .body(body)
            .send()
    };
    // Read whole: a client that drops the answer unread has left (499).
    let r = staging("hello").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "hello");
    let r = staging("again").await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    error_of(r).await;

    // One row per call that was admitted: key, model, deployment, environment, status,
    // bytes both ways, replica, cost.
    let deadline = Deadline::after(Duration::from_secs(10));
    let rows = loop {
        let db = gw.ledger();
        let mut stmt = db
            .prepare(
                "SELECT key_id, model, surface, deployment, environment, status, bytes_in,
                        bytes_out, replica, cost_nanos, ttft_ms IS NOT NULL
                 FROM usage ORDER BY id",
            )
            .unwrap();
        let rows: Vec<String> = stmt
            .query_map([], |r| {
                Ok(format!(
                    "{} {} {} {} {} {} {} {} {} {} {}",
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, i64>(7)?,
                    r.get::<_, String>(8)?,
                    r.get::<_, i64>(9)?,
                    r.get::<_, bool>(10)?,
                ))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        if rows.len() >= 3 {
            break rows;
        }
        deadline.pause(|| format!("{rows:?}")).await;
    };
    let (p, d) = (prod.addr(), dev.addr());
    // The usage report groups by deployed model (its id) like any model.
    let by: Value = gw.usage("bucket=day&by=key,model").await;
    let mut groups: Vec<String> = by["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["requests"] != 0)
        .map(|r| {
            format!(
                "{} {} {} {}",
                r["key_id"], r["model"], r["requests"], r["cost_usd"]
            )
        })
        .collect();
    groups.sort();
    let want = [
        r#""team-a" "abcd1234" 2 "0.004000""#,
        r#""team-s" "abcd1234" 1 "0.002000""#,
    ];
    assert_eq!(groups, want, "{by}");
    // Metrics and the access log carry the same labels.
    let r = predict(&gw, "/production/predict")
        .header("x-request-id", "pred-1")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 402);
    let line = gw.access_line("pred-1").await;
    assert_eq!(line["model"], "echo-model", "{line}");
    assert_eq!(line["deployment"], "dep-a", "{line}");
    assert_eq!(line["environment"], "production", "{line}");
    let ok = r#"tollgate_requests_total{endpoint="predict",model="echo-model",status_class="2xx"}"#;
    let refused =
        r#"tollgate_requests_total{endpoint="predict",model="echo-model",status_class="4xx"}"#;
    let text = gw.metrics_until(|t| series(t, refused) == Some(3.0)).await;
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("tollgate_requests_total"))
        .collect();
    assert_eq!(series(&text, ok), Some(3.0), "{lines:?}");
    assert!(text.contains("model=\"echo-model\""));
    assert_eq!(
        rows,
        vec![
            format!("team-a abcd1234 predict dep-a production 200 3 3 {p} 2000000 true"),
            format!("team-a abcd1234 predict dep-a production 200 3 3 {p} 2000000 true"),
            format!("team-s abcd1234 predict dep-b staging 200 5 5 {d} 2000000 true"),
        ]
    );
}

#[tokio::test]
async fn wake_runs_its_action_once_and_a_parked_request_completes_when_a_replica_is_up() {
    let replica = SwitchableReplica::start().await;
    replica.fail_health(true);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("woken");
    let wake = format!(
        "wake = {{ command = [\"/bin/sh\", \"-c\", \"echo \\\"$1 $2\\\" >> {}\", \"sh\"], cooldown_ms = 600000 }}\ntimeouts = {{ wake_ms = 30000 }}",
        log.display()
    );
    let config = deployed_config(replica.addr, replica.addr, &wake)
        .replace(
            "[[pools]]\nname = \"dev\"\nreplicas",
            "[[pools]]\nname = \"dev\"\nhealth = { interval_ms = 20 }\nreplicas",
        )
        .replace(
            "[[pools]]\nname = \"prod\"\nreplicas",
            "[[pools]]\nname = \"prod\"\nhealth = { interval_ms = 20 }\nreplicas",
        );
    let gw = Gateway::start(&config);
    // Once the first checks are in, the replica is down: the deployment has none healthy.
    let deadline = Deadline::after(Duration::from_secs(10));
    loop {
        let r = client().get(gw.admin_url("/readyz")).send().await.unwrap();
        let body: Value = r.json().await.unwrap();
        if body["status"] != "starting" {
            break;
        }
        deadline.pause(|| format!("{body}")).await;
    }
    // POST /wake answers at once, and runs the action.
    let r = predict(&gw, "/wake").send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.text().await.unwrap(), "{}");
    let deadline = Deadline::after(Duration::from_secs(10));
    while !std::fs::read_to_string(&log).is_ok_and(|t| t.ends_with('\n')) {
        deadline.pause(|| "the wake action to run".into()).await;
    }
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "abcd1234 dep-a\n");
    // A request now waits for a replica; it wakes the deployment again only after the
    // cooldown, so the action does not run twice.
    let parked = tokio::spawn({
        let url = gw.url("/model/abcd1234/production/predict");
        async move {
            client()
                .post(url)
                .bearer_auth(KEY)
                .body("{}")
                .send()
                .await
                .unwrap()
        }
    });
    let text = gw
        .metrics_until(|t| {
            series(t, "tollgate_queue_waiting_requests{pool=\"prod\"}") == Some(1.0)
                && series(
                    t,
                    "tollgate_wake_actions_total{model=\"echo-model\",outcome=\"ok\"}",
                )
                .is_some()
        })
        .await;
    assert_eq!(
        series(
            &text,
            "tollgate_wake_actions_total{model=\"echo-model\",outcome=\"ok\"}"
        ),
        Some(1.0)
    );
    replica.fail_health(false);
    let r = parked.await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(replica.answered(), 1);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "abcd1234 dep-a\n");
}

/// The aiohttp replica of tests/replica_aiohttp.py, run with the suite's Python (.venv, as
/// scripts/prereqs.sh builds it); killed when dropped.
struct AiohttpReplica {
    child: std::process::Child,
    addr: SocketAddr,
}

impl AiohttpReplica {
    fn start() -> AiohttpReplica {
        use std::io::BufRead;
        let root = env!("CARGO_MANIFEST_DIR");
        let python = format!("{root}/.venv/bin/python");
        let mut child = std::process::Command::new(&python)
            .arg(format!("{root}/tests/replica_aiohttp.py"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{python}: {e}; run scripts/test, which builds .venv (need_sdk_venv)")
            });
        let stdout = child.stdout.take().expect("piped");
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the replica prints its port");
        let port: u16 = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port from the aiohttp replica: {line:?}"));
        AiohttpReplica {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
}

impl Drop for AiohttpReplica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn an_aiohttp_replica_streams_predict_and_serves_sync_routes() {
    let replica = AiohttpReplica::start();
    let gw = Gateway::start(&deployed_config(replica.addr, replica.addr, ""));
    let r = predict(&gw, "/production/predict")
        .body(r#"{"n": 4}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-seen-authorization"], "-");
    assert_eq!(r.headers()["x-seen-forwarded-for"], "127.0.0.1");
    assert_eq!(r.headers()["x-seen-length"], "8");
    let mut stream = r.bytes_stream();
    let mut pieces = Vec::new();
    while let Some(chunk) = stream.next().await {
        pieces.push(chunk.unwrap());
    }
    let text: Vec<u8> = pieces.concat();
    assert_eq!(text, b"part 0\npart 1\npart 2\npart 3\n");
    assert!(pieces.len() > 1, "the answer came in one piece: {pieces:?}");

    let r = client()
        .patch(gw.url("/model/abcd1234/production/sync/v1/models?status=207&a=b"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 207);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["method"], "PATCH");
    assert_eq!(body["query"], "status=207&a=b");
}

#[tokio::test]
async fn the_demo_prints_a_predict_curl_that_works_as_printed() {
    use std::io::BufRead;
    let mut demo = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the demo starts");
    let stdout = demo.stdout.take().expect("piped");
    let lines = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.expect("a line of the banner");
            let last = line.starts_with("Stop with Ctrl-C");
            lines.push(line);
            if last {
                break;
            }
        }
        lines
    })
    .await
    .unwrap();
    let start = lines
        .iter()
        .position(|l| l.starts_with("Deployed model demo1234"))
        .unwrap_or_else(|| panic!("no predict example: {lines:?}"))
        + 1;
    let end = start
        + lines[start..]
            .iter()
            .position(|l| l.trim().is_empty())
            .unwrap();
    let command = lines[start..end].join("\n");
    let out = tokio::process::Command::new("bash")
        .args(["-c", &command])
        .output()
        .await
        .unwrap();
    let _ = demo.kill();
    let _ = demo.wait();
    assert!(out.status.success(), "{command}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        r#"{"prompt": "Hello!"}"#,
        "{command}"
    );
}

#[tokio::test]
async fn a_503_before_any_body_byte_moves_to_another_replica_and_nothing_is_sent_twice() {
    let refusing = CannedReplica::answering("503 Service Unavailable", "text/plain", "busy").await;
    let good = sim().await;
    let pools = format!(
        "[[pools]]\nname = \"prod\"\nreplicas = [\"{}\", \"{}\"]\npolicy = \"round_robin\"\nmax_attempts = 2\nhealth = {{ enabled = false }}\nejection = {{ enabled = false }}\n",
        refusing.addr,
        good.addr()
    );
    let config = deployed_config(good.addr(), good.addr(), "").replacen(
        &format!(
            "[[pools]]\nname = \"prod\"\nreplicas = [\"{}\"]\n",
            good.addr()
        ),
        &pools,
        1,
    );
    let gw = Gateway::start(&config);
    // No body: a refusal is retried on the other replica.
    for _ in 0..4 {
        let r = predict(&gw, "/production/sync/echo/x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert!(
        refusing.answered() >= 1,
        "round robin tried the refusing replica"
    );
    // A body the replica has seen is never sent again: its 503 reaches the client.
    let before = refusing.answered();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let r = predict(&gw, "/production/predict")
            .body("{\"x\": 1}")
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    let refused = statuses.iter().filter(|s| **s == 503).count() as u64;
    assert_eq!(refused, refusing.answered() - before, "{statuses:?}");
    assert!(refused >= 1, "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn a_client_that_leaves_mid_answer_closes_the_replica_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A replica that starts a chunked answer, then waits for its connection to close.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut closed_tx = Some(closed_tx);
        while let Ok((mut s, _)) = listener.accept().await {
            let mut first = [0u8; 4];
            if s.peek(&mut first).await.is_ok_and(|n| n == 4) && &first == b"GET " {
                read_request_body(&mut s).await;
                let _ = s
                    .write_all(http_response("200 OK", "text/plain", "").as_bytes())
                    .await;
                continue;
            }
            read_request_body(&mut s).await;
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n6\r\nfirst\n\r\n";
            s.write_all(head.as_bytes()).await.unwrap();
            let mut buf = [0u8; 64];
            while s.read(&mut buf).await.is_ok_and(|n| n > 0) {}
            if let Some(tx) = closed_tx.take() {
                let _ = tx.send(());
            }
        }
    });
    let gw = Gateway::start(&deployed_config(addr, addr, ""));
    let r = predict(&gw, "/production/predict")
        .body("{}")
        .send()
        .await
        .unwrap();
    let mut stream = r.bytes_stream();
    assert_eq!(stream.next().await.unwrap().unwrap().as_ref(), b"first\n");
    drop(stream);
    tokio::time::timeout(Duration::from_secs(10), closed_rx)
        .await
        .expect("tollgate closed the replica's connection when the client left")
        .unwrap();
}

#[tokio::test]
async fn a_wake_url_is_posted_the_model_and_deployment() {
    let (prod, dev) = two_replicas().await;
    let sink = WebhookSink::start().await;
    let wake = format!("wake = {{ url = \"http://{}/scale\" }}", sink.addr);
    let gw = Gateway::start(&deployed_config(prod.addr(), dev.addr(), &wake));
    let r = predict(&gw, "/environments/staging/wake")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.text().await.unwrap(), "{}");
    let (headers, body) = sink
        .next(Duration::from_secs(10))
        .await
        .expect("the wake URL was called");
    assert_eq!(headers["content-type"], "application/json");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"model": "abcd1234", "deployment": "dep-b"})
    );
    gw.metrics_until(|t| {
        series(
            t,
            "tollgate_wake_actions_total{model=\"echo-model\",outcome=\"ok\"}",
        ) == Some(1.0)
    })
    .await;
}

/// `deployed_config` with production's pool replaced by `pool`, a whole `[[pools]]` table.
fn with_prod_pool(prod: SocketAddr, dev: SocketAddr, pool: &str) -> String {
    deployed_config(prod, dev, "").replacen(
        &format!("[[pools]]\nname = \"prod\"\nreplicas = [\"{prod}\"]\n"),
        pool,
        1,
    )
}

async fn replica_of(r: reqwest::Response) -> String {
    assert_eq!(r.status(), 200);
    r.headers()["x-echo-host"].to_str().unwrap().to_string()
}

#[tokio::test]
async fn a_session_keeps_its_replica_under_the_affinity_policy() {
    let (a, b) = two_replicas().await;
    let pool = format!(
        "[[pools]]\nname = \"prod\"\nreplicas = [\"{}\", \"{}\"]\npolicy = \"affinity\"\n",
        a.addr(),
        b.addr()
    );
    let gw = Gateway::start(&with_prod_pool(a.addr(), b.addr(), &pool));
    let mut homes = std::collections::HashSet::new();
    for _ in 0..8 {
        let r = predict(&gw, "/production/predict")
            .header("x-session-affinity", "conversation-7")
            .body("{}")
            .send()
            .await
            .unwrap();
        homes.insert(replica_of(r).await);
    }
    assert_eq!(homes.len(), 1, "one session, one replica: {homes:?}");
    // Other sessions hash over both replicas: 32 of them all landing on one would take a
    // replica owning almost all of the ring (at 70% of it, the chance is 1 in 90,000).
    let mut seen = std::collections::HashSet::new();
    for i in 0..32 {
        let r = predict(&gw, "/production/predict")
            .header("x-session-affinity", format!("session-{i}"))
            .body("{}")
            .send()
            .await
            .unwrap();
        seen.insert(replica_of(r).await);
    }
    assert_eq!(seen.len(), 2, "sessions spread over the replicas: {seen:?}");
}

#[tokio::test]
async fn an_unreachable_fleet_is_502_in_the_predict_dialect() {
    let dev = sim().await;
    let dead = refused_addr();
    let pool = format!(
        "[[pools]]\nname = \"prod\"\nreplicas = [\"{dead}\"]\nhealth = {{ enabled = false }}\nejection = {{ enabled = false }}\n"
    );
    let gw = Gateway::start(&with_prod_pool(dead, dev.addr(), &pool));
    let r = predict(&gw, "/production/predict")
        .body("{\"x\": 1}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let e = error_of(r).await;
    assert!(e.contains("Could not connect to a replica"), "{e}");
    assert!(e.contains("Retry"), "says what to do: {e}");
    // The other deployment of the same model is unaffected.
    let r = predict(&gw, "/development/predict")
        .body("{}")
        .send()
        .await
        .unwrap();
    replica_of(r).await;
}
