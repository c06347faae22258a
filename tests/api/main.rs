//! The LoadBalancedApp CRD: the checked-in copy matches the types, defaults
//! fill a minimal spec, and every CEL rule admits what it should and refuses
//! what it should, evaluated with kube's client-side CEL validator against
//! the generated schema.

mod reference;

use fulcrum::api::{LoadBalancedApp, LoadBalancedAppSpec, crd_yaml};
use kube::CustomResourceExt;
use kube::core::cel::Validator;
use serde_json::{Value, json};

const CHECKED_IN: &str = include_str!("../../crds/loadbalancedapps.fulcrum.dev.yaml");

#[test]
fn the_checked_in_crd_matches_the_types() {
    assert!(
        CHECKED_IN == crd_yaml(),
        "crds/loadbalancedapps.fulcrum.dev.yaml is stale: run `make crds` and commit the result"
    );
}

#[test]
fn fulcrum_crd_prints_the_checked_in_crd() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fulcrum")).arg("crd").output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), CHECKED_IN);
}

#[test]
fn the_crd_has_names_status_and_printer_columns() {
    let crd = LoadBalancedApp::crd();
    assert_eq!(crd.metadata.name.as_deref(), Some("loadbalancedapps.fulcrum.dev"));
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.short_names, Some(vec!["lba".to_string(), "lbapp".to_string()]));
    let v = &crd.spec.versions[0];
    assert_eq!(v.name, "v1alpha1");
    assert!(v.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
    let columns: Vec<&str> = v.additional_printer_columns.iter().flatten().map(|c| c.name.as_str()).collect();
    assert_eq!(columns, ["Algorithm", "Ready", "Endpoints", "Available", "Age"]);
}

#[test]
fn every_field_of_the_schema_is_documented() {
    fn walk(path: &str, schema: &Value, missing: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (name, child) in props {
                let p = format!("{path}.{name}");
                // The embedded Kubernetes types are documented by Kubernetes.
                let foreign = p.contains(".resources.") || p.contains(".conditions.") || p.contains(".time");
                if child.get("description").is_none() && !foreign {
                    missing.push(p.clone());
                }
                walk(&p, child, missing);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    let crd = serde_json::to_value(LoadBalancedApp::crd()).unwrap();
    let root = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let mut missing = Vec::new();
    walk("", &root["properties"]["spec"], &mut missing);
    walk("status", &root["properties"]["status"], &mut missing);
    assert!(missing.is_empty(), "fields without a description (kubectl explain would show nothing): {missing:?}");
}

fn minimal() -> Value {
    json!({
        "port": 8080,
        "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web", "image": "web:1"}]}},
    })
}

/// Merges `patch` into the minimal spec, applies the defaults as the API
/// server would (through the typed spec), and wraps it in an object.
fn object(patch: Value) -> Value {
    let mut spec = minimal();
    json_patch::merge(&mut spec, &patch);
    let typed: LoadBalancedAppSpec = serde_json::from_value(spec.clone()).unwrap_or_else(|e| panic!("{e}: {spec}"));
    json!({
        "apiVersion": "fulcrum.dev/v1alpha1",
        "kind": "LoadBalancedApp",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": serde_json::to_value(typed).unwrap(),
    })
}

fn schema() -> Value {
    let crd = LoadBalancedApp::crd();
    serde_json::to_value(crd.spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()).unwrap()
}

fn check(patch: Value) -> Result<(), String> {
    Validator::new().validate(&schema(), &object(patch), None).map_err(|e| format!("{e:?}"))
}

#[test]
fn defaults_fill_a_minimal_spec() {
    let spec: LoadBalancedAppSpec = serde_json::from_value(minimal()).unwrap();
    assert_eq!(spec.replicas, 2);
    assert_eq!(spec.service.port, 80);
    assert_eq!(spec.load_balancing.panic_threshold_percent, 50);
    assert_eq!(spec.retries.attempts, 2);
    assert_eq!(spec.healing.unready_timeout, "2m");
    assert_eq!(spec.healing.max_concurrent, 1);
    assert!(spec.availability.spread_across_nodes);
    assert!(check(json!({})).is_ok());
}

#[test]
fn valid_specs_pass_every_rule() {
    for ok in [
        json!({"loadBalancing": {"algorithm": "ConsistentHash", "hashOn": {"header": "x-user"}}}),
        json!({"loadBalancing": {"algorithm": "ConsistentHash", "hashOn": {"sourceIP": true}}, "protocol": "TCP"}),
        json!({"loadBalancing": {"algorithm": "PeakEwma", "sessionAffinity": {"cookie": "S"}}}),
        json!({"proxy": {"mode": "Dedicated", "replicas": 3}}),
        json!({"replicas": 3, "availability": {"minAvailable": 2}}),
        json!({"healthCheck": {"active": {"tcp": {}}}}),
        json!({"appProtocol": "GRPC", "healthCheck": {"active": {"grpc": {"service": "shop"}}}}),
        json!({"appProtocol": "H2C"}),
        json!({"protocol": "TCP", "appProtocol": "HTTP1"}),
        json!({"forwarding": {"trustedProxies": ["10.0.0.0/8", "192.0.2.1"]}}),
        json!({"timeouts": {"idle": "1h30m", "header": "500ms", "bodyIdle": "2m", "tunnelIdle": "24h"}}),
        json!({"canary": {"weight": 10, "template": {"spec": {"containers": []}}}}),
        json!({"tls": {"secretName": "web-tls", "clientAuth": {"caSecretName": "ca"}}, "loadBalancing": {"algorithm": "ConsistentHash", "hashOn": {"clientCertificate": true}}}),
        json!({"endpointTls": {"caConfigMapName": "kube-root-ca.crt"}}),
        json!({"endpointTls": {"insecureSkipVerify": true}}),
    ] {
        assert_eq!(check(ok.clone()), Ok(()), "{ok}");
    }
}

#[test]
fn each_cross_field_rule_refuses_what_it_guards() {
    for (bad, expected) in [
        (json!({"loadBalancing": {"algorithm": "ConsistentHash"}}), "ConsistentHash needs hashOn"),
        (json!({"loadBalancing": {"algorithm": "RoundRobin", "hashOn": {"header": "x"}}}), "hashOn applies only"),
        (
            json!({"loadBalancing": {"algorithm": "ConsistentHash", "hashOn": {"header": "x", "cookie": "c"}}}),
            "exactly one of sourceIP",
        ),
        (
            json!({"loadBalancing": {"algorithm": "ConsistentHash", "hashOn": {"sourceIP": false}}}),
            "exactly one of sourceIP",
        ),
        (json!({"protocol": "TCP", "loadBalancing": {"sessionAffinity": {}}}), "needs protocol HTTP"),
        (
            json!({"protocol": "TCP", "loadBalancing": {"algorithm": "ConsistentHash", "hashOn": {"header": "x"}}}),
            "only hash on sourceIP",
        ),
        (json!({"proxy": {"replicas": 3}}), "applies only to proxy.mode Dedicated"),
        (json!({"replicas": 2, "availability": {"minAvailable": 2}}), "must be below replicas"),
        (json!({"healthCheck": {"active": {"http": {}, "tcp": {}}}}), "exactly one of http, tcp or grpc"),
        (json!({"healthCheck": {"active": {}}}), "exactly one of http, tcp or grpc"),
        (json!({"protocol": "TCP", "appProtocol": "GRPC"}), "appProtocol says how the proxy speaks HTTP"),
        (json!({"appProtocol": "H2C", "healthCheck": {"active": {"grpc": {}}}}), "grpc needs appProtocol GRPC"),
        (json!({"healthCheck": {"active": {"grpc": {}}}}), "grpc needs appProtocol GRPC"),
        (json!({"timeouts": {"idle": "0s"}}), "timeouts.idle must be between 100ms and 24h"),
        (json!({"timeouts": {"request": "100000h"}}), "timeouts.request must be between 10ms and 24h"),
        (json!({"timeouts": {"header": "1h"}}), "timeouts.header must be between 100ms and 5m"),
        (json!({"timeouts": {"bodyIdle": "10ms"}}), "timeouts.bodyIdle must be between"),
        (json!({"protocol": "TCP", "tls": {"secretName": "t"}}), "tls terminates HTTP only"),
        (json!({"protocol": "TCP", "endpointTls": {"insecureSkipVerify": true}}), "endpointTls needs protocol HTTP"),
        (json!({"endpointTls": {}}), "set one of caConfigMapName or caSecretName"),
        (json!({"endpointTls": {"caSecretName": "a", "caConfigMapName": "b"}}), "set one of caConfigMapName"),
        (json!({"endpointTls": {"caSecretName": "a", "insecureSkipVerify": true}}), "set one of caConfigMapName"),
        (
            json!({"loadBalancing": {"algorithm": "ConsistentHash", "hashOn": {"clientCertificate": true}}}),
            "needs tls.clientAuth",
        ),
    ] {
        let e = check(bad.clone()).expect_err(&bad.to_string());
        assert!(e.contains(expected), "{bad}: expected {expected:?} in {e}");
    }
}

#[test]
fn the_schema_bounds_numbers_and_durations() {
    let crd = serde_json::to_value(LoadBalancedApp::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    assert_eq!(spec["canary"]["properties"]["weight"]["maximum"], 100.0);
    assert_eq!(spec["canary"]["properties"]["weight"]["minimum"], 0.0);
    assert_eq!(spec["retries"]["properties"]["attempts"]["maximum"], 5.0);
    assert_eq!(spec["healing"]["properties"]["unreadyTimeout"]["pattern"], fulcrum::api::DURATION_PATTERN);
    let algorithms = spec["loadBalancing"]["properties"]["algorithm"]["enum"].as_array().unwrap().len();
    assert_eq!(algorithms, 7);
}

#[test]
fn the_chart_carries_the_same_crd() {
    let chart = std::fs::read_to_string("charts/fulcrum/crds/loadbalancedapps.fulcrum.dev.yaml")
        .expect("charts/fulcrum/crds/loadbalancedapps.fulcrum.dev.yaml");
    assert!(chart == CHECKED_IN, "the chart's CRD drifted from crds/: run `make crds`");
}

/// Every example in manifests/examples/ (and the kind test's app): a LoadBalancedApp that the schema's
/// CEL rules admit and from which the operator can build every object.
#[test]
fn every_example_passes_the_cel_rules_and_the_operator_accepts_it() {
    let mut seen = 0;
    let mut paths: Vec<std::path::PathBuf> =
        std::fs::read_dir("manifests/examples").expect("manifests/examples").flatten().map(|e| e.path()).collect();
    paths.sort();
    // The kind end-to-end test's app, too.
    paths.push("tests/e2e/kind-app.yaml".into());
    for path in paths {
        let text = std::fs::read_to_string(&path).expect("example");
        // An example may hold other objects beside its app (an autoscaler).
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
        let doc = docs.into_iter().find(|d| d["kind"] == "LoadBalancedApp");
        let doc = doc.unwrap_or_else(|| panic!("{}: no LoadBalancedApp", path.display()));
        let mut app: LoadBalancedApp =
            serde_json::from_value(doc).unwrap_or_else(|e| panic!("{}: not a LoadBalancedApp: {e}", path.display()));
        // Typed round trip: the defaults, as the API server applies them.
        let object = serde_json::to_value(&app).expect("json");
        Validator::new()
            .validate(&schema(), &object, None)
            .unwrap_or_else(|e| panic!("{}: refused by the CEL rules: {e:?}", path.display()));
        app.metadata.namespace = Some("default".into());
        app.metadata.uid = Some("00000000-0000-4000-8000-000000000001".into());
        let settings = fulcrum::operator::desired::Settings { proxy_image: "fulcrum:test".into() };
        fulcrum::operator::desired::desired(&app, &settings)
            .unwrap_or_else(|e| panic!("{}: the operator cannot reconcile it: {e}", path.display()));
        seen += 1;
    }
    assert!(seen >= 5, "expected the examples in manifests/examples, found {seen}");
}

#[test]
fn fulcrum_render_prints_the_operators_objects_or_exits_2_with_one_line() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["render", "-n", "shop", "-f", "manifests/examples/canary.yaml"])
        .output()
        .expect("run fulcrum render");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let objects: Vec<Value> = text
        .split("---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_saphyr::from_str(d).expect("a YAML object"))
        .collect();
    let names: Vec<String> = objects
        .iter()
        .map(|o| format!("{}/{}", o["kind"].as_str().unwrap_or(""), o["metadata"]["name"].as_str().unwrap_or("")))
        .collect();
    for expected in [
        "Deployment/checkout",
        "Deployment/checkout-canary",
        "Service/checkout-canary-backends",
        "ConfigMap/checkout-proxy",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
    assert!(objects.iter().all(|o| o["metadata"]["namespace"] == "shop"));

    let bad = std::env::temp_dir().join(format!("fulcrum-render-{}.yaml", std::process::id()));
    std::fs::write(
        &bad,
        "apiVersion: fulcrum.dev/v1alpha1\nkind: LoadBalancedApp\nmetadata: {name: x}\nspec: {port: 8080}\n",
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["render", "-f"])
        .arg(&bad)
        .output()
        .expect("run");
    let _ = std::fs::remove_file(&bad);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("template"), "names the missing field: {err}");
}
