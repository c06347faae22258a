//! The retry budget: retries may add at most a set percentage to the request
//! rate, so that a struggling backend pool is not buried under retries.
//!
//! A token bucket without time: every first attempt deposits `percent / 100`
//! of a token, every retry withdraws one. A small reserve lets a quiet proxy
//! retry its first failures; a cap bounds the burst after a long calm.

use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};

/// Milli-tokens per token.
const TOKEN: i64 = 1000;
/// Tokens available at start.
const RESERVE: i64 = 10 * TOKEN;
/// Most tokens the bucket holds.
const CAP: i64 = 100 * TOKEN;

/// A shared retry budget.
#[derive(Debug)]
pub struct RetryBudget {
    percent: AtomicU32,
    milli_tokens: AtomicI64,
}

impl RetryBudget {
    /// A budget allowing retries of `percent` of the requests, with the reserve filled.
    pub fn new(percent: u32) -> Self {
        RetryBudget { percent: AtomicU32::new(percent.min(100)), milli_tokens: AtomicI64::new(RESERVE) }
    }

    /// Changes the percentage, keeping the tokens saved so far.
    pub fn set_percent(&self, percent: u32) {
        self.percent.store(percent.min(100), Ordering::Relaxed);
    }

    /// Records a first attempt.
    #[inline]
    pub fn deposit(&self) {
        let add = i64::from(self.percent.load(Ordering::Relaxed)) * TOKEN / 100;
        if add == 0 || self.milli_tokens.load(Ordering::Relaxed) >= CAP {
            return;
        }
        let _ = self.milli_tokens.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| Some((t + add).min(CAP)));
    }

    /// Takes a token for a retry; false when the budget is spent.
    pub fn withdraw(&self) -> bool {
        self.milli_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| (t >= TOKEN).then_some(t - TOKEN))
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_allows_the_first_retries_of_a_quiet_proxy() {
        let b = RetryBudget::new(20);
        assert_eq!((0..20).filter(|_| b.withdraw()).count(), 10);
    }

    #[test]
    fn in_steady_state_retries_stay_within_the_percentage() {
        let b = RetryBudget::new(20);
        while b.withdraw() {}
        let mut allowed = 0;
        for _ in 0..10_000 {
            b.deposit();
            // Every request fails and wants a retry.
            if b.withdraw() {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 2_000);
    }

    #[test]
    fn a_long_calm_saves_at_most_the_cap() {
        let b = RetryBudget::new(100);
        for _ in 0..1_000_000 {
            b.deposit();
        }
        assert_eq!((0..1_000).filter(|_| b.withdraw()).count(), 100);
    }

    #[test]
    fn zero_percent_leaves_only_the_reserve() {
        let b = RetryBudget::new(0);
        for _ in 0..1_000 {
            b.deposit();
        }
        assert_eq!((0..100).filter(|_| b.withdraw()).count(), 10);
    }
}
