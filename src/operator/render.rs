//! The proxy configuration a `LoadBalancedApp` asks for: the same format as
//! the standalone file, without endpoints (the proxy discovers them).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::api::{self, LoadBalancedAppSpec};
use crate::proxy::config::{
    self as pc, ActiveCheck, ConfigError, Dur, HttpCheck, PassiveCheck, ProxyConfig, Retries, SessionAffinity,
    TcpCheck, Timeouts,
};

/// Port of the proxy's client listener in every proxy container.
pub const PROXY_PORT: u16 = 15080;
/// Port of the proxy's admin listener (probes, metrics).
pub const ADMIN_PORT: u16 = 15090;

/// A spec the schema admitted but that cannot be turned into a working
/// proxy configuration; it becomes a `Degraded` condition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSpec(pub String);

impl From<ConfigError> for InvalidSpec {
    fn from(e: ConfigError) -> Self {
        InvalidSpec(format!("the proxy configuration rendered from the spec is invalid: {e}"))
    }
}

fn duration(field: &str, value: &str) -> Result<Dur, InvalidSpec> {
    humantime::parse_duration(value)
        .map(Dur)
        .map_err(|e| InvalidSpec(format!("spec.{field}: {value:?} is not a duration ({e})")))
}

fn count(field: &str, v: i32) -> Result<u32, InvalidSpec> {
    u32::try_from(v).map_err(|_| InvalidSpec(format!("spec.{field}: {v} is negative")))
}

/// Renders the proxy configuration for `spec`, with the canary track at
/// `canary_weight` percent of the traffic when a canary runs.
pub fn proxy_config(spec: &LoadBalancedAppSpec, canary_weight: Option<i32>) -> Result<ProxyConfig, InvalidSpec> {
    let lb = &spec.load_balancing;
    let algorithm = match lb.algorithm {
        api::Algorithm::RoundRobin => crate::balance::Algorithm::RoundRobin,
        api::Algorithm::WeightedRoundRobin => crate::balance::Algorithm::WeightedRoundRobin,
        api::Algorithm::Random => crate::balance::Algorithm::Random,
        api::Algorithm::LeastConnections => crate::balance::Algorithm::LeastConnections,
        api::Algorithm::LeastRequest => crate::balance::Algorithm::LeastRequest,
        api::Algorithm::PeakEwma => crate::balance::Algorithm::PeakEwma,
        api::Algorithm::ConsistentHash => crate::balance::Algorithm::ConsistentHash,
    };
    let tracks: BTreeMap<String, u32> = match canary_weight {
        Some(w) => {
            let weight = count("canary.weight", w)?.min(100);
            [("stable".to_owned(), 100 - weight), ("canary".to_owned(), weight)].into()
        }
        None => BTreeMap::new(),
    };
    let hc = &spec.health_check;
    let active = match &hc.active {
        Some(a) => Some(ActiveCheck {
            http: a.http.as_ref().map(|h| HttpCheck { path: h.path.clone() }),
            tcp: a.tcp.as_ref().map(|_| TcpCheck {}),
            grpc: a.grpc.as_ref().map(|g| pc::GrpcCheck { service: g.service.clone() }),
            interval: duration("healthCheck.active.interval", &a.interval)?,
            timeout: duration("healthCheck.active.timeout", &a.timeout)?,
            healthy_threshold: count("healthCheck.active.healthyThreshold", a.healthy_threshold)?,
            unhealthy_threshold: count("healthCheck.active.unhealthyThreshold", a.unhealthy_threshold)?,
        }),
        None => None,
    };
    let base_ejection = duration("healthCheck.passive.baseEjectionTime", &hc.passive.base_ejection_time)?;
    let config = ProxyConfig {
        listen: SocketAddr::from(([0, 0, 0, 0], PROXY_PORT)),
        protocol: match spec.protocol {
            api::Protocol::Http => pc::Protocol::Http,
            api::Protocol::Tcp => pc::Protocol::Tcp,
        },
        app_protocol: match spec.app_protocol {
            api::AppProtocol::Http1 => pc::AppProtocol::Http1,
            api::AppProtocol::H2c => pc::AppProtocol::H2c,
            api::AppProtocol::Grpc => pc::AppProtocol::Grpc,
        },
        admin: Some(SocketAddr::from(([0, 0, 0, 0], ADMIN_PORT))),
        workers: None,
        load_balancing: pc::LoadBalancing {
            algorithm,
            hash_on: lb.hash_on.as_ref().map(|h| pc::HashOn {
                source_ip: h.source_ip.unwrap_or(false),
                header: h.header.clone(),
                cookie: h.cookie.clone(),
                client_certificate: h.client_certificate.unwrap_or(false),
            }),
            session_affinity: match &lb.session_affinity {
                Some(a) => Some(SessionAffinity {
                    cookie: a.cookie.clone(),
                    ttl: duration("loadBalancing.sessionAffinity.ttl", &a.ttl)?,
                }),
                None => None,
            },
            slow_start: match &lb.slow_start {
                Some(s) => Some(duration("loadBalancing.slowStart", s)?),
                None => None,
            },
            panic_threshold_percent: u8::try_from(lb.panic_threshold_percent.clamp(0, 100)).unwrap_or(50),
            tracks,
            maglev_table_size: crate::balance::DEFAULT_TABLE_SIZE,
            zone_aware: lb.zone_aware.as_ref().map(|z| pc::ZoneAware {
                zone: None,
                min_healthy_percent: u8::try_from(z.min_healthy_percent.clamp(1, 100)).unwrap_or(70),
                proxies: std::collections::BTreeMap::new(),
            }),
        },
        endpoints: Vec::new(),
        health_check: pc::HealthCheck {
            active,
            passive: PassiveCheck {
                consecutive_failures: count(
                    "healthCheck.passive.consecutiveFailures",
                    hc.passive.consecutive_failures,
                )?,
                base_ejection_time: base_ejection,
                max_ejection_time: Dur(base_ejection.0.max(std::time::Duration::from_secs(300))),
                max_ejection_percent: u8::try_from(hc.passive.max_ejection_percent.clamp(0, 100)).unwrap_or(50),
            },
        },
        retries: Retries {
            attempts: count("retries.attempts", spec.retries.attempts)?,
            budget_percent: count("retries.budgetPercent", spec.retries.budget_percent)?,
        },
        timeouts: Timeouts {
            connect: duration("timeouts.connect", &spec.timeouts.connect)?,
            request: duration("timeouts.request", &spec.timeouts.request)?,
            idle: duration("timeouts.idle", &spec.timeouts.idle)?,
            tunnel_idle: duration("timeouts.tunnelIdle", &spec.timeouts.tunnel_idle)?,
            header: duration("timeouts.header", &spec.timeouts.header)?,
            body_idle: duration("timeouts.bodyIdle", &spec.timeouts.body_idle)?,
            ..Timeouts::default()
        },
        forwarding: pc::Forwarding { trusted_proxies: spec.forwarding.trusted_proxies.clone() },
        limits: pc::Limits {
            max_connections: count("limits.maxConnections", spec.limits.max_connections)?,
            max_request_header_bytes: count("limits.maxRequestHeaderBytes", spec.limits.max_request_header_bytes)?,
            max_request_headers: count("limits.maxRequestHeaders", spec.limits.max_request_headers)?,
            max_concurrent_streams: count("limits.maxConcurrentStreams", spec.limits.max_concurrent_streams)?,
        },
        circuit_breakers: pc::CircuitBreakers {
            max_requests: count("circuitBreakers.maxRequests", spec.circuit_breakers.max_requests)?,
            max_connections: count("circuitBreakers.maxConnections", spec.circuit_breakers.max_connections)?,
            max_pending_requests: count(
                "circuitBreakers.maxPendingRequests",
                spec.circuit_breakers.max_pending_requests,
            )?,
        },
        tls: spec.tls.as_ref().map(|t| {
            let dir = super::desired::TLS_DIR;
            let count = 1 + t.sni_secret_names.len();
            pc::Tls {
                certificates: (0..count)
                    .map(|i| pc::CertificateFiles {
                        cert_file: format!("{dir}/{i}/tls.crt").into(),
                        key_file: format!("{dir}/{i}/tls.key").into(),
                    })
                    .collect(),
                min_version: match t.min_version {
                    api::TlsVersion::V1_2 => pc::TlsVersion::V1_2,
                    api::TlsVersion::V1_3 => pc::TlsVersion::V1_3,
                },
                client_auth: t.client_auth.as_ref().map(|c| pc::ClientAuth {
                    ca_file: format!("{dir}/client-ca/ca.crt").into(),
                    required: c.required,
                }),
            }
        }),
        endpoint_tls: spec.endpoint_tls.as_ref().map(|e| {
            let dir = super::desired::ENDPOINT_TLS_DIR;
            let client = e.client_certificate_secret_name.is_some();
            pc::EndpointTls {
                ca_file: (e.ca_config_map_name.is_some() || e.ca_secret_name.is_some())
                    .then(|| format!("{dir}/ca/ca.crt").into()),
                server_name: e.server_name.clone(),
                cert_file: client.then(|| format!("{dir}/client/tls.crt").into()),
                key_file: client.then(|| format!("{dir}/client/tls.key").into()),
                insecure_skip_verify: e.insecure_skip_verify.unwrap_or(false),
            }
        }),
    };
    config.validate()?;
    Ok(config)
}
