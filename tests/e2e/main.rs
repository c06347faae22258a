//! Local end-to-end: two `fulcrum operator` processes run as the chart's
//! Deployment runs them (its arguments, environment and ServiceAccount, with
//! the RBAC of `manifests/install.yaml`), electing a leader, and a
//! `fulcrum proxy --kubernetes` process authenticating as the app's proxy
//! account, against the in-memory API server; the test plays the ReplicaSet
//! controller, kubelet and the EndpointSlice controller, and real backends
//! on 127.0.80.x answer continuous traffic. The API server's audit then
//! proves least privilege: no request of a Fulcrum identity was denied, and
//! every permission the chart grants was used.
//!
//! The proxy process stands for the sidecar of one app pod: it balances over
//! every ready replica, its own included.

#[path = "../support/apiserver/mod.rs"]
mod apiserver;
mod cluster;
#[path = "../support/install.rs"]
mod install;
#[allow(dead_code)]
#[path = "../proxy/support.rs"]
mod support;
mod traffic;
#[path = "../support/wait.rs"]
mod wait;

use std::path::PathBuf;
use std::process::Stdio;

use std::time::Duration;

use fulcrum::api::LoadBalancedApp;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::time::Instant;

use apiserver::ApiServer;
use cluster::Cluster;
use traffic::{Traffic, shares};

/// The app's port on every pod address.
const APP_PORT: u16 = 18080;
const PROXY: &str = "127.0.80.1:15080";
const ADMIN: &str = "127.0.80.1:15090";

/// `fulcrum proxy --kubernetes web`, a child process stopped on drop.
struct ProxyProcess {
    child: tokio::process::Child,
    log: PathBuf,
}

impl ProxyProcess {
    async fn start(kubeconfig: &std::path::Path, dir: &std::path::Path) -> ProxyProcess {
        let log = dir.join("proxy.log");
        let out = std::fs::File::create(&log).expect("proxy log file");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fulcrum"))
            .args(["proxy", "--kubernetes", "web", "--listen", PROXY, "--admin", ADMIN])
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAMESPACE", "default")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .expect("start fulcrum proxy");
        ProxyProcess { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn still_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let p = std::env::temp_dir().join(format!("fulcrum-e2e-{}", std::process::id()));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn admin_get(path: &str) -> Option<(u16, String)> {
    let req = http::Request::get(format!("http://{ADMIN}{path}")).body(Default::default()).ok()?;
    let r = support::send(&support::client(), req).await.ok()?;
    Some((r.status.as_u16(), r.body))
}

async fn proxy_endpoints() -> Value {
    match admin_get("/endpoints").await {
        Some((200, body)) => serde_json::from_str(&body).unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

/// Addresses of the endpoints the proxy may send new requests to.
async fn serving_addresses() -> Vec<String> {
    let doc = proxy_endpoints().await;
    doc["endpoints"]
        .as_array()
        .map(|a| {
            a.iter().filter(|e| e["healthy"] == true).filter_map(|e| e["address"].as_str().map(str::to_owned)).collect()
        })
        .unwrap_or_default()
}

/// A process whose log a failed wait shows.
trait Logged {
    fn describe(&self) -> String;
}

impl Logged for ProxyProcess {
    fn describe(&self) -> String {
        format!("--- proxy log ---\n{}", self.log())
    }
}

impl Logged for install::OperatorPod {
    fn describe(&self) -> String {
        format!("--- {} log ---\n{}", self.name, self.log())
    }
}

/// Polls `f` every 50 ms until it holds, for at most `limit`; on a timeout,
/// fails with `process`'s log.
async fn until<F, Fut>(what: &str, limit: Duration, process: &impl Logged, f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait::until(what, limit, Duration::from_millis(50), || process.describe(), f).await;
}

async fn app_pods(client: &kube::Client, track: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.list(&ListParams::default().labels(&format!("fulcrum.dev/app=web,fulcrum.dev/track={track}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

fn pod_ip(p: &Pod) -> Option<String> {
    p.status.as_ref()?.pod_ip.clone()
}

fn web() -> LoadBalancedApp {
    serde_json::from_value(json!({
        "apiVersion": "fulcrum.dev/v1alpha1",
        "kind": "LoadBalancedApp",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "replicas": 3,
            "port": APP_PORT,
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web", "image": "web:1"}]}},
            "loadBalancing": {"algorithm": "RoundRobin"},
            "healing": {"unreadyTimeout": "3s"},
        },
    }))
    .expect("LoadBalancedApp")
}

/// Share of `pod` in `counts`.
fn share(counts: &std::collections::BTreeMap<String, usize>, pred: impl Fn(&str) -> bool) -> f64 {
    let total: usize = counts.values().sum();
    let part: usize = counts.iter().filter(|(k, _)| pred(k)).map(|(_, v)| v).sum();
    part as f64 / total.max(1) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_kubectl_apply_to_traffic_readiness_healing_reconfiguration_and_canary() {
    let dir = TempDir::new();
    let server = ApiServer::start().await;
    let client = server.client();
    // The proxy authenticates as the sidecar's ServiceAccount, which the
    // operator creates and binds to the proxy's Role: the test proves that Role suffices.
    let kubeconfig_path = server.write_kubeconfig(&dir.0, &server.token_for("default", "web-proxy"), "default");

    // The proxy starts before its app exists: alive, not ready.
    let mut proxy = ProxyProcess::start(&kubeconfig_path, &dir.0).await;
    until("the proxy's admin listener", Duration::from_secs(20), &proxy, || async {
        admin_get("/healthz").await.map(|r| r.0) == Some(200)
    })
    .await;
    assert_eq!(admin_get("/readyz").await.map(|r| r.0), Some(503), "ready without a configuration");

    // The operator, installed as a user installs it: two replicas of the
    // chart's Deployment under its ServiceAccount and RBAC; one is elected.
    let objects = install::install_yaml();
    let operator_token = install::install_identity(&server, &objects);
    let operator_kubeconfig = server.write_kubeconfig(&dir.0, &operator_token, install::OPERATOR_NS);
    let mut operators = vec![
        install::OperatorPod::start(&objects, "fulcrum-7c9d5-a", "127.0.80.201", &operator_kubeconfig, &dir.0),
        install::OperatorPod::start(&objects, "fulcrum-7c9d5-b", "127.0.80.202", &operator_kubeconfig, &dir.0),
    ];
    for op in &operators {
        until("the operator's probes", Duration::from_secs(20), op, || async {
            op.probe("/healthz").await == Some(200) && op.probe("/readyz").await == Some(200)
        })
        .await;
    }
    let cluster = Cluster::start(client.clone(), 80, APP_PORT, ADMIN.parse().expect("admin address"));
    let apps: Api<LoadBalancedApp> = Api::namespaced(client.clone(), "default");
    apps.create(&PostParams::default(), &web()).await.expect("kubectl apply");

    // Three pods, ready, in the proxy; the proxy turns ready.
    until("three ready endpoints in the proxy", Duration::from_secs(30), &proxy, || async {
        serving_addresses().await.len() == 3
    })
    .await;
    until("proxy readiness", Duration::from_secs(5), &proxy, || async {
        admin_get("/readyz").await.map(|r| r.0) == Some(200)
    })
    .await;

    let traffic = Traffic::start(PROXY.parse().expect("proxy address"), 4, Duration::from_millis(4));

    // 1. Round robin spreads evenly.
    let sent = traffic.wait_for(Instant::now(), 900).await;
    let counts = shares(&sent);
    eprintln!("round robin over {} requests: {counts:?}", sent.len());
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (pod, n) in &counts {
        let s = *n as f64 / sent.len() as f64;
        assert!((s - 1.0 / 3.0).abs() < 0.05, "round robin share of {pod} is {s:.3}: {counts:?}");
    }

    // 2. One pod stops being ready: no new request reaches it after 1 s, none fails.
    let pods = app_pods(&client, "stable").await;
    let victim = pods.first().expect("a pod").name_any();
    let victim_ip = pods.first().and_then(pod_ip).expect("pod IP");
    let flipped = Instant::now();
    cluster.set_unready(&victim, true);
    until("the unready pod to leave the proxy", Duration::from_secs(1), &proxy, || async {
        !serving_addresses().await.contains(&format!("{victim_ip}:{APP_PORT}"))
    })
    .await;
    eprintln!("unready pod out of the proxy after {:?}", flipped.elapsed());
    let after = traffic.wait_for(flipped + Duration::from_secs(1), 300).await;
    assert!(!shares(&after).contains_key(&victim), "{victim} still gets traffic 1 s after turning unready");

    // 3. Still unready after unreadyTimeout (3 s): the operator deletes it,
    //    the ReplicaSet replaces it, and the replacement takes traffic.
    until("the operator to delete the unready pod", Duration::from_secs(15), &proxy, || async {
        !app_pods(&client, "stable").await.iter().any(|p| p.name_any() == victim)
    })
    .await;
    until("a ready replacement in the proxy", Duration::from_secs(15), &proxy, || async {
        serving_addresses().await.len() == 3
    })
    .await;
    let now = app_pods(&client, "stable").await;
    assert_eq!(now.len(), 3);
    let replacement = now
        .iter()
        .map(ResourceExt::name_any)
        .find(|n| !pods.iter().any(|p| p.name_any() == *n))
        .expect("a replacement pod");
    let from = Instant::now();
    let sent = traffic.wait_for(from, 600).await;
    assert!(shares(&sent).contains_key(&replacement), "no traffic reaches {replacement}: {:?}", shares(&sent));

    // 4. A new algorithm reaches the running proxy without a restart.
    let generation = proxy_endpoints().await["generation"].as_u64();
    let patch = json!({"spec": {"loadBalancing": {"algorithm": "LeastRequest"}}});
    apps.patch("web", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch algorithm");
    until("LeastRequest in the proxy", Duration::from_secs(10), &proxy, || async {
        proxy_endpoints().await["algorithm"] == "LeastRequest"
    })
    .await;
    assert!(proxy_endpoints().await["generation"].as_u64() > generation);
    assert!(proxy.still_running(), "the proxy restarted");

    // 5. A canary with weight 10 takes 10% ± 2% of the requests.
    let canary = json!({"spec": {
        "loadBalancing": {"algorithm": "RoundRobin"},
        "canary": {"replicas": 1, "weight": 10, "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web", "image": "web:2"}]}}},
    }});
    apps.patch("web", &PatchParams::default(), &Patch::Merge(&canary)).await.expect("patch canary");
    until("the canary endpoint in the proxy", Duration::from_secs(20), &proxy, || async {
        let doc = proxy_endpoints().await;
        doc["algorithm"] == "RoundRobin"
            && doc["endpoints"]
                .as_array()
                .is_some_and(|a| a.iter().any(|e| e["track"] == "canary" && e["healthy"] == true))
    })
    .await;
    let sent = traffic.wait_for(Instant::now(), 3000).await;
    let counts = shares(&sent);
    let canary_share = share(&counts, |pod| pod.starts_with("web-canary-"));
    eprintln!("canary share {canary_share:.4} over {} requests: {counts:?}", sent.len());
    assert!((canary_share - 0.10).abs() <= 0.02, "canary share {canary_share:.3}: {counts:?}");

    // 6. The canary removed: the operator deletes its Deployment and Service,
    //    its pod goes, and all traffic returns to the stable track.
    apps.patch("web", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"canary": null}})))
        .await
        .expect("remove the canary");
    until("the canary pod gone", Duration::from_secs(20), &proxy, || async {
        app_pods(&client, "canary").await.is_empty()
    })
    .await;
    let from = Instant::now() + Duration::from_secs(1);
    let sent = traffic.wait_for(from, 600).await;
    let counts = shares(&sent);
    assert_eq!(share(&counts, |pod| pod.starts_with("web-canary-")), 0.0, "{counts:?}");

    // 7. The leader dies: the other replica takes the lease (15 s) and
    //    reconciles the next change.
    let leader = leader_of(&operators).await.expect("a leader");
    let standby = 1 - leader;
    eprintln!("killing the leader {}", operators[leader].name);
    operators[leader].kill().await;
    let patch = json!({"spec": {"loadBalancing": {"algorithm": "LeastConnections"}}});
    apps.patch("web", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch algorithm");
    until("the standby to lead and reconcile", Duration::from_secs(40), &operators[standby], || async {
        proxy_endpoints().await["algorithm"] == "LeastConnections"
    })
    .await;
    assert!(operators[standby].metrics().await.lines().any(|l| l.trim() == "fulcrum_operator_leader 1"));
    assert!(operators[standby].still_running());

    // Over the whole run, not one request failed.
    let failures = traffic.failures();
    assert!(
        failures.is_empty(),
        "{} failed requests, first: {:?}\n--- proxy log ---\n{}",
        failures.len(),
        failures.first(),
        proxy.log()
    );
    assert!(proxy.still_running());
    drop(traffic);
    drop(cluster);
    least_privilege(&server, &objects);
}

/// Index of the operator process that holds the lease.
async fn leader_of(operators: &[install::OperatorPod]) -> Option<usize> {
    for (i, op) in operators.iter().enumerate() {
        if op.metrics().await.lines().any(|l| l.trim() == "fulcrum_operator_leader 1") {
            return Some(i);
        }
    }
    None
}

/// Permissions of the chart that this run may leave unused, each with the
/// path that needs it and the test that exercises that path.
const NOT_EXERCISED: &[(&str, &str, &str, &str)] = &[
    (
        "delete",
        "",
        "serviceaccounts",
        "pruned when sidecar pods start naming their own account: tests/operator/rbac.rs",
    ),
    (
        "delete",
        "policy",
        "poddisruptionbudgets",
        "pruned when a dedicated proxy moves into the pods: tests/operator/rbac.rs",
    ),
    ("get", "", "serviceaccounts", "read before that prune: tests/operator/rbac.rs"),
    ("patch", "events.k8s.io", "events", "an Event that repeats is patched into a series by kube's Recorder"),
];

/// No request of a Fulcrum identity was denied, and every permission of the
/// operator's ClusterRole and leader-election Role was used by an allowed
/// request, or is held so that the operator may grant it to the proxies'
/// Role (RBAC refuses to let anyone grant what they do not hold), or is
/// listed in [`NOT_EXERCISED`] with its reason.
fn least_privilege(server: &ApiServer, objects: &[Value]) {
    let audit = server.audit();
    let operator_user = format!("system:serviceaccount:{}:{}", install::OPERATOR_NS, install::OPERATOR_SA);
    let fulcrum_users = [operator_user.as_str(), "system:serviceaccount:default:web-proxy"];
    let denied: Vec<_> = audit.iter().filter(|e| fulcrum_users.contains(&e.user.as_str()) && !e.allowed).collect();
    assert!(denied.is_empty(), "requests of Fulcrum identities denied: {denied:#?}");
    let operator_events: Vec<_> = audit.iter().filter(|e| e.user == operator_user).cloned().collect();
    let proxy_events: Vec<_> = audit.iter().filter(|e| e.user == fulcrum_users[1]).cloned().collect();
    assert!(!proxy_events.is_empty(), "the proxy's requests are audited under its account");

    // What the operator grants the proxies, from the Role it wrote.
    let role = server.store().get(&server.resource("rbac.authorization.k8s.io", "roles"), "default", "web-proxy");
    let proxy_grants = install::grants(role.expect("the proxy Role")["rules"].as_array().expect("rules"));
    let covers_proxy_role = |g: &install::Grant| {
        proxy_grants.iter().any(|p| p.0 == g.0 && p.1 == g.1 && p.2 == g.2 && (g.3.is_empty() || g.3 == p.3))
    };
    let mut rules = Vec::new();
    rules.extend(install::find(objects, "ClusterRole", "fulcrum")["rules"].as_array().cloned().unwrap_or_default());
    rules.extend(
        install::find(objects, "Role", "fulcrum-leader-election")["rules"].as_array().cloned().unwrap_or_default(),
    );
    let mut unused = Vec::new();
    for g in install::grants(&rules) {
        let listed =
            NOT_EXERCISED.iter().any(|(v, gr, r, _)| (*v, *gr, *r) == (g.0.as_str(), g.1.as_str(), g.2.as_str()));
        let used = install::used_by(&g, &operator_events) || covers_proxy_role(&g);
        if !used && !listed {
            unused.push(g);
        }
    }
    assert!(unused.is_empty(), "permissions the chart grants that nothing used: {unused:#?}");
    // The proxies' Role, written by the operator, holds nothing they do not use either.
    let unused: Vec<_> = proxy_grants.iter().filter(|g| !install::used_by(g, &proxy_events)).collect();
    assert!(unused.is_empty(), "permissions of the proxy Role that the proxy never used: {unused:#?}");
    // The watches of owned kinds are filtered to what the operator made.
    for e in operator_events.iter().filter(|e| matches!(e.verb.as_str(), "list" | "watch")) {
        if ["configmaps", "services", "deployments"].contains(&e.resource.as_str()) {
            assert!(
                e.label_selector.as_deref().is_some_and(|s| s.contains("app.kubernetes.io/managed-by=fulcrum")),
                "unfiltered {} of {}: {e:?}",
                e.verb,
                e.resource
            );
        }
    }
}
