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
