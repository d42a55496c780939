//! Memory freed by a burst of requests, handed back to the OS once the load has dropped.
//!
//! mimalloc (the global allocator, main.rs) keeps a freed page in the heap of the thread that
//! allocated it, and returns it to the OS only a while after it was freed (`purge_delay`) and
//! only when that thread next calls into the allocator. A thread can collect its own heap and
//! no other. So after thousands of streams end, the proxy's worker threads, with nothing left
//! to do, keep what the streams held: 4x idle RSS a minute after 9,000 streams
//! (benches/README.md). Purging on every free (`MIMALLOC_PURGE_DELAY=0`) releases it, but
//! costs `madvise` calls and page faults on the loaded path.
//!
//! Instead one task on the proxy's runtime reads the requests in flight once a second. When
//! they have fallen to half of the most it saw since the last collection, every worker thread
//! collects its own heap (`mi_collect`), once. Under steady load that is never, and the task
//! only reads a gauge; after a burst, the workers hand back what it freed within a second or
//! two, and again at each halving as a long burst drains.
//!
//! Pingora's proxy runtime steals work between its threads, so no task can be sent to a given
//! thread: each collection spawns one small task per worker, again until every worker has run
//! one (a thread-local round number says which ones did), at most [`ATTEMPTS`] times.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntGauge;
use tokio::runtime::Handle;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

/// How often the requests in flight are read.
const TICK: Duration = Duration::from_secs(1);

/// Below this many requests in flight at the high point, a fall frees a few MB at most: not
/// worth a collection.
const WORTH_COLLECTING: i64 = 64;

/// Rounds of tasks sent to reach every worker, [`RETRY`] apart.
const ATTEMPTS: u32 = 20;
const RETRY: Duration = Duration::from_millis(10);
/// Times a task steps aside on a worker that has collected, waiting for one that has not.
const HOPS: u32 = 16;

/// The number of the last collection; each thread remembers the last one it took part in.
static ROUND: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COLLECTED: Cell<u64> = const { Cell::new(0) };
}

/// Watches `in_flight` for as long as the runtime it is spawned on runs, and has that
/// runtime's workers collect their heaps when it has halved.
pub async fn watch(in_flight: IntGauge) {
    let workers = Handle::current().metrics().num_workers();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut high = 0;
    loop {
        tick.tick().await;
        let now = in_flight.get().max(0);
        high = high.max(now);
        if has_fallen(high, now) {
            if !on_every_worker(workers).await {
                tracing::debug!("a worker thread did not collect its freed memory");
            }
            high = now;
        }
    }
}

/// Whether the requests in flight, `now`, are at most half of the `high` since the last
/// collection, from a high worth collecting after.
fn has_fallen(high: i64, now: i64) -> bool {
    high >= WORTH_COLLECTING && now <= high / 2
}

/// Has each of the runtime's `workers` threads collect its own heap once; false if some
/// worker was not reached.
async fn on_every_worker(workers: usize) -> bool {
    let round = ROUND.fetch_add(1, Ordering::Relaxed) + 1;
    let collected = Arc::new(AtomicUsize::new(0));
    for _ in 0..ATTEMPTS {
        let mut tasks = JoinSet::new();
        for _ in 0..workers {
            let collected = collected.clone();
            tasks.spawn(async move {
                for _ in 0..HOPS {
                    if COLLECTED.with(|c| c.replace(round)) != round {
                        release_freed_memory();
                        collected.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    if collected.load(Ordering::Relaxed) >= workers {
                        return;
                    }
                    // This worker has collected: step aside, for a worker that has not to
                    // take the task over.
                    tokio::task::yield_now().await;
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        if collected.load(Ordering::Relaxed) >= workers {
            return true;
        }
        tokio::time::sleep(RETRY).await;
    }
    false
}

/// Keeps the kernel from assembling transparent huge pages in tollgate's memory. mimalloc
/// advises its arenas `MADV_HUGEPAGE`; after a burst, the pages it hands back leave those
/// 2 MiB ranges sparse, and khugepaged (a pass every 10 s by default) collapses each range
/// into a whole huge page again, present pages or not (`max_ptes_none` lets one page stand
/// for 512). RSS then climbed for a minute after 9,000 streams had ended, with no thread of
/// tollgate's running, to 3x idle (benches/README.md). Returns whether the kernel took it.
pub fn no_huge_pages() -> bool {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes integers and no pointers; it sets a flag of this
        // process's memory map.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// Hands the memory this thread has freed back to the OS now.
pub fn release_freed_memory() {
    // SAFETY: `mi_collect` takes a flag and no pointers, and may be called from any thread
    // at any time; it collects the calling thread's heap. Where mimalloc is not the
    // allocator, it finds nothing to collect.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 3)]
    async fn every_worker_collects() {
        // A loaded machine may keep a worker off the CPU for a round's 200 ms; a round
        // that misses one is tried again, as the next fall in traffic would.
        for round in ["first", "next"] {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !on_every_worker(3).await {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the {round} round never reached every worker"
                );
            }
        }
    }
}
