//! Per-request context. Each field says which stage writes it and which read it; a stage never
//! reads what a later stage owns.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Model;
use crate::runtime::Runtime;

/// Which surface a request hit; also the `endpoint` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Models,
    Model,
    Unknown,
}

impl Endpoint {
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Models => "models",
            Endpoint::Model => "model",
            Endpoint::Unknown => "unknown",
        }
    }
}

pub struct RequestCtx {
    /// new_ctx → logging.
    pub started: Instant,
    /// accept (request_filter start) → every response, the upstream request, logging.
    pub request_id: String,
    /// accept → every later stage. The one config snapshot this request uses to its end.
    pub runtime: Option<Arc<Runtime>>,
    /// accept → logging, metrics.
    pub endpoint: Endpoint,
    /// identify → logging.
    pub key_id: Option<String>,
    /// read body → respond (whether the connection can be kept after an early answer).
    pub body_read: bool,
    /// understand → logging.
    pub stream: bool,
    /// route → forward, logging, metrics.
    pub model: Option<Arc<Model>>,
    /// forward → logging.
    pub replica: Option<SocketAddr>,
    /// forward → logging.
    pub attempts: u32,
    /// forward → logging, metrics: time to the replica's response header.
    pub first_byte: Option<Duration>,
    /// respond / forward → logging, metrics. The status the client was sent (499: it left).
    pub status: u16,
    /// respond / forward → logging, metrics. The error code, when the request failed.
    pub error: Option<&'static str>,
}

impl RequestCtx {
    pub fn new() -> Self {
        RequestCtx {
            started: Instant::now(),
            request_id: String::new(),
            runtime: None,
            endpoint: Endpoint::Unknown,
            key_id: None,
            body_read: false,
            stream: false,
            model: None,
            replica: None,
            attempts: 0,
            first_byte: None,
            status: 0,
            error: None,
        }
    }

    /// The model label for metrics and logs: a configured slug, or "-".
    pub fn model_label(&self) -> &str {
        self.model.as_ref().map_or("-", |m| m.slug.as_str())
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        Self::new()
    }
}
