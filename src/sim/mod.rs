//! The simulated OpenAI-compatible GPU replica that tests, benches and `tollgate demo` run against.
//!
//! A [`SimReplica`] is an HTTP/1.1 keep-alive server that answers the way vLLM does:
//! `POST /v1/chat/completions` (JSON and SSE, usage, tools, reasoning, stop strings),
//! `GET /health`, `GET /v1/models` and a vLLM-style `GET /metrics`. Its output is
//! deterministic, so a test can predict every token and every usage count.
//!
//! Scenarios are chosen per request, never by global state: the proxy forwards unknown body
//! fields untouched, so a test puts a `"sim"` object in the request body and many tests can
//! share one replica in parallel.
//!
//! | `sim` field | effect |
//! |---|---|
//! | `ttft_ms`, `token_delay_ms` | time to first token and between tokens |
//! | `tokens` | natural answer length: ends with `finish_reason: "stop"` when under the limit |
//! | `reasoning_tokens` | emit that many `reasoning_content` tokens before the answer |
//! | `parallel_tools` | call the first two tools instead of one |
//! | `fail_status` | answer at once with that status and an OpenAI-shaped error |
//! | `stall_ms` | wait that long before sending response headers |
//! | `reset_after` | stream: cut the connection after N token chunks; JSON: close it unanswered |
//! | `include_usage_every_chunk` | put a running `usage` object on every chunk |
//! | `no_usage` | report no usage: none in the JSON answer, no usage chunk in a stream |
//!
//! It also serves a Truss-style deployed model, `POST /v1/models/model:predict` and
//! `/echo/…` (see `predict.rs`), for the deployed-model surface.
//!
//! File map: `service` routes requests and writes JSON answers, `scenario` and `request` read
//! the body, `generate` decides the output, `wire` shapes the JSON, `stream` sends SSE,
//! `stats` keeps the ground truth that tests compare the proxy against.

mod generate;
mod predict;
mod request;
mod scenario;
mod service;
mod stats;
mod stream;
#[cfg(test)]
mod tests;
mod wire;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

pub use stats::{RecordedRequest, SimStats};

/// The model name used when [`SimOptions::models`] is empty: listed by `/v1/models`, used as
/// the metrics label and for requests that name no model.
const DEFAULT_MODEL: &str = "tollgate-sim";

/// How a replica behaves when a request does not say otherwise.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Served model names (vLLM `--served-model-name`). Empty accepts any model.
    pub models: Vec<String>,
    /// Delay before the first token.
    pub ttft: Duration,
    /// Delay between tokens.
    pub token_delay: Duration,
    /// Completion length when the request gives neither `max_completion_tokens` nor `max_tokens`.
    pub default_max_tokens: u32,
    /// When set, `/v1/*` requires `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            models: Vec::new(),
            ttft: Duration::ZERO,
            token_delay: Duration::ZERO,
            default_max_tokens: 16,
            api_key: None,
        }
    }
}

/// A running replica. Dropping it stops the server and every connection it holds.
#[derive(Debug)]
pub struct SimReplica {
    addr: SocketAddr,
    stats: Arc<SimStats>,
    accept: JoinHandle<()>,
}

impl SimReplica {
    /// Starts a replica on an ephemeral port of 127.0.0.1.
    pub async fn start(opts: SimOptions) -> io::Result<SimReplica> {
        SimReplica::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), opts).await
    }

    /// Starts a replica on `addr`.
    pub async fn start_on(addr: SocketAddr, opts: SimOptions) -> io::Result<SimReplica> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(SimStats::default());
        let shared = Arc::new(service::Shared::new(opts, stats.clone()));
        let accept = tokio::spawn(accept_loop(listener, shared));
        Ok(SimReplica {
            addr,
            stats,
            accept,
        })
    }

    /// The address the replica listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Counters shared with the running server.
    pub fn stats(&self) -> Arc<SimStats> {
        self.stats.clone()
    }
}

impl Drop for SimReplica {
    fn drop(&mut self) {
        // The connection tasks live in a JoinSet owned by the accept task, so aborting it
        // aborts them too; stream generators then see their body dropped and stop.
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<service::Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    shared.stats.connection_accepted();
                    connections.spawn(serve_connection(stream, shared.clone()));
                }
                Err(err) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %err, "sim replica accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            // Reap finished connections so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(stream: TcpStream, shared: Arc<service::Shared>) {
    // Token chunks are small; do not let Nagle hold them back.
    let _ = stream.set_nodelay(true);
    let svc = service_fn(move |req| service::handle(shared.clone(), req));
    if let Err(err) = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), svc)
        .await
    {
        tracing::debug!(error = %err, "sim replica connection ended");
    }
}
