//! The `LoadBalancedApp` spec. Doc comments become the CRD's field
//! descriptions, so they are written for `kubectl explain`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PodTemplateSpec, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::status::LoadBalancedAppStatus;

/// Pattern of the duration strings the proxy accepts (`500ms`, `2s`, `1m30s`, `1h`).
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h))+$";

/// An application kept up and load-balanced: its replicas, a proxy that
/// balances traffic across them with the chosen algorithm, and healing of
/// replicas that stay broken.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "fulcrum.dev",
    version = "v1alpha1",
    kind = "LoadBalancedApp",
    plural = "loadbalancedapps",
    shortname = "lba",
    shortname = "lbapp",
    namespaced,
    status = "LoadBalancedAppStatus",
    // `kubectl scale` and a HorizontalPodAutoscaler act on the app itself:
    // its stable replicas, the pods `status.selector` names.
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    derive = "PartialEq",
    doc = "LoadBalancedApp: an application kept up and load-balanced by Fulcrum.",
    printcolumn = r#"{"name":"Algorithm","type":"string","jsonPath":".spec.loadBalancing.algorithm"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas","description":"Ready app replicas"}"#,
    printcolumn = r#"{"name":"Endpoints","type":"integer","jsonPath":".status.endpoints.ready","description":"Ready endpoints behind the proxy"}"#,
    printcolumn = r#"{"name":"Available","type":"string","jsonPath":".status.conditions[?(@.type==\"Available\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.availability.minAvailable) || self.replicas == 0 || self.availability.minAvailable < self.replicas")
        .message("availability.minAvailable must be below replicas, or no replica could ever be healed or evicted")
        .reason(Reason::FieldValueInvalid)
        .field_path(".availability.minAvailable"),
    validation = Rule::new("!has(self.loadBalancing.sessionAffinity) || self.protocol == 'HTTP'")
        .message("loadBalancing.sessionAffinity works through a cookie and needs protocol HTTP")
        .reason(Reason::FieldValueForbidden)
        .field_path(".loadBalancing.sessionAffinity"),
    validation = Rule::new("self.protocol == 'HTTP' || !has(self.loadBalancing.hashOn) || (!has(self.loadBalancing.hashOn.header) && !has(self.loadBalancing.hashOn.cookie))")
        .message("with protocol TCP, ConsistentHash can only hash on sourceIP")
        .reason(Reason::FieldValueForbidden)
        .field_path(".loadBalancing.hashOn"),
    validation = Rule::new("self.protocol == 'HTTP' || !has(self.appProtocol) || self.appProtocol == 'HTTP1'")
        .message("appProtocol says how the proxy speaks HTTP to the replicas and needs protocol HTTP")
        .reason(Reason::FieldValueForbidden)
        .field_path(".appProtocol"),
    validation = Rule::new("!has(self.healthCheck.active) || !has(self.healthCheck.active.grpc) || (has(self.appProtocol) && self.appProtocol == 'GRPC')")
        .message("healthCheck.active.grpc needs appProtocol GRPC")
        .reason(Reason::FieldValueForbidden)
        .field_path(".healthCheck.active.grpc"),
    validation = Rule::new("self.proxy.mode == 'Dedicated' || !has(self.proxy.replicas)")
        .message("proxy.replicas applies only to proxy.mode Dedicated (in Sidecar mode there is one proxy per app replica)")
        .reason(Reason::FieldValueForbidden)
        .field_path(".proxy.replicas"),
    validation = Rule::new("!has(self.tls) || self.protocol == 'HTTP'")
        .message("tls terminates HTTP only; with protocol TCP the proxy passes TLS through to the replicas")
        .reason(Reason::FieldValueForbidden)
        .field_path(".tls"),
    validation = Rule::new("!has(self.endpointTls) || self.protocol == 'HTTP'")
        .message("endpointTls needs protocol HTTP; with protocol TCP the proxy passes TLS through to the replicas")
        .reason(Reason::FieldValueForbidden)
        .field_path(".endpointTls"),
    validation = Rule::new("!has(self.loadBalancing.hashOn) || !has(self.loadBalancing.hashOn.clientCertificate) || !self.loadBalancing.hashOn.clientCertificate || (has(self.tls) && has(self.tls.clientAuth))")
        .message("loadBalancing.hashOn.clientCertificate needs tls.clientAuth (verified client certificates)")
        .reason(Reason::FieldValueForbidden)
        .field_path(".loadBalancing.hashOn.clientCertificate")
)]
pub struct LoadBalancedAppSpec {
    /// Number of app replicas (pods of the stable track).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// The app's pods, as in a Deployment's `spec.template`. The operator
    /// creates a Deployment from it (adding the proxy container in Sidecar
    /// mode); the API server validates it then.
    #[schemars(schema_with = "pod_template_schema")]
    pub template: PodTemplateSpec,

    /// The app's container port that receives the traffic: a number, or the
    /// name of a container port of the template.
    #[schemars(schema_with = "port_schema")]
    pub port: IntOrString,

    /// The front Service clients connect to.
    #[serde(default)]
    pub service: FrontService,

    /// `HTTP`: HTTP/1.1 and HTTP/2 cleartext, each request balanced. `TCP`:
    /// each connection balanced.
    #[serde(default)]
    pub protocol: Protocol,

    /// What the replicas speak, with protocol HTTP: `HTTP1` (pooled keep-alive
    /// HTTP/1.1), `H2C` (HTTP/2 cleartext with prior knowledge: each request
    /// a stream, multiplexed) or `GRPC` (H2C plus gRPC statuses for the
    /// proxy's own answers and for passive health, and gRPC health checks).
    /// Clients speak HTTP/1.1 or h2c to the proxy whatever this says. Also set
    /// as the `appProtocol` of the Services' ports.
    #[serde(default)]
    pub app_protocol: AppProtocol,

    /// Where the proxy runs.
    #[serde(default)]
    pub proxy: ProxySpec,

    /// How requests or connections are spread over the replicas.
    #[serde(default)]
    pub load_balancing: LoadBalancing,

    /// An optional second track: its own pod template and replicas, receiving
    /// a fixed percentage of the traffic whatever its replica count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Canary>,

    /// Active and passive health checking by the proxy.
    #[serde(default)]
    pub health_check: HealthCheck,

    /// Retries of failed requests on other replicas.
    #[serde(default)]
    pub retries: Retries,

    /// Time limits of the proxy.
    #[serde(default)]
    pub timeouts: Timeouts,

    /// Which clients' forwarding headers the proxy believes.
    #[serde(default, skip_serializing_if = "Forwarding::is_empty")]
    pub forwarding: Forwarding,

    /// Caps on what clients can have each proxy hold.
    #[serde(default)]
    pub limits: Limits,

    /// Caps per replica, beyond which requests fail fast instead of piling up.
    #[serde(default)]
    pub circuit_breakers: CircuitBreakers,

    /// Replacement of replicas that stay broken.
    #[serde(default)]
    pub healing: Healing,

    /// Disruption budget and spreading of replicas.
    #[serde(default)]
    pub availability: Availability,
    /// TLS termination at the proxy: the certificates come from
    /// kubernetes.io/tls Secrets the operator mounts into the proxy
    /// containers (it never reads them); a renewed Secret reaches new
    /// handshakes without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    /// TLS from the proxy to the app's replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_tls: Option<EndpointTls>,
}

/// TLS termination at the proxy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Tls {
    /// A kubernetes.io/tls Secret (tls.crt, tls.key) in the app's namespace:
    /// the default certificate.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    /// More kubernetes.io/tls Secrets, each served when the client's SNI
    /// matches one of its certificate's DNS names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub sni_secret_names: Vec<String>,
    /// The lowest TLS version accepted: "1.2" (TLS 1.2 and 1.3) or "1.3".
    #[serde(default)]
    pub min_version: TlsVersion,
    /// Mutual TLS: client certificates must chain to the CA bundle under
    /// ca.crt of this Secret; the verified certificate reaches the replicas
    /// as X-Forwarded-Client-Cert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<ClientAuth>,
}

/// A TLS protocol version.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
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
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientAuth {
    /// A Secret with the CA bundle under ca.crt (cert-manager's CA Secrets have it).
    #[schemars(length(min = 1, max = 253))]
    pub ca_secret_name: String,
    /// Refuse clients without a certificate; false: verify one if presented.
    #[serde(default = "yes")]
    pub required: bool,
}

/// TLS from the proxy to the replicas.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "(has(self.caConfigMapName) ? 1 : 0) + (has(self.caSecretName) ? 1 : 0) == (has(self.insecureSkipVerify) && self.insecureSkipVerify ? 0 : 1)"
).message("set one of caConfigMapName or caSecretName to verify the replicas' certificates, or neither with insecureSkipVerify: true").reason(Reason::FieldValueInvalid))]
pub struct EndpointTls {
    /// A ConfigMap with the CA bundle under ca.crt that the replicas'
    /// certificates must chain to (e.g. kube-root-ca.crt, or one cert-manager's
    /// trust-manager fills).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub ca_config_map_name: Option<String>,
    /// A Secret with the CA bundle under ca.crt, instead of a ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub ca_secret_name: Option<String>,
    /// The name sent as SNI and verified in the replicas' certificates;
    /// unset: each replica's IP address, which its certificate must carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub server_name: Option<String>,
    /// A kubernetes.io/tls Secret with the client certificate the proxy
    /// presents to replicas that require mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub client_certificate_secret_name: Option<String>,
    /// Accept any certificate from the replicas: encrypted but not
    /// authenticated, open to whoever can intercept the traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insecure_skip_verify: Option<bool>,
}

fn default_replicas() -> i32 {
    2
}

fn optional_pod_template_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
    pod_template_schema(g)
}

pub(crate) fn pod_template_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "description": "A PodTemplateSpec (metadata and spec), validated by the API server when the operator creates the Deployment.",
        "properties": {
            "metadata": {
                "type": "object",
                "description": "Labels and annotations of the pods. The operator adds its own selector labels.",
                "x-kubernetes-preserve-unknown-fields": true
            },
            "spec": {
                "type": "object",
                "description": "The pod spec, as in a Deployment.",
                "x-kubernetes-preserve-unknown-fields": true
            }
        },
        "required": ["spec"]
    })
}

fn port_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "x-kubernetes-int-or-string": true,
        "description": "The app's container port: a number (1-65535) or a port name.",
        "anyOf": [{"type": "integer", "minimum": 1, "maximum": 65535}, {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 15}]
    })
}

/// What the proxy balances.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Protocol {
    /// HTTP/1.1 and h2c; each request is balanced.
    #[default]
    #[serde(rename = "HTTP")]
    Http,
    /// Raw TCP; each connection is balanced.
    #[serde(rename = "TCP")]
    Tcp,
}

/// What the replicas speak (protocol HTTP).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum AppProtocol {
    /// HTTP/1.1.
    #[default]
    #[serde(rename = "HTTP1")]
    Http1,
    /// HTTP/2 cleartext, prior knowledge.
    #[serde(rename = "H2C")]
    H2c,
    /// gRPC over HTTP/2 cleartext.
    #[serde(rename = "GRPC")]
    Grpc,
}

/// Trust in the forwarding headers clients send.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Forwarding {
    /// Address ranges (CIDR) of load balancers in front of the proxy whose
    /// `X-Forwarded-For` and `X-Forwarded-Proto` are kept; any other client's
    /// are replaced with what the proxy saw. Empty: trust no one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub trusted_proxies: Vec<String>,
}

impl Forwarding {
    fn is_empty(&self) -> bool {
        self.trusted_proxies.is_empty()
    }
}

/// Caps on what clients can have each proxy hold.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Client connections open at once per proxy; past it new ones wait in the kernel's backlog.
    #[serde(default = "max_connections")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_connections: i32,
    /// Largest request head (HTTP/1) or header list (HTTP/2), in bytes; beyond it 431.
    #[serde(default = "max_header_bytes")]
    #[schemars(range(min = 8192, max = 1_048_576))]
    pub max_request_header_bytes: i32,
    /// Most header fields of an HTTP/1 request; beyond it 431.
    #[serde(default = "max_headers")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_request_headers: i32,
    /// Concurrent streams a client may open on one HTTP/2 connection.
    #[serde(default = "max_streams")]
    #[schemars(range(min = 1, max = 10_000))]
    pub max_concurrent_streams: i32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: max_connections(),
            max_request_header_bytes: max_header_bytes(),
            max_request_headers: max_headers(),
            max_concurrent_streams: max_streams(),
        }
    }
}

/// Caps per replica (Envoy's circuit breakers).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreakers {
    /// Requests (TCP: connections) in flight to one replica from one proxy;
    /// one more goes to another replica, or fails fast with 503 (gRPC UNAVAILABLE).
    #[serde(default = "max_requests")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_requests: i32,
    /// Connections open to one replica from one proxy (TCP mode: the smaller
    /// of this and maxRequests caps its connections); a request that needs
    /// one more waits for one to free up.
    #[serde(default = "max_requests")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_connections: i32,
    /// Requests waiting for a connection to one replica at maxConnections;
    /// one more goes to another replica, or fails fast with 503 (gRPC UNAVAILABLE).
    #[serde(default = "max_requests")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub max_pending_requests: i32,
}

impl Default for CircuitBreakers {
    fn default() -> Self {
        CircuitBreakers {
            max_requests: max_requests(),
            max_connections: max_requests(),
            max_pending_requests: max_requests(),
        }
    }
}

fn max_connections() -> i32 {
    10_000
}
fn max_header_bytes() -> i32 {
    65_536
}
fn max_headers() -> i32 {
    100
}
fn max_streams() -> i32 {
    128
}
fn max_requests() -> i32 {
    1024
}

/// The front Service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FrontService {
    /// Service type.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Port clients connect to.
    #[serde(default = "default_service_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Extra annotations of the Service (for example for a cloud load balancer).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Default for FrontService {
    fn default() -> Self {
        FrontService { type_: ServiceType::default(), port: default_service_port(), annotations: BTreeMap::new() }
    }
}

fn default_service_port() -> i32 {
    80
}

/// Kubernetes Service type of the front Service.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    /// Reachable inside the cluster.
    #[default]
    ClusterIP,
    /// Also on a port of every node.
    NodePort,
    /// Also through the cloud's load balancer.
    LoadBalancer,
}

/// Where the proxy runs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxySpec {
    /// `Sidecar`: a proxy container in every app pod, balancing over all
    /// ready replicas. `Dedicated`: a separate proxy Deployment.
    #[serde(default)]
    pub mode: ProxyMode,
    /// Dedicated mode only: proxy replicas (2 when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub replicas: Option<i32>,
    /// Proxy image; the operator's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Resources of the proxy container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

/// Proxy placement.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ProxyMode {
    /// A proxy container in every app pod.
    #[default]
    Sidecar,
    /// A separate proxy Deployment, spread over nodes.
    Dedicated,
}

/// The balancing algorithm and its options.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.hashOn) || self.algorithm == 'ConsistentHash'")
        .message("hashOn applies only to the ConsistentHash algorithm")
        .reason(Reason::FieldValueForbidden)
        .field_path(".hashOn"),
    validation = Rule::new("self.algorithm != 'ConsistentHash' || has(self.hashOn)")
        .message("ConsistentHash needs hashOn: sourceIP, header or cookie")
        .reason(Reason::FieldValueRequired)
        .field_path(".hashOn")
)]
pub struct LoadBalancing {
    /// RoundRobin, WeightedRoundRobin, Random, LeastConnections, LeastRequest,
    /// PeakEwma or ConsistentHash.
    #[serde(default)]
    pub algorithm: Algorithm,
    /// ConsistentHash only: the key, exactly one of sourceIP, header or cookie.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<HashOn>,
    /// Sticky sessions through a cookie (HTTP only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<SessionAffinity>,
    /// Window over which a new or recovered replica's share ramps from 10% to full, e.g. `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub slow_start: Option<String>,
    /// Below this percentage of ready replicas, balance over all of them rather than overload the few; 0 disables.
    #[serde(default = "default_panic")]
    #[schemars(range(min = 0, max = 100))]
    pub panic_threshold_percent: i32,
    /// Zone-aware balancing (opt-in): each proxy prefers the replicas of its
    /// own zone (from the EndpointSlices); when its zone has a smaller share of
    /// the ready replicas than of the proxies, it sends the zone only the part
    /// the zone can carry and the rest to zones with replicas to spare; below
    /// minHealthyPercent, to every zone alike.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone_aware: Option<ZoneAware>,
}

/// Zone-aware balancing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ZoneAware {
    /// The least percentage of the proxy's zone's replicas that must be
    /// available for that zone to take all of the proxy's traffic.
    #[serde(default = "seventy")]
    #[schemars(range(min = 1, max = 100))]
    pub min_healthy_percent: i32,
}

fn seventy() -> i32 {
    70
}

impl Default for LoadBalancing {
    fn default() -> Self {
        LoadBalancing {
            algorithm: Algorithm::default(),
            hash_on: None,
            session_affinity: None,
            slow_start: None,
            panic_threshold_percent: default_panic(),
            zone_aware: None,
        }
    }
}

fn default_panic() -> i32 {
    50
}

/// Balancing algorithms.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Algorithm {
    /// Each replica in turn.
    #[default]
    RoundRobin,
    /// Smooth weighted round robin (the NGINX sequence); weights come from the canary split.
    WeightedRoundRobin,
    /// Uniformly at random.
    Random,
    /// The fewest requests in flight, over all replicas.
    LeastConnections,
    /// The less loaded of two random replicas.
    LeastRequest,
    /// The better of two random replicas by latency × load: avoids slow replicas.
    PeakEwma,
    /// Maglev consistent hashing on a key (hashOn).
    ConsistentHash,
}

/// The consistent-hashing key: exactly one field.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "(has(self.sourceIP) && self.sourceIP ? 1 : 0) + (has(self.header) ? 1 : 0) + (has(self.cookie) ? 1 : 0) + (has(self.clientCertificate) && self.clientCertificate ? 1 : 0) == 1"
).message("set exactly one of sourceIP: true, header, cookie or clientCertificate: true").reason(Reason::FieldValueInvalid))]
pub struct HashOn {
    /// Hash the client's IP address.
    #[serde(default, rename = "sourceIP", skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<bool>,
    /// Hash the value of this request header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"))]
    pub header: Option<String>,
    /// Hash the value of this cookie.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"))]
    pub cookie: Option<String>,
    /// Hash the subject of the client's verified TLS certificate (needs tls.clientAuth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<bool>,
}

/// Cookie-based session affinity.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionAffinity {
    /// Cookie name.
    #[serde(default = "default_cookie")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"))]
    pub cookie: String,
    /// Cookie lifetime, e.g. `1h`.
    #[serde(default = "default_ttl")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub ttl: String,
}

fn default_cookie() -> String {
    "FULCRUM_AFFINITY".into()
}

fn default_ttl() -> String {
    "1h".into()
}

/// A canary track, in one of two modes. Manual: `template` runs beside the
/// stable pods and takes `weight` percent of the traffic. Progressive
/// (`steps`): a change of the app's `spec.template` runs as the canary, the
/// previous version staying stable (recorded in `status.rollout`), and the
/// operator steps its weight, judging each step on the proxies' evidence,
/// until it promotes the new version or rolls it back.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.replicas) || !has(self.replicasPercent)")
        .message("set canary.replicas or canary.replicasPercent, not both")
        .reason(Reason::FieldValueForbidden)
        .field_path(".replicasPercent"),
    validation = Rule::new("has(self.template) != has(self.steps)")
        .message("set canary.template (a manual canary at canary.weight) or canary.steps (a progressive rollout of spec.template), exactly one")
        .reason(Reason::FieldValueInvalid)
        .field_path(".steps"),
    validation = Rule::new("has(self.steps) || (!has(self.analysis) && !has(self.paused))")
        .message("canary.analysis and canary.paused belong to a progressive rollout (canary.steps)")
        .reason(Reason::FieldValueForbidden)
        .field_path(".analysis")
)]
pub struct Canary {
    /// Canary replicas; when neither this nor replicasPercent is set, 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: Option<i32>,
    /// Canary replicas as a percentage of the stable replicas, rounded up
    /// (at least one while there are stable replicas), so the canary keeps
    /// its share when the app is scaled or autoscaled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub replicas_percent: Option<i32>,
    /// Manual mode: percentage of the traffic sent to the canary track.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100))]
    pub weight: i32,
    /// Manual mode: the canary pods, as in a Deployment's `spec.template`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_pod_template_schema")]
    pub template: Option<PodTemplateSpec>,
    /// Progressive mode: the canary's weight at each step, and how long each
    /// step lasts at least; after the last step the new version is promoted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 20))]
    pub steps: Option<Vec<CanaryStep>>,
    /// Progressive mode: what each step's evidence must show to go on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<Analysis>,
    /// Progressive mode: hold the rollout at its current step (false resumes,
    /// and the step's pause starts again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
}

/// One step of a progressive rollout.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("duration(self.pause) >= duration('1s') && duration(self.pause) <= duration('24h')")
    .message("pause must be between 1s and 24h")
    .reason(Reason::FieldValueInvalid)
    .field_path(".pause"))]
pub struct CanaryStep {
    /// The canary's share of the traffic during the step, in percent.
    #[schemars(range(min = 1, max = 99))]
    pub weight: i32,
    /// The least time spent at the step, e.g. `1m`; the step also waits for
    /// `analysis.minRequests` canary requests.
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub pause: String,
}

/// The judgement of each step, made on the evidence of the app's proxies
/// over the step (at most its last minute): the canary against the stable
/// track over the same window, not against fixed numbers alone.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Analysis {
    /// Canary requests (and stable ones) a step needs before it is judged.
    #[serde(default = "twenty")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub min_requests: i32,
    /// How many percentage points the canary's success rate may lie below
    /// the stable track's; more rolls the canary back.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 100))]
    pub max_success_rate_drop: i32,
    /// The canary's p99 time to response headers may reach this percentage
    /// of the stable track's (and at least `latencyToleranceMs` more); more
    /// rolls the canary back.
    #[serde(default = "one_hundred_fifty")]
    #[schemars(range(min = 100, max = 10_000))]
    pub max_latency_percent: i32,
    /// A p99 difference below this many milliseconds never fails a step.
    #[serde(default = "five")]
    #[schemars(range(min = 0, max = 60_000))]
    pub latency_tolerance_ms: i32,
}

impl Default for Analysis {
    fn default() -> Self {
        Analysis {
            min_requests: twenty(),
            max_success_rate_drop: one(),
            max_latency_percent: one_hundred_fifty(),
            latency_tolerance_ms: five(),
        }
    }
}

fn one_hundred_fifty() -> i32 {
    150
}

impl Canary {
    /// The canary's replica count next to `stable` stable replicas.
    pub fn replica_count(&self, stable: i32) -> i32 {
        match (self.replicas, self.replicas_percent) {
            (Some(n), _) => n,
            (None, Some(pct)) => (stable.max(0) * pct.clamp(0, 100) + 99) / 100,
            (None, None) => 1,
        }
    }
}

fn one() -> i32 {
    1
}

/// Health checking by the proxy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    /// Probes the proxy sends to every replica, on top of Kubernetes readiness.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<ActiveCheck>,
    /// Ejection of replicas whose real traffic fails repeatedly.
    #[serde(default)]
    pub passive: PassiveCheck,
}

/// Active health checks.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.http), has(self.tcp), has(self.grpc)].filter(x, x).size() == 1").message("set exactly one of http, tcp or grpc").reason(Reason::FieldValueInvalid))]
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
    /// Time between probes, e.g. `2s`.
    #[serde(default = "two_seconds")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub interval: String,
    /// Time a probe may take, e.g. `1s`.
    #[serde(default = "one_second")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub timeout: String,
    /// Consecutive successes that bring a replica back.
    #[serde(default = "two")]
    #[schemars(range(min = 1, max = 100))]
    pub healthy_threshold: i32,
    /// Consecutive failures that take a replica out.
    #[serde(default = "two")]
    #[schemars(range(min = 1, max = 100))]
    pub unhealthy_threshold: i32,
}

/// The HTTP probe.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpCheck {
    /// Path requested.
    #[serde(default = "default_path")]
    #[schemars(regex(pattern = r"^/"))]
    pub path: String,
}

fn default_path() -> String {
    "/healthz".into()
}

/// The TCP probe (no options).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct TcpCheck {}

/// The gRPC probe: the standard health service.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrpcCheck {
    /// The service name asked about; empty asks about the server as a whole.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service: String,
}

/// Passive outlier ejection.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PassiveCheck {
    /// Consecutive failures (connection errors, timeouts, 5xx) that eject a replica; 0 disables.
    #[serde(default = "five")]
    #[schemars(range(min = 0, max = 1000))]
    pub consecutive_failures: i32,
    /// First ejection time, doubled on each repeat, e.g. `30s`.
    #[serde(default = "thirty_seconds")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub base_ejection_time: String,
    /// Never eject more than this percentage of replicas.
    #[serde(default = "fifty")]
    #[schemars(range(min = 0, max = 100))]
    pub max_ejection_percent: i32,
}

impl Default for PassiveCheck {
    fn default() -> Self {
        PassiveCheck {
            consecutive_failures: five(),
            base_ejection_time: thirty_seconds(),
            max_ejection_percent: fifty(),
        }
    }
}

/// Retries on other replicas.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    /// Other replicas a failed request may try after the first; 0 disables.
    #[serde(default = "two")]
    #[schemars(range(min = 0, max = 5))]
    pub attempts: i32,
    /// Retries may add at most this percentage to the request rate.
    #[serde(default = "twenty")]
    #[schemars(range(min = 0, max = 100))]
    pub budget_percent: i32,
}

impl Default for Retries {
    fn default() -> Self {
        Retries { attempts: two(), budget_percent: twenty() }
    }
}

/// Time limits of the proxy, each bounded (see the configuration reference).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("duration(self.connect) >= duration('10ms') && duration(self.connect) <= duration('5m')").message("timeouts.connect must be between 10ms and 5m").reason(Reason::FieldValueInvalid),
    validation = Rule::new("duration(self.request) >= duration('10ms') && duration(self.request) <= duration('24h')").message("timeouts.request must be between 10ms and 24h").reason(Reason::FieldValueInvalid),
    validation = Rule::new("duration(self.idle) >= duration('100ms') && duration(self.idle) <= duration('24h')").message("timeouts.idle must be between 100ms and 24h").reason(Reason::FieldValueInvalid),
    validation = Rule::new("duration(self.header) >= duration('100ms') && duration(self.header) <= duration('5m')").message("timeouts.header must be between 100ms and 5m").reason(Reason::FieldValueInvalid),
    validation = Rule::new("duration(self.bodyIdle) >= duration('100ms') && duration(self.bodyIdle) <= duration('24h')").message("timeouts.bodyIdle must be between 100ms and 24h").reason(Reason::FieldValueInvalid),
    validation = Rule::new("duration(self.tunnelIdle) >= duration('100ms') && duration(self.tunnelIdle) <= duration('168h')").message("timeouts.tunnelIdle must be between 100ms and 168h").reason(Reason::FieldValueInvalid)
)]
pub struct Timeouts {
    /// Connecting to a replica, e.g. `1s`.
    #[serde(default = "one_second")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub connect: String,
    /// Request sent to response headers received, e.g. `30s`.
    #[serde(default = "thirty_seconds")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub request: String,
    /// Idle client and replica connections close after this, e.g. `60s`.
    #[serde(default = "sixty_seconds")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub idle: String,
    /// An upgraded connection (WebSocket) with no byte either way for this long is closed, e.g. `1h`.
    #[serde(default = "one_hour")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub tunnel_idle: String,
    /// A client's first bytes, and each HTTP/1 request head once begun, e.g. `10s`.
    #[serde(default = "ten_seconds")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub header: String,
    /// With requests in flight on a client connection, no byte either way for this long closes it (an
    /// HTTP/2 stream silent this long is ended on its own), e.g. `5m` (long enough for quiet gRPC
    /// streams and server-sent events).
    #[serde(default = "five_minutes")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub body_idle: String,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: one_second(),
            request: thirty_seconds(),
            idle: sixty_seconds(),
            tunnel_idle: one_hour(),
            header: ten_seconds(),
            body_idle: five_minutes(),
        }
    }
}

/// Replacement of broken replicas.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.ejectedTimeout) || (duration(self.ejectedTimeout) >= duration('10s') && duration(self.ejectedTimeout) <= duration('24h'))")
    .message("healing.ejectedTimeout must be between 10s and 24h")
    .reason(Reason::FieldValueInvalid)
    .field_path(".ejectedTimeout"))]
pub struct Healing {
    /// A pod not ready for longer than this is deleted so its ReplicaSet replaces it, e.g. `2m`.
    #[serde(default = "two_minutes")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub unready_timeout: String,
    /// Never heal more than this many pods at once.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 100))]
    pub max_concurrent: i32,
    /// Opt-in healing from traffic evidence: a pod that passes its readiness
    /// probe but that more than half of the app's proxies sending it traffic
    /// have kept ejecting (passive health checking: its real requests fail)
    /// for this long is replaced, within maxConcurrent and minAvailable, e.g. `2m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub ejected_timeout: Option<String>,
}

impl Default for Healing {
    fn default() -> Self {
        Healing { unready_timeout: two_minutes(), max_concurrent: one(), ejected_timeout: None }
    }
}

/// Disruption budget and spreading.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Availability {
    /// Ready replicas that evictions and healing must leave (the PodDisruptionBudget's
    /// minAvailable); replicas − 1 when unset. Must be below replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub min_available: Option<i32>,
    /// Spread replicas over nodes (a topology spread constraint on the hostname).
    #[serde(default = "yes")]
    pub spread_across_nodes: bool,
}

impl Default for Availability {
    fn default() -> Self {
        Availability { min_available: None, spread_across_nodes: true }
    }
}

fn yes() -> bool {
    true
}
fn two() -> i32 {
    2
}
fn five() -> i32 {
    5
}
fn twenty() -> i32 {
    20
}
fn fifty() -> i32 {
    50
}
fn one_second() -> String {
    "1s".into()
}
fn two_seconds() -> String {
    "2s".into()
}
fn thirty_seconds() -> String {
    "30s".into()
}
fn sixty_seconds() -> String {
    "60s".into()
}
fn ten_seconds() -> String {
    "10s".into()
}
fn five_minutes() -> String {
    "5m".into()
}
fn one_hour() -> String {
    "1h".into()
}
fn two_minutes() -> String {
    "2m".into()
}
