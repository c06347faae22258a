//! Local end-to-end: Fulcrum installed from `manifests/install.yaml` into the
//! in-memory API server and run on the process kubelet (`tests/support/kubelet.rs`):
//! the chart's two operator replicas and every app pod's sidecar proxy are
//! real `fulcrum` processes under their own ServiceAccounts and RBAC, the
//! app's containers are test backends on 127.0.80.x, and every probe runs.
//! Four clients send continuous traffic through one pod's sidecar while
//! readiness flips, a pod is healed, the configuration changes, a canary
//! comes and goes and the leader crashes; not one request may fail. The API
//! server's audit then proves least privilege: no request of a Fulcrum
//! identity was denied, and every permission the chart grants was used.

#[path = "../support/apiserver/mod.rs"]
mod apiserver;
mod grpc;
#[allow(dead_code)]
#[path = "../proxy/grpc_peer.rs"]
mod grpc_peer;
#[path = "../support/install.rs"]
mod install;
#[path = "../support/kubelet.rs"]
mod kubelet;
mod rollout;
#[allow(dead_code)]
#[path = "../proxy/support.rs"]
mod support;
mod traffic;
#[path = "../support/wait.rs"]
mod wait;
mod zones;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fulcrum::api::LoadBalancedApp;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::time::Instant;

use apiserver::ApiServer;
use kubelet::{Node, NodeSettings};
use traffic::{Traffic, shares};

/// The app's port on every pod address.
const APP_PORT: u16 = 18080;

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("fulcrum-e2e-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn get(url: &str) -> Option<(u16, String)> {
    let req = http::Request::get(url).body(Default::default()).ok()?;
    let r = support::send(&support::client(), req).await.ok()?;
    Some((r.status.as_u16(), r.body))
}

/// A sidecar's `/endpoints` document.
async fn proxy_endpoints(admin: SocketAddr) -> Value {
    match get(&format!("http://{admin}/endpoints")).await {
        Some((200, body)) => serde_json::from_str(&body).unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

/// Addresses of the endpoints a sidecar may send new requests to.
async fn serving_addresses(admin: SocketAddr) -> Vec<String> {
    let doc = proxy_endpoints(admin).await;
    doc["endpoints"]
        .as_array()
        .map(|a| {
            a.iter().filter(|e| e["healthy"] == true).filter_map(|e| e["address"].as_str().map(str::to_owned)).collect()
        })
        .unwrap_or_default()
}

/// Polls `f` every 50 ms until it holds, for at most `limit`; on a timeout,
/// fails with every container's log.
async fn until<F, Fut>(what: &str, limit: Duration, node: &Node, f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait::until(what, limit, Duration::from_millis(50), || node.logs(), f).await;
}

async fn app_pods(client: &kube::Client, track: &str) -> Vec<Pod> {
    pods_of(client, "web", track).await
}

/// The live pods of track `track` of app `app`.
async fn pods_of(client: &kube::Client, app: &str, track: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.list(&ListParams::default().labels(&format!("fulcrum.dev/app={app},fulcrum.dev/track={track}")))
        .await
        .map(|l| l.items.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect())
        .unwrap_or_default()
}

fn pod_ip(p: &Pod) -> Option<String> {
    p.status.as_ref()?.pod_ip.clone()
}

/// The app's container: a small HTTP server answering with the pod's name,
/// probed every second.
fn app_container(version: &str) -> Value {
    json!({
        "name": "app",
        "image": format!("registry.k8s.io/e2e-test-images/agnhost:{version}"),
        "args": ["netexec", format!("--http-port={APP_PORT}")],
        "ports": [{"name": "http", "containerPort": APP_PORT}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1, "failureThreshold": 1},
        "resources": {"requests": {"cpu": "50m"}},
    })
}

fn web() -> LoadBalancedApp {
    serde_json::from_value(json!({
        "apiVersion": "fulcrum.dev/v1alpha1",
        "kind": "LoadBalancedApp",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "replicas": 3,
            "port": "http",
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [app_container("2.53")]}},
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

/// Whether `ip` is listed in the app's slices as ready.
async fn ready_in_slices(client: &kube::Client, ip: &str) -> bool {
    ready_in_slices_of(client, "web", ip).await
}

async fn ready_in_slices_of(client: &kube::Client, app: &str, ip: &str) -> bool {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let selector = format!("kubernetes.io/service-name={app}-backends");
    let listed = slices.list(&ListParams::default().labels(&selector)).await;
    listed
        .map(|l| {
            l.items.iter().flat_map(|s| s.endpoints.iter()).any(|e| {
                e.addresses.iter().any(|a| a == ip) && e.conditions.as_ref().and_then(|c| c.ready) == Some(true)
            })
        })
        .unwrap_or(false)
}

/// The restart count of a pod's sidecar.
async fn sidecar_restarts(client: &kube::Client, pod: &str) -> Option<i32> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let p = pods.get(pod).await.ok()?;
    p.status?.init_container_statuses?.into_iter().find(|c| c.name == "fulcrum-proxy").map(|c| c.restart_count)
}

/// The operator pod that holds the lease.
async fn leader(client: &kube::Client) -> Option<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), install::OPERATOR_NS);
    for p in pods.list(&ListParams::default().labels("app.kubernetes.io/component=operator")).await.ok()?.items {
        let metrics = get(&format!("http://{}:8080/metrics", pod_ip(&p)?)).await;
        if metrics.is_some_and(|(_, m)| m.lines().any(|l| l.trim() == "fulcrum_operator_leader 1")) {
            return Some(p);
        }
    }
    None
}

/// The operator, installed as a user installs it: the chart's RBAC and its
/// Deployment of two replicas, run by the node; returns the installed
/// objects once one replica is elected.
async fn install_operator(server: &ApiServer, node: &Node) -> Vec<Value> {
    let client = server.client();
    let objects = install::install_yaml();
    install::install_identity(server, &objects);
    let deployment = install::find(&objects, "Deployment", "fulcrum").clone();
    server
        .store()
        .create(&server.resource("apps", "deployments"), install::OPERATOR_NS, deployment)
        .expect("operator Deployment");
    until("an elected operator", Duration::from_secs(30), node, || async { leader(&client).await.is_some() }).await;
    objects
}

/// Whether app `app` has `n` pods, each with a sidecar serving all `n`.
async fn sidecars_ready(client: &kube::Client, app: &str, n: usize) -> bool {
    let pods = pods_of(client, app, "stable").await;
    let mut ready = 0;
    for p in &pods {
        if let Some(ip) = pod_ip(p) {
            ready += usize::from(serving_addresses(format!("{ip}:15090").parse().expect("admin")).await.len() == n);
        }
    }
    pods.len() == n && ready == n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_kubectl_apply_to_traffic_readiness_healing_reconfiguration_and_canary() {
    let dir = TempDir::new("web");
    let server = ApiServer::start().await;
    let client = server.client();
    let node = Node::start(server.issuer(), NodeSettings::new(80, 8_000, dir.0.join("node")));

    let objects = install_operator(&server, &node).await;
    let apps: Api<LoadBalancedApp> = Api::namespaced(client.clone(), "default");
    apps.create(&PostParams::default(), &web()).await.expect("kubectl apply");

    // Three pods, ready, each with a ready sidecar that balances over all three.
    until("three ready pods", Duration::from_secs(30), &node, || async { sidecars_ready(&client, "web", 3).await })
        .await;
    let pods = app_pods(&client, "stable").await;
    // Traffic enters through the first pod's sidecar; the other two are the faults' targets.
    let entry = pods[0].name_any();
    let entry_ip = pod_ip(&pods[0]).expect("pod IP");
    let admin: SocketAddr = format!("{entry_ip}:15090").parse().expect("admin address");
    let traffic =
        Traffic::start(format!("{entry_ip}:15080").parse().expect("proxy address"), 4, Duration::from_millis(4));

    // 1. Round robin spreads evenly.
    let sent = traffic.wait_for(Instant::now(), 900).await;
    let counts = shares(&sent);
    eprintln!("round robin over {} requests: {counts:?}", sent.len());
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (pod, n) in &counts {
        let s = *n as f64 / sent.len() as f64;
        assert!((s - 1.0 / 3.0).abs() < 0.05, "round robin share of {pod} is {s:.3}: {counts:?}");
    }

    // 2. One pod's app stops being ready: once its slice says so, the sidecar
    //    takes it out within 1 s, no new request reaches it after that second,
    //    and none fails.
    let victim = pods[1].name_any();
    let victim_ip = pod_ip(&pods[1]).expect("pod IP");
    node.set_unready(&victim, true);
    until("the slice to list the pod as not ready", Duration::from_secs(10), &node, || async {
        !ready_in_slices(&client, &victim_ip).await
    })
    .await;
    let flipped = Instant::now();
    until("the unready pod to leave the sidecar", Duration::from_secs(1), &node, || async {
        !serving_addresses(admin).await.contains(&format!("{victim_ip}:{APP_PORT}"))
    })
    .await;
    eprintln!("unready pod out of the sidecar {:?} after its slice changed", flipped.elapsed());
    let after = traffic.wait_for(flipped + Duration::from_secs(1), 300).await;
    assert!(!shares(&after).contains_key(&victim), "{victim} still gets traffic 1 s after turning unready");

    // 3. Still unready after unreadyTimeout (3 s): the operator deletes it,
    //    the Deployment replaces it, and the replacement takes traffic.
    until("the operator to delete the unready pod", Duration::from_secs(15), &node, || async {
        !app_pods(&client, "stable").await.iter().any(|p| p.name_any() == victim)
    })
    .await;
    until("a ready replacement in the sidecar", Duration::from_secs(15), &node, || async {
        serving_addresses(admin).await.len() == 3
    })
    .await;
    let now = app_pods(&client, "stable").await;
    assert_eq!(now.len(), 3);
    let replacement = now
        .iter()
        .map(ResourceExt::name_any)
        .find(|n| !pods.iter().any(|p| p.name_any() == *n))
        .expect("a replacement pod");
    let sent = traffic.wait_for(Instant::now(), 600).await;
    assert!(shares(&sent).contains_key(&replacement), "no traffic reaches {replacement}: {:?}", shares(&sent));

    // 4. A new algorithm reaches the running sidecar without a restart.
    let generation = proxy_endpoints(admin).await["generation"].as_u64();
    let patch = json!({"spec": {"loadBalancing": {"algorithm": "LeastRequest"}}});
    apps.patch("web", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch algorithm");
    until("LeastRequest in the sidecar", Duration::from_secs(10), &node, || async {
        proxy_endpoints(admin).await["algorithm"] == "LeastRequest"
    })
    .await;
    assert!(proxy_endpoints(admin).await["generation"].as_u64() > generation);
    assert_eq!(sidecar_restarts(&client, &entry).await, Some(0), "the sidecar restarted");

    // 5. A canary with weight 10 takes 10% ± 2% of the requests.
    let canary = json!({"spec": {
        "loadBalancing": {"algorithm": "RoundRobin"},
        "canary": {"replicas": 1, "weight": 10, "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [app_container("2.54")]}}},
    }});
    apps.patch("web", &PatchParams::default(), &Patch::Merge(&canary)).await.expect("patch canary");
    until("the canary endpoint in the sidecar", Duration::from_secs(20), &node, || async {
        let doc = proxy_endpoints(admin).await;
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
    //    its pod drains and goes, and all traffic returns to the stable track.
    apps.patch("web", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"canary": null}})))
        .await
        .expect("remove the canary");
    until("the canary out of the sidecar", Duration::from_secs(20), &node, || async {
        let doc = proxy_endpoints(admin).await;
        doc["endpoints"].as_array().is_some_and(|a| !a.iter().any(|e| e["track"] == "canary" && e["healthy"] == true))
    })
    .await;
    let from = Instant::now() + Duration::from_secs(1);
    let sent = traffic.wait_for(from, 600).await;
    let counts = shares(&sent);
    assert_eq!(share(&counts, |pod| pod.starts_with("web-canary-")), 0.0, "{counts:?}");

    // 7. The leader crashes (SIGKILL): the other replica takes the lease once
    //    it expires (15 s) and reconciles the next change.
    let old_leader = leader(&client).await.expect("a leader").name_any();
    eprintln!("killing the leader {old_leader}");
    node.kill_container(install::OPERATOR_NS, &old_leader, "operator");
    let patch = json!({"spec": {"loadBalancing": {"algorithm": "LeastConnections"}}});
    apps.patch("web", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch algorithm");
    until("a leader to reconcile the change", Duration::from_secs(40), &node, || async {
        proxy_endpoints(admin).await["algorithm"] == "LeastConnections"
    })
    .await;

    // Over the whole run, not one request failed.
    let failures = traffic.failures();
    assert!(failures.is_empty(), "{} failed requests, first: {:?}\n{}", failures.len(), failures.first(), node.logs());
    assert_eq!(sidecar_restarts(&client, &entry).await, Some(0));
    drop(traffic);
    least_privilege(&server, &objects);
    drop(node);
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
    // The watches of owned kinds are filtered to what the operator made; a list
    // by name (a ConfigMap read before its first write) reads one object.
    for e in operator_events.iter().filter(|e| e.verb == "watch" || (e.verb == "list" && e.name.is_none())) {
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
