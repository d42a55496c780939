//! The `least_inflight` policy: fewest requests in flight, random among ties.

use std::net::SocketAddr;
use std::sync::Arc;

use rand::Rng;

use super::Replica;

pub(super) fn pick(
    replicas: &[Arc<Replica>],
    tried: impl Fn(SocketAddr) -> bool,
) -> Option<Arc<Replica>> {
    let mut best: Option<&Arc<Replica>> = None;
    let mut best_load = usize::MAX;
    let mut ties = 0u32;
    let mut rng = rand::thread_rng();
    for r in replicas.iter().filter(|r| !tried(r.addr)) {
        let load = r.inflight();
        if load < best_load {
            best = Some(r);
            best_load = load;
            ties = 1;
        } else if load == best_load {
            // Reservoir sampling: each of the n tied replicas ends up chosen with chance 1/n.
            ties += 1;
            if rng.gen_range(0..ties) == 0 {
                best = Some(r);
            }
        }
    }
    best.cloned()
}

#[cfg(test)]
mod tests {
    use super::super::PoolRoute;
    use super::*;
    use std::time::Duration;

    fn pool(n: u16) -> PoolRoute {
        PoolRoute {
            replicas: (0..n)
                .map(|i| {
                    let addr = SocketAddr::from(([127, 0, 0, 1], 9000 + i));
                    Arc::new(Replica::new(
                        addr,
                        Duration::from_secs(1),
                        Duration::from_secs(1),
                        1,
                        Default::default(),
                    ))
                })
                .collect(),
        }
    }

    #[test]
    fn the_least_loaded_replica_wins() {
        let p = pool(3);
        let a = p.pick(|_| false).unwrap();
        let b = p.pick(|_| false).unwrap();
        let c = p.pick(|_| false).unwrap();
        let mut seen = vec![a.replica().addr, b.replica().addr, c.replica().addr];
        seen.sort();
        seen.dedup();
        assert_eq!(
            seen.len(),
            3,
            "each of three idle replicas gets one request"
        );
        drop(b);
        let d = p.pick(|_| false).unwrap();
        assert_eq!(d.replica().inflight(), 1);
    }

    #[test]
    fn ties_are_spread_and_tried_replicas_skipped() {
        let p = pool(2);
        let mut counts = [0; 2];
        for _ in 0..400 {
            let l = p.pick(|_| false).unwrap();
            counts[(l.replica().addr.port() - 9000) as usize] += 1;
        }
        assert!(counts[0] > 100 && counts[1] > 100, "{counts:?}");
        let first = p.pick(|_| false).unwrap().replica().addr;
        let other = p.pick(|a| a == first).unwrap();
        assert_ne!(other.replica().addr, first);
        let second = other.replica().addr;
        assert!(p.pick(|a| a == first || a == second).is_none());
    }
}
