//! Async predict's dispatcher: one task that runs queued requests on their deployment's
//! replicas, using only spare capacity. Sync traffic keeps priority: a request is taken only
//! when no sync request waits in the pool's line and a replica has room under the pool's
//! concurrency target (`PoolRoute::pick`, which never waits), and at most
//! `async.max_in_progress` run per deployment.
//!
//! Each request runs on its own task: attempts under `async.run_timeout_secs`, retries per
//! its `inference_retry_config` on 500/502/503/504 (and on connection failures and 429,
//! which also pauses the deployment's dispatch for the backoff), then its end is committed
//! before its webhook is sent, on a task of its own, so delivery never holds the dispatcher.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde_json::json;
use tokio::time::Instant;

use crate::account::Ledger;
use crate::async_queue::{
    self, AsyncMeters, AsyncQueue, Job, JobError, Line, Status, WebhookStatus,
};
use crate::config::DeployedModel;
use crate::error::GatewayError;
use crate::forward::{Call, ForwardError, Upstream};
use crate::limits::now_ms;
use crate::route::{Lease, Placement, PoolRoute};
use crate::runtime::Runtime;
use crate::webhook;

/// How often the dispatcher looks for room when nothing wakes it.
const TICK: Duration = Duration::from_millis(20);
/// The largest answer a run may return (it is held in memory until its webhook is sent).
const MAX_ANSWER: usize = 64 * 1024 * 1024;

pub struct Dispatcher {
    runtime: Arc<ArcSwap<Runtime>>,
    queue: Arc<AsyncQueue>,
    upstream: Upstream,
    client: reqwest::Client,
    meters: AsyncMeters,
    /// Where each ended request's record goes.
    ledger: Option<Arc<Ledger>>,
    /// Deployments paused after a 429, until then.
    paused: Mutex<HashMap<Line, Instant>>,
}

/// How one attempt ended.
enum Attempt {
    Done(bytes::Bytes),
    /// Worth another attempt; `true` when the replica asked to slow down (429).
    Retry(JobError, bool),
    Fail(JobError),
}

impl Dispatcher {
    pub fn new(
        runtime: Arc<ArcSwap<Runtime>>,
        queue: Arc<AsyncQueue>,
        ledger: Option<Arc<Ledger>>,
        metrics: &crate::metrics::Metrics,
    ) -> Arc<Dispatcher> {
        Arc::new(Dispatcher {
            runtime,
            queue,
            upstream: Upstream::new(GatewayError::of_forward),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_default(),
            meters: AsyncMeters::new(metrics),
            ledger,
            paused: Mutex::new(HashMap::new()),
        })
    }

    /// Runs until the process ends.
    pub async fn run(self: Arc<Self>) {
        // Requests a restart ended: their one ledger record, and their outcome counted.
        let runtime = self.runtime.load_full();
        for job in &self.queue.interrupted {
            self.meters.observe_end(&job.deployment, job.status, None);
            if let Some(ledger) = &self.ledger {
                let price = runtime
                    .config
                    .deployed_model(&job.model)
                    .map_or(0, |m| m.price_nanos);
                ledger.record(async_queue::ledger_record(job, price, 0));
            }
        }
        // Webhooks of requests that ended before a restart but were not yet delivered.
        for job in self.queue.board.undelivered() {
            self.clone().spawn_webhook(job, None);
        }
        let mut purged = Instant::now();
        loop {
            let runtime = self.runtime.load_full();
            let now = now_ms();
            for job in self.queue.board.expire(now) {
                self.meters
                    .observe_in_queue(&job.deployment, (now - job.created_ms) as f64 / 1e3);
                let mut job = job;
                job.errors = vec![JobError::new(
                    "EXPIRED",
                    "the request was not started within its max_time_in_queue_seconds",
                )];
                let me = self.clone();
                tokio::spawn(async move { me.end(job, None, None).await });
            }
            for line in self.queue.board.waiting_lines() {
                self.fill(&runtime, &line);
            }
            self.meters.observe_depth(&self.queue.board);
            if purged.elapsed() > Duration::from_secs(60) {
                let before = now - runtime.config.asynchronous.retention.as_millis() as i64;
                self.queue.board.evict(before);
                self.queue.store.purge(before);
                purged = Instant::now();
            }
            tokio::select! {
                _ = self.queue.board.wake.notified() => {}
                _ = tokio::time::sleep(TICK) => {}
            }
        }
    }

    /// Starts queued requests of `line` while its pool has spare room.
    fn fill(self: &Arc<Self>, runtime: &Arc<Runtime>, line: &Line) {
        let paused = self.lock_paused().get(line).copied();
        if paused.is_some_and(|until| Instant::now() < until) {
            return;
        }
        let Some(model) = runtime.config.deployed_model(&line.model) else {
            return;
        };
        let Some(deployment) = model.deployment(&line.deployment) else {
            return;
        };
        let pool = deployment.pool;
        let route = runtime.router.pool(pool);
        let cap = runtime.config.asynchronous.max_in_progress;
        loop {
            if route.queue().waiting() > 0 || self.queue.board.counts(line).1 >= cap {
                return;
            }
            let Some(lease) = route.pick(Placement::default(), |_| false) else {
                return;
            };
            let Some(job) = self.queue.board.take(line, now_ms()) else {
                return;
            };
            let me = self.clone();
            let (runtime, model) = (runtime.clone(), model.clone());
            tokio::spawn(async move { me.run_job(runtime, model, pool, job, lease).await });
        }
    }

    fn lock_paused(&self) -> std::sync::MutexGuard<'_, HashMap<Line, Instant>> {
        self.paused.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs one request to its end.
    async fn run_job(
        self: Arc<Self>,
        runtime: Arc<Runtime>,
        model: Arc<DeployedModel>,
        pool: usize,
        mut job: Job,
        lease: Lease,
    ) {
        let started = std::time::Instant::now();
        let queued_secs = (job.started_ms.unwrap_or(job.created_ms) - job.created_ms) as f64 / 1e3;
        self.meters.observe_in_queue(&job.deployment, queued_secs);
        let input = match self.queue.store.start(&job).await {
            Ok(Some(input)) => input,
            Ok(None) | Err(_) => {
                job.status = Status::Failed;
                job.errors = vec![JobError::new(
                    "INTERNAL_SERVER_ERROR",
                    "the request's input could not be read from the queue's database",
                )];
                return self.end(job, Some(started), None).await;
            }
        };
        let settings = &runtime.config.asynchronous;
        let (pool_cfg, route) = (&runtime.config.pools[pool], runtime.router.pool(pool));
        let mut lease = Some(lease);
        let mut output = None;
        let mut last = None;
        for attempt in 1..=job.retry.max_attempts {
            if attempt > 1 {
                let wait = Duration::from_millis(job.retry.delay_ms(attempt));
                tokio::time::sleep(wait).await;
                lease = Some(spare(route).await);
            }
            job.attempts = attempt;
            let Some(held) = lease.take() else { break };
            let call = Call {
                pool: pool_cfg,
                route,
                path: &model.predict_path,
                body: input.as_bytes(),
                request_id: &job.id,
                deadline: Instant::now() + settings.run_timeout,
                max_answer: MAX_ANSWER,
            };
            let result = self.upstream.call(&held, call).await;
            drop(held);
            match judge(result) {
                Attempt::Done(body) => {
                    output = Some(body);
                    break;
                }
                Attempt::Fail(e) => {
                    last = Some(e);
                    break;
                }
                Attempt::Retry(e, slow_down) => {
                    tracing::warn!(request_id = %job.id, attempt, code = %e.code, "async attempt failed");
                    if slow_down {
                        let until = Instant::now()
                            + Duration::from_millis(job.retry.delay_ms(attempt + 1).max(100));
                        self.lock_paused().insert(Line::of(&job), until);
                    }
                    last = Some(e);
                }
            }
        }
        match output {
            Some(body) => {
                job.status = Status::Succeeded;
                job.errors.clear();
                self.end(job, Some(started), Some(body)).await;
            }
            None => {
                job.status = Status::Failed;
                job.errors = last.into_iter().collect();
                self.end(job, Some(started), None).await;
            }
        }
    }

    /// Commits a request's end, then sends its webhook on a task of its own.
    async fn end(
        self: Arc<Self>,
        mut job: Job,
        started: Option<std::time::Instant>,
        output: Option<bytes::Bytes>,
    ) {
        let runtime = self.runtime.load();
        let keep = runtime.config.asynchronous.output_max_bytes;
        job.status_ms = now_ms();
        let kept = output
            .as_ref()
            .filter(|o| (o.len() as u64) <= keep && keep > 0)
            .map(|o| o.to_vec());
        job.has_output = kept.is_some();
        if let Err(e) = self.queue.store.save(&job, kept).await {
            tracing::error!(request_id = %job.id, error = %e, "async request end not written");
        }
        self.queue.board.update(&job);
        if let Some(ledger) = &self.ledger {
            let price = runtime
                .config
                .deployed_model(&job.model)
                .map_or(0, |m| m.price_nanos);
            let bytes_out = output.as_ref().map_or(0, |o| o.len() as u64);
            ledger.record(async_queue::ledger_record(&job, price, bytes_out));
        }
        let run = started.map(|s| s.elapsed().as_secs_f64());
        self.meters.observe_end(&job.deployment, job.status, run);
        tracing::info!(
            request_id = %job.id,
            model = %job.model,
            deployment = %job.deployment,
            status = job.status.as_str(),
            attempts = job.attempts,
            "async request ended"
        );
        if job.webhook_status == WebhookStatus::Pending {
            self.spawn_webhook(job, output);
        }
    }

    /// Delivers a finished request's webhook in the background, then records how it went.
    fn spawn_webhook(self: Arc<Self>, job: Job, output: Option<bytes::Bytes>) {
        tokio::spawn(async move {
            let Some(url) = job.webhook.clone() else {
                return;
            };
            let runtime = self.runtime.load_full();
            let settings = &runtime.config.asynchronous;
            let body = result_body(&job, output.as_deref());
            let mut fields = vec![("x-tollgate-request-id", job.id.clone())];
            if let Some(sig) = webhook::signature(&settings.webhook_secrets, &body) {
                fields.push((webhook::SIGNATURE_FIELD, sig));
            }
            let allowed = match webhook::check_url(&url, settings.webhook_allow_private) {
                Ok(u) => webhook::resolves_allowed(&u, settings.webhook_allow_private)
                    .await
                    .map(|()| u),
                Err(e) => Err(e),
            };
            let delivered = match allowed {
                Ok(u) => {
                    let (ok, attempts) =
                        webhook::deliver(&self.client, &u, &body, &fields, &webhook::RESULT_POLICY)
                            .await;
                    if !ok {
                        tracing::warn!(request_id = %job.id, attempts, "async result webhook not delivered");
                    }
                    self.meters
                        .observe_webhook(if ok { "delivered" } else { "failed" });
                    ok
                }
                Err(reason) => {
                    tracing::warn!(request_id = %job.id, %reason, "async result webhook refused");
                    self.meters.observe_webhook("refused_address");
                    false
                }
            };
            let mut job = self.queue.board.get(&job.id).unwrap_or(job);
            job.webhook_status = match delivered {
                true => WebhookStatus::Succeeded,
                false => WebhookStatus::Failed,
            };
            if !delivered && job.status == Status::Succeeded {
                job.status = Status::WebhookFailed;
                job.status_ms = now_ms();
            }
            self.queue.store.save_later(&job);
            self.queue.board.update(&job);
        });
    }
}

/// The webhook body: `{request_id, model_id, deployment_id, type, time, data, errors}`.
/// `data` is the model's output (as JSON when it is JSON, else as a string), null unless the
/// run succeeded or when the output was not kept across a restart.
fn result_body(job: &Job, output: Option<&[u8]>) -> String {
    let data = match output {
        Some(o) => serde_json::from_slice::<serde_json::Value>(o)
            .unwrap_or_else(|_| json!(String::from_utf8_lossy(o))),
        None => json!(null),
    };
    json!({
        "request_id": job.id,
        "model_id": job.model,
        "deployment_id": job.deployment,
        "type": "async_request_completed",
        "time": crate::async_queue::rfc3339(job.status_ms),
        "data": data,
        "errors": job.errors,
    })
    .to_string()
}

/// A lease on a replica with room, when no sync request waits for one.
async fn spare(route: &Arc<PoolRoute>) -> Lease {
    loop {
        if route.queue().waiting() == 0 {
            if let Some(lease) = route.pick(Placement::default(), |_| false) {
                return lease;
            }
        }
        tokio::time::sleep(TICK).await;
    }
}

/// What an attempt's result means, in the error codes of the API we mirror.
fn judge(result: Result<crate::forward::Answer, ForwardError>) -> Attempt {
    let answer = match result {
        Ok(a) => a,
        Err(ForwardError::Timeout { .. }) => {
            return Attempt::Retry(
                JobError::new(
                    "MODEL_PREDICT_TIMEOUT",
                    "the model did not answer within the async run timeout",
                ),
                false,
            )
        }
        Err(e) => {
            let detail = match e {
                ForwardError::Broken { detail } => detail,
                _ => "no replica reachable".into(),
            };
            return Attempt::Retry(
                JobError::new(
                    "MODEL_UNAVAILABLE",
                    format!("the model's replica failed: {detail}"),
                ),
                false,
            );
        }
    };
    let status = answer.status;
    let said = || {
        let text = String::from_utf8_lossy(&answer.body[..answer.body.len().min(512)]).into_owned();
        format!("the model answered {status}: {text}")
    };
    match status {
        200..=299 => Attempt::Done(answer.body),
        429 => Attempt::Retry(JobError::new("MODEL_UNAVAILABLE", said()), true),
        500 => Attempt::Retry(JobError::new("MODEL_PREDICT_ERROR", said()), false),
        502 | 503 => Attempt::Retry(JobError::new("MODEL_UNAVAILABLE", said()), false),
        504 => Attempt::Retry(JobError::new("MODEL_PREDICT_TIMEOUT", said()), false),
        400..=499 => Attempt::Fail(JobError::new("MODEL_INVALID_INPUT", said())),
        _ => Attempt::Fail(JobError::new("MODEL_PREDICT_ERROR", said())),
    }
}

/// The dispatcher as a Pingora background service: its own runtime, stopped at shutdown.
pub struct Service(pub Arc<Dispatcher>);

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Service {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        tokio::select! {
            _ = self.0.clone().run() => {}
            _ = shutdown.changed() => {}
        }
    }
}
