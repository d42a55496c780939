//! Per-request context: plain state. Each field says which stage writes it and which read it;
//! a stage never reads what a later stage owns. Only orchestration (proxy.rs and the modules
//! it calls) sees the context: stages take and return values.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::account::{self, Bill, DeployedCall, Ledger, Settled};
use crate::config::{Key, Model};
use crate::forward::Outcome;
use crate::limits::{Settlement, Ticket};
use crate::runtime::Runtime;
use crate::vocab::{Endpoint, OwnFields};

pub struct RequestCtx {
    /// new_ctx → logging.
    pub started: Instant,
    /// new_ctx → account: the same moment on the wall clock.
    pub started_at: SystemTime,
    /// accept → every response, the upstream request, logging.
    pub request_id: String,
    /// accept → every later stage. The one config snapshot this request uses to its end.
    pub runtime: Option<Arc<Runtime>>,
    /// accept → logging, metrics.
    pub endpoint: Endpoint,
    /// identify → admit, account, logging.
    pub key: Option<Arc<Key>>,
    /// read body → respond (whether the connection can be kept after an early answer).
    pub body_read: bool,
    /// understand → logging.
    pub stream: bool,
    /// admit → account: the prompt's tokens as counted for the reservation, exact or an
    /// upper bound (billed when no usage arrives).
    pub input_estimate: u32,
    /// route → admit, forward, account, logging, metrics.
    pub model: Option<Arc<Model>>,
    /// admit → account: the request's reservation against limits and budget.
    pub ticket: Option<Ticket>,
    /// admit → account: the most output the replica may generate (its cap times the choices).
    pub output_cap: u64,
    /// admit → every response header: rate-limit headers and notices.
    pub headers: OwnFields,
    /// forward → account, metrics, logging: what the exchange with the replicas did.
    pub outcome: Outcome,
    /// predict (target resolved) → account, metrics, logging: the deployed model, deployment
    /// and environment a call reached.
    pub deployed: Option<DeployedCall>,
    /// predict (async submit) → account: the request's ledger record is written when it
    /// ends, not now.
    pub record_later: bool,
    /// respond / forward → logging, metrics. The status the client was sent (499: it left).
    pub status: u16,
    /// respond / forward → logging, metrics. The error code, when the request failed.
    pub error: Option<&'static str>,
    /// new_ctx → account: where the request's record goes.
    pub ledger: Option<Arc<Ledger>>,
    /// account → the end: the request was accounted (it is never accounted twice).
    pub accounted: bool,
    /// request_filter → the end: counts the request in `tollgate_requests_in_flight` until
    /// its record is handed to the ledger, however it ends (see `Metrics::wait_idle`).
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
            key: None,
            body_read: false,
            stream: false,
            input_estimate: 0,
            model: None,
            ticket: None,
            output_cap: 0,
            headers: Vec::new(),
            outcome: Outcome::default(),
            deployed: None,
            record_later: false,
            status: 0,
            error: None,
            ledger,
            accounted: false,
            in_flight: None,
        }
    }

    /// Stage "account": settles what the request used, hands its record to the ledger and
    /// releases its reservation. Runs once; the context remembers that it ran.
    pub fn account(&mut self) -> (Settled, Option<Settlement>) {
        self.accounted = true;
        if self.status == 0 {
            // Cut while relaying: the status the relay sent, if it sent one.
            self.status = self.outcome.status;
        }
        let ledger = self.ledger.take();
        let ticket = self.ticket.take();
        let bill = Bill {
            endpoint: self.endpoint,
            request_id: &self.request_id,
            started: self.started,
            started_ms: self.started_ms(),
            key_id: self.key.as_ref().map(|k| &k.id),
            model: self.model.as_ref(),
            input_estimate: self.input_estimate,
            output_cap: self.output_cap,
            stream: self.stream,
            status: self.status,
            deployed: self.deployed.as_ref(),
            record_later: self.record_later,
        };
        account::finish(&bill, &self.outcome, ticket, ledger.as_deref())
    }

    /// When the request arrived, in Unix milliseconds: its ledger row's time, and the budget
    /// period its cost belongs to.
    pub fn started_ms(&self) -> i64 {
        self.started_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    }

    /// The model label for metrics and logs: a configured slug, a deployed model's name, or
    /// "-".
    pub fn model_label(&self) -> &str {
        match (&self.model, &self.deployed) {
            (Some(m), _) => &m.slug,
            (None, Some(d)) => &d.model.name,
            (None, None) => "-",
        }
    }

    /// The key label for metrics and logs: a configured key id, or "-".
    pub fn key_label(&self) -> &str {
        self.key.as_ref().map_or("-", |k| &*k.id)
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        Self::new(None)
    }
}
