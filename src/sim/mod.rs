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
//! Replica-wide faults are switched at run time instead (`control`): `POST /sim/health` makes
//! `/health` fail, `POST /sim/reset` resets the connection of every model-API request.
//!
//! [`SimOptions`] can make a replica behave like one GPU (`gpu`): batch slots, requests
//! beyond them waiting inside the replica, and a KV prefix cache whose hits are reported as
//! `cached_tokens` and spare their prefill time. The defaults answer at once, unlimited.
//!
//! It also serves a Truss-style deployed model, `POST /v1/models/model:predict` and
//! `/echo/…` (see `predict.rs`), for the deployed-model surface.
//!
//! File map: `service` routes requests and writes JSON answers, `control` holds the switches
//! and the connection that can end in a reset, `gpu` the batch slots and the prefill, `cache`
//! and `blocks` the prefix cache and the prompt's blocks, `scenario` and `request` read
//! the body, `generate` decides the output, `wire` shapes the JSON, `stream` sends SSE,
//! `stats` keeps the ground truth that tests compare the proxy against.

mod blocks;
mod cache;
mod control;
mod generate;
mod gpu;
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
    /// Requests generated at once (vLLM's `--max-num-seqs`); more wait inside the replica,
    /// first come first served. `None`: no limit.
    pub batch_slots: Option<usize>,
    /// Size of the KV prefix cache in tokens; 0 turns it off.
    pub kv_cache_tokens: u64,
    /// Tokens per KV cache block: the unit the prefix cache matches and evicts.
    pub kv_block_tokens: u32,
    /// Time to compute one prompt token not found in the prefix cache, added to the time to
    /// first token.
    pub prefill_per_token: Duration,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            models: Vec::new(),
            ttft: Duration::ZERO,
            token_delay: Duration::ZERO,
            default_max_tokens: 16,
            api_key: None,
            batch_slots: None,
            kv_cache_tokens: 0,
            kv_block_tokens: 16,
            prefill_per_token: Duration::ZERO,
        }
    }
}

/// A running replica. Dropping it stops the server and every connection it holds.
#[derive(Debug)]
pub struct SimReplica {
    addr: SocketAddr,
    stats: Arc<SimStats>,
    shared: Arc<service::Shared>,
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
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(SimReplica {
            addr,
            stats,
            shared,
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

    /// Makes `/health` answer 503 (false) or 200 (true), as `POST /sim/health` does.
    pub fn set_healthy(&self, healthy: bool) {
        self.shared.switches.set_healthy(healthy);
    }

    /// Turns reset mode on or off, as `POST /sim/reset` does: every model-API request has
    /// its connection reset before any byte of an answer.
    pub fn set_resetting(&self, on: bool) {
        self.shared.switches.set_resetting(on);
    }

    /// Makes every predict wait `delay_ms`, then answer `status` (`None`: its own answer),
    /// as `POST /sim/predict` does.
    pub fn set_predict_fault(&self, status: Option<u16>, delay_ms: u64) {
        self.shared.switches.set_predict_fault(status, delay_ms);
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
    let doom = Arc::new(control::Doom::default());
    let conn = control::Connection::new(stream, doom.clone());
    let svc = service_fn(move |req| service::handle(shared.clone(), doom.clone(), req));
    if let Err(err) = http1::Builder::new()
        .serve_connection(TokioIo::new(conn), svc)
        .await
    {
        tracing::debug!(error = %err, "sim replica connection ended");
    }
}
