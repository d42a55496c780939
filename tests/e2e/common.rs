//! Test harness: the real `tollgate` binary on loopback (port 0) in front of in-process
//! simulated replicas. Each test builds its own config; nothing is shared between tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub use crate::fakes::*;
pub use tollgate::sim::{SimOptions, SimReplica};

/// The key most tests use, and one with no access to the test model.
pub const KEY: &str = "tg-test-key-with-access";
pub const NARROW_KEY: &str = "tg-test-key-without-access";
pub const MODEL: &str = "test/model";

pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// `[[keys]]` for `KEY` (every model) and `NARROW_KEY` (only `test/other`).
pub fn standard_keys() -> String {
    format!(
        "[[keys]]\nid = \"team-a\"\nsha256 = \"{}\"\nmodels = [\"*\"]\n\n[[keys]]\nid = \"team-b\"\nsha256 = \"{}\"\nmodels = [\"test/other\"]\n",
        sha256_hex(KEY),
        sha256_hex(NARROW_KEY)
    )
}

/// One pool named `main` over `replicas`, the models `test/model` (served upstream as
/// `served-model`) and `test/other`, and the standard keys. `pool_extra` goes into the pool.
pub fn standard_config(replicas: &[SocketAddr], pool_extra: &str) -> String {
    let list: Vec<String> = replicas.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        r#"[[pools]]
name = "main"
replicas = [{}]
{pool_extra}

[[models]]
slug = "{MODEL}"
pool = "main"
upstream_model = "served-model"
context_tokens = 32768
max_output_tokens = 4096
price = {{ input_per_mtok = 0.5, cached_input_per_mtok = 0.1, output_per_mtok = 1.5 }}
features = ["tools", "json_mode"]

[[models]]
slug = "test/other"
pool = "main"

{}"#,
        list.join(", "),
        standard_keys()
    )
}

/// The standard config with `key_extra` lines added to team-a's `[[keys]]` entry.
pub fn config_with(sim: &SimReplica, key_extra: &str) -> String {
    standard_config(&[sim.addr()], "").replacen(
        "models = [\"*\"]\n",
        &format!("models = [\"*\"]\n{key_extra}\n"),
        1,
    )
}

/// A chat request for the test model: "Hello", which reserves 81 prompt tokens (64 for the
/// template, 8 for the message, "user" and "Hello" at a token a byte) and `max_tokens`; its
/// worst case is 81 × $0.5/M + n × $1.5/M. The replica counts 6.
pub fn ask(max_tokens: u32) -> serde_json::Value {
    serde_json::json!({"model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Hello"}]})
}

pub struct Gateway {
    child: Child,
    env: Vec<(String, String)>,
    pub public: SocketAddr,
    pub admin: SocketAddr,
    dir: tempfile::TempDir,
}

impl Gateway {
    /// Starts `tollgate run` with `body` (pools, models, keys…). Listeners on port 0 are
    /// added unless the text has its own `[server]` / `[admin]` sections.
    pub fn start(body: &str) -> Gateway {
        Self::try_start(body).unwrap_or_else(|e| panic!("tollgate did not start: {e}"))
    }

    pub fn try_start(body: &str) -> Result<Gateway, String> {
        Self::try_start_with_env(body, &[])
    }

    pub fn try_start_with_env(body: &str, env: &[(&str, &str)]) -> Result<Gateway, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let config = dir.path().join("tollgate.toml");
        std::fs::write(&config, Self::full_config(body, dir.path())).map_err(|e| e.to_string())?;
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::spawn(dir, env)
    }

    /// Kills the process with SIGKILL (no flush, no goodbye) and starts it again on the
    /// same config and state directory.
    pub fn kill_and_restart(mut self) -> Gateway {
        self.kill();
        self.restart()
    }

    /// SIGKILL, and wait until the process is gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the process again on the same config and state directory.
    pub fn restart(mut self) -> Gateway {
        let dir = tempfile::TempDir::new().expect("placeholder");
        let dir = std::mem::replace(&mut self.dir, dir);
        Self::spawn(dir, std::mem::take(&mut self.env))
            .unwrap_or_else(|e| panic!("tollgate did not restart: {e}"))
    }

    /// Stops the process gracefully (SIGTERM) and waits for it to exit.
    pub fn stop(&mut self) {
        self.signal("TERM");
        self.wait_exit_blocking();
    }

    /// Stops the process fast (SIGINT: no grace period) and waits for it to exit.
    pub fn interrupt(&mut self) {
        self.signal("INT");
        self.wait_exit_blocking();
    }

    /// Sends `SIG{name}` (`TERM`, `HUP`…) to the process and returns at once.
    pub fn signal(&self, name: &str) {
        let sent = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -{name} failed");
    }

    /// The exit status once the process has exited, or `None` if it still runs after
    /// `within`. Waits without blocking the test's runtime (the replicas may live on it).
    pub async fn exit_within(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("the child can be waited on") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL_PAUSE).await;
        }
    }

    /// Waits for the exit after a stop signal. Grace periods in tests are 0 s; with Pingora's
    /// 5 s runtime shutdown and the 2 s wait for cut requests' records, an exit takes well
    /// under `EXIT_LIMIT`. Past it the process is killed and the test fails.
    fn wait_exit_blocking(&mut self) {
        let deadline = Instant::now() + EXIT_LIMIT;
        loop {
            if self
                .child
                .try_wait()
                .expect("the child can be waited on")
                .is_some()
            {
                return;
            }
            if Instant::now() >= deadline {
                self.kill();
                panic!(
                    "tollgate did not exit within {EXIT_LIMIT:?} of the stop signal; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(POLL_PAUSE);
        }
    }

    fn full_config(body: &str, dir: &std::path::Path) -> String {
        let mut text = String::new();
        if !body.contains("[server]") {
            text.push_str(
                "[server]\nlisten = \"127.0.0.1:0\"\nthreads = 2\ngrace_period_secs = 0\n\n",
            );
        }
        if !body.contains("[admin]") {
            text.push_str("[admin]\nlisten = \"127.0.0.1:0\"\n\n");
        }
        if !body.contains("[state]") {
            text.push_str(&format!("[state]\ndir = {:?}\n\n", dir.join("state")));
        }
        text.push_str(body);
        text
    }

    fn spawn(dir: tempfile::TempDir, env: Vec<(String, String)>) -> Result<Gateway, String> {
        let config = dir.path().join("tollgate.toml");
        let log =
            std::fs::File::create(dir.path().join("stderr.log")).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.arg("run").arg("-c").arg(&config);
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| e.to_string())?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let log =
                    std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
                return Err(format!("no ready line; stderr:\n{log}"));
            }
        };
        let field = |name: &str| -> Result<SocketAddr, String> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| format!("bad ready line: {line}"))
        };
        Ok(Gateway {
            public: field("public=")?,
            admin: field("admin=")?,
            child,
            env,
            dir,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.public, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("tollgate.toml")
    }

    /// The process's resident memory (`VmRSS` in /proc), in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the process is running");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in kB");
        kib * 1024
    }

    /// A POST of `body` to the Anthropic Messages endpoint with `KEY` in `x-api-key`.
    pub async fn messages(&self, body: serde_json::Value) -> reqwest::Response {
        client()
            .post(self.url("/v1/messages"))
            .header("x-api-key", KEY)
            .header("anthropic-version", "2023-06-01")
            .json(&body)
            .send()
            .await
            .expect("request reaches tollgate")
    }

    /// `GET /admin/keys/{id}` as JSON: live use against the key's limits and budget.
    pub async fn key_state(&self, id: &str) -> serde_json::Value {
        let r = client()
            .get(self.admin_url(&format!("/admin/keys/{id}")))
            .send()
            .await
            .expect("admin answers");
        r.json().await.expect("key state is JSON")
    }

    /// Waits until key `id` has no request in flight (its requests have ended and released
    /// their slots), failing the test with `what` if that takes longer than `SETTLE_LIMIT`.
    pub async fn wait_key_idle(&self, id: &str, what: &str) {
        let deadline = Deadline::after(SETTLE_LIMIT);
        loop {
            let key = self.key_state(id).await;
            if key["usage"]["in_flight"] == 0 {
                return;
            }
            deadline.pause(|| format!("{what}: {key}")).await;
        }
    }

    /// `POST /admin/reload`; the status it answers.
    pub async fn reload(&self) -> u16 {
        let r = client()
            .post(self.admin_url("/admin/reload"))
            .send()
            .await
            .expect("admin answers");
        r.status().as_u16()
    }

    /// `GET /admin/usage?{query}` as JSON.
    pub async fn usage(&self, query: &str) -> serde_json::Value {
        let r = client()
            .get(self.admin_url(&format!("/admin/usage?{query}")))
            .send()
            .await
            .expect("admin answers");
        assert_eq!(r.status(), 200);
        r.json().await.expect("usage is JSON")
    }

    /// `GET /metrics`, the Prometheus text.
    pub async fn metrics(&self) -> String {
        client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("admin answers")
            .text()
            .await
            .expect("metrics are text")
    }

    /// `GET /metrics` once `done` holds for its text. Metrics are recorded when tollgate has
    /// finished a request, which can be just after the client read the last byte. Fails
    /// the test, showing the last scrape, if `done` does not hold within `SETTLE_LIMIT`.
    pub async fn metrics_until(&self, done: impl Fn(&str) -> bool) -> String {
        let deadline = Deadline::after(SETTLE_LIMIT);
        loop {
            let text = self.metrics().await;
            if done(&text) {
                return text;
            }
            deadline
                .pause(|| {
                    format!("the metrics never reached the awaited state; last scrape:\n{text}")
                })
                .await;
        }
    }

    /// Totals over the last day: (requests, input, output, estimated requests).
    pub async fn usage_totals(&self) -> (u64, u64, u64, u64) {
        let v = self.usage("bucket=day").await;
        let rows = v["data"].as_array().expect("rows");
        let sum = |f: &str| rows.iter().map(|r| r[f].as_u64().unwrap_or(0)).sum::<u64>();
        (
            sum("requests"),
            sum("input_tokens"),
            sum("output_tokens"),
            sum("estimated_requests"),
        )
    }

    /// `usage_totals` once `requests` requests are recorded (or once `SETTLE_LIMIT` has
    /// passed, for the caller's assertion to show what was there). A request is recorded
    /// when tollgate has finished it, which can be just after the client read the last byte.
    pub async fn usage_totals_of(&self, requests: u64) -> (u64, u64, u64, u64) {
        let deadline = Instant::now() + SETTLE_LIMIT;
        loop {
            let totals = self.usage_totals().await;
            if totals.0 >= requests || Instant::now() > deadline {
                return totals;
            }
            tokio::time::sleep(POLL_PAUSE).await;
        }
    }

    /// The ledger's SQLite file under the state directory, opened straight.
    /// The state directory, which holds the ledger.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn ledger(&self) -> rusqlite::Connection {
        let db = self.dir.path().join("state").join("usage.sqlite");
        rusqlite::Connection::open(db).expect("the ledger opens")
    }

    /// The fields of the access-log line of request `id`, once it is written (just after
    /// the request's ledger record is handed over).
    pub async fn access_line(&self, id: &str) -> serde_json::Value {
        let deadline = Deadline::after(SETTLE_LIMIT);
        loop {
            let log = self.stderr();
            let line = log
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|l| l["target"] == "tollgate::access" && l["fields"]["request_id"] == id);
            if let Some(line) = line {
                return line["fields"].clone();
            }
            deadline
                .pause(|| format!("an access-log line for {id}; stderr:\n{log}"))
                .await;
        }
    }

    /// A POST of `body` to the chat completions endpoint with `KEY`.
    pub async fn chat(&self, body: serde_json::Value) -> reqwest::Response {
        client()
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&body)
            .send()
            .await
            .expect("request reaches tollgate")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long a test waits for something tollgate does after answering (metrics, ledger rows,
/// a reload picked up): far beyond what it takes on a loaded 2-core machine.
pub const SETTLE_LIMIT: Duration = Duration::from_secs(20);

/// How long a stopped process may take to exit (see `Gateway::stop`).
pub const EXIT_LIMIT: Duration = Duration::from_secs(30);

/// The pause between two looks at a condition being polled.
pub const POLL_PAUSE: Duration = Duration::from_millis(10);

/// A limit for polling an observable condition: look, and if it does not hold yet,
/// `deadline.pause(..)` before looking again; past the limit the test fails with the
/// description given.
pub struct Deadline {
    at: Instant,
    limit: Duration,
}

impl Deadline {
    pub fn after(limit: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + limit,
            limit,
        }
    }

    pub fn passed(&self) -> bool {
        Instant::now() >= self.at
    }

    /// Fails the test with `what` (what was awaited, and what was seen) once the limit has
    /// passed; otherwise pauses briefly before the next look.
    pub async fn pause(&self, what: impl FnOnce() -> String) {
        if self.passed() {
            panic!("not within {:?}: {}", self.limit, what());
        }
        tokio::time::sleep(POLL_PAUSE).await;
    }
}

/// The value of the series `line` (its full name and labels) in the metrics text, if present.
pub fn series(text: &str, line: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(line)?.strip_prefix(' ')?.parse().ok())
}

/// Every series of the metric `name` in the metrics text: (labels, value), e.g.
/// (`{key="team-a",kind="budget"}`, 1.0). Histogram parts are the metric `name_count` etc.
pub fn all_series(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = rest.rsplit_once(' ')?;
            if !(labels.is_empty() || labels.starts_with('{')) {
                return None;
            }
            Some((labels.to_string(), value.parse().ok()?))
        })
        .collect()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client builds")
}

pub async fn sim() -> SimReplica {
    SimReplica::start(SimOptions::default())
        .await
        .expect("sim starts")
}

/// A minimal valid chat request for `MODEL`.
pub fn hello() -> serde_json::Value {
    serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "Hello"}]})
}

/// An address that refuses connections: a port bound but never listened on. The socket is
/// kept for the rest of the test process, so the port cannot be handed to another test's
/// listener (a released port can be, and then it answers instead of refusing).
pub fn refused_addr() -> SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind");
    let a = socket.local_addr().expect("addr");
    std::mem::forget(socket);
    a
}

/// Splits an SSE body into the JSON payloads of its `data:` lines.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|ev| ev.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(str::to_string)
        .collect()
}

/// A stream's `data:` payloads end with `[DONE]` and none of them is an error event.
pub fn assert_ran_to_done(events: &[String]) {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    assert!(events.iter().all(|e| !e.contains("error")), "{events:?}");
}
