//! The end of every request, once it is accounted: its metrics, its budget gauges and
//! alerts, and one JSON access-log line.

use crate::account::Settled;
use crate::alerts::Alerter;
use crate::ctx::RequestCtx;
use crate::limits::Settlement;
use crate::metrics::{KeyMeters, Metrics};

/// Stages "metrics" and "alerts": the request's counts, latencies, tokens and cost, the
/// replicas' attempts, refusals by kind, and what settling its reservation did to its key's
/// budget (`settlement`).
pub fn observe(
    metrics: &Metrics,
    alerter: &Alerter,
    ctx: &RequestCtx,
    settled: &Settled,
    settlement: Option<Settlement>,
    error: Option<&str>,
) {
    let meters = ctx.runtime.as_deref().map(|r| &r.meters);
    let model_meters = meters.and_then(|m| m.model(ctx.model_label()));
    metrics.observe_request(
        ctx.endpoint,
        model_meters,
        ctx.status,
        ctx.started.elapsed(),
    );
    if let Some(code) = error {
        metrics.observe_error(ctx.model_label(), code);
        if code == "request_timeout" {
            metrics.client_timeouts("body").inc();
        }
    }
    for attempt in &ctx.outcome.attempts {
        let replica = meters.and_then(|m| m.replica(&attempt.replica.authority));
        if let (Some(replica), Some(ok)) = (replica, attempt.ok) {
            metrics.observe_attempt(replica, ok);
        }
    }
    if let (Some(waited), Some(model), Some(runtime)) =
        (ctx.outcome.queued, &ctx.model, ctx.runtime.as_deref())
    {
        metrics.observe_queue_wait(&runtime.config.pools[model.pool].name, waited);
    }
    if let Some(m) = model_meters {
        if let Some(fb) = ctx.outcome.first_byte {
            m.ttfb.observe(fb.as_secs_f64());
        }
        if let Some(ft) = ctx.outcome.first_token {
            m.ttft.observe(ft.as_secs_f64());
        }
    }
    let key_meters = meters.and_then(|m| m.key(ctx.key_label()));
    settle_limits(metrics, key_meters, alerter, ctx, settlement);
    if let (Some(m), Some(k)) = (model_meters, key_meters) {
        metrics.observe_usage(m, k, &settled.usage, settled.cost_nanos as f64 / 1e9);
    }
}

/// The request's JSON access-log line (target `tollgate::access`). Never a key or a prompt.
pub fn line(ctx: &RequestCtx, error: Option<&str>, settled: &Settled) {
    let elapsed = ctx.started.elapsed();
    let outcome = &ctx.outcome;
    let u = &settled.usage;
    tracing::info!(
        target: "tollgate::access",
        request_id = %ctx.request_id,
        endpoint = ctx.endpoint.label(),
        key_id = ctx.key_label(),
        model = ctx.model_label(),
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
        first_byte_ms = outcome.first_byte.map(|d| d.as_secs_f64() * 1e3),
        first_token_ms = outcome.first_token.map(|d| d.as_secs_f64() * 1e3),
        replica = outcome.replica().map(|r| &**r),
        attempts = outcome.attempts.len(),
        queue_ms = outcome.queued.map(|d| d.as_secs_f64() * 1e3),
        deployment = ctx.deployed.as_ref().map(|d| &*d.deployment),
        environment = ctx.deployed.as_ref().and_then(|d| d.environment.as_deref()),
        bytes_in = ctx.deployed.as_ref().map(|_| outcome.bytes_in),
        bytes_out = ctx.deployed.as_ref().map(|_| outcome.bytes_out),
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
    let key_id = ctx.key_label();
    let refused = match ctx.error {
        Some("rate_limit_requests") => Some("requests"),
        Some("rate_limit_tokens") => Some("tokens"),
        Some("concurrency_limit") => Some("concurrency"),
        Some("rate_limit_metadata") => Some("metadata"),
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
