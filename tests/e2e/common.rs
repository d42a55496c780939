//! Test harness: the real `tollgate` binary on loopback (port 0) in front of in-process
//! simulated replicas. Each test builds its own config; nothing is shared between tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use sha2::{Digest, Sha256};

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
        self.signal("-TERM");
    }

    /// Stops the process fast (SIGINT: no grace period) and waits for it to exit.
    pub fn interrupt(&mut self) {
        self.signal("-INT");
    }

    fn signal(&mut self, which: &str) {
        let _ = Command::new("kill")
            .arg(which)
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
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

    /// `GET /metrics` once `done` holds for its text (or after 200 tries, for the caller's
    /// assertion to show what was there).
    pub async fn metrics_until(&self, done: impl Fn(&str) -> bool) -> String {
        let mut text = String::new();
        for _ in 0..200 {
            text = self.metrics().await;
            if done(&text) {
                break;
            }
            tokio::task::yield_now().await;
        }
        text
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

    /// `usage_totals` once `requests` requests are recorded. A request is recorded when
    /// tollgate has finished it, which can be just after the client read the last byte.
    pub async fn usage_totals_of(&self, requests: u64) -> (u64, u64, u64, u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let totals = self.usage_totals().await;
            if totals.0 >= requests || std::time::Instant::now() > deadline {
                return totals;
            }
            tokio::task::yield_now().await;
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

/// An HTTP endpoint that records the requests it receives (for webhook tests).
pub struct WebhookSink {
    pub addr: SocketAddr,
    rx: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<(http::HeaderMap, String)>>,
}

impl WebhookSink {
    pub async fn start() -> WebhookSink {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let tx = tx.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let bytes = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let _ = tx.send((
                                    parts.headers,
                                    String::from_utf8_lossy(&bytes).into_owned(),
                                ));
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                    http_body_util::Empty::<bytes::Bytes>::new(),
                                ))
                            }
                        },
                    );
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        WebhookSink {
            addr,
            rx: tokio::sync::Mutex::new(rx),
        }
    }

    /// The next request received, or `None` after `timeout`.
    pub async fn next(&self, timeout: Duration) -> Option<(http::HeaderMap, String)> {
        tokio::time::timeout(timeout, self.rx.lock().await.recv())
            .await
            .ok()
            .flatten()
    }
}

/// A replica that answers every request with the same raw HTTP/1.1 response and closes the
/// connection; it counts the requests it answered.
pub struct CannedReplica {
    pub addr: SocketAddr,
    answered: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl CannedReplica {
    pub async fn start(response: String) -> CannedReplica {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = answered.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (response, count) = (response.clone(), count.clone());
                tokio::spawn(async move {
                    // The request: its head, then as many body bytes as its content-length says.
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                        let text = String::from_utf8_lossy(&seen).to_string();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let length: usize = text[..end]
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length: "))
                                .and_then(|v| v.trim().parse().ok())
                                .unwrap_or(0);
                            if seen.len() >= end + 4 + length {
                                break;
                            }
                        }
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        CannedReplica { addr, answered }
    }

    /// A response with `status`, `content_type` and `body`, framed by content-length.
    pub async fn answering(status: &str, content_type: &str, body: &str) -> CannedReplica {
        Self::start(format!(
            "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ))
        .await
    }

    pub fn answered(&self) -> u64 {
        self.answered.load(std::sync::atomic::Ordering::SeqCst)
    }
}
