//! One upstream server: its address, its idle connections, and its fleet state (requests in
//! flight, health, passive ejection, slow start), all atomics read without a lock on every
//! pick. The state lives in an `Arc<State>` that a reload carries over for replicas that stay.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use pingora::protocols::Stream;
use pingora::upstreams::peer::HttpPeer;
use prometheus::IntCounter;

use super::idle::IdleConns;
use crate::config::Ejection;

/// Health as the active checks see it.
pub(super) const UNKNOWN: u8 = 0;
pub(super) const UP: u8 = 1;
pub(super) const DOWN: u8 = 2;
/// Added by a reload: no traffic until its first check passes.
pub(super) const PENDING: u8 = 3;

/// What a replica carries over a reload.
pub(super) struct State {
    inflight: AtomicUsize,
    idle: IdleConns,
    health: AtomicU8,
    /// Checks passed (positive) or failed (negative) in a row; written by the checker only.
    check_streak: std::sync::atomic::AtomicI32,
    /// Failed attempts in a row (connect, reset, 502/503/504); a success resets it.
    failures: AtomicU32,
    /// Ejections in a row, for the doubling backoff; a success resets it.
    ejections: AtomicU32,
    /// Until when it is ejected (clock ms; 0: not ejected).
    ejected_until: AtomicU64,
    /// When its slow-start ramp began (clock ms; 0: no ramp).
    ramp_from: AtomicU64,
}

impl State {
    pub(super) fn new(health: u8) -> Self {
        State {
            inflight: AtomicUsize::new(0),
            idle: IdleConns::default(),
            health: AtomicU8::new(health),
            check_streak: Default::default(),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ramp_from: AtomicU64::new(0),
        }
    }
}

pub struct Replica {
    pub addr: SocketAddr,
    /// `addr` rendered once, for the `host` header of every request sent to it, its ledger
    /// rows, log lines and metric labels.
    pub authority: Arc<str>,
    pub(super) state: Arc<State>,
    idle_limit: usize,
    pool_idle: Duration,
    /// Template for new connections: the connect timeout is fixed per replica.
    peer: HttpPeer,
    ejected: IntCounter,
}

impl Replica {
    pub(super) fn new(
        addr: SocketAddr,
        connect: Duration,
        pool_idle: Duration,
        idle_limit: usize,
        state: Arc<State>,
        ejected: IntCounter,
    ) -> Self {
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(connect);
        Replica {
            addr,
            authority: addr.to_string().into(),
            state,
            idle_limit,
            pool_idle,
            peer,
            ejected,
        }
    }

    pub fn inflight(&self) -> usize {
        self.state.inflight.load(Relaxed)
    }

    /// Counts one more request in flight if fewer than `target` are.
    pub(super) fn claim(&self, target: usize) -> bool {
        self.state
            .inflight
            .fetch_update(Relaxed, Relaxed, |n| (n < target).then_some(n + 1))
            .is_ok()
    }

    pub(super) fn release(&self) {
        self.state.inflight.fetch_sub(1, Relaxed);
    }

    pub fn peer(&self) -> &HttpPeer {
        &self.peer
    }

    /// An idle connection to this replica, still open and not expired, if there is one.
    pub fn reuse(&self) -> Option<Stream> {
        self.state.idle.take(self.pool_idle)
    }

    /// Keeps a connection that finished a response cleanly for the next request.
    pub fn keep(&self, stream: Stream) {
        self.state.idle.put(stream, self.idle_limit, self.pool_idle);
    }

    /// Takes new requests: not marked unhealthy by the checks, not ejected.
    pub fn eligible(&self, now: u64) -> bool {
        let h = self.state.health.load(Relaxed);
        h != DOWN && h != PENDING && self.state.ejected_until.load(Relaxed) <= now
    }

    /// When its ejection ends, if it is ejected at `now`.
    pub(super) fn ejected_until(&self, now: u64) -> Option<u64> {
        let until = self.state.ejected_until.load(Relaxed);
        (until > now).then_some(until)
    }

    pub(super) fn health(&self) -> u8 {
        self.state.health.load(Relaxed)
    }

    /// Its share of new requests under slow start, from 0.1 to 1.
    pub(super) fn weight(&self, now: u64, window: Option<Duration>) -> f64 {
        let Some(window) = window else { return 1.0 };
        ramp(self.state.ramp_from.load(Relaxed), now, window)
    }

    /// An attempt got an answer: the failure streak and the ejection doubling start over.
    pub fn succeeded(&self) {
        // Loads first: under steady success these lines are never written.
        if self.state.failures.load(Relaxed) != 0 {
            self.state.failures.store(0, Relaxed);
        }
        if self.state.ejections.load(Relaxed) != 0 {
            self.state.ejections.store(0, Relaxed);
        }
    }

    /// An attempt failed at the connection or with 502/503/504. Returns how long the replica
    /// is now ejected for, if this failure ejected it.
    pub fn failed(
        &self,
        now: u64,
        ejection: Option<&Ejection>,
        slow_start: Option<Duration>,
    ) -> Option<Duration> {
        let e = ejection?;
        let s = &self.state;
        let failures = s.failures.fetch_add(1, Relaxed).saturating_add(1);
        if failures < e.failures.get() {
            return None;
        }
        let until = s.ejected_until.load(Relaxed);
        if until > now {
            return None;
        }
        let n = s.ejections.load(Relaxed);
        let length = backoff(e, n);
        let end = now + length.as_millis() as u64;
        // One of the requests failing at once ejects it; the others see it ejected.
        if s.ejected_until
            .compare_exchange(until, end, Relaxed, Relaxed)
            .is_err()
        {
            return None;
        }
        s.ejections.store(n.saturating_add(1), Relaxed);
        if slow_start.is_some() {
            s.ramp_from.store(end, Relaxed);
        }
        self.ejected.inc();
        Some(length)
    }

    /// A health check passed. Returns true if that made it eligible again.
    pub(super) fn check_passed(&self, now: u64, after: u32, slow_start: bool) -> bool {
        let s = &self.state;
        let streak = s.check_streak.load(Relaxed).max(0).saturating_add(1);
        s.check_streak.store(streak, Relaxed);
        let was = s.health.load(Relaxed);
        let comes_back = match was {
            UP => false,
            UNKNOWN | PENDING => true,
            _ => streak as u32 >= after,
        };
        if !comes_back {
            return false;
        }
        s.health.store(UP, Relaxed);
        if was == DOWN {
            // It was down: whatever ejected it is over, and its ramp starts now.
            s.failures.store(0, Relaxed);
            s.ejections.store(0, Relaxed);
            s.ejected_until.store(0, Relaxed);
            if slow_start {
                s.ramp_from.store(now, Relaxed);
            }
        }
        self.eligible(now)
    }

    /// A health check failed. Returns true if that took it out of rotation.
    pub(super) fn check_failed(&self, after: u32) -> bool {
        let s = &self.state;
        let streak = s.check_streak.load(Relaxed).min(0).saturating_sub(1);
        s.check_streak.store(streak, Relaxed);
        let down = match s.health.load(Relaxed) {
            DOWN => false,
            // The first check decides at once.
            UNKNOWN | PENDING => true,
            _ => streak.unsigned_abs() >= after,
        };
        if down {
            s.health.store(DOWN, Relaxed);
        }
        down
    }
}

/// The `n`-th ejection in a row (from 0) lasts `base` × 2ⁿ, at most `max`.
fn backoff(e: &Ejection, n: u32) -> Duration {
    let factor = 1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX);
    e.base.saturating_mul(factor).min(e.max)
}

/// A replica's share at `now` of a ramp that began at `from` (0: none) over `window`:
/// linear from 10% to 100%.
fn ramp(from: u64, now: u64, window: Duration) -> f64 {
    if from == 0 || now >= from + window.as_millis() as u64 {
        return 1.0;
    }
    let t = now.saturating_sub(from) as f64 / window.as_millis().max(1) as f64;
    t.clamp(0.1, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn replica() -> Replica {
        Replica::new(
            SocketAddr::from(([127, 0, 0, 1], 9)),
            Duration::from_secs(1),
            Duration::from_secs(1),
            1,
            Arc::new(State::new(UNKNOWN)),
            IntCounter::new("x", "x").unwrap(),
        )
    }

    const EJECT: Ejection = Ejection {
        failures: NonZeroU32::new(3).unwrap(),
        base: Duration::from_millis(100),
        max: Duration::from_millis(350),
    };

    #[test]
    fn failures_in_a_row_eject_for_a_doubling_capped_time() {
        let r = replica();
        assert_eq!(r.failed(1000, Some(&EJECT), None), None);
        assert_eq!(r.failed(1000, Some(&EJECT), None), None);
        assert_eq!(
            r.failed(1000, Some(&EJECT), None),
            Some(Duration::from_millis(100))
        );
        assert!(!r.eligible(1099));
        assert_eq!(r.failed(1050, Some(&EJECT), None), None, "already out");
        assert!(r.eligible(1100));
        // Back on probation: the next failure ejects again, for twice as long, then capped.
        assert_eq!(
            r.failed(1100, Some(&EJECT), None),
            Some(Duration::from_millis(200))
        );
        assert_eq!(
            r.failed(1300, Some(&EJECT), None),
            Some(Duration::from_millis(350))
        );
        assert_eq!(
            r.failed(1650, Some(&EJECT), None),
            Some(Duration::from_millis(350))
        );
        r.succeeded();
        assert!(r.eligible(2000));
        assert_eq!(
            r.failed(2000, Some(&EJECT), None),
            None,
            "the streak restarts"
        );
        assert_eq!(r.failed(2000, None, None), None, "ejection off");
    }

    #[test]
    fn checks_flip_health_after_their_streaks_and_the_first_decides() {
        let r = replica();
        assert!(r.check_failed(2), "the first check decides");
        assert!(!r.eligible(10));
        assert!(!r.check_passed(10, 2, false));
        assert!(r.check_passed(20, 2, false));
        assert!(r.eligible(20));
        assert!(!r.check_failed(2));
        assert!(r.eligible(30), "one failure is not enough");
        assert!(r.check_failed(2));
        assert!(!r.eligible(40));
    }

    #[test]
    fn a_returning_replica_ramps_from_a_tenth_to_full() {
        let w = Some(Duration::from_millis(1000));
        let r = replica();
        assert_eq!(r.weight(5, w), 1.0);
        r.check_failed(1);
        r.check_passed(1000, 1, true);
        assert_eq!(r.weight(1000, w), 0.1);
        assert!((r.weight(1500, w) - 0.5).abs() < 1e-9);
        assert_eq!(r.weight(2000, w), 1.0);
        assert_eq!(r.weight(1500, None), 1.0);
    }
}
