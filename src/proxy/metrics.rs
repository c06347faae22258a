//! Prometheus metrics of the proxy.
//!
//! The request path only touches atomics: per-endpoint response counters live
//! in [`EndpointStats`] (one per endpoint, found through the runtime's map)
//! and the latency histogram is lock-free. Per-endpoint series are produced
//! at scrape time by a collector that walks the current endpoint set, so an
//! endpoint that leaves also leaves the output.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use super::state::Runtime;
use crate::balance::{HealthFlag, Member};
use crate::discovery::SourceMetrics;

/// Status classes counted per endpoint; the last one counts exchanges that
/// produced no response (connection failure, reset, timeout).
const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

/// Index into [`CLASSES`] for exchanges without a response.
pub(crate) const NO_RESPONSE: usize = 5;

/// The class index of an HTTP status.
pub(crate) fn class_of(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// Counters of one endpoint, kept across configuration reloads.
#[derive(Debug)]
pub struct EndpointStats {
    label: String,
    responses: [AtomicU64; 6],
    ejections: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// gRPC responses by `grpc-status` (0..=16; anything else counts as UNKNOWN).
    grpc: [AtomicU64; 17],
    /// Upgraded connections (WebSocket) to the endpoint open now.
    pub(crate) tunnels: AtomicU64,
}

impl EndpointStats {
    pub(crate) fn new(label: String) -> Self {
        EndpointStats {
            label,
            responses: Default::default(),
            ejections: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            grpc: Default::default(),
            tunnels: AtomicU64::new(0),
        }
    }

    pub(crate) fn count_grpc(&self, code: u16) {
        let i = if usize::from(code) < self.grpc.len() { usize::from(code) } else { 2 };
        self.grpc[i].fetch_add(1, Ordering::Relaxed);
    }

    /// gRPC responses by status name, only the statuses seen.
    pub fn grpc_responses(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        super::grpc::CODE_NAMES
            .iter()
            .zip(&self.grpc)
            .map(|(name, n)| (*name, n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
    }

    #[inline]
    pub(crate) fn count(&self, class: usize) {
        self.responses[class].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_ejection(&self) {
        self.ejections.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_bytes(&self, from_client: u64, to_client: u64) {
        self.bytes_in.fetch_add(from_client, Ordering::Relaxed);
        self.bytes_out.fetch_add(to_client, Ordering::Relaxed);
    }

    /// Responses by class, in the order of the class names.
    pub fn responses(&self) -> [(&'static str, u64); 6] {
        std::array::from_fn(|i| (CLASSES[i], self.responses[i].load(Ordering::Relaxed)))
    }
}

/// Bucket upper bounds of the latency histogram, in seconds.
const BUCKETS: [f64; 14] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A lock-free latency histogram (the library's takes a mutex per observation).
/// Clones share the counts.
#[derive(Clone, Debug, Default)]
pub struct LatencyHistogram(Arc<HistogramCounts>);

#[derive(Debug, Default)]
struct HistogramCounts {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl LatencyHistogram {
    /// Records one latency.
    #[inline]
    pub fn observe_nanos(&self, nanos: u64) {
        let secs = nanos as f64 * 1e-9;
        let i = BUCKETS.iter().position(|&b| secs <= b).unwrap_or(BUCKETS.len());
        self.0.counts[i].fetch_add(1, Ordering::Relaxed);
        self.0.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.0.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.0.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|b| b.1).sum();
        let sum = self.0.sum_nanos.load(Ordering::Relaxed) as f64 * 1e-9;
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabel {
    worker: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabel {
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TimeoutLabel {
    timeout: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcCodeLabel {
    grpc_status: &'static str,
}

/// The open-tunnels gauge.
#[derive(Clone, Debug, Default)]
pub(crate) struct Tunnels(Gauge);

impl Tunnels {
    /// Counts a tunnel as open until the guard is dropped.
    pub(crate) fn open(&self) -> TunnelGuard {
        self.0.inc();
        TunnelGuard(self.0.clone())
    }
}

/// Keeps a tunnel counted as open.
pub(crate) struct TunnelGuard(Gauge);

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Keeps a tunnel counted as open on its endpoint.
pub(crate) struct EndpointTunnel<'a>(&'a EndpointStats);

impl<'a> EndpointTunnel<'a> {
    pub(crate) fn open(stats: &'a EndpointStats) -> Self {
        stats.tunnels.fetch_add(1, Ordering::Relaxed);
        EndpointTunnel(stats)
    }
}

impl Drop for EndpointTunnel<'_> {
    fn drop(&mut self) {
        self.0.tunnels.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The proxy's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Client connections open now.
    pub active_connections: Gauge,
    /// Client connections accepted.
    pub connections: Counter,
    /// Client connections each worker serves now, by worker index.
    pub(crate) worker_connections: Box<[Gauge]>,
    /// Time from receiving a request to sending its response headers.
    pub request_duration: LatencyHistogram,
    /// Responses the proxy produced itself (no endpoint, timeout, failure), by status.
    local_responses: Family<CodeLabel, Counter>,
    /// The same for gRPC calls, by gRPC status.
    local_grpc_responses: Family<GrpcCodeLabel, Counter>,
    retries: Family<ResultLabel, Counter>,
    upgrades: Family<ResultLabel, Counter>,
    timeouts: Family<TimeoutLabel, Counter>,
    at_cap: Counter<f64, AtomicU64>,
    overflows: Family<LimitLabel, Counter>,
    /// Upgraded connections (WebSocket) open now.
    pub(crate) tunnels: Tunnels,
    source: SourceMetrics,
    tls_handshakes: Family<ResultLabel, Counter>,
    tls_connections: Family<TlsLabel, Counter>,
    tls_reloads: Family<ResultLabel, Counter>,
    tls_expiry: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TlsLabel {
    version: &'static str,
    alpn: &'static str,
}

impl Metrics {
    pub(crate) fn new(current: Arc<ArcSwap<Runtime>>, source: SourceMetrics, workers: usize) -> Self {
        let mut registry = Registry::with_prefix("fulcrum_proxy");
        let active_connections = Gauge::default();
        registry.register("active_connections", "Client connections open now", active_connections.clone());
        let per_worker = Family::<WorkerLabel, Gauge>::default();
        let worker_connections = (0..workers)
            .map(|i| per_worker.get_or_create(&WorkerLabel { worker: u16::try_from(i).unwrap_or(u16::MAX) }).clone())
            .collect();
        registry.register("worker_connections", "Client connections each worker serves now", per_worker);
        let connections = Counter::default();
        registry.register("connections", "Client connections accepted", connections.clone());
        let request_duration = LatencyHistogram::default();
        registry.register(
            "request_duration_seconds",
            "Time from receiving a request to sending its response headers",
            request_duration.clone(),
        );
        let local_responses = Family::default();
        registry.register(
            "local_responses",
            "Responses produced by the proxy itself (no endpoint, timeout, endpoint failure), by status code",
            local_responses.clone(),
        );
        let local_grpc_responses = Family::default();
        registry.register(
            "local_grpc_responses",
            "gRPC calls answered by the proxy itself (trailers-only), by gRPC status",
            local_grpc_responses.clone(),
        );
        let upgrades = Family::default();
        registry.register(
            "upgrades",
            "HTTP/1.1 upgrade requests (WebSocket): tunnelled (101), refused by the endpoint, or failed",
            upgrades.clone(),
        );
        let timeouts = Family::default();
        registry.register(
            "client_timeouts",
            "Client connections closed for overrunning a timeout: header (first bytes or a request head), bodyIdle",
            timeouts.clone(),
        );
        let at_cap = Counter::<f64, AtomicU64>::default();
        registry.register(
            "connection_cap_seconds",
            "Time the workers spent not accepting because limits.maxConnections client connections were open",
            at_cap.clone(),
        );
        let overflows = Family::default();
        registry.register(
            "circuit_breaker_overflows",
            "Requests and TCP connections turned away from an endpoint by a circuit breaker, by limit \
             (maxRequests, maxPendingRequests; TCP mode: maxRequests or maxConnections)",
            overflows.clone(),
        );
        let tunnels = Tunnels::default();
        registry.register("tunnels_open", "Upgraded connections (WebSocket) open now", tunnels.0.clone());
        let retries = Family::default();
        registry.register(
            "retries",
            "Retries on another endpoint: sent, or refused by the retry budget",
            retries.clone(),
        );
        registry.register("config_reloads", "Configuration reloads by result", source.reloads.clone());
        registry.register(
            "discovery_watch_errors",
            "Failed watches of the API server, by resource; the last known configuration and endpoints stay in force",
            source.watch_errors.clone(),
        );
        let tls_handshakes = Family::default();
        registry.register(
            "tls_handshakes",
            "TLS handshakes of client connections by result: ok, or why they failed (timeout, closed, \
             no_client_certificate, bad_client_certificate, alert_received, incompatible, protocol_error, error)",
            tls_handshakes.clone(),
        );
        let tls_connections = Family::default();
        registry.register(
            "tls_connections",
            "Client connections that completed a TLS handshake, by TLS version and negotiated ALPN protocol",
            tls_connections.clone(),
        );
        let tls_reloads = Family::default();
        registry.register(
            "tls_reloads",
            "Changed TLS certificate, key or CA files: applied, or refused (the last good set stays)",
            tls_reloads.clone(),
        );
        let tls_expiry = Gauge::default();
        registry.register(
            "tls_certificate_expiry_seconds",
            "Seconds until the earliest certificate the listener presents expires (negative once expired)",
            tls_expiry.clone(),
        );
        registry.register_collector(Box::new(EndpointCollector { current }));
        Metrics {
            tls_handshakes,
            tls_connections,
            tls_reloads,
            tls_expiry,
            registry,
            active_connections,
            connections,
            worker_connections,
            request_duration,
            local_responses,
            local_grpc_responses,
            retries,
            upgrades,
            timeouts,
            at_cap,
            overflows,
            tunnels,
            source,
        }
    }

    pub(crate) fn local_response(&self, code: u16) {
        self.local_responses.get_or_create(&CodeLabel { code }).inc();
    }

    pub(crate) fn local_grpc_response(&self, code: u16) {
        let name = super::grpc::CODE_NAMES.get(usize::from(code)).copied().unwrap_or("UNKNOWN");
        self.local_grpc_responses.get_or_create(&GrpcCodeLabel { grpc_status: name }).inc();
    }

    pub(crate) fn at_connection_cap(&self, waited: std::time::Duration) {
        self.at_cap.inc_by(waited.as_secs_f64());
    }

    pub(crate) fn overflow(&self, limit: &'static str) {
        self.overflows.get_or_create(&LimitLabel { limit }).inc();
    }

    pub(crate) fn timed_out(&self, timeout: &'static str) {
        self.timeouts.get_or_create(&TimeoutLabel { timeout }).inc();
    }

    pub(crate) fn upgrade(&self, result: &'static str) {
        self.upgrades.get_or_create(&ResultLabel { result }).inc();
    }

    pub(crate) fn retry(&self, sent: bool) {
        let result = if sent { "sent" } else { "budget_exhausted" };
        self.retries.get_or_create(&ResultLabel { result }).inc();
    }

    pub(crate) fn tls_handshake(&self, result: &'static str) {
        self.tls_handshakes.get_or_create(&ResultLabel { result }).inc();
    }

    pub(crate) fn tls_connection(&self, version: &'static str, alpn: &'static str) {
        self.tls_connections.get_or_create(&TlsLabel { version, alpn }).inc();
    }

    pub(crate) fn tls_reload(&self, applied: bool) {
        self.tls_reloads.get_or_create(&ResultLabel { result: if applied { "applied" } else { "refused" } }).inc();
    }

    pub(crate) fn tls_expiry(&self, seconds: Option<i64>) {
        if let Some(s) = seconds {
            self.tls_expiry.set(s);
        }
    }

    /// Counts a configuration reload attempt.
    pub fn reload(&self, applied: bool) {
        self.source.reload(applied);
    }

    /// The metrics in the Prometheus/OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8192);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Per-endpoint series, read at scrape time from the current runtime.
#[derive(Debug)]
struct EndpointCollector {
    current: Arc<ArcSwap<Runtime>>,
}

impl Collector for EndpointCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let rt = self.current.load();
        let rows: Vec<(&EndpointStats, &crate::balance::Member)> =
            rt.set.members().iter().filter_map(|m| Some((&rt.upstreams.get(&m.endpoint().addr())?.stats, m))).collect();

        if rt.config.protocol == super::config::Protocol::Http {
            let mut e = encoder.encode_descriptor(
                "upstream_requests",
                "Requests sent to each endpoint, by response status class (error: no response)",
                None,
                MetricType::Counter,
            )?;
            for (s, _) in &rows {
                for (class, n) in s.responses() {
                    ConstCounter::new(n)
                        .encode(e.encode_family(&[("endpoint", s.label.as_str()), ("class", class)])?)?;
                }
            }
            let mut e = encoder.encode_descriptor(
                "upstream_grpc_responses",
                "gRPC calls answered by each endpoint, by grpc-status (only the statuses seen)",
                None,
                MetricType::Counter,
            )?;
            for (s, _) in &rows {
                for (code, n) in s.grpc_responses() {
                    ConstCounter::new(n)
                        .encode(e.encode_family(&[("endpoint", s.label.as_str()), ("grpc_status", code)])?)?;
                }
            }
            track_series(&mut encoder, &rt)?;
            for (name, help, value) in [
                (
                    "endpoint_connections",
                    "Connections open to the endpoint (HTTP/1.1 and HTTP/2), capped by circuitBreakers.maxConnections",
                    super::upstream::Upstream::connections as fn(&super::upstream::Upstream) -> usize,
                ),
                (
                    "endpoint_pending_requests",
                    "Requests waiting for a connection to the endpoint, capped by circuitBreakers.maxPendingRequests",
                    super::upstream::Upstream::pending,
                ),
            ] {
                let mut e = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
                for (s, m) in &rows {
                    if let Some(u) = rt.upstreams.get(&m.endpoint().addr()) {
                        ConstGauge::new(i64::try_from(value(u)).unwrap_or(i64::MAX))
                            .encode(e.encode_family(&[("endpoint", s.label.as_str())])?)?;
                    }
                }
            }
        } else {
            let mut e = encoder.encode_descriptor(
                "upstream_connections",
                "Connections opened to each endpoint, by result",
                None,
                MetricType::Counter,
            )?;
            for (s, _) in &rows {
                let [_, (_, connected), .., (_, failed)] = s.responses();
                for (result, n) in [("connected", connected), ("failed", failed)] {
                    ConstCounter::new(n)
                        .encode(e.encode_family(&[("endpoint", s.label.as_str()), ("result", result)])?)?;
                }
            }
        }
        endpoint_gauge(
            &mut encoder,
            &rows,
            "endpoint_healthy",
            "1 when the endpoint may receive new traffic, 0 when a health check, ejection, readiness or draining keeps it out",
            |m| i64::from(m.endpoint().health().is_available()),
        )?;
        endpoint_gauge(
            &mut encoder,
            &rows,
            "endpoint_ejected",
            "1 while passive outlier detection keeps the endpoint out",
            |m| i64::from(m.endpoint().health().has(HealthFlag::Ejected)),
        )?;
        endpoint_gauge(
            &mut encoder,
            &rows,
            "endpoint_in_flight",
            "Requests (HTTP) or connections (TCP) in flight to the endpoint",
            |m| i64::from(m.endpoint().in_flight()),
        )?;
        endpoint_gauge(
            &mut encoder,
            &rows,
            "endpoint_latency_ewma_seconds",
            "Peak-EWMA latency estimate of the endpoint",
            |m| m.endpoint().latency_estimate().as_secs_f64(),
        )?;
        let mut e = encoder.encode_descriptor(
            "ejections",
            "Passive outlier ejections of the endpoint",
            None,
            MetricType::Counter,
        )?;
        for (s, _) in &rows {
            ConstCounter::new(s.ejections.load(Ordering::Relaxed))
                .encode(e.encode_family(&[("endpoint", s.label.as_str())])?)?;
        }
        if rt.config.protocol == super::config::Protocol::Tcp {
            let mut e = encoder.encode_descriptor(
                "tcp_bytes",
                "Bytes copied between clients and the endpoint (TCP mode)",
                None,
                MetricType::Counter,
            )?;
            for (s, _) in &rows {
                for (direction, n) in [("to_endpoint", &s.bytes_in), ("to_client", &s.bytes_out)] {
                    ConstCounter::new(n.load(Ordering::Relaxed))
                        .encode(e.encode_family(&[("endpoint", s.label.as_str()), ("direction", direction)])?)?;
                }
            }
        }
        Ok(())
    }
}

/// Evidence per track (HTTP mode): responses by class and gRPC status,
/// outcomes, and time to response headers.
fn track_series(encoder: &mut DescriptorEncoder, rt: &Runtime) -> Result<(), std::fmt::Error> {
    let mut e = encoder.encode_descriptor(
        "track_requests",
        "Requests sent to each track's endpoints, by response status class (error: no response)",
        None,
        MetricType::Counter,
    )?;
    for t in &rt.tracks {
        for (class, n) in CLASSES.iter().zip(&t.classes) {
            ConstCounter::new(n.load(Ordering::Relaxed))
                .encode(e.encode_family(&[("track", t.name()), ("class", class)])?)?;
        }
    }
    let mut e = encoder.encode_descriptor(
        "track_outcomes",
        "Requests to each track that ended, by outcome (failure: 5xx, no response, or a gRPC failure status)",
        None,
        MetricType::Counter,
    )?;
    for t in &rt.tracks {
        let (completed, failed) = t.totals();
        for (outcome, n) in [("success", completed.saturating_sub(failed)), ("failure", failed)] {
            ConstCounter::new(n).encode(e.encode_family(&[("track", t.name()), ("outcome", outcome)])?)?;
        }
    }
    let mut e = encoder.encode_descriptor(
        "track_grpc_responses",
        "gRPC calls answered by each track, by grpc-status (only the statuses seen)",
        None,
        MetricType::Counter,
    )?;
    for t in &rt.tracks {
        for (code, n) in super::grpc::CODE_NAMES.iter().zip(&t.grpc) {
            let n = n.load(Ordering::Relaxed);
            if n > 0 {
                ConstCounter::new(n).encode(e.encode_family(&[("track", t.name()), ("grpc_status", code)])?)?;
            }
        }
    }
    let mut e = encoder.encode_descriptor(
        "track_request_duration_seconds",
        "Time from receiving a request to its response headers, by the track that answered",
        None,
        MetricType::Histogram,
    )?;
    for t in &rt.tracks {
        t.latency.encode(e.encode_family(&[("track", t.name())])?)?;
    }
    Ok(())
}

/// One gauge per endpoint, labelled by its address.
fn endpoint_gauge<V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    rows: &[(&EndpointStats, &Member)],
    name: &str,
    help: &str,
    value: impl Fn(&Member) -> V,
) -> Result<(), std::fmt::Error> {
    let mut e = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (s, m) in rows {
        ConstGauge::new(value(m)).encode(e.encode_family(&[("endpoint", s.label.as_str())])?)?;
    }
    Ok(())
}
