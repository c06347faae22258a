//! Session affinity, slow start, panic mode, track split, load accounting
//! and snapshot replacement.

use std::sync::Arc;
use std::time::Duration;

use fulcrum::balance::{Algorithm, BalancerConfig, EndpointSpec, HealthFlag, ManualClock, Outcome, Request};

use crate::common::*;

// ---- session affinity ----

#[test]
fn an_affinity_token_pins_the_client_while_its_endpoint_is_healthy() {
    let (_, mut b) = simple(Algorithm::RoundRobin, specs(5));
    let first = b.pick(&Request::default()).unwrap();
    let token = first.affinity_token();
    let pinned = Request { affinity: Some(token), ..Default::default() };
    for _ in 0..20 {
        assert_eq!(pick_addr(&mut b, &pinned), Some(first.addr()));
    }
}

#[test]
fn affinity_falls_back_to_the_algorithm_when_the_endpoint_is_unhealthy_or_gone() {
    let clock = Arc::new(ManualClock::new());
    let config = BalancerConfig { panic_threshold_percent: 0, ..BalancerConfig::new(Algorithm::RoundRobin) };
    let s = set(&clock, specs(3));
    let mut b = balancer(config, s.clone());
    let victim = s.members()[1].endpoint().clone();
    let pinned = Request { affinity: Some(victim.affinity_token()), ..Default::default() };
    assert_eq!(pick_addr(&mut b, &pinned), Some(victim.addr()));

    victim.set_flag(HealthFlag::Ejected, true);
    let fallbacks: Vec<_> = (0..4).map(|_| pick_addr(&mut b, &pinned).unwrap()).collect();
    assert!(fallbacks.iter().all(|&a| a != victim.addr()), "{fallbacks:?}");
    assert_eq!(fallbacks, [addr(0), addr(2), addr(0), addr(2)], "the algorithm decides");

    victim.set_flag(HealthFlag::Ejected, false);
    assert_eq!(pick_addr(&mut b, &pinned), Some(victim.addr()), "back once healthy");

    let without: Vec<EndpointSpec> = specs(3).into_iter().filter(|s| s.addr != victim.addr()).collect();
    b.update_set(Arc::new(s.update(without).unwrap()));
    assert_ne!(pick_addr(&mut b, &pinned), Some(victim.addr()));
}

#[test]
fn a_retry_does_not_go_back_to_the_pinned_endpoint() {
    let (_, mut b) = simple(Algorithm::RoundRobin, specs(3));
    let token = b.set().members()[0].endpoint().affinity_token();
    let retry = Request { affinity: Some(token), exclude: &[addr(0)], ..Default::default() };
    for _ in 0..10 {
        assert_ne!(pick_addr(&mut b, &retry), Some(addr(0)));
    }
}

// ---- slow start ----

#[test]
fn a_new_endpoint_ramps_from_a_tenth_to_full_weight_over_the_window() {
    let clock = Arc::new(ManualClock::new());
    let window = Duration::from_secs(100);
    let config = BalancerConfig { slow_start: Some(window), ..BalancerConfig::new(Algorithm::WeightedRoundRobin) };
    let s0 = set(&clock, specs(2));
    let mut b = balancer(config, s0.clone());
    clock.advance(Duration::from_secs(1000));
    b.update_set(Arc::new(s0.update(specs(3)).unwrap()));
    let newcomer = addr(2);
    // Warm endpoints weigh 10 tenths; the newcomer k tenths at k/10 of the window.
    let mut shares = Vec::new();
    for tenth in [0u32, 3, 5, 9, 10, 20] {
        let at = window * tenth / 10;
        let target = Duration::from_secs(1000) + at;
        let now = Duration::from_nanos(clock_now(&clock));
        clock.advance(target - now);
        let k = tenth.clamp(1, 10) as usize;
        let cycle = 20 + k;
        let counts = distribution(&mut b, cycle);
        assert_eq!(counts.get(&newcomer).copied().unwrap_or(0), k, "at {tenth}/10 of the window");
        shares.push(k as f64 / cycle as f64);
    }
    assert!(shares.windows(2).all(|w| w[0] <= w[1]));
    assert!((shares[0] - 1.0 / 21.0).abs() < 1e-9 && (shares[4] - 1.0 / 3.0).abs() < 1e-9);
}

fn clock_now(clock: &ManualClock) -> u64 {
    use fulcrum::balance::Clock;
    clock.now().0
}

#[test]
fn a_recovered_endpoint_ramps_again() {
    let clock = Arc::new(ManualClock::new());
    let config = BalancerConfig {
        slow_start: Some(Duration::from_secs(10)),
        panic_threshold_percent: 0,
        ..BalancerConfig::new(Algorithm::RoundRobin)
    };
    let s = set(&clock, specs(2));
    let mut b = balancer(config, s.clone());
    let e = s.members()[1].endpoint().clone();
    assert_eq!(e.slow_start_since(), None, "the first snapshot is warm");
    e.set_flag(HealthFlag::ActiveCheckFailed, true);
    clock.advance(Duration::from_secs(5));
    e.set_flag(HealthFlag::ActiveCheckFailed, false);
    let counts = distribution(&mut b, 11);
    assert_eq!(counts[&addr(1)], 1, "a tenth of the weight of its peer");
}

// ---- panic mode ----

#[test]
fn below_the_panic_threshold_traffic_spreads_over_all_endpoints_but_draining_ones() {
    let clock = Arc::new(ManualClock::new());
    let config = BalancerConfig { panic_threshold_percent: 50, ..BalancerConfig::new(Algorithm::RoundRobin) };
    let s = set(&clock, specs(10));
    let mut b = balancer(config, s.clone());
    for m in &s.members()[..5] {
        m.endpoint().set_flag(HealthFlag::ActiveCheckFailed, true);
    }
    assert!(!b.in_panic(), "5 of 10 is not below 50%");
    assert_eq!(distribution(&mut b, 50).len(), 5);

    s.members()[5].endpoint().set_flag(HealthFlag::NotReady, true);
    assert!(b.in_panic(), "4 of 10 is below 50%");
    s.members()[9].endpoint().set_flag(HealthFlag::Draining, true);
    let counts = distribution(&mut b, 90);
    assert_eq!(counts.len(), 9, "everything but the draining endpoint");
    assert!(!counts.contains_key(&addr(9)));
}

#[test]
fn panic_mode_is_off_at_threshold_zero() {
    let (_, mut b) = simple(Algorithm::RoundRobin, specs(4));
    for m in &b.set().members()[..3] {
        m.endpoint().set_flag(HealthFlag::ActiveCheckFailed, true);
    }
    assert!(!b.in_panic());
    assert_eq!(distribution(&mut b, 10).keys().copied().collect::<Vec<_>>(), [addr(3)]);
}

// ---- tracks ----

fn canary_set(stable: usize, canary: usize) -> Vec<EndpointSpec> {
    (0..stable + canary)
        .map(|i| EndpointSpec::new(addr(i)).track(if i < stable { "stable" } else { "canary" }))
        .collect()
}

fn track_config(algorithm: Algorithm, canary_percent: u32) -> BalancerConfig {
    BalancerConfig {
        tracks: vec![("stable".into(), 100 - canary_percent), ("canary".into(), canary_percent)],
        ..BalancerConfig::new(algorithm)
    }
}

#[test]
fn tracks_split_traffic_by_weight_whatever_their_endpoint_counts() {
    for algorithm in Algorithm::ALL {
        let clock = Arc::new(ManualClock::new());
        let mut b = balancer(track_config(algorithm, 10), set(&clock, canary_set(9, 1)));
        let picks = 100_000;
        let counts = distribution(&mut b, picks);
        let canary = counts.get(&addr(9)).copied().unwrap_or(0) as f64 / picks as f64;
        assert!((canary - 0.10).abs() <= 0.01, "{algorithm}: canary got {canary}");
        // and the other way round: one stable endpoint, nine canaries
        let mut b = balancer(track_config(algorithm, 90), set(&clock, canary_set(1, 9)));
        let counts = distribution(&mut b, picks);
        let stable = counts.get(&addr(0)).copied().unwrap_or(0) as f64 / picks as f64;
        assert!((stable - 0.10).abs() <= 0.01, "{algorithm}: stable got {stable}");
    }
}

#[test]
fn a_track_with_nothing_available_gives_its_share_to_the_others() {
    let clock = Arc::new(ManualClock::new());
    let s = set(&clock, canary_set(3, 2));
    let mut b =
        balancer(BalancerConfig { panic_threshold_percent: 0, ..track_config(Algorithm::RoundRobin, 50) }, s.clone());
    for m in &s.members()[3..] {
        m.endpoint().set_flag(HealthFlag::NotReady, true);
    }
    let counts = distribution(&mut b, 300);
    assert_eq!(counts.len(), 3);
    assert!(counts.values().all(|&c| c == 100));
}

#[test]
fn a_track_at_weight_zero_gets_nothing() {
    let clock = Arc::new(ManualClock::new());
    let mut b = balancer(track_config(Algorithm::Random, 0), set(&clock, canary_set(2, 2)));
    let counts = distribution(&mut b, 1000);
    assert_eq!(counts.keys().copied().collect::<Vec<_>>(), [addr(0), addr(1)]);
    let canary_token = b.set().members()[3].endpoint().affinity_token();
    let pinned = Request { affinity: Some(canary_token), ..Default::default() };
    assert_ne!(pick_addr(&mut b, &pinned), Some(addr(3)), "a pin does not reopen a closed track");
    let retry = Request { exclude: &[addr(0), addr(1)], ..Default::default() };
    assert_eq!(pick_addr(&mut b, &retry), None, "nor does a retry");
}

// ---- accounting ----

#[test]
fn the_guard_counts_in_flight_work_until_it_completes_or_drops() {
    let (clock, mut b) = simple(Algorithm::RoundRobin, specs(1));
    let e = b.set().members()[0].endpoint().clone();
    let p1 = b.pick(&Request::default()).unwrap();
    let p2 = b.pick(&Request::default()).unwrap();
    let p3 = b.pick(&Request::default()).unwrap();
    assert_eq!(e.in_flight(), 3);
    clock.advance(Duration::from_millis(500));
    p1.complete(Outcome::Success);
    assert_eq!((e.in_flight(), e.requests(), e.failures()), (2, 1, 0));
    assert_eq!(e.latency_estimate(), Duration::from_millis(500), "a slower sample is the new peak");
    p2.complete(Outcome::Failure);
    assert_eq!((e.in_flight(), e.requests(), e.failures(), e.consecutive_failures()), (1, 2, 1, 1));
    drop(p3);
    assert_eq!((e.in_flight(), e.requests(), e.failures(), e.consecutive_failures()), (0, 3, 1, 1));
    let references = Arc::strong_count(&e);
    b.pick(&Request::default()).unwrap().complete(Outcome::Success);
    assert_eq!(e.consecutive_failures(), 0, "a success resets the run of failures");
    assert_eq!(Arc::strong_count(&e), references, "a completed guard keeps no reference");
}

#[test]
fn replacing_the_set_keeps_the_state_of_endpoints_that_stay() {
    let clock = Arc::new(ManualClock::new());
    let s0 = set(&clock, specs(3));
    let mut b = balancer(BalancerConfig::new(Algorithm::LeastConnections), s0.clone());
    let held: Vec<_> = (0..3).map(|_| b.pick(&Request::default()).unwrap()).collect();
    s0.members()[1].endpoint().set_flag(HealthFlag::ActiveCheckFailed, true);
    let s1 = Arc::new(s0.update(specs(4).into_iter().skip(1).map(|s| s.weight(3))).unwrap());
    b.update_set(s1.clone());
    assert_eq!(s1.len(), 3);
    assert!(Arc::ptr_eq(s1.members()[0].endpoint(), s0.members()[1].endpoint()));
    assert_eq!(s1.members()[0].endpoint().in_flight(), 1);
    assert!(!s1.members()[0].endpoint().health().is_available());
    assert_eq!(s1.members()[0].weight(), 3, "settings come from the new snapshot");
    assert_eq!(s1.members()[2].endpoint().in_flight(), 0, "a newcomer starts afresh");
    drop(held);
    assert!(s1.members().iter().all(|m| m.endpoint().in_flight() == 0), "old guards release into the same state");
}

// ---- zones ----

/// Three endpoints in zone a (addresses 0..3), three in zone b (3..6).
fn zoned(algorithm: Algorithm, min_healthy: u8) -> (Arc<fulcrum::balance::EndpointSet>, fulcrum::balance::Balancer) {
    let clock = Arc::new(ManualClock::new());
    let zone = |i: usize| Some(Arc::from(if i < 3 { "a" } else { "b" }));
    let specs: Vec<EndpointSpec> = (0..6).map(|i| EndpointSpec::new(addr(i)).zone(zone(i))).collect();
    let config = BalancerConfig {
        local_zone: Some(Arc::from("a")),
        zone_min_healthy_percent: min_healthy,
        ..BalancerConfig::new(algorithm)
    };
    let s = set(&clock, specs);
    (s.clone(), balancer(config, s))
}

#[test]
fn zone_aware_keeps_traffic_in_the_local_zone_while_it_has_the_capacity() {
    for algorithm in [Algorithm::RoundRobin, Algorithm::LeastRequest, Algorithm::PeakEwma, Algorithm::Random] {
        let (s, mut b) = zoned(algorithm, 60);
        let counts = distribution(&mut b, 300);
        assert!(counts.keys().all(|a| *a < addr(3)), "{algorithm:?}: all local: {counts:?}");
        assert_eq!(counts.len(), 3, "{algorithm:?}: the algorithm still spreads within the zone");
        // One of three local endpoints out: 67% ≥ 60%, the zone keeps the traffic.
        s.members()[0].endpoint().set_flag(HealthFlag::Ejected, true);
        let counts = distribution(&mut b, 300);
        assert!(counts.keys().all(|a| *a < addr(3) && *a != addr(0)), "{algorithm:?}: {counts:?}");
        // Two out: 33% < 60%, every zone's available endpoints share it.
        s.members()[1].endpoint().set_flag(HealthFlag::Ejected, true);
        let counts = distribution(&mut b, 400);
        assert_eq!(counts.len(), 4, "{algorithm:?}: spilled over: {counts:?}");
        assert!(!counts.contains_key(&addr(0)) && !counts.contains_key(&addr(1)));
        // Back: local again.
        s.members()[1].endpoint().set_flag(HealthFlag::Ejected, false);
        assert!(distribution(&mut b, 100).keys().all(|a| *a < addr(3)), "{algorithm:?}");
    }
}

#[test]
fn without_a_local_zone_or_zones_balancing_ignores_them() {
    let clock = Arc::new(ManualClock::new());
    let mut b = balancer(BalancerConfig::new(Algorithm::RoundRobin), set(&clock, specs(4)));
    assert_eq!(distribution(&mut b, 40).len(), 4);
    // A local zone no endpoint is in: every endpoint.
    let config = BalancerConfig { local_zone: Some(Arc::from("c")), ..BalancerConfig::new(Algorithm::RoundRobin) };
    let mut b = balancer(config, set(&clock, specs(4)));
    assert_eq!(distribution(&mut b, 40).len(), 4);
}

/// Endpoints in zones a (1), b (3) and c (2), as a proxy in `local` sees
/// them with two proxies in every zone.
fn uneven_zones(local: &str) -> fulcrum::balance::Balancer {
    let clock = Arc::new(ManualClock::new());
    let zone = |i: usize| {
        Some(Arc::from(match i {
            0 => "a",
            1..=3 => "b",
            _ => "c",
        }))
    };
    let specs: Vec<EndpointSpec> = (0..6).map(|i| EndpointSpec::new(addr(i)).zone(zone(i))).collect();
    let config = BalancerConfig {
        local_zone: Some(Arc::from(local)),
        zone_proxies: ["a", "b", "c"].iter().map(|z| (Arc::from(*z), 2)).collect(),
        ..BalancerConfig::new(Algorithm::RoundRobin)
    };
    balancer(config, set(&clock, specs))
}

#[test]
fn a_zone_with_less_than_its_share_of_capacity_spills_the_rest_to_zones_with_capacity_to_spare() {
    // Zone a has 1/6 of the endpoints and 1/3 of the proxies: its endpoint
    // takes half of the local proxy's traffic, and the other half goes to b,
    // the one zone with more endpoints (3/6) than proxies (2/6); c has
    // exactly its share and takes none of a's traffic.
    let a = distribution(&mut uneven_zones("a"), 6000);
    assert_eq!(a.get(&addr(0)), Some(&3000), "{a:?}");
    for i in 1..=3 {
        assert_eq!(a.get(&addr(i)), Some(&1000), "{a:?}");
    }
    assert!(!a.contains_key(&addr(4)) && !a.contains_key(&addr(5)), "{a:?}");
    // b and c have at least their share: their proxies stay in their zone.
    let b = distribution(&mut uneven_zones("b"), 6000);
    assert!(b.keys().all(|k| (1..=3).any(|i| addr(i) == *k)), "{b:?}");
    let c = distribution(&mut uneven_zones("c"), 6000);
    assert!(c.keys().all(|k| *k == addr(4) || *k == addr(5)), "{c:?}");
    // With every proxy sending the same traffic, every endpoint gets the same load.
    let mut total = a;
    for (k, v) in b.into_iter().chain(c) {
        *total.entry(k).or_default() += v;
    }
    assert!(total.values().all(|v| *v == 3000), "{total:?}");
}

#[test]
fn a_hashed_request_keeps_its_zone_and_endpoint_while_the_zones_split_the_traffic() {
    let clock = Arc::new(ManualClock::new());
    let zone = |i: usize| Some(Arc::from(if i == 0 { "a" } else { "b" }));
    let specs: Vec<EndpointSpec> = (0..4).map(|i| EndpointSpec::new(addr(i)).zone(zone(i))).collect();
    let config = BalancerConfig {
        local_zone: Some(Arc::from("a")),
        zone_proxies: vec![(Arc::from("a"), 1), (Arc::from("b"), 1)],
        ..BalancerConfig::new(Algorithm::ConsistentHash)
    };
    let mut b = balancer(config, set(&clock, specs));
    let mut local = 0;
    for key in 0..2000u64 {
        let hash = key.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let req = Request { hash: Some(hash), ..Default::default() };
        let first = pick_addr(&mut b, &req);
        for _ in 0..3 {
            assert_eq!(pick_addr(&mut b, &req), first, "key {key}");
        }
        local += u32::from(first == Some(addr(0)));
    }
    // Zone a: 1/4 of the endpoints, 1/2 of the proxies → half the keys stay.
    assert!((900..1100).contains(&local), "{local} of 2000 keys local");
}
