//! The `least_inflight` policy: fewest requests in flight for its share (slow start lowers a
//! returning replica's share), random among ties.

use std::sync::Arc;

use rand::Rng;

use super::Replica;

/// The best of the replicas `ok` accepts.
pub(super) fn pick(
    replicas: &[Arc<Replica>],
    ok: impl Fn(&Replica) -> bool,
    weight: impl Fn(&Replica) -> f64,
) -> Option<&Arc<Replica>> {
    let mut best: Option<&Arc<Replica>> = None;
    let mut best_load = f64::INFINITY;
    let mut ties = 0u32;
    let mut rng = rand::thread_rng();
    for r in replicas.iter().filter(|r| ok(r)) {
        // Requests it would have with this one, for its share: an idle replica at a tenth of
        // its share (1 / 0.1 = 10) loses to a full one with up to 9 in flight.
        let load = (r.inflight() + 1) as f64 / weight(r);
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
    best
}
