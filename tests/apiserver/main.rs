//! The in-memory API server, tested the way operator code uses it: through
//! `kube::Api`, kube-runtime's watcher and a Controller.

mod admission;
#[path = "../support/apiserver/mod.rs"]
mod apiserver;
mod rbac;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use apiserver::ApiServer;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::json;

fn cm(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()},
        "data": {"k": "v"},
    }))
    .unwrap()
}

fn api_code(e: kube::Error) -> (u16, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn create_get_replace_delete_with_server_set_metadata() {
    let server = ApiServer::start().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client());
    let created = api.create(&PostParams::default(), &cm("a", &[])).await.unwrap();
    let m = &created.metadata;
    assert_eq!(m.namespace.as_deref(), Some("default"));
    assert!(m.uid.is_some() && m.creation_timestamp.is_some() && m.resource_version.is_some());
    assert_eq!(m.generation, Some(1));
    let mut got = api.get("a").await.unwrap();
    assert_eq!(got.metadata.uid, m.uid);
    got.data = Some([("k".to_string(), "w".to_string())].into());
    let replaced = api.replace("a", &PostParams::default(), &got).await.unwrap();
    assert_ne!(replaced.metadata.resource_version, m.resource_version);
    assert_eq!(replaced.data.unwrap()["k"], "w");
    api.delete("a", &DeleteParams::default()).await.unwrap();
    assert_eq!(api_code(api.get("a").await.unwrap_err()), (404, "NotFound".into()));
}

#[tokio::test]
async fn a_second_create_is_409_already_exists_and_generate_name_makes_names() {
    let server = ApiServer::start().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client());
    api.create(&PostParams::default(), &cm("a", &[])).await.unwrap();
    assert_eq!(
        api_code(api.create(&PostParams::default(), &cm("a", &[])).await.unwrap_err()),
        (409, "AlreadyExists".into())
    );
    let mut g = cm("", &[]);
    g.metadata.name = None;
    g.metadata.generate_name = Some("gen-".into());
    let one = api.create(&PostParams::default(), &g).await.unwrap();
    let two = api.create(&PostParams::default(), &g).await.unwrap();
    assert!(one.metadata.name.as_deref().unwrap().starts_with("gen-"));
    assert_ne!(one.metadata.name, two.metadata.name);
}

#[tokio::test]
async fn a_replace_from_a_stale_version_is_409_conflict() {
    let server = ApiServer::start().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client());
    let first = api.create(&PostParams::default(), &cm("a", &[])).await.unwrap();
    let mut newer = first.clone();
    newer.data = Some([("k".to_string(), "2".to_string())].into());
    api.replace("a", &PostParams::default(), &newer).await.unwrap();
    let mut stale = first;
    stale.data = Some([("k".to_string(), "3".to_string())].into());
    assert_eq!(api_code(api.replace("a", &PostParams::default(), &stale).await.unwrap_err()), (409, "Conflict".into()));
}

#[tokio::test]
async fn lists_filter_by_label_and_field_selectors_and_namespaces() {
    let server = ApiServer::start().await;
    let client = server.client();
    let default: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let other: Api<ConfigMap> = Api::namespaced(client.clone(), "other");
    default.create(&PostParams::default(), &cm("web", &[("app", "shop"), ("tier", "web")])).await.unwrap();
    default.create(&PostParams::default(), &cm("db", &[("app", "shop"), ("tier", "db")])).await.unwrap();
    other.create(&PostParams::default(), &cm("web", &[("app", "blog")])).await.unwrap();
    let names = |l: kube::core::ObjectList<ConfigMap>| {
        l.items.into_iter().map(|c| c.metadata.name.unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(names(default.list(&ListParams::default().labels("app=shop,tier!=db")).await.unwrap()), ["web"]);
    assert_eq!(names(default.list(&ListParams::default().labels("tier in (web, db)")).await.unwrap()), ["db", "web"]);
    assert_eq!(names(default.list(&ListParams::default().fields("metadata.name=db")).await.unwrap()), ["db"]);
    let all: Api<ConfigMap> = Api::all(client);
    let everywhere = all.list(&ListParams::default().labels("app")).await.unwrap();
    assert_eq!(everywhere.items.len(), 3);
    assert!(everywhere.metadata.resource_version.is_some());
    let bad = default.list(&ListParams::default().fields("spec.nodeName=x")).await.unwrap_err();
    assert_eq!(api_code(bad).0, 400);
}

fn deployment(name: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "app", "image": "app:1"}]}},
        },
    }))
    .unwrap()
}

#[tokio::test]
async fn spec_writes_bump_the_generation_and_status_writes_touch_only_status() {
    let server = ApiServer::start().await;
    let api: Api<Deployment> = Api::default_namespaced(server.client());
    api.create(&PostParams::default(), &deployment("web", 2)).await.unwrap();
    let patched =
        api.patch("web", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 3}}))).await.unwrap();
    assert_eq!(patched.metadata.generation, Some(2));
    // A status write: generation stays, spec cannot change through it.
    let status = json!({"spec": {"replicas": 9}, "status": {"readyReplicas": 3, "observedGeneration": 2}});
    let s = api.patch_status("web", &PatchParams::default(), &Patch::Merge(status)).await.unwrap();
    assert_eq!(s.metadata.generation, Some(2));
    assert_eq!(s.spec.unwrap().replicas, Some(3));
    assert_eq!(s.status.unwrap().ready_replicas, Some(3));
    // A spec write cannot change status.
    let p = api
        .patch("web", &PatchParams::default(), &Patch::Merge(json!({"status": {"readyReplicas": 0}})))
        .await
        .unwrap();
    assert_eq!(p.status.unwrap().ready_replicas, Some(3));
    assert_eq!(p.metadata.generation, Some(2), "no spec change, no new generation");
}

#[tokio::test]
async fn server_side_apply_creates_is_idempotent_records_managers_and_resolves_conflicts_with_force() {
    let server = ApiServer::start().await;
    let api: Api<Deployment> = Api::default_namespaced(server.client());
    let pp = PatchParams::apply("fulcrum-operator");
    let first = api.patch("web", &pp, &Patch::Apply(deployment("web", 2))).await.unwrap();
    let again = api.patch("web", &pp, &Patch::Apply(deployment("web", 2))).await.unwrap();
    assert_eq!(first.metadata.resource_version, again.metadata.resource_version, "a no-op apply changes nothing");
    let managers: Vec<_> = again
        .metadata
        .managed_fields
        .unwrap()
        .into_iter()
        .map(|m| (m.manager.unwrap(), m.operation.unwrap()))
        .collect();
    assert_eq!(managers, [("fulcrum-operator".to_string(), "Apply".to_string())]);
    // Another manager changing an owned field conflicts, unless forced.
    let hpa = PatchParams::apply("autoscaler");
    let scale =
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {"replicas": 5}});
    let err = api.patch("web", &hpa, &Patch::Apply(scale.clone())).await.unwrap_err();
    assert_eq!(api_code(err), (409, "Conflict".into()));
    let forced = api.patch("web", &hpa.force(), &Patch::Apply(scale)).await.unwrap();
    assert_eq!(forced.spec.unwrap().replicas, Some(5));
    // Apply without a field manager is refused, as by the real server.
    let client = server.client();
    let req = http::Request::patch("/apis/apps/v1/namespaces/default/deployments/web")
        .header("content-type", "application/apply-patch+yaml")
        .body(serde_json::to_vec(&deployment("web", 1)).unwrap())
        .unwrap();
    let err = client.request::<Deployment>(req).await.unwrap_err();
    assert_eq!(api_code(err).0, 422);
}

#[tokio::test]
async fn json_patch_and_merge_patch_apply_and_strategic_list_merges_are_refused() {
    let server = ApiServer::start().await;
    let api: Api<Deployment> = Api::default_namespaced(server.client());
    api.create(&PostParams::default(), &deployment("web", 1)).await.unwrap();
    let ops: json_patch::Patch =
        serde_json::from_value(json!([{"op": "replace", "path": "/spec/replicas", "value": 4}])).unwrap();
    let d = api.patch("web", &PatchParams::default(), &Patch::<()>::Json(ops)).await.unwrap();
    assert_eq!(d.spec.unwrap().replicas, Some(4));
    let smp = json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "app:2"}]}}}});
    let err = api.patch("web", &PatchParams::default(), &Patch::Strategic(smp)).await.unwrap_err();
    assert_eq!(api_code(err).0, 422);
    let ok = api
        .patch("web", &PatchParams::default(), &Patch::Strategic(json!({"metadata": {"labels": {"a": "b"}}})))
        .await
        .unwrap();
    assert_eq!(ok.metadata.labels.unwrap()["a"], "b");
}

fn owned_by(name: &str, owner: &ConfigMap) -> ConfigMap {
    let mut c = cm(name, &[]);
    c.metadata.owner_references = Some(vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: owner.metadata.name.clone().unwrap(),
        uid: owner.metadata.uid.clone().unwrap(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }]);
    c
}

#[tokio::test]
async fn deletes_cascade_to_dependents_background_foreground_and_orphan() {
    let server = ApiServer::start().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client());
    let exists = |name: &'static str| {
        let api = api.clone();
        async move { api.get_opt(name).await.unwrap().is_some() }
    };
    for (policy, dp) in [
        ("background", DeleteParams::background()),
        ("foreground", DeleteParams::foreground()),
        ("orphan", DeleteParams::orphan()),
    ] {
        let owner = api.create(&PostParams::default(), &cm("owner", &[])).await.unwrap();
        let child = api.create(&PostParams::default(), &owned_by("child", &owner)).await.unwrap();
        api.create(&PostParams::default(), &owned_by("grandchild", &child)).await.unwrap();
        api.delete("owner", &dp).await.unwrap();
        assert!(!exists("owner").await, "{policy}");
        let kept = policy == "orphan";
        assert_eq!(exists("child").await, kept, "{policy}");
        assert_eq!(exists("grandchild").await, kept, "{policy}");
        if kept {
            let c = api.get("child").await.unwrap();
            assert!(c.metadata.owner_references.unwrap_or_default().is_empty(), "orphaned children lose the reference");
            api.delete("child", &DeleteParams::default()).await.unwrap();
            assert!(!exists("grandchild").await);
        }
    }
}

#[tokio::test]
async fn a_finalizer_keeps_a_deleted_object_until_it_is_removed() {
    let server = ApiServer::start().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client());
    let mut c = cm("f", &[]);
    c.metadata.finalizers = Some(vec!["fulcrum.dev/cleanup".into()]);
    api.create(&PostParams::default(), &c).await.unwrap();
    api.delete("f", &DeleteParams::default()).await.unwrap();
    let marked = api.get("f").await.unwrap();
    assert!(marked.metadata.deletion_timestamp.is_some());
    api.patch("f", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}}))).await.unwrap();
    assert!(api.get_opt("f").await.unwrap().is_none());
}

#[tokio::test]
async fn a_watch_resumes_after_a_disconnect_without_losing_or_repeating_events() {
    let server = ApiServer::start().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client());
    let start = api.list(&ListParams::default()).await.unwrap().metadata.resource_version.unwrap();
    let mut stream = api.watch(&WatchParams::default(), &start).await.unwrap().boxed();
    api.create(&PostParams::default(), &cm("one", &[])).await.unwrap();
    let Some(WatchEvent::Added(o)) =
        tokio::time::timeout(Duration::from_secs(5), stream.try_next()).await.unwrap().unwrap()
    else {
        panic!("expected ADDED")
    };
    let last = o.metadata.resource_version.clone().unwrap();
    server.close_watches();
    // The stream ends (bookmarks aside).
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.try_next()).await.unwrap().unwrap() {
            None => break,
            Some(WatchEvent::Bookmark(_)) => {}
            Some(other) => panic!("unexpected {other:?}"),
        }
    }
    // Changes while disconnected are delivered on resume, once each.
    api.create(&PostParams::default(), &cm("two", &[])).await.unwrap();
    api.delete("one", &DeleteParams::default()).await.unwrap();
    let mut resumed = api.watch(&WatchParams::default(), &last).await.unwrap().boxed();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(5), resumed.try_next()).await.unwrap().unwrap() {
            Some(WatchEvent::Added(o)) => seen.push(format!("added {}", o.metadata.name.unwrap())),
            Some(WatchEvent::Deleted(o)) => seen.push(format!("deleted {}", o.metadata.name.unwrap())),
            Some(WatchEvent::Bookmark(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, ["added two", "deleted one"]);
}

#[tokio::test]
async fn the_runtime_watcher_relists_after_410_gone_and_stays_consistent() {
    let server = ApiServer::start().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client());
    api.create(&PostParams::default(), &cm("before", &[])).await.unwrap();
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api.clone(), watcher::Config::default())).applied_objects();
    let task = tokio::spawn(async move {
        let mut s = stream.boxed();
        while s.next().await.is_some() {}
    });
    let wait_for = |n: usize| {
        let reader = reader.clone();
        async move {
            for _ in 0..250 {
                if reader.state().len() == n {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            false
        }
    };
    assert!(wait_for(1).await);
    // History compacted past the watcher's position, then the watch drops:
    // its resume gets 410 Gone, and it must relist.
    api.create(&PostParams::default(), &cm("during", &[])).await.unwrap();
    server.store().compact(server.store().resource_version());
    server.close_watches();
    api.create(&PostParams::default(), &cm("after", &[])).await.unwrap();
    assert!(
        wait_for(3).await,
        "relisted: {:?}",
        reader.state().iter().map(|c| c.metadata.name.clone()).collect::<Vec<_>>()
    );
    task.abort();
}

#[tokio::test]
async fn injected_failures_and_pauses_reach_the_client() {
    let server = ApiServer::start().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client());
    server.fail_next("configmaps", 2, 500);
    assert_eq!(api_code(api.list(&ListParams::default()).await.unwrap_err()), (500, "InternalError".into()));
    assert!(api.list(&ListParams::default()).await.unwrap_err().to_string().contains("injected"));
    assert!(api.list(&ListParams::default()).await.is_ok());
    server.pause();
    let slow = tokio::spawn({
        let api = api.clone();
        async move { api.list(&ListParams::default()).await.is_ok() }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!slow.is_finished(), "held while paused");
    server.resume();
    assert!(tokio::time::timeout(Duration::from_secs(5), slow).await.unwrap().unwrap());
}

#[tokio::test]
async fn unknown_resources_and_verbs_are_refused_with_a_status() {
    let server = ApiServer::start().await;
    let client = server.client();
    let req = http::Request::get("/apis/example.com/v1/namespaces/default/widgets").body(Vec::new()).unwrap();
    assert_eq!(api_code(client.request::<serde_json::Value>(req).await.unwrap_err()).0, 404);
    let req = http::Request::post("/api/v1/namespaces/default/configmaps/a").body(b"{}".to_vec()).unwrap();
    assert_eq!(api_code(client.request::<serde_json::Value>(req).await.unwrap_err()).0, 405);
    let req = http::Request::patch("/api/v1/namespaces/default/configmaps/a")
        .header("content-type", "text/plain")
        .body(b"x".to_vec())
        .unwrap();
    assert_eq!(api_code(client.request::<serde_json::Value>(req).await.unwrap_err()).0, 415);
}

#[tokio::test]
async fn discovery_lists_every_resource_fulcrum_uses() {
    let server = ApiServer::start().await;
    let discovery = kube::Discovery::new(server.client()).run().await.unwrap();
    let mut kinds: Vec<String> =
        discovery.groups().flat_map(|g| g.recommended_resources()).map(|(r, _)| r.plural).collect();
    kinds.sort();
    for plural in [
        "configmaps",
        "customresourcedefinitions",
        "deployments",
        "endpointslices",
        "events",
        "leases",
        "loadbalancedapps",
        "poddisruptionbudgets",
        "pods",
        "rolebindings",
        "roles",
        "serviceaccounts",
        "services",
    ] {
        assert!(kinds.iter().any(|k| k == plural), "{plural} missing from {kinds:?}");
    }
}

#[tokio::test]
async fn a_runtime_controller_reconciles_against_it() {
    let server = ApiServer::start().await;
    let client = server.client();
    let api: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    for name in ["a", "b"] {
        api.create(&PostParams::default(), &cm(name, &[])).await.unwrap();
    }
    struct Ctx {
        api: Api<ConfigMap>,
    }
    async fn reconcile(obj: Arc<ConfigMap>, ctx: Arc<Ctx>) -> Result<Action, kube::Error> {
        let name = obj.metadata.name.clone().unwrap_or_default();
        let patch = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "annotations": {"reconciled": "yes"}}});
        ctx.api.patch(&name, &PatchParams::apply("test-controller"), &Patch::Apply(patch)).await?;
        Ok(Action::await_change())
    }
    fn error_policy(_: Arc<ConfigMap>, _: &kube::Error, _: Arc<Ctx>) -> Action {
        Action::requeue(Duration::from_millis(100))
    }
    let controller = Controller::new(api.clone(), watcher::Config::default())
        .owns(pods, watcher::Config::default())
        .run(reconcile, error_policy, Arc::new(Ctx { api: api.clone() }))
        .for_each(|_| async {});
    let task = tokio::spawn(controller);
    let mut done = false;
    for _ in 0..250 {
        let list = api.list(&ListParams::default()).await.unwrap();
        if list
            .items
            .iter()
            .all(|c| c.metadata.annotations.as_ref().is_some_and(|a| a.get("reconciled").is_some_and(|v| v == "yes")))
        {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
    assert!(done, "both ConfigMaps reconciled");
}

#[tokio::test]
async fn streaming_lists_send_initial_events_then_the_end_bookmark() {
    let server = ApiServer::start().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client());
    for name in ["a", "b"] {
        api.create(&PostParams::default(), &cm(name, &[])).await.unwrap();
    }
    let (reader, writer) = reflector::store();
    let config = watcher::Config::default().streaming_lists();
    let stream = reflector(writer, watcher(api.clone(), config)).applied_objects();
    let task = tokio::spawn(async move {
        let mut s = stream.boxed();
        while s.next().await.is_some() {}
    });
    let mut ready = false;
    for _ in 0..250 {
        if reader.state().len() == 2 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
    assert!(ready, "the initial events filled the store");
}

#[tokio::test]
async fn the_scale_subresource_reads_and_writes_spec_replicas() {
    let server = ApiServer::start().await;
    let api: Api<Deployment> = Api::default_namespaced(server.client());
    api.create(&PostParams::default(), &deployment("web", 2)).await.unwrap();
    let scale = api.get_scale("web").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(2));
    let mut wanted = api.get_scale("web").await.unwrap();
    wanted.spec = Some(k8s_openapi::api::autoscaling::v1::ScaleSpec { replicas: Some(4) });
    api.replace_scale("web", &PostParams::default(), &wanted).await.unwrap();
    let d = api.get("web").await.unwrap();
    assert_eq!((d.spec.unwrap().replicas, d.metadata.generation), (Some(4), Some(2)));
}

#[tokio::test]
async fn kubectl_can_get_objects_from_it() {
    let server = ApiServer::start().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client());
    api.create(&PostParams::default(), &cm("seen-by-kubectl", &[])).await.unwrap();
    let dir = std::env::temp_dir().join(format!("fulcrum-kubectl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = server.write_kubeconfig(&dir, server.admin_token(), "default");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["get", "configmaps", "-n", "default", "-o", "name"])
            .output()
    })
    .await
    .unwrap()
    .expect("kubectl is part of this project's test environment (client only)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "kubectl failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.trim(), "configmap/seen-by-kubectl");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn lists_are_paged_by_limit_and_continue() {
    let server = ApiServer::start().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client());
    for i in 0..5 {
        api.create(&PostParams::default(), &cm(&format!("c{i}"), &[])).await.unwrap();
    }
    let first = api.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(first.items.len(), 2);
    let token = first.metadata.continue_.clone().expect("more to come");
    let rest = api.list(&ListParams::default().limit(10).continue_token(&token)).await.unwrap();
    let names: Vec<_> = first.items.iter().chain(&rest.items).map(|c| c.metadata.name.clone().unwrap()).collect();
    assert_eq!(names, ["c0", "c1", "c2", "c3", "c4"]);
    assert!(rest.metadata.continue_.is_none());
}

#[tokio::test]
async fn a_test_playing_kubelet_writes_the_store_and_watchers_see_it() {
    let server = ApiServer::start().await;
    let pods: Api<Pod> = Api::default_namespaced(server.client());
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(pods.clone(), watcher::Config::default())).applied_objects();
    let task = tokio::spawn(async move {
        let mut s = stream.boxed();
        while s.next().await.is_some() {}
    });
    let res = server.resource("", "pods");
    let pod = json!({"metadata": {"name": "web-1", "labels": {"app": "web"}}, "spec": {"containers": [{"name": "app", "image": "app:1"}]}});
    server.store().create(&res, "default", pod).unwrap();
    let mut with_status = server.store().get(&res, "default", "web-1").unwrap();
    with_status["status"] = json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]});
    server.store().update(&res, "default", "web-1", with_status, true).unwrap();
    let mut ready = false;
    for _ in 0..250 {
        let phase = reader.state().first().and_then(|p| p.status.as_ref()?.phase.clone());
        if phase.as_deref() == Some("Running") {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
    assert!(ready);
}

#[tokio::test]
async fn an_object_created_for_an_owner_already_gone_is_collected() {
    let server = ApiServer::start().await;
    let api: Api<ConfigMap> = Api::default_namespaced(server.client());
    let owner = api.create(&PostParams::default(), &cm("owner", &[])).await.unwrap();
    api.delete("owner", &DeleteParams::default()).await.unwrap();
    // A controller working from a stale cache creates a child after its owner went.
    let late = owned_by("late-child", &owner);
    api.create(&PostParams::default(), &late).await.unwrap();
    assert!(api.get_opt("late-child").await.unwrap().is_none());
}

#[tokio::test]
async fn a_pod_bound_to_a_node_is_deleted_gracefully_and_an_unbound_one_at_once() {
    let server = ApiServer::start().await;
    let pods: Api<Pod> = Api::default_namespaced(server.client());
    let pod = |name: &str, node: Option<&str>| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 20, "containers": [{"name": "c", "image": "i"}]},
        }))
        .unwrap()
    };
    pods.create(&PostParams::default(), &pod("bound", Some("node-1"))).await.unwrap();
    pods.create(&PostParams::default(), &pod("unbound", None)).await.unwrap();
    pods.delete("unbound", &DeleteParams::default()).await.unwrap();
    assert!(pods.get_opt("unbound").await.unwrap().is_none(), "no kubelet runs it: gone at once");
    pods.delete("bound", &DeleteParams::default()).await.unwrap();
    let terminating = pods.get("bound").await.unwrap();
    assert_eq!(terminating.metadata.deletion_grace_period_seconds, Some(20), "the pod's own grace period");
    assert!(terminating.metadata.deletion_timestamp.is_some());
    // Its kubelet has stopped the containers: deleted for good.
    pods.delete("bound", &DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() }).await.unwrap();
    assert!(pods.get_opt("bound").await.unwrap().is_none());
}
