//! LeastConnections and LeastRequest.

use std::collections::BTreeSet;

use fulcrum::balance::{Algorithm, Balancer, Pick, Request};
use proptest::prelude::*;

use crate::common::*;

/// Holds `loads[i]` picks open on endpoint i, by picking until each has its share.
fn hold(b: &mut Balancer, loads: &[u32]) -> Vec<Pick> {
    let mut held = Vec::new();
    for (i, &load) in loads.iter().enumerate() {
        let m = b.set().members()[i].endpoint().clone();
        let exclude: Vec<_> = (0..loads.len()).filter(|&j| j != i).map(addr).collect();
        while m.in_flight() < load {
            let p = b.pick(&Request { exclude: &exclude, ..Default::default() }).expect("endpoint i");
            assert_eq!(p.addr(), addr(i));
            held.push(p);
        }
    }
    held
}

proptest! {
    #[test]
    fn least_connections_never_picks_a_strictly_busier_endpoint(
        loads in prop::collection::vec(0u32..6, 1..30),
    ) {
        let (_, mut b) = simple(Algorithm::LeastConnections, specs(loads.len()));
        let _held = hold(&mut b, &loads);
        let min = *loads.iter().min().unwrap();
        for _ in 0..loads.len() {
            let p = b.pick(&Request::default()).unwrap();
            let i = (0..loads.len()).find(|&i| addr(i) == p.addr()).unwrap();
            prop_assert_eq!(loads[i], min);
        }
    }

    #[test]
    fn least_request_never_picks_the_busier_of_its_two_choices(
        a in 0u32..8, b_load in 0u32..8,
    ) {
        // With two endpoints both are always considered.
        let (_, mut b) = simple(Algorithm::LeastRequest, specs(2));
        let _held = hold(&mut b, &[a, b_load]);
        for _ in 0..20 {
            let p = b.pick(&Request::default()).unwrap();
            let chosen = if p.addr() == addr(0) { a } else { b_load };
            prop_assert!(chosen <= a.min(b_load));
        }
    }

    #[test]
    fn least_request_never_picks_the_unique_busiest(
        loads in prop::collection::vec(0u32..6, 2..30),
    ) {
        let max = *loads.iter().max().unwrap();
        prop_assume!(loads.iter().filter(|&&l| l == max).count() == 1);
        let (_, mut b) = simple(Algorithm::LeastRequest, specs(loads.len()));
        let _held = hold(&mut b, &loads);
        let busiest = addr(loads.iter().position(|&l| l == max).unwrap());
        for _ in 0..200 {
            prop_assert_ne!(pick_addr(&mut b, &Request::default()), Some(busiest));
        }
    }
}

#[test]
fn least_connections_ties_rotate() {
    let (_, mut b) = simple(Algorithm::LeastConnections, specs(7));
    let seen: Vec<_> = (0..7).map(|_| pick_addr(&mut b, &Request::default()).unwrap()).collect();
    assert_eq!(seen.iter().collect::<BTreeSet<_>>().len(), 7, "idle endpoints take turns: {seen:?}");
}

#[test]
fn least_request_ties_rotate() {
    let (_, mut b) = simple(Algorithm::LeastRequest, specs(7));
    let counts = distribution(&mut b, 7000);
    assert_eq!(counts.len(), 7);
    assert!(counts.values().all(|&c| c > 800), "{counts:?}");
}

#[test]
fn least_connections_prefers_heavier_endpoints_in_proportion() {
    // weight 2 takes two connections for each one on weight 1 (HAProxy leastconn)
    let (_, mut b) = simple(Algorithm::LeastConnections, weighted(&[2, 1]));
    let held: Vec<Pick> = (0..30).map(|_| b.pick(&Request::default()).unwrap()).collect();
    let on_heavy = held.iter().filter(|p| p.addr() == addr(0)).count();
    assert_eq!(on_heavy, 20);
}

proptest! {
    #[test]
    fn least_connections_holds_after_snapshots_reshuffle_its_counters(
        loads in prop::collection::vec(0u32..5, 2..20),
        weights in prop::collection::vec(1u32..4, 20),
    ) {
        // Dropping endpoints and adding others reuses counter slots out of
        // address order; the choice must still be the least loaded.
        let (clock, _) = simple(Algorithm::LeastConnections, vec![]);
        let first = set(&clock, specs(loads.len() + 5));
        let kept: Vec<_> = specs(loads.len() + 5).into_iter().skip(5).collect();
        let middle = std::sync::Arc::new(first.update(kept).unwrap());
        drop(first);
        let n = loads.len();
        let last = std::sync::Arc::new(
            middle.update((0..n).map(|i| fulcrum::balance::EndpointSpec::new(addr(i)).weight(weights[i]))).unwrap(),
        );
        let config = fulcrum::balance::BalancerConfig { panic_threshold_percent: 0, ..fulcrum::balance::BalancerConfig::new(Algorithm::LeastConnections) };
        let mut b = balancer(config, last);
        let _held = hold(&mut b, &loads);
        let score = |i: usize| (f64::from(loads[i]) + 1.0) / f64::from(weights[i]);
        let best = (0..n).map(score).fold(f64::INFINITY, f64::min);
        let p = b.pick(&Request::default()).unwrap();
        let i = (0..n).find(|&i| addr(i) == p.addr()).unwrap();
        prop_assert_eq!(score(i), best);
    }
}
