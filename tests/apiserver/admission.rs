//! Admission of LoadBalancedApps by the installed CRD, on the server side:
//! defaults, pruning, the structural schema and the CEL rules, with the real
//! `422 Invalid` Status.

use fulcrum::api::LoadBalancedApp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, ValidationDirective};
use serde_json::{Value, json};

use crate::apiserver::ApiServer;

fn lba(spec: Value) -> Value {
    json!({"apiVersion": "fulcrum.dev/v1alpha1", "kind": "LoadBalancedApp", "metadata": {"name": "web"}, "spec": spec})
}

fn minimal() -> Value {
    json!({"port": 8080, "template": {"spec": {"containers": [{"name": "web", "image": "web:1"}]}}})
}

fn with(extra: Value) -> Value {
    let mut spec = minimal();
    json_patch::merge(&mut spec, &extra);
    spec
}

/// Creates through the raw API (no typed defaults on the client's side).
async fn create(api: &Api<kube::api::DynamicObject>, obj: Value) -> Result<Value, kube::core::Status> {
    let obj: kube::api::DynamicObject = serde_json::from_value(obj).unwrap();
    match api.create(&PostParams::default(), &obj).await {
        Ok(o) => Ok(serde_json::to_value(o).unwrap()),
        Err(kube::Error::Api(s)) => Err(*s),
        Err(e) => panic!("{e}"),
    }
}

fn dynamic(server: &ApiServer) -> Api<kube::api::DynamicObject> {
    let ar = kube::api::ApiResource::erase::<LoadBalancedApp>(&());
    Api::namespaced_with(server.client(), "default", &ar)
}

#[tokio::test]
async fn a_minimal_app_is_stored_with_the_schema_defaults() {
    let server = ApiServer::start().await;
    let stored = create(&dynamic(&server), lba(minimal())).await.unwrap();
    let spec = &stored["spec"];
    assert_eq!(spec["replicas"], 2);
    assert_eq!(spec["service"]["port"], 80);
    assert_eq!(spec["loadBalancing"]["algorithm"], "RoundRobin");
    assert_eq!(spec["healing"]["unreadyTimeout"], "2m");
}

#[tokio::test]
async fn schema_violations_are_422_invalid_with_each_field_path() {
    let server = ApiServer::start().await;
    let api = dynamic(&server);
    let cases = [
        (json!({"template": {"spec": {"containers": []}}}), "spec.port: Required value"),
        (
            with(json!({"replicas": -1})),
            "spec.replicas: Invalid value: -1: spec.replicas in body should be greater than or equal to 0",
        ),
        (with(json!({"replicas": "three"})), "spec.replicas in body must be of type integer: \"string\""),
        (
            with(json!({"loadBalancing": {"algorithm": "Fastest"}})),
            "spec.loadBalancing.algorithm: Unsupported value: \"Fastest\": supported values:",
        ),
        (
            with(json!({"healing": {"unreadyTimeout": "soon"}})),
            "spec.healing.unreadyTimeout: Invalid value: \"soon\": spec.healing.unreadyTimeout in body should match",
        ),
        (
            with(json!({"canary": {"weight": 101, "template": {"spec": {"containers": []}}}})),
            "spec.canary.weight in body should be less than or equal to 100",
        ),
    ];
    for (spec, expected) in cases {
        let e = create(&api, lba(spec.clone())).await.expect_err(&spec.to_string());
        assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"), "{spec}");
        assert!(e.message.starts_with("LoadBalancedApp.fulcrum.dev \"web\" is invalid: "), "{}", e.message);
        assert!(e.message.contains(expected), "{spec}: expected {expected:?} in {}", e.message);
    }
    // Several errors at once are listed together.
    let e = create(&api, lba(with(json!({"replicas": -1, "retries": {"attempts": 9}})))).await.unwrap_err();
    assert!(e.message.contains("[spec.replicas") && e.message.contains("spec.retries.attempts"), "{}", e.message);
    let details = e.details.expect("details");
    let fields: Vec<&str> = details.causes.iter().map(|c| c.field.as_str()).collect();
    assert_eq!(fields, ["spec.replicas", "spec.retries.attempts"]);
}

#[tokio::test]
async fn cel_rules_are_evaluated_on_create_update_and_patch() {
    let server = ApiServer::start().await;
    let api = dynamic(&server);
    let e = create(&api, lba(with(json!({"loadBalancing": {"algorithm": "ConsistentHash"}})))).await.unwrap_err();
    assert_eq!(e.code, 422);
    assert!(e.message.contains("ConsistentHash needs hashOn"), "{}", e.message);
    assert!(e.message.contains("spec.loadBalancing"), "the rule's field path: {}", e.message);
    create(&api, lba(with(json!({"replicas": 3})))).await.unwrap();
    let apps: Api<LoadBalancedApp> = Api::default_namespaced(server.client());
    let bad = json!({"spec": {"availability": {"minAvailable": 3}}});
    let e = apps.patch("web", &PatchParams::default(), &Patch::Merge(&bad)).await.unwrap_err();
    assert!(matches!(&e, kube::Error::Api(s) if s.code == 422 && s.message.contains("must be below replicas")), "{e}");
    let apply =
        json!({"apiVersion": "fulcrum.dev/v1alpha1", "kind": "LoadBalancedApp", "spec": {"proxy": {"replicas": 3}}});
    let e = apps.patch("web", &PatchParams::apply("someone"), &Patch::Apply(&apply)).await.unwrap_err();
    assert!(matches!(&e, kube::Error::Api(s) if s.code == 422 && s.message.contains("proxy.mode Dedicated")), "{e}");
    assert_eq!(apps.get("web").await.unwrap().spec.replicas, 3, "nothing refused was stored");
    let both = json!({"spec": {"canary": {"replicas": 1, "replicasPercent": 10, "weight": 5, "template": {"spec": {"containers": [{"name": "web", "image": "web:2"}]}}}}});
    let e = apps.patch("web", &PatchParams::default(), &Patch::Merge(&both)).await.unwrap_err();
    assert!(matches!(&e, kube::Error::Api(s) if s.code == 422 && s.message.contains("not both")), "{e}");
}

#[tokio::test]
async fn unknown_fields_are_pruned_or_refused_when_validation_is_strict() {
    let server = ApiServer::start().await;
    let api = dynamic(&server);
    let stored = create(&api, lba(with(json!({"replicsa": 5})))).await.unwrap();
    assert!(stored["spec"].get("replicsa").is_none(), "pruned: {}", stored["spec"]);
    let obj: kube::api::DynamicObject =
        serde_json::from_value(json!({"apiVersion": "fulcrum.dev/v1alpha1", "kind": "LoadBalancedApp", "metadata": {"name": "strict"}, "spec": with(json!({"replicsa": 5}))})).unwrap();
    let pp = PatchParams { field_validation: Some(ValidationDirective::Strict), ..PatchParams::apply("kubectl") };
    let e = api.patch("strict", &pp, &Patch::Apply(&obj)).await.unwrap_err();
    assert!(
        matches!(&e, kube::Error::Api(s) if s.code == 400 && s.message == "strict decoding error: unknown field \"spec.replicsa\""),
        "{e}"
    );
    // The pod template keeps every field: it is the app's, and its schema preserves unknown fields.
    let template = json!({"template": {"metadata": {"annotations": {"a": "b"}}, "spec": {"hostname": "x", "containers": [{"name": "web", "image": "web:1"}]}}});
    let mut obj = lba(with(template));
    obj["metadata"]["name"] = json!("kept");
    let stored = create(&api, obj).await.unwrap();
    assert_eq!(stored["spec"]["template"]["spec"]["hostname"], "x");
    assert_eq!(stored["spec"]["template"]["metadata"]["annotations"]["a"], "b");
}

#[tokio::test]
async fn custom_resources_are_not_served_before_their_crd_is_installed() {
    let server = ApiServer::start_bare().await;
    let apps: Api<LoadBalancedApp> = Api::default_namespaced(server.client());
    let e = apps.list(&ListParams::default()).await.unwrap_err();
    assert!(matches!(&e, kube::Error::Api(s) if s.code == 404), "{e}");
    let discovery = kube::discovery::Discovery::new(server.client()).run().await.unwrap();
    assert!(!discovery.groups().any(|g| g.name() == "fulcrum.dev"));
    let crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
        serde_saphyr::from_str(
            &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/loadbalancedapps.fulcrum.dev.yaml"))
                .unwrap(),
        )
        .unwrap();
    Api::all(server.client()).create(&PostParams::default(), &crd).await.unwrap();
    apps.list(&ListParams::default()).await.unwrap();
    let discovery = kube::discovery::Discovery::new(server.client()).run().await.unwrap();
    assert!(discovery.groups().any(|g| g.name() == "fulcrum.dev"));
}

/// Runs the real kubectl against `server` as its administrator.
async fn kubectl(server: &ApiServer, args: &[&str]) -> std::process::Output {
    let dir = std::env::temp_dir().join(format!("fulcrum-kubectl-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = server.write_kubeconfig(&dir, server.admin_token(), "default");
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new("kubectl").arg("--kubeconfig").arg(&kubeconfig).args(&args).output()
    })
    .await
    .unwrap()
    .expect("kubectl is part of this project's test environment (client only)")
}

#[tokio::test]
async fn the_app_scales_through_its_scale_subresource_with_kubectl_and_an_autoscalers_update() {
    use kube::api::{Api, PostParams};
    let server = ApiServer::start().await;
    create(&dynamic(&server), lba(with(json!({"replicas": 2})))).await.unwrap();
    let apps: Api<LoadBalancedApp> = Api::default_namespaced(server.client());
    // What the operator reports: the stable pods and their selector.
    let selector = "fulcrum.dev/app=web,fulcrum.dev/track=stable";
    let status = json!({"status": {"replicas": 2, "selector": selector}});
    apps.patch_status("web", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();

    // kubectl finds the subresource in discovery and patches it.
    let out = kubectl(&server, &["scale", "lba/web", "--replicas=5"]).await;
    assert!(out.status.success(), "kubectl scale: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(apps.get("web").await.unwrap().spec.replicas, 5);
    let out = kubectl(&server, &["scale", "lba/web", "--current-replicas=4", "--replicas=6"]).await;
    assert!(!out.status.success(), "a failed precondition is refused");
    assert_eq!(apps.get("web").await.unwrap().spec.replicas, 5);

    // An autoscaler reads the Scale (the selector tells it which pods to measure) and updates it.
    let mut scale = apps.get_scale("web").await.unwrap();
    let st = scale.status.clone().unwrap();
    assert_eq!(
        (scale.spec.as_ref().unwrap().replicas, st.replicas, st.selector.as_deref()),
        (Some(5), 2, Some(selector))
    );
    let stale = scale.clone();
    scale.spec = Some(k8s_openapi::api::autoscaling::v1::ScaleSpec { replicas: Some(3) });
    apps.replace_scale("web", &PostParams::default(), &scale).await.unwrap();
    assert_eq!(apps.get("web").await.unwrap().spec.replicas, 3);
    let conflict = apps.replace_scale("web", &PostParams::default(), &stale).await.unwrap_err();
    assert!(matches!(conflict, kube::Error::Api(ref s) if s.code == 409), "{conflict}");

    // The app's own schema and rules bound what the Scale may say.
    let mut too_many = apps.get_scale("web").await.unwrap();
    too_many.spec = Some(k8s_openapi::api::autoscaling::v1::ScaleSpec { replicas: Some(1001) });
    let e = apps.replace_scale("web", &PostParams::default(), &too_many).await.unwrap_err();
    assert!(matches!(e, kube::Error::Api(ref s) if s.code == 422 && s.message.contains("spec.replicas")), "{e}");
    let negative = json!({"spec": {"replicas": -1}});
    let e = apps.patch_scale("web", &PatchParams::default(), &Patch::Merge(&negative)).await.unwrap_err();
    assert!(matches!(e, kube::Error::Api(ref s) if s.code == 422), "{e}");
    assert_eq!(apps.get("web").await.unwrap().spec.replicas, 3);
}

#[tokio::test]
async fn only_the_subresources_a_crd_declares_are_served() {
    let server = ApiServer::start().await;
    create(&dynamic(&server), lba(minimal())).await.unwrap();
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(server.client());
    let name = "loadbalancedapps.fulcrum.dev";
    let mut crd = serde_json::to_value(crds.get(name).await.unwrap()).unwrap();
    crd["spec"]["versions"][0]["subresources"] = json!({"status": {}});
    crds.replace(name, &PostParams::default(), &serde_json::from_value(crd).unwrap()).await.unwrap();
    let apps: Api<LoadBalancedApp> = Api::default_namespaced(server.client());
    let e = apps.get_scale("web").await.unwrap_err();
    assert!(matches!(e, kube::Error::Api(ref s) if s.code == 404), "{e}");
    let out = kubectl(&server, &["scale", "lba/web", "--replicas=3"]).await;
    assert!(!out.status.success(), "kubectl cannot scale what has no scale subresource");
}
