//! Every Prometheus metric tollgate exports, with help text. Labels are bounded: configured
//! model slugs (or "-"), endpoint names, status classes and error codes.

use std::time::Duration;

use crate::translate::usage::Usage;

use prometheus::{
    CounterVec, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    errors: IntCounterVec,
    duration: HistogramVec,
    ttfb: HistogramVec,
    upstream_attempts: IntCounterVec,
    tokens: IntCounterVec,
    spend: CounterVec,
    ttft: HistogramVec,
    itl: HistogramVec,
    budget_spent: GaugeVec,
    budget_remaining: GaugeVec,
    rejections: IntCounterVec,
    budget_alerts: IntCounterVec,
    webhook_failures: IntCounter,
    reloads: IntCounterVec,
    pub inflight: IntGauge,
    pub ledger_queue: IntGauge,
    pub ledger_dropped: IntCounter,
    pub ledger_write_errors: IntCounter,
}

/// Request latency buckets in seconds: from sub-millisecond gateway answers to long generations.
/// Inter-token gaps in seconds: a few milliseconds per token is typical.
const ITL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
];

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "tollgate_requests_total",
                "Requests answered, by endpoint, model and status class.",
            ),
            &["endpoint", "model", "status_class"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let errors = IntCounterVec::new(
            Opts::new(
                "tollgate_errors_total",
                "Requests that ended in an error, by model and error code.",
            ),
            &["model", "code"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_request_duration_seconds",
                "Time from request start to the last response byte, by endpoint and model.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["endpoint", "model"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let ttfb = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_upstream_first_byte_seconds",
                "Time from request start to the replica's response header, by model.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["model"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let upstream_attempts = IntCounterVec::new(
            Opts::new(
                "tollgate_upstream_attempts_total",
                "Connection attempts to replicas, by replica address and outcome (ok, failed).",
            ),
            &["replica", "outcome"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let inflight = IntGauge::new("tollgate_requests_in_flight", "Requests being handled now.")
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let tokens = IntCounterVec::new(
            Opts::new(
                "tollgate_tokens_total",
                "Tokens by model, key id and kind (input, cached_input, output, reasoning). Cached input is part of input, reasoning part of output.",
            ),
            &["model", "key", "kind"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let spend = CounterVec::new(
            Opts::new(
                "tollgate_spend_usd_total",
                "Cost of served requests in USD, by key id.",
            ),
            &["key"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let ttft = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_time_to_first_token_seconds",
                "Time from request start to the first generated token, by model.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["model"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let itl = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_inter_token_latency_seconds",
                "Time between two streamed tokens, by model.",
            )
            .buckets(ITL_BUCKETS.to_vec()),
            &["model"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let budget_spent = GaugeVec::new(
            Opts::new(
                "tollgate_budget_spent_usd",
                "Spend of the current budget period in USD, by key id.",
            ),
            &["key"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let budget_remaining = GaugeVec::new(
            Opts::new(
                "tollgate_budget_remaining_usd",
                "Budget left in the current period in USD (spend and reservations deducted), by key id.",
            ),
            &["key"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let rejections = IntCounterVec::new(
            Opts::new(
                "tollgate_limit_rejections_total",
                "Requests refused by a limit or budget, by key id and kind (requests, tokens, concurrency, max_tokens, budget).",
            ),
            &["key", "kind"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let budget_alerts = IntCounterVec::new(
            Opts::new(
                "tollgate_budget_alerts_total",
                "Budget thresholds crossed, by key id and threshold.",
            ),
            &["key", "threshold"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let webhook_failures = IntCounter::new(
            "tollgate_budget_webhook_failures_total",
            "Budget alert webhooks not delivered after every retry.",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let reloads = IntCounterVec::new(
            Opts::new(
                "tollgate_config_reloads_total",
                "Config reloads, by outcome (ok, refused).",
            ),
            &["outcome"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let ledger_queue = IntGauge::new(
            "tollgate_ledger_queue_records",
            "Usage records waiting for the ledger writer.",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let ledger_dropped = IntCounter::new(
            "tollgate_ledger_dropped_records_total",
            "Usage records lost: queue full, or still unwritable at shutdown.",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let ledger_write_errors = IntCounter::new(
            "tollgate_ledger_write_errors_total",
            "Failed ledger writes (full or unwritable disk); the batch is retried.",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(duration.clone()),
            Box::new(ttfb.clone()),
            Box::new(upstream_attempts.clone()),
            Box::new(inflight.clone()),
            Box::new(tokens.clone()),
            Box::new(spend.clone()),
            Box::new(ttft.clone()),
            Box::new(itl.clone()),
            Box::new(budget_spent.clone()),
            Box::new(budget_remaining.clone()),
            Box::new(rejections.clone()),
            Box::new(budget_alerts.clone()),
            Box::new(webhook_failures.clone()),
            Box::new(reloads.clone()),
            Box::new(ledger_queue.clone()),
            Box::new(ledger_dropped.clone()),
            Box::new(ledger_write_errors.clone()),
        ] {
            registry
                .register(c)
                .unwrap_or_else(|e| unreachable!("metric names are unique: {e}"));
        }
        Metrics {
            registry,
            requests,
            errors,
            duration,
            ttfb,
            upstream_attempts,
            inflight,
            tokens,
            spend,
            ttft,
            itl,
            budget_spent,
            budget_remaining,
            rejections,
            budget_alerts,
            webhook_failures,
            reloads,
            ledger_queue,
            ledger_dropped,
            ledger_write_errors,
        }
    }

    pub fn observe_request(&self, endpoint: &str, model: &str, status: u16, elapsed: Duration) {
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.requests
            .with_label_values(&[endpoint, model, class])
            .inc();
        self.duration
            .with_label_values(&[endpoint, model])
            .observe(elapsed.as_secs_f64());
    }

    pub fn observe_error(&self, model: &str, code: &str) {
        self.errors.with_label_values(&[model, code]).inc();
    }

    pub fn observe_first_byte(&self, model: &str, elapsed: Duration) {
        self.ttfb
            .with_label_values(&[model])
            .observe(elapsed.as_secs_f64());
    }

    pub fn observe_attempt(&self, replica: &str, ok: bool) {
        let outcome = if ok { "ok" } else { "failed" };
        self.upstream_attempts
            .with_label_values(&[replica, outcome])
            .inc();
    }

    /// The inter-token latency histogram of a model, fetched once per stream.
    pub fn inter_token(&self, model: &str) -> Option<Histogram> {
        self.itl.get_metric_with_label_values(&[model]).ok()
    }

    pub fn observe_first_token(&self, model: &str, elapsed: Duration) {
        self.ttft
            .with_label_values(&[model])
            .observe(elapsed.as_secs_f64());
    }

    pub fn observe_usage(&self, model: &str, key: &str, u: &Usage, cost_usd: f64) {
        for (kind, n) in [
            ("input", u.input),
            ("cached_input", u.cached_input),
            ("output", u.output),
            ("reasoning", u.reasoning),
        ] {
            if n > 0 {
                self.tokens.with_label_values(&[model, key, kind]).inc_by(n);
            }
        }
        if cost_usd > 0.0 {
            self.spend.with_label_values(&[key]).inc_by(cost_usd);
        }
    }

    pub fn observe_budget(&self, key: &str, spent_nanos: u64, remaining_nanos: u64) {
        self.budget_spent
            .with_label_values(&[key])
            .set(spent_nanos as f64 / 1e9);
        self.budget_remaining
            .with_label_values(&[key])
            .set(remaining_nanos as f64 / 1e9);
    }

    pub fn observe_rejection(&self, key: &str, kind: &str) {
        self.rejections.with_label_values(&[key, kind]).inc();
    }

    pub fn observe_budget_alert(&self, key: &str, threshold: f64) {
        self.budget_alerts
            .with_label_values(&[key, &threshold.to_string()])
            .inc();
    }

    pub fn observe_reload(&self, ok: bool) {
        self.reloads
            .with_label_values(&[if ok { "ok" } else { "refused" }])
            .inc();
    }

    pub fn observe_webhook_failure(&self) {
        self.webhook_failures.inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * 1024);
        // Encoding into a Vec only fails on metric families that violate the format, which
        // the static definitions above cannot produce.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
