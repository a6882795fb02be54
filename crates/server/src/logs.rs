//! Log throttling for lines that hot paths may write in bursts.
//!
//! It owns only a clock reading and a count per throttled line; it never
//! formats or writes anything itself. Logging goes through a non-blocking
//! writer (see `main.rs`), so a slow log pipe cannot stall the world; this
//! keeps a storm of identical lines (slow consumers cut by the thousand)
//! from filling that writer's buffer and crowding out the rest.

use std::sync::atomic::{AtomicU64, Ordering};

/// Lets one line through per interval and counts the rest.
#[derive(Debug)]
pub struct Throttle {
    interval_ms: u64,
    /// Wall-clock ms before which nothing more is let through.
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl Throttle {
    pub const fn new(interval_ms: u64) -> Self {
        Throttle {
            interval_ms,
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines suppressed since the last one)` if a line may be written
    /// now, else `None` (and the line is counted).
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(crate::world::now_ms())
    }

    fn allow_at(&self, now_ms: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Acquire);
        if now_ms < next
            || self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms.saturating_add(self.interval_ms),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::AcqRel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_and_the_rest_counted() {
        let t = Throttle::new(1000);
        assert_eq!(t.allow_at(10_000), Some(0));
        assert_eq!(t.allow_at(10_001), None);
        assert_eq!(t.allow_at(10_999), None);
        assert_eq!(t.allow_at(11_000), Some(2));
        assert_eq!(t.allow_at(11_500), None);
        assert_eq!(t.allow_at(20_000), Some(1));
    }
}
