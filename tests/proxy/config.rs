//! The configuration format: the documented example, defaults, and one
//! test per rule, each checking that the error names the field.

use std::time::Duration;

use fulcrum::balance::Algorithm;
use fulcrum::proxy::config::{ConfigError, Probe, Protocol, ProxyConfig};

const DOCUMENTED: &str = r#"
listen: 127.0.0.1:8080
protocol: HTTP
admin: 127.0.0.1:9901
loadBalancing:
  algorithm: ConsistentHash
  hashOn: {header: x-user-id}
  sessionAffinity: {cookie: FULCRUM_AFFINITY, ttl: 1h}
  slowStart: 30s
  panicThresholdPercent: 50
  tracks: {stable: 90, canary: 10}
endpoints:
  - {address: 127.0.0.2:8081, weight: 1, track: stable}
  - {address: 127.0.0.3:8081, weight: 2, track: canary}
healthCheck:
  active: {http: {path: /healthz}, interval: 2s, timeout: 1s, healthyThreshold: 2, unhealthyThreshold: 2}
  passive: {consecutiveFailures: 5, baseEjectionTime: 30s, maxEjectionPercent: 50}
retries: {attempts: 2, budgetPercent: 20}
timeouts: {connect: 1s, request: 30s, idle: 60s}
"#;

#[test]
fn the_documented_example_parses() {
    let c = ProxyConfig::parse(DOCUMENTED).unwrap();
    assert_eq!(c.load_balancing.algorithm, Algorithm::ConsistentHash);
    assert_eq!(c.load_balancing.slow_start.unwrap().0, Duration::from_secs(30));
    assert_eq!(c.endpoints[1].weight, 2);
    assert_eq!(c.endpoints[1].track, "canary");
    assert_eq!(c.probe().unwrap(), Some(Probe::Http("/healthz".parse().unwrap())));
    assert_eq!(c.timeouts.idle.0, Duration::from_secs(60));
    let b = c.balancer_config();
    assert_eq!(b.tracks, vec![("canary".to_owned(), 10), ("stable".to_owned(), 90)]);
}

#[test]
fn only_listen_is_required_and_the_defaults_are_sensible() {
    let c = ProxyConfig::parse("listen: 0.0.0.0:8080\n").unwrap();
    assert_eq!(c.protocol, Protocol::Http);
    assert_eq!(c.admin, None);
    assert_eq!(c.load_balancing.algorithm, Algorithm::RoundRobin);
    assert_eq!(c.load_balancing.panic_threshold_percent, 50);
    assert!(c.health_check.active.is_none());
    assert_eq!(c.health_check.passive.consecutive_failures, 5);
    assert_eq!((c.retries.attempts, c.retries.budget_percent), (2, 20));
    assert_eq!(c.timeouts.connect.0, Duration::from_secs(1));
    assert_eq!(c.timeouts.request.0, Duration::from_secs(30));
    assert_eq!(c.timeouts.drain.0, Duration::from_secs(25));
    assert!(c.endpoints.is_empty());
}

#[test]
fn the_yaml_form_parses_back_to_the_same_configuration() {
    let c = ProxyConfig::parse(DOCUMENTED).unwrap();
    assert_eq!(ProxyConfig::parse(&c.to_yaml()).unwrap(), c);
}

fn error_of(yaml: &str) -> String {
    let text = format!("listen: 127.0.0.1:8080\n{yaml}");
    match ProxyConfig::parse(&text) {
        Ok(_) => panic!("accepted: {yaml}"),
        Err(e) => {
            let s = e.to_string();
            assert_eq!(s.lines().count(), 1, "one line: {s}");
            s
        }
    }
}

#[test]
fn every_rule_names_the_field_it_guards() {
    let cases = [
        ("bogus: 1", "bogus"),
        ("protocol: UDP", "protocol"),
        ("loadBalancing: {algorithm: Fastest}", "loadBalancing.algorithm"),
        ("loadBalancing: {algorithm: ConsistentHash}", "loadBalancing.hashOn"),
        ("loadBalancing: {algorithm: RoundRobin, hashOn: {sourceIP: true}}", "loadBalancing.hashOn"),
        ("loadBalancing: {algorithm: ConsistentHash, hashOn: {sourceIP: true, header: x}}", "loadBalancing.hashOn"),
        ("loadBalancing: {algorithm: ConsistentHash, hashOn: {header: \"bad header\"}}", "loadBalancing.hashOn.header"),
        ("loadBalancing: {algorithm: ConsistentHash, hashOn: {cookie: \"a;b\"}}", "loadBalancing.hashOn.cookie"),
        ("loadBalancing: {sessionAffinity: {cookie: \"\"}}", "loadBalancing.sessionAffinity.cookie"),
        ("loadBalancing: {sessionAffinity: {ttl: 0s}}", "loadBalancing.sessionAffinity.ttl"),
        ("protocol: TCP\nloadBalancing: {sessionAffinity: {}}", "loadBalancing.sessionAffinity"),
        ("loadBalancing: {slowStart: 0s}", "loadBalancing.slowStart"),
        ("loadBalancing: {slowStart: fast}", "loadBalancing.slowStart"),
        ("loadBalancing: {panicThresholdPercent: 101}", "loadBalancing.panicThresholdPercent"),
        ("loadBalancing: {panicThresholdPercent: 300}", "loadBalancing.panicThresholdPercent"),
        ("loadBalancing: {tracks: {stable: 0}}", "loadBalancing.tracks"),
        ("loadBalancing: {maglevTableSize: 100}", "loadBalancing.maglevTableSize"),
        ("endpoints: [{address: nowhere}]", "endpoints[0].address"),
        ("endpoints: [{address: 127.0.0.2:80}, {address: 127.0.0.2:80}]", "endpoints[1].address"),
        ("endpoints: [{address: 127.0.0.2:0}]", "endpoints[0].address"),
        ("endpoints: [{address: 127.0.0.2:80, track: \"\"}]", "endpoints[0].track"),
        ("endpoints: [{address: 127.0.0.2:80, wieght: 2}]", "endpoints[0].wieght"),
        ("healthCheck: {active: {}}", "healthCheck.active"),
        ("healthCheck: {active: {http: {}, tcp: {}}}", "healthCheck.active"),
        ("healthCheck: {active: {http: {path: healthz}}}", "healthCheck.active.http.path"),
        ("healthCheck: {active: {tcp: {}, interval: 1ms}}", "healthCheck.active.interval"),
        ("healthCheck: {active: {tcp: {}, timeout: 0s}}", "healthCheck.active.timeout"),
        ("healthCheck: {active: {tcp: {}, healthyThreshold: 0}}", "healthCheck.active.healthyThreshold"),
        ("healthCheck: {active: {tcp: {}, unhealthyThreshold: 0}}", "healthCheck.active.unhealthyThreshold"),
        ("healthCheck: {passive: {maxEjectionPercent: 120}}", "healthCheck.passive.maxEjectionPercent"),
        ("healthCheck: {passive: {baseEjectionTime: 0s}}", "healthCheck.passive.baseEjectionTime"),
        ("healthCheck: {passive: {baseEjectionTime: 10m}}", "healthCheck.passive.maxEjectionTime"),
        ("retries: {attempts: 9}", "retries.attempts"),
        ("retries: {budgetPercent: 101}", "retries.budgetPercent"),
        ("timeouts: {connect: 0s}", "timeouts.connect"),
        ("timeouts: {request: 0s}", "timeouts.request"),
        ("timeouts: {idle: 0s}", "timeouts.idle"),
        ("timeouts: {request: 100000000h}", "timeouts.request"),
        ("timeouts: {header: 0s}", "timeouts.header"),
        ("timeouts: {header: 1h}", "timeouts.header"),
        ("timeouts: {bodyIdle: 0s}", "timeouts.bodyIdle"),
        ("timeouts: {tunnelIdle: 0s}", "timeouts.tunnelIdle"),
        ("timeouts: {drain: 2h}", "timeouts.drain"),
        ("appProtocol: HTTP3", "appProtocol"),
        ("protocol: TCP\nappProtocol: GRPC", "appProtocol"),
        ("healthCheck: {active: {grpc: {}}}", "healthCheck.active.grpc"),
        ("forwarding: {trustedProxies: [10.0.0.0/40]}", "forwarding.trustedProxies[0]"),
        ("limits: {maxConnections: 0}", "limits.maxConnections"),
        ("limits: {maxRequestHeaderBytes: 100}", "limits.maxRequestHeaderBytes"),
        ("limits: {maxRequestHeaders: 0}", "limits.maxRequestHeaders"),
        ("limits: {maxConcurrentStreams: 0}", "limits.maxConcurrentStreams"),
        ("circuitBreakers: {maxRequests: 0}", "circuitBreakers.maxRequests"),
        ("circuitBreakers: {maxConnections: 0}", "circuitBreakers.maxConnections"),
        ("circuitBreakers: {maxPendingRequests: 1000001}", "circuitBreakers.maxPendingRequests"),
        ("loadBalancing: {maglevTableSize: 4294967291}", "loadBalancing.maglevTableSize"),
        ("admin: 127.0.0.1:8080", "admin"),
        ("workers: 0", "workers"),
        ("workers: 1000", "workers"),
    ];
    for (yaml, field) in cases {
        let e = error_of(yaml);
        assert!(e.starts_with(&format!("{field}:")), "{yaml}: expected the error to start with {field}: {e}");
    }
}

#[test]
fn invalid_yaml_and_a_missing_listen_are_reported() {
    assert!(matches!(ProxyConfig::parse("listen: [\n"), Err(ConfigError::Parse(_))));
    let e = ProxyConfig::parse("protocol: HTTP\n").unwrap_err().to_string();
    assert!(e.contains("listen"), "{e}");
}
