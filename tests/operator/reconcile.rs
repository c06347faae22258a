//! The real controller loop against the in-memory API server, with the test
//! playing kubelet (pods and their readiness) where a cluster would.

use std::sync::Arc;
use std::time::Duration;

use fulcrum::api::LoadBalancedApp;
use fulcrum::operator::controller::{Context, run};
use fulcrum::operator::desired::Settings;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::apiserver::ApiServer;

fn lba(name: &str, extra: Value) -> LoadBalancedApp {
    let mut spec = json!({
        "replicas": 2,
        "port": 8080,
        "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "web", "image": "web:1"}]}},
    });
    json_patch::merge(&mut spec, &extra);
    serde_json::from_value(json!({"apiVersion": "fulcrum.dev/v1alpha1", "kind": "LoadBalancedApp", "metadata": {"name": name}, "spec": spec})).unwrap()
}

struct Running {
    server: ApiServer,
    ctx: Arc<Context>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Running {
    /// Plays the ReplicaSet controller and the kubelet: stores `pod` (with
    /// its status) as a node would report it, owned by a ReplicaSet of its
    /// app's Deployment (created once that Deployment exists), as in a real
    /// cluster. Pods without a track stand for pods of other controllers.
    async fn kubelet_adds(&self, mut pod: Value) {
        let labels = pod["metadata"]["labels"].clone();
        let app = labels["fulcrum.dev/app"].as_str().unwrap_or_default().to_owned();
        let deployment = match labels["fulcrum.dev/track"].as_str() {
            Some("canary") => format!("{app}-canary"),
            Some(_) => app.clone(),
            None => format!("{app}-proxy"),
        };
        let store = self.server.store();
        let deployments = self.server.resource("apps", "deployments");
        let mut found = None;
        for _ in 0..1500 {
            if let Ok(d) = store.get(&deployments, "default", &deployment) {
                found = Some(d);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let d = found.unwrap_or_else(|| panic!("Deployment {deployment} never appeared"));
        let sets = self.server.resource("apps", "replicasets");
        let set_name = format!("{deployment}-5d8f7c");
        let set = match store.get(&sets, "default", &set_name) {
            Ok(s) => s,
            Err(_) => store
                .create(
                    &sets,
                    "default",
                    json!({
                        "apiVersion": "apps/v1", "kind": "ReplicaSet",
                        "metadata": {"name": set_name, "labels": labels, "ownerReferences": [
                            {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment, "uid": d["metadata"]["uid"], "controller": true}
                        ]},
                        "spec": {"selector": {"matchLabels": {"fulcrum.dev/app": app}}, "template": {}},
                    }),
                )
                .expect("store the ReplicaSet"),
        };
        pod["metadata"]["ownerReferences"] = json!([
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": set_name, "uid": set["metadata"]["uid"], "controller": true}
        ]);
        let res = self.server.resource("", "pods");
        store.create(&res, "default", pod).expect("store the pod");
    }
}

async fn start() -> Running {
    // The operator's log goes to the test's output, shown when a test fails.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::new("fulcrum=debug,kube_runtime=debug"))
        .try_init();
    let server = ApiServer::start().await;
    let ctx = Arc::new(Context::new(server.client(), Settings { proxy_image: "fulcrum:test".into() }));
    let task = tokio::spawn(run(ctx.clone()));
    Running { server, ctx, task }
}

/// Polls `f` every 20 ms for up to 30 s (a bound for a loaded machine; it
/// returns as soon as `f` holds).
pub(crate) async fn until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..1500 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Plays kubelet: a pod of the app's Deployment, ready or not since `unready_for` seconds.
fn pod(app: &str, name: &str, ready: bool, unready_for: u64) -> Value {
    let since = k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(unready_for as i64);
    json!({
        "metadata": {"name": name, "labels": {"fulcrum.dev/app": app, "fulcrum.dev/track": "stable"}},
        "spec": {"containers": [{"name": "web", "image": "web:1"}]},
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }, "lastTransitionTime": since.to_string()}],
            "initContainerStatuses": [
                {"name": "fulcrum-proxy", "ready": true, "restartCount": 0, "image": "fulcrum:test", "imageID": "", "started": true, "state": {"running": {}}},
            ],
            "containerStatuses": [
                {"name": "web", "ready": ready, "restartCount": 0, "image": "web:1", "imageID": "", "state": {"running": {}}},
            ],
        },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applying_an_app_creates_every_owned_object_and_the_status_converges_then_rests() {
    let r = start().await;
    let client = r.server.client();
    let apps: Api<LoadBalancedApp> = Api::default_namespaced(client.clone());
    let created = apps.create(&PostParams::default(), &lba("web", json!({}))).await.unwrap();
    let uid = created.metadata.uid.clone().unwrap();
    let deployments: Api<Deployment> = Api::default_namespaced(client.clone());
    let services: Api<Service> = Api::default_namespaced(client.clone());
    let configmaps: Api<ConfigMap> = Api::default_namespaced(client.clone());
    until("the owned objects", || async {
        deployments.get_opt("web").await.unwrap().is_some()
            && services.get_opt("web-backends").await.unwrap().is_some()
            && services.get_opt("web").await.unwrap().is_some()
            && configmaps.get_opt("web-proxy").await.unwrap().is_some()
    })
    .await;
    let d = deployments.get("web").await.unwrap();
    assert_eq!(d.metadata.owner_references.unwrap()[0].uid, uid);
    assert_eq!(d.metadata.managed_fields.unwrap()[0].manager.as_deref(), Some("fulcrum-operator"));
    // Kubelet: two ready pods.
    for n in ["web-1", "web-2"] {
        r.kubelet_adds(pod("web", n, true, 0)).await;
    }
    until("Available", || async {
        let s = apps.get("web").await.unwrap().status.unwrap_or_default();
        s.ready_replicas == 2
            && s.conditions.iter().any(|c| c.type_ == "Available" && c.status == "True")
            && s.observed_generation == Some(1)
    })
    .await;
    // Converged (every count at its final value, not only the ones
    // `Available` needs): the status is not written again.
    until("every count converged", || async {
        let s = apps.get("web").await.unwrap().status.unwrap_or_default();
        (s.replicas, s.endpoints.ready, s.endpoints.total, s.proxy.ready, s.proxy.total) == (2, 2, 2, 2, 2)
    })
    .await;
    let before = apps.get("web").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = apps.get("web").await.unwrap();
    assert_eq!(
        after.metadata.resource_version, before.metadata.resource_version,
        "no status write without a change: {:?} was written over {:?}",
        after.status, before.status
    );
    // A spec change reaches the owned objects.
    apps.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 3, "loadBalancing": {"algorithm": "PeakEwma"}}})),
    )
    .await
    .unwrap();
    until("the new spec applied", || async {
        let d = deployments.get("web").await.unwrap();
        let cm = configmaps.get("web-proxy").await.unwrap();
        d.spec.unwrap().replicas == Some(3) && cm.data.unwrap()["proxy.yaml"].contains("PeakEwma")
    })
    .await;
    // Deleting the app deletes what it owns.
    apps.delete("web", &DeleteParams::default()).await.unwrap();
    until("the owned objects gone", || async {
        deployments.get_opt("web").await.unwrap().is_none() && configmaps.get_opt("web-proxy").await.unwrap().is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admitted_but_unworkable_spec_is_degraded_and_nothing_is_deleted() {
    let r = start().await;
    let client = r.server.client();
    let apps: Api<LoadBalancedApp> = Api::default_namespaced(client.clone());
    apps.create(&PostParams::default(), &lba("web", json!({}))).await.unwrap();
    let deployments: Api<Deployment> = Api::default_namespaced(client.clone());
    until("the Deployment", || async { deployments.get_opt("web").await.unwrap().is_some() }).await;
    // The schema cannot tell an address range from any string; the proxy's rules can.
    let patch = json!({"spec": {"forwarding": {"trustedProxies": ["10.0.0.0/99"]}}});
    apps.patch("web", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    until("Degraded", || async {
        let s = apps.get("web").await.unwrap().status.unwrap_or_default();
        s.conditions.iter().any(|c| {
            c.type_ == "Degraded"
                && c.status == "True"
                && c.reason == "InvalidSpec"
                && c.message.contains("forwarding.trustedProxies[0]")
        })
    })
    .await;
    assert!(deployments.get_opt("web").await.unwrap().is_some(), "the running app is kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_unready_past_the_timeout_is_deleted_once_and_counted() {
    let r = start().await;
    let client = r.server.client();
    let apps: Api<LoadBalancedApp> = Api::default_namespaced(client.clone());
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    apps.create(&PostParams::default(), &lba("web", json!({"replicas": 3, "healing": {"unreadyTimeout": "1m"}})))
        .await
        .unwrap();
    r.kubelet_adds(pod("web", "web-1", true, 0)).await;
    r.kubelet_adds(pod("web", "web-2", true, 0)).await;
    r.kubelet_adds(pod("web", "web-3", false, 600)).await;
    until("the stuck pod deleted", || async { pods.get_opt("web-3").await.unwrap().is_none() }).await;
    until("the healing recorded", || async {
        let s = apps.get("web").await.unwrap().status.unwrap_or_default();
        s.healed_total == 1 && s.last_healing.as_ref().is_some_and(|h| h.pod == "web-3" && h.reason == "UnreadyTooLong")
    })
    .await;
    assert!(pods.get_opt("web-1").await.unwrap().is_some() && pods.get_opt("web-2").await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(apps.get("web").await.unwrap().status.unwrap().healed_total, 1, "deleted once");
    let m = r.ctx.metrics.encode();
    assert!(
        m.contains("fulcrum_operator_healed_pods_total{namespace=\"default\",app=\"web\",reason=\"UnreadyTooLong\"} 1"),
        "{m}"
    );
    assert!(m.contains("fulcrum_operator_app_available{namespace=\"default\",app=\"web\"}"), "{m}");
    assert!(m.contains("fulcrum_operator_reconciles_total{result=\"ok\"}"), "{m}");
    // The app deleted: its series go (an alert on them would fire forever).
    apps.delete("web", &Default::default()).await.unwrap();
    until("the deleted app's series removed", || async { !r.ctx.metrics.encode().contains("app=\"web\"") }).await;
    assert!(r.ctx.metrics.encode().contains("fulcrum_operator_reconciles_total{result=\"ok\"}"));
}

/// Plays kubelet and scheduler: a pod created `age` seconds ago that has not
/// started, waiting for `reason` (a container's waiting reason, or the
/// scheduler's `Unschedulable`).
fn pending_pod(app: &str, name: &str, age: u64, reason: &str) -> Value {
    let created = k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(age as i64);
    let mut conditions = vec![
        json!({"type": "Ready", "status": "False", "reason": "ContainersNotReady", "lastTransitionTime": created.to_string()}),
    ];
    let mut statuses = vec![];
    if reason == "Unschedulable" {
        conditions.push(json!({"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes are available: 3 Insufficient cpu.", "lastTransitionTime": created.to_string()}));
    } else {
        statuses.push(json!({"name": "web", "ready": false, "restartCount": 0, "image": "web:1", "imageID": "", "state": {"waiting": {"reason": reason}}}));
    }
    json!({
        "metadata": {"name": name, "labels": {"fulcrum.dev/app": app, "fulcrum.dev/track": "stable"}, "creationTimestamp": created.to_string()},
        "spec": {"containers": [{"name": "web", "image": "web:1"}]},
        "status": {"phase": "Pending", "conditions": conditions, "containerStatuses": statuses},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_that_never_started_are_reported_by_reason_and_never_deleted() {
    let r = start().await;
    let client = r.server.client();
    let apps: Api<LoadBalancedApp> = Api::default_namespaced(client.clone());
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    apps.create(
        &PostParams::default(),
        &lba("web", json!({"replicas": 6, "healing": {"unreadyTimeout": "1m", "maxConcurrent": 5}})),
    )
    .await
    .unwrap();
    r.kubelet_adds(pod("web", "web-1", true, 0)).await;
    r.kubelet_adds(pending_pod("web", "web-2", 600, "ImagePullBackOff")).await;
    r.kubelet_adds(pending_pod("web", "web-3", 600, "ImagePullBackOff")).await;
    r.kubelet_adds(pending_pod("web", "web-4", 600, "Unschedulable")).await;
    r.kubelet_adds(pending_pod("web", "web-5", 600, "CreateContainerConfigError")).await;
    r.kubelet_adds(pending_pod("web", "web-6", 1, "ContainerCreating")).await;
    until("the pods that never started reported", || async {
        let s = apps.get("web").await.unwrap().status.unwrap_or_default();
        s.not_started.len() == 3
    })
    .await;
    let s = apps.get("web").await.unwrap().status.unwrap();
    let by_reason: Vec<(&str, i32, Vec<&str>)> = s
        .not_started
        .iter()
        .map(|w| (w.reason.as_str(), w.count, w.pods.iter().map(String::as_str).collect()))
        .collect();
    assert_eq!(
        by_reason,
        [
            ("CreateContainerConfigError", 1, vec!["web-5"]),
            ("ImagePullBackOff", 2, vec!["web-2", "web-3"]),
            ("Unschedulable", 1, vec!["web-4"]),
        ]
    );
    let degraded = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "PodsNotStarted"));
    assert!(
        degraded.message.contains("ImagePullBackOff") && degraded.message.contains("web-4"),
        "{}",
        degraded.message
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    for p in ["web-2", "web-3", "web-4", "web-5", "web-6"] {
        assert!(pods.get_opt(p).await.unwrap().is_some(), "{p} was deleted");
    }
    assert_eq!(apps.get("web").await.unwrap().status.unwrap().healed_total, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedicated_proxy_pods_are_neither_counted_nor_healed_as_app_pods() {
    let r = start().await;
    let client = r.server.client();
    let apps: Api<LoadBalancedApp> = Api::default_namespaced(client.clone());
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    apps.create(
        &PostParams::default(),
        &lba("web", json!({"proxy": {"mode": "Dedicated"}, "healing": {"unreadyTimeout": "1m"}})),
    )
    .await
    .unwrap();
    r.kubelet_adds(pod("web", "web-1", true, 0)).await;
    r.kubelet_adds(pod("web", "web-2", true, 0)).await;
    // Two dedicated proxy pods, unready for long (no app pod was ready when they started, say).
    for n in ["web-proxy-1", "web-proxy-2"] {
        let mut p = pod("web", n, false, 600);
        p["metadata"]["labels"] = json!({"fulcrum.dev/app": "web", "fulcrum.dev/component": "proxy"});
        r.kubelet_adds(p).await;
    }
    until("the status", || async {
        let s = apps.get("web").await.unwrap().status.unwrap_or_default();
        s.ready_replicas == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = apps.get("web").await.unwrap().status.unwrap();
    assert_eq!((s.endpoints.ready, s.endpoints.total), (2, 2), "the app's pods only");
    assert_eq!(s.healed_total, 0);
    for p in ["web-proxy-1", "web-proxy-2"] {
        assert!(pods.get_opt(p).await.unwrap().is_some(), "{p} was healed as an app pod");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_errors_are_retried_until_the_app_is_reconciled() {
    let r = start().await;
    let client = r.server.client();
    // Roles are written only by reconciles (nothing watches them): the first reconcile fails.
    r.server.fail_next("roles", 1, 500);
    let apps: Api<LoadBalancedApp> = Api::default_namespaced(client.clone());
    apps.create(&PostParams::default(), &lba("web", json!({}))).await.unwrap();
    let deployments: Api<Deployment> = Api::default_namespaced(client.clone());
    // Retried after the error policy's 5 s.
    for _ in 0..1000 {
        if deployments.get_opt("web").await.ok().flatten().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(deployments.get_opt("web").await.unwrap().is_some(), "reconciled after the failures");
    let m = r.ctx.metrics.encode();
    assert!(m.contains("fulcrum_operator_reconcile_errors_total{kind=\"kube\"} 1"), "the failure was counted: {m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_the_spec_stops_asking_for_are_deleted_and_only_those_the_app_controls() {
    let r = start().await;
    let client = r.server.client();
    let apps: Api<LoadBalancedApp> = Api::default_namespaced(client.clone());
    let canary = json!({"replicas": 1, "weight": 10, "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web", "image": "web:2"}]}}});
    apps.create(&PostParams::default(), &lba("web", json!({"canary": canary, "proxy": {"mode": "Dedicated"}})))
        .await
        .unwrap();
    let deployments: Api<Deployment> = Api::default_namespaced(client.clone());
    let services: Api<Service> = Api::default_namespaced(client.clone());
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::default_namespaced(client.clone());
    until("the canary and the dedicated proxy", || async {
        deployments.get_opt("web-canary").await.unwrap().is_some()
            && deployments.get_opt("web-proxy").await.unwrap().is_some()
            && services.get_opt("web-canary-backends").await.unwrap().is_some()
            && accounts.get_opt("web-proxy").await.unwrap().is_some()
    })
    .await;
    apps.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"canary": null, "proxy": {"mode": "Sidecar"}}})),
    )
    .await
    .unwrap();
    let pdbs: Api<k8s_openapi::api::policy::v1::PodDisruptionBudget> = Api::default_namespaced(client.clone());
    until("the canary and the dedicated proxy gone", || async {
        deployments.get_opt("web-canary").await.unwrap().is_none()
            && deployments.get_opt("web-proxy").await.unwrap().is_none()
            && services.get_opt("web-canary-backends").await.unwrap().is_none()
            && pdbs.get_opt("web-proxy").await.unwrap().is_none()
    })
    .await;
    // The app's account stays: its sidecars now use it.
    assert!(accounts.get_opt("web-proxy").await.unwrap().is_some());
    assert!(deployments.get_opt("web").await.unwrap().is_some());
    assert!(services.get_opt("web-backends").await.unwrap().is_some());
    // An object of one of those names that the app does not control stays.
    let mine: k8s_openapi::api::policy::v1::PodDisruptionBudget =
        serde_json::from_value(json!({"metadata": {"name": "web-proxy"}, "spec": {"maxUnavailable": 1}})).unwrap();
    pdbs.create(&PostParams::default(), &mine).await.unwrap();
    apps.patch("web", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 3}}))).await.unwrap();
    until("the next spec applied", || async {
        deployments.get("web").await.unwrap().spec.unwrap().replicas == Some(3)
            && apps.get("web").await.unwrap().status.unwrap_or_default().observed_generation == Some(3)
    })
    .await;
    assert!(pdbs.get_opt("web-proxy").await.unwrap().is_some(), "an object the app does not control was deleted");
    assert!(pdbs.get_opt("web").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_the_app_did_not_create_is_never_taken_over() {
    let r = start().await;
    let client = r.server.client();
    // Someone's Service named like the app's front Service.
    let services: Api<Service> = Api::default_namespaced(client.clone());
    let theirs: Service = serde_json::from_value(json!({
        "metadata": {"name": "web", "labels": {"team": "payments"}},
        "spec": {"selector": {"app": "payments"}, "ports": [{"port": 443, "targetPort": 8443}]},
    }))
    .unwrap();
    services.create(&PostParams::default(), &theirs).await.unwrap();
    let apps: Api<LoadBalancedApp> = Api::default_namespaced(client.clone());
    apps.create(&PostParams::default(), &lba("web", json!({}))).await.unwrap();
    until("Degraded with OwnershipConflict", || async {
        let s = apps.get("web").await.unwrap().status.unwrap_or_default();
        s.conditions.iter().any(|c| {
            c.type_ == "Degraded"
                && c.status == "True"
                && c.reason == "OwnershipConflict"
                && c.message.contains("Service web ")
        })
    })
    .await;
    // Nothing of theirs changed, and nothing of the app was created.
    let after = services.get("web").await.unwrap();
    assert!(after.metadata.owner_references.unwrap_or_default().is_empty());
    assert_eq!(after.metadata.labels.unwrap_or_default().get("team").map(String::as_str), Some("payments"));
    assert_eq!(after.spec.unwrap().ports.unwrap()[0].port, 443);
    let deployments: Api<Deployment> = Api::default_namespaced(client.clone());
    assert!(deployments.get_opt("web").await.unwrap().is_none());
    // Once their Service is gone, the app is created on its next change.
    services.delete("web", &Default::default()).await.unwrap();
    apps.patch("web", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 3}}))).await.unwrap();
    until("the app's objects", || async {
        deployments.get_opt("web").await.unwrap().is_some()
            && services
                .get_opt("web")
                .await
                .unwrap()
                .is_some_and(|s| !s.metadata.owner_references.unwrap_or_default().is_empty())
    })
    .await;
}

#[test]
fn failed_reconciles_back_off_exponentially_with_jitter_and_a_cap() {
    use fulcrum::operator::controller::backoff;
    assert_eq!(backoff(1, 0.5), Duration::from_secs(1));
    assert_eq!(backoff(2, 0.5), Duration::from_secs(2));
    assert_eq!(backoff(5, 0.5), Duration::from_secs(16));
    assert_eq!(backoff(30, 0.5), Duration::from_secs(300));
    assert_eq!(backoff(u32::MAX, 0.5), Duration::from_secs(300));
    assert_eq!(backoff(3, 0.0), Duration::from_secs(4).mul_f64(0.8));
    assert_eq!(backoff(3, 1.0), Duration::from_secs(4).mul_f64(1.2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_only_carries_the_apps_labels_is_neither_counted_nor_healed() {
    let r = start().await;
    let client = r.server.client();
    let apps: Api<LoadBalancedApp> = Api::default_namespaced(client.clone());
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    apps.create(&PostParams::default(), &lba("web", json!({"replicas": 2, "healing": {"unreadyTimeout": "1m"}})))
        .await
        .unwrap();
    r.kubelet_adds(pod("web", "web-1", true, 0)).await;
    r.kubelet_adds(pod("web", "web-2", true, 0)).await;
    // Someone else's pod, labelled like the app's and unready for long: not the app's to delete.
    let stranger = pod("web", "not-yours", false, 600);
    r.server.store().create(&r.server.resource("", "pods"), "default", stranger).expect("store the pod");
    until("the status", || async {
        let s = apps.get("web").await.unwrap().status.unwrap_or_default();
        s.ready_replicas == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = apps.get("web").await.unwrap().status.unwrap();
    assert_eq!((s.replicas, s.healed_total), (2, 0), "only the app's pods are counted");
    assert!(pods.get_opt("not-yours").await.unwrap().is_some(), "a stranger's pod was deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_autoscalers_update_of_the_apps_scale_reaches_the_deployment_and_the_status() {
    let r = start().await;
    let client = r.server.client();
    let apps: Api<LoadBalancedApp> = Api::default_namespaced(client.clone());
    let canary = json!({"replicasPercent": 50, "weight": 10, "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web", "image": "web:2"}]}}});
    apps.create(&PostParams::default(), &lba("web", json!({"canary": canary}))).await.unwrap();
    let deployments: Api<Deployment> = Api::default_namespaced(client.clone());
    for n in ["web-1", "web-2"] {
        r.kubelet_adds(pod("web", n, true, 0)).await;
    }
    // The selector an autoscaler measures names the stable pods only.
    until("the Scale's selector and replicas", || async {
        let s = apps.get_scale("web").await.unwrap().status.unwrap_or_default();
        s.replicas == 2 && s.selector.as_deref() == Some("fulcrum.dev/app=web,fulcrum.dev/track=stable")
    })
    .await;
    // An autoscaler's way: read the Scale, write it back with a new count.
    let mut scale = apps.get_scale("web").await.unwrap();
    scale.spec = Some(k8s_openapi::api::autoscaling::v1::ScaleSpec { replicas: Some(4) });
    apps.replace_scale("web", &PostParams::default(), &scale).await.unwrap();
    until("the stable Deployment scaled, the canary at half of it", || async {
        let stable = deployments.get("web").await.unwrap().spec.unwrap().replicas;
        let canary = deployments.get("web-canary").await.unwrap().spec.unwrap().replicas;
        (stable, canary) == (Some(4), Some(2))
    })
    .await;
    for n in ["web-3", "web-4"] {
        r.kubelet_adds(pod("web", n, true, 0)).await;
    }
    until("status.replicas follows", || async {
        let s = apps.get("web").await.unwrap().status.unwrap_or_default();
        s.replicas == 4 && s.ready_replicas == 4
    })
    .await;
    assert_eq!(apps.get_scale("web").await.unwrap().status.unwrap().replicas, 4);
    // The operator's next reconciles keep the count: it is the spec's.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(deployments.get("web").await.unwrap().spec.unwrap().replicas, Some(4));
}
