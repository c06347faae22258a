//! Load accounting: the guard returned with every pick, and the peak-EWMA
//! latency estimator it feeds.
//!
//! The guard is the only way in-flight counts go up or down, so the proxy
//! cannot forget to release an endpoint: dropping the guard releases it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::affinity::AffinityToken;
use super::clock::Nanos;
use super::endpoint::{Endpoint, EwmaConfig, nanos_f64};

/// How the work sent to an endpoint ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered (whatever the application status).
    Success,
    /// The endpoint failed: connection refused or reset, timeout, 5xx treated as failure.
    Failure,
    /// The client went away first; says nothing about the endpoint's health.
    Cancelled,
}

/// A chosen endpoint with its load accounted for until the guard completes or drops.
///
/// While the guard lives, the endpoint's in-flight count includes it. On
/// [`complete`](Pick::complete) or drop, the count goes down and the latency
/// since the pick feeds the endpoint's peak-EWMA estimate.
#[must_use = "dropping a Pick at once releases the endpoint"]
pub struct Pick {
    endpoint: Arc<Endpoint>,
    start: Nanos,
    /// Completed explicitly; dropping must not release again.
    done: bool,
    /// Latency already fed to the estimator by [`Pick::observe_latency_at`].
    observed: bool,
}

impl std::fmt::Debug for Pick {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pick").field("addr", &self.endpoint.addr()).field("start", &self.start).finish()
    }
}

impl Pick {
    pub(crate) fn start(endpoint: Arc<Endpoint>, now: Nanos) -> Self {
        endpoint.load.counter().fetch_add(1, Ordering::Relaxed);
        Pick { endpoint, start: now, done: false, observed: false }
    }

    /// The chosen endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.endpoint.addr()
    }

    /// The chosen endpoint.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// The token that pins later requests of the same client to this endpoint.
    pub fn affinity_token(&self) -> AffinityToken {
        self.endpoint.affinity_token()
    }

    /// When the pick was made.
    pub fn started_at(&self) -> Nanos {
        self.start
    }

    /// Releases the endpoint and records the outcome and latency.
    pub fn complete(self, outcome: Outcome) {
        let now = self.endpoint.ctx.clock.now();
        self.complete_at(outcome, now);
    }

    /// [`complete`](Self::complete) at a time the caller already read from
    /// the set's clock.
    pub fn complete_at(mut self, outcome: Outcome, now: Nanos) {
        self.finish(outcome, now);
        self.done = true;
    }

    /// Feeds the latency from the pick to `now` to the endpoint's estimate
    /// without releasing it: for work whose latency is known before it ends
    /// (time to response headers of a streamed body, time to connect of a TCP
    /// connection). Later completion then only releases and counts.
    pub fn observe_latency_at(&mut self, now: Nanos) {
        if !self.observed {
            let e = &self.endpoint;
            e.ewma.observe(now, nanos_f64(now.since(self.start)), false, &e.ctx.ewma);
            self.observed = true;
        }
    }

    fn finish(&self, outcome: Outcome, now: Nanos) {
        let e = &self.endpoint;
        // A fast failure (connection refused) must not make a broken endpoint
        // look fast: failures count as at least the current estimate.
        let penalize = outcome == Outcome::Failure;
        if !self.observed || penalize {
            e.ewma.observe(now, nanos_f64(now.since(self.start)), penalize, &e.ctx.ewma);
        }
        e.record(outcome == Outcome::Failure, outcome == Outcome::Cancelled);
        e.load.counter().fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        if !self.done {
            let now = self.endpoint.ctx.clock.now();
            self.finish(Outcome::Cancelled, now);
        }
    }
}

/// A peak-sensitive exponentially weighted moving average of latency, lock-free.
///
/// Jumps up at once to any slower sample (the "peak") and decays towards
/// faster samples with time constant [`EwmaConfig::decay`]; read between
/// samples it decays towards zero, so an idle endpoint is tried again
/// (Finagle's and Linkerd's estimator). [`EwmaConfig::default_rtt`] is the
/// estimate of an endpoint never measured; its first sample replaces it, so
/// that a fast endpoint does not look as slow as the default for the tens of
/// seconds the decay would take.
pub(crate) struct PeakEwma {
    /// f64 nanoseconds, as bits.
    estimate: AtomicU64,
    /// Time of the last sample.
    at: AtomicU64,
    /// A sample has been taken.
    measured: AtomicBool,
}

impl PeakEwma {
    pub(crate) fn new(default_rtt: Duration) -> Self {
        PeakEwma {
            estimate: AtomicU64::new(nanos_f64(default_rtt).to_bits()),
            at: AtomicU64::new(0),
            measured: AtomicBool::new(false),
        }
    }

    /// Whether a sample has been taken.
    #[inline]
    pub(crate) fn is_measured(&self) -> bool {
        self.measured.load(Ordering::Relaxed)
    }

    /// The estimate decayed to `now`, in nanoseconds.
    #[inline]
    pub(crate) fn estimate(&self, now: Nanos, cfg: &EwmaConfig) -> f64 {
        let est = f64::from_bits(self.estimate.load(Ordering::Relaxed));
        let at = Nanos(self.at.load(Ordering::Relaxed));
        est * decay_factor(now.since(at), cfg)
    }

    fn observe(&self, now: Nanos, rtt: f64, penalize: bool, cfg: &EwmaConfig) {
        // Plain loads and stores, not read-modify-writes: two completions on
        // the same endpoint at the same instant may lose one sample, which an
        // average shrugs off, and the request path saves two locked instructions.
        let prev_at = Nanos(self.at.load(Ordering::Relaxed));
        self.at.store(now.0, Ordering::Relaxed);
        let first = !self.measured.load(Ordering::Relaxed);
        if first {
            self.measured.store(true, Ordering::Relaxed);
        }
        let est = f64::from_bits(self.estimate.load(Ordering::Relaxed));
        let rtt = if penalize { rtt.max(est) } else { rtt };
        let next = if first || rtt > est {
            rtt
        } else {
            let w = decay_factor(now.since(prev_at), cfg);
            est * w + rtt * (1.0 - w)
        };
        self.estimate.store(next.to_bits(), Ordering::Relaxed);
    }
}

#[inline]
fn decay_factor(elapsed: Duration, cfg: &EwmaConfig) -> f64 {
    let tau = nanos_f64(cfg.decay).max(1.0);
    (-nanos_f64(elapsed) / tau).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: f64 = 1_000_000.0;

    fn cfg() -> EwmaConfig {
        EwmaConfig { decay: Duration::from_secs(10), default_rtt: Duration::from_millis(30) }
    }

    #[test]
    fn a_slower_sample_is_taken_at_once() {
        let e = PeakEwma::new(Duration::from_millis(30));
        e.observe(Nanos(0), 300.0 * MS, false, &cfg());
        assert_eq!(e.estimate(Nanos(0), &cfg()), 300.0 * MS);
    }

    #[test]
    fn the_first_sample_replaces_the_default() {
        let e = PeakEwma::new(Duration::from_millis(30));
        e.observe(Nanos(5), 1.0 * MS, false, &cfg());
        assert_eq!(e.estimate(Nanos(5), &cfg()), 1.0 * MS);
    }

    #[test]
    fn a_faster_sample_moves_the_estimate_by_the_elapsed_share() {
        let e = PeakEwma::new(Duration::from_millis(30));
        e.observe(Nanos(0), 100.0 * MS, false, &cfg());
        let t = Nanos(10_000_000_000); // one decay constant later
        e.observe(t, 0.0, false, &cfg());
        let expected = 100.0 * MS * (-1.0f64).exp();
        assert!((e.estimate(t, &cfg()) - expected).abs() < 1.0);
    }

    #[test]
    fn an_idle_estimate_decays_towards_zero() {
        let e = PeakEwma::new(Duration::from_millis(100));
        let later = Nanos(20_000_000_000);
        let expected = 100.0 * MS * (-2.0f64).exp();
        assert!((e.estimate(later, &cfg()) - expected).abs() < 1.0);
    }

    #[test]
    fn a_fast_failure_does_not_lower_the_estimate() {
        let e = PeakEwma::new(Duration::from_millis(100));
        e.observe(Nanos(0), 100.0 * MS, false, &cfg());
        e.observe(Nanos(5_000_000_000), 1.0 * MS, true, &cfg());
        let decayed = 100.0 * MS * (-0.5f64).exp();
        assert!(e.estimate(Nanos(5_000_000_000), &cfg()) >= decayed - 1.0);
    }
}
