//! RoundRobin and WeightedRoundRobin.

use std::collections::BTreeSet;

use fulcrum::balance::{Algorithm, HealthFlag, Request};
use proptest::prelude::*;

use crate::common::*;

#[test]
fn smooth_wrr_gives_the_nginx_sequence_for_5_1_1() {
    let (_, mut b) = simple(Algorithm::WeightedRoundRobin, weighted(&[5, 1, 1]));
    let (a_, b_, c_) = (addr(0), addr(1), addr(2));
    let seq: Vec<_> = (0..14).map(|_| pick_addr(&mut b, &Request::default()).unwrap()).collect();
    let cycle = [a_, a_, b_, a_, c_, a_, a_];
    assert_eq!(seq[..7], cycle);
    assert_eq!(seq[7..], cycle, "the sequence repeats every total-weight picks");
}

#[test]
fn round_robin_ignores_weights() {
    let (_, mut b) = simple(Algorithm::RoundRobin, weighted(&[5, 1, 1]));
    let seq: Vec<_> = (0..6).map(|_| pick_addr(&mut b, &Request::default()).unwrap()).collect();
    assert_eq!(seq, [addr(0), addr(1), addr(2), addr(0), addr(1), addr(2)]);
}

proptest! {
    #[test]
    fn any_n_consecutive_round_robin_picks_hit_each_healthy_endpoint_once(
        n in 1usize..40,
        down in prop::collection::vec(any::<bool>(), 40),
        skip in 0usize..100,
    ) {
        let (_, mut b) = simple(Algorithm::RoundRobin, specs(n));
        for (i, m) in b.set().members().iter().enumerate() {
            m.endpoint().set_flag(HealthFlag::ActiveCheckFailed, down[i]);
        }
        let healthy: BTreeSet<_> = (0..n).filter(|&i| !down[i]).map(addr).collect();
        let picks: Vec<_> = (0..skip + 3 * healthy.len().max(1))
            .filter_map(|_| pick_addr(&mut b, &Request::default()))
            .collect();
        prop_assert_eq!(picks.is_empty(), healthy.is_empty());
        for window in picks[skip.min(picks.len())..].windows(healthy.len().max(1)) {
            let seen: BTreeSet<_> = window.iter().copied().collect();
            prop_assert_eq!(&seen, &healthy);
        }
    }

    #[test]
    fn weighted_round_robin_shares_are_exact_over_full_cycles(
        weights in prop::collection::vec(1u32..10, 1..20),
        cycles in 1usize..4,
    ) {
        let total: u32 = weights.iter().sum();
        let (_, mut b) = simple(Algorithm::WeightedRoundRobin, weighted(&weights));
        let counts = distribution(&mut b, cycles * total as usize);
        for (i, &w) in weights.iter().enumerate() {
            prop_assert_eq!(counts.get(&addr(i)).copied().unwrap_or(0), cycles * w as usize);
        }
    }
}
