//! Evidence per track (`stable`, `canary`, …): what the proxy saw of every
//! request it sent to each track's endpoints.
//!
//! Two views of the same requests. Cumulative counters and a latency
//! histogram for `/metrics` (by track and status class, gRPC status, outcome),
//! and a sliding window of the last minute in [`SLOT_SECONDS`] slots, from
//! which `/tracks` reports each track's recent request count, success rate
//! and p50/p99 latency, cheaply enough for an operator to poll every proxy.
//!
//! Recording touches only atomics. A slot is reused once its time has
//! passed: the first writer of the new period resets it (an increment racing
//! with that reset may be lost, which a statistic can afford). The window is
//! sans-IO: every function takes the time, in seconds of a monotonic clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::metrics::LatencyHistogram;

/// Seconds covered by one slot of the window.
pub const SLOT_SECONDS: u64 = 5;
/// Slots in the window: a minute.
const SLOTS: usize = 12;
/// The longest window `/tracks` reports.
pub const WINDOW_SECONDS: u64 = SLOT_SECONDS * SLOTS as u64;

/// Latency buckets of the window: below 64 µs, then four per doubling up
/// to about 3 s (each about 12-25% wide), the last one open-ended.
const LATENCY_BUCKETS: usize = 64;

/// The bucket of a latency in microseconds.
fn bucket_of(micros: u64) -> usize {
    if micros < 64 {
        return 0;
    }
    let octave = 63 - micros.leading_zeros() as usize;
    let sub = ((micros >> (octave - 2)) & 3) as usize;
    ((octave - 6) * 4 + sub + 1).min(LATENCY_BUCKETS - 1)
}

/// The upper edge of bucket `i`, in microseconds (the last bucket's lower edge).
fn upper_edge(i: usize) -> u64 {
    if i == 0 {
        return 64;
    }
    let octave = (i - 1) / 4 + 6;
    let sub = ((i - 1) % 4) as u64;
    let next = if i == LATENCY_BUCKETS - 1 { 4 + sub } else { 5 + sub };
    next << (octave - 2)
}

/// One period of the window.
#[derive(Debug)]
struct Slot {
    /// The period this slot holds (seconds / [`SLOT_SECONDS`]); `u64::MAX`: none yet.
    period: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
}

impl Slot {
    fn new() -> Self {
        Slot {
            period: AtomicU64::new(u64::MAX),
            completed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// This slot, made current for `period` if it held an older one.
    fn at(&self, period: u64) -> &Self {
        let held = self.period.load(Ordering::Acquire);
        if held != period && self.period.compare_exchange(held, period, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            self.completed.store(0, Ordering::Relaxed);
            self.failed.store(0, Ordering::Relaxed);
            for b in &self.latency {
                b.store(0, Ordering::Relaxed);
            }
        }
        self
    }
}

/// A sliding window of outcomes and latencies.
#[derive(Debug)]
pub struct Window {
    slots: [Slot; SLOTS],
}

impl Default for Window {
    fn default() -> Self {
        Window { slots: std::array::from_fn(|_| Slot::new()) }
    }
}

impl Window {
    fn slot(&self, now_s: u64) -> &Slot {
        let period = now_s / SLOT_SECONDS;
        self.slots[(period % SLOTS as u64) as usize].at(period)
    }

    /// A response's headers arrived after `micros`.
    pub fn latency(&self, now_s: u64, micros: u64) {
        self.slot(now_s).latency[bucket_of(micros)].fetch_add(1, Ordering::Relaxed);
    }

    /// A request ended, well or not.
    pub fn completed(&self, now_s: u64, failed: bool) {
        let slot = self.slot(now_s);
        slot.completed.fetch_add(1, Ordering::Relaxed);
        if failed {
            slot.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// What happened in the last `seconds` (whole slots, the current one included).
    pub fn summary(&self, now_s: u64, seconds: u64) -> WindowSummary {
        let current = now_s / SLOT_SECONDS;
        let span = seconds.div_ceil(SLOT_SECONDS).clamp(1, SLOTS as u64);
        let oldest = current.saturating_sub(span - 1);
        let mut s = WindowSummary { seconds: span * SLOT_SECONDS, ..WindowSummary::default() };
        let mut latency = [0u64; LATENCY_BUCKETS];
        for slot in &self.slots {
            let period = slot.period.load(Ordering::Acquire);
            if period == u64::MAX || period < oldest || period > current {
                continue;
            }
            s.requests += slot.completed.load(Ordering::Relaxed);
            s.failures += slot.failed.load(Ordering::Relaxed);
            for (sum, b) in latency.iter_mut().zip(&slot.latency) {
                *sum += b.load(Ordering::Relaxed);
            }
        }
        s.p50_micros = percentile(&latency, 0.50);
        s.p99_micros = percentile(&latency, 0.99);
        s
    }
}

/// The upper edge of the bucket holding quantile `q`; `None` without samples.
fn percentile(buckets: &[u64; LATENCY_BUCKETS], q: f64) -> Option<u64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64 * q).ceil() as u64).max(1);
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(upper_edge(i));
        }
    }
    Some(upper_edge(LATENCY_BUCKETS - 1))
}

/// A track's recent evidence.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WindowSummary {
    /// The span covered, in seconds.
    pub seconds: u64,
    /// Requests that ended (answered, failed or timed out).
    pub requests: u64,
    /// Of those, failures: 5xx, no response, a gRPC failure status.
    pub failures: u64,
    /// Median time to response headers (bucket upper edge), in µs.
    pub p50_micros: Option<u64>,
    /// 99th percentile time to response headers, in µs.
    pub p99_micros: Option<u64>,
}

impl WindowSummary {
    /// Successes over requests; `None` without requests.
    pub fn success_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| 1.0 - self.failures as f64 / self.requests as f64)
    }
}

/// Everything the proxy saw of one track, kept across configuration reloads.
#[derive(Debug)]
pub struct TrackStats {
    pub(crate) name: Arc<str>,
    /// Responses by status class (`1xx`…`5xx`, then no response).
    pub(crate) classes: [AtomicU64; 6],
    /// gRPC responses by `grpc-status`.
    pub(crate) grpc: [AtomicU64; 17],
    pub(crate) completed: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) latency: LatencyHistogram,
    pub(crate) window: Window,
}

impl TrackStats {
    pub(crate) fn new(name: Arc<str>) -> Self {
        TrackStats {
            name,
            classes: Default::default(),
            grpc: Default::default(),
            completed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            latency: LatencyHistogram::default(),
            window: Window::default(),
        }
    }

    /// Response headers in `nanos`, with the status class index.
    pub(crate) fn answered(&self, now_s: u64, class: usize, nanos: u64) {
        self.classes[class].fetch_add(1, Ordering::Relaxed);
        self.latency.observe_nanos(nanos);
        self.window.latency(now_s, nanos / 1000);
    }

    /// A response's `grpc-status`.
    pub(crate) fn grpc_status(&self, code: u16) {
        let i = if usize::from(code) < self.grpc.len() { usize::from(code) } else { 2 };
        self.grpc[i].fetch_add(1, Ordering::Relaxed);
    }

    /// An exchange that produced no response.
    pub(crate) fn no_response(&self, now_s: u64) {
        self.classes[super::metrics::NO_RESPONSE].fetch_add(1, Ordering::Relaxed);
        self.completed(now_s, true);
    }

    /// A request ended, well or not.
    pub(crate) fn completed(&self, now_s: u64, failed: bool) {
        self.completed.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.window.completed(now_s, failed);
    }

    /// The track's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Requests that ended, and failures among them, since the proxy started.
    pub fn totals(&self) -> (u64, u64) {
        (self.completed.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }
}

/// Seconds of the process's monotonic clock, the window's time base.
pub(crate) fn now_s() -> u64 {
    super::conn::now_ms() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_their_edges_contain_their_values() {
        for micros in [0, 63, 64, 79, 80, 127, 128, 1000, 12_345, 999_999, 3_000_000] {
            let i = bucket_of(micros);
            assert!(micros < upper_edge(i), "{micros} µs in bucket {i} with upper edge {}", upper_edge(i));
            assert!(i == 0 || micros >= upper_edge(i - 1), "{micros} µs above bucket {i}'s lower edge");
        }
        assert_eq!(bucket_of(u64::MAX), LATENCY_BUCKETS - 1);
        for i in 1..LATENCY_BUCKETS - 1 {
            assert!(upper_edge(i) > upper_edge(i - 1));
        }
        // The open-ended last bucket reports its lower edge: "at least".
        assert_eq!(upper_edge(LATENCY_BUCKETS - 1), upper_edge(LATENCY_BUCKETS - 2));
    }

    #[test]
    fn percentiles_are_within_a_bucket_of_the_truth() {
        let w = Window::default();
        // 98 fast requests (1 ms) and 2 slow ones (100 ms).
        for i in 0..100 {
            w.latency(10, if i < 98 { 1000 } else { 100_000 });
            w.completed(10, i >= 98);
        }
        let s = w.summary(10, 60);
        assert_eq!((s.requests, s.failures), (100, 2));
        assert_eq!(s.success_rate(), Some(0.98));
        let p50 = s.p50_micros.unwrap();
        let p99 = s.p99_micros.unwrap();
        assert!((1000..=1300).contains(&p50), "{p50}");
        assert!((100_000..=130_000).contains(&p99), "{p99}");
    }

    #[test]
    fn the_window_slides_and_forgets_old_slots() {
        let w = Window::default();
        w.completed(0, true);
        w.completed(30, false);
        assert_eq!(w.summary(30, 60).requests, 2);
        assert_eq!(w.summary(30, 10).requests, 1, "the last 10 s: only the recent request");
        assert_eq!(w.summary(64, 60).requests, 1, "a minute later the first has left the window");
        // A slot reused for a new period starts empty.
        w.completed(60, false);
        let s = w.summary(60, 60);
        assert_eq!((s.requests, s.failures), (2, 0));
        assert_eq!(w.summary(200, 60), WindowSummary { seconds: 60, ..WindowSummary::default() });
    }
}
