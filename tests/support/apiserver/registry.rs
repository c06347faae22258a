//! The resources the test API server knows, and its discovery documents.

use serde_json::{Value, json};

/// One registered resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resource {
    /// API group; empty for core.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub namespaced: bool,
    /// Has a `/status` subresource (status and spec are written separately).
    pub status: bool,
    /// Has a `/scale` subresource.
    pub scale: bool,
    /// A custom resource: served only while its CustomResourceDefinition is
    /// stored, and admitted by its schema and CEL rules.
    pub custom: bool,
}

impl Resource {
    /// `group/version`, or `version` for core.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.to_owned() } else { format!("{}/{}", self.group, self.version) }
    }

    /// `kind` of the list type.
    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }
}

const fn res(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
    status: bool,
) -> Resource {
    Resource { group, version, kind, plural, namespaced, status, scale: false, custom: false }
}

/// Everything Fulcrum reads or writes.
pub fn builtin() -> Vec<Resource> {
    let mut deployments = res("apps", "v1", "Deployment", "deployments", true, true);
    deployments.scale = true;
    vec![
        res("", "v1", "Namespace", "namespaces", false, true),
        res("", "v1", "Pod", "pods", true, true),
        res("", "v1", "Service", "services", true, true),
        res("", "v1", "ConfigMap", "configmaps", true, false),
        res("", "v1", "Secret", "secrets", true, false),
        res("", "v1", "ServiceAccount", "serviceaccounts", true, false),
        res("", "v1", "Event", "events", true, false),
        res("events.k8s.io", "v1", "Event", "events", true, false),
        deployments,
        res("apps", "v1", "ReplicaSet", "replicasets", true, true),
        res("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets", true, true),
        res("rbac.authorization.k8s.io", "v1", "Role", "roles", true, false),
        res("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings", true, false),
        res("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles", false, false),
        res("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings", false, false),
        res("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", true, false),
        res("networking.k8s.io", "v1", "NetworkPolicy", "networkpolicies", true, false),
        res("coordination.k8s.io", "v1", "Lease", "leases", true, false),
        // Stored only (no controller acts on it): the examples' autoscaler.
        res("autoscaling", "v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers", true, true),
        res("apiextensions.k8s.io", "v1", "CustomResourceDefinition", "customresourcedefinitions", false, true),
        Resource { custom: true, ..res("fulcrum.dev", "v1alpha1", "LoadBalancedApp", "loadbalancedapps", true, true) },
        // The Prometheus Operator's, for the chart's optional ServiceMonitor.
        Resource {
            custom: true,
            ..res("monitoring.coreos.com", "v1", "ServiceMonitor", "servicemonitors", true, false)
        },
    ]
}

fn resource_list_entry(r: &Resource) -> Vec<Value> {
    let verbs = json!(["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]);
    let mut out = vec![json!({
        "name": r.plural,
        "singularName": r.kind.to_lowercase(),
        "namespaced": r.namespaced,
        "kind": r.kind,
        "verbs": verbs,
    })];
    if r.status {
        out.push(json!({"name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced, "kind": r.kind, "verbs": ["get", "patch", "update"]}));
    }
    if r.scale {
        out.push(json!({"name": format!("{}/scale", r.plural), "singularName": "", "namespaced": r.namespaced, "group": "autoscaling", "version": "v1", "kind": "Scale", "verbs": ["get", "patch", "update"]}));
    }
    out
}

/// `/api`.
pub fn core_versions() -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})
}

/// `/apis`.
pub fn groups(resources: &[Resource]) -> Value {
    let mut names: Vec<(&str, &str)> =
        resources.iter().filter(|r| !r.group.is_empty()).map(|r| (r.group, r.version)).collect();
    names.sort_unstable();
    names.dedup();
    let groups: Vec<Value> = names
        .iter()
        .map(|(g, v)| {
            let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
            json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/api/v1` or `/apis/{group}/{version}`; none for an unknown group version.
pub fn resource_list(resources: &[Resource], group: &str, version: &str) -> Option<Value> {
    let matching: Vec<&Resource> = resources.iter().filter(|r| r.group == group && r.version == version).collect();
    if matching.is_empty() {
        return None;
    }
    let gv = if group.is_empty() { version.to_owned() } else { format!("{group}/{version}") };
    let entries: Vec<Value> = matching.into_iter().flat_map(resource_list_entry).collect();
    Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": entries}))
}

/// `/openapi/v3`: where each group version's document is.
pub fn openapi_v3_root(resources: &[Resource]) -> Value {
    let mut paths = serde_json::Map::new();
    for r in resources {
        let gv = gv_path(r);
        paths.insert(gv.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{gv}?hash=fulcrum-test")}));
    }
    json!({"paths": paths})
}

fn gv_path(r: &Resource) -> String {
    if r.group.is_empty() { format!("api/{}", r.version) } else { format!("apis/{}/{}", r.group, r.version) }
}

/// `/openapi/v3/api/v1` or `/openapi/v3/apis/{group}/{version}`: the paths of
/// each resource with the operations the server serves and their query
/// parameters, so that clients see which parameters (`fieldValidation`,
/// `fieldManager`, `dryRun`) it honours. Schemas are left open: the server
/// itself validates what it admits.
pub fn openapi_v3_doc(resources: &[Resource], gv: &str) -> Option<Value> {
    let matching: Vec<&Resource> = resources.iter().filter(|r| gv_path(r) == gv).collect();
    if matching.is_empty() {
        return None;
    }
    let query = |name: &str| json!({"name": name, "in": "query", "schema": {"type": "string"}});
    let mut paths = serde_json::Map::new();
    for r in matching {
        let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
        let op = |action: &str, params: Vec<Value>| {
            json!({
                "operationId": format!("{action}{}", r.kind),
                "parameters": params,
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk,
                "responses": {"200": {"description": "OK"}},
            })
        };
        let writes = || vec![query("dryRun"), query("fieldManager"), query("fieldValidation")];
        let base = if r.namespaced {
            format!("/{gv}/namespaces/{{namespace}}/{}", r.plural)
        } else {
            format!("/{gv}/{}", r.plural)
        };
        paths.insert(
            base.clone(),
            json!({
                "get": op("list", vec![query("labelSelector"), query("fieldSelector"), query("watch"), query("limit"), query("continue")]),
                "post": op("post", writes()),
            }),
        );
        let mut patch_params = writes();
        patch_params.push(query("force"));
        paths.insert(
            format!("{base}/{{name}}"),
            json!({"get": op("get", vec![]), "put": op("put", writes()), "patch": op("patch", patch_params), "delete": op("delete", vec![query("dryRun")])}),
        );
    }
    Some(
        json!({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.33.0"}, "paths": paths, "components": {"schemas": {}}}),
    )
}
