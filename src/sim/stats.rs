//! Ground-truth counters of a simulated replica, read by tests to check what the proxy did.

use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

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
    completed: AtomicU64,
    cancelled: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    running: AtomicU64,
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

    /// Counts a generation as running until the returned guard drops.
    pub(crate) fn start_running(self: &Arc<Self>) -> Running {
        self.running.fetch_add(1, Ordering::Relaxed);
        Running(self.clone())
    }
}

/// Holds one slot of [`SimStats::running`].
pub(crate) struct Running(Arc<SimStats>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
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
}
