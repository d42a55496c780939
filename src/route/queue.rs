//! A pool's waiting line: requests that found no replica with room wait here, first in first
//! out, and only the head tries to pick. A place is an RAII guard: a request that leaves (its
//! client gone, its wait over) leaves the line at once and hands the head to the next.
//!
//! The lock is taken only by requests that wait and by whoever frees room while someone
//! waits; `waiting` lets the common case (nobody waits) skip it entirely.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Default)]
pub struct Queue {
    waiting: AtomicUsize,
    next_id: AtomicU64,
    line: Mutex<VecDeque<(u64, Arc<Notify>)>>,
}

impl Queue {
    pub fn waiting(&self) -> usize {
        self.waiting.load(Relaxed)
    }

    /// A place at the back of the line, unless `max` already wait.
    pub(super) fn join(self: &Arc<Self>, max: usize) -> Option<Place> {
        let notify = Arc::new(Notify::new());
        let id = self.next_id.fetch_add(1, Relaxed);
        let mut line = self.lock();
        if line.len() >= max {
            return None;
        }
        line.push_back((id, notify.clone()));
        self.waiting.store(line.len(), Relaxed);
        Some(Place {
            queue: self.clone(),
            id,
            notify,
        })
    }

    /// Room was freed or a replica came back: the head looks again.
    pub fn wake_head(&self) {
        if self.waiting.load(Relaxed) == 0 {
            return;
        }
        if let Some((_, n)) = self.lock().front() {
            n.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, Arc<Notify>)>> {
        // Pushes and removals cannot panic half-way; a poisoned line is still consistent.
        self.line.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A request's place in line.
pub(super) struct Place {
    queue: Arc<Queue>,
    id: u64,
    notify: Arc<Notify>,
}

impl Place {
    pub(super) fn is_head(&self) -> bool {
        self.queue
            .lock()
            .front()
            .is_some_and(|(id, _)| *id == self.id)
    }

    /// Resolves when this place is woken: it became the head, or room was freed.
    pub(super) async fn woken(&self) {
        self.notify.notified().await
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut line = self.queue.lock();
        let was_head = line.front().is_some_and(|(id, _)| *id == self.id);
        line.retain(|(id, _)| *id != self.id);
        self.queue.waiting.store(line.len(), Relaxed);
        if was_head {
            if let Some((_, n)) = line.front() {
                n.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_is_fifo_bounded_and_a_leaver_hands_on_the_head() {
        let q = Arc::new(Queue::default());
        let a = q.join(2).unwrap();
        let b = q.join(2).unwrap();
        assert!(q.join(2).is_none(), "full");
        assert!(a.is_head() && !b.is_head());
        drop(a);
        assert!(b.is_head());
        assert_eq!(q.waiting(), 1);
        drop(b);
        assert_eq!(q.waiting(), 0);
    }
}
