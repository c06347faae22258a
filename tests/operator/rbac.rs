//! The controller under the chart's own RBAC (`manifests/install.yaml`): the
//! paths the end-to-end test does not take are allowed too, and removing a
//! rule from the ClusterRole makes the operator fail with a 403 in the audit,
//! so the least-privilege check is known to bite.

use std::sync::Arc;

use fulcrum::api::LoadBalancedApp;
use fulcrum::operator::controller::{Context, run};
use fulcrum::operator::desired::Settings;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::apiserver::ApiServer;
use crate::install::{OPERATOR_NS, OPERATOR_SA, install_identity, install_yaml};
use crate::reconcile::until;

const OPERATOR_USER: &str = "system:serviceaccount:fulcrum-system:fulcrum";

fn app(extra: Value) -> LoadBalancedApp {
    let mut spec = json!({
        "replicas": 2,
        "port": 8080,
        "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web", "image": "web:1"}]}},
    });
    json_patch::merge(&mut spec, &extra);
    serde_json::from_value(json!({"apiVersion": "fulcrum.dev/v1alpha1", "kind": "LoadBalancedApp", "metadata": {"name": "web"}, "spec": spec})).unwrap()
}

/// The controller, authenticated as the chart's ServiceAccount with the
/// chart's RBAC (after `edit` changes the installed objects).
async fn operator_as_installed(
    server: &ApiServer,
    edit: impl FnOnce(&mut Vec<Value>),
) -> (Arc<Context>, tokio::task::JoinHandle<()>) {
    let mut objects = install_yaml();
    edit(&mut objects);
    let token = install_identity(server, &objects);
    assert_eq!(token, server.token_for(OPERATOR_NS, OPERATOR_SA));
    let ctx = Arc::new(Context::new(server.client_with_token(&token), Settings { proxy_image: "fulcrum:test".into() }));
    let task = tokio::spawn(run(ctx.clone()));
    (ctx, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_rbac_allows_pruning_a_dedicated_proxy_and_the_apps_own_account() {
    let server = ApiServer::start().await;
    let (_ctx, task) = operator_as_installed(&server, |_| {}).await;
    let admin = server.client();
    let apps: Api<LoadBalancedApp> = Api::default_namespaced(admin.clone());
    apps.create(&PostParams::default(), &app(json!({"proxy": {"mode": "Dedicated"}}))).await.unwrap();
    let deployments: Api<Deployment> = Api::default_namespaced(admin.clone());
    let pdbs: Api<PodDisruptionBudget> = Api::default_namespaced(admin.clone());
    let accounts: Api<ServiceAccount> = Api::default_namespaced(admin.clone());
    until("the dedicated proxy", || async {
        deployments.get_opt("web-proxy").await.unwrap().is_some() && pdbs.get_opt("web-proxy").await.unwrap().is_some()
    })
    .await;
    // Sidecar mode, and pods that name their own account: the proxy's
    // Deployment, budget and the app's account are no longer asked for.
    let named =
        json!({"spec": {"proxy": {"mode": "Sidecar"}, "template": {"spec": {"serviceAccountName": "shop-web"}}}});
    apps.patch("web", &PatchParams::default(), &Patch::Merge(&named)).await.unwrap();
    until("the pruned objects gone", || async {
        deployments.get_opt("web-proxy").await.unwrap().is_none()
            && pdbs.get_opt("web-proxy").await.unwrap().is_none()
            && accounts.get_opt("web-proxy").await.unwrap().is_none()
    })
    .await;
    task.abort();
    let audit = server.audit();
    let mine: Vec<_> = audit.iter().filter(|e| e.user == OPERATOR_USER).collect();
    assert!(mine.iter().all(|e| e.allowed), "denied: {:#?}", mine.iter().filter(|e| !e.allowed).collect::<Vec<_>>());
    for (verb, resource) in [
        ("delete", "serviceaccounts"),
        ("get", "serviceaccounts"),
        ("delete", "poddisruptionbudgets"),
        ("delete", "deployments"),
    ] {
        assert!(mine.iter().any(|e| e.verb == verb && e.resource == resource), "no {verb} of {resource}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_rule_from_the_cluster_role_fails_the_operator_with_a_403_in_the_audit() {
    let server = ApiServer::start().await;
    let (ctx, task) = operator_as_installed(&server, |objects| {
        let role = objects.iter_mut().find(|o| o["kind"] == "ClusterRole").expect("the ClusterRole");
        let rules = role["rules"].as_array_mut().expect("rules");
        let before = rules.len();
        rules.retain(|r| r["resources"] != json!(["pods"]));
        assert_eq!(rules.len(), before - 1, "the pods rule was removed");
    })
    .await;
    let apps: Api<LoadBalancedApp> = Api::default_namespaced(server.client());
    apps.create(&PostParams::default(), &app(json!({}))).await.unwrap();
    until("a denied request in the audit", || async {
        server.audit().iter().any(|e| e.user == OPERATOR_USER && !e.allowed)
    })
    .await;
    let denied: Vec<_> = server.audit().into_iter().filter(|e| e.user == OPERATOR_USER && !e.allowed).collect();
    assert!(denied.iter().all(|e| e.resource == "pods"), "{denied:#?}");
    until("the failed reconcile counted", || async {
        ctx.metrics.encode().contains("fulcrum_operator_reconcile_errors_total{kind=\"kube\"}")
    })
    .await;
    assert!(apps.get("web").await.unwrap().status.is_none(), "no status without observing the pods");
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confined_to_namespaces_the_operator_serves_and_touches_only_those() {
    let server = ApiServer::start().await;
    // The chart rendered with `watchNamespaces: [shop, payments]`.
    let objects = crate::install::objects(&crate::install::render_chart("watch-namespaces-values.yaml"));
    assert!(!objects.iter().any(|o| o["kind"] == "ClusterRoleBinding"), "no cluster-wide binding");
    let bound: Vec<&str> = objects
        .iter()
        .filter(|o| o["kind"] == "RoleBinding")
        .filter_map(|o| o["metadata"]["namespace"].as_str())
        .collect();
    assert!(bound.contains(&"shop") && bound.contains(&"payments"), "{bound:?}");
    let token = install_identity(&server, &objects);
    let ctx = Arc::new(
        Context::new(server.client_with_token(&token), Settings { proxy_image: "fulcrum:test".into() })
            .confined_to(vec!["shop".into(), "payments".into()]),
    );
    let task = tokio::spawn(run(ctx.clone()));
    let admin = server.client();
    for ns in ["shop", "elsewhere"] {
        let apps: Api<LoadBalancedApp> = Api::namespaced(admin.clone(), ns);
        apps.create(&PostParams::default(), &app(json!({}))).await.unwrap();
    }
    let shop: Api<Deployment> = Api::namespaced(admin.clone(), "shop");
    until("the app in shop", || async { shop.get_opt("web").await.unwrap().is_some() }).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let elsewhere: Api<Deployment> = Api::namespaced(admin.clone(), "elsewhere");
    assert!(elsewhere.get_opt("web").await.unwrap().is_none(), "an app outside the namespaces was served");
    task.abort();
    let audit = server.audit();
    let mine: Vec<_> = audit.iter().filter(|e| e.user == OPERATOR_USER).collect();
    assert!(mine.iter().all(|e| e.allowed), "denied: {:#?}", mine.iter().filter(|e| !e.allowed).collect::<Vec<_>>());
    let outside: Vec<_> =
        mine.iter().filter(|e| !matches!(e.namespace.as_deref(), Some("shop" | "payments"))).collect();
    assert!(outside.is_empty(), "requests outside the namespaces: {outside:#?}");
}
