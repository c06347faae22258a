//! The proxy's configuration file: one YAML format for the standalone file and
//! the ConfigMap the operator renders, in the vocabulary of the custom resource.
//!
//! Parsing is strict (unknown keys are errors) and [`ProxyConfig::validate`]
//! checks every cross-field rule, so a running proxy only ever applies a
//! configuration that can work. Every error is one line that starts with the
//! path of the offending field.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::balance::{Algorithm, BalancerConfig, DEFAULT_TABLE_SIZE, DEFAULT_TRACK, EndpointSpec, OutlierConfig};

/// Most retries a request may make; each one holds the client's request open.
pub const MAX_RETRY_ATTEMPTS: u32 = 5;

/// Most worker threads.
pub const MAX_WORKERS: u16 = 256;

/// Largest Maglev table (a prime; 8 bytes an entry per worker).
pub const MAX_MAGLEV_TABLE: u64 = 1_000_003;

/// The whole proxy configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyConfig {
    /// Address the client listener binds.
    pub listen: SocketAddr,
    /// HTTP (per-request balancing) or TCP (per-connection).
    #[serde(default)]
    pub protocol: Protocol,
    /// What the endpoints speak, in HTTP mode: HTTP/1.1, HTTP/2 cleartext or gRPC.
    /// Clients speak HTTP/1.1 or h2c to the proxy whatever this says.
    #[serde(default, skip_serializing_if = "AppProtocol::is_default")]
    pub app_protocol: AppProtocol,
    /// Address of the admin listener (/metrics, /healthz, /readyz, /endpoints). None: no admin listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<SocketAddr>,
    /// Worker threads serving clients, each with its own listener socket
    /// (SO_REUSEPORT), event loop, balancer and connection pools. None: one per CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<u16>,
    /// How endpoints are chosen.
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    /// Backends, when the proxy runs standalone; empty when they are discovered.
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
    /// Active and passive health checking.
    #[serde(default)]
    pub health_check: HealthCheck,
    /// Retries of failed requests on other endpoints.
    #[serde(default)]
    pub retries: Retries,
    /// Connection and request time limits.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Which clients' forwarding headers (`X-Forwarded-For`, `X-Forwarded-Proto`) are believed.
    #[serde(default, skip_serializing_if = "Forwarding::is_default")]
    pub forwarding: Forwarding,
    /// Caps on what clients can make the proxy hold.
    #[serde(default)]
    pub limits: Limits,
    /// Caps per endpoint, beyond which requests fail fast instead of piling up.
    #[serde(default)]
    pub circuit_breakers: CircuitBreakers,
    /// TLS termination at the listener (HTTP modes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    /// TLS to the endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_tls: Option<EndpointTls>,
}

/// TLS termination: the certificates, the versions, and optionally the
/// verification of client certificates. Every file is PEM and is read again
/// when its content changes (a Kubernetes Secret volume update).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tls {
    /// Certificate chains with their keys. The first is the default; another
    /// is chosen when the client's SNI matches one of its DNS names.
    pub certificates: Vec<CertificateFiles>,
    /// The lowest TLS version accepted: `"1.2"` or `"1.3"`.
    #[serde(default)]
    pub min_version: TlsVersion,
    /// Mutual TLS: client certificates verified against a CA bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<ClientAuth>,
}

/// A certificate chain and its private key, as PEM files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificateFiles {
    /// The chain, leaf first (`tls.crt` of a `kubernetes.io/tls` Secret).
    pub cert_file: std::path::PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1; `tls.key`).
    pub key_file: std::path::PathBuf,
}

/// A TLS protocol version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    #[serde(rename = "1.2")]
    V1_2,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    V1_3,
}

/// Verification of client certificates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientAuth {
    /// The CA bundle client certificates must chain to.
    pub ca_file: std::path::PathBuf,
    /// Refuse clients without a certificate (`false`: verify one if sent).
    #[serde(default = "yes")]
    pub required: bool,
}

fn yes() -> bool {
    true
}

/// TLS to the endpoints (and their active health checks).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointTls {
    /// The CA bundle the endpoints' certificates must chain to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
    /// The name sent as SNI and verified in the endpoints' certificates;
    /// unset: the endpoint's IP address, verified against its IP SANs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// A client certificate for mutual TLS, with `keyFile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<std::path::PathBuf>,
    /// The client certificate's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<std::path::PathBuf>,
    /// Accept any certificate from the endpoints: encryption without
    /// authentication, open to anyone who can intercept the traffic.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
}

/// Caps on what clients can make the proxy hold; each bounded (see [`LIMIT_BOUNDS`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Client connections open at once, over all workers; past it the proxy
    /// stops accepting (new connections wait in the kernel's backlog).
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Largest HTTP/1 request head, and HTTP/2 header list, in bytes (`431` beyond).
    #[serde(default = "default_max_header_bytes")]
    pub max_request_header_bytes: u32,
    /// Most header fields in an HTTP/1 request (`431` beyond).
    #[serde(default = "default_max_headers")]
    pub max_request_headers: u32,
    /// Concurrent streams a client may open on one HTTP/2 connection.
    #[serde(default = "default_max_streams")]
    pub max_concurrent_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: default_max_connections(),
            max_request_header_bytes: default_max_header_bytes(),
            max_request_headers: default_max_headers(),
            max_concurrent_streams: default_max_streams(),
        }
    }
}

/// Per-endpoint caps (Envoy's circuit breakers).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreakers {
    /// Requests (or TCP connections) in flight to one endpoint; one more goes
    /// to another endpoint, or fails fast with 503 (gRPC `UNAVAILABLE`).
    #[serde(default = "default_max_requests")]
    pub max_requests: u32,
    /// Connections open to one endpoint over all workers (HTTP modes; in TCP
    /// mode a connection is a request, capped by the smaller of the two). A
    /// request that needs one more waits for one to free up.
    #[serde(default = "default_max_requests")]
    pub max_connections: u32,
    /// Requests waiting for a connection to one endpoint at `maxConnections`;
    /// one more goes to another endpoint, or fails fast like `maxRequests`.
    #[serde(default = "default_max_requests")]
    pub max_pending_requests: u32,
}

impl Default for CircuitBreakers {
    fn default() -> Self {
        CircuitBreakers {
            max_requests: default_max_requests(),
            max_connections: default_max_requests(),
            max_pending_requests: default_max_requests(),
        }
    }
}

fn default_max_connections() -> u32 {
    10_000
}
fn default_max_header_bytes() -> u32 {
    64 * 1024
}
fn default_max_headers() -> u32 {
    100
}
fn default_max_streams() -> u32 {
    128
}
fn default_max_requests() -> u32 {
    1024
}

/// The bounds of each limit: (field, minimum, maximum).
pub const LIMIT_BOUNDS: [(&str, u32, u32); 7] = [
    ("limits.maxConnections", 1, 1_000_000),
    // hyper's HTTP/1 read buffer cannot be smaller than 8 KiB.
    ("limits.maxRequestHeaderBytes", 8192, 1 << 20),
    ("limits.maxRequestHeaders", 1, 1000),
    ("limits.maxConcurrentStreams", 1, 10_000),
    ("circuitBreakers.maxRequests", 1, 1_000_000),
    ("circuitBreakers.maxConnections", 1, 1_000_000),
    // 0: a request never waits for a connection.
    ("circuitBreakers.maxPendingRequests", 0, 1_000_000),
];

/// What the endpoints speak (HTTP mode).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppProtocol {
    /// HTTP/1.1 over pooled keep-alive connections.
    #[default]
    #[serde(rename = "HTTP1")]
    Http1,
    /// HTTP/2 cleartext with prior knowledge: each request is a stream,
    /// multiplexed over few connections per endpoint.
    #[serde(rename = "H2C")]
    H2c,
    /// gRPC: HTTP/2 cleartext, with gRPC's own status codes for the proxy's
    /// answers and for passive health, and gRPC health checks.
    #[serde(rename = "GRPC")]
    Grpc,
}

impl AppProtocol {
    fn is_default(&self) -> bool {
        *self == AppProtocol::Http1
    }

    /// Whether endpoints are reached over HTTP/2.
    pub fn is_http2(self) -> bool {
        matches!(self, AppProtocol::H2c | AppProtocol::Grpc)
    }

    /// The name used in the configuration and the custom resource.
    pub fn name(self) -> &'static str {
        match self {
            AppProtocol::Http1 => "HTTP1",
            AppProtocol::H2c => "H2C",
            AppProtocol::Grpc => "GRPC",
        }
    }
}

/// Trust in the forwarding headers clients send.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Forwarding {
    /// Address ranges (CIDR, or single addresses) of proxies in front of this
    /// one, such as a cloud load balancer that terminates TLS. A connection
    /// from one of them keeps its `X-Forwarded-Proto` and the `X-Forwarded-For`
    /// chain (the proxy's peer is appended), and the client address used for
    /// `sourceIP` hashing is the right-most address of that chain outside these
    /// ranges. Any other client's forwarding headers are replaced with what the
    /// proxy saw. Empty (the default): trust no one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<String>,
}

impl Forwarding {
    fn is_default(&self) -> bool {
        self.trusted_proxies.is_empty()
    }
}

/// What the proxy balances.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    /// HTTP/1.1 and h2c from clients on one port; each request is balanced.
    #[default]
    #[serde(rename = "HTTP")]
    Http,
    /// Raw TCP; each connection is balanced and copied both ways.
    #[serde(rename = "TCP")]
    Tcp,
}

/// Algorithm and its options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancing {
    /// The balancing algorithm.
    #[serde(default, with = "algorithm_name")]
    pub algorithm: Algorithm,
    /// Key for ConsistentHash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<HashOn>,
    /// Sticky sessions through a cookie (HTTP only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<SessionAffinity>,
    /// Ramp-up window for new and recovered endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start: Option<Dur>,
    /// Below this percentage of available endpoints, balance over all of them.
    #[serde(default = "default_panic_threshold")]
    pub panic_threshold_percent: u8,
    /// Traffic split by endpoint track, as relative weights.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tracks: BTreeMap<String, u32>,
    /// Smallest Maglev lookup table (a prime); grown to 100 × endpoints when needed.
    #[serde(default = "default_table_size")]
    pub maglev_table_size: u64,
    /// Zone-aware balancing: prefer the endpoints of the proxy's zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone_aware: Option<ZoneAware>,
}

/// Zone-aware balancing (Envoy's zone-aware routing, Kubernetes'
/// `trafficDistribution: PreferClose`): within each track, the endpoints of
/// the proxy's zone take the traffic while enough of them are available and
/// they are at least as large a share of the available endpoints as the
/// zone's proxies are of all proxies; with a smaller share, the zone takes
/// the part its capacity covers and the rest spills to the zones with
/// capacity to spare. Below `minHealthyPercent`, every zone's endpoints
/// take the traffic alike.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ZoneAware {
    /// The proxy's zone. Unset: `FULCRUM_ZONE` from the environment, or in
    /// Kubernetes the zone the EndpointSlices give the proxy's own pod
    /// (`POD_IP`); when none is known, balancing ignores zones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// The least percentage of the local zone's endpoints that must be
    /// available for the zone to take all the traffic.
    #[serde(default = "default_zone_min_healthy")]
    pub min_healthy_percent: u8,
    /// How many proxies in each zone send traffic to these endpoints, by
    /// zone. Unset: in Kubernetes, the ready endpoints per zone of the
    /// Service in front of the proxies; standalone, unknown, and the local
    /// zone takes all the traffic while it is healthy enough.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub proxies: BTreeMap<String, u32>,
}

fn default_zone_min_healthy() -> u8 {
    70
}

impl Default for LoadBalancing {
    fn default() -> Self {
        LoadBalancing {
            algorithm: Algorithm::default(),
            hash_on: None,
            session_affinity: None,
            slow_start: None,
            panic_threshold_percent: default_panic_threshold(),
            tracks: BTreeMap::new(),
            maglev_table_size: DEFAULT_TABLE_SIZE,
            zone_aware: None,
        }
    }
}

fn default_panic_threshold() -> u8 {
    50
}

fn default_table_size() -> u64 {
    DEFAULT_TABLE_SIZE
}

/// The source of the consistent-hashing key: exactly one of the three.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HashOn {
    /// Hash the client's IP address.
    #[serde(default, rename = "sourceIP", skip_serializing_if = "std::ops::Not::not")]
    pub source_ip: bool,
    /// Hash the value of this request header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// Hash the value of this cookie.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    /// Hash the subject of the client's verified TLS certificate.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub client_certificate: bool,
}

/// Where a consistent-hashing key comes from, once validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKey {
    /// The client's IP address.
    SourceIp,
    /// A request header (lower case).
    Header(http::HeaderName),
    /// A cookie.
    Cookie(String),
    /// The subject of the client's verified certificate.
    ClientCertificate,
}

/// Cookie-based session affinity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionAffinity {
    /// Cookie name.
    #[serde(default = "default_affinity_cookie")]
    pub cookie: String,
    /// Cookie lifetime (Max-Age).
    #[serde(default = "default_affinity_ttl")]
    pub ttl: Dur,
}

fn default_affinity_cookie() -> String {
    "FULCRUM_AFFINITY".to_owned()
}

fn default_affinity_ttl() -> Dur {
    Dur(Duration::from_secs(3600))
}

/// One backend of the standalone proxy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointConfig {
    /// IP address and port.
    pub address: SocketAddr,
    /// Relative weight; 0 takes the endpoint out of rotation.
    #[serde(default = "one")]
    pub weight: u32,
    /// Track (for traffic splits), `stable` unless set.
    #[serde(default = "default_track")]
    pub track: String,
    /// Zone the endpoint runs in (zone-aware balancing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

fn one() -> u32 {
    1
}

fn default_track() -> String {
    DEFAULT_TRACK.to_owned()
}

/// Health checking.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthCheck {
    /// Probes sent to every endpoint. None: no active checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<ActiveCheck>,
    /// Ejection on consecutive failures of real traffic.
    #[serde(default)]
    pub passive: PassiveCheck,
}

/// Active health checks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ActiveCheck {
    /// An HTTP GET that must answer 2xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpCheck>,
    /// A TCP connect that must succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpCheck>,
    /// A `grpc.health.v1.Health/Check` call that must answer `SERVING` (appProtocol GRPC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcCheck>,
    /// Time between probes of one endpoint.
    #[serde(default = "two_seconds")]
    pub interval: Dur,
    /// Time a probe may take.
    #[serde(default = "one_second")]
    pub timeout: Dur,
    /// Consecutive successes that bring a failed endpoint back.
    #[serde(default = "two")]
    pub healthy_threshold: u32,
    /// Consecutive failures that take an endpoint out.
    #[serde(default = "two")]
    pub unhealthy_threshold: u32,
}

/// The HTTP probe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpCheck {
    /// Path requested.
    #[serde(default = "default_health_path")]
    pub path: String,
}

fn default_health_path() -> String {
    "/healthz".to_owned()
}

/// The gRPC probe: the standard health service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcCheck {
    /// The service name asked about; empty (the default) asks about the server as a whole.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service: String,
}

/// The TCP probe (no options).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpCheck {}

/// What kind of probe an active check sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// HTTP GET of a path.
    Http(http::uri::PathAndQuery),
    /// TCP connect.
    Tcp,
    /// `grpc.health.v1.Health/Check` for a service name, over HTTP/2.
    Grpc(String),
}

/// Passive outlier ejection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PassiveCheck {
    /// Consecutive failures (connection errors, 5xx, timeouts) that eject an endpoint; 0 disables.
    #[serde(default = "five")]
    pub consecutive_failures: u32,
    /// First ejection time; doubles with each repeated ejection.
    #[serde(default = "thirty_seconds")]
    pub base_ejection_time: Dur,
    /// Longest ejection time.
    #[serde(default = "five_minutes")]
    pub max_ejection_time: Dur,
    /// Never eject more than this percentage of endpoints.
    #[serde(default = "fifty")]
    pub max_ejection_percent: u8,
}

impl Default for PassiveCheck {
    fn default() -> Self {
        PassiveCheck {
            consecutive_failures: five(),
            base_ejection_time: thirty_seconds(),
            max_ejection_time: five_minutes(),
            max_ejection_percent: fifty(),
        }
    }
}

/// Retries on other endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retries {
    /// How many other endpoints a failed request may try after the first; 0 disables.
    #[serde(default = "two")]
    pub attempts: u32,
    /// Retries may add at most this percentage to the request rate.
    #[serde(default = "twenty")]
    pub budget_percent: u32,
}

impl Default for Retries {
    fn default() -> Self {
        Retries { attempts: two(), budget_percent: twenty() }
    }
}

/// Time limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// Connecting to an endpoint.
    #[serde(default = "one_second")]
    pub connect: Dur,
    /// From sending a request to receiving the response headers.
    #[serde(default = "thirty_seconds")]
    pub request: Dur,
    /// An idle client connection (and a pooled backend connection) is closed after this.
    #[serde(default = "sixty_seconds")]
    pub idle: Dur,
    /// On SIGTERM, how long in-flight work may take to finish.
    #[serde(default = "default_drain")]
    pub drain: Dur,
    /// An upgraded connection (WebSocket) with no byte either way for this long is closed.
    #[serde(default = "one_hour")]
    pub tunnel_idle: Dur,
    /// A new connection's first bytes, and each HTTP/1 request head once its first byte arrived.
    #[serde(default = "ten_seconds")]
    pub header: Dur,
    /// With requests in flight on a client connection, no byte either way for this long closes it.
    #[serde(default = "five_minutes")]
    pub body_idle: Dur,
}

/// The bounds of each timeout: none can be zero where that disables a
/// protection, and none is so long it would overflow a clock.
pub const TIMEOUT_BOUNDS: [(&str, Duration, Duration); 7] = [
    ("connect", Duration::from_millis(10), Duration::from_secs(300)),
    ("request", Duration::from_millis(10), Duration::from_secs(86_400)),
    ("idle", Duration::from_millis(100), Duration::from_secs(86_400)),
    ("drain", Duration::ZERO, Duration::from_secs(3_600)),
    ("tunnelIdle", Duration::from_millis(100), Duration::from_secs(7 * 86_400)),
    ("header", Duration::from_millis(100), Duration::from_secs(300)),
    ("bodyIdle", Duration::from_millis(100), Duration::from_secs(86_400)),
];

impl Timeouts {
    /// Each timeout with its name and (minimum, maximum).
    fn bounded(&self) -> impl Iterator<Item = (&'static str, Dur, (Duration, Duration))> {
        let values = [self.connect, self.request, self.idle, self.drain, self.tunnel_idle, self.header, self.body_idle];
        TIMEOUT_BOUNDS.iter().zip(values).map(|((name, min, max), v)| (*name, v, (*min, *max)))
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: one_second(),
            request: thirty_seconds(),
            idle: sixty_seconds(),
            drain: default_drain(),
            tunnel_idle: one_hour(),
            header: ten_seconds(),
            body_idle: five_minutes(),
        }
    }
}

fn two() -> u32 {
    2
}
fn five() -> u32 {
    5
}
fn twenty() -> u32 {
    20
}
fn fifty() -> u8 {
    50
}
fn one_second() -> Dur {
    Dur(Duration::from_secs(1))
}
fn two_seconds() -> Dur {
    Dur(Duration::from_secs(2))
}
fn ten_seconds() -> Dur {
    Dur(Duration::from_secs(10))
}
fn thirty_seconds() -> Dur {
    Dur(Duration::from_secs(30))
}
fn sixty_seconds() -> Dur {
    Dur(Duration::from_secs(60))
}
fn five_minutes() -> Dur {
    Dur(Duration::from_secs(300))
}
fn one_hour() -> Dur {
    Dur(Duration::from_secs(3600))
}
fn default_drain() -> Dur {
    Dur(Duration::from_secs(25))
}

/// A duration written as `500ms`, `2s`, `1h30m`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(Dur)
            .map_err(|e| serde::de::Error::custom(format_args!("{s:?} is not a duration like 500ms, 2s or 1h ({e})")))
    }
}

mod algorithm_name {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::balance::Algorithm;

    pub fn serialize<S: Serializer>(a: &Algorithm, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(a.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Algorithm, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A configuration that cannot be used, with the path of the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {message}")]
    Read {
        /// File path.
        path: String,
        /// Why.
        message: String,
    },
    /// Not YAML, or not the expected shape (unknown key, wrong type).
    #[error("{0}")]
    Parse(String),
    /// A field's value breaks a rule.
    #[error("{field}: {message}")]
    Invalid {
        /// Path of the field, as written in the file (`loadBalancing.hashOn`).
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

fn invalid(field: impl Into<String>, message: impl fmt::Display) -> ConfigError {
    ConfigError::Invalid { field: field.into(), message: message.to_string() }
}

impl ProxyConfig {
    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read { path: path.display().to_string(), message: e.to_string() })?;
        Self::parse(&text)
    }

    /// Parses and validates YAML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        // YAML first, then the typed shape through serde_path_to_error, so that
        // a wrong type or an unknown key is reported with its field path.
        let value: serde_json::Value = serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse(one_line(&e)))?;
        let config: ProxyConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "." { ConfigError::Parse(inner.to_string()) } else { invalid(path, inner) }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The YAML form of this configuration.
    pub fn to_yaml(&self) -> String {
        // Serializing plain data structures to a String cannot fail.
        serde_saphyr::to_string(self).unwrap_or_default()
    }

    /// Checks every rule that parsing alone does not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let lb = &self.load_balancing;
        self.balancer_config().validate().map_err(|e| {
            let text = e.to_string();
            match text.split_once(": ") {
                Some((field, msg)) => invalid(format!("loadBalancing.{field}"), msg),
                None => invalid("loadBalancing", text),
            }
        })?;
        match (lb.algorithm, &lb.hash_on) {
            (Algorithm::ConsistentHash, None) => {
                return Err(invalid("loadBalancing.hashOn", "ConsistentHash needs a key: sourceIP, header or cookie"));
            }
            (Algorithm::ConsistentHash, Some(_)) => {
                self.hash_key()?;
            }
            (other, Some(_)) => {
                return Err(invalid(
                    "loadBalancing.hashOn",
                    format_args!("only applies to ConsistentHash, not {other}"),
                ));
            }
            (_, None) => {}
        }
        self.validate_tls()?;
        if let Some(aff) = &lb.session_affinity {
            if self.protocol == Protocol::Tcp {
                return Err(invalid(
                    "loadBalancing.sessionAffinity",
                    "needs protocol HTTP (it works through a cookie)",
                ));
            }
            check_token("loadBalancing.sessionAffinity.cookie", &aff.cookie)?;
            if aff.ttl.0.is_zero() {
                return Err(invalid("loadBalancing.sessionAffinity.ttl", "must be longer than zero"));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, e) in self.endpoints.iter().enumerate() {
            if !seen.insert(e.address) {
                return Err(invalid(format!("endpoints[{i}].address"), format_args!("{} is listed twice", e.address)));
            }
            if e.address.port() == 0 {
                return Err(invalid(format!("endpoints[{i}].address"), "port 0 cannot be connected to"));
            }
            if e.track.is_empty() {
                return Err(invalid(format!("endpoints[{i}].track"), "must not be empty"));
            }
        }
        if let Some(active) = &self.health_check.active {
            let f = "healthCheck.active";
            self.probe()?;
            if active.interval.0 < Duration::from_millis(10) {
                return Err(invalid(format!("{f}.interval"), "must be at least 10ms"));
            }
            if active.timeout.0.is_zero() {
                return Err(invalid(format!("{f}.timeout"), "must be longer than zero"));
            }
            if active.healthy_threshold == 0 {
                return Err(invalid(format!("{f}.healthyThreshold"), "must be at least 1"));
            }
            if active.unhealthy_threshold == 0 {
                return Err(invalid(format!("{f}.unhealthyThreshold"), "must be at least 1"));
            }
        }
        let passive = &self.health_check.passive;
        if passive.max_ejection_percent > 100 {
            return Err(invalid("healthCheck.passive.maxEjectionPercent", "must be at most 100"));
        }
        if passive.consecutive_failures > 0 && passive.base_ejection_time.0.is_zero() {
            return Err(invalid("healthCheck.passive.baseEjectionTime", "must be longer than zero"));
        }
        if passive.max_ejection_time < passive.base_ejection_time {
            return Err(invalid("healthCheck.passive.maxEjectionTime", "must not be shorter than baseEjectionTime"));
        }
        if self.workers.is_some_and(|w| w == 0 || w > MAX_WORKERS) {
            return Err(invalid("workers", format_args!("must be between 1 and {MAX_WORKERS}")));
        }
        if self.retries.attempts > MAX_RETRY_ATTEMPTS {
            return Err(invalid("retries.attempts", format_args!("must be at most {MAX_RETRY_ATTEMPTS}")));
        }
        if self.retries.budget_percent > 100 {
            return Err(invalid("retries.budgetPercent", "must be at most 100"));
        }
        if self.protocol == Protocol::Tcp && self.app_protocol != AppProtocol::Http1 {
            return Err(invalid(
                "appProtocol",
                format_args!("{} needs protocol HTTP (TCP mode copies bytes)", self.app_protocol.name()),
            ));
        }
        self.trusted_proxies()?;
        let l = &self.limits;
        let values = [
            l.max_connections,
            l.max_request_header_bytes,
            l.max_request_headers,
            l.max_concurrent_streams,
            self.circuit_breakers.max_requests,
            self.circuit_breakers.max_connections,
            self.circuit_breakers.max_pending_requests,
        ];
        for ((field, min, max), v) in LIMIT_BOUNDS.iter().zip(values) {
            if v < *min || v > *max {
                return Err(invalid(*field, format_args!("must be between {min} and {max}")));
            }
        }
        if let Some(z) = &self.load_balancing.zone_aware
            && !(1..=100).contains(&z.min_healthy_percent)
        {
            return Err(invalid("loadBalancing.zoneAware.minHealthyPercent", "must be between 1 and 100"));
        }
        if self.load_balancing.maglev_table_size > MAX_MAGLEV_TABLE {
            return Err(invalid("loadBalancing.maglevTableSize", format_args!("must be at most {MAX_MAGLEV_TABLE}")));
        }
        for (name, d, (min, max)) in self.timeouts.bounded() {
            if d.0 < min || d.0 > max {
                return Err(invalid(
                    format!("timeouts.{name}"),
                    format_args!(
                        "must be between {} and {}",
                        humantime::format_duration(min),
                        humantime::format_duration(max)
                    ),
                ));
            }
        }
        if let Some(admin) = self.admin
            && admin == self.listen
            && admin.port() != 0
        {
            return Err(invalid("admin", "must differ from listen"));
        }
        Ok(())
    }

    /// Worker threads to run: `workers`, or one per CPU.
    pub fn worker_count(&self) -> usize {
        match self.workers {
            Some(w) => usize::from(w),
            None => std::thread::available_parallelism().map_or(1, |n| n.get()).min(usize::from(MAX_WORKERS)),
        }
    }

    /// The balancing core's settings.
    pub fn balancer_config(&self) -> BalancerConfig {
        let lb = &self.load_balancing;
        BalancerConfig {
            algorithm: lb.algorithm,
            slow_start: lb.slow_start.map(|d| d.0),
            panic_threshold_percent: lb.panic_threshold_percent,
            tracks: lb.tracks.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            maglev_table_size: lb.maglev_table_size,
            // The configured zone, or the environment's (`FULCRUM_ZONE`).
            local_zone: lb
                .zone_aware
                .as_ref()
                .and_then(|z| z.zone.clone().or_else(|| std::env::var("FULCRUM_ZONE").ok()))
                .filter(|z| !z.is_empty())
                .map(std::sync::Arc::from),
            zone_min_healthy_percent: lb.zone_aware.as_ref().map_or(70, |z| z.min_healthy_percent),
            zone_proxies: lb.zone_aware.as_ref().map_or_else(Vec::new, |z| {
                z.proxies.iter().map(|(zone, n)| (std::sync::Arc::from(zone.as_str()), *n)).collect()
            }),
        }
    }

    /// The passive ejection settings.
    pub fn outlier_config(&self) -> OutlierConfig {
        let p = &self.health_check.passive;
        OutlierConfig {
            consecutive_failures: p.consecutive_failures,
            base_ejection: p.base_ejection_time.0,
            max_ejection: p.max_ejection_time.0,
            max_ejection_percent: p.max_ejection_percent,
        }
    }

    /// The configured endpoints as the core's specs.
    pub fn endpoint_specs(&self) -> Vec<EndpointSpec> {
        self.endpoints
            .iter()
            .map(|e| {
                EndpointSpec::new(e.address)
                    .weight(e.weight)
                    .track(&e.track)
                    .zone(e.zone.as_deref().map(std::sync::Arc::from))
            })
            .collect()
    }

    /// The TLS settings that can be checked without reading the files.
    fn validate_tls(&self) -> Result<(), ConfigError> {
        if let Some(tls) = &self.tls {
            if self.protocol == Protocol::Tcp {
                return Err(invalid("tls", "terminates HTTP only; TCP mode passes TLS through to the endpoints"));
            }
            if tls.certificates.is_empty() {
                return Err(invalid("tls.certificates", "needs at least one certificate and key"));
            }
        }
        if let Some(e) = &self.endpoint_tls {
            if e.cert_file.is_some() != e.key_file.is_some() {
                return Err(invalid(
                    "endpointTls",
                    "set certFile and keyFile together (the client certificate and its key)",
                ));
            }
            if e.ca_file.is_none() && !e.insecure_skip_verify {
                return Err(invalid(
                    "endpointTls.caFile",
                    "is required to verify the endpoints (or set insecureSkipVerify: true to accept any certificate)",
                ));
            }
            if let Some(name) = &e.server_name
                && rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
            {
                return Err(invalid(
                    "endpointTls.serverName",
                    format_args!("{name:?} is not a DNS name or IP address"),
                ));
            }
        }
        Ok(())
    }

    /// The consistent-hashing key source, if the algorithm uses one.
    pub fn hash_key(&self) -> Result<Option<HashKey>, ConfigError> {
        let f = "loadBalancing.hashOn";
        let Some(h) = &self.load_balancing.hash_on else { return Ok(None) };
        let given = usize::from(h.source_ip)
            + usize::from(h.header.is_some())
            + usize::from(h.cookie.is_some())
            + usize::from(h.client_certificate);
        if given != 1 {
            return Err(invalid(f, "set exactly one of sourceIP: true, header, cookie or clientCertificate: true"));
        }
        if h.source_ip {
            return Ok(Some(HashKey::SourceIp));
        }
        if h.client_certificate {
            if self.tls.as_ref().is_none_or(|t| t.client_auth.is_none()) {
                return Err(invalid(
                    format!("{f}.clientCertificate"),
                    "needs tls.clientAuth (verified client certificates)",
                ));
            }
            return Ok(Some(HashKey::ClientCertificate));
        }
        if let Some(name) = &h.header {
            let name = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| invalid(format!("{f}.header"), format_args!("{name:?} is not a valid header name")))?;
            return Ok(Some(HashKey::Header(name)));
        }
        let cookie = h.cookie.clone().unwrap_or_default();
        check_token(&format!("{f}.cookie"), &cookie)?;
        Ok(Some(HashKey::Cookie(cookie)))
    }

    /// The active probe, if active checks are on.
    pub fn probe(&self) -> Result<Option<Probe>, ConfigError> {
        let f = "healthCheck.active";
        let Some(active) = &self.health_check.active else { return Ok(None) };
        match (&active.http, &active.tcp, &active.grpc) {
            (Some(h), None, None) => {
                if !h.path.starts_with('/') {
                    return Err(invalid(format!("{f}.http.path"), "must start with /"));
                }
                let path = h.path.parse().map_err(|_| invalid(format!("{f}.http.path"), "is not a valid path"))?;
                Ok(Some(Probe::Http(path)))
            }
            (None, Some(_), None) => Ok(Some(Probe::Tcp)),
            (None, None, Some(g)) => {
                if self.app_protocol != AppProtocol::Grpc {
                    return Err(invalid(format!("{f}.grpc"), "needs appProtocol GRPC"));
                }
                Ok(Some(Probe::Grpc(g.service.clone())))
            }
            _ => Err(invalid(f, "set exactly one of http, tcp or grpc")),
        }
    }
}

impl ProxyConfig {
    /// The parsed `forwarding.trustedProxies`.
    pub fn trusted_proxies(&self) -> Result<Vec<Cidr>, ConfigError> {
        self.forwarding
            .trusted_proxies
            .iter()
            .enumerate()
            .map(|(i, s)| s.parse().map_err(|e| invalid(format!("forwarding.trustedProxies[{i}]"), e)))
            .collect()
    }
}

/// An address range: `10.0.0.0/8`, `fd00::/8`, or one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is inside the range (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
        let network: std::net::IpAddr =
            addr.parse().map_err(|_| format!("{s:?} is not an address or range like 10.0.0.0/8"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be between 0 and {max}"))?,
        };
        Ok(Cidr { network, prefix })
    }
}

/// A cookie name must be an RFC 6265 token.
fn check_token(field: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
    if ok { Ok(()) } else { Err(invalid(field, format_args!("{name:?} is not a valid cookie name"))) }
}

/// A parse error on one line: the YAML library may render a source snippet
/// over several lines, and the contract is one line naming the field.
fn one_line(e: &serde_saphyr::Error) -> String {
    let text = e.to_string();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or("invalid YAML");
    format!("invalid YAML: {}", first.strip_prefix("error: ").unwrap_or(first))
}
