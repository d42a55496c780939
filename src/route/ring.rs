//! The `affinity` policy: consistent hashing with bounded loads. Each replica owns `POINTS`
//! points on a ring of `u64`s; a request's hash (its session id, or its prompt prefix) goes
//! to the first replica clockwise that is eligible and under `load_factor` × the pool's mean
//! load counting this request. The same hash keeps landing on the same replica, and on the
//! same next one when that is full, so spills stay cache-friendly too. When the walk finds
//! no replica under the bound, the least-loaded one takes it.

use std::net::SocketAddr;
use std::sync::Arc;

use super::Replica;

/// Points per replica: enough for an even split of the ring among a handful of replicas.
const POINTS: u32 = 64;

/// The ring of a pool: points sorted by position, each naming its replica's index.
pub(super) fn build(addrs: impl Iterator<Item = SocketAddr>) -> Vec<(u64, u32)> {
    let mut ring = Vec::new();
    for (i, addr) in addrs.enumerate() {
        let name = addr.to_string();
        for p in 0..POINTS {
            let point = xxhash_rust::xxh3::xxh3_64_with_seed(name.as_bytes(), u64::from(p));
            ring.push((point, i as u32));
        }
    }
    ring.sort_unstable();
    ring
}

pub(super) fn pick<'a>(
    ring: &[(u64, u32)],
    replicas: &'a [Arc<Replica>],
    hash: u64,
    load_factor: f64,
    ok: impl Fn(&Replica) -> bool,
) -> Option<&'a Arc<Replica>> {
    let (mut total, mut eligible) = (0usize, 0usize);
    for r in replicas.iter().filter(|r| ok(r)) {
        total += r.inflight();
        eligible += 1;
    }
    if eligible == 0 || ring.is_empty() {
        return None;
    }
    let bound = (load_factor * (total + 1) as f64 / eligible as f64).ceil() as usize;
    let start = ring.partition_point(|&(point, _)| point < hash);
    let mut seen = 0u64;
    for i in 0..ring.len() {
        let idx = ring[(start + i) % ring.len()].1 as usize;
        // Each replica is judged once, at its first point on the walk.
        if idx >= 64 || seen & (1 << idx) == 0 {
            if idx < 64 {
                seen |= 1 << idx;
            }
            let r = &replicas[idx];
            if ok(r) && r.inflight() < bound {
                return Some(r);
            }
        }
    }
    replicas
        .iter()
        .filter(|r| ok(r))
        .min_by_key(|r| r.inflight())
}
