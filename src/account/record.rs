//! One finished request, as the ledger keeps it.

use std::sync::Arc;

use crate::vocab::Usage;

#[derive(Debug, Clone, PartialEq)]
pub struct UsageRecord {
    /// Unique per request (generated, never the client's id): the ledger's idempotency key.
    pub id: String,
    /// The `x-request-id` the client saw.
    pub request_id: String,
    /// Request start, Unix milliseconds.
    pub ts_ms: i64,
    pub key_id: Arc<str>,
    pub model: Arc<str>,
    /// `chat_completions`, `messages`, …
    pub surface: &'static str,
    pub status: u16,
    pub usage: Usage,
    pub cost_nanos: u64,
    /// Some counts were estimated: the request was cut short before the replica reported usage.
    pub estimated: bool,
    pub ttft_ms: Option<f64>,
    pub duration_ms: f64,
    pub replica: Option<Arc<str>>,
    /// Time spent waiting in the pool's queue, if it waited.
    pub queue_ms: Option<f64>,
    /// A deployed model's call: `model` is the deployed model's id.
    pub deployed: Option<DeployedUse>,
}

/// What a deployed model's call adds to its record.
#[derive(Debug, Clone, PartialEq)]
pub struct DeployedUse {
    pub deployment: Arc<str>,
    /// The environment the call named, if its target was one.
    pub environment: Option<Arc<str>>,
    /// Body bytes passed to the replica, and back to the client.
    pub bytes_in: u64,
    pub bytes_out: u64,
}
