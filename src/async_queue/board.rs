//! The in-memory queue: every known request by id, and per deployment a line ordered by
//! priority then submission, rebuilt from the database at start. One mutex guards it; only
//! async routes and the dispatcher take it, never a sync request, and nothing slow (no I/O)
//! runs under it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use tokio::sync::Notify;

use super::{Job, Status, WebhookStatus};

/// A deployment's line: the model and deployment ids.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Line {
    pub model: String,
    pub deployment: String,
}

impl Line {
    pub fn of(job: &Job) -> Line {
        Line {
            model: job.model.clone(),
            deployment: job.deployment.clone(),
        }
    }
}

#[derive(Default)]
struct Inner {
    jobs: HashMap<String, Job>,
    /// Queued requests by line: (priority, seq, id).
    lines: HashMap<Line, BTreeSet<(u8, u64, String)>>,
    /// Queued requests by expiry: (expires_ms, id).
    expiry: BTreeSet<(i64, String)>,
    running: HashMap<Line, u64>,
    /// Submits admitted but not yet written, per line (they count against the cap).
    pending: HashMap<Line, u64>,
    next_seq: u64,
}

/// What a cancel found.
pub enum Cancel {
    NotFound,
    Canceled(Box<Job>),
    /// Not queued any more: it runs or has ended.
    TooLate(Status),
}

pub struct Board {
    inner: Mutex<Inner>,
    /// Wakes the dispatcher: a request was added, or room may have appeared.
    pub wake: Notify,
}

impl Board {
    pub fn new(jobs: Vec<Job>) -> Board {
        let mut inner = Inner::default();
        for job in jobs {
            inner.next_seq = inner.next_seq.max(job.seq + 1);
            inner.insert(job);
        }
        Board {
            inner: Mutex::new(inner),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a submit against the line's cap before it is written; false when the line
    /// already holds `max` queued requests. Returns the request's sequence number.
    pub fn admit(&self, line: &Line, max: u64) -> Option<u64> {
        let mut inner = self.lock();
        let queued = inner.lines.get(line).map_or(0, |l| l.len() as u64);
        let pending = inner.pending.get(line).copied().unwrap_or(0);
        if queued + pending >= max {
            return None;
        }
        *inner.pending.entry(line.clone()).or_default() += 1;
        let seq = inner.next_seq;
        inner.next_seq += 1;
        Some(seq)
    }

    /// Ends an admitted submit: `Some(job)` once written, `None` if the write failed.
    pub fn settle(&self, line: &Line, job: Option<Job>) {
        let mut inner = self.lock();
        if let Some(p) = inner.pending.get_mut(line) {
            *p = p.saturating_sub(1);
        }
        if let Some(job) = job {
            inner.insert(job);
            drop(inner);
            self.wake.notify_one();
        }
    }

    pub fn get(&self, id: &str) -> Option<Job> {
        self.lock().jobs.get(id).cloned()
    }

    /// (queued, in progress) of a line.
    pub fn counts(&self, line: &Line) -> (u64, u64) {
        let inner = self.lock();
        (
            inner.lines.get(line).map_or(0, |l| l.len() as u64),
            inner.running.get(line).copied().unwrap_or(0),
        )
    }

    /// Cancels a queued request of `key_id`.
    pub fn cancel(&self, id: &str, key_id: &str, now_ms: i64) -> Cancel {
        let mut inner = self.lock();
        let Some(job) = inner.jobs.get(id).filter(|j| j.key_id == key_id) else {
            return Cancel::NotFound;
        };
        if job.status != Status::Queued {
            return Cancel::TooLate(job.status);
        }
        let mut job = job.clone();
        inner.unqueue(&job);
        job.status = Status::Canceled;
        job.status_ms = now_ms;
        if job.webhook.is_some() {
            job.webhook_status = WebhookStatus::Canceled;
        }
        inner.jobs.insert(job.id.clone(), job.clone());
        Cancel::Canceled(Box::new(job))
    }

    /// Lines with queued requests.
    pub fn waiting_lines(&self) -> Vec<Line> {
        let inner = self.lock();
        inner
            .lines
            .iter()
            .filter(|(_, l)| !l.is_empty())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Takes the line's first request (lowest priority value, then oldest) and marks it
    /// `IN_PROGRESS`.
    pub fn take(&self, line: &Line, now_ms: i64) -> Option<Job> {
        let mut inner = self.lock();
        let first = inner.lines.get_mut(line)?.pop_first()?;
        let job = inner.jobs.get_mut(&first.2)?;
        job.status = Status::InProgress;
        job.status_ms = now_ms;
        job.started_ms = Some(now_ms);
        let job = job.clone();
        inner.expiry.remove(&(job.expires_ms, job.id.clone()));
        *inner.running.entry(line.clone()).or_default() += 1;
        Some(job)
    }

    /// Queued requests whose time in the queue is up, marked `EXPIRED`.
    pub fn expire(&self, now_ms: i64) -> Vec<Job> {
        let mut inner = self.lock();
        let mut out = Vec::new();
        while let Some((at, id)) = inner.expiry.first().cloned() {
            if at > now_ms {
                break;
            }
            inner.expiry.pop_first();
            let Some(mut job) = inner.jobs.get(&id).cloned() else {
                continue;
            };
            inner.unqueue(&job);
            job.status = Status::Expired;
            job.status_ms = now_ms;
            inner.jobs.insert(id, job.clone());
            out.push(job);
        }
        out
    }

    /// Replaces a request's state (a run ended, a webhook was delivered).
    pub fn update(&self, job: &Job) {
        let mut inner = self.lock();
        let was_running = inner
            .jobs
            .get(&job.id)
            .is_some_and(|j| j.status == Status::InProgress);
        if was_running && job.status != Status::InProgress {
            if let Some(n) = inner.running.get_mut(&Line::of(job)) {
                *n = n.saturating_sub(1);
            }
        }
        inner.jobs.insert(job.id.clone(), job.clone());
    }

    /// Requests that ended with their webhook still to deliver (after a restart).
    pub fn undelivered(&self) -> Vec<Job> {
        let inner = self.lock();
        inner
            .jobs
            .values()
            .filter(|j| j.status.is_final() && j.webhook_status == WebhookStatus::Pending)
            .cloned()
            .collect()
    }

    /// Forgets requests that ended before `before_ms`.
    pub fn evict(&self, before_ms: i64) {
        let mut inner = self.lock();
        inner.jobs.retain(|_, j| {
            !(j.status.is_final()
                && j.status_ms < before_ms
                && j.webhook_status != WebhookStatus::Pending)
        });
    }

    /// Queued requests per line and priority, for the metrics.
    pub fn depths(&self) -> Vec<(Line, [u64; 3])> {
        let inner = self.lock();
        inner
            .lines
            .iter()
            .map(|(line, set)| {
                let mut by = [0u64; 3];
                for (p, _, _) in set {
                    by[(*p as usize).min(2)] += 1;
                }
                (line.clone(), by)
            })
            .collect()
    }
}

impl Inner {
    fn insert(&mut self, job: Job) {
        let line = Line::of(&job);
        match job.status {
            Status::Queued => {
                self.lines
                    .entry(line)
                    .or_default()
                    .insert((job.priority, job.seq, job.id.clone()));
                self.expiry.insert((job.expires_ms, job.id.clone()));
            }
            Status::InProgress => *self.running.entry(line).or_default() += 1,
            _ => {}
        }
        self.jobs.insert(job.id.clone(), job);
    }

    fn unqueue(&mut self, job: &Job) {
        if let Some(l) = self.lines.get_mut(&Line::of(job)) {
            l.remove(&(job.priority, job.seq, job.id.clone()));
        }
        self.expiry.remove(&(job.expires_ms, job.id.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::async_queue::Retry;

    fn job(id: &str, priority: u8, seq: u64, expires_ms: i64) -> Job {
        Job {
            id: id.into(),
            seq,
            model: "m".into(),
            deployment: "d".into(),
            key_id: "k".into(),
            priority,
            created_ms: 0,
            status: Status::Queued,
            status_ms: 0,
            expires_ms,
            webhook: None,
            webhook_status: WebhookStatus::NoWebhookProvided,
            retry: Retry::default(),
            errors: Vec::new(),
            started_ms: None,
            attempts: 0,
            has_output: false,
        }
    }

    #[test]
    fn priority_first_then_first_in_first_out() {
        let b = Board::new(vec![
            job("a", 1, 1, 100),
            job("b", 2, 2, 100),
            job("c", 0, 3, 100),
            job("d", 1, 4, 100),
        ]);
        let line = Line::of(&job("x", 0, 0, 0));
        let order: Vec<String> = std::iter::from_fn(|| b.take(&line, 1).map(|j| j.id)).collect();
        assert_eq!(order, ["c", "a", "d", "b"]);
        assert_eq!(b.counts(&line), (0, 4));
    }

    #[test]
    fn expiry_cancel_and_the_cap() {
        let b = Board::new(vec![job("a", 1, 1, 50), job("b", 1, 2, 500)]);
        let line = Line::of(&job("x", 0, 0, 0));
        assert_eq!(b.admit(&line, 2), None, "two queued reach a cap of 2");
        let expired = b.expire(100);
        assert_eq!(expired.len(), 1);
        assert_eq!(b.get("a").unwrap().status, Status::Expired);
        assert!(matches!(b.cancel("b", "other", 1), Cancel::NotFound));
        assert!(matches!(b.cancel("b", "k", 1), Cancel::Canceled(_)));
        assert!(matches!(
            b.cancel("b", "k", 1),
            Cancel::TooLate(Status::Canceled)
        ));
        assert!(b.admit(&line, 2).is_some());
    }
}
