//! Async predict's metrics: queue depth per deployment and priority, time in queue, run
//! time, outcomes and webhook deliveries. Labels are bounded: deployments come from the
//! config, statuses and results are closed sets.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts};

use super::{Board, Status};
use crate::metrics::Metrics;

const SECONDS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

pub struct AsyncMeters {
    depth: IntGaugeVec,
    in_queue: HistogramVec,
    run: HistogramVec,
    outcomes: IntCounterVec,
    webhooks: IntCounterVec,
}

fn defined<T>(r: Result<T, prometheus::Error>) -> T {
    r.unwrap_or_else(|e| unreachable!("static metric definition: {e}"))
}

impl AsyncMeters {
    pub fn new(metrics: &Metrics) -> AsyncMeters {
        let depth = defined(IntGaugeVec::new(
            Opts::new(
                "tollgate_async_queued_requests",
                "Async requests waiting, by model, deployment and priority.",
            ),
            &["model", "deployment", "priority"],
        ));
        let in_queue = defined(HistogramVec::new(
            HistogramOpts::new(
                "tollgate_async_time_in_queue_seconds",
                "Time from submit to the start of the run (or to expiry or cancel).",
            )
            .buckets(SECONDS.to_vec()),
            &["deployment"],
        ));
        let run = defined(HistogramVec::new(
            HistogramOpts::new(
                "tollgate_async_run_seconds",
                "Time from the start of an async run to its end, retries included.",
            )
            .buckets(SECONDS.to_vec()),
            &["deployment"],
        ));
        let outcomes = defined(IntCounterVec::new(
            Opts::new(
                "tollgate_async_requests_total",
                "Async requests ended, by deployment and final status.",
            ),
            &["deployment", "status"],
        ));
        let webhooks = defined(IntCounterVec::new(
            Opts::new(
                "tollgate_async_webhooks_total",
                "Async result webhooks, by result (delivered, failed, refused_address).",
            ),
            &["result"],
        ));
        for c in [
            Box::new(depth.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(in_queue.clone()),
            Box::new(run.clone()),
            Box::new(outcomes.clone()),
            Box::new(webhooks.clone()),
        ] {
            metrics.register(c);
        }
        AsyncMeters {
            depth,
            in_queue,
            run,
            outcomes,
            webhooks,
        }
    }

    /// Sets the depth gauges from the board.
    pub fn observe_depth(&self, board: &Board) {
        self.depth.reset();
        for (line, by) in board.depths() {
            for (p, n) in by.iter().enumerate() {
                self.depth
                    .with_label_values(&[&line.model, &line.deployment, &p.to_string()])
                    .set(*n as i64);
            }
        }
    }

    pub fn observe_in_queue(&self, deployment: &str, secs: f64) {
        self.in_queue.with_label_values(&[deployment]).observe(secs);
    }

    pub fn observe_end(&self, deployment: &str, status: Status, run_secs: Option<f64>) {
        self.outcomes
            .with_label_values(&[deployment, status.as_str()])
            .inc();
        if let Some(s) = run_secs {
            self.run.with_label_values(&[deployment]).observe(s);
        }
    }

    pub fn observe_webhook(&self, result: &str) {
        self.webhooks.with_label_values(&[result]).inc();
    }
}
