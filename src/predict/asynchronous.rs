//! Async predict's routes: submit, status, cancel, output and queue status. Submit is
//! durable before its 202 leaves: the store's writer commits it first (store.rs), on its own
//! thread, while this task awaits the answer.

use bytes::Bytes;
use pingora::proxy::Session;
use serde_json::json;

use crate::account::Ledger;
use crate::async_queue::{self, AsyncError, AsyncQueue, Cancel, Job, Line, Status, WebhookStatus};
use crate::config::{DeployedModel, Key};
use crate::ctx::RequestCtx;
use crate::error::GatewayError;
use crate::forward::Relayed;
use crate::route::deployed::{self, Action, Target};
use crate::runtime::Runtime;
use crate::{body, limits, respond};

/// Serves an async action of `model` for `key`.
pub async fn serve(
    queue: Option<&AsyncQueue>,
    session: &mut Session,
    ctx: &mut RequestCtx,
    runtime: &Runtime,
    (key, model): (&Key, &std::sync::Arc<DeployedModel>),
    (target, action): (Option<Target<'_>>, Action<'_>),
) -> Result<Relayed, GatewayError> {
    let queue = queue.ok_or(AsyncError::Unavailable)?;
    let (status, body) = match action {
        Action::AsyncPredict => {
            let resolved = deployed::resolve(model, key, target)?;
            let deployment = model.deployments[resolved.deployment].id.to_string();
            ctx.deployed = Some(crate::account::DeployedCall {
                model: model.clone(),
                deployment: deployment.clone().into(),
                environment: resolved.environment.as_deref().map(Into::into),
            });
            // Read and checked before admission: a refused body reserves and records nothing.
            let (sub, input) = read(session, runtime).await?;
            // Its one ledger record is written when it ends (with its time in queue).
            ctx.record_later = true;
            super::admit(ctx, runtime, key, model).await?;
            let job = enqueue(queue, runtime, key, model, deployment, sub, input).await?;
            // Charged its price per call when accepted, so the budget holds it from now on.
            ctx.outcome.sent = true;
            (202, json!({ "request_id": job.id }))
        }
        Action::AsyncQueueStatus => {
            let resolved = deployed::resolve(model, key, target)?;
            let deployment = model.deployments[resolved.deployment].id.to_string();
            let line = Line {
                model: model.id.to_string(),
                deployment: deployment.clone(),
            };
            let (queued, running) = queue.board.counts(&line);
            (
                200,
                json!({
                    "model_id": &*model.id,
                    "deployment_id": deployment,
                    "num_queued_requests": queued,
                    "num_in_progress_requests": running,
                }),
            )
        }
        Action::AsyncRequest(id) if session.req_header().method == http::Method::DELETE => {
            cancel(queue, ctx.ledger.as_deref(), key, model, id).await?
        }
        Action::AsyncRequest(id) => (200, own(queue, key, model, id)?.status_json()),
        Action::AsyncOutput(id) => {
            let job = own(queue, key, model, id)?;
            let output = match job.has_output {
                true => queue
                    .store
                    .output(id)
                    .await
                    .map_err(|detail| AsyncError::Store { detail })?,
                false => None,
            };
            let Some(output) = output else {
                let reason = match job.status {
                    Status::Queued | Status::InProgress => "it has not finished",
                    Status::Succeeded | Status::WebhookFailed => {
                        "it was larger than async.output_max_bytes, or outputs are not kept"
                    }
                    _ => "it did not succeed",
                };
                return Err(AsyncError::NoOutput {
                    id: id.to_string(),
                    reason,
                }
                .into());
            };
            ctx.status = 200;
            let _ = respond::send_json(
                session,
                200,
                Bytes::from(output),
                &ctx.request_id,
                &ctx.headers,
            )
            .await;
            return Ok(Relayed::Complete);
        }
        _ => unreachable!("only async actions are served here"),
    };
    ctx.status = status;
    let body = Bytes::from(body.to_string());
    let _ = respond::send_json(session, status, body, &ctx.request_id, &ctx.headers).await;
    Ok(Relayed::Complete)
}

/// A request of this model that `key` submitted; any other is unknown.
fn own(queue: &AsyncQueue, key: &Key, model: &DeployedModel, id: &str) -> Result<Job, AsyncError> {
    queue
        .board
        .get(id)
        .filter(|j| j.key_id == *key.id && j.model == *model.id)
        .ok_or_else(|| AsyncError::NotFound { id: id.to_string() })
}

async fn cancel(
    queue: &AsyncQueue,
    ledger: Option<&Ledger>,
    key: &Key,
    model: &DeployedModel,
    id: &str,
) -> Result<(u16, serde_json::Value), GatewayError> {
    own(queue, key, model, id)?;
    let (canceled, message) = match queue.board.cancel(id, &key.id, limits::now_ms()) {
        Cancel::NotFound => return Err(AsyncError::NotFound { id: id.to_string() }.into()),
        Cancel::Canceled(job) => {
            queue
                .store
                .save(&job, None)
                .await
                .map_err(|detail| AsyncError::Store { detail })?;
            if let Some(ledger) = ledger {
                ledger.record(async_queue::ledger_record(&job, model.price_nanos, 0));
            }
            (true, "Canceled: the request will not run.".to_string())
        }
        Cancel::TooLate(status) => (
            false,
            format!("The request is {status}; only a QUEUED request can be canceled."),
        ),
    };
    Ok((
        200,
        json!({ "request_id": id, "canceled": canceled, "message": message }),
    ))
}

/// Reads and checks a submit body; answers it and its `model_input` as sent.
async fn read(
    session: &mut Session,
    runtime: &Runtime,
) -> Result<(async_queue::Submit, String), GatewayError> {
    let settings = &runtime.config.asynchronous;
    let limit = settings.max_payload_bytes;
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(size) = declared.filter(|&n| n > limit) {
        return Err(AsyncError::TooLarge { size, limit }.into());
    }
    let raw = match body::read_capped(session, limit, &runtime.config.server.body_pace).await {
        Ok(b) => b,
        Err(body::BodyError::TooLarge { .. }) => {
            return Err(AsyncError::TooLarge {
                size: limit + 1,
                limit,
            }
            .into())
        }
        Err(e) => return Err(e.into()),
    };
    let sub = async_queue::parse(&raw, settings.webhook_allow_private)?;
    let input = sub.model_input.get().to_string();
    Ok((sub, input))
}

/// Durably queues a checked submit: it is committed before this returns.
async fn enqueue(
    queue: &AsyncQueue,
    runtime: &Runtime,
    key: &Key,
    model: &DeployedModel,
    deployment: String,
    sub: async_queue::Submit,
    input: String,
) -> Result<Job, GatewayError> {
    let settings = &runtime.config.asynchronous;
    let line = Line {
        model: model.id.to_string(),
        deployment,
    };
    let seq = queue
        .board
        .admit(&line, settings.max_queued)
        .ok_or_else(|| AsyncError::CapacityExceeded {
            deployment: line.deployment.clone(),
            max: settings.max_queued,
        })?;
    let now = limits::now_ms();
    let job = Job {
        id: async_queue::new_id(),
        seq,
        model: line.model.clone(),
        deployment: line.deployment.clone(),
        key_id: key.id.to_string(),
        priority: sub.priority,
        created_ms: now,
        status: Status::Queued,
        status_ms: now,
        expires_ms: now + (sub.max_time_in_queue_secs * 1000) as i64,
        webhook_status: match sub.webhook {
            Some(_) => WebhookStatus::Pending,
            None => WebhookStatus::NoWebhookProvided,
        },
        webhook: sub.webhook,
        retry: sub.retry,
        errors: Vec::new(),
        started_ms: None,
        attempts: 0,
        has_output: false,
    };
    match queue.store.insert(&job, input).await {
        Ok(()) => {
            queue.board.settle(&line, Some(job.clone()));
            Ok(job)
        }
        Err(detail) => {
            queue.board.settle(&line, None);
            Err(AsyncError::Store { detail }.into())
        }
    }
}
