//! The load generator: keep-alive HTTP/1.1 connections sending one request back to back,
//! each connection keeping its own tally.

use bytes::Bytes;
use http::header::HeaderValue;
use http::header::AUTHORIZATION;
use http::header::CONTENT_LENGTH;
use http::header::CONTENT_TYPE;
use http::header::HOST;
use http::HeaderMap;
use http::Method;
use http::Request;
use http::StatusCode;
use http::Uri;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::sleep;
use tokio::time::timeout_at;
use tokio::time::Instant;
use tollgate::sim::SimReplica;
use tollgate::sim::SimStats;

use super::cpu::{sample_cpu, Watched};
use super::report::Report;
use super::Params;
use super::Variant;
use super::MODEL;
use super::PREDICT_PATH;
use super::STRAGGLER_GRACE;

/// What one connection saw.
#[derive(Default)]
pub(super) struct Tally {
    /// Latencies of successful requests, in microseconds.
    pub(super) latencies: Vec<u32>,
    pub(super) errors: u64,
    pub(super) first_error: Option<String>,
    pub(super) reconnects: u64,
}

impl Tally {
    pub(super) fn error(&mut self, counted: bool, what: String) {
        if counted {
            self.errors += 1;
            self.first_error.get_or_insert(what);
        }
    }

    pub(super) fn absorb(&mut self, other: Tally) {
        self.latencies.extend_from_slice(&other.latencies);
        self.errors += other.errors;
        self.reconnects += other.reconnects;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// The schedule and request shared by every connection of one phase.
pub(super) struct Job {
    pub(super) measure_from: Instant,
    pub(super) end: Instant,
    pub(super) path: &'static str,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
    /// A complete stream ends with this.
    pub(super) stream_end: Option<&'static [u8]>,
}

/// The request every connection of a phase sends, serialised once.
pub(super) struct Payload {
    pub(super) path: &'static str,
    pub(super) body: Bytes,
    pub(super) stream_end: Option<&'static [u8]>,
    /// Headers beyond the usual ones: what a predict request asks of the simulated replica.
    pub(super) headers: Vec<(&'static str, HeaderValue)>,
}

/// What `--prompt-words` repeats: English with some code and numbers.
const PROSE: &str = "The quick brown fox jumps over the lazy dog while fn main() { let total = \
     values.iter().sum::<u64>(); } prints 42 results, and the report explains why each \
     request costs what it does.";

impl Payload {
    /// The request of `variant`: a chat completion, an Anthropic message, or a deployed
    /// model's predict call, addressed to tollgate or, `direct`, to the replica itself.
    pub(super) fn new(params: &Params, variant: Variant, proxied: bool) -> Payload {
        if variant == Variant::Predict {
            return Payload::predict(params, proxied);
        }
        let content = match params.prompt_words {
            0 => "Hello".to_string(),
            n => PROSE
                .split(' ')
                .cycle()
                .take(n as usize)
                .collect::<Vec<_>>()
                .join(" "),
        };
        let mut body = serde_json::json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": params.tokens,
        });
        if params.stream {
            body["stream"] = true.into();
        }
        let (path, stream_end): (&'static str, &'static [u8]) = match variant {
            Variant::Anthropic => (
                "/v1/messages",
                b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
            ),
            _ => ("/v1/chat/completions", b"data: [DONE]\n\n"),
        };
        Payload {
            path,
            body: Bytes::from(body.to_string()),
            stream_end: params.stream.then_some(stream_end),
            headers: Vec::new(),
        }
    }

    /// A Truss-style predict call: a JSON body the replica echoes, or with `--stream` its
    /// chunked generator of `--tokens` chunks.
    fn predict(params: &Params, proxied: bool) -> Payload {
        let path = match proxied {
            true => PREDICT_PATH,
            false => "/v1/models/model:predict",
        };
        let body = serde_json::json!({"prompt": "Hello", "max_new_tokens": params.tokens});
        let mut headers = Vec::new();
        let mut stream_end = None;
        if params.stream {
            headers.push(("x-sim-stream", HeaderValue::from(params.tokens)));
            let last = format!("chunk {}\n", params.tokens - 1);
            stream_end = Some(&*Box::leak(last.into_bytes().into_boxed_slice()));
        }
        Payload {
            path,
            body: Bytes::from(body.to_string()),
            stream_end,
            headers,
        }
    }
}

impl Job {
    /// `payload` sent to `target`.
    pub(super) fn new(
        payload: &Payload,
        target: SocketAddr,
        auth: Option<&HeaderValue>,
        measure_from: Instant,
        end: Instant,
    ) -> Job {
        let body = payload.body.clone();
        let mut headers = HeaderMap::new();
        headers.insert(
            HOST,
            HeaderValue::try_from(target.to_string()).expect("ip:port"),
        );
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        if let Some(auth) = auth {
            headers.insert(AUTHORIZATION, auth.clone());
        }
        for (name, value) in &payload.headers {
            headers.insert(*name, value.clone());
        }
        Job {
            measure_from,
            end,
            path: payload.path,
            headers,
            body,
            stream_end: payload.stream_end,
        }
    }

    pub(super) fn request(&self) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = Uri::from_static(self.path);
        *req.headers_mut() = self.headers.clone();
        req
    }
}

pub(super) async fn measure(
    name: &'static str,
    params: &Params,
    variant: Variant,
    replicas: &[SimReplica],
    targets: &[SocketAddr],
    auth: Option<HeaderValue>,
    watched: Watched,
) -> Report {
    let upstream =
        |count: fn(&SimStats) -> u64| -> u64 { replicas.iter().map(|r| count(&r.stats())).sum() };
    let calls = |s: &SimStats| s.requests() + s.predictions();
    let requests_before = upstream(calls);
    let connections_before = upstream(SimStats::connections);

    let measure_from = Instant::now() + params.warmup;
    let end = measure_from + params.duration;
    let cpu = tokio::spawn(sample_cpu(measure_from, end, watched));
    let mut tasks = JoinSet::new();
    let payload = Payload::new(params, variant, auth.is_some());
    for i in 0..usize::from(params.connections) {
        let target = targets[i % targets.len()];
        let job = Job::new(&payload, target, auth.as_ref(), measure_from, end);
        tasks.spawn(drive(target, job));
    }
    let mut tally = Tally::default();
    while let Some(joined) = tasks.join_next().await {
        tally.absorb(joined.expect("connection task does not panic"));
    }
    tally.latencies.sort_unstable();
    let cpu = cpu.await.ok().flatten();
    Report {
        name,
        tally,
        measured: params.duration,
        upstream_requests: upstream(calls) - requests_before,
        upstream_connections: upstream(SimStats::connections) - connections_before,
        cpu,
    }
}

/// One keep-alive connection sending requests back to back until the end of the phase; a
/// broken connection is replaced and the failed request counted as an error.
pub(super) async fn drive(target: SocketAddr, job: Job) -> Tally {
    let mut tally = Tally {
        latencies: Vec::with_capacity(4096),
        ..Tally::default()
    };
    let deadline = job.end + STRAGGLER_GRACE;
    let mut connects: u64 = 0;
    'connect: while Instant::now() < job.end {
        connects += 1;
        let mut sender = match timeout_at(deadline, connect(target)).await {
            Ok(Ok(sender)) => sender,
            Ok(Err(e)) => {
                tally.error(Instant::now() >= job.measure_from, e);
                // Do not spin on a refused port.
                sleep(Duration::from_millis(10)).await;
                continue;
            }
            Err(_) => break,
        };
        loop {
            if sender.ready().await.is_err() {
                continue 'connect;
            }
            let sent = Instant::now();
            if sent >= job.end {
                break 'connect;
            }
            let outcome = timeout_at(deadline, exchange(&mut sender, &job)).await;
            let done = Instant::now();
            let counted = sent >= job.measure_from;
            match outcome {
                Ok(Ok(())) => {
                    if counted && done <= job.end {
                        let micros = u32::try_from((done - sent).as_micros());
                        tally.latencies.push(micros.unwrap_or(u32::MAX));
                    }
                }
                Ok(Err(Failure::Status(status, text))) => {
                    tally.error(counted, format!("status {status}: {text}"))
                }
                Ok(Err(Failure::Body(what))) => tally.error(counted, what),
                Ok(Err(Failure::Transport(what))) => {
                    tally.error(counted, what);
                    continue 'connect;
                }
                Err(_) => {
                    tally.error(true, "no response within 10 s after the end".into());
                    break 'connect;
                }
            }
        }
    }
    tally.reconnects = connects.saturating_sub(1);
    tally
}

pub(super) async fn connect(target: SocketAddr) -> Result<SendRequest<Full<Bytes>>, String> {
    let stream = TcpStream::connect(target)
        .await
        .map_err(|e| format!("connect {target}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake {target}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

pub(super) enum Failure {
    /// The status and the start of the body, which says why.
    Status(StatusCode, String),
    Body(String),
    Transport(String),
}

/// One request, timed by the caller from the write to the last body byte.
pub(super) async fn exchange(
    sender: &mut SendRequest<Full<Bytes>>,
    job: &Job,
) -> Result<(), Failure> {
    let resp = sender
        .send_request(job.request())
        .await
        .map_err(|e| Failure::Transport(format!("request: {e}")))?;
    let status = resp.status();
    // Read the whole body even for an error status, so the connection can be reused.
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| Failure::Transport(format!("body: {e}")))?
        .to_bytes();
    if status != StatusCode::OK {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        return Err(Failure::Status(status, text));
    }
    if let Some(end) = job.stream_end {
        if !body.ends_with(end) {
            return Err(Failure::Body("stream did not end as it should".into()));
        }
    }
    Ok(())
}
