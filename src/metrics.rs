//! Every Prometheus metric tollgate exports, with help text. Labels are bounded: configured
//! model slugs (or "-"), endpoint names, status classes and error codes.

use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    errors: IntCounterVec,
    duration: HistogramVec,
    ttfb: HistogramVec,
    upstream_attempts: IntCounterVec,
    pub inflight: IntGauge,
}

/// Request latency buckets in seconds: from sub-millisecond gateway answers to long generations.
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
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(duration.clone()),
            Box::new(ttfb.clone()),
            Box::new(upstream_attempts.clone()),
            Box::new(inflight.clone()),
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
