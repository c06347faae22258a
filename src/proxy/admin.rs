//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/endpoints`, `/tracks`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;

use super::state::Shared;
use crate::balance::HealthFlag;

/// Answers one admin request.
pub(crate) async fn serve(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match (req.method().as_str(), req.uri().path()) {
        ("GET", "/metrics") => {
            (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", shared.metrics.encode())
        }
        ("GET", "/healthz") => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        ("GET", "/readyz") => {
            let require_endpoint = req.uri().query().is_some_and(|q| q.split('&').any(|kv| kv == "require=endpoints"));
            let (ready, why) = readiness(&shared, require_endpoint);
            let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            (status, "text/plain", format!("{why}\n"))
        }
        ("GET", "/endpoints") => (StatusCode::OK, "application/json", endpoints_json(&shared)),
        ("GET", "/tracks") => match window_of(req.uri().query()) {
            Ok(seconds) => (StatusCode::OK, "application/json", tracks_json(&shared, seconds)),
            Err(why) => (StatusCode::BAD_REQUEST, "text/plain", why),
        },
        ("GET", _) => {
            (StatusCode::NOT_FOUND, "text/plain", "try /metrics, /healthz, /readyz, /endpoints or /tracks\n".into())
        }
        _ => (StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n".into()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    Ok(resp)
}

/// Answers one admin request while the proxy awaits its first configuration.
pub(crate) async fn serve_waiting(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match (req.method().as_str(), req.uri().path()) {
        ("GET", "/healthz") => (StatusCode::OK, "ok\n"),
        ("GET", "/readyz") => (StatusCode::SERVICE_UNAVAILABLE, "waiting for the configuration and endpoints\n"),
        ("GET", _) => {
            (StatusCode::SERVICE_UNAVAILABLE, "not serving yet: waiting for the configuration and endpoints\n")
        }
        _ => (StatusCode::METHOD_NOT_ALLOWED, "only GET\n"),
    };
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain"));
    Ok(resp)
}

/// Whether the proxy should be sent traffic.
///
/// A proxy that serves its configuration is ready, whether or not any endpoint
/// is available: with none, it answers 503 itself. Readiness must not depend on
/// the endpoints, because in Sidecar mode the endpoints are the proxy's own
/// pods, which Kubernetes lists as ready only once every container of the pod,
/// this proxy included, is ready: a proxy that waited for an endpoint would
/// wait for itself, and a fresh install would never turn ready (Istio's and
/// Linkerd's sidecars follow the same rule). A dedicated proxy follows it too,
/// so a proxy rollout is not held up by an app outage, and clients of an app
/// with no available pod get a fast 503 rather than a refused connection.
///
/// `require_endpoint` (`/readyz?require=endpoints`) adds the condition that at
/// least one endpoint may take traffic, for a standalone proxy behind another
/// load balancer that should skip a proxy with nothing to send to.
pub(crate) fn readiness(shared: &Shared, require_endpoint: bool) -> (bool, String) {
    if shared.draining.load(Ordering::Relaxed) {
        return (false, "draining".to_owned());
    }
    let rt = shared.runtime();
    let members = rt.set.members();
    let available = members.iter().filter(|m| m.weight() > 0 && m.endpoint().health().is_available()).count();
    if available == 0 {
        let why = "no endpoint available: requests are answered 503";
        return (!require_endpoint, format!("{}: {why}", if require_endpoint { "not ready" } else { "ready" }));
    }
    (true, format!("ready: {available} of {} endpoints available", members.len()))
}

fn health_name(flag: HealthFlag) -> &'static str {
    match flag {
        HealthFlag::ActiveCheckFailed => "activeCheckFailed",
        HealthFlag::Ejected => "ejected",
        HealthFlag::NotReady => "notReady",
        HealthFlag::Draining => "draining",
    }
}

/// The `window` of a `/tracks` query (`?window=30`, in seconds): the whole
/// window when absent.
fn window_of(query: Option<&str>) -> Result<u64, String> {
    let max = super::tracks::WINDOW_SECONDS;
    let Some(value) = query.into_iter().flat_map(|q| q.split('&')).find_map(|kv| kv.strip_prefix("window=")) else {
        return Ok(max);
    };
    match value.parse::<u64>() {
        Ok(s) if (1..=max).contains(&s) => Ok(s),
        _ => Err(format!("window: seconds between 1 and {max}, got {value:?}\n")),
    }
}

/// Each track's evidence: totals since the start, and over the recent
/// window its requests, failures, success rate and p50/p99 time to headers.
pub(crate) fn tracks_json(shared: &Shared, seconds: u64) -> String {
    let rt = shared.runtime();
    let now = super::tracks::now_s();
    let ms = |micros: Option<u64>| micros.map(|m| m as f64 / 1000.0);
    let tracks: Vec<serde_json::Value> = rt
        .tracks
        .iter()
        .map(|t| {
            let (requests, failures) = t.totals();
            let w = t.window.summary(now, seconds);
            json!({
                "track": t.name(),
                "total": {"requests": requests, "failures": failures},
                "window": {
                    "requests": w.requests,
                    "failures": w.failures,
                    "successRate": w.success_rate(),
                    "p50Ms": ms(w.p50_micros),
                    "p99Ms": ms(w.p99_micros),
                },
            })
        })
        .collect();
    let seconds = seconds.div_ceil(super::tracks::SLOT_SECONDS) * super::tracks::SLOT_SECONDS;
    let doc = json!({"generation": rt.generation, "windowSeconds": seconds, "tracks": tracks});
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// Every endpoint with its health, load, latency and counters.
pub(crate) fn endpoints_json(shared: &Shared) -> String {
    let rt = shared.runtime();
    let endpoints: Vec<_> = rt
        .set
        .members()
        .iter()
        .map(|m| {
            let e = m.endpoint();
            let health = e.health();
            let flags: Vec<&str> =
                [HealthFlag::ActiveCheckFailed, HealthFlag::Ejected, HealthFlag::NotReady, HealthFlag::Draining]
                    .into_iter()
                    .filter(|f| health.has(*f))
                    .map(health_name)
                    .collect();
            let upstream = rt.upstreams.get(&e.addr());
            let responses: serde_json::Map<String, serde_json::Value> = upstream
                .map(|u| u.stats.responses().into_iter().map(|(k, v)| (k.to_owned(), json!(v))).collect())
                .unwrap_or_default();
            json!({
                "address": e.addr().to_string(),
                "track": rt.set.track_of(m),
                "zone": m.zone(),
                "weight": m.weight(),
                "healthy": health.is_available(),
                "flags": flags,
                "inFlight": e.in_flight(),
                "latencyEwmaMs": e.latency_estimate().as_secs_f64() * 1000.0,
                "requests": e.requests(),
                "failures": e.failures(),
                "consecutiveFailures": e.consecutive_failures(),
                "connections": upstream.map_or(0, |u| u.connections()),
                "pendingRequests": upstream.map_or(0, |u| u.pending()),
                "idleConnections": upstream.map_or(0, |u| u.idle_count()),
                "http2Connections": upstream.map_or(0, |u| u.h2_connections()),
                "tunnels": upstream.map_or(0, |u| u.stats.tunnels.load(Ordering::Relaxed)),
                "responses": responses,
                "grpc": upstream.map(|u| u.stats.grpc_responses().map(|(k, v)| (k.to_owned(), json!(v))).collect::<serde_json::Map<_, _>>()).unwrap_or_default(),
            })
        })
        .collect();
    // Zone-aware routing as in effect: the zone (configured, from the
    // environment or from the slices) and the proxies per zone.
    let zone_aware = rt.config.load_balancing.zone_aware.as_ref().map(|z| {
        let b = rt.config.balancer_config();
        json!({"zone": b.local_zone.as_deref(), "minHealthyPercent": z.min_healthy_percent, "proxies": z.proxies})
    });
    let doc = json!({
        "generation": rt.generation,
        "protocol": rt.config.protocol,
        "appProtocol": rt.config.app_protocol,
        "algorithm": rt.config.load_balancing.algorithm.name(),
        "zoneAware": zone_aware,
        // TLS as in effect: whether the listener terminates it, the seconds
        // until its earliest certificate expires, whether endpoints get TLS.
        "tls": {
            "terminates": shared.tls.server().is_some(),
            "certificateExpirySeconds": shared.tls.seconds_to_expiry(),
            "endpoints": shared.tls.endpoint().is_some(),
        },
        "panic": shared.in_panic(),
        "draining": shared.draining.load(Ordering::Relaxed),
        "endpoints": endpoints,
    });
    let mut text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    text.push('\n');
    text
}
