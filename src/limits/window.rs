//! A sliding window over the last 60 seconds in one-second slots: counts that leave the
//! window second by second, so a burst at a minute's edge cannot pass twice the limit.

/// Slots in the window; one per second.
pub const SLOTS: usize = 60;

#[derive(Debug, Clone)]
pub struct Window {
    slots: [u64; SLOTS],
    /// The second (since the Unix epoch) of the newest slot.
    head: u64,
    /// The slots' exact total, kept as they change: every admission reads the window's sum
    /// (twice with rate-limit headers), and adding 60 slots each time was most of its cost.
    /// Wide enough that it never saturates, so `sum` is what adding the slots up gave.
    total: u128,
}

impl Default for Window {
    fn default() -> Self {
        Window {
            slots: [0; SLOTS],
            head: 0,
            total: 0,
        }
    }
}

impl Window {
    /// Moves the window to `now` (seconds), clearing the slots that left it.
    fn advance(&mut self, now: u64) {
        if now <= self.head {
            return;
        }
        let gap = now - self.head;
        if gap >= SLOTS as u64 {
            self.slots = [0; SLOTS];
            self.total = 0;
        } else {
            for s in 1..=gap {
                let slot = &mut self.slots[((self.head + s) % SLOTS as u64) as usize];
                self.total -= u128::from(*slot);
                *slot = 0;
            }
        }
        self.head = now;
    }

    /// The total over the last 60 seconds.
    pub fn sum(&mut self, now: u64) -> u64 {
        self.advance(now);
        u64::try_from(self.total).unwrap_or(u64::MAX)
    }

    /// Sets slot `i` to `n`, keeping the total.
    fn set(&mut self, i: usize, n: u64) {
        self.total = self.total - u128::from(self.slots[i]) + u128::from(n);
        self.slots[i] = n;
    }

    pub fn add(&mut self, now: u64, n: u64) {
        self.advance(now);
        let i = (now % SLOTS as u64) as usize;
        self.set(i, self.slots[i].saturating_add(n));
    }

    /// Replaces `reserved`, added at second `at`, by `actual`: if `at` is still in the
    /// window its slot is corrected; otherwise the reservation already left and `actual`
    /// is not counted again.
    pub fn settle(&mut self, now: u64, at: u64, reserved: u64, actual: u64) {
        self.advance(now);
        if at + (SLOTS as u64) <= self.head || at > self.head {
            return;
        }
        let i = (at % SLOTS as u64) as usize;
        self.set(
            i,
            self.slots[i]
                .saturating_sub(reserved)
                .saturating_add(actual),
        );
    }

    /// Seconds until `need` more fits under `limit`: 0 when it fits now; `None` when it can
    /// never fit (`need > limit`).
    pub fn wait_for(&mut self, now: u64, need: u64, limit: u64) -> Option<u64> {
        if need > limit {
            return None;
        }
        let mut total = self.sum(now);
        if total.saturating_add(need) <= limit {
            return Some(0);
        }
        // Slots leave oldest first: the one written at `head - 59` leaves after 1 second.
        for age in (0..SLOTS as u64).rev() {
            let Some(second) = now.checked_sub(age) else {
                continue;
            };
            total = total.saturating_sub(self.slots[(second % SLOTS as u64) as usize]);
            if total.saturating_add(need) <= limit {
                return Some(SLOTS as u64 - age);
            }
        }
        Some(SLOTS as u64)
    }

    /// Seconds until the window is empty again (the `reset` of rate-limit headers).
    pub fn until_empty(&mut self, now: u64) -> u64 {
        self.advance(now);
        for age in 0..SLOTS as u64 {
            let Some(second) = now.checked_sub(age) else {
                break;
            };
            if self.slots[(second % SLOTS as u64) as usize] > 0 {
                return SLOTS as u64 - age;
            }
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_leave_second_by_second() {
        let mut w = Window::default();
        w.add(1000, 5);
        w.add(1030, 3);
        assert_eq!(w.sum(1030), 8);
        assert_eq!(w.sum(1059), 8);
        assert_eq!(w.sum(1060), 3, "the first slot left after 60 s");
        assert_eq!(w.sum(1090), 0);
        assert_eq!(w.sum(5000), 0);
    }

    #[test]
    fn no_double_burst_at_a_minute_edge() {
        let mut w = Window::default();
        w.add(1059, 10);
        assert_eq!(
            w.wait_for(1060, 1, 10),
            Some(59),
            "a fixed window would admit 10 more now"
        );
        assert_eq!(w.wait_for(1119, 10, 10), Some(0));
        assert_eq!(w.wait_for(1060, 11, 10), None);
    }

    #[test]
    fn settle_replaces_a_reservation_in_its_own_slot() {
        let mut w = Window::default();
        w.add(100, 1000);
        w.add(110, 10);
        w.settle(120, 100, 1000, 300);
        assert_eq!(w.sum(120), 310);
        w.settle(200, 110, 10, 50);
        assert_eq!(
            w.sum(200),
            0,
            "a reservation that already left is not counted again"
        );
    }

    #[test]
    fn the_kept_total_is_the_slots_added_up() {
        let mut w = Window::default();
        let mut seed = 7u64;
        for step in 0..2000u64 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let now = 1000 + step / 3 + (seed >> 60) * (step % 7 / 6) * 20;
            let n = if seed % 97 == 0 {
                u64::MAX - 5
            } else {
                seed >> 54
            };
            match seed % 3 {
                0 => w.add(now, n),
                1 => w.settle(now, now.saturating_sub(seed >> 58), n / 2, n % 1000),
                _ => {}
            }
            let sum = w.sum(now);
            let added = w.slots.iter().fold(0u64, |t, &n| t.saturating_add(n));
            assert_eq!(sum, added, "step {step}");
        }
    }

    #[test]
    fn reset_is_when_the_newest_count_leaves() {
        let mut w = Window::default();
        assert_eq!(w.until_empty(50), 0);
        w.add(100, 1);
        w.add(130, 1);
        assert_eq!(w.until_empty(140), 50);
    }
}
