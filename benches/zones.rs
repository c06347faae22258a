//! Zone-aware balancing (`make bench-zones`): how much traffic stays in the
//! proxy's zone, and what each endpoint receives, for equal and unequal
//! endpoint counts per zone. Two zones, `a` and `b`; one proxy per zone
//! (dedicated proxies, or sidecars of an app spread evenly) sending the same
//! number of requests through the real balancer (RoundRobin, seeded), with
//! zone-aware balancing off, on without knowing where the proxies are, and
//! on with the proxies per zone (what a proxy in Kubernetes reads from the
//! Service in front of the proxies), then with part of zone `a` ejected.
//! Prints a Markdown table.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use fulcrum::balance::{
    Algorithm, Balancer, BalancerConfig, EndpointSet, EndpointSpec, EwmaConfig, HealthFlag, ManualClock, Request,
};

const PICKS: usize = 100_000;

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(10, 0, 0, (i + 1) as u8), 8080))
}

/// Requests per endpoint from one proxy in `zone`, and the share that stayed in it.
fn run(set: &Arc<EndpointSet>, zone: Option<&str>, proxies: bool, counts: &mut [usize]) -> f64 {
    let config = BalancerConfig {
        local_zone: zone.map(Arc::from),
        zone_min_healthy_percent: 70,
        zone_proxies: if proxies { vec![(Arc::from("a"), 1), (Arc::from("b"), 1)] } else { Vec::new() },
        ..BalancerConfig::new(Algorithm::RoundRobin)
    };
    let mut b = Balancer::new(config, set.clone(), 0x5eed).expect("config");
    let mut local = 0;
    for _ in 0..PICKS {
        let Some(p) = b.pick(&Request::default()) else { continue };
        let i = set.members().iter().position(|m| m.endpoint().addr() == p.addr()).expect("member");
        counts[i] += 1;
        local += usize::from(zone.is_some_and(|z| set.members()[i].zone() == Some(z)));
    }
    local as f64 / PICKS as f64
}

fn main() {
    println!("## Zone-aware balancing\n");
    println!(
        "`make bench-zones` (`benches/zones.rs`): two zones, one proxy in each sending {PICKS} requests through the \
         balancer (RoundRobin, seeded); zone-aware with `minHealthyPercent: 70`, either without knowing where the \
         proxies are (standalone without `zoneAware.proxies`) or knowing one proxy per zone (Kubernetes: the ready \
         endpoints of the Service in front of the proxies). \"local\" is the share of each proxy's requests that \
         stay in its zone; \"max/mean\" the most loaded endpoint against the mean, over both proxies' requests.\n"
    );
    println!(
        "| endpoints a + b | ejected in a | zone-aware | local (proxy in a) | local (proxy in b) | max/mean endpoint load |"
    );
    println!("| --- | ---: | --- | ---: | ---: | ---: |");
    for (na, nb) in [(3, 3), (2, 4), (1, 5)] {
        for ejected in [0, 1] {
            if ejected >= na {
                continue;
            }
            for (aware, proxies) in [(false, false), (true, false), (true, true)] {
                let clock = Arc::new(ManualClock::new());
                let specs: Vec<EndpointSpec> = (0..na + nb)
                    .map(|i| EndpointSpec::new(addr(i)).zone(Some(Arc::from(if i < na { "a" } else { "b" }))))
                    .collect();
                let set = Arc::new(EndpointSet::new(clock, EwmaConfig::default(), specs).expect("set"));
                for m in &set.members()[..ejected] {
                    m.endpoint().set_flag(HealthFlag::Ejected, true);
                }
                let mut counts = vec![0usize; na + nb];
                let la = run(&set, aware.then_some("a"), proxies, &mut counts);
                let lb = run(&set, aware.then_some("b"), proxies, &mut counts);
                let serving: Vec<usize> = counts.iter().copied().filter(|c| *c > 0).collect();
                let mean = serving.iter().sum::<usize>() as f64 / serving.len().max(1) as f64;
                let max = serving.iter().copied().max().unwrap_or(0) as f64;
                let pct = |x: f64| if aware { format!("{:.1}%", 100.0 * x) } else { "—".to_owned() };
                let local_off = |zone_n: usize| format!("{:.1}%", 100.0 * zone_n as f64 / (na + nb - ejected) as f64);
                let (a, b) = if aware { (pct(la), pct(lb)) } else { (local_off(na - ejected), local_off(nb)) };
                println!(
                    "| {na} + {nb} | {ejected} | {} | {a} | {b} | {:.2} |",
                    match (aware, proxies) {
                        (false, _) => "off",
                        (true, false) => "on, proxies unknown",
                        (true, true) => "on, proxies 1 + 1",
                    },
                    max / mean
                );
            }
        }
    }
    println!(
        "\nWith equal counts every request stays local at no cost in balance. With unequal counts, a proxy that \
         does not know where the other proxies are keeps everything local, and the smaller zone's endpoints take \
         half of all traffic; knowing the proxies per zone, the smaller zone keeps the part its capacity covers \
         (its share of the endpoints over its share of the proxies) and spills the rest to the zone with capacity \
         to spare, so every endpoint gets the same load while as much traffic as possible stays local. A zone \
         below `minHealthyPercent` spills over to both zones."
    );
}
