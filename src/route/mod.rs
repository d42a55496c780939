//! Routing: `model` → model entry → pool → a replica. The fleet layer: replicas with their
//! live state (replica.rs), active health checks (health.rs), the waiting line for a pool
//! with no room (queue.rs), and the picking policies (one per file).
//!
//! A pick looks only at replicas that are eligible (healthy, not ejected) and under the
//! pool's concurrency target, and claims its slot with one compare-and-swap; the claim is a
//! [`Lease`], released on drop. When no replica has room, the request waits in the pool's
//! line; whoever frees room (a lease dropped, a replica back) wakes its head.

mod clock;
pub mod deployed;
mod health;
mod idle;
mod least_inflight;
mod queue;
mod replica;
mod ring;
mod round_robin;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::{HistogramVec, IntCounterVec};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{Fleet, Key, Model, Policy, Snapshot};
pub use clock::now_ms;
pub use queue::Queue;
pub use replica::Replica;
use replica::{State, DOWN, PENDING, UNKNOWN};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// The slug names no configured model.
    ModelNotFound { model: String },
    /// The model exists but the key's `models` list does not cover it.
    ModelForbidden { model: String, key_id: String },
    /// `x-session-affinity` is longer than `MAX_SESSION_ID` bytes.
    SessionTooLong { len: usize },
}

/// The field a client names its session in; echoed on the answer.
pub const SESSION_HEADER: http::HeaderName = http::HeaderName::from_static("x-session-affinity");

/// The longest `x-session-affinity` id accepted.
pub const MAX_SESSION_ID: usize = 256;

/// The session id a request names in `x-session-affinity`, if any (empty counts as none).
pub fn session_id(headers: &http::HeaderMap) -> Result<Option<&http::HeaderValue>, RouteError> {
    match headers.get(&SESSION_HEADER) {
        Some(v) if v.len() > MAX_SESSION_ID => Err(RouteError::SessionTooLong { len: v.len() }),
        Some(v) if !v.is_empty() => Ok(Some(v)),
        _ => Ok(None),
    }
}

/// The model a request names, if it exists and the key may use it.
pub fn resolve<'s>(
    snapshot: &'s Snapshot,
    key: &Key,
    slug: &str,
) -> Result<&'s Arc<Model>, RouteError> {
    let model = snapshot
        .model(slug)
        .ok_or_else(|| RouteError::ModelNotFound {
            model: slug.to_string(),
        })?;
    if !key.allows(slug) {
        return Err(RouteError::ModelForbidden {
            model: slug.to_string(),
            key_id: key.id.to_string(),
        });
    }
    Ok(model)
}

/// The fleet's metric families (defined in metrics/mod.rs), labelled here by pool and replica.
#[derive(Clone)]
pub struct FleetMeters {
    pub ejections: IntCounterVec,
    pub check_seconds: HistogramVec,
    pub check_failures: IntCounterVec,
}

/// Per-pool replica sets, indexed like `Snapshot::pools`.
pub struct Router {
    pools: Vec<Arc<PoolRoute>>,
    /// Ends this router's health checks when set or dropped.
    stop: watch::Sender<bool>,
}

impl Router {
    /// Replica sets for a snapshot. A replica address that `previous` also routes to keeps
    /// its state (in-flight count, idle connections, health, ejection), and a pool name that
    /// stays keeps its waiting line. A replica new in a reload gets no traffic until its
    /// first health check passes.
    pub fn build(snapshot: &Snapshot, previous: Option<&Router>, meters: &FleetMeters) -> Self {
        let idle_limit = snapshot.server.upstream_keepalive_pool_size.get();
        let old: HashMap<SocketAddr, &Arc<Replica>> = previous
            .iter()
            .flat_map(|r| &r.pools)
            .flat_map(|p| &p.replicas)
            .map(|r| (r.addr, r))
            .collect();
        let old_queue = |name: &str| {
            previous
                .and_then(|r| r.pools.iter().find(|p| &*p.name == name))
                .map(|p| p.queue.clone())
        };
        let pools = snapshot
            .pools
            .iter()
            .map(|p| {
                let replicas = p
                    .replicas
                    .iter()
                    .map(|&addr| {
                        let state = match old.get(&addr) {
                            Some(r) => r.state.clone(),
                            None if previous.is_some() && p.fleet.health.is_some() => {
                                Arc::new(State::new(PENDING))
                            }
                            None => Arc::new(State::new(UNKNOWN)),
                        };
                        let t = &p.timeouts;
                        let authority = addr.to_string();
                        Arc::new(Replica::new(
                            addr,
                            t.connect,
                            t.pool_idle,
                            idle_limit,
                            state,
                            meters.ejections.with_label_values(&[&p.name, &authority]),
                        ))
                    })
                    .collect();
                let ring = match p.fleet.policy {
                    Policy::Affinity => ring::build(p.replicas.iter().copied()),
                    _ => Vec::new(),
                };
                Arc::new(PoolRoute {
                    name: p.name.as_str().into(),
                    replicas,
                    ring,
                    fleet: p.fleet.clone(),
                    queue: old_queue(&p.name).unwrap_or_default(),
                    next: AtomicUsize::new(0),
                    checked: AtomicBool::new(p.fleet.health.is_none()),
                    meters: meters.clone(),
                })
            })
            .collect();
        Router {
            pools,
            stop: watch::channel(false).0,
        }
    }

    pub fn pool(&self, index: usize) -> &Arc<PoolRoute> {
        &self.pools[index]
    }

    pub fn pools(&self) -> &[Arc<PoolRoute>] {
        &self.pools
    }

    /// Starts the health checks of every pool that has them. Called once the router is the
    /// one in use; `stop_checks` (or dropping the router) ends them.
    pub fn start_checks(&self, snapshot: &Snapshot) {
        for (route, pool) in self.pools.iter().zip(&snapshot.pools) {
            if let Some(check) = &pool.fleet.health {
                let key = pool.upstream_key.as_ref().map(|k| k.expose().to_string());
                health::spawn(route.clone(), check.clone(), key, self.stop.subscribe());
            }
        }
        // Waiters of a line carried over look at the new replica set.
        for pool in &self.pools {
            pool.queue.wake_head();
        }
    }

    pub fn stop_checks(&self) {
        self.stop.send_replace(true);
    }
}

pub struct PoolRoute {
    pub name: Arc<str>,
    replicas: Vec<Arc<Replica>>,
    /// The `affinity` policy's ring (empty under other policies).
    ring: Vec<(u64, u32)>,
    fleet: Fleet,
    queue: Arc<Queue>,
    /// The next turn of `round_robin`.
    next: AtomicUsize,
    /// The first round of health checks is done (or there are none).
    checked: AtomicBool,
    meters: FleetMeters,
}

/// Why a request got no replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoom {
    /// The pool lists no replica at all.
    Empty,
    /// `max_waiting` requests already wait.
    QueueFull { max_waiting: u32 },
    /// It waited `timeout_ms` without a replica having room.
    Timeout { waited: Duration },
}

/// Where a request belongs under `affinity`: the hash of its session id or of its prompt's
/// prefix. The other policies ignore it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Placement {
    pub hash: Option<u64>,
}

impl PoolRoute {
    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    pub fn replicas(&self) -> &[Arc<Replica>] {
        &self.replicas
    }

    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    /// The first round of health checks has ended (always true without checks).
    pub fn checked(&self) -> bool {
        self.checked.load(Ordering::Relaxed)
    }

    fn mark_checked(&self) {
        self.checked.store(true, Ordering::Relaxed);
    }

    /// Replicas taking new requests now.
    pub fn eligible(&self) -> usize {
        let now = now_ms();
        self.replicas.iter().filter(|r| r.eligible(now)).count()
    }

    /// A lease on a replica with room, waiting in the pool's line for one if none has it,
    /// until `deadline` (the request's own) or the line's timeout. Returns how long it
    /// waited. Dropping the future (the client left) leaves the line at once.
    pub async fn acquire(
        self: &Arc<Self>,
        place: Placement,
        deadline: Instant,
    ) -> Result<(Lease, Duration), NoRoom> {
        self.acquire_within(place, deadline, self.fleet.queue.timeout)
            .await
    }

    /// `acquire`, waiting in the line up to `patience` rather than the line's timeout (a
    /// request for a deployment being woken waits up to its wake timeout).
    pub async fn acquire_within(
        self: &Arc<Self>,
        place: Placement,
        deadline: Instant,
        patience: Duration,
    ) -> Result<(Lease, Duration), NoRoom> {
        if self.replicas.is_empty() {
            return Err(NoRoom::Empty);
        }
        if self.queue.waiting() == 0 {
            if let Some(lease) = self.pick(place, |_| false) {
                return Ok((lease, Duration::ZERO));
            }
        }
        let max_waiting = self.fleet.queue.max_waiting;
        let spot = self
            .queue
            .join(max_waiting as usize)
            .ok_or(NoRoom::QueueFull { max_waiting })?;
        let started = Instant::now();
        let until = deadline.min(started + patience);
        loop {
            if spot.is_head() {
                if let Some(lease) = self.pick(place, |_| false) {
                    // Leaving hands the head to the next, who looks for room in turn.
                    drop(spot);
                    return Ok((lease, started.elapsed()));
                }
            }
            // An ejection ends without anyone saying so: the head looks again then.
            let wake = self.next_return().map_or(until, |t| t.min(until));
            let woken = tokio::time::timeout_at(wake, spot.woken()).await.is_ok();
            if !woken && Instant::now() >= until {
                return Err(NoRoom::Timeout {
                    waited: started.elapsed(),
                });
            }
        }
    }

    /// When the first ejected replica that is otherwise healthy comes back.
    fn next_return(&self) -> Option<Instant> {
        let now = now_ms();
        self.replicas
            .iter()
            .filter(|r| r.health() != DOWN && r.health() != PENDING)
            .filter_map(|r| r.ejected_until(now))
            .min()
            .map(clock::instant_of)
    }

    /// A replica with room now, by the pool's policy, skipping those `tried` names; no
    /// waiting. Retries use it directly: a retry goes elsewhere or not at all.
    pub fn pick(&self, place: Placement, tried: impl Fn(SocketAddr) -> bool) -> Option<Lease> {
        let now = now_ms();
        let target = self
            .fleet
            .max_inflight_per_replica
            .map_or(usize::MAX, |n| n.get() as usize);
        let slow = self.fleet.slow_start;
        let mut lost = Vec::new();
        // A claim lost to a concurrent request (the replica filled meanwhile) tries the next.
        for _ in 0..self.replicas.len() {
            let ok = |r: &Replica| {
                r.eligible(now)
                    && r.inflight() < target
                    && !tried(r.addr)
                    && !lost.contains(&r.addr)
            };
            let weight = |r: &Replica| r.weight(now, slow);
            let chosen = match self.fleet.policy {
                Policy::RoundRobin => round_robin::pick(&self.replicas, &self.next, |r| {
                    ok(r) && (slow.is_none() || rand::random::<f64>() < weight(r))
                }),
                Policy::Affinity if place.hash.is_some() => ring::pick(
                    &self.ring,
                    &self.replicas,
                    place.hash.unwrap_or_default(),
                    self.fleet.load_factor,
                    ok,
                ),
                Policy::LeastInflight | Policy::Affinity => {
                    least_inflight::pick(&self.replicas, ok, weight)
                }
            }?;
            if chosen.claim(target) {
                return Some(Lease {
                    replica: chosen.clone(),
                    queue: self.queue.clone(),
                });
            }
            lost.push(chosen.addr);
        }
        None
    }

    /// An attempt on `replica` failed at the connection or with 502/503/504; it may be
    /// ejected. Returns the ejection's length if this failure ejected it.
    pub fn failed(&self, replica: &Replica) -> Option<Duration> {
        replica.failed(
            now_ms(),
            self.fleet.ejection.as_ref(),
            self.fleet.slow_start,
        )
    }

    /// Each replica's address and whether it takes new requests, for metrics.
    pub fn states(&self) -> impl Iterator<Item = (&str, bool)> {
        let now = now_ms();
        self.replicas
            .iter()
            .map(move |r| (&*r.authority, r.eligible(now)))
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }
}

/// A request's claim on a replica; dropping it (on any path) releases the in-flight slot and
/// lets the head of the pool's line look for room.
pub struct Lease {
    replica: Arc<Replica>,
    queue: Arc<Queue>,
}

impl Lease {
    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.replica.release();
        self.queue.wake_head();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{HistogramOpts, Opts};

    /// A router over `n` replicas on 127.0.0.1:9000… with `extra` pool lines (no health checks).
    pub(super) fn router(n: u16, extra: &str) -> Router {
        let replicas: Vec<String> = (0..n)
            .map(|i| format!("\"127.0.0.1:{}\"", 9000 + i))
            .collect();
        let text = format!(
            "[[pools]]\nname = \"p\"\nreplicas = [{}]\nhealth = {{ enabled = false }}\n{extra}\n\n[[models]]\nslug = \"m\"\npool = \"p\"\n\n[[keys]]\nid = \"k\"\nsha256 = \"{}\"\nmodels = [\"*\"]\n",
            replicas.join(", "),
            "0".repeat(64)
        );
        let snapshot = crate::config::parse(&text).unwrap();
        let meters = FleetMeters {
            ejections: IntCounterVec::new(Opts::new("e", "e"), &["pool", "replica"]).unwrap(),
            check_seconds: HistogramVec::new(HistogramOpts::new("s", "s"), &["pool"]).unwrap(),
            check_failures: IntCounterVec::new(Opts::new("f", "f"), &["pool", "replica"]).unwrap(),
        };
        Router::build(&snapshot, None, &meters)
    }

    fn port(l: &Lease) -> u16 {
        l.replica().addr.port() - 9000
    }

    #[test]
    fn the_least_loaded_replica_wins_and_ties_are_spread() {
        let r = router(3, "");
        let p = r.pool(0);
        let held: Vec<Lease> = (0..3)
            .map(|_| p.pick(Placement::default(), |_| false).unwrap())
            .collect();
        let mut seen: Vec<u16> = held.iter().map(port).collect();
        seen.sort();
        assert_eq!(seen, [0, 1, 2], "each of three idle replicas gets one");
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[port(&p.pick(Placement::default(), |_| false).unwrap()) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 50), "{counts:?}");
        let first = held[0].replica().addr;
        let other = p.pick(Placement::default(), |a| a == first).unwrap();
        assert_ne!(other.replica().addr, first);
    }

    #[test]
    fn the_concurrency_target_caps_each_replica() {
        let r = router(2, "max_inflight_per_replica = 2");
        let p = r.pool(0);
        let held: Vec<Lease> = (0..4)
            .map(|_| p.pick(Placement::default(), |_| false).unwrap())
            .collect();
        assert!(
            p.pick(Placement::default(), |_| false).is_none(),
            "both at their target"
        );
        assert!(p.replicas().iter().all(|r| r.inflight() == 2));
        drop(held);
        assert!(p.replicas().iter().all(|r| r.inflight() == 0));
    }

    #[test]
    fn affinity_keeps_a_hash_on_one_replica_until_it_passes_the_bound() {
        let r = router(4, "policy = \"affinity\"");
        let p = r.pool(0);
        let at = |h: u64| Placement { hash: Some(h) };
        let home = port(&p.pick(at(42), |_| false).unwrap());
        for _ in 0..20 {
            assert_eq!(
                port(&p.pick(at(42), |_| false).unwrap()),
                home,
                "idle: always home"
            );
        }
        // Held: with 4 replicas and a factor of 1.25, the home takes requests while under
        // 1.25 × the mean load counting the new one; then the same next replica does.
        let mut held = Vec::new();
        let mut homes = Vec::new();
        for _ in 0..6 {
            let l = p.pick(at(42), |_| false).unwrap();
            homes.push(port(&l));
            held.push(l);
        }
        assert_eq!(homes[0], home);
        assert!(homes.iter().any(|&h| h != home), "spilled: {homes:?}");
        let loads: Vec<usize> = p.replicas().iter().map(|r| r.inflight()).collect();
        assert!(*loads.iter().max().unwrap() <= 2, "{loads:?}");
        // Different hashes spread over the replicas.
        drop(held);
        let mut seen = std::collections::HashSet::new();
        for h in 0..200u64 {
            seen.insert(port(
                &p.pick(at(h.wrapping_mul(0x9E37_79B9_7F4A_7C15)), |_| false)
                    .unwrap(),
            ));
        }
        assert_eq!(seen.len(), 4);
    }

    #[test]
    fn a_rebuilt_router_keeps_the_state_of_replicas_that_stay() {
        let old = router(2, "ejection = { failures = 1 }");
        let p = old.pool(0);
        let lease = p.pick(Placement::default(), |a| a.port() == 9001).unwrap();
        assert!(p.failed(&p.replicas()[1]).is_some());
        let snapshot = crate::config::parse(
            &format!(
                "[[pools]]\nname = \"p\"\nreplicas = [\"127.0.0.1:9000\", \"127.0.0.1:9001\", \"127.0.0.1:9002\"]\n\n[[models]]\nslug = \"m\"\npool = \"p\"\n\n[[keys]]\nid = \"k\"\nsha256 = \"{}\"\nmodels = [\"*\"]\n",
                "0".repeat(64)
            ),
        )
        .unwrap();
        let new = Router::build(&snapshot, Some(&old), &p.meters);
        let q = new.pool(0);
        assert_eq!(q.replicas()[0].inflight(), 1, "in flight, carried over");
        assert!(!q.replicas()[1].eligible(now_ms()), "still ejected");
        assert!(
            !q.replicas()[2].eligible(now_ms()),
            "new: waits for its first check"
        );
        assert_eq!(q.eligible(), 1);
        drop(lease);
        assert_eq!(q.replicas()[0].inflight(), 0);
    }

    #[test]
    fn round_robin_takes_turns_and_skips_ejected_replicas() {
        let r = router(3, "policy = \"round_robin\"\nejection = { failures = 1 }");
        let p = r.pool(0);
        let turns: Vec<u16> = (0..6)
            .map(|_| port(&p.pick(Placement::default(), |_| false).unwrap()))
            .collect();
        assert_eq!(&turns[..3], &turns[3..]);
        assert!(p.failed(&p.replicas()[1]).is_some(), "one failure ejects");
        for _ in 0..6 {
            assert_ne!(port(&p.pick(Placement::default(), |_| false).unwrap()), 1);
        }
        assert_eq!(p.eligible(), 2);
    }
}
