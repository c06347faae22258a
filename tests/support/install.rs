//! Fulcrum as a user installs it: the objects of `manifests/install.yaml`
//! loaded into the test API server, and the audit of what each identity did,
//! checked against the rules the chart grants.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::Path;

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
    objects(&std::fs::read_to_string(&path).expect("manifests/install.yaml"))
}

/// The objects of a multi-document YAML text.
pub fn objects(text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .expect("the manifests parse")
        .into_iter()
        .filter(|o| o.is_object())
        .collect()
}

/// `manifests/install.yaml` as it would be with the chart rendered with the
/// values file `charts/fulcrum/ci/<values>` (by Helm's Go SDK, through
/// `tests/manifests/check.py --render`).
pub fn render_chart(values: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python");
    assert!(
        python.exists(),
        "the chart tools' virtualenv is missing: `make test` (or `make manifests-check`) installs it in .venv"
    );
    let out = std::process::Command::new(python)
        .arg(root.join("tests/manifests/check.py"))
        .arg("--render")
        .arg(root.join("charts/fulcrum/ci").join(values))
        .output()
        .expect("render the chart");
    assert!(out.status.success(), "render {values}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8 manifests")
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
