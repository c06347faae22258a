//! PeakEwma, and the other load-aware algorithms, against a slow endpoint.
//!
//! A discrete-event simulation on the manual clock: a closed loop of
//! concurrent clients, each sending its next request when the previous one
//! completes; endpoint 0 answers in 100 ms, the others in 10 ms.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use fulcrum::balance::{Algorithm, Outcome, Pick, Request};

use crate::common::*;

const ENDPOINTS: usize = 5;
const CLIENTS: usize = 8;
const REQUESTS: usize = 20_000;

/// Share of requests that went to the slow endpoint.
fn slow_share(algorithm: Algorithm) -> f64 {
    let (clock, mut b) = simple(algorithm, specs(ENDPOINTS));
    let latency = |p: &Pick| if p.addr() == addr(0) { 100_000_000u64 } else { 10_000_000 };
    // (completion time, sequence) → pick; the sequence keeps the order total.
    let mut in_flight: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
    let mut picks: Vec<Option<Pick>> = Vec::new();
    let mut now = 0u64;
    let mut slow = 0usize;
    for sent in 0..REQUESTS {
        if in_flight.len() == CLIENTS {
            let Reverse((done, seq)) = in_flight.pop().unwrap();
            clock.advance(Duration::from_nanos(done - now));
            now = done;
            picks[seq].take().unwrap().complete(Outcome::Success);
        }
        let p = b.pick(&Request::default()).unwrap();
        slow += usize::from(p.addr() == addr(0));
        in_flight.push(Reverse((now + latency(&p), sent)));
        picks.push(Some(p));
    }
    slow as f64 / REQUESTS as f64
}

#[test]
fn peak_ewma_sends_a_10x_slower_endpoint_a_small_share() {
    let share = slow_share(Algorithm::PeakEwma);
    eprintln!("PeakEwma: slow endpoint got {:.2}% of requests (fair share 20%)", share * 100.0);
    // Measured: 0.25% (50 of 20 000 requests) with this seed.
    assert!(share < 0.01, "slow endpoint got {:.2}%", share * 100.0);
}

#[test]
fn load_aware_algorithms_beat_round_robin_on_a_slow_endpoint() {
    let rr = slow_share(Algorithm::RoundRobin);
    assert!((rr - 0.2).abs() < 0.001, "round robin is blind to latency: {rr}");
    for algorithm in [Algorithm::LeastConnections, Algorithm::LeastRequest, Algorithm::PeakEwma] {
        let share = slow_share(algorithm);
        eprintln!("{algorithm}: slow endpoint got {:.2}%", share * 100.0);
        assert!(share < 0.10, "{algorithm}: {share}");
    }
}

#[test]
fn latency_observed_before_completion_is_counted_once_and_load_until_completion() {
    let (clock, mut b) = simple(Algorithm::PeakEwma, specs(1));
    let mut p = b.pick(&Request::default()).unwrap();
    // Response headers after 200 ms: the estimate jumps to the peak at once.
    clock.advance(Duration::from_millis(200));
    p.observe_latency_at(fulcrum::balance::Nanos(200_000_000));
    let e = p.endpoint().clone();
    assert!((e.latency_estimate().as_secs_f64() - 0.2).abs() < 1e-6, "{:?}", e.latency_estimate());
    assert_eq!(e.in_flight(), 1, "still streaming the body");
    // The body ends 10 s later: that time is not a latency sample.
    clock.advance(Duration::from_secs(10));
    p.complete(Outcome::Success);
    assert_eq!(e.in_flight(), 0);
    assert!(e.latency_estimate() < Duration::from_millis(200), "{:?}", e.latency_estimate());
}

#[test]
fn an_unmeasured_endpoint_gets_one_probe_at_a_time_until_its_first_sample() {
    let (clock, mut b) = simple(Algorithm::PeakEwma, specs(3));
    // Measure endpoints 0 and 1 at 1 ms; endpoint 2 is never picked while they are.
    let mut measured = 0;
    while measured < 2 {
        let p = b.pick(&Request { exclude: &[addr(2)], ..Request::default() }).unwrap();
        clock.advance(Duration::from_millis(1));
        measured += usize::from(p.endpoint().requests() == 0);
        p.complete(Outcome::Success);
    }
    // The unmeasured endpoint wins every pair it is in while idle, and then,
    // with its probe in flight, loses to the measured ones.
    let mut held = Vec::new();
    let mut probes = 0;
    for _ in 0..200 {
        let p = b.pick(&Request::default()).unwrap();
        if p.addr() == addr(2) {
            probes += 1;
            held.push(p);
        } else {
            p.complete(Outcome::Success);
        }
    }
    assert_eq!(probes, 1, "one probe while the first is unanswered");
    // It answers as fast as the others have been answering since (instantly, on this clock).
    held.pop().unwrap().complete(Outcome::Success);
    let after = distribution(&mut b, 300);
    assert!(after[&addr(2)] > 50, "measured as fast as the others, it takes its share: {after:?}");
}
