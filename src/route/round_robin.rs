//! The `round_robin` policy: each eligible replica in turn.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::Replica;

pub(super) fn pick<'a>(
    replicas: &'a [Arc<Replica>],
    next: &AtomicUsize,
    ok: impl Fn(&Replica) -> bool,
) -> Option<&'a Arc<Replica>> {
    let n = replicas.len();
    let start = next.fetch_add(1, Ordering::Relaxed);
    (0..n).map(|i| &replicas[(start + i) % n]).find(|r| ok(r))
}
