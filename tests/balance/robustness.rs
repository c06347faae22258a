//! No input makes the balancer panic or hand out what it must not.

use std::sync::Arc;
use std::time::Duration;

use fulcrum::balance::{
    AffinityToken, Algorithm, BalancerConfig, EndpointSet, EndpointSpec, EwmaConfig, HealthFlag, ManualClock, Request,
    SetError,
};
use proptest::prelude::*;

use crate::common::*;

#[test]
fn an_empty_set_returns_no_endpoint_for_every_algorithm() {
    for algorithm in Algorithm::ALL {
        let (_, mut b) = simple(algorithm, Vec::new());
        let req = Request { hash: Some(7), affinity: Some(AffinityToken::of(addr(0))), exclude: &[addr(0)] };
        assert!(b.pick(&Request::default()).is_none(), "{algorithm}");
        assert!(b.pick(&req).is_none(), "{algorithm}");
        assert!(!b.in_panic());
    }
}

#[test]
fn nothing_available_returns_no_endpoint_for_every_algorithm() {
    for algorithm in Algorithm::ALL {
        let (_, mut b) = simple(algorithm, specs(3));
        let flags = [HealthFlag::ActiveCheckFailed, HealthFlag::Ejected, HealthFlag::Draining];
        for (m, flag) in b.set().members().iter().zip(flags) {
            m.endpoint().set_flag(flag, true);
        }
        assert!(b.pick(&Request::default()).is_none(), "{algorithm}");
    }
}

#[test]
fn a_retry_excluding_every_endpoint_returns_none() {
    let every: Vec<_> = (0..3).map(addr).collect();
    for algorithm in Algorithm::ALL {
        let (_, mut b) = simple(algorithm, specs(3));
        assert!(b.pick(&Request { exclude: &every, hash: Some(1), ..Default::default() }).is_none(), "{algorithm}");
    }
}

#[test]
fn duplicate_addresses_are_refused() {
    let clock = Arc::new(ManualClock::new());
    let twice = vec![EndpointSpec::new(addr(0)), EndpointSpec::new(addr(1)), EndpointSpec::new(addr(0))];
    let err = EndpointSet::new(clock, EwmaConfig::default(), twice).unwrap_err();
    assert_eq!(err, SetError::DuplicateEndpoint(addr(0)));
    assert_eq!(err.to_string(), "endpoint 127.0.0.2:8080 is listed twice");
}

#[test]
fn invalid_settings_are_refused_naming_the_field() {
    let clock = Arc::new(ManualClock::new());
    let bad = [
        BalancerConfig { panic_threshold_percent: 101, ..Default::default() },
        BalancerConfig { slow_start: Some(Duration::ZERO), ..Default::default() },
        BalancerConfig { tracks: vec![("stable".into(), 0)], ..Default::default() },
        BalancerConfig { tracks: vec![("a".into(), 1), ("a".into(), 2)], ..Default::default() },
        BalancerConfig { maglev_table_size: 65_536, ..Default::default() },
    ];
    let fields = ["panicThresholdPercent", "slowStart", "tracks", "tracks", "maglevTableSize"];
    for (config, field) in bad.into_iter().zip(fields) {
        let err = fulcrum::balance::Balancer::new(config, set(&clock, specs(1)), 1).unwrap_err();
        assert!(err.to_string().starts_with(field), "{err}");
    }
}

#[derive(Clone, Debug)]
enum Op {
    Pick { hash: Option<u64>, pin: Option<usize>, exclude: Vec<usize>, hold: bool },
    Flag { endpoint: usize, flag: u8, on: bool },
    Replace { endpoints: Vec<(usize, u32, bool)> },
    Advance { millis: u64 },
    Release,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<Option<u64>>(), any::<Option<usize>>(), prop::collection::vec(0usize..12, 0..3), any::<bool>())
            .prop_map(|(hash, pin, exclude, hold)| Op::Pick { hash, pin, exclude, hold }),
        2 => (0usize..12, 0u8..4, any::<bool>()).prop_map(|(endpoint, flag, on)| Op::Flag { endpoint, flag, on }),
        1 => prop::collection::vec((0usize..12, 0u32..5, any::<bool>()), 0..12)
            .prop_map(|endpoints| Op::Replace { endpoints }),
        1 => (0u64..5000).prop_map(|millis| Op::Advance { millis }),
        1 => Just(Op::Release),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn any_sequence_of_operations_is_safe(
        algorithm in prop::sample::select(Algorithm::ALL.to_vec()),
        panic_threshold in prop::sample::select(vec![0u8, 50, 100]),
        with_tracks in any::<bool>(),
        slow_start in any::<bool>(),
        ops in prop::collection::vec(op(), 1..60),
    ) {
        let clock = Arc::new(ManualClock::new());
        let config = BalancerConfig {
            algorithm,
            panic_threshold_percent: panic_threshold,
            slow_start: slow_start.then(|| Duration::from_secs(3)),
            tracks: if with_tracks { vec![("stable".into(), 80), ("canary".into(), 20)] } else { vec![] },
            ..Default::default()
        };
        let mut current = set(&clock, specs(6));
        let mut b = balancer(config, current.clone());
        let mut held = Vec::new();
        let flags = [HealthFlag::ActiveCheckFailed, HealthFlag::Ejected, HealthFlag::NotReady, HealthFlag::Draining];
        for op in ops {
            match op {
                Op::Pick { hash, pin, exclude, hold } => {
                    let exclude: Vec<_> = exclude.into_iter().map(addr).collect();
                    let req = Request { hash, affinity: pin.map(|i| AffinityToken::of(addr(i))), exclude: &exclude };
                    if let Some(p) = b.pick(&req) {
                        prop_assert!(!exclude.contains(&p.addr()));
                        let m = current.get(p.addr()).expect("picked from the current set");
                        prop_assert!(m.weight() > 0);
                        prop_assert!(!m.endpoint().health().has(HealthFlag::Draining));
                        if panic_threshold == 0 {
                            prop_assert!(m.endpoint().health().is_available());
                        }
                        if hold { held.push(p) }
                    }
                }
                Op::Flag { endpoint, flag, on } => {
                    if let Some(m) = current.get(addr(endpoint)) {
                        m.endpoint().set_flag(flags[flag as usize], on);
                    }
                }
                Op::Replace { mut endpoints } => {
                    endpoints.sort_by_key(|e| e.0);
                    endpoints.dedup_by_key(|e| e.0);
                    let specs = endpoints.into_iter().map(|(i, w, canary)| {
                        EndpointSpec::new(addr(i)).weight(w).track(if canary { "canary" } else { "stable" })
                    });
                    current = Arc::new(current.update(specs).unwrap());
                    b.update_set(current.clone());
                }
                Op::Advance { millis } => clock.advance(Duration::from_millis(millis)),
                Op::Release => held.clear(),
            }
        }
        drop(held);
        prop_assert!(current.members().iter().all(|m| m.endpoint().in_flight() == 0));
    }
}
