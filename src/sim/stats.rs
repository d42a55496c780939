//! Ground-truth counters of a simulated replica, read by tests to check what the proxy did.

use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// A chat completion request as the replica received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// The request headers, as they arrived.
    pub headers: http::HeaderMap,
    /// The parsed JSON body.
    pub body: serde_json::Value,
}

/// Counters of one replica. Token totals are the usage the replica reported, and for
/// responses cut short, what it generated before it stopped.
#[derive(Debug, Default)]
pub struct SimStats {
    connections: AtomicU64,
    resets: AtomicU64,
    requests: AtomicU64,
    predictions: AtomicU64,
    completed: AtomicU64,
    cancelled: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    running: AtomicU64,
    waiting: AtomicU64,
    kv_tokens: AtomicU64,
    prefix_queries: AtomicU64,
    prefix_hits: AtomicU64,
    queue_nanos: AtomicU64,
    load: Mutex<LoadMeter>,
    cancelled_changed: Notify,
    last_request: Mutex<Option<RecordedRequest>>,
}

impl SimStats {
    /// TCP connections accepted.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Model-API requests whose connection was reset in reset mode (not counted in
    /// [`SimStats::requests`]).
    pub fn resets(&self) -> u64 {
        self.resets.load(Ordering::Relaxed)
    }

    /// Chat completion requests received.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Predict calls received (`POST /v1/models/model:predict`).
    pub fn predictions(&self) -> u64 {
        self.predictions.load(Ordering::Relaxed)
    }

    /// Chat completions generated to their end and handed to the connection.
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    /// Streams whose client went away before the end.
    pub fn cancelled(&self) -> u64 {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Prompt tokens of every answered request.
    pub fn prompt_tokens(&self) -> u64 {
        self.prompt_tokens.load(Ordering::Relaxed)
    }

    /// Completion tokens generated, reasoning included.
    pub fn completion_tokens(&self) -> u64 {
        self.completion_tokens.load(Ordering::Relaxed)
    }

    /// Chat completions being generated now (vLLM's `num_requests_running`).
    pub fn running(&self) -> u64 {
        self.running.load(Ordering::Relaxed)
    }

    /// Chat completions waiting for a batch slot (vLLM's `num_requests_waiting`).
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Prompt tokens of the running requests: what they hold of the KV cache.
    pub fn kv_tokens(&self) -> u64 {
        self.kv_tokens.load(Ordering::Relaxed)
    }

    /// Prompt tokens looked up in the prefix cache (vLLM's `prefix_cache_queries`).
    pub fn prefix_queries(&self) -> u64 {
        self.prefix_queries.load(Ordering::Relaxed)
    }

    /// Prompt tokens found in the prefix cache, reported as `cached_tokens` (vLLM's
    /// `prefix_cache_hits`).
    pub fn cached_tokens(&self) -> u64 {
        self.prefix_hits.load(Ordering::Relaxed)
    }

    /// Time requests spent waiting for a batch slot, summed.
    pub fn queue_seconds(&self) -> f64 {
        self.queue_nanos.load(Ordering::Relaxed) as f64 / 1e9
    }

    /// Requests in the replica, waiting or running, integrated over time: divided by a span
    /// of time, the mean load over it.
    pub fn load_seconds(&self) -> f64 {
        self.load
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .area_until(Instant::now())
    }

    /// Waits until at least `n` streams were cancelled; false if `timeout` passed first.
    pub async fn wait_cancelled(&self, n: u64, timeout: Duration) -> bool {
        let reached = async {
            loop {
                // Register before checking, so a cancellation between the check and the
                // await still wakes us.
                let mut changed = pin!(self.cancelled_changed.notified());
                changed.as_mut().enable();
                if self.cancelled() >= n {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(timeout, reached).await.is_ok()
    }

    /// The most recent chat completion request.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.last_request
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn connection_accepted(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_reset(&self) {
        self.resets.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn prediction_received(&self) {
        self.predictions.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn request_received(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record(&self, request: RecordedRequest) {
        *self
            .last_request
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(request);
    }

    pub(crate) fn add_usage(&self, prompt: u64, completion: u64) {
        self.prompt_tokens.fetch_add(prompt, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(completion, Ordering::Relaxed);
    }

    pub(crate) fn response_completed(&self) {
        self.completed.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stream_cancelled(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
        self.cancelled_changed.notify_waiters();
    }

    pub(crate) fn waited(&self, wait: Duration) {
        let nanos = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
        self.queue_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub(crate) fn prefix_looked_up(&self, prompt: u64, cached: u64) {
        self.prefix_queries.fetch_add(prompt, Ordering::Relaxed);
        self.prefix_hits.fetch_add(cached, Ordering::Relaxed);
    }

    /// Counts a request as waiting for a batch slot until [`Running::start`], then as
    /// running, until the returned guard drops.
    pub(crate) fn start_waiting(self: &Arc<Self>) -> Running {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        self.change_load(true);
        Running {
            stats: self.clone(),
            started: false,
            kv_tokens: 0,
        }
    }

    /// Counts a generation as running until the returned guard drops.
    #[cfg(test)]
    pub(crate) fn start_running(self: &Arc<Self>) -> Running {
        let mut running = self.start_waiting();
        running.start(0);
        running
    }

    fn change_load(&self, enter: bool) {
        self.load
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .change(Instant::now(), enter);
    }
}

/// Holds one request's place in [`SimStats::waiting`], then in [`SimStats::running`].
pub(crate) struct Running {
    stats: Arc<SimStats>,
    started: bool,
    kv_tokens: u64,
}

impl Running {
    /// The request got its batch slot, and holds `kv_tokens` of the KV cache while it runs.
    pub(crate) fn start(&mut self, kv_tokens: u64) {
        if self.started {
            return;
        }
        self.started = true;
        self.kv_tokens = kv_tokens;
        let stats = &self.stats;
        stats.waiting.fetch_sub(1, Ordering::Relaxed);
        stats.running.fetch_add(1, Ordering::Relaxed);
        stats.kv_tokens.fetch_add(kv_tokens, Ordering::Relaxed);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let stats = &self.stats;
        if self.started {
            stats.running.fetch_sub(1, Ordering::Relaxed);
            stats.kv_tokens.fetch_sub(self.kv_tokens, Ordering::Relaxed);
        } else {
            stats.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        stats.change_load(false);
    }
}

/// The number of requests in the replica, integrated over time.
#[derive(Debug, Default)]
struct LoadMeter {
    level: u64,
    area: f64,
    since: Option<Instant>,
}

impl LoadMeter {
    fn change(&mut self, now: Instant, enter: bool) {
        self.area = self.area_until(now);
        self.since = Some(now);
        self.level = if enter {
            self.level + 1
        } else {
            self.level.saturating_sub(1)
        };
    }

    fn area_until(&self, now: Instant) -> f64 {
        match self.since {
            Some(since) => {
                self.area + self.level as f64 * now.saturating_duration_since(since).as_secs_f64()
            }
            None => self.area,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_cancelled_wakes_on_cancellation() {
        let stats = Arc::new(SimStats::default());
        let waiter = {
            let stats = stats.clone();
            tokio::spawn(async move { stats.wait_cancelled(2, Duration::from_secs(5)).await })
        };
        stats.stream_cancelled();
        stats.stream_cancelled();
        assert!(waiter.await.unwrap());
        assert!(!stats.wait_cancelled(3, Duration::from_millis(10)).await);
    }

    #[test]
    fn running_guard_releases_its_slot() {
        let stats = Arc::new(SimStats::default());
        let guard = stats.start_running();
        assert_eq!(stats.running(), 1);
        drop(guard);
        assert_eq!(stats.running(), 0);
    }

    #[test]
    fn a_request_waits_then_runs_then_leaves() {
        let stats = Arc::new(SimStats::default());
        let mut guard = stats.start_waiting();
        assert_eq!((stats.waiting(), stats.running()), (1, 0));
        guard.start(300);
        assert_eq!(
            (stats.waiting(), stats.running(), stats.kv_tokens()),
            (0, 1, 300)
        );
        drop(guard);
        assert_eq!(
            (stats.waiting(), stats.running(), stats.kv_tokens()),
            (0, 0, 0)
        );
        // One that never got its slot leaves the queue.
        drop(stats.start_waiting());
        assert_eq!(stats.waiting(), 0);
    }

    #[test]
    fn load_is_integrated_over_time() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut meter = LoadMeter::default();
        meter.change(at(0), true);
        meter.change(at(100), true);
        meter.change(at(300), false);
        // 1 × 0.1 s + 2 × 0.2 s, then 1 for another 0.2 s.
        assert!((meter.area_until(at(500)) - 0.7).abs() < 1e-9);
        meter.change(at(500), false);
        assert!((meter.area_until(at(900)) - 0.7).abs() < 1e-9);
    }
}
