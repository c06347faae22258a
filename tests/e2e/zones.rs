//! Zone-aware balancing on a cluster of two zones: the scheduler spreads each
//! app over both, binding labels each pod with its node's zone, and the
//! EndpointSlice controller gives each endpoint its zone. Sidecar proxies
//! learn their zone from their own pod's endpoint and keep the traffic in
//! it; dedicated proxies learn it from the zone label (downward API), and
//! the one whose zone has less than its share of the app's pods spills the
//! part its zone cannot carry to the other.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use fulcrum::api::LoadBalancedApp;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use tokio::time::Instant;

use crate::apiserver::ApiServer;
use crate::kubelet::{Node, NodeSettings};
use crate::traffic::{Traffic, shares};
use crate::{TempDir, app_container, install_operator, pod_ip, pods_of, proxy_endpoints, sidecars_ready, until};

const ZONE: &str = "topology.kubernetes.io/zone";

fn app(name: &str, replicas: u32, dedicated: bool) -> LoadBalancedApp {
    let mut spec = json!({
        "replicas": replicas,
        "port": "http",
        "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [app_container("2.53")]}},
        "loadBalancing": {"algorithm": "RoundRobin", "zoneAware": {}},
    });
    if dedicated {
        spec["proxy"] = json!({"mode": "Dedicated", "replicas": 2});
    }
    serde_json::from_value(json!({
        "apiVersion": "fulcrum.dev/v1alpha1",
        "kind": "LoadBalancedApp",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }))
    .expect("LoadBalancedApp")
}

fn zone_of(p: &Pod) -> String {
    p.labels().get(ZONE).cloned().unwrap_or_default()
}

/// Pod name → zone, for the pods of `app` (`component` proxy or its stable track).
async fn zones(client: &kube::Client, app: &str, proxies: bool) -> BTreeMap<String, String> {
    let pods = if proxies { proxy_pods(client, app).await } else { pods_of(client, app, "stable").await };
    pods.iter().map(|p| (p.name_any(), zone_of(p))).collect()
}

/// Sends `n` requests through the proxy at `ip` and counts the answers by zone.
async fn by_zone(ip: &str, n: usize, zones: &BTreeMap<String, String>) -> BTreeMap<String, usize> {
    let proxy: SocketAddr = format!("{ip}:15080").parse().expect("proxy address");
    let traffic = Traffic::start(proxy, 2, Duration::from_millis(2));
    let sent = traffic.wait_for(Instant::now(), n).await;
    assert!(traffic.failures().is_empty(), "failed requests: {:?}", traffic.failures());
    let mut out = BTreeMap::new();
    for (pod, count) in shares(&sent) {
        *out.entry(zones.get(&pod).cloned().unwrap_or_else(|| format!("unknown pod {pod}"))).or_default() += count;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_keep_traffic_in_their_zone_and_spill_what_it_cannot_carry() {
    let dir = TempDir::new("zones");
    let server = ApiServer::start().await;
    let client = server.client();
    let settings = NodeSettings::new(86, 8_000, dir.0.join("node")).zones(&["zone-a", "zone-b"]);
    let node = Node::start(server.issuer(), settings);
    install_operator(&server, &node).await;
    let apps: Api<LoadBalancedApp> = Api::namespaced(client.clone(), "default");

    // 1. Sidecars: four pods, two per zone; each sidecar sees every endpoint
    //    with its zone and sends its traffic to its own zone's two.
    apps.create(&PostParams::default(), &app("geo", 4, false)).await.expect("create geo");
    until("four pods with ready sidecars", Duration::from_secs(60), &node, || async {
        sidecars_ready(&client, "geo", 4).await
    })
    .await;
    let geo = zones(&client, "geo", false).await;
    let per_zone = |m: &BTreeMap<String, String>, z: &str| m.values().filter(|v| *v == z).count();
    assert_eq!((per_zone(&geo, "zone-a"), per_zone(&geo, "zone-b")), (2, 2), "spread: {geo:?}");
    for p in pods_of(&client, "geo", "stable").await {
        let ip = pod_ip(&p).expect("pod IP");
        let doc = proxy_endpoints(format!("{ip}:15090").parse().expect("admin")).await;
        let listed: Vec<&str> =
            doc["endpoints"].as_array().into_iter().flatten().filter_map(|e| e["zone"].as_str()).collect();
        assert_eq!(listed.len(), 4, "every endpoint with its zone: {doc}");
        let answered = by_zone(&ip, 60, &geo).await;
        assert_eq!(
            answered.keys().collect::<Vec<_>>(),
            [&zone_of(&p)],
            "{} in {}: {answered:?}",
            p.name_any(),
            zone_of(&p)
        );
    }

    // 2. Dedicated proxies, one per zone, in front of three pods: two in one
    //    zone, one in the other. The proxy beside the two keeps its traffic;
    //    the one beside the lone pod sends it 2/3 (its zone has 1/3 of the
    //    pods and 1/2 of the proxies) and the rest to the other zone.
    apps.create(&PostParams::default(), &app("edge", 3, true)).await.expect("create edge");
    until("two proxies serving three pods", Duration::from_secs(60), &node, || async {
        let proxies = zones(&client, "edge", true).await;
        let pods = pods_of(&client, "edge", "stable").await;
        let mut ready = 0;
        for p in &proxy_pods(&client, "edge").await {
            if let Some(ip) = pod_ip(p) {
                ready += usize::from(
                    crate::serving_addresses(format!("{ip}:15090").parse().expect("admin")).await.len() == 3,
                );
            }
        }
        proxies.len() == 2 && pods.len() == 3 && ready == 2
    })
    .await;
    let edge = zones(&client, "edge", false).await;
    let proxies = proxy_pods(&client, "edge").await;
    let proxy_zones: Vec<String> = proxies.iter().map(zone_of).collect();
    assert!(proxy_zones.contains(&"zone-a".into()) && proxy_zones.contains(&"zone-b".into()), "{proxy_zones:?}");
    let lone = if per_zone(&edge, "zone-a") == 1 { "zone-a" } else { "zone-b" };
    assert_eq!(per_zone(&edge, lone), 1, "{edge:?}");
    // The proxies' view of each other: one per zone, from the front Service.
    until("each proxy counting one proxy per zone", Duration::from_secs(10), &node, || async {
        let mut ok = 0;
        for p in &proxies {
            let ip = pod_ip(p).unwrap_or_default();
            let doc = proxy_endpoints(format!("{ip}:15090").parse().expect("admin")).await;
            ok += usize::from(doc["zoneAware"]["proxies"] == json!({"zone-a": 1, "zone-b": 1}));
        }
        ok == 2
    })
    .await;
    for p in &proxies {
        let ip = pod_ip(p).expect("proxy IP");
        let answered = by_zone(&ip, 300, &edge).await;
        let total: usize = answered.values().sum();
        let local = answered.get(&zone_of(p)).copied().unwrap_or(0) as f64 / total as f64;
        eprintln!("dedicated proxy in {}: {answered:?}", zone_of(p));
        if zone_of(p) == lone {
            assert!((0.55..0.78).contains(&local), "the lone pod's zone keeps {local:.2} (2/3 expected): {answered:?}");
        } else {
            assert!((local - 1.0).abs() < f64::EPSILON, "the two pods' zone keeps everything: {answered:?}");
        }
    }
}

async fn proxy_pods(client: &kube::Client, app: &str) -> Vec<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    let selector = format!("fulcrum.dev/app={app},fulcrum.dev/component=proxy");
    api.list(&ListParams::default().labels(&selector))
        .await
        .map(|l| l.items.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect())
        .unwrap_or_default()
}
