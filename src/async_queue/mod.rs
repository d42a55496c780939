//! Async predict: requests submitted now and run later on a deployment's replicas, with a
//! durable queue, status, cancel and signed result webhooks.
//!
//! ```text
//! submit ─▶ parse (request.rs) ─▶ durable insert (store.rs, acked before the 202)
//!        ─▶ board (board.rs: the in-memory queue, by deployment, priority then FIFO)
//! dispatcher (dispatch.rs, orchestration) ─▶ take when the pool has spare room ─▶ run
//!        ─▶ finish (store, board) ─▶ webhook (webhook.rs, spawned)
//! ```
//!
//! The database is the truth across restarts; the board is what the routes and the
//! dispatcher read while tollgate runs, rebuilt from the database at start.

mod board;
mod meters;
mod request;
mod store;

use std::fmt;

pub use board::{Board, Cancel, Line};
pub use meters::AsyncMeters;
pub use request::{parse, Retry, Submit};
pub use store::{read_all, Store, FILE_NAME};

/// Where a request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Queued,
    InProgress,
    Succeeded,
    Failed,
    Expired,
    Canceled,
    WebhookFailed,
}

impl Status {
    pub const ALL: [Status; 7] = [
        Status::Queued,
        Status::InProgress,
        Status::Succeeded,
        Status::Failed,
        Status::Expired,
        Status::Canceled,
        Status::WebhookFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "QUEUED",
            Status::InProgress => "IN_PROGRESS",
            Status::Succeeded => "SUCCEEDED",
            Status::Failed => "FAILED",
            Status::Expired => "EXPIRED",
            Status::Canceled => "CANCELED",
            Status::WebhookFailed => "WEBHOOK_FAILED",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        !matches!(self, Status::Queued | Status::InProgress)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a request's result webhook is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookStatus {
    Pending,
    Succeeded,
    Failed,
    Canceled,
    NoWebhookProvided,
}

impl WebhookStatus {
    pub const ALL: [WebhookStatus; 5] = [
        WebhookStatus::Pending,
        WebhookStatus::Succeeded,
        WebhookStatus::Failed,
        WebhookStatus::Canceled,
        WebhookStatus::NoWebhookProvided,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WebhookStatus::Pending => "PENDING",
            WebhookStatus::Succeeded => "SUCCEEDED",
            WebhookStatus::Failed => "FAILED",
            WebhookStatus::Canceled => "CANCELED",
            WebhookStatus::NoWebhookProvided => "NO_WEBHOOK_PROVIDED",
        }
    }

    pub fn parse(s: &str) -> Option<WebhookStatus> {
        WebhookStatus::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// An error in a request's `errors`: a code of the API we mirror and a message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JobError {
    pub code: String,
    pub message: String,
}

impl JobError {
    pub fn new(code: &str, message: impl Into<String>) -> JobError {
        JobError {
            code: code.to_string(),
            message: message.into(),
        }
    }
}

/// One async request, without its input and output (those stay in the database).
#[derive(Debug, Clone)]
pub struct Job {
    /// 32 hex digits, random: unguessable, so a request id alone reveals nothing.
    pub id: String,
    /// Order of submission, for first in first out within a priority.
    pub seq: u64,
    pub model: String,
    pub deployment: String,
    /// The key that submitted it: the only one that may read or cancel it.
    pub key_id: String,
    pub priority: u8,
    pub created_ms: i64,
    pub status: Status,
    pub status_ms: i64,
    /// A queued request not started by then expires.
    pub expires_ms: i64,
    pub webhook: Option<String>,
    pub webhook_status: WebhookStatus,
    pub retry: Retry,
    pub errors: Vec<JobError>,
    /// When it started running (for time in queue and run time).
    pub started_ms: Option<i64>,
    pub attempts: u32,
    /// Its output is kept, readable at `/async_request/{id}/output`.
    pub has_output: bool,
}

impl Job {
    /// The status answer of `GET /async_request/{id}`.
    pub fn status_json(&self) -> serde_json::Value {
        serde_json::json!({
            "request_id": self.id,
            "model_id": self.model,
            "deployment_id": self.deployment,
            "status": self.status.as_str(),
            "webhook_status": self.webhook_status.as_str(),
            "created_at": rfc3339(self.created_ms),
            "status_at": rfc3339(self.status_ms),
            "errors": self.errors,
        })
    }
}

/// Unix milliseconds as RFC 3339 UTC with milliseconds.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// A fresh request id: 128 random bits in hex.
pub fn new_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// Why an async route refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AsyncError {
    /// A field of the submit body is missing, of the wrong type or out of range.
    BadField { message: String },
    /// The submit body is over `async.max_payload_bytes`.
    TooLarge { size: u64, limit: u64 },
    /// The deployment already queues `max` requests.
    CapacityExceeded { deployment: String, max: u64 },
    /// No such request for this key (another key's requests are unknown too).
    NotFound { id: String },
    /// The output was not kept, or is gone.
    NoOutput { id: String, reason: &'static str },
    /// The queue's database failed.
    Store { detail: String },
    /// Async predict is not running (no state directory was usable at start).
    Unavailable,
}

/// The queue as routes and the dispatcher share it.
pub struct AsyncQueue {
    pub store: Store,
    pub board: Board,
    /// Requests the restart rule ended at open (`IN_PROGRESS` when the process died): the
    /// dispatcher records them once it starts.
    pub interrupted: Vec<Job>,
}

impl AsyncQueue {
    /// Opens the database under `dir` and rebuilds the board from it.
    pub fn open(dir: &std::path::Path, now_ms: i64) -> Result<AsyncQueue, String> {
        let (store, jobs, ids) = Store::open(dir, now_ms)?;
        let interrupted = jobs
            .iter()
            .filter(|j| ids.contains(&j.id))
            .cloned()
            .collect();
        Ok(AsyncQueue {
            store,
            board: Board::new(jobs),
            interrupted,
        })
    }
}

/// The one ledger record of an ended request: its price (charged when it was accepted), its
/// time in queue, and its run time as the duration.
pub fn ledger_record(job: &Job, price_nanos: u64, bytes_out: u64) -> crate::account::UsageRecord {
    let started = job.started_ms.unwrap_or(job.status_ms);
    let status = match job.status {
        Status::Succeeded | Status::WebhookFailed => 200,
        Status::Expired => 408,
        Status::Canceled => 499,
        Status::Queued | Status::InProgress | Status::Failed => 500,
    };
    crate::account::UsageRecord {
        id: crate::account::record_id(job.created_ms),
        request_id: job.id.clone(),
        ts_ms: job.created_ms,
        key_id: job.key_id.as_str().into(),
        model: job.model.as_str().into(),
        surface: "async_predict",
        status,
        usage: crate::vocab::Usage::default(),
        cost_nanos: price_nanos,
        estimated: false,
        ttft_ms: None,
        duration_ms: (job.status_ms - started).max(0) as f64,
        replica: None,
        queue_ms: Some((started - job.created_ms).max(0) as f64),
        deployed: Some(crate::account::DeployedUse {
            deployment: job.deployment.as_str().into(),
            environment: None,
            bytes_in: 0,
            bytes_out,
        }),
    }
}
