//! The Kubernetes discovery source: its state machine exactly (no I/O), then
//! the real watches against the in-memory API server, in front of a real
//! proxy and real backends.

#[path = "../support/apiserver/mod.rs"]
mod apiserver;
#[allow(dead_code)]
#[path = "../proxy/support.rs"]
mod support;

mod source;
mod view;

use std::net::SocketAddr;

use fulcrum::discovery::kubernetes::Watched;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};

/// One endpoint of a slice: address and its `ready`, `serving`, `terminating` conditions.
pub type Ep<'a> = (&'a str, Option<bool>, Option<bool>, Option<bool>);

pub fn ready(ip: &str) -> Ep<'_> {
    (ip, Some(true), Some(true), Some(false))
}

pub fn unready(ip: &str) -> Ep<'_> {
    (ip, Some(false), Some(false), Some(false))
}

pub fn terminating(ip: &str) -> Ep<'_> {
    (ip, Some(false), Some(true), Some(true))
}

pub fn slice_json(name: &str, service: &str, port: u16, eps: &[Ep<'_>]) -> Value {
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|(ip, r, s, t)| {
            let mut conditions = serde_json::Map::new();
            for (k, v) in [("ready", r), ("serving", s), ("terminating", t)] {
                if let Some(v) = v {
                    conditions.insert(k.into(), json!(v));
                }
            }
            json!({"addresses": [ip], "conditions": conditions, "targetRef": {"kind": "Pod", "name": format!("pod-{ip}")}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "app", "port": port, "protocol": "TCP"}],
    })
}

pub fn slice(name: &str, service: &str, port: u16, eps: &[Ep<'_>]) -> EndpointSlice {
    serde_json::from_value(slice_json(name, service, port, eps)).expect("slice")
}

pub fn config_map(yaml: &str) -> ConfigMap {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "web-proxy", "namespace": "default"},
        "data": {"proxy.yaml": yaml},
    }))
    .expect("config map")
}

pub fn watched(listen: SocketAddr, admin: SocketAddr) -> Watched {
    Watched::for_app("default", "web", listen, admin)
}

pub const ROUND_ROBIN: &str =
    "listen: 0.0.0.0:15080\nadmin: 0.0.0.0:15090\nworkers: 1\nloadBalancing: {algorithm: RoundRobin}\n";
pub const CANARY_10: &str = "listen: 0.0.0.0:15080\nadmin: 0.0.0.0:15090\nworkers: 1\nloadBalancing: {algorithm: RoundRobin, tracks: {stable: 90, canary: 10}}\n";
