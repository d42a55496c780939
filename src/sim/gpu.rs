//! What makes a replica behave like one GPU: a fixed number of batch slots (requests beyond
//! them wait inside the replica, first come first served), and a KV prefix cache whose hits
//! shorten the prefill, so time to first token grows with the uncached part of the prompt and
//! with the replica's own queue.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::cache::PrefixCache;
use super::stats::{Running, SimStats};
use super::SimOptions;

/// One replica's batch slots and prefix cache.
#[derive(Debug)]
pub(crate) struct Gpu {
    slots: Option<Arc<Semaphore>>,
    cache: Option<Mutex<PrefixCache>>,
    block_tokens: usize,
    prefill_per_token: Duration,
}

/// A request given its batch slot.
pub(crate) struct Admission {
    /// Leading prompt tokens found in the prefix cache.
    pub cached_tokens: u64,
    /// Time to compute the rest of the prompt.
    pub prefill: Duration,
    /// The batch slot and the request's place in the replica's counters, held until the
    /// answer ends.
    pub slot: Slot,
}

/// Held while a request runs; dropping it frees its batch slot.
pub(crate) struct Slot {
    pub _running: Running,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Gpu {
    pub(crate) fn new(opts: &SimOptions) -> Gpu {
        let block_tokens = opts.kv_block_tokens.max(1) as usize;
        let blocks =
            usize::try_from(opts.kv_cache_tokens / block_tokens as u64).unwrap_or(usize::MAX);
        Gpu {
            slots: opts.batch_slots.map(|n| Arc::new(Semaphore::new(n.max(1)))),
            cache: (blocks > 0).then(|| Mutex::new(PrefixCache::new(blocks))),
            block_tokens,
            prefill_per_token: opts.prefill_per_token,
        }
    }

    /// Tokens per cache block, when the replica has a prefix cache.
    pub(crate) fn block_tokens(&self) -> Option<usize> {
        self.cache.as_ref().map(|_| self.block_tokens)
    }

    /// Waits for a batch slot, then looks the prompt's blocks up in the prefix cache and
    /// caches them. The last prompt token is always computed, as in vLLM: a prompt wholly
    /// cached still reports one block less.
    pub(crate) async fn admit(
        &self,
        stats: &Arc<SimStats>,
        blocks: &[u64],
        prompt_tokens: u64,
    ) -> Admission {
        let mut running = stats.start_waiting();
        // The semaphore is never closed, so acquiring fails only if it were; run then.
        let permit = match &self.slots {
            Some(slots) => match slots.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    let queued = Instant::now();
                    let permit = slots.clone().acquire_owned().await.ok();
                    stats.waited(queued.elapsed());
                    permit
                }
            },
            None => None,
        };
        running.start(prompt_tokens);
        let cached_tokens = match &self.cache {
            Some(cache) => {
                let hits = cache
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .admit(blocks) as u64;
                let block = self.block_tokens as u64;
                let most = prompt_tokens.saturating_sub(1) / block * block;
                (hits * block).min(most)
            }
            None => 0,
        };
        stats.prefix_looked_up(prompt_tokens, cached_tokens);
        let uncached = u32::try_from(prompt_tokens - cached_tokens).unwrap_or(u32::MAX);
        Admission {
            cached_tokens,
            prefill: self.prefill_per_token.saturating_mul(uncached),
            slot: Slot {
                _running: running,
                _permit: permit,
            },
        }
    }

    /// Blocks held by the prefix cache, and its capacity in blocks.
    pub(crate) fn cache_blocks(&self) -> (usize, usize) {
        match &self.cache {
            Some(cache) => {
                let cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
                (cache.len(), cache.capacity())
            }
            None => (0, 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(slots: Option<usize>, cache_tokens: u64) -> Gpu {
        Gpu::new(&SimOptions {
            batch_slots: slots,
            kv_cache_tokens: cache_tokens,
            kv_block_tokens: 4,
            prefill_per_token: Duration::from_millis(1),
            ..SimOptions::default()
        })
    }

    #[tokio::test]
    async fn requests_beyond_the_slots_wait_in_order() {
        let gpu = Arc::new(gpu(Some(2), 0));
        let stats = Arc::new(SimStats::default());
        let a = gpu.admit(&stats, &[], 10).await;
        let b = gpu.admit(&stats, &[], 10).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for name in ["c", "d"] {
            let (gpu, task_stats, tx) = (gpu.clone(), stats.clone(), tx.clone());
            tokio::spawn(async move {
                let admitted = gpu.admit(&task_stats, &[], 10).await;
                tx.send((name, admitted)).unwrap();
            });
            // Each queues before the next is spawned, so their order is known.
            while stats.waiting() < if name == "c" { 1 } else { 2 } {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(
            (stats.running(), stats.waiting(), stats.kv_tokens()),
            (2, 2, 20)
        );
        drop(a);
        let (first, _c) = rx.recv().await.unwrap();
        assert_eq!(first, "c");
        assert!(stats.queue_seconds() > 0.0);
        assert_eq!((stats.running(), stats.waiting()), (2, 1));
        drop(b);
        let (second, _d) = rx.recv().await.unwrap();
        assert_eq!(second, "d");
        assert_eq!((stats.running(), stats.waiting()), (2, 0));
    }

    #[tokio::test]
    async fn cached_blocks_shorten_the_prefill() {
        let gpu = gpu(None, 64);
        let stats = Arc::new(SimStats::default());
        let first = gpu.admit(&stats, &[1, 2, 3], 14).await;
        assert_eq!(
            (first.cached_tokens, first.prefill),
            (0, Duration::from_millis(14))
        );
        let again = gpu.admit(&stats, &[1, 2, 3], 14).await;
        assert_eq!(
            (again.cached_tokens, again.prefill),
            (12, Duration::from_millis(2))
        );
        // Wholly cached: the last block is computed again.
        let whole = gpu.admit(&stats, &[1, 2, 3], 12).await;
        assert_eq!(whole.cached_tokens, 8);
        assert_eq!((stats.prefix_queries(), stats.cached_tokens()), (40, 20));
        assert_eq!(gpu.cache_blocks(), (3, 16));
        // No cache: nothing is ever cached.
        let plain = self::gpu(None, 0);
        plain.admit(&stats, &[1, 2, 3], 14).await;
        assert_eq!(plain.admit(&stats, &[1, 2, 3], 14).await.cached_tokens, 0);
    }
}
