use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use fulcrum::balance::{
    Algorithm, Balancer, BalancerConfig, EndpointSet, EndpointSpec, EwmaConfig, ManualClock, Pick, Request,
};

/// The i-th test address: 127.0.x.y:8080, in ascending order.
pub fn addr(i: usize) -> SocketAddr {
    let i = i + 2;
    SocketAddr::from((Ipv4Addr::new(127, 0, (i >> 8) as u8, (i & 0xff) as u8), 8080))
}

/// `n` endpoints of weight 1 on the default track.
pub fn specs(n: usize) -> Vec<EndpointSpec> {
    (0..n).map(|i| EndpointSpec::new(addr(i))).collect()
}

/// Specs with the given weights.
pub fn weighted(weights: &[u32]) -> Vec<EndpointSpec> {
    weights.iter().enumerate().map(|(i, &w)| EndpointSpec::new(addr(i)).weight(w)).collect()
}

pub fn set(clock: &Arc<ManualClock>, specs: Vec<EndpointSpec>) -> Arc<EndpointSet> {
    Arc::new(EndpointSet::new(clock.clone(), EwmaConfig::default(), specs).expect("valid specs"))
}

pub fn balancer(config: BalancerConfig, set: Arc<EndpointSet>) -> Balancer {
    Balancer::new(config, set, 0x5eed).expect("valid config")
}

/// A balancer with `algorithm`, no panic mode, over `specs`, on a fresh manual clock.
pub fn simple(algorithm: Algorithm, specs: Vec<EndpointSpec>) -> (Arc<ManualClock>, Balancer) {
    let clock = Arc::new(ManualClock::new());
    let config = BalancerConfig { panic_threshold_percent: 0, ..BalancerConfig::new(algorithm) };
    let b = balancer(config, set(&clock, specs));
    (clock, b)
}

/// Picks once and releases at once; the address.
pub fn pick_addr(b: &mut Balancer, req: &Request<'_>) -> Option<SocketAddr> {
    b.pick(req).map(|p: Pick| p.addr())
}

/// `n` picks released at once, counted per address.
pub fn distribution(b: &mut Balancer, n: usize) -> BTreeMap<SocketAddr, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let a = pick_addr(b, &Request::default()).expect("an endpoint");
        *counts.entry(a).or_insert(0) += 1;
    }
    counts
}
