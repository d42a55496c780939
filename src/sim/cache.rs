//! The KV prefix cache: least recently used blocks go first, and a prompt's blocks are marked
//! used from its end to its start, so that under pressure a cached prefix loses its tail
//! before its head (a lost head would make every block after it unreachable).

use std::collections::{BTreeMap, HashMap};

/// Block hashes held, by when each was last used.
#[derive(Debug)]
pub(crate) struct PrefixCache {
    capacity: usize,
    clock: u64,
    used: HashMap<u64, u64>,
    by_age: BTreeMap<u64, u64>,
}

impl PrefixCache {
    /// A cache holding at most `capacity` blocks.
    pub(crate) fn new(capacity: usize) -> PrefixCache {
        PrefixCache {
            capacity,
            clock: 0,
            used: HashMap::new(),
            by_age: BTreeMap::new(),
        }
    }

    /// How many leading blocks of `blocks` were cached; then all of them are, as after the
    /// prefill that computes them, evicting the least recently used beyond capacity.
    pub(crate) fn admit(&mut self, blocks: &[u64]) -> usize {
        let hits = blocks
            .iter()
            .take_while(|b| self.used.contains_key(b))
            .count();
        for &block in blocks.iter().rev() {
            self.clock += 1;
            if let Some(old) = self.used.insert(block, self.clock) {
                self.by_age.remove(&old);
            }
            self.by_age.insert(self.clock, block);
            while self.used.len() > self.capacity {
                match self.by_age.pop_first() {
                    Some((_, evicted)) => {
                        self.used.remove(&evicted);
                    }
                    None => break,
                }
            }
        }
        hits
    }

    /// Blocks held.
    pub(crate) fn len(&self) -> usize {
        self.used.len()
    }

    /// Blocks it can hold.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_is_matched_block_by_block() {
        let mut cache = PrefixCache::new(100);
        assert_eq!(cache.admit(&[1, 2, 3]), 0);
        assert_eq!(cache.admit(&[1, 2, 3, 4]), 3);
        assert_eq!(cache.admit(&[1, 2, 9]), 2);
        // Matching stops at the first miss, even if later blocks are cached.
        assert_eq!(cache.admit(&[7, 2, 3]), 0);
        assert_eq!(cache.len(), 6);
    }

    #[test]
    fn the_least_recently_used_go_first_tail_before_head() {
        let mut cache = PrefixCache::new(4);
        cache.admit(&[1, 2]);
        cache.admit(&[10, 11]);
        // Full. Touching 1, 2 makes 10, 11 the oldest.
        assert_eq!(cache.admit(&[1, 2]), 2);
        cache.admit(&[20]);
        // 11 (the tail of the older prefix) went first; 10 is still there.
        assert_eq!(cache.admit(&[10, 11]), 1);
        assert_eq!(cache.len(), 4);
        // A prompt longer than the cache keeps its head.
        let mut small = PrefixCache::new(2);
        small.admit(&[1, 2, 3, 4]);
        assert_eq!(small.admit(&[1, 2, 3, 4]), 2);
        assert_eq!(small.len(), 2);
    }

    #[test]
    fn a_zero_capacity_cache_holds_nothing() {
        let mut cache = PrefixCache::new(0);
        cache.admit(&[1, 2]);
        assert_eq!((cache.admit(&[1, 2]), cache.len()), (0, 0));
    }
}
