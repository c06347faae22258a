//! Cost of one EndpointSlice change inside the proxy (`make bench-discovery`):
//! for N endpoints in slices of 100 (the EndpointSlice controller's maximum),
//! one endpoint flips between ready and not ready, and the bench times
//! (1) the Kubernetes source's view taking the watch event and computing the
//! next snapshot, and (2) the proxy applying that snapshot (endpoint set
//! update, upstream pools carried over, runtime swap). Prints a Markdown
//! table of medians and 99th percentiles.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fulcrum::discovery::Snapshot;
use fulcrum::discovery::kubernetes::{View, Watched};
use fulcrum::proxy::Shared;
use fulcrum::proxy::config::ProxyConfig;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::Event;
use serde_json::json;

const ROUNDS: usize = 400;

fn slice(index: usize, endpoints: usize, unready: Option<usize>) -> EndpointSlice {
    let eps: Vec<_> = (0..endpoints)
        .map(|i| {
            let n = index * 100 + i;
            json!({
                "addresses": [format!("10.{}.{}.{}", n / 65536, (n / 256) % 256, n % 256)],
                "conditions": {"ready": unready != Some(i), "serving": true, "terminating": false},
            })
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("web-backends-{index}"), "labels": {"kubernetes.io/service-name": "web-backends"}},
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "app", "port": 8080}],
    }))
    .expect("slice")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn fmt(d: Duration) -> String {
    if d < Duration::from_micros(1000) {
        format!("{:.1} µs", d.as_secs_f64() * 1e6)
    } else {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    }
}

fn main() {
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let watched = Watched::for_app("default", "web", addr, addr);
    let config_map: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "web-proxy"},
        "data": {"proxy.yaml": "listen: 127.0.0.1:0\nworkers: 1\nloadBalancing: {algorithm: LeastRequest}\n"},
    }))
    .expect("config map");
    println!("## One EndpointSlice change inside the proxy\n");
    println!(
        "`make bench-discovery` (`benches/discovery.rs`): N endpoints in slices of 100, one endpoint flipping between \
         ready and not ready, {ROUNDS} rounds per row; the Kubernetes source's view taking the watch event and \
         computing the snapshot, then the proxy applying it (endpoint set update, upstream pools carried over, \
         runtime swap). Release build, one core.\n"
    );
    println!("| endpoints | slices | view: event → snapshot (p50 / p99) | proxy: apply snapshot (p50 / p99) |");
    println!("| ---: | ---: | ---: | ---: |");
    for n in [10usize, 100, 1_000, 5_000] {
        let slices = n.div_ceil(100);
        let mut view = View::new(watched.clone());
        view.on_config(Event::Apply(config_map.clone()));
        view.on_slice(Event::Init);
        for s in 0..slices {
            view.on_slice(Event::InitApply(slice(s, (n - s * 100).min(100), None)));
        }
        view.on_slice(Event::InitDone);
        let first = view.snapshot(Instant::now()).expect("snapshot");
        let config = Arc::new(ProxyConfig::parse("listen: 127.0.0.1:0\nworkers: 1\n").expect("config"));
        let shared = Shared::new(&Snapshot { config, targets: first.targets.clone() }).expect("proxy state");
        shared.apply(&first).expect("apply");
        let flips: Vec<EndpointSlice> =
            [slice(0, n.min(100), Some(0)), slice(0, n.min(100), None)].into_iter().collect();
        let (mut view_times, mut apply_times) = (Vec::with_capacity(ROUNDS), Vec::with_capacity(ROUNDS));
        for round in 0..ROUNDS {
            let event = Event::Apply(flips[round % 2].clone());
            let t = Instant::now();
            view.on_slice(event);
            let next = view.snapshot(Instant::now()).expect("snapshot");
            view_times.push(t.elapsed());
            let t = Instant::now();
            shared.apply(&next).expect("apply");
            apply_times.push(t.elapsed());
        }
        view_times.sort();
        apply_times.sort();
        println!(
            "| {n} | {slices} | {} / {} | {} / {} |",
            fmt(percentile(&view_times, 0.5)),
            fmt(percentile(&view_times, 0.99)),
            fmt(percentile(&apply_times, 0.5)),
            fmt(percentile(&apply_times, 0.99)),
        );
    }
}
