//! Time as the balancing core sees it: a monotonic count of nanoseconds from a
//! clock's origin, read through the [`Clock`] trait so that tests drive time by
//! hand and every time-dependent behaviour (slow start, EWMA decay) is exact.
//!
//! Nothing here sleeps or schedules; the core only ever asks "what time is it".

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A point in time, in nanoseconds since the origin of the clock that produced it.
///
/// Points from different clocks are not comparable; an endpoint set and every
/// balancer built on it share one clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Nanos(pub u64);

impl Nanos {
    /// The clock's origin.
    pub const ZERO: Nanos = Nanos(0);

    /// Time elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Nanos) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// This point moved forward by `d`, saturating at the end of time.
    pub fn after(self, d: Duration) -> Nanos {
        Nanos(self.0.saturating_add(duration_nanos(d)))
    }
}

/// A [`Duration`] as whole nanoseconds, saturating at `u64::MAX` (584 years).
pub fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A monotonic clock.
pub trait Clock: Send + Sync + 'static {
    /// The current time. Never goes backwards.
    fn now(&self) -> Nanos;
}

/// The real monotonic clock, counting from the moment it was created.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        SystemClock { origin: Instant::now() }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Nanos {
        Nanos(duration_nanos(self.origin.elapsed()))
    }
}

/// A clock that only moves when told to: the clock of tests and simulations.
#[derive(Debug, Default)]
pub struct ManualClock {
    now: AtomicU64,
}

impl ManualClock {
    /// A clock standing at its origin.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.now.fetch_add(duration_nanos(d), Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Nanos {
        Nanos(self.now.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let clock = ManualClock::new();
        assert_eq!(clock.now(), Nanos::ZERO);
        clock.advance(Duration::from_millis(1500));
        assert_eq!(clock.now(), Nanos(1_500_000_000));
        assert_eq!(clock.now().since(Nanos(500_000_000)), Duration::from_secs(1));
    }

    #[test]
    fn since_a_later_point_is_zero_not_a_panic() {
        assert_eq!(Nanos(5).since(Nanos(9)), Duration::ZERO);
        assert_eq!(Nanos(u64::MAX - 1).after(Duration::from_secs(5)), Nanos(u64::MAX));
    }

    #[test]
    fn system_clock_is_monotonic() {
        let clock = SystemClock::new();
        let a = clock.now();
        let b = clock.now();
        assert!(b >= a);
    }
}
