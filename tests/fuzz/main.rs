//! Fuzzing on the stable toolchain: proptest drives every parser and
//! renderer that reads what a user or the cluster wrote, with inputs from
//! random bytes to near-valid documents, and checks that each answers with a
//! value or an error and never panics, and that what it accepts round-trips.
//!
//! `make test` runs each target for proptest's default 256 cases; `make fuzz`
//! runs them far longer (`PROPTEST_CASES`). A crash found becomes a case in
//! `regressions` below.

#[allow(dead_code)]
#[path = "../proxy/grpc_peer.rs"]
mod grpc_peer;
mod h1;
mod h2conn;
mod hpack;

use std::net::SocketAddr;

use fulcrum::api::{LoadBalancedApp, LoadBalancedAppSpec};
use fulcrum::balance::AffinityToken;
use fulcrum::discovery::kubernetes::{Watched, targets};
use fulcrum::operator::desired::{Settings, desired};
use fulcrum::operator::render::proxy_config;
use fulcrum::proxy::config::{Cidr, ConfigError, ProxyConfig};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use proptest::prelude::*;
use serde_json::{Value, json};

/// Scalars of every YAML and JSON type, biased towards the edges.
fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        prop_oneof![Just(0i64), Just(-1), Just(i64::MAX), Just(i64::MIN), Just(65536), any::<i64>()]
            .prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        prop_oneof![
            Just("0s".to_owned()),
            Just("1000000000h".to_owned()),
            Just("500ms".to_owned()),
            Just("127.0.0.2:8080".to_owned()),
            Just("[::1]:0".to_owned()),
            Just("10.0.0.0/99".to_owned()),
            Just("HTTP".to_owned()),
            Just("GRPC".to_owned()),
            Just("ConsistentHash".to_owned()),
            "\\PC{0,24}",
        ]
        .prop_map(Value::from),
    ]
}

/// A JSON value of bounded depth.
fn value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-zA-Z]{1,12}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const CONFIG_KEYS: [&str; 24] = [
    "listen",
    "protocol",
    "appProtocol",
    "admin",
    "workers",
    "loadBalancing.algorithm",
    "loadBalancing.hashOn",
    "loadBalancing.sessionAffinity",
    "loadBalancing.slowStart",
    "loadBalancing.tracks",
    "loadBalancing.maglevTableSize",
    "endpoints",
    "healthCheck.active",
    "healthCheck.passive",
    "retries.attempts",
    "timeouts.idle",
    "timeouts.header",
    "timeouts.request",
    "forwarding.trustedProxies",
    "limits.maxConnections",
    "limits.maxRequestHeaderBytes",
    "circuitBreakers.maxRequests",
    "circuitBreakers.maxConnections",
    "circuitBreakers.maxPendingRequests",
];

/// A near-valid configuration: a valid base with some fields set to anything.
fn config_doc() -> impl Strategy<Value = Value> {
    prop::collection::vec((prop::sample::select(&CONFIG_KEYS[..]), value()), 0..6).prop_map(|changes| {
        let mut doc = json!({"listen": "127.0.0.1:0", "endpoints": [{"address": "127.0.0.2:80"}]});
        for (key, v) in changes {
            set(&mut doc, key, v);
        }
        doc
    })
}

fn set(doc: &mut Value, dotted: &str, v: Value) {
    let mut at = doc;
    let parts: Vec<&str> = dotted.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        if !at.get(*p).is_some_and(Value::is_object) {
            at[*p] = json!({});
        }
        at = &mut at[*p];
    }
    at[parts[parts.len() - 1]] = v;
}

/// Every error the configuration parser returns is one line.
fn check_config_result(r: Result<ProxyConfig, ConfigError>) -> Result<(), TestCaseError> {
    match r {
        Ok(config) => {
            // What is accepted round-trips through its YAML form.
            let again = ProxyConfig::parse(&config.to_yaml());
            prop_assert_eq!(again.as_ref().ok(), Some(&config), "round trip: {:?}", again);
        }
        Err(e) => {
            let text = e.to_string();
            prop_assert!(!text.is_empty() && !text.contains('\n'), "not one line: {text:?}");
        }
    }
    Ok(())
}

fn spec_doc() -> impl Strategy<Value = Value> {
    const SPEC_KEYS: [&str; 16] = [
        "replicas",
        "port",
        "protocol",
        "appProtocol",
        "loadBalancing.algorithm",
        "loadBalancing.hashOn",
        "loadBalancing.sessionAffinity",
        "canary",
        "healthCheck.active",
        "timeouts.idle",
        "timeouts.header",
        "forwarding.trustedProxies",
        "limits.maxConnections",
        "proxy.mode",
        "healing.unreadyTimeout",
        "availability.minAvailable",
    ];
    prop::collection::vec((prop::sample::select(&SPEC_KEYS[..]), value()), 0..5).prop_map(|changes| {
        let mut spec = json!({"port": 8080, "template": {"spec": {"containers": [{"name": "app", "image": "app:1"}]}}});
        for (key, v) in changes {
            set(&mut spec, key, v);
        }
        spec
    })
}

fn slice_doc() -> impl Strategy<Value = Value> {
    let endpoint = (
        prop::collection::vec(prop_oneof![Just("10.0.0.1".to_owned()), Just("::1".to_owned()), "\\PC{0,16}"], 0..3),
        prop::option::of(any::<bool>()),
        prop::option::of(any::<bool>()),
        prop::option::of(any::<bool>()),
        prop::option::of("[a-z]{0,8}"),
    )
        .prop_map(|(addresses, ready, serving, terminating, zone)| {
            json!({"addresses": addresses, "conditions": {"ready": ready, "serving": serving, "terminating": terminating}, "zone": zone})
        });
    (
        prop::collection::vec(endpoint, 0..5),
        prop::collection::vec((prop::option::of(any::<i32>()), prop::option::of("[a-z]{0,6}")), 0..3),
        prop_oneof![Just("web-backends"), Just("web-canary-backends"), Just("other")],
        prop_oneof![Just("IPv4"), Just("IPv6"), Just("FQDN")],
    )
        .prop_map(|(endpoints, ports, service, family)| {
            let ports: Vec<Value> = ports.into_iter().map(|(port, name)| json!({"port": port, "name": name})).collect();
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "s", "namespace": "shop", "labels": {"kubernetes.io/service-name": service}},
                "addressType": family, "endpoints": endpoints, "ports": ports,
            })
        })
}

proptest! {
    #[test]
    fn the_config_parser_takes_any_text(text in "\\PC{0,200}") {
        check_config_result(ProxyConfig::parse(&text))?;
    }

    #[test]
    fn the_config_parser_takes_any_near_valid_document(doc in config_doc()) {
        let yaml = serde_json::to_string(&doc).expect("JSON is YAML");
        check_config_result(ProxyConfig::parse(&yaml))?;
    }

    #[test]
    fn the_crd_renderer_takes_any_spec_the_types_admit(spec in spec_doc()) {
        let Ok(spec) = serde_json::from_value::<LoadBalancedAppSpec>(spec) else { return Ok(()) };
        if let Ok(config) = proxy_config(&spec, spec.canary.as_ref().map(|c| c.weight)) {
            prop_assert!(config.validate().is_ok(), "rendered an invalid configuration");
        }
        let mut app = LoadBalancedApp::new("web", spec);
        app.metadata.namespace = Some("shop".into());
        app.metadata.uid = Some("uid-1".into());
        let _ = desired(&app, &Settings { proxy_image: "fulcrum:fuzz".into() });
    }

    #[test]
    fn the_endpointslice_view_takes_any_slice(docs in prop::collection::vec(slice_doc(), 0..4), split in any::<bool>()) {
        let slices: Vec<EndpointSlice> = docs.into_iter().filter_map(|d| serde_json::from_value(d).ok()).collect();
        let watched = Watched::for_app("shop", "web", SocketAddr::from(([0, 0, 0, 0], 15080)), SocketAddr::from(([0, 0, 0, 0], 15090)));
        for t in targets(&slices, &watched, split) {
            prop_assert!(t.spec.addr.port() != 0, "an endpoint without a port: {t:?}");
        }
    }

    #[test]
    fn tokens_and_address_ranges_parse_or_refuse(text in "\\PC{0,40}") {
        if let Ok(token) = text.parse::<AffinityToken>() {
            prop_assert_eq!(token.to_string().parse::<AffinityToken>().ok(), Some(token));
        }
        let _ = text.parse::<Cidr>();
    }
}

/// Inputs that once crashed a target, kept as fixed cases.
mod regressions {
    use super::*;

    #[test]
    fn near_valid_documents_found_by_fuzzing() {
        for yaml in [
            // A duration too long for the clock.
            "listen: 127.0.0.1:0\ntimeouts: {request: 100000000000h}\n",
            // A Maglev table of four billion entries.
            "listen: 127.0.0.1:0\nloadBalancing: {maglevTableSize: 4294967291}\n",
            // An idle timeout of zero.
            "listen: 127.0.0.1:0\ntimeouts: {idle: 0s}\n",
        ] {
            let r = ProxyConfig::parse(yaml);
            assert!(r.is_err(), "{yaml}");
        }
    }
}
