//! The fleet: health checks, passive ejection, retries of connections that die before an
//! answer, `/readyz` per model, and the replica metrics.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

use crate::common::*;

/// Failed attempts on `replica`, from the metrics.
fn failed_attempts(metrics: &str, replica: SocketAddr) -> f64 {
    series(
        metrics,
        &format!("tollgate_upstream_attempts_total{{outcome=\"failed\",replica=\"{replica}\"}}"),
    )
    .unwrap_or(0.0)
}

fn replica_up(metrics: &str, replica: SocketAddr) -> Option<f64> {
    series(
        metrics,
        &format!("tollgate_replica_up{{pool=\"main\",replica=\"{replica}\"}}"),
    )
}

/// `n` requests, `concurrency` at a time; the statuses the clients saw.
async fn load(gw: &Gateway, body: &Value, n: usize, concurrency: usize) -> Vec<u16> {
    use futures_util::StreamExt;
    futures_util::stream::iter(0..n)
        .map(|_| async { gw.chat(body.clone()).await.status().as_u16() })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

#[tokio::test]
async fn a_replica_that_accepts_and_resets_every_connection_gets_few_attempts() {
    let (bad, good) = (ResettingReplica::start().await, sim().await);
    // No active checks: passive ejection alone must take it out.
    let gw = Gateway::start(&standard_config(
        &[bad.addr, good.addr()],
        "health = { enabled = false }",
    ));
    let statuses = load(&gw, &hello(), 300, 8).await;
    let failed: Vec<_> = statuses.iter().filter(|&&s| s != 200).collect();
    assert!(
        failed.is_empty(),
        "every reset is retried elsewhere: {failed:?}"
    );
    assert_eq!(good.stats().requests(), 300);
    // Three failures in a row eject it; requests already on their way when it was
    // ejected (at most the 8 in flight) may still touch it.
    let touched = bad.connections();
    eprintln!("resetting replica: {touched} connections of 300 requests");
    assert!(
        (3..=3 + 8).contains(&touched),
        "{touched} connections reached the resetting replica"
    );
    let m = gw.metrics().await;
    assert_eq!(
        series(
            &m,
            &format!(
                "tollgate_replica_ejections_total{{pool=\"main\",replica=\"{}\"}}",
                bad.addr
            )
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(replica_up(&m, bad.addr), Some(0.0));
    assert_eq!(replica_up(&m, good.addr()), Some(1.0));
}

/// A `tollgate sim` replica process, killed when dropped.
struct SimProcess {
    child: Child,
    addr: SocketAddr,
}

impl SimProcess {
    fn start() -> SimProcess {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["sim", "--replicas", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("sim starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("ready line");
        let addr = line
            .trim()
            .strip_prefix("sim ready addr=")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("bad sim ready line: {line:?}"));
        SimProcess { child, addr }
    }

    fn kill(&mut self) {
        // SIGKILL: no goodbye on its connections.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test]
async fn a_replica_killed_under_load_is_touched_by_little_more_than_its_requests_in_flight() {
    let (mut doomed, other) = (SimProcess::start(), SimProcess::start());
    let gw = std::sync::Arc::new(Gateway::start(&standard_config(
        &[doomed.addr, other.addr],
        "health = { interval_ms = 100, timeout_ms = 500 }",
    )));
    let mut body = hello();
    body["sim"] = json!({"ttft_ms": 20});
    const CLIENTS: usize = 16;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (gw, body, stop, served) = (gw.clone(), body.clone(), stop.clone(), served.clone());
        clients.push(tokio::spawn(async move {
            let mut failures = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match gw.chat(body.clone()).await.status().as_u16() {
                    200 => {
                        served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    _ => failures += 1,
                }
            }
            failures
        }));
    }
    let wait_served = |n: u64| {
        let served = served.clone();
        async move {
            let deadline = Deadline::after(SETTLE_LIMIT);
            while served.load(std::sync::atomic::Ordering::SeqCst) < n {
                deadline.pause(|| format!("{n} requests served")).await;
            }
        }
    };
    wait_served(100).await;
    doomed.kill();
    let at_kill = served.load(std::sync::atomic::Ordering::SeqCst);
    wait_served(at_kill + 400).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut client_failures = 0;
    for c in clients {
        client_failures += c.await.unwrap();
    }
    let m = gw.metrics().await;
    let failed = failed_attempts(&m, doomed.addr);
    eprintln!("killed replica: {failed} failed attempts, {client_failures} client failures");
    // At most one request per client was in flight on it when it died; a handful more
    // may race the ejection.
    assert!(
        failed <= (CLIENTS + 5) as f64,
        "{failed} failed attempts on the killed replica"
    );
    // Requests it held had heard nothing of an answer: they were retried on the other.
    assert!(client_failures <= CLIENTS as u32, "{client_failures}");
    assert_eq!(replica_up(&m, doomed.addr), Some(0.0), "{m}");
}

#[tokio::test]
async fn a_failing_health_check_takes_traffic_away_and_a_passing_one_brings_it_back() {
    let (a, b) = (
        SwitchableReplica::start().await,
        SwitchableReplica::start().await,
    );
    let gw = Gateway::start(&standard_config(
        &[a.addr, b.addr],
        "health = { interval_ms = 20, unhealthy_after = 2, healthy_after = 2 }",
    ));
    let ready = |gw: &Gateway| {
        let url = gw.admin_url("/readyz");
        async move {
            let r = client().get(url).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    // Ready once the first round of checks is over.
    let deadline = Deadline::after(SETTLE_LIMIT);
    let (status, body) = loop {
        let (status, body) = ready(&gw).await;
        if body["status"] != "starting" {
            break (status, body);
        }
        deadline.pause(|| format!("{body}")).await;
    };
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["models"][MODEL]["healthy_replicas"], 2, "{body}");

    a.fail_health(true);
    gw.metrics_until(|m| replica_up(m, a.addr) == Some(0.0))
        .await;
    let before = a.answered();
    for s in load(&gw, &hello(), 20, 1).await {
        assert_eq!(s, 200);
    }
    assert_eq!(
        a.answered(),
        before,
        "no request goes to an unhealthy replica"
    );
    let (status, body) = ready(&gw).await;
    assert_eq!(status, 200);
    assert_eq!(body["models"][MODEL]["ready"], true);
    assert_eq!(body["models"][MODEL]["healthy_replicas"], 1, "{body}");

    // With no healthy replica the model is not ready, and /readyz says so.
    b.fail_health(true);
    gw.metrics_until(|m| replica_up(m, b.addr) == Some(0.0))
        .await;
    let (status, body) = ready(&gw).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["models"][MODEL]["ready"], false, "{body}");
    assert!(body["error"].as_str().unwrap().contains("healthy replica"));

    a.fail_health(false);
    b.fail_health(false);
    gw.metrics_until(|m| replica_up(m, a.addr) == Some(1.0) && replica_up(m, b.addr) == Some(1.0))
        .await;
    let before = a.answered();
    for s in load(&gw, &hello(), 20, 1).await {
        assert_eq!(s, 200);
    }
    assert!(a.answered() > before, "it takes requests again");
    let m = gw.metrics().await;
    assert!(
        series(
            &m,
            &format!(
                "tollgate_health_check_failures_total{{pool=\"main\",replica=\"{}\"}}",
                a.addr
            )
        )
        .is_some_and(|n| n >= 2.0),
        "{m}"
    );
    assert!(m.contains("tollgate_health_check_seconds_count{pool=\"main\"}"));
}

#[tokio::test]
async fn requests_for_a_pool_with_no_healthy_replica_wait_for_one() {
    let a = SwitchableReplica::start().await;
    a.fail_health(true);
    let gw = Gateway::start(&standard_config(
        &[a.addr],
        "health = { interval_ms = 20, unhealthy_after = 1, healthy_after = 1 }",
    ));
    gw.metrics_until(|m| replica_up(m, a.addr) == Some(0.0))
        .await;
    let waiting = tokio::spawn({
        let url = gw.url("/v1/chat/completions");
        async move {
            client()
                .post(url)
                .bearer_auth(KEY)
                .json(&hello())
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    gw.metrics_until(|m| series(m, "tollgate_queue_waiting_requests{pool=\"main\"}") == Some(1.0))
        .await;
    assert_eq!(a.answered(), 0);
    a.fail_health(false);
    assert_eq!(
        waiting.await.unwrap(),
        200,
        "served once the replica is back"
    );
    assert_eq!(a.answered(), 1);
}

/// Replaces the config file (atomically) with `from` → `to` applied, and reloads it.
async fn reload_with(gw: &Gateway, from: &str, to: &str) {
    let text = std::fs::read_to_string(gw.config_path()).unwrap();
    assert!(text.contains(from), "{from} in {text}");
    let next = gw.config_path().with_extension("next");
    std::fs::write(&next, text.replacen(from, to, 1)).unwrap();
    std::fs::rename(&next, gw.config_path()).unwrap();
    assert_eq!(gw.reload().await, 200);
}

fn list(addrs: &[SocketAddr]) -> String {
    let quoted: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
    format!("replicas = [{}]", quoted.join(", "))
}

#[tokio::test]
async fn a_reload_drains_removed_replicas_probes_added_ones_and_keeps_the_state_of_the_rest() {
    let (leaving, arriving) = (sim().await, sim().await);
    let sick = SwitchableReplica::start().await;
    sick.fail_health(true);
    let dead = ResettingReplica::start().await;
    let gw = Gateway::start(&standard_config(
        &[leaving.addr(), dead.addr],
        "health = { interval_ms = 50, path = \"/health\" }\nejection = { failures = 1, base_ms = 60000 }",
    ));
    // The resetting replica fails its first check and is out.
    gw.metrics_until(|m| replica_up(m, dead.addr) == Some(0.0))
        .await;
    // A stream in flight on the replica about to be removed: it finishes after the reload.
    let mut body = hello();
    body["stream"] = json!(true);
    body["sim"] = json!({"ttft_ms": 400, "tokens": 3});
    let in_flight = gw.chat(body).await;
    assert_eq!(in_flight.status(), 200);
    assert_eq!(leaving.stats().requests(), 1);
    let before_dead = dead.connections();

    reload_with(
        &gw,
        &list(&[leaving.addr(), dead.addr]),
        &list(&[dead.addr, arriving.addr(), sick.addr]),
    )
    .await;
    // The stream on the removed replica completes.
    let text = in_flight.text().await.unwrap();
    assert!(text.contains("[DONE]"), "{text}");
    // New requests: never the removed replica, never the added one that fails its probe,
    // never the one that stayed out.
    for s in load(&gw, &hello(), 20, 2).await {
        assert_eq!(s, 200);
    }
    assert_eq!(leaving.stats().requests(), 1, "drained: nothing new");
    assert_eq!(arriving.stats().requests(), 20);
    assert_eq!(sick.answered(), 0, "probed before it got traffic");
    let m = gw.metrics().await;
    assert_eq!(
        replica_up(&m, dead.addr),
        Some(0.0),
        "its state carried over: {m}"
    );
    assert_eq!(
        replica_up(&m, leaving.addr()),
        None,
        "gone from the metrics"
    );
    // Health checks of the replica that stayed go on; it got no request.
    assert!(dead.connections() >= before_dead);
    let requests_to_dead = failed_attempts(&m, dead.addr);
    assert_eq!(requests_to_dead, 0.0);
}

#[tokio::test]
async fn a_returning_replica_gets_a_small_share_that_ramps_up() {
    let (a, b) = (
        SwitchableReplica::start().await,
        SwitchableReplica::start().await,
    );
    let gw = Gateway::start(&standard_config(
        &[a.addr, b.addr],
        "health = { interval_ms = 20, unhealthy_after = 1, healthy_after = 1 }\nslow_start_ms = 8000",
    ));
    a.fail_health(true);
    gw.metrics_until(|m| replica_up(m, a.addr) == Some(0.0))
        .await;
    a.fail_health(false);
    gw.metrics_until(|m| replica_up(m, a.addr) == Some(1.0))
        .await;
    let returned = std::time::Instant::now();
    // Early in its ramp it weighs a tenth: one request at a time all go to the other.
    let before = a.answered();
    for s in load(&gw, &hello(), 20, 1).await {
        assert_eq!(s, 200);
    }
    if returned.elapsed() < std::time::Duration::from_secs(4) {
        assert_eq!(
            a.answered(),
            before,
            "ramping: no share yet at one at a time"
        );
    }
    // At the end of the ramp it takes its full share again.
    let deadline = Deadline::after(SETTLE_LIMIT);
    while a.answered() == before {
        assert_eq!(gw.chat(hello()).await.status(), 200);
        deadline
            .pause(|| "the returned replica never got traffic".into())
            .await;
    }
    assert!(
        returned.elapsed() >= std::time::Duration::from_millis(7000),
        "traffic came back only with the ramp: {:?}",
        returned.elapsed()
    );
}
