//! Authentication, RBAC and escalation prevention in the test API server,
//! each rule as a real cluster applies it.

use k8s_openapi::api::core::v1::{ConfigMap, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use super::{api_code, cm};
use crate::apiserver::ApiServer;

fn typed<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).unwrap()
}

fn forbidden_message(e: kube::Error) -> String {
    match e {
        kube::Error::Api(s) if s.code == 403 && s.reason == "Forbidden" => s.message,
        other => panic!("expected 403 Forbidden, got {other:?}"),
    }
}

/// A ServiceAccount `ns/name`, bound in `ns` to a Role with `rules`; its client.
async fn account_with_role(server: &ApiServer, ns: &str, name: &str, rules: Value) -> kube::Client {
    let admin = server.client();
    Api::<ServiceAccount>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &typed(json!({"metadata": {"name": name}})))
        .await
        .unwrap();
    Api::<Role>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &typed(json!({"metadata": {"name": name}, "rules": rules})))
        .await
        .unwrap();
    Api::<RoleBinding>::namespaced(admin, ns)
        .create(
            &PostParams::default(),
            &typed(json!({
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
            })),
        )
        .await
        .unwrap();
    server.client_with_token(&server.token_for(ns, name))
}

#[tokio::test]
async fn requests_without_a_valid_token_are_401_and_a_token_dies_with_its_account() {
    let server = ApiServer::start().await;
    let nobody = server.client_with_token("not-a-token");
    let e = Api::<ConfigMap>::default_namespaced(nobody).list(&ListParams::default()).await.unwrap_err();
    assert_eq!(api_code(e), (401, "Unauthorized".into()));
    // A token of an account that does not exist (yet, or any more) authenticates no one.
    let ghost = server.client_with_token(&server.token_for("default", "ghost"));
    let e = Api::<ConfigMap>::default_namespaced(ghost.clone()).list(&ListParams::default()).await.unwrap_err();
    assert_eq!(api_code(e), (401, "Unauthorized".into()));
    Api::<ServiceAccount>::default_namespaced(server.client())
        .create(&PostParams::default(), &typed(json!({"metadata": {"name": "ghost"}})))
        .await
        .unwrap();
    let e = Api::<ConfigMap>::default_namespaced(ghost).list(&ListParams::default()).await.unwrap_err();
    assert_eq!(api_code(e).0, 403, "authenticated now, and allowed nothing");
}

#[tokio::test]
async fn a_denied_request_gets_the_real_forbidden_status_and_is_audited() {
    let server = ApiServer::start().await;
    let client = account_with_role(
        &server,
        "default",
        "reader",
        json!([
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]},
        ]),
    )
    .await;
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let msg = forbidden_message(pods.get("web-1").await.unwrap_err());
    assert_eq!(
        msg,
        "pods \"web-1\" is forbidden: User \"system:serviceaccount:default:reader\" cannot get resource \"pods\" in API group \"\" in the namespace \"default\""
    );
    let all: Api<ConfigMap> = Api::all(client.clone());
    let msg = forbidden_message(all.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(
        msg,
        "configmaps is forbidden: User \"system:serviceaccount:default:reader\" cannot list resource \"configmaps\" in API group \"\" at the cluster scope"
    );
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = Api::default_namespaced(client.clone());
    let msg = forbidden_message(deployments.list(&ListParams::default()).await.unwrap_err());
    assert!(msg.starts_with("deployments.apps is forbidden:"), "{msg}");
    // The role's own rights work; watch is a verb of its own.
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    cms.list(&ListParams::default()).await.unwrap();
    assert_eq!(api_code(cms.create(&PostParams::default(), &cm("x", &[])).await.unwrap_err()).0, 403);
    let audit = server.audit();
    let mine: Vec<(&str, &str, bool)> = audit
        .iter()
        .filter(|e| e.user == "system:serviceaccount:default:reader")
        .map(|e| (e.verb.as_str(), e.resource.as_str(), e.allowed))
        .collect();
    assert_eq!(
        mine,
        [
            ("get", "pods", false),
            ("list", "configmaps", false),
            ("list", "deployments", false),
            ("list", "configmaps", true),
            ("create", "configmaps", false)
        ]
    );
}

#[tokio::test]
async fn resource_names_limit_get_and_name_selected_watches_but_never_create_or_plain_lists() {
    let server = ApiServer::start().await;
    let admin: Api<ConfigMap> = Api::default_namespaced(server.client());
    admin.create(&PostParams::default(), &cm("web-proxy", &[])).await.unwrap();
    admin.create(&PostParams::default(), &cm("other", &[])).await.unwrap();
    let client = account_with_role(&server, "default", "proxy", json!([
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["web-proxy"], "verbs": ["get", "list", "watch", "create"]},
    ]))
    .await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    cms.get("web-proxy").await.unwrap();
    assert_eq!(api_code(cms.get("other").await.unwrap_err()).0, 403);
    assert_eq!(api_code(cms.list(&ListParams::default()).await.unwrap_err()).0, 403);
    let listed = cms.list(&ListParams::default().fields("metadata.name=web-proxy")).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(api_code(cms.list(&ListParams::default().fields("metadata.name=other")).await.unwrap_err()).0, 403);
    // Create has no name to match until the object exists: a named rule never allows it.
    assert_eq!(api_code(cms.create(&PostParams::default(), &cm("web-proxy-2", &[])).await.unwrap_err()).0, 403);
}

#[tokio::test]
async fn subresources_need_rules_of_their_own_and_role_bindings_stay_in_their_namespace() {
    let server = ApiServer::start().await;
    let admin = server.client();
    Api::<ClusterRole>::all(admin.clone())
        .create(
            &PostParams::default(),
            &typed(json!({"metadata": {"name": "pod-reader"}, "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "patch"]}]})),
        )
        .await
        .unwrap();
    Api::<ServiceAccount>::namespaced(admin.clone(), "team-a")
        .create(&PostParams::default(), &typed(json!({"metadata": {"name": "bot"}})))
        .await
        .unwrap();
    Api::<RoleBinding>::namespaced(admin.clone(), "team-a")
        .create(
            &PostParams::default(),
            &typed(json!({
                "metadata": {"name": "bot"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "pod-reader"},
                "subjects": [{"kind": "ServiceAccount", "name": "bot", "namespace": "team-a"}],
            })),
        )
        .await
        .unwrap();
    let res = server.resource("", "pods");
    server
        .store()
        .create(
            &res,
            "team-a",
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}),
        )
        .unwrap();
    let bot = server.client_with_token(&server.token_for("team-a", "bot"));
    let pods: Api<Pod> = Api::namespaced(bot.clone(), "team-a");
    pods.get("p").await.unwrap();
    let status = json!({"status": {"phase": "Running"}});
    let e = pods.patch_status("p", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap_err();
    assert!(forbidden_message(e).contains("cannot patch resource \"pods/status\""));
    // A RoleBinding of a ClusterRole grants it in the binding's namespace only.
    assert_eq!(
        api_code(Api::<Pod>::namespaced(bot.clone(), "team-b").list(&ListParams::default()).await.unwrap_err()).0,
        403
    );
    assert_eq!(api_code(Api::<Pod>::all(bot).list(&ListParams::default()).await.unwrap_err()).0, 403);
}

#[tokio::test]
async fn roles_and_bindings_cannot_grant_more_than_their_writer_holds_without_escalate_or_bind() {
    let server = ApiServer::start().await;
    // May write Roles and RoleBindings, and read ConfigMaps; nothing else.
    let rules = json!([
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"], "verbs": ["create", "get"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]},
    ]);
    let client = account_with_role(&server, "default", "writer", rules).await;
    let roles: Api<Role> = Api::default_namespaced(client.clone());
    let within = json!({"metadata": {"name": "cm-reader"}, "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["x"], "verbs": ["get", "watch"]}]});
    roles.create(&PostParams::default(), &typed(within)).await.unwrap();
    let beyond = json!({"metadata": {"name": "pod-killer"}, "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["delete"]}]});
    let msg = forbidden_message(roles.create(&PostParams::default(), &typed(beyond.clone())).await.unwrap_err());
    assert!(
        msg.contains("is attempting to grant RBAC permissions not currently held") && msg.contains("pods"),
        "{msg}"
    );
    // A wildcard is covered only by a wildcard.
    let wild = json!({"metadata": {"name": "wild"}, "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["*"]}]});
    assert_eq!(api_code(roles.create(&PostParams::default(), &typed(wild)).await.unwrap_err()).0, 403);

    // Binding: a Role whose rights the writer holds, yes; one it does not, no.
    let admin_roles: Api<Role> = Api::default_namespaced(server.client());
    admin_roles.create(&PostParams::default(), &typed(beyond)).await.unwrap();
    let bindings: Api<RoleBinding> = Api::default_namespaced(client.clone());
    let binding = |name: &str, role: &str| {
        typed::<RoleBinding>(json!({
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": "someone", "namespace": "default"}],
        }))
    };
    bindings.create(&PostParams::default(), &binding("b1", "cm-reader")).await.unwrap();
    assert_eq!(
        api_code(bindings.create(&PostParams::default(), &binding("b2", "pod-killer")).await.unwrap_err()).0,
        403
    );

    // `escalate` and `bind` lift the checks, as in a real cluster.
    let more = json!([
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles"], "verbs": ["escalate"]},
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles"], "resourceNames": ["pod-killer"], "verbs": ["bind"]},
    ]);
    let admin = server.client();
    Api::<ClusterRole>::all(admin.clone())
        .create(&PostParams::default(), &typed(json!({"metadata": {"name": "escalator"}, "rules": more})))
        .await
        .unwrap();
    Api::<ClusterRoleBinding>::all(admin)
        .create(
            &PostParams::default(),
            &typed(json!({
                "metadata": {"name": "writer-escalates"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "escalator"},
                "subjects": [{"kind": "ServiceAccount", "name": "writer", "namespace": "default"}],
            })),
        )
        .await
        .unwrap();
    let wild = json!({"metadata": {"name": "wild"}, "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["*"]}]});
    roles.create(&PostParams::default(), &typed(wild)).await.unwrap();
    bindings.create(&PostParams::default(), &binding("b2", "pod-killer")).await.unwrap();
}
