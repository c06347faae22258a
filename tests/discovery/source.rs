//! The source's watches against the in-memory API server, feeding a real
//! proxy in front of real backends on 127.0.70-73.x.

use std::sync::Arc;
use std::time::Duration;

use fulcrum::discovery::kubernetes::KubernetesSource;
use fulcrum::discovery::{Snapshot, SourceMetrics};
use fulcrum::proxy::ProxyHandle;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::Value;
use tokio::sync::watch;

use super::*;
use crate::apiserver::ApiServer;
use crate::support::{Backend, admin, client, eventually, spread};

/// Port every backend of these tests listens on (one per address, as pods do).
const PORT: u16 = 18070;

struct Running {
    server: ApiServer,
    proxy: ProxyHandle,
    backends: Vec<Backend>,
    /// The backends' IPs.
    ips: Vec<String>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Running {
    /// The API server, `n` backends on 127.0.`net`.1.., their slice, the
    /// ConfigMap, the source and a proxy fed by it.
    async fn start(net: u8, n: u8) -> Running {
        let server = ApiServer::start().await;
        let mut backends = Vec::new();
        let mut ips = Vec::new();
        for i in 1..=n {
            let ip = format!("127.0.{net}.{i}");
            backends.push(Backend::start_on(&format!("b{i}"), format!("{ip}:{PORT}").parse().expect("addr")).await);
            ips.push(ip);
        }
        put_config(&server, ROUND_ROBIN).await;
        let eps: Vec<Ep<'_>> = ips.iter().map(|ip| ready(ip)).collect();
        slices(&server)
            .create(&PostParams::default(), &slice("web-backends-a", "web-backends", PORT, &eps))
            .await
            .expect("slice");

        let metrics = SourceMetrics::default();
        let source = KubernetesSource::new(
            server.client(),
            watched("127.0.0.1:0".parse().expect("addr"), "127.0.0.1:0".parse().expect("addr")),
            metrics.clone(),
        );
        let (tx, mut rx) = watch::channel(None);
        let mut tasks = vec![tokio::spawn(source.run(tx))];
        let first: Arc<Snapshot> = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(Option::is_some))
            .await
            .expect("a first snapshot within 10 s")
            .expect("source running")
            .clone()
            .expect("some");
        let proxy = ProxyHandle::start_with((*first).clone(), metrics).await.expect("proxy starts");
        let updates = proxy.updates();
        tasks.push(tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let next = rx.borrow_and_update().clone();
                if let Some(next) = next {
                    updates.send_replace(next);
                }
            }
        }));
        Running { server, proxy, backends, ips, tasks }
    }

    async fn put_config(&self, yaml: &str) {
        put_config(&self.server, yaml).await;
    }

    fn slices(&self) -> Api<EndpointSlice> {
        slices(&self.server)
    }

    async fn create_slice(&self, name: &str, eps: &[Ep<'_>]) {
        self.slices()
            .create(&PostParams::default(), &slice(name, "web-backends", PORT, eps))
            .await
            .expect("create slice");
    }

    async fn replace_slice(&self, name: &str, eps: &[Ep<'_>]) {
        let old = self.slices().get(name).await.expect("get slice");
        let mut s = slice(name, "web-backends", PORT, eps);
        s.metadata.resource_version = old.metadata.resource_version;
        self.slices().replace(name, &PostParams::default(), &s).await.expect("replace slice");
    }

    async fn endpoints(&self) -> Value {
        serde_json::from_str(&admin(&self.proxy, "/endpoints").await.body).expect("endpoints JSON")
    }

    /// `address -> (requests, flags)` from `/endpoints`.
    async fn endpoint_rows(&self) -> Vec<(String, u64, Vec<String>)> {
        let doc = self.endpoints().await;
        doc["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .map(|e| {
                let flags = e["flags"].as_array().expect("flags").iter().map(|f| f.as_str().unwrap_or("").to_owned());
                (e["address"].as_str().unwrap_or("").to_owned(), e["requests"].as_u64().unwrap_or(0), flags.collect())
            })
            .collect()
    }

    async fn addresses(&self) -> Vec<String> {
        self.endpoint_rows().await.into_iter().map(|(a, _, _)| a).collect()
    }

    fn addr(&self, i: usize) -> String {
        format!("{}:{PORT}", self.ips[i])
    }
}

fn slices(server: &ApiServer) -> Api<EndpointSlice> {
    Api::namespaced(server.client(), "default")
}

/// Creates or replaces the ConfigMap `web-proxy`.
async fn put_config(server: &ApiServer, yaml: &str) {
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let mut cm = config_map(yaml);
    match api.get_opt("web-proxy").await.expect("get") {
        Some(old) => {
            cm.metadata.resource_version = old.metadata.resource_version;
            api.replace("web-proxy", &PostParams::default(), &cm).await.expect("replace");
        }
        None => {
            api.create(&PostParams::default(), &cm).await.expect("create");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_balances_over_the_ready_endpoints_of_the_slices() {
    let r = Running::start(70, 3).await;
    let c = client();
    let counts = spread(&c, &r.proxy, 300).await;
    for b in ["b1", "b2", "b3"] {
        assert_eq!(counts.get(b), Some(&100), "round robin over three ready endpoints: {counts:?}");
    }
    let rows = r.endpoint_rows().await;
    assert!(rows.iter().all(|(_, _, flags)| flags.is_empty()), "{rows:?}");
    assert_eq!(admin(&r.proxy, "/readyz").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_stops_being_ready_stops_receiving_traffic_within_a_second() {
    let r = Running::start(71, 3).await;
    let c = client();
    r.replace_slice("web-backends-a", &[ready(&r.ips[0]), unready(&r.ips[1]), ready(&r.ips[2])]).await;
    let gone = r.addr(1);
    assert!(
        eventually(Duration::from_secs(1), || async { !r.addresses().await.contains(&gone) }).await,
        "the not-ready endpoint is still balanced over after 1 s"
    );
    let counts = spread(&c, &r.proxy, 60).await;
    assert_eq!(counts.get("b2"), None, "{counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 60);
    // Ready again: back in rotation.
    r.replace_slice("web-backends-a", &[ready(&r.ips[0]), ready(&r.ips[1]), ready(&r.ips[2])]).await;
    assert!(eventually(Duration::from_secs(1), || async { r.addresses().await.contains(&gone) }).await);
    assert_eq!(spread(&c, &r.proxy, 30).await.get("b2"), Some(&10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminating_pod_drains_its_in_flight_requests_and_takes_no_new_ones() {
    let r = Running::start(72, 2).await;
    let c = client();
    r.backends[0].set_delay(Duration::from_millis(800));
    // Two requests in flight: round robin gives one to each backend, and b1's is slow.
    let in_flight: Vec<_> = (0..2)
        .map(|_| {
            let (c, p) = (c.clone(), r.proxy.addr);
            tokio::spawn(async move {
                let req = http::Request::get(format!("http://{p}/")).body(Default::default()).expect("request");
                crate::support::send(&c, req).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    r.replace_slice("web-backends-a", &[terminating(&r.ips[0]), ready(&r.ips[1])]).await;
    let draining = r.addr(0);
    assert!(
        eventually(Duration::from_secs(1), || async {
            r.endpoint_rows().await.iter().any(|(a, _, f)| *a == draining && f.contains(&"draining".to_owned()))
        })
        .await,
        "the terminating endpoint is not draining: {:?}",
        r.endpoint_rows().await
    );
    let counts = spread(&c, &r.proxy, 20).await;
    assert_eq!(counts.get("b2"), Some(&20), "no new request goes to the draining endpoint: {counts:?}");
    r.backends[0].set_delay(Duration::ZERO);
    let mut answered = Vec::new();
    for t in in_flight {
        let reply = t.await.expect("task").expect("the in-flight request completes");
        answered.push((reply.status.as_u16(), reply.backend().to_owned()));
    }
    answered.sort();
    assert_eq!(answered, [(200, "b1".to_owned()), (200, "b2".to_owned())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_keep_their_statistics_when_their_slice_is_rewritten() {
    let r = Running::start(73, 2).await;
    let c = client();
    spread(&c, &r.proxy, 40).await;
    let before = r.endpoint_rows().await;
    assert!(before.iter().all(|(_, n, _)| *n == 20), "{before:?}");
    // The EndpointSlice controller replaces the slice by another one.
    r.slices().delete("web-backends-a", &DeleteParams::default()).await.expect("delete");
    r.create_slice("web-backends-b", &[ready(&r.ips[0]), ready(&r.ips[1])]).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let after = r.endpoint_rows().await;
    assert_eq!(after, before, "the endpoints and their request counts survive the rewrite");
    // Splitting them over two slices changes nothing either.
    r.replace_slice("web-backends-b", &[ready(&r.ips[0])]).await;
    r.create_slice("web-backends-c", &[ready(&r.ips[1])]).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(r.endpoint_rows().await, before);
    assert!(
        r.server
            .store()
            .list(&r.server.resource("discovery.k8s.io", "endpointslices"), Some("default"), |_| true)
            .0
            .len()
            == 2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_failures_keep_the_last_known_endpoints_and_are_counted() {
    let r = Running::start(74, 2).await;
    let c = client();
    // The API server drops every watch and fails the next requests; meanwhile
    // it compacts its history so the watches must relist (410 Gone).
    r.server.fail_next("endpointslices", 2, 500);
    r.server.fail_next("configmaps", 2, 500);
    r.server.store().compact(r.server.store().resource_version());
    r.server.close_watches();
    let errors = |metrics: &str, resource: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with("fulcrum_proxy_discovery_watch_errors_total") && l.contains(resource))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Every failure is retried with backoff (0.8 s, then 1.6 s...); traffic
    // goes on to both endpoints the whole time.
    let mut rounds = 0;
    loop {
        let counts = spread(&c, &r.proxy, 10).await;
        assert_eq!((counts.get("b1"), counts.get("b2")), (Some(&5), Some(&5)), "{counts:?}");
        let metrics = admin(&r.proxy, "/metrics").await.body;
        if errors(&metrics, "endpointslices") >= 2 && errors(&metrics, "configmaps") >= 2 {
            break;
        }
        rounds += 1;
        assert!(rounds < 200, "the watch failures are not counted: {metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Once the server answers again, changes flow as before.
    r.replace_slice("web-backends-a", &[ready(&r.ips[0]), unready(&r.ips[1])]).await;
    let gone = r.addr(1);
    assert!(
        eventually(Duration::from_secs(10), || async { !r.addresses().await.contains(&gone) }).await,
        "changes after the outage are not followed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_map_change_reaches_the_running_proxy_and_a_bad_one_is_refused() {
    let r = Running::start(75, 2).await;
    let generation = r.endpoints().await["generation"].as_u64().expect("generation");
    r.put_config(&ROUND_ROBIN.replace("RoundRobin", "LeastRequest")).await;
    assert!(
        eventually(Duration::from_secs(2), || async { r.endpoints().await["algorithm"] == "LeastRequest" }).await,
        "the new algorithm is not in force"
    );
    assert!(r.endpoints().await["generation"].as_u64() > Some(generation));
    r.put_config("listen: 0.0.0.0:15080\nloadBalancing: {algorithm: Fastest}\n").await;
    assert!(
        eventually(Duration::from_secs(2), || async {
            admin(&r.proxy, "/metrics").await.body.contains("fulcrum_proxy_config_reloads_total{result=\"failure\"} 1")
        })
        .await,
        "the invalid configuration is not counted"
    );
    assert_eq!(r.endpoints().await["algorithm"], "LeastRequest", "the last good configuration stays");
    assert_eq!(spread(&client(), &r.proxy, 10).await.values().sum::<usize>(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_endpoints_take_their_share_of_the_split() {
    let r = Running::start(76, 2).await;
    let canary_ip = "127.0.76.9";
    let _canary = Backend::start_on("canary", format!("{canary_ip}:{PORT}").parse().expect("addr")).await;
    r.slices()
        .create(
            &PostParams::default(),
            &slice("web-canary-backends-a", "web-canary-backends", PORT, &[ready(canary_ip)]),
        )
        .await
        .expect("canary slice");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(spread(&client(), &r.proxy, 50).await.get("canary"), None, "no split configured: no canary traffic");
    r.put_config(CANARY_10).await;
    assert!(eventually(Duration::from_secs(2), || async { r.addresses().await.len() == 3 }).await);
    let counts = spread(&client(), &r.proxy, 1000).await;
    assert_eq!(counts.get("canary"), Some(&100), "{counts:?}");
}

/// The real binary in Kubernetes mode: before its ConfigMap and slices it is
/// alive but not ready (the kubelet neither restarts it nor sends it
/// traffic); once it serves its configuration it is ready even though no
/// endpoint is, as a sidecar must be (its pod's readiness waits for it), and
/// answers 503 until one is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_process_is_ready_once_it_serves_its_configuration_not_once_an_endpoint_is() {
    let server = ApiServer::start().await;
    let dir = std::env::temp_dir().join(format!("fulcrum-discovery-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let kubeconfig = server.write_kubeconfig(&dir, server.admin_token(), "default");
    let (listen, admin_addr) = ("127.0.75.1:15080", "127.0.75.1:15090");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["proxy", "--kubernetes", "web", "--listen", listen, "--admin", admin_addr])
        .env("KUBECONFIG", &kubeconfig)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start fulcrum proxy");
    let status = |path: &'static str| async move {
        let req = http::Request::get(format!("http://{admin_addr}{path}")).body(Default::default()).ok()?;
        crate::support::send(&client(), req).await.ok().map(|r| r.status.as_u16())
    };
    assert!(eventually(Duration::from_secs(20), || async { status("/healthz").await == Some(200) }).await);
    assert_eq!(status("/readyz").await, Some(503), "ready without a configuration");

    put_config(&server, ROUND_ROBIN).await;
    slices(&server)
        .create(&PostParams::default(), &slice("web-backends-a", "web-backends", PORT, &[unready("127.0.75.2")]))
        .await
        .expect("slice");
    assert!(eventually(Duration::from_secs(10), || async { status("/readyz").await == Some(200) }).await);
    let req = http::Request::get(format!("http://{listen}/")).body(Default::default()).expect("request");
    let reply = crate::support::send(&client(), req).await.expect("the proxy answers");
    assert_eq!(reply.status.as_u16(), 503, "no endpoint is ready: the proxy answers for it");
    let _ = child.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
}
