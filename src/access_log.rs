//! The end of every request: its usage settled and handed to the ledger, the request metrics,
//! and one JSON access-log line. Called from `logging` only, so it runs exactly once per
//! request, whatever happened.

use crate::account;
use crate::alerts::Alerter;
use crate::ctx::RequestCtx;
use crate::limits::Settlement;
use crate::metrics::{KeyMeters, Metrics};

pub fn record(
    metrics: &Metrics,
    alerter: &Alerter,
    ctx: &mut RequestCtx,
    err: Option<&pingora::Error>,
) {
    let elapsed = ctx.started.elapsed();
    let runtime = ctx.runtime.clone();
    let meters = runtime.as_deref().map(|r| &r.meters);
    let model_meters = meters.and_then(|m| m.model(ctx.model_label()));
    metrics.observe_request(ctx.endpoint, model_meters, ctx.status, elapsed);
    let error = ctx.error.or_else(|| err.map(|_| "connection_error"));
    if let Some(code) = error {
        metrics.observe_error(ctx.model_label(), code);
    }
    if let Some(m) = model_meters {
        if let Some(fb) = ctx.first_byte {
            m.ttfb.observe(fb.as_secs_f64());
        }
        if let Some(ft) = ctx.first_token {
            m.ttft.observe(ft.as_secs_f64());
        }
    }
    let (settled, settlement) = account::finish(ctx);
    let key_meters = meters.and_then(|m| m.key(ctx.key_id.as_deref().unwrap_or("-")));
    settle_limits(metrics, key_meters, alerter, ctx, settlement);
    if let (Some(m), Some(k)) = (model_meters, key_meters) {
        metrics.observe_usage(m, k, &settled.usage, settled.cost_nanos as f64 / 1e9);
    }
    line(ctx, error, &settled);
}

/// The request's JSON access-log line (target `tollgate::access`).
pub fn line(ctx: &RequestCtx, error: Option<&str>, settled: &account::Settled) {
    let elapsed = ctx.started.elapsed();
    let key = ctx.key_id.as_deref().unwrap_or("-");
    let model = ctx.model_label();

    let u = &settled.usage;
    tracing::info!(
        target: "tollgate::access",
        request_id = %ctx.request_id,
        endpoint = ctx.endpoint.label(),
        key_id = key,
        model,
        stream = ctx.stream,
        status = ctx.status,
        error = error.unwrap_or("-"),
        input_tokens = u.input,
        cached_input_tokens = u.cached_input,
        output_tokens = u.output,
        reasoning_tokens = u.reasoning,
        cost_usd = settled.cost_nanos as f64 / 1e9,
        estimated = settled.estimated,
        duration_ms = elapsed.as_secs_f64() * 1e3,
        first_byte_ms = ctx.first_byte.map(|d| d.as_secs_f64() * 1e3),
        first_token_ms = ctx.first_token.map(|d| d.as_secs_f64() * 1e3),
        replica = ctx.replica.as_deref(),
        attempts = ctx.attempts,
        "request"
    );
}

/// After the reservation was settled (`settlement`): refreshes the key's budget gauges,
/// fires any budget threshold this crossed, and counts refusals by kind.
fn settle_limits(
    metrics: &Metrics,
    key_meters: Option<&KeyMeters>,
    alerter: &Alerter,
    ctx: &RequestCtx,
    settlement: Option<Settlement>,
) {
    let key_id = ctx.key_id.as_deref().unwrap_or("-");
    let refused = match ctx.error {
        Some("rate_limit_requests") => Some("requests"),
        Some("rate_limit_tokens") => Some("tokens"),
        Some("concurrency_limit") => Some("concurrency"),
        Some("max_tokens_too_large") => Some("max_tokens"),
        Some("budget_exceeded") => Some("budget"),
        _ => None,
    };
    if let Some(kind) = refused {
        metrics.observe_rejection(key_id, kind);
    }
    let Some(Settlement { spend, crossed }) = settlement else {
        return;
    };
    let (Some(runtime), Some(budget)) = (
        &ctx.runtime,
        ctx.key.as_ref().and_then(|k| k.budget.as_ref()),
    ) else {
        return;
    };
    if let Some(k) = key_meters {
        metrics.observe_budget(
            k,
            spend.spent,
            budget
                .nanos
                .saturating_sub(spend.spent.saturating_add(spend.reserved)),
        );
    }
    if !crossed.is_empty() {
        alerter.fire(&runtime.config.alerts, key_id, budget, crossed);
    }
}
