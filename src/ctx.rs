//! Per-request context. Each field says which stage writes it and which read it; a stage never
//! reads what a later stage owns.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::account::{self, Ledger};
use crate::config::{Key, Model};
use crate::limits::Ticket;
use crate::respond::Dialect;
use crate::runtime::Runtime;
use crate::translate::usage::Usage;

/// Which surface a request hit; also the `endpoint` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Messages,
    CountTokens,
    Models,
    Model,
    Unknown,
}

impl Endpoint {
    /// The error dialect of the surface. Outside the two known surfaces (a wrong method or
    /// path, the catalog), a request under `/v1/messages` or one sent with
    /// `anthropic-version` (as the Anthropic SDK does) gets Anthropic's.
    pub fn dialect(self, req: &http::request::Parts) -> Dialect {
        match self {
            Endpoint::Messages | Endpoint::CountTokens => Dialect::Anthropic,
            Endpoint::ChatCompletions => Dialect::OpenAi,
            Endpoint::Models | Endpoint::Model | Endpoint::Unknown => {
                let anthropic = req.uri.path().starts_with("/v1/messages")
                    || req.headers.contains_key("anthropic-version");
                match anthropic {
                    true => Dialect::Anthropic,
                    false => Dialect::OpenAi,
                }
            }
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Messages => "messages",
            Endpoint::CountTokens => "count_tokens",
            Endpoint::Models => "models",
            Endpoint::Model => "model",
            Endpoint::Unknown => "unknown",
        }
    }
}

pub struct RequestCtx {
    /// new_ctx → logging.
    pub started: Instant,
    /// new_ctx → account: the same moment on the wall clock.
    pub started_at: SystemTime,
    /// accept (request_filter start) → every response, the upstream request, logging.
    pub request_id: String,
    /// accept → every later stage. The one config snapshot this request uses to its end.
    pub runtime: Option<Arc<Runtime>>,
    /// accept → logging, metrics.
    pub endpoint: Endpoint,
    /// identify → logging.
    pub key_id: Option<Arc<str>>,
    /// identify → account (budget settlement).
    pub key: Option<Arc<Key>>,
    /// read body → respond (whether the connection can be kept after an early answer).
    pub body_read: bool,
    /// understand → logging.
    pub stream: bool,
    /// route → forward, logging, metrics.
    pub model: Option<Arc<Model>>,
    /// forward → logging.
    pub replica: Option<Arc<str>>,
    /// forward → logging.
    pub attempts: u32,
    /// forward → logging, metrics: time to the replica's response header.
    pub first_byte: Option<Duration>,
    /// forward → account: the status the replica answered with (0: no response header).
    pub upstream_status: u16,
    /// understand → account: the prompt's estimated tokens (used when no usage arrives).
    pub input_estimate: u32,
    /// forward → account: the request reached a replica (it may have spent GPU time).
    pub sent: bool,
    /// forward → account: usage the replica reported, if any.
    pub usage: Option<Usage>,
    /// forward → account: output tokens as estimated from what was relayed, for when the
    /// replica reports no usage.
    pub output_estimate: u64,
    /// forward → account, metrics: time to the first generated token (streams).
    pub first_token: Option<Duration>,
    /// admit → account: the request's reservation against limits and budget.
    pub ticket: Option<Ticket>,
    /// admit → every response header: rate-limit headers and notices.
    pub headers: Vec<(&'static str, String)>,
    /// respond / forward → logging, metrics. The status the client was sent (499: it left).
    pub status: u16,
    /// respond / forward → logging, metrics. The error code, when the request failed.
    pub error: Option<&'static str>,
    /// new_ctx → drop: where a request that never reached `logging` is still recorded.
    pub ledger: Option<Arc<Ledger>>,
    /// logging → drop: `logging` ran (and recorded the request).
    pub logged: bool,
    /// request_filter → logging or drop: counts the request in `tollgate_requests_in_flight`
    /// until its record is handed to the ledger, however it ends (see `Metrics::wait_idle`).
    /// Declared last, so that it drops after everything else in the context.
    pub in_flight: Option<InFlight>,
}

/// One request counted in flight; dropping it uncounts it.
pub struct InFlight(prometheus::IntGauge);

impl InFlight {
    pub fn new(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl RequestCtx {
    pub fn new(ledger: Option<Arc<Ledger>>) -> Self {
        RequestCtx {
            started: Instant::now(),
            started_at: SystemTime::now(),
            request_id: String::new(),
            runtime: None,
            endpoint: Endpoint::Unknown,
            key_id: None,
            key: None,
            body_read: false,
            stream: false,
            model: None,
            replica: None,
            attempts: 0,
            first_byte: None,
            upstream_status: 0,
            input_estimate: 0,
            sent: false,
            usage: None,
            output_estimate: 0,
            first_token: None,
            ticket: None,
            headers: Vec::new(),
            status: 0,
            error: None,
            ledger,
            logged: false,
            in_flight: None,
        }
    }

    /// The model label for metrics and logs: a configured slug, or "-".
    pub fn model_label(&self) -> &str {
        self.model.as_ref().map_or("-", |m| &*m.slug)
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Drop for RequestCtx {
    /// A request whose task was dropped before `logging` (a shutdown past the grace period
    /// cuts whatever still runs) may have used a replica: it is still recorded, estimated.
    fn drop(&mut self) {
        if self.logged {
            return;
        }
        // Settled at the estimate the record carries, not at its worst case.
        let (settled, _) = account::finish(self);
        crate::access_log::line(self, Some("cut_at_shutdown"), &settled);
    }
}
