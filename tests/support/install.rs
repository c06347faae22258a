//! Fulcrum as a user installs it: the objects of `manifests/install.yaml`
//! loaded into the test API server, the operator Deployment's container run
//! as real `fulcrum` processes with the ServiceAccount, arguments, downward-API
//! environment and probes of its pod spec, and the audit of what each
//! identity did, checked against the rules the chart grants.
//!
//! The one liberty taken with the pod spec: pods on a node each have their
//! own network namespace, processes here share the machine's, so a wildcard
//! listen address in the arguments (`0.0.0.0:PORT`) is bound to the pod's own
//! loopback address instead, and the probes go there, as the kubelet's go to
//! the pod IP. Anything else the pod spec asks for that is not modelled (a
//! `command`, volumes other than the token, env from Secrets) is refused
//! loudly rather than ignored.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};

use crate::apiserver::ApiServer;
use crate::apiserver::auth::{AuditEvent, rule_allows};

/// The release namespace of `manifests/install.yaml`.
pub const OPERATOR_NS: &str = "fulcrum-system";
/// The operator's ServiceAccount there.
pub const OPERATOR_SA: &str = "fulcrum";

/// Every object of `manifests/install.yaml`.
pub fn install_yaml() -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/install.yaml");
    let text = std::fs::read_to_string(&path).expect("manifests/install.yaml");
    serde_saphyr::from_multiple::<Value>(&text)
        .expect("install.yaml parses")
        .into_iter()
        .filter(|o| o.is_object())
        .collect()
}

/// The first object of `kind` named `name`.
pub fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("install.yaml has no {kind} {name}"))
}

/// Stores the operator's Namespace, ServiceAccount, ClusterRole, Roles and
/// bindings from `objects` as `kubectl apply` would (the administrator writes
/// them, so escalation checks pass), and returns the operator's bearer token.
pub fn install_identity(server: &ApiServer, objects: &[Value]) -> String {
    let kinds = ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"];
    for o in objects.iter().filter(|o| kinds.contains(&o["kind"].as_str().unwrap_or_default())) {
        let (group, plural) = match o["kind"].as_str().unwrap_or_default() {
            "Namespace" => ("", "namespaces"),
            "ServiceAccount" => ("", "serviceaccounts"),
            "ClusterRole" => ("rbac.authorization.k8s.io", "clusterroles"),
            "ClusterRoleBinding" => ("rbac.authorization.k8s.io", "clusterrolebindings"),
            "Role" => ("rbac.authorization.k8s.io", "roles"),
            _ => ("rbac.authorization.k8s.io", "rolebindings"),
        };
        let res = server.resource(group, plural);
        let ns = o["metadata"]["namespace"].as_str().unwrap_or_default();
        server.store().create(&res, ns, o.clone()).unwrap_or_else(|e| panic!("install {}: {e:?}", o["kind"]));
    }
    server.token_for(OPERATOR_NS, OPERATOR_SA)
}

/// One `fulcrum operator` process of the chart's Deployment.
pub struct OperatorPod {
    pub name: String,
    pub health: SocketAddr,
    child: tokio::process::Child,
    log: PathBuf,
}

impl OperatorPod {
    /// Starts pod `name` of the Deployment `fulcrum` in `objects`, on the
    /// loopback address `ip`, with `kubeconfig` standing for its mounted token.
    pub fn start(objects: &[Value], name: &str, ip: &str, kubeconfig: &Path, dir: &Path) -> OperatorPod {
        let deployment = find(objects, "Deployment", "fulcrum");
        let pod = &deployment["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], OPERATOR_SA, "the operator runs as the chart's ServiceAccount");
        let containers = pod["containers"].as_array().expect("containers");
        assert_eq!(containers.len(), 1, "one container is modelled");
        let c = &containers[0];
        assert!(c.get("command").is_none(), "the image's entrypoint is the binary; a command is not modelled");
        let args: Vec<String> = c["args"]
            .as_array()
            .expect("args")
            .iter()
            .map(|a| a.as_str().expect("string arg").replace("0.0.0.0:", &format!("{ip}:")))
            .collect();
        let mut env = Vec::new();
        for e in c["env"].as_array().into_iter().flatten() {
            let key = e["name"].as_str().expect("env name").to_owned();
            let value = match (&e["value"], &e["valueFrom"]["fieldRef"]["fieldPath"]) {
                (Value::String(v), _) => v.clone(),
                (_, Value::String(path)) if path == "metadata.name" => name.to_owned(),
                (_, Value::String(path)) if path == "metadata.namespace" => OPERATOR_NS.to_owned(),
                other => panic!("env {key}: {other:?} is not modelled"),
            };
            env.push((key, value));
        }
        let port =
            c["ports"].as_array().and_then(|p| p.first()).and_then(|p| p["containerPort"].as_u64()).expect("port");
        let health = format!("{ip}:{port}").parse().expect("health address");
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fulcrum"))
            .args(&args)
            .envs(env)
            .env("KUBECONFIG", kubeconfig)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .expect("start fulcrum operator");
        OperatorPod { name: name.to_owned(), health, child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The probe `path` on the health port, as the kubelet sends it: the status, or None.
    pub async fn probe(&self, path: &str) -> Option<u16> {
        let mut stream = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(self.health))
            .await
            .ok()?
            .ok()?;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let req = format!("GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.health);
        stream.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(1), stream.read_to_end(&mut buf)).await.ok()?.ok()?;
        let text = String::from_utf8_lossy(&buf);
        text.split_whitespace().nth(1)?.parse().ok()
    }

    /// The process's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let Ok(Ok(mut stream)) =
            tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(self.health)).await
        else {
            return String::new();
        };
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let req = format!("GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.health);
        if stream.write_all(req.as_bytes()).await.is_err() {
            return String::new();
        }
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.read_to_end(&mut buf)).await;
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Kills the process at once, as a node failure would.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    pub fn still_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// One permission a rule grants: (verb, group, resource[/sub], name or "").
pub type Grant = (String, String, String, String);

/// Every permission the rules grant, expanded.
pub fn grants(rules: &[Value]) -> BTreeSet<Grant> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect()).unwrap_or_default()
    };
    let mut out = BTreeSet::new();
    for rule in rules {
        let names = strings(&rule["resourceNames"]);
        let names = if names.is_empty() { vec![String::new()] } else { names };
        for verb in strings(&rule["verbs"]) {
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for name in &names {
                        out.insert((verb.clone(), group.clone(), resource.clone(), name.clone()));
                    }
                }
            }
        }
    }
    out
}

/// Whether an allowed request of the audit used `grant`.
pub fn used_by(grant: &Grant, events: &[AuditEvent]) -> bool {
    let (verb, group, resource, name) = grant;
    let mut rule = json!({"verbs": [verb], "apiGroups": [group], "resources": [resource]});
    if !name.is_empty() {
        rule["resourceNames"] = json!([name]);
    }
    events.iter().filter(|e| e.allowed).any(|e| {
        let (res, sub) = match e.resource.split_once('/') {
            Some((r, s)) => (r.to_owned(), Some(s.to_owned())),
            None => (e.resource.clone(), None),
        };
        let a = crate::apiserver::auth::Attributes {
            verb: e.verb.clone(),
            group: e.group.clone(),
            resource: res,
            subresource: sub,
            namespace: e.namespace.clone(),
            name: e.name.clone(),
        };
        rule_allows(&rule, &a)
    })
}
