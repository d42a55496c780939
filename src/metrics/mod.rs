//! Every Prometheus metric tollgate exports, with help text. Labels are bounded: configured
//! model slugs (or "-"), endpoint names, status classes and error codes.

use std::time::Duration;

use crate::account::ledger::LedgerMeters;
use crate::route::{FleetMeters, Router};
use crate::vocab::{Endpoint, Usage};

mod meters;

pub use meters::{KeyMeters, Meters, ModelMeters, ReplicaMeters};

use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
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
    wake_actions: IntCounterVec,
    client_timeouts: IntCounterVec,
    pub inflight: IntGauge,
    ledger_queue: IntGauge,
    ledger_dropped: IntCounter,
    ledger_write_errors: IntCounter,
    cluster_up: IntGauge,
    cluster_fallback: IntCounter,
    fleet: FleetMeters,
    replica_up: IntGaugeVec,
    queue_wait: HistogramVec,
    queue_waiting: IntGaugeVec,
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
                "Requests refused by a limit or budget, by key id and kind (requests, tokens, concurrency, max_tokens, budget, metadata).",
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
        let wake_actions = IntCounterVec::new(
            Opts::new(
                "tollgate_wake_actions_total",
                "Wake actions of deployed models run, by model name and outcome (ok, failed, timeout).",
            ),
            &["model", "outcome"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let client_timeouts = IntCounterVec::new(
            Opts::new(
                "tollgate_client_timeouts_total",
                "Clients cut for sending too slowly, by phase: head (not complete within server.head_timeout_ms; connection closed) or body (behind server.body_timeout_ms and server.body_min_bytes_per_sec, or a read stalled for 60 s; answered 408).",
            ),
            &["phase"],
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
        let cluster_up = IntGauge::new(
            "tollgate_cluster_redis_up",
            "Cluster mode: 1 while Redis answers in time, 0 while this node decides without it.",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let cluster_fallback = IntCounter::new(
            "tollgate_cluster_fallback_total",
            "Cluster mode: requests decided without Redis (counted on this node, or refused).",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let ledger_write_errors = IntCounter::new(
            "tollgate_ledger_write_errors_total",
            "Failed ledger writes (full or unwritable disk); the batch is retried.",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let fleet = FleetMeters {
            ejections: IntCounterVec::new(
                Opts::new(
                    "tollgate_replica_ejections_total",
                    "Replicas taken out of rotation after failures in a row, by pool and replica.",
                ),
                &["pool", "replica"],
            )
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
            check_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "tollgate_health_check_seconds",
                    "Time an active health check took, by pool.",
                )
                .buckets(LATENCY_BUCKETS[..13].to_vec()),
                &["pool"],
            )
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
            check_failures: IntCounterVec::new(
                Opts::new(
                    "tollgate_health_check_failures_total",
                    "Active health checks that failed (5xx, timeout, no connection), by pool and replica.",
                ),
                &["pool", "replica"],
            )
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
        };
        let replica_up = IntGaugeVec::new(
            Opts::new(
                "tollgate_replica_up",
                "1 if the replica takes new requests (healthy, not ejected), else 0; by pool and replica.",
            ),
            &["pool", "replica"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let queue_wait = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_queue_wait_seconds",
                "Time requests waited in a pool's queue for a replica with room, by pool (requests that did not wait are not counted).",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["pool"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let queue_waiting = IntGaugeVec::new(
            Opts::new(
                "tollgate_queue_waiting_requests",
                "Requests waiting in a pool's queue now, by pool.",
            ),
            &["pool"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(fleet.ejections.clone()),
            Box::new(fleet.check_seconds.clone()),
            Box::new(fleet.check_failures.clone()),
            Box::new(replica_up.clone()),
            Box::new(queue_wait.clone()),
            Box::new(queue_waiting.clone()),
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
            Box::new(wake_actions.clone()),
            Box::new(client_timeouts.clone()),
            Box::new(ledger_queue.clone()),
            Box::new(ledger_dropped.clone()),
            Box::new(ledger_write_errors.clone()),
            Box::new(cluster_up.clone()),
            Box::new(cluster_fallback.clone()),
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
            wake_actions,
            client_timeouts,
            ledger_queue,
            ledger_dropped,
            ledger_write_errors,
            cluster_up,
            cluster_fallback,
            fleet,
            replica_up,
            queue_wait,
            queue_waiting,
        }
    }

    /// The fleet's metric families, for the router to label.
    /// Registers metrics defined beside the stage they observe (async predict's).
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) {
        if let Err(e) = self.registry.register(c) {
            tracing::error!(error = %e, "metric not registered");
        }
    }

    pub fn fleet(&self) -> &FleetMeters {
        &self.fleet
    }

    /// A request's wait in its pool's queue.
    pub fn observe_queue_wait(&self, pool: &str, waited: Duration) {
        self.queue_wait
            .with_label_values(&[pool])
            .observe(waited.as_secs_f64());
    }

    /// Sets the gauges read from the fleet's live state: which replicas take requests, and
    /// how many requests wait. Replicas a reload removed disappear.
    pub fn observe_fleet(&self, router: &Router) {
        self.replica_up.reset();
        self.queue_waiting.reset();
        for pool in router.pools() {
            for (replica, up) in pool.states() {
                self.replica_up
                    .with_label_values(&[&pool.name, replica])
                    .set(i64::from(up));
            }
            self.queue_waiting
                .with_label_values(&[&pool.name])
                .set(pool.queue().waiting() as i64);
        }
    }

    /// Waits, at most `limit`, until no request is in flight: every request's record has
    /// then been handed to the ledger. After a fast stop (SIGINT), Pingora returns while its
    /// workers are still dropping the requests it cut, each of which hands its record as it
    /// drops.
    pub fn wait_idle(&self, limit: std::time::Duration) -> bool {
        let give_up = std::time::Instant::now() + limit;
        while self.inflight.get() > 0 {
            if std::time::Instant::now() >= give_up {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        true
    }

    /// Counts a finished request and its duration. `model` is the model's handles when the
    /// request got as far as a configured model; otherwise the labels are looked up.
    pub fn observe_request(
        &self,
        endpoint: Endpoint,
        model: Option<&ModelMeters>,
        status: u16,
        elapsed: Duration,
    ) {
        let class = match status {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        };
        let seconds = elapsed.as_secs_f64();
        let Some(m) = model else {
            let labels = [endpoint.label(), "-", STATUS_CLASSES[class]];
            self.requests.with_label_values(&labels).inc();
            self.duration
                .with_label_values(&labels[..2])
                .observe(seconds);
            return;
        };
        let e = endpoint as usize;
        m.requests[e][class]
            .get_or_init(|| {
                self.requests
                    .with_label_values(&[endpoint.label(), &m.slug, STATUS_CLASSES[class]])
            })
            .inc();
        m.duration[e]
            .get_or_init(|| {
                self.duration
                    .with_label_values(&[endpoint.label(), &m.slug])
            })
            .observe(seconds);
    }

    pub fn observe_error(&self, model: &str, code: &str) {
        self.errors.with_label_values(&[model, code]).inc();
    }

    /// The ledger's handles (queue depth, drops, write errors).
    pub fn cluster_meters(&self) -> crate::limits::shared::ClusterMeters {
        crate::limits::shared::ClusterMeters {
            up: self.cluster_up.clone(),
            fallback: self.cluster_fallback.clone(),
        }
    }

    pub fn ledger_meters(&self) -> LedgerMeters {
        LedgerMeters {
            queue: self.ledger_queue.clone(),
            dropped: self.ledger_dropped.clone(),
            write_errors: self.ledger_write_errors.clone(),
        }
    }

    pub fn observe_attempt(&self, replica: &ReplicaMeters, ok: bool) {
        let (slot, outcome) = if ok {
            (&replica.ok, "ok")
        } else {
            (&replica.failed, "failed")
        };
        slot.get_or_init(|| {
            self.upstream_attempts
                .with_label_values(&[&replica.label, outcome])
        })
        .inc();
    }

    /// The request's tokens and cost, on handles resolved once per key and model.
    pub fn observe_usage(&self, model: &ModelMeters, key: &KeyMeters, u: &Usage, cost_usd: f64) {
        let Some(slots) = key.tokens.get(model.index) else {
            return;
        };
        for (slot, kind, n) in [
            (&slots[0], "input", u.input),
            (&slots[1], "cached_input", u.cached_input),
            (&slots[2], "output", u.output),
            (&slots[3], "reasoning", u.reasoning),
        ] {
            if n > 0 {
                slot.get_or_init(|| self.tokens.with_label_values(&[&model.slug, &key.id, kind]))
                    .inc_by(n);
            }
        }
        if cost_usd > 0.0 {
            key.spend
                .get_or_init(|| self.spend.with_label_values(&[&key.id]))
                .inc_by(cost_usd);
        }
    }

    pub fn observe_budget(&self, key: &KeyMeters, spent_nanos: u64, remaining_nanos: u64) {
        key.budget_spent
            .get_or_init(|| self.budget_spent.with_label_values(&[&key.id]))
            .set(spent_nanos as f64 / 1e9);
        key.budget_remaining
            .get_or_init(|| self.budget_remaining.with_label_values(&[&key.id]))
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

    pub fn observe_wake(&self, model: &str, outcome: &str) {
        self.wake_actions.with_label_values(&[model, outcome]).inc();
    }

    /// The counter of clients cut in `phase` ("head" or "body").
    pub fn client_timeouts(&self, phase: &str) -> IntCounter {
        self.client_timeouts.with_label_values(&[phase])
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

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
const ENDPOINTS: usize = Endpoint::Unknown as usize + 1;

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
