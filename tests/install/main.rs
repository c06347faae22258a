//! Install as a user (tier 4b): the real `kubectl` applies
//! `manifests/install.yaml` and the examples to the API server double; a
//! process kubelet runs every pod's containers as local processes (the
//! operator's two replicas and every sidecar proxy as the real `fulcrum`
//! binary, the example apps as test backends) with the probes their specs
//! declare; then the README's quickstart, traffic through the sidecars,
//! healing, leader failover, every example, an invalid app, pods that never
//! start or crash-loop, and the uninstall of an app. The audit then shows
//! that no request of a Fulcrum identity was denied.

#[path = "../support/apiserver/mod.rs"]
mod apiserver;
#[path = "../support/kubelet.rs"]
mod kubelet;
#[allow(dead_code)]
#[path = "../proxy/support.rs"]
mod support;
#[path = "../support/wait.rs"]
mod wait;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams};

use apiserver::ApiServer;
use kubelet::{Node, NodeSettings};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The real kubectl, as the administrator.
struct Kubectl {
    kubeconfig: PathBuf,
}

struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Kubectl {
    async fn run(&self, args: &[&str], stdin: Option<&str>) -> Ran {
        use tokio::io::AsyncWriteExt;
        let mut cmd = tokio::process::Command::new("kubectl");
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        cmd.stdin(if stdin.is_some() { std::process::Stdio::piped() } else { std::process::Stdio::null() });
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).kill_on_drop(true);
        let mut child = cmd.spawn().expect("kubectl is part of this project's test environment");
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes()).await.expect("kubectl stdin");
        }
        let out = tokio::time::timeout(Duration::from_secs(300), child.wait_with_output())
            .await
            .expect("kubectl finished")
            .expect("kubectl output");
        Ran {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    async fn must(&self, args: &[&str], node: &Node) -> String {
        let r = self.run(args, None).await;
        assert!(r.ok, "kubectl {args:?} failed:\n{}\n{}\n{}", r.stdout, r.stderr, node.logs());
        r.stdout
    }
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn until<F, Fut>(what: &str, limit: Duration, node: &Node, f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait::until(what, limit, Duration::from_millis(200), || node.logs(), f).await;
}

async fn pods(client: &kube::Client, ns: &str, selector: &str) -> Vec<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default().labels(selector)).await.map(|l| l.items).unwrap_or_default()
}

fn pod_ip(p: &Pod) -> String {
    p.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap_or_default()
}

/// An HTTP GET: (status, body), or None.
async fn get(url: &str) -> Option<(u16, String)> {
    let req = http::Request::get(url).body(Default::default()).ok()?;
    let r = tokio::time::timeout(Duration::from_secs(2), support::send(&support::client(), req)).await.ok()?.ok()?;
    Some((r.status.as_u16(), r.body))
}

/// Whether an operator's metrics say it holds the lease.
fn is_leader(metrics: &str) -> bool {
    metrics.lines().any(|l| l.trim() == "fulcrum_operator_leader 1")
}

fn example(name: &str) -> String {
    Path::new(ROOT).join("manifests/examples").join(name).display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_as_a_user_quickstart_traffic_healing_failover_examples_and_faults() {
    let dir = TempDir(std::env::temp_dir().join(format!("fulcrum-install-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let server = ApiServer::start_bare().await;
    let node = Node::start(server.issuer(), NodeSettings { net: 90, cpu_millis: 16_000, dir: dir.0.join("node") });
    let kubectl = Kubectl { kubeconfig: server.write_kubeconfig(&dir.0, server.admin_token(), "default") };
    let client = server.client();

    // The operator, as the README installs it without Helm.
    let install = Path::new(ROOT).join("manifests/install.yaml").display().to_string();
    kubectl.must(&["apply", "--server-side", "-f", &install], &node).await;
    kubectl
        .must(
            &["-n", "fulcrum-system", "wait", "deployment/fulcrum", "--for=condition=Available", "--timeout=90s"],
            &node,
        )
        .await;
    let operators = pods(&client, "fulcrum-system", "app.kubernetes.io/component=operator").await;
    assert_eq!(operators.len(), 2, "the chart's two replicas");
    until("one elected operator", Duration::from_secs(30), &node, || async {
        let mut leaders = 0;
        for p in &operators {
            if let Some((_, m)) = get(&format!("http://{}:8080/metrics", pod_ip(p))).await {
                leaders += usize::from(is_leader(&m));
            }
        }
        leaders == 1
    })
    .await;

    // The quickstart: apply, wait for Available, list.
    kubectl.must(&["apply", "-f", &example("minimal.yaml")], &node).await;
    kubectl.must(&["wait", "lba/web", "--for=condition=Available", "--timeout=120s"], &node).await;
    let listed = kubectl.must(&["get", "lba"], &node).await;
    eprintln!("{listed}");
    let header: Vec<&str> = listed.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, ["NAME", "ALGORITHM", "READY", "ENDPOINTS", "AVAILABLE", "AGE"], "the CRD's printer columns");
    let row: Vec<&str> = listed.lines().nth(1).unwrap_or_default().split_whitespace().collect();
    assert_eq!(row[..5], ["web", "RoundRobin", "3", "3", "True"]);

    // Traffic through each pod's sidecar reaches every pod.
    let web = pods(&client, "default", "fulcrum.dev/app=web").await;
    assert_eq!(web.len(), 3);
    let names: BTreeSet<String> = web.iter().map(ResourceExt::name_any).collect();
    let mut seen = BTreeSet::new();
    for p in &web {
        for _ in 0..6 {
            let (status, body) =
                get(&format!("http://{}:15080/hostname", pod_ip(p))).await.expect("the sidecar answers");
            assert_eq!(status, 200);
            seen.insert(body);
        }
    }
    assert_eq!(seen, names, "every pod is reached through the sidecars");
}
