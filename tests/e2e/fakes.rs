//! Stand-ins for what tollgate talks to besides the simulated replicas: replicas that answer
//! canned or scripted raw HTTP, and a webhook receiver.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

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

/// Reads one HTTP/1.1 request: its head, then as many body bytes as its content-length
/// says. False if the connection ended first. A health check (`GET`) is answered 200 here
/// and counts as no request, so the fakes script and count only what clients sent.
async fn read_request(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncWriteExt;
    let mut first = [0u8; 4];
    if stream.peek(&mut first).await.is_ok_and(|n| n == 4) && &first == b"GET " {
        // Read before answering: a socket closed with unread input resets the connection.
        read_request_body(stream).await;
        let _ = stream
            .write_all(http_response("200 OK", "text/plain", "").as_bytes())
            .await;
        return false;
    }
    read_request_body(stream).await
}

pub async fn read_request_body(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
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
                return true;
            }
        }
    }
}

/// A raw HTTP/1.1 response with `status`, `content_type` and `body`, framed by
/// content-length, closing the connection.
pub fn http_response(status: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
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
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = answered.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (response, count) = (response.clone(), count.clone());
                tokio::spawn(async move {
                    if !read_request(&mut stream).await {
                        return;
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
        Self::start(http_response(status, content_type, body)).await
    }

    pub fn answered(&self) -> u64 {
        self.answered.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Replicas that answer from one shared script: the n-th request any of them receives gets
/// the n-th response (the last one repeats), then the connection is closed. Whichever
/// replica the router tries first gets the first answer, so "the first attempt fails, the
/// retry succeeds" is scripted without depending on the router's random tie-break.
pub struct ScriptedReplicas {
    pub addrs: Vec<SocketAddr>,
    answered: std::sync::Arc<std::sync::Mutex<Vec<SocketAddr>>>,
}

impl ScriptedReplicas {
    pub async fn start(replicas: usize, script: Vec<String>) -> ScriptedReplicas {
        use tokio::io::AsyncWriteExt;
        assert!(!script.is_empty(), "a script has at least one response");
        let script = std::sync::Arc::new(script);
        let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut addrs = Vec::new();
        for _ in 0..replicas {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            addrs.push(addr);
            let (script, answered) = (script.clone(), answered.clone());
            tokio::spawn(async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    let (script, answered) = (script.clone(), answered.clone());
                    tokio::spawn(async move {
                        if !read_request(&mut stream).await {
                            return;
                        }
                        let response = {
                            let mut answered = answered.lock().unwrap();
                            answered.push(addr);
                            script[(answered.len() - 1).min(script.len() - 1)].clone()
                        };
                        let _ = stream.write_all(response.as_bytes()).await;
                        let _ = stream.shutdown().await;
                    });
                }
            });
        }
        ScriptedReplicas { addrs, answered }
    }

    /// The replica that answered each request so far, in the script's order.
    pub fn answered(&self) -> Vec<SocketAddr> {
        self.answered.lock().unwrap().clone()
    }
}

/// A whole chat completion as an engine answers it: `content`, with usage reporting
/// `prompt` tokens (`cached` of them from the prefix cache) and `completion` tokens.
pub fn completion_json(content: &str, prompt: u64, cached: u64, completion: u64) -> String {
    serde_json::json!({
        "id": "chatcmpl-canned", "object": "chat.completion", "created": 1,
        "model": "served-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
            "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}
    })
    .to_string()
}

/// `tollgate sim` run as its own process, as an operator runs it: one replica on port 0.
pub struct SimProcess {
    child: std::process::Child,
    pub addr: SocketAddr,
}

impl SimProcess {
    /// Starts `tollgate sim --listen 127.0.0.1:0` with `args` added, and waits for its ready
    /// line.
    pub fn start(args: &[&str]) -> SimProcess {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["sim", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tollgate sim starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("tollgate sim prints its ready line");
        let addr = line
            .strip_prefix("sim ready addr=")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("bad ready line: {line}"));
        SimProcess { child, addr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// POSTs `body` to the control path `path` (`/sim/health`, `/sim/reset`) and returns the
    /// switches it answers.
    pub async fn control(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        let resp = crate::common::client()
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("the control path answers");
        assert_eq!(resp.status(), 200, "{path}");
        resp.json().await.expect("JSON switches")
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A replica whose port accepts every connection and resets it at once, as a crashing or
/// restarting server does; it counts the connections it took.
pub struct ResettingReplica {
    pub addr: SocketAddr,
    connections: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl ResettingReplica {
    pub async fn start() -> ResettingReplica {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                // Linger 0: closing sends a reset, not a FIN. (Deprecated because a non-zero
                // linger blocks the dropping thread; zero never does.)
                #[allow(deprecated)]
                let _ = stream.set_linger(Some(Duration::ZERO));
                drop(stream);
            }
        });
        ResettingReplica { addr, connections }
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A replica that answers every chat request with a canned completion and its health check
/// (`GET`) with 200 or, once switched, 503; it counts the chat requests it answered.
pub struct SwitchableReplica {
    pub addr: SocketAddr,
    answered: std::sync::Arc<std::sync::atomic::AtomicU64>,
    failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SwitchableReplica {
    pub async fn start() -> SwitchableReplica {
        use std::sync::atomic::Ordering;
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let failing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (count, fail) = (answered.clone(), failing.clone());
        let ok = http_response(
            "200 OK",
            "application/json",
            &completion_json("hi", 6, 0, 1),
        );
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (count, fail, ok) = (count.clone(), fail.clone(), ok.clone());
                tokio::spawn(async move {
                    let mut first = [0u8; 4];
                    if stream.peek(&mut first).await.is_ok_and(|n| n == 4) && &first == b"GET " {
                        read_request_body(&mut stream).await;
                        let status = if fail.load(Ordering::SeqCst) {
                            "503 Service Unavailable"
                        } else {
                            "200 OK"
                        };
                        let _ = stream
                            .write_all(http_response(status, "text/plain", "").as_bytes())
                            .await;
                        return;
                    }
                    if !read_request_body(&mut stream).await {
                        return;
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = stream.write_all(ok.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        SwitchableReplica {
            addr,
            answered,
            failing,
        }
    }

    /// Makes its health check fail (true) or pass (false).
    pub fn fail_health(&self, fail: bool) {
        self.failing
            .store(fail, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn answered(&self) -> u64 {
        self.answered.load(std::sync::atomic::Ordering::SeqCst)
    }
}
