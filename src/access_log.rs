//! The end of every request: one JSON access-log line and the request metrics. Called from
//! `logging` only, so it runs exactly once per request, whatever happened.

use crate::ctx::RequestCtx;
use crate::metrics::Metrics;

pub fn record(metrics: &Metrics, ctx: &RequestCtx, err: Option<&pingora::Error>) {
    let elapsed = ctx.started.elapsed();
    let model = ctx.model_label();
    metrics.observe_request(ctx.endpoint.label(), model, ctx.status, elapsed);
    let error = ctx.error.or_else(|| err.map(|_| "connection_error"));
    if let Some(code) = error {
        metrics.observe_error(model, code);
    }
    if let Some(fb) = ctx.first_byte {
        metrics.observe_first_byte(model, fb);
    }
    tracing::info!(
        target: "tollgate::access",
        request_id = %ctx.request_id,
        endpoint = ctx.endpoint.label(),
        key_id = ctx.key_id.as_deref().unwrap_or("-"),
        model,
        stream = ctx.stream,
        status = ctx.status,
        error = error.unwrap_or("-"),
        duration_ms = elapsed.as_secs_f64() * 1e3,
        first_byte_ms = ctx.first_byte.map(|d| d.as_secs_f64() * 1e3),
        replica = ctx.replica.map(|a| a.to_string()),
        attempts = ctx.attempts,
        "request"
    );
}
