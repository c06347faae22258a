//! Cost of one pick, guard completion included, for each algorithm at 10,
//! 100 and 1000 endpoints; and the cost of rebuilding a Maglev table.
//!
//! Time is passed in (`pick_at`, `complete_at`) as the proxy does: it reads
//! the clock once at each end of a request for its latency histogram and
//! hands the balancer the same readings. A clock read (`Instant::now`, about
//! 25 ns on the reference machine) is therefore not part of these figures.
//!
//! `make bench-balance` runs this and writes the table of medians to
//! `bench/results/balance.md`.

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fulcrum::balance::{
    Algorithm, Balancer, BalancerConfig, EndpointSet, EndpointSpec, EwmaConfig, Nanos, Outcome, Request, SystemClock,
};

const SIZES: [usize; 3] = [10, 100, 1000];

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::from(0x7f00_0002 + i as u32), 8080))
}

/// `n` endpoints; weights 1–4 where an algorithm uses them, as a mixed fleet would have.
fn set(n: usize) -> Arc<EndpointSet> {
    let specs = (0..n).map(|i| EndpointSpec::new(addr(i)).weight(1 + (i % 4) as u32));
    Arc::new(EndpointSet::new(Arc::new(SystemClock::new()), EwmaConfig::default(), specs).expect("valid"))
}

/// One request: pick at `now`, complete 200 µs later; time moves 1 µs per request.
#[inline]
fn request(b: &mut Balancer, req: &Request<'_>, now: &mut Nanos) {
    now.0 += 1_000;
    if let Some(p) = b.pick_at(black_box(req), *now) {
        p.complete_at(Outcome::Success, Nanos(now.0 + 200_000));
    }
}

fn start(b: &Balancer) -> Nanos {
    b.set().clock().now()
}

fn picks(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for algorithm in Algorithm::ALL {
        for n in SIZES {
            let mut b = Balancer::new(BalancerConfig::new(algorithm), set(n), 1).expect("valid");
            let mut now = start(&b);
            // Fresh keys each iteration, as distinct clients would send.
            let mut key = 0u64;
            group.bench_function(BenchmarkId::new(algorithm.name(), n), |bench| {
                bench.iter(|| {
                    key = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    request(&mut b, &Request { hash: Some(key), ..Default::default() }, &mut now);
                })
            });
        }
    }
    group.finish();
}

/// Smooth WRR costs one step per distinct weight: the worst case is every weight different.
fn wrr_distinct_weights(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick-distinct-weights");
    for n in SIZES {
        let specs = (0..n).map(|i| EndpointSpec::new(addr(i)).weight(1 + i as u32));
        let set =
            Arc::new(EndpointSet::new(Arc::new(SystemClock::new()), EwmaConfig::default(), specs).expect("valid"));
        let mut b = Balancer::new(BalancerConfig::new(Algorithm::WeightedRoundRobin), set, 1).expect("valid");
        let mut now = start(&b);
        group.bench_function(BenchmarkId::new("WeightedRoundRobin", n), |bench| {
            bench.iter(|| request(&mut b, &Request::default(), &mut now))
        });
    }
    group.finish();
}

/// A snapshot change forces the balancer to rebuild its view, here a Maglev table.
fn maglev_rebuild(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev-rebuild");
    for n in [100, 1000] {
        let set = set(n);
        let mut b = Balancer::new(BalancerConfig::new(Algorithm::ConsistentHash), set.clone(), 1).expect("valid");
        group.bench_function(BenchmarkId::from_parameter(n), |bench| {
            bench.iter(|| {
                b.update_set(set.clone());
                drop(b.pick(&Request { hash: Some(1), ..Default::default() }));
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = picks, wrr_distinct_weights, maglev_rebuild
}
criterion_main!(benches);
