//! Desired state as pure functions: from a `LoadBalancedApp` and the
//! operator's settings, every object the operator owns (DESIGN.md §3).
//! No I/O; the reconciler applies what these return.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodTemplateSpec, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::render::{ADMIN_PORT, InvalidSpec, PROXY_PORT, proxy_config};
use crate::api::{AppProtocol, LoadBalancedApp, LoadBalancedAppSpec, Protocol, ProxyMode};

/// Label naming the app a pod belongs to.
pub const APP_LABEL: &str = "fulcrum.dev/app";
/// Label naming a pod's track (`stable` or `canary`).
pub const TRACK_LABEL: &str = "fulcrum.dev/track";
/// Label naming a pod's component (`proxy` for dedicated proxy pods).
pub const COMPONENT_LABEL: &str = "fulcrum.dev/component";
/// Name of the proxy container.
pub const PROXY_CONTAINER: &str = "fulcrum-proxy";
/// Name of the pod volume that holds the proxy's own API credentials.
pub const PROXY_TOKEN_VOLUME: &str = "fulcrum-proxy-token";
/// Where a pod's API credentials are mounted, and where the proxy's client looks for them.
const TOKEN_MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Where the proxy's TLS Secrets are mounted: `TLS_DIR/0` the default
/// certificate, `TLS_DIR/1`… the SNI ones, `TLS_DIR/client-ca` the client CA.
pub const TLS_DIR: &str = "/etc/fulcrum/tls";
/// Where the endpoints' CA (`ENDPOINT_TLS_DIR/ca`) and the proxy's client
/// certificate for them (`ENDPOINT_TLS_DIR/client`) are mounted.
pub const ENDPOINT_TLS_DIR: &str = "/etc/fulcrum/endpoint-tls";
/// Prefix of the names of the pod volumes the proxy uses.
const PROXY_VOLUME_PREFIX: &str = "fulcrum-";
/// Key of the proxy configuration in its ConfigMap.
pub const CONFIG_KEY: &str = "proxy.yaml";
/// Label selector of every object the operator owns (their `app.kubernetes.io/managed-by`).
pub const MANAGED_BY_SELECTOR: &str = "app.kubernetes.io/managed-by=fulcrum";
/// Name of the backends Services' port, which the proxy looks up in their EndpointSlices.
pub const BACKEND_PORT_NAME: &str = "app";

/// Label selector, in string form, of an app's stable pods: never its
/// canary or its dedicated proxies. The scale subresource reports it, so an
/// autoscaler targeting the app measures the pods it scales.
pub fn stable_selector(app: &str) -> String {
    format!("{APP_LABEL}={app},{TRACK_LABEL}=stable")
}

/// Settings of the operator that shape what it creates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Image of the proxy, unless the spec names one.
    pub proxy_image: String,
}

/// Everything one `LoadBalancedApp` owns.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub deployment: Deployment,
    pub canary_deployment: Option<Deployment>,
    pub backends: Service,
    pub canary_backends: Option<Service>,
    pub front: Service,
    pub proxy_deployment: Option<Deployment>,
    pub pdb: PodDisruptionBudget,
    pub proxy_pdb: Option<PodDisruptionBudget>,
    pub proxy_config: ConfigMap,
    pub service_account: Option<ServiceAccount>,
    pub role: Role,
    pub role_binding: RoleBinding,
}

fn typed<T: DeserializeOwned>(kind: &str, v: Value) -> Result<T, InvalidSpec> {
    serde_json::from_value(v).map_err(|e| InvalidSpec(format!("cannot build the {kind}: {e}")))
}

/// Names of the owned objects.
pub struct Names {
    pub app: String,
}

impl Names {
    pub fn canary(&self) -> String {
        format!("{}-canary", self.app)
    }
    pub fn backends(&self) -> String {
        format!("{}-backends", self.app)
    }
    pub fn canary_backends(&self) -> String {
        format!("{}-canary-backends", self.app)
    }
    pub fn proxy(&self) -> String {
        format!("{}-proxy", self.app)
    }
}

/// Computes every owned object, or why the spec cannot be reconciled.
pub fn desired(app: &LoadBalancedApp, settings: &Settings) -> Result<Desired, InvalidSpec> {
    let name = app.name_any();
    let ns = app.namespace().ok_or_else(|| InvalidSpec("the LoadBalancedApp has no namespace".into()))?;
    let owner = app
        .controller_owner_ref(&())
        .ok_or_else(|| InvalidSpec("the LoadBalancedApp has no uid yet (not stored by the API server)".into()))?;
    let n = Names { app: name.clone() };
    let spec = &app.spec;
    // Which template each track runs, and the canary's weight: the spec's,
    // or in a progressive rollout what the operator recorded in status.
    let plan = super::rollout::plan(spec, app.status.as_ref().and_then(|s| s.rollout.as_ref()));
    let config = proxy_config(spec, plan.canary.map(|(_, _, weight)| weight))?;
    let image = spec.proxy.image.clone().unwrap_or_else(|| settings.proxy_image.clone());
    let volumes = proxy_volumes(spec);
    let mounts: Vec<Value> = volumes.iter().map(|(_, m)| m.clone()).collect();
    let volumes: Vec<Value> = volumes.into_iter().map(|(v, _)| v).collect();
    let proxy_container = proxy_container(&name, &image, spec.proxy.resources.as_ref(), mounts)?;
    let meta = |obj_name: &str, component: &str| {
        json!({
            "name": obj_name,
            "namespace": ns,
            "labels": common_labels(&name, component),
            "ownerReferences": [owner_json(&owner)],
        })
    };
    let sidecar = spec.proxy.mode == ProxyMode::Sidecar;

    // In Sidecar mode the proxy reads the API with its pod's ServiceAccount.
    // Pods that name none (the namespace's `default`) get the app's own
    // `<app>-proxy` account instead, so that the proxy's read rights are not
    // granted to every pod of the namespace.
    let pod_sa = |template: &PodTemplateSpec| {
        template
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .filter(|sa| !sa.is_empty() && sa != "default")
    };
    let mut proxy_accounts: Vec<String> = Vec::new();
    if sidecar {
        for t in std::iter::once(plan.stable).chain(plan.canary.map(|(t, _, _)| t)) {
            let sa = pod_sa(t).unwrap_or_else(|| n.proxy());
            if !proxy_accounts.contains(&sa) {
                proxy_accounts.push(sa);
            }
        }
    } else {
        proxy_accounts.push(n.proxy());
    }
    let app_deployment = |dep_name: &str, track: &str, replicas: i32, template: &PodTemplateSpec| {
        let own_account = sidecar && pod_sa(template).is_none();
        let mut template = pod_template(template, &name, track, sidecar.then_some((&proxy_container, &volumes[..])))?;
        if own_account {
            template["spec"]["serviceAccountName"] = json!(n.proxy());
            // The app named no account, so it gets no token of the proxy's:
            // the proxy has its own (below), whatever the pod says.
            if template["spec"]["automountServiceAccountToken"].is_null() {
                template["spec"]["automountServiceAccountToken"] = json!(false);
            }
        }
        let mut d = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": meta(dep_name, "app"),
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {APP_LABEL: name, TRACK_LABEL: track}},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                "template": template,
            },
        });
        if spec.availability.spread_across_nodes {
            d["spec"]["template"]["spec"]["topologySpreadConstraints"] =
                spread(&[(APP_LABEL, &name), (TRACK_LABEL, track)]);
        }
        typed::<Deployment>("Deployment", d)
    };
    let deployment = app_deployment(&name, "stable", spec.replicas, plan.stable)?;
    let canary_deployment = match plan.canary {
        Some((template, replicas, _)) => Some(app_deployment(&n.canary(), "canary", replicas, template)?),
        None => None,
    };

    let app_port = serde_json::to_value(&spec.port).map_err(|e| InvalidSpec(e.to_string()))?;
    let backends_service = |svc_name: &str, track: &str| {
        typed::<Service>(
            "Service",
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": meta(svc_name, "backends"),
                "spec": {
                    // Headless: only its EndpointSlices matter, to the proxy.
                    "clusterIP": "None",
                    "selector": {APP_LABEL: name, TRACK_LABEL: track},
                    "ports": [{
                        "name": BACKEND_PORT_NAME, "port": port_number(&spec.port), "targetPort": app_port,
                        "protocol": "TCP", "appProtocol": app_protocol(spec),
                    }],
                    "publishNotReadyAddresses": false,
                },
            }),
        )
    };
    let backends = backends_service(&n.backends(), "stable")?;
    let canary_backends = match &spec.canary {
        Some(_) => Some(backends_service(&n.canary_backends(), "canary")?),
        None => None,
    };

    let proxy_selector =
        if sidecar { json!({APP_LABEL: name}) } else { json!({APP_LABEL: name, COMPONENT_LABEL: "proxy"}) };
    let mut front_meta = meta(&name, "front");
    if !spec.service.annotations.is_empty() {
        front_meta["annotations"] = json!(spec.service.annotations);
    }
    let front = typed::<Service>(
        "Service",
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": front_meta,
            "spec": {
                "type": format!("{:?}", spec.service.type_),
                "selector": proxy_selector,
                "ports": [{
                    "name": "traffic", "port": spec.service.port, "targetPort": PROXY_CONTAINER,
                    "protocol": "TCP", "appProtocol": app_protocol(spec),
                }],
            },
        }),
    )?;

    let proxy_replicas = spec.proxy.replicas.unwrap_or(2);
    let proxy_deployment = if sidecar {
        None
    } else {
        let labels = json!({APP_LABEL: name, COMPONENT_LABEL: "proxy"});
        Some(typed::<Deployment>(
            "Deployment",
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": meta(&n.proxy(), "proxy"),
                "spec": {
                    "replicas": proxy_replicas,
                    "selector": {"matchLabels": labels},
                    "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {
                            "serviceAccountName": n.proxy(),
                            "automountServiceAccountToken": false,
                            "volumes": volumes,
                            "securityContext": pod_security(),
                            "containers": [proxy_container],
                            "topologySpreadConstraints": spread(&[(APP_LABEL, &name), (COMPONENT_LABEL, "proxy")]),
                            "terminationGracePeriodSeconds": 30,
                        },
                    },
                },
            }),
        )?)
    };

    let min_available = spec.availability.min_available.unwrap_or((spec.replicas - 1).max(0));
    let pdb = typed::<PodDisruptionBudget>(
        "PodDisruptionBudget",
        json!({
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": meta(&name, "app"),
            "spec": {
                "minAvailable": min_available,
                "selector": {"matchLabels": {APP_LABEL: name, TRACK_LABEL: "stable"}},
                // An unready pod protects no availability: a drain may always evict it.
                "unhealthyPodEvictionPolicy": "AlwaysAllow",
            },
        }),
    )?;
    let proxy_pdb = if sidecar {
        None
    } else {
        Some(typed::<PodDisruptionBudget>(
            "PodDisruptionBudget",
            json!({
                "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                "metadata": meta(&n.proxy(), "proxy"),
                // One proxy at a time: a drain proceeds whatever the replica count, one replica included.
                "spec": {
                    "maxUnavailable": 1,
                    "selector": {"matchLabels": {APP_LABEL: name, COMPONENT_LABEL: "proxy"}},
                    "unhealthyPodEvictionPolicy": "AlwaysAllow",
                },
            }),
        )?)
    };

    let proxy_config = typed::<ConfigMap>(
        "ConfigMap",
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": meta(&n.proxy(), "proxy"),
            "data": {CONFIG_KEY: config.to_yaml()},
        }),
    )?;
    let service_account = if !proxy_accounts.contains(&n.proxy()) {
        None
    } else {
        Some(typed::<ServiceAccount>(
            "ServiceAccount",
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(&n.proxy(), "proxy"), "automountServiceAccountToken": true}),
        )?)
    };
    // Least privilege: watch the app's EndpointSlices and its own ConfigMap, in
    // this namespace only (the proxy lists and watches; it never gets).
    let role = typed::<Role>(
        "Role",
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": meta(&n.proxy(), "proxy"),
            "rules": [
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
                {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [n.proxy()], "verbs": ["list", "watch"]},
            ],
        }),
    )?;
    let subjects: Vec<Value> =
        proxy_accounts.iter().map(|sa| json!({"kind": "ServiceAccount", "name": sa, "namespace": ns})).collect();
    let role_binding = typed::<RoleBinding>(
        "RoleBinding",
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": meta(&n.proxy(), "proxy"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": n.proxy()},
            "subjects": subjects,
        }),
    )?;

    Ok(Desired {
        deployment,
        canary_deployment,
        backends,
        canary_backends,
        front,
        proxy_deployment,
        pdb,
        proxy_pdb,
        proxy_config,
        service_account,
        role,
        role_binding,
    })
}

/// The owner reference of every owned object. It does not block the owner's
/// deletion: with `blockOwnerDeletion`, clusters running the
/// OwnerReferencesPermissionEnforcement admission plugin would ask the
/// operator for `update` on `loadbalancedapps/finalizers`, a right it has no
/// other use for; background deletion collects the objects all the same.
fn owner_json(o: &OwnerReference) -> Value {
    json!({"apiVersion": o.api_version, "kind": o.kind, "name": o.name, "uid": o.uid, "controller": true})
}

/// The proxy's own API credentials, as the kubelet would mount them for the
/// pod: a bound ServiceAccount token, the cluster's CA and the namespace. The
/// proxy gets them even when the pod or its account turns automounting off,
/// and the app's containers get none of them.
/// The proxy's volumes and their mounts: its API credentials, and the
/// Secrets and ConfigMaps `spec.tls` and `spec.endpointTls` name, mounted
/// whole and read-only (never a `subPath`, which the kubelet does not update:
/// a renewed Secret reaches the files, and the proxy reloads them).
fn proxy_volumes(spec: &crate::api::LoadBalancedAppSpec) -> Vec<(Value, Value)> {
    let mount = |name: &str, path: &str| json!({"name": name, "mountPath": path, "readOnly": true});
    let secret = |volume: &str, secret: &str| json!({"name": volume, "secret": {"secretName": secret}});
    let mut out = vec![(proxy_token_volume(), mount(PROXY_TOKEN_VOLUME, TOKEN_MOUNT_PATH))];
    if let Some(tls) = &spec.tls {
        for (i, name) in std::iter::once(&tls.secret_name).chain(&tls.sni_secret_names).enumerate() {
            let volume = format!("fulcrum-tls-{i}");
            out.push((secret(&volume, name), mount(&volume, &format!("{TLS_DIR}/{i}"))));
        }
        if let Some(ca) = &tls.client_auth {
            out.push((
                secret("fulcrum-tls-client-ca", &ca.ca_secret_name),
                mount("fulcrum-tls-client-ca", &format!("{TLS_DIR}/client-ca")),
            ));
        }
    }
    if let Some(e) = &spec.endpoint_tls {
        let ca = match (&e.ca_config_map_name, &e.ca_secret_name) {
            (Some(cm), _) => Some(json!({"name": "fulcrum-endpoint-ca", "configMap": {"name": cm}})),
            (None, Some(s)) => Some(secret("fulcrum-endpoint-ca", s)),
            (None, None) => None,
        };
        if let Some(ca) = ca {
            out.push((ca, mount("fulcrum-endpoint-ca", &format!("{ENDPOINT_TLS_DIR}/ca"))));
        }
        if let Some(client) = &e.client_certificate_secret_name {
            out.push((
                secret("fulcrum-endpoint-client", client),
                mount("fulcrum-endpoint-client", &format!("{ENDPOINT_TLS_DIR}/client")),
            ));
        }
    }
    out
}

fn proxy_token_volume() -> Value {
    json!({
        "name": PROXY_TOKEN_VOLUME,
        "projected": {
            "defaultMode": 0o444,
            "sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
            ],
        },
    })
}

fn common_labels(app: &str, component: &str) -> Value {
    json!({
        "app.kubernetes.io/name": app,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "fulcrum",
        APP_LABEL: app,
    })
}

/// The Services' `appProtocol`: what the replicas speak, in the values
/// Istio, Envoy Gateway and Kubernetes itself recognise. The front Service
/// says the same: its clients speak the app's protocol to the proxy.
fn app_protocol(spec: &LoadBalancedAppSpec) -> &'static str {
    match (spec.protocol, spec.app_protocol) {
        (Protocol::Tcp, _) => "tcp",
        (Protocol::Http, AppProtocol::Http1) => "http",
        (Protocol::Http, AppProtocol::H2c) => "kubernetes.io/h2c",
        (Protocol::Http, AppProtocol::Grpc) => "grpc",
    }
}

/// A number for the backends Service port: the app port when numeric, else 8080 (only a label there).
fn port_number(p: &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString) -> i32 {
    match p {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => *n,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(_) => 8080,
    }
}

fn spread(labels: &[(&str, &str)]) -> Value {
    let match_labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    json!([{
        "maxSkew": 1,
        "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": match_labels},
    }])
}

fn pod_security() -> Value {
    json!({"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}})
}

/// The proxy container, non-root with a read-only root filesystem and no capabilities.
fn proxy_container(
    app: &str,
    image: &str,
    resources: Option<&k8s_openapi::api::core::v1::ResourceRequirements>,
    mounts: Vec<Value>,
) -> Result<Container, InvalidSpec> {
    let resources = match resources {
        Some(r) => serde_json::to_value(r).map_err(|e| InvalidSpec(e.to_string()))?,
        None => json!({"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}}),
    };
    // The listeners are spelled out, so that the container's arguments and its
    // declared ports visibly agree.
    let args = json!([
        "proxy",
        "--kubernetes",
        app,
        format!("--listen=0.0.0.0:{PROXY_PORT}"),
        format!("--admin=0.0.0.0:{ADMIN_PORT}"),
    ]);
    typed::<Container>(
        "proxy container",
        json!({
            "name": PROXY_CONTAINER,
            "image": image,
            "args": args,
            "env": [
                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                // Zone-aware balancing: a sidecar finds its own pod, and so
                // its zone, in the EndpointSlices; a dedicated proxy reads
                // the zone label Kubernetes (1.33+, PodTopologyLabelsAdmission)
                // copies from its node onto the pod (empty where it does not).
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "FULCRUM_ZONE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['topology.kubernetes.io/zone']"}}},
            ],
            "ports": [
                {"name": PROXY_CONTAINER, "containerPort": PROXY_PORT, "protocol": "TCP"},
                {"name": "fulcrum-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
            ],
            "readinessProbe": {"httpGet": {"path": "/readyz", "port": ADMIN_PORT}, "periodSeconds": 2, "failureThreshold": 2},
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": ADMIN_PORT}, "periodSeconds": 10, "failureThreshold": 3},
            "resources": resources,
            "volumeMounts": mounts,
            "securityContext": {
                "runAsNonRoot": true,
                "runAsUser": 65532,
                "runAsGroup": 65532,
                "readOnlyRootFilesystem": true,
                "allowPrivilegeEscalation": false,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            },
        }),
    )
}

/// The app's pod template with the operator's labels, and the proxy container in Sidecar mode.
fn pod_template(
    template: &PodTemplateSpec,
    app: &str,
    track: &str,
    sidecar: Option<(&Container, &[Value])>,
) -> Result<Value, InvalidSpec> {
    let mut t = serde_json::to_value(template).map_err(|e| InvalidSpec(e.to_string()))?;
    if !t["metadata"].is_object() {
        t["metadata"] = json!({});
    }
    if !t["metadata"]["labels"].is_object() {
        t["metadata"]["labels"] = json!({});
    }
    t["metadata"]["labels"][APP_LABEL] = json!(app);
    t["metadata"]["labels"][TRACK_LABEL] = json!(track);
    let containers = t["spec"]["containers"]
        .as_array_mut()
        .ok_or_else(|| InvalidSpec("spec.template.spec.containers: at least one container is required".into()))?;
    if containers.is_empty() {
        return Err(InvalidSpec("spec.template.spec.containers: at least one container is required".into()));
    }
    let Some((proxy, volumes)) = sidecar else { return Ok(t) };
    for list in ["containers", "initContainers"] {
        if t["spec"][list].as_array().is_some_and(|cs| cs.iter().any(|c| c["name"] == PROXY_CONTAINER)) {
            return Err(InvalidSpec(format!(
                "spec.template.spec.{list}: the name {PROXY_CONTAINER:?} is reserved for the proxy"
            )));
        }
    }
    for v in t["spec"]["volumes"].as_array().into_iter().flatten() {
        if let Some(name) = v["name"].as_str()
            && volumes.iter().any(|ours| ours["name"] == name)
        {
            return Err(InvalidSpec(format!(
                "spec.template.spec.volumes: the name {name:?} is reserved for the proxy \
                 (volumes named {PROXY_VOLUME_PREFIX}… are the proxy's)"
            )));
        }
    }
    // A native sidecar (an init container that keeps running): the kubelet
    // starts it after the app's own init containers and before the app, and
    // stops it only after the app's containers have exited, so requests the
    // app is still answering while it shuts down are not cut off. Its
    // readiness counts towards the pod's.
    let mut proxy = serde_json::to_value(proxy).map_err(|e| InvalidSpec(e.to_string()))?;
    proxy["restartPolicy"] = json!("Always");
    push_to(&mut t["spec"], "initContainers", proxy);
    for v in volumes {
        push_to(&mut t["spec"], "volumes", v.clone());
    }
    Ok(t)
}

/// Appends to the array `key` of `obj`, creating it when absent.
fn push_to(obj: &mut Value, key: &str, item: Value) {
    match obj[key].as_array_mut() {
        Some(list) => list.push(item),
        None => obj[key] = json!([item]),
    }
}

impl Desired {
    /// Every object as JSON, in apply order (RBAC and config before the pods that use them).
    pub fn objects(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut push = |v: Result<Value, serde_json::Error>| {
            if let Ok(v) = v {
                out.push(v);
            }
        };
        if let Some(sa) = &self.service_account {
            push(serde_json::to_value(sa));
        }
        push(serde_json::to_value(&self.role));
        push(serde_json::to_value(&self.role_binding));
        push(serde_json::to_value(&self.proxy_config));
        push(serde_json::to_value(&self.backends));
        if let Some(s) = &self.canary_backends {
            push(serde_json::to_value(s));
        }
        push(serde_json::to_value(&self.front));
        push(serde_json::to_value(&self.deployment));
        if let Some(d) = &self.canary_deployment {
            push(serde_json::to_value(d));
        }
        if let Some(d) = &self.proxy_deployment {
            push(serde_json::to_value(d));
        }
        push(serde_json::to_value(&self.pdb));
        if let Some(p) = &self.proxy_pdb {
            push(serde_json::to_value(p));
        }
        out
    }
}
