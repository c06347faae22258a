//! Random (weighted).

use fulcrum::balance::Algorithm;

use crate::common::*;

/// |observed − expected| ≤ 3σ of the binomial, for each endpoint.
fn assert_within_3_sigma(weights: &[u32], picks: usize) {
    let (_, mut b) = simple(Algorithm::Random, weighted(weights));
    let counts = distribution(&mut b, picks);
    let total: u32 = weights.iter().sum();
    for (i, &w) in weights.iter().enumerate() {
        let p = f64::from(w) / f64::from(total);
        let expected = picks as f64 * p;
        let sigma = (picks as f64 * p * (1.0 - p)).sqrt();
        let got = counts.get(&addr(i)).copied().unwrap_or(0) as f64;
        assert!(
            (got - expected).abs() <= 3.0 * sigma,
            "endpoint {i} (weight {w}): {got} picks, expected {expected:.0} ± {:.0}",
            3.0 * sigma
        );
    }
}

#[test]
fn uniform_random_is_within_3_sigma_over_100k_picks() {
    assert_within_3_sigma(&[1; 10], 100_000);
}

#[test]
fn weighted_random_is_within_3_sigma_over_100k_picks() {
    assert_within_3_sigma(&[1, 2, 3, 4, 10], 100_000);
}

#[test]
fn the_same_seed_gives_the_same_choices() {
    let (_, mut a) = simple(Algorithm::Random, specs(10));
    let (_, mut b) = simple(Algorithm::Random, specs(10));
    for _ in 0..1000 {
        assert_eq!(pick_addr(&mut a, &Default::default()), pick_addr(&mut b, &Default::default()));
    }
}
