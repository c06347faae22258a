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
#[allow(dead_code)]
#[path = "../proxy/grpc_peer.rs"]
mod grpc_peer;
#[path = "../support/install.rs"]
mod install;
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
        self.must_with(args, "", node).await
    }

    /// Like [`Kubectl::must`], with `stdin` as its input (when not empty).
    async fn must_with(&self, args: &[&str], stdin: &str, node: &Node) -> String {
        let r = self.run(args, (!stdin.is_empty()).then_some(stdin)).await;
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

async fn render_chart(values: &str) -> String {
    let values = values.to_owned();
    tokio::task::spawn_blocking(move || install::render_chart(&values)).await.expect("render the chart")
}

/// What the chart's `ci/no-rbac-values.yaml` leaves to the platform team: the
/// operator's ServiceAccount `fulcrum-operator`, bound to the rules of the
/// default install's ClusterRole and leader-election Role.
const RBAC_OUTSIDE_THE_CHART: &str = "
apiVersion: v1
kind: ServiceAccount
metadata: {name: fulcrum-operator, namespace: fulcrum-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: fulcrum-operator}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: fulcrum}
subjects: [{kind: ServiceAccount, name: fulcrum-operator, namespace: fulcrum-system}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: fulcrum-operator-leader-election, namespace: fulcrum-system}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: fulcrum-leader-election}
subjects: [{kind: ServiceAccount, name: fulcrum-operator, namespace: fulcrum-system}]
";

/// The part of the Prometheus Operator's ServiceMonitor CRD the chart's
/// ServiceMonitor uses (as installed with the Prometheus Operator).
const SERVICE_MONITOR_CRD: &str = "
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: servicemonitors.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  names: {kind: ServiceMonitor, listKind: ServiceMonitorList, plural: servicemonitors, singular: servicemonitor, categories: [prometheus-operator], shortNames: [smon]}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          required: [spec]
          properties:
            spec:
              type: object
              required: [selector]
              properties:
                selector: {type: object, x-kubernetes-preserve-unknown-fields: true}
                namespaceSelector:
                  type: object
                  properties:
                    any: {type: boolean}
                    matchNames: {type: array, items: {type: string}}
                endpoints:
                  type: array
                  items:
                    type: object
                    properties:
                      port: {type: string}
                      path: {type: string}
                      interval: {type: string, pattern: '^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$'}
                      scheme: {type: string, enum: [http, https]}
";

/// Parses kubectl's `-o json` output.
fn json_of(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("kubectl JSON: {e}: {text}"))
}

/// Scrapes the operators as Prometheus would from the chart's ServiceMonitor:
/// the Services it selects, the port it names, the ready endpoints behind it.
async fn scrape_through_the_service_monitor(kubectl: &Kubectl, node: &Node) {
    let ns = ["-n", "fulcrum-system"];
    let monitor =
        json_of(&kubectl.must(&[&ns[..], &["get", "servicemonitor", "fulcrum", "-o", "json"]].concat(), node).await);
    let selector: Vec<String> = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    let selector = selector.join(",");
    let services =
        json_of(&kubectl.must(&[&ns[..], &["get", "services", "-l", &selector, "-o", "json"]].concat(), node).await);
    let endpoint = &monitor["spec"]["endpoints"][0];
    let port_name = endpoint["port"].as_str().expect("endpoint port");
    let service = services["items"]
        .as_array()
        .and_then(|s| {
            s.iter().find(|s| s["spec"]["ports"].as_array().is_some_and(|p| p.iter().any(|p| p["name"] == port_name)))
        })
        .expect("a selected Service with the ServiceMonitor's port");
    let by_service = format!("kubernetes.io/service-name={}", service["metadata"]["name"].as_str().expect("name"));
    let slices = json_of(
        &kubectl.must(&[&ns[..], &["get", "endpointslices", "-l", &by_service, "-o", "json"]].concat(), node).await,
    );
    let slice = &slices["items"][0];
    let port =
        slice["ports"].as_array().and_then(|p| p.iter().find(|p| p["name"] == port_name)).expect("slice port")["port"]
            .as_u64()
            .expect("port number");
    let path = endpoint["path"].as_str().unwrap_or("/metrics");
    let mut scraped = 0;
    for e in slice["endpoints"].as_array().into_iter().flatten().filter(|e| e["conditions"]["ready"] == true) {
        let ip = e["addresses"][0].as_str().expect("address");
        let (status, body) = get(&format!("http://{ip}:{port}{path}")).await.expect("scrape");
        assert_eq!(status, 200);
        assert!(body.lines().any(|l| l.starts_with("fulcrum_operator_leader ")), "{body}");
        scraped += 1;
    }
    assert!(scraped > 0, "no operator to scrape");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_with_its_ci_values_installs_and_serves_the_quickstart() {
    for values in ["pinned-single-values.yaml", "no-rbac-values.yaml", "servicemonitor-values.yaml"] {
        let dir = TempDir(std::env::temp_dir().join(format!("fulcrum-install-ci-{}-{values}", std::process::id())));
        std::fs::create_dir_all(&dir.0).expect("temp dir");
        let server = ApiServer::start_bare().await;
        let node = Node::start(server.issuer(), NodeSettings::new(110, 8_000, dir.0.join("node")));
        let kubectl = Kubectl { kubeconfig: server.write_kubeconfig(&dir.0, server.admin_token(), "default") };
        let rendered = render_chart(values).await;
        if values == "no-rbac-values.yaml" {
            // The rules come from the default install; the chart makes neither account nor bindings.
            assert!(!rendered.contains("kind: ClusterRole"), "{values} renders RBAC");
            let install = Path::new(ROOT).join("manifests/install.yaml");
            let defaults = std::fs::read_to_string(install).expect("install.yaml");
            let roles: Vec<&str> = defaults
                .split("\n---\n")
                .filter(|d| d.contains("\nkind: ClusterRole\n") || d.contains("\nkind: Role\n"))
                .collect();
            // The operator's ClusterRole and leader-election Role, and the two
            // aggregated into the default user roles.
            assert_eq!(roles.len(), 4);
            kubectl.must_with(&["apply", "--server-side", "-f", "-"], &rendered, &node).await;
            kubectl.must_with(&["apply", "--server-side", "-f", "-"], &roles.join("\n---\n"), &node).await;
            kubectl.must_with(&["apply", "--server-side", "-f", "-"], RBAC_OUTSIDE_THE_CHART, &node).await;
        } else {
            if values == "servicemonitor-values.yaml" {
                kubectl.must_with(&["apply", "--server-side", "-f", "-"], SERVICE_MONITOR_CRD, &node).await;
            }
            kubectl.must_with(&["apply", "--server-side", "-f", "-"], &rendered, &node).await;
        }
        kubectl
            .must(
                &["-n", "fulcrum-system", "wait", "deployment", "--all", "--for=condition=Available", "--timeout=90s"],
                &node,
            )
            .await;
        kubectl.must(&["apply", "-f", &example("minimal.yaml")], &node).await;
        kubectl.must(&["wait", "lba/web", "--for=condition=Available", "--timeout=120s"], &node).await;
        let image = kubectl
            .must(&["get", "deployment", "web", "-o", "jsonpath={.spec.template.spec.initContainers[0].image}"], &node)
            .await;
        if values == "pinned-single-values.yaml" {
            assert_eq!(
                image, "registry.example.com/platform/fulcrum:0.1.0",
                "the chart's proxyImage reaches the sidecars"
            );
        }
        if values == "servicemonitor-values.yaml" {
            scrape_through_the_service_monitor(&kubectl, &node).await;
        }
        let denied: Vec<_> =
            server.audit().into_iter().filter(|e| e.user.starts_with("system:serviceaccount:") && !e.allowed).collect();
        assert!(denied.is_empty(), "{values}: denied: {denied:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_as_a_user_quickstart_traffic_healing_failover_examples_and_faults() {
    let dir = TempDir(std::env::temp_dir().join(format!("fulcrum-install-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let server = ApiServer::start_bare().await;
    let node = Node::start(server.issuer(), NodeSettings::new(90, 16_000, dir.0.join("node")));
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

    // A pod whose app stops being ready leaves every proxy, and is replaced.
    kubectl
        .must(&["patch", "lba", "web", "--type=merge", "-p", r#"{"spec":{"healing":{"unreadyTimeout":"4s"}}}"#], &node)
        .await;
    let victim = web[0].name_any();
    let victim_ip = pod_ip(&web[0]);
    let witness = pod_ip(&web[1]);
    node.set_unready(&victim, true);
    until("the unready pod out of the other pods' proxies", Duration::from_secs(20), &node, || async {
        let Some((200, body)) = get(&format!("http://{witness}:15090/endpoints")).await else { return false };
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        doc["endpoints"].as_array().is_some_and(|eps| {
            eps.iter()
                .filter(|e| e["healthy"] == true)
                .all(|e| !e["address"].as_str().unwrap_or_default().starts_with(&format!("{victim_ip}:")))
                && eps.iter().filter(|e| e["healthy"] == true).count() == 2
        })
    })
    .await;
    until("the unready pod healed", Duration::from_secs(40), &node, || async {
        let now = pods(&client, "default", "fulcrum.dev/app=web").await;
        !now.iter().any(|p| p.name_any() == victim) && now.len() == 3
    })
    .await;
    kubectl.must(&["wait", "lba/web", "--for=condition=Available", "--timeout=60s"], &node).await;
    let healed = kubectl
        .must(&["get", "lba", "web", "-o", "jsonpath={.status.healedTotal} {.status.lastHealing.reason}"], &node)
        .await;
    assert_eq!(healed, "1 UnreadyTooLong");

    // The leader goes: the standby takes the lease and reconciles the next change.
    let mut leader = None;
    for p in &operators {
        if get(&format!("http://{}:8080/metrics", pod_ip(p))).await.is_some_and(|(_, m)| is_leader(&m)) {
            leader = Some(p.name_any());
        }
    }
    let leader = leader.expect("a leader");
    kubectl.must(&["-n", "fulcrum-system", "delete", "pod", &leader, "--wait=false"], &node).await;
    kubectl
        .must(
            &[
                "patch",
                "lba",
                "web",
                "--type=merge",
                "-p",
                r#"{"spec":{"loadBalancing":{"algorithm":"LeastConnections"}}}"#,
            ],
            &node,
        )
        .await;
    until("the new leader's change in the proxies", Duration::from_secs(60), &node, || async {
        let mut all = true;
        for p in pods(&client, "default", "fulcrum.dev/app=web").await {
            let doc = get(&format!("http://{}:15090/endpoints", pod_ip(&p))).await;
            all &= doc.is_some_and(|(_, body)| body.contains("\"algorithm\": \"LeastConnections\""));
        }
        all
    })
    .await;

    // `kubectl scale` acts on the app (as an autoscaler would, through its
    // scale subresource); the operator carries the count to the pods.
    kubectl.must(&["scale", "lba/web", "--replicas=4"], &node).await;
    kubectl.must(&["wait", "lba/web", "--for=jsonpath={.status.readyReplicas}=4", "--timeout=60s"], &node).await;
    let scale = json_of(
        &kubectl
            .must(&["get", "--raw", "/apis/fulcrum.dev/v1alpha1/namespaces/default/loadbalancedapps/web/scale"], &node)
            .await,
    );
    assert_eq!(scale["status"]["replicas"], 4);
    let selector = scale["status"]["selector"].as_str().unwrap_or_default().to_owned();
    assert_eq!(pods(&client, "default", &selector).await.len(), 4, "the Scale's selector names the app's pods");

    // Every example is accepted and turns Available: none deadlocks on
    // readiness. The TLS example's Secret is made as its comment says.
    let ca = TestCa::new();
    let first = ca.issue("secure-web.example.com", "secure-web first");
    // `kubectl create secret tls`, made client-side and applied: the double
    // speaks JSON, not the protobuf `kubectl create` sends for built-in kinds.
    let apply_secret = |(cert, key): (String, String)| {
        let (crt, key_file) = (dir.0.join("tls.crt"), dir.0.join("tls.key"));
        std::fs::write(&crt, cert).expect("write");
        std::fs::write(&key_file, key).expect("write");
        let (crt_arg, key_arg) = (format!("--cert={}", crt.display()), format!("--key={}", key_file.display()));
        let (kubectl, node) = (&kubectl, &node);
        async move {
            let secret = kubectl
                .must(
                    &[
                        "create",
                        "secret",
                        "tls",
                        "secure-web-tls",
                        &crt_arg,
                        &key_arg,
                        "--dry-run=client",
                        "-o",
                        "yaml",
                    ],
                    node,
                )
                .await;
            kubectl.must_with(&["apply", "-f", "-"], &secret, node).await;
        }
    };
    apply_secret(first).await;
    let examples = Path::new(ROOT).join("manifests/examples").display().to_string();
    kubectl.must(&["apply", "-f", &examples], &node).await;
    kubectl.must(&["wait", "lba", "--all", "--for=condition=Available", "--timeout=180s"], &node).await;
    let all = kubectl.must(&["get", "lba"], &node).await;
    eprintln!("{all}");
    assert_eq!(all.lines().count(), 1 + 11, "eleven apps: {all}");

    // HTTPS through a sidecar of the TLS example, verified by curl; then the
    // Secret is renewed and new handshakes get the new certificate, with no restart.
    let ca_file = dir.0.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("write");
    let secure = pods(&client, "default", "fulcrum.dev/app=secure-web").await;
    let ip = pod_ip(&secure[0]);
    let subject = || async {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "-v", "--max-time", "5", "--cacert"])
            .arg(&ca_file)
            .args([
                "--resolve",
                &format!("secure-web.example.com:15080:{ip}"),
                "https://secure-web.example.com:15080/hostname",
            ])
            .output()
            .await
            .expect("run curl");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let subject = err.lines().find_map(|l| l.trim().strip_prefix("*  subject: ")).unwrap_or_default().to_owned();
        (out.status.success(), subject, String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (ok, first_subject, body) = subject().await;
    assert!(
        ok && first_subject.contains("secure-web first") && body.starts_with("secure-web-"),
        "{first_subject} {body}"
    );
    apply_secret(ca.issue("secure-web.example.com", "secure-web renewed")).await;
    until("the renewed certificate served", Duration::from_secs(30), &node, || async {
        let (ok, subject, _) = subject().await;
        ok && subject.contains("secure-web renewed")
    })
    .await;
    assert_eq!(restarts(&client, "default", "fulcrum.dev/app=secure-web").await, 0, "no proxy restarted");
    let hpa = kubectl
        .must(&["get", "horizontalpodautoscalers", "catalog", "-o", "jsonpath={.spec.scaleTargetRef.kind}"], &node)
        .await;
    assert_eq!(hpa, "LoadBalancedApp", "the example's autoscaler targets the app");

    // An invalid app is refused at apply time with the CEL rule's message.
    let invalid = "apiVersion: fulcrum.dev/v1alpha1\nkind: LoadBalancedApp\nmetadata: {name: bad}\nspec:\n  port: 8080\n  loadBalancing: {algorithm: ConsistentHash}\n  template: {spec: {containers: [{name: app, image: registry.k8s.io/e2e-test-images/agnhost:2.53, args: [netexec]}]}}\n";
    let refused = kubectl.run(&["apply", "-f", "-"], Some(invalid)).await;
    assert!(!refused.ok, "an invalid app was accepted");
    assert!(refused.stderr.contains("ConsistentHash needs hashOn"), "{}", refused.stderr);

    // A pod that turns token automounting off still has a working sidecar:
    // the proxy mounts its own projected token.
    let no_token = "apiVersion: fulcrum.dev/v1alpha1\nkind: LoadBalancedApp\nmetadata: {name: no-token}\nspec:\n  replicas: 2\n  port: 8080\n  template: {spec: {automountServiceAccountToken: false, containers: [{name: app, image: registry.k8s.io/e2e-test-images/agnhost:2.53, args: [netexec]}]}}\n";
    kubectl.must_with(&["apply", "-f", "-"], no_token, &node).await;
    kubectl.must(&["wait", "lba/no-token", "--for=condition=Available", "--timeout=60s"], &node).await;

    // Pods that never start are reported, never deleted; a crash loop is reported.
    let app = |name: &str, container: &str| {
        format!(
            "apiVersion: fulcrum.dev/v1alpha1\nkind: LoadBalancedApp\nmetadata: {{name: {name}}}\nspec:\n  replicas: 1\n  port: 8080\n  healing: {{unreadyTimeout: 3s}}\n  template: {{spec: {{containers: [{container}]}}}}\n"
        )
    };
    let faults = [
        app("no-image", "{name: app, image: registry.example/does-not-exist:1}"),
        app("too-big", "{name: app, image: registry.k8s.io/e2e-test-images/agnhost:2.53, args: [netexec], resources: {requests: {cpu: '64'}}}"),
        app("crasher", "{name: app, image: ghcr.io/fulcrum-dev/fulcrum:0.1.0, args: [proxy, --config, /nonexistent.yaml]}"),
    ]
    .join("---\n");
    kubectl.must_with(&["apply", "-f", "-"], &faults, &node).await;
    for (name, reason) in [("no-image", "PodsNotStarted"), ("too-big", "PodsNotStarted"), ("crasher", "CrashLoop")] {
        until(&format!("{name} Degraded ({reason})"), Duration::from_secs(40), &node, || async {
            let out = kubectl
                .run(
                    &["get", "lba", name, "-o", r#"jsonpath={.status.conditions[?(@.type=="Degraded")].reason}"#],
                    None,
                )
                .await;
            out.stdout == reason
        })
        .await;
    }
    let waiting =
        kubectl.must(&["get", "lba", "no-image", "-o", "jsonpath={.status.notStarted[0].reason}"], &node).await;
    assert!(["ErrImagePull", "ImagePullBackOff"].contains(&waiting.as_str()), "{waiting}");
    let unschedulable =
        kubectl.must(&["get", "lba", "too-big", "-o", "jsonpath={.status.notStarted[0].reason}"], &node).await;
    assert_eq!(unschedulable, "Unschedulable");
    let before: Vec<String> = pods(&client, "default", "fulcrum.dev/app in (no-image,too-big,crasher)")
        .await
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after: Vec<String> = pods(&client, "default", "fulcrum.dev/app in (no-image,too-big,crasher)")
        .await
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    assert_eq!(before, after, "a pod that cannot start or crash-loops is not deleted");
    assert_eq!(before.len(), 3);
    for name in ["no-image", "too-big", "crasher"] {
        let healed = kubectl.must(&["get", "lba", name, "-o", "jsonpath={.status.healedTotal}"], &node).await;
        assert_eq!(healed, "0", "{name}");
    }

    // Deleting an app collects everything the operator made for it.
    kubectl.must(&["delete", "lba", "web", "--wait=true", "--timeout=60s"], &node).await;
    until("the app's objects collected", Duration::from_secs(30), &node, || async {
        let left = kubectl
            .run(
                &[
                    "get",
                    "deployments,services,configmaps,serviceaccounts,roles,rolebindings,poddisruptionbudgets,pods",
                    "-l",
                    "fulcrum.dev/app=web",
                    "-o",
                    "name",
                ],
                None,
            )
            .await;
        left.ok && left.stdout.trim().is_empty()
    })
    .await;

    // No request of a Fulcrum identity was denied anywhere in the run.
    let denied: Vec<_> =
        server.audit().into_iter().filter(|e| e.user.starts_with("system:serviceaccount:") && !e.allowed).collect();
    assert!(denied.is_empty(), "denied: {denied:#?}");
}

/// A certificate authority for the TLS example, made at test time.
struct TestCa(rcgen::CertifiedIssuer<'static, rcgen::KeyPair>);

impl TestCa {
    fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "install test CA");
        TestCa(rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().expect("key")).expect("CA"))
    }

    fn pem(&self) -> String {
        self.0.pem()
    }

    /// A certificate for `name` with common name `cn`, and its key (PEM).
    fn issue(&self, name: &str, cn: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        (params.signed_by(&key, &self.0).expect("sign").pem(), key.serialize_pem())
    }
}

/// Container restarts over the pods `selector` selects.
async fn restarts(client: &kube::Client, ns: &str, selector: &str) -> i32 {
    pods(client, ns, selector)
        .await
        .iter()
        .filter_map(|p| p.status.as_ref())
        .flat_map(|s| s.container_statuses.iter().flatten().chain(s.init_container_statuses.iter().flatten()))
        .map(|c| c.restart_count)
        .sum()
}
