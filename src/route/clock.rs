//! The fleet's time base: milliseconds on the monotonic clock since the process first asked.
//!
//! Plain `u64`s, so that ejection ends and slow-start ramps live in atomics, and the state
//! functions take `now` as an argument: unit tests of backoff and ramps pass any instant
//! they like instead of waiting.

use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Instant> = OnceLock::new();

/// Now, in milliseconds; never 0, which the fleet state uses for "never".
pub fn now_ms() -> u64 {
    let start = START.get_or_init(Instant::now);
    start.elapsed().as_millis() as u64 + 1
}

/// The instant of `ms` on the same clock.
pub fn instant_of(ms: u64) -> tokio::time::Instant {
    let start = *START.get_or_init(Instant::now);
    (start + std::time::Duration::from_millis(ms.saturating_sub(1))).into()
}
