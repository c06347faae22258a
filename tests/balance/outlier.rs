//! Passive outlier ejection.

use std::time::Duration;

use fulcrum::balance::{Algorithm, Balancer, Outcome, OutlierConfig, OutlierDetector, OutlierEvent, Request};

use crate::common::*;

const SECOND: Duration = Duration::from_secs(1);

/// `n` requests to endpoint `i`, each ending with `outcome`.
fn send(b: &mut Balancer, i: usize, n: usize, outcome: Outcome) {
    let others: Vec<_> = (0..b.set().len()).filter(|&j| j != i).map(addr).collect();
    for _ in 0..n {
        let p = b.pick(&Request { exclude: &others, ..Default::default() }).expect("endpoint i");
        p.complete(outcome);
    }
}

fn detector() -> OutlierDetector {
    OutlierDetector::new(OutlierConfig::default())
}

#[test]
fn consecutive_failures_eject_and_the_ejection_ends_on_time() {
    let (clock, mut b) = simple(Algorithm::RoundRobin, specs(3));
    let mut d = detector();
    send(&mut b, 0, 4, Outcome::Failure);
    assert_eq!(d.sweep(b.set(), b.set().clock().now()), [], "4 failures are below the threshold");
    send(&mut b, 0, 1, Outcome::Failure);
    let events = d.sweep(b.set(), b.set().clock().now());
    assert_eq!(events, [OutlierEvent::Ejected { addr: addr(0), duration: 30 * SECOND }]);
    assert!(distribution(&mut b, 30).keys().all(|&a| a != addr(0)), "no traffic while ejected");

    clock.advance(29 * SECOND);
    assert_eq!(d.sweep(b.set(), b.set().clock().now()), []);
    clock.advance(SECOND);
    assert_eq!(d.sweep(b.set(), b.set().clock().now()), [OutlierEvent::Restored { addr: addr(0) }]);
    assert_eq!(b.set().members()[0].endpoint().consecutive_failures(), 0);
    assert_eq!(distribution(&mut b, 30).len(), 3);
}

#[test]
fn a_success_breaks_the_run() {
    let (_, mut b) = simple(Algorithm::RoundRobin, specs(3));
    let mut d = detector();
    send(&mut b, 1, 4, Outcome::Failure);
    send(&mut b, 1, 1, Outcome::Success);
    send(&mut b, 1, 4, Outcome::Failure);
    assert_eq!(d.sweep(b.set(), b.set().clock().now()), []);
}

#[test]
fn repeat_ejections_double_and_good_behaviour_earns_them_back() {
    let (clock, mut b) = simple(Algorithm::RoundRobin, specs(3));
    let mut d = detector();
    let eject_for = |b: &mut Balancer, d: &mut OutlierDetector| {
        send(b, 2, 5, Outcome::Failure);
        let events = d.sweep(b.set(), b.set().clock().now());
        let [OutlierEvent::Ejected { duration, .. }] = events[..] else { panic!("{events:?}") };
        clock.advance(duration);
        assert_eq!(d.sweep(b.set(), b.set().clock().now()), [OutlierEvent::Restored { addr: addr(2) }]);
        duration
    };
    assert_eq!(eject_for(&mut b, &mut d), 30 * SECOND);
    assert_eq!(eject_for(&mut b, &mut d), 60 * SECOND);
    assert_eq!(eject_for(&mut b, &mut d), 120 * SECOND);
    // Healthy for three base periods: all three ejections forgiven.
    for _ in 0..3 {
        clock.advance(30 * SECOND);
        d.sweep(b.set(), b.set().clock().now());
    }
    assert_eq!(eject_for(&mut b, &mut d), 30 * SECOND);
}

#[test]
fn never_more_than_the_allowed_share_is_ejected() {
    let (_, mut b) = simple(Algorithm::RoundRobin, specs(4));
    let mut d = detector();
    for i in 0..4 {
        send(&mut b, i, 5, Outcome::Failure);
    }
    let events = d.sweep(b.set(), b.set().clock().now());
    let ejected = events.iter().filter(|e| matches!(e, OutlierEvent::Ejected { .. })).count();
    let spared = events.iter().filter(|e| matches!(e, OutlierEvent::Spared { .. })).count();
    assert_eq!((ejected, spared), (2, 2), "50% of 4: {events:?}");
    assert_eq!(distribution(&mut b, 20).len(), 2);
}
