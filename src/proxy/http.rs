//! HTTP mode: one request in, one endpoint chosen, the request forwarded over
//! a pooled keep-alive connection, the response streamed back.
//!
//! [`serve`] is the whole request path, from the parsed request to the
//! response headers; failures are mapped to a status in one place
//! ([`Failure::status`]). Bodies stream in both directions and are never
//! buffered whole. A request is retried on another endpoint only when that is
//! safe: it has no body to replay, and the first try either failed to connect
//! or used an idempotent method; and only within the retry budget.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::config::{HashKey, MAX_RETRY_ATTEMPTS};
use super::metrics::{NO_RESPONSE, class_of};
use super::state::{Runtime, Shared};
use super::upstream::{Lease, UpstreamError};
use crate::balance::{self, AffinityToken, Outcome, Pick, hash_key};

/// Body of a request sent to an endpoint: the client's, or empty on a retry
/// of a request that had none.
pub(crate) type UpstreamBody = Either<Incoming, Empty<Bytes>>;
/// Body of a response to a client: an endpoint's, streamed, or the proxy's own.
pub type ProxyBody = Either<TrackedBody, Full<Bytes>>;

/// Why no endpoint's response reached the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// No endpoint can take traffic.
    NoEndpoint,
    /// Connecting to or exchanging with the endpoint failed (after any retries).
    Upstream,
    /// The endpoint did not answer within the request timeout.
    Timeout,
}

impl Failure {
    /// The one place that maps a failure to what the client reads.
    pub(crate) fn status(self) -> StatusCode {
        match self {
            Failure::NoEndpoint => StatusCode::SERVICE_UNAVAILABLE,
            Failure::Upstream => StatusCode::BAD_GATEWAY,
            Failure::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    fn message(self) -> &'static str {
        match self {
            Failure::NoEndpoint => "no healthy endpoint\n",
            Failure::Upstream => "endpoint failed\n",
            Failure::Timeout => "endpoint timed out\n",
        }
    }
}

/// A response the proxy writes itself.
pub(crate) fn local_response(shared: &Shared, failure: Failure) -> Response<ProxyBody> {
    let status = failure.status();
    shared.metrics.local_response(status.as_u16());
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from_static(failure.message().as_bytes()))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

/// Facts about the client connection a request arrived on.
#[derive(Clone, Debug)]
pub(crate) struct Peer {
    pub(crate) addr: SocketAddr,
    /// The client IP, formatted once per connection for `x-forwarded-for`.
    pub(crate) ip_header: HeaderValue,
}

impl Peer {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        let ip_header = HeaderValue::from_str(&addr.ip().to_string()).unwrap_or(HeaderValue::from_static("unknown"));
        Peer { addr, ip_header }
    }
}

/// Serves one client request.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    peer: Peer,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let rt = shared.current.load_full();
    let clock = rt.set.clock().clone();
    let start = clock.now();
    let resp = match forward(&shared, &rt, &peer, req, start).await {
        Ok(resp) => resp,
        Err(failure) => local_response(&shared, failure),
    };
    shared.metrics.request_duration.observe_nanos(balance::duration_nanos(clock.now().since(start)));
    Ok(resp)
}

async fn forward(
    shared: &Shared,
    rt: &Runtime,
    peer: &Peer,
    req: Request<Incoming>,
    start: balance::Nanos,
) -> Result<Response<ProxyBody>, Failure> {
    let (mut parts, body) = req.into_parts();
    let hash = rt.hash.as_ref().and_then(|key| request_hash(key, &parts.headers, peer.addr));
    let presented = rt
        .affinity
        .as_ref()
        .and_then(|a| cookie(&parts.headers, &a.cookie))
        .and_then(|v| v.parse::<AffinityToken>().ok());
    prepare_request(&mut parts, peer);

    let retries = rt.config.retries.attempts.min(MAX_RETRY_ATTEMPTS) as usize;
    // Only a request without a body can be sent again: its body is streamed, not kept.
    let replay = (retries > 0 && body.is_end_stream()).then(|| parts.clone());
    let idempotent = is_idempotent(&parts.method);
    if retries > 0 {
        shared.retry_budget.deposit();
    }
    let timeouts = &rt.config.timeouts;

    let mut tried = [SocketAddr::from(([0, 0, 0, 0], 0)); MAX_RETRY_ATTEMPTS as usize + 1];
    let mut first = Some((parts, body));
    let mut now = start;
    for attempt in 0..=retries {
        let breq = balance::Request { hash, affinity: presented, exclude: &tried[..attempt] };
        let Some(mut pick) = shared.pick(rt, &breq, now) else {
            return Err(if attempt == 0 { Failure::NoEndpoint } else { Failure::Upstream });
        };
        tried[attempt] = pick.addr();
        let Some(upstream) = rt.upstreams.get(&pick.addr()) else {
            // Every member of the set has an upstream; a miss would be a bug, not a client's fault.
            return Err(Failure::Upstream);
        };
        let stats = &upstream.stats;
        let (mut head, body) = match first.take() {
            Some((head, body)) => (head, Either::Left(body)),
            None => match &replay {
                Some(head) => (head.clone(), Either::Right(Empty::new())),
                None => return Err(Failure::Upstream),
            },
        };
        head.uri = upstream_uri(&head.uri, &upstream.authority);
        let exchange = upstream.send(Request::from_parts(head, body), timeouts.connect.0, timeouts.idle.0);
        let sent = tokio::time::timeout(timeouts.request.0, exchange).await;
        let clock = rt.set.clock();
        now = clock.now();
        match sent {
            Ok(Ok((resp, lease))) => {
                pick.observe_latency_at(now);
                let status = resp.status();
                stats.count(class_of(status.as_u16()));
                let outcome = if status.is_server_error() { Outcome::Failure } else { Outcome::Success };
                let (mut rparts, rbody) = resp.into_parts();
                strip_hop_by_hop(&mut rparts.headers);
                if let Some(a) = &rt.affinity
                    && presented != Some(pick.affinity_token())
                    && let Ok(v) =
                        HeaderValue::from_str(&format!("{}={}{}", a.cookie, pick.affinity_token(), a.attributes))
                {
                    rparts.headers.append(header::SET_COOKIE, v);
                }
                return Ok(Response::from_parts(rparts, Either::Left(TrackedBody::new(rbody, pick, outcome, lease))));
            }
            Ok(Err(e)) => {
                stats.count(NO_RESPONSE);
                shared.endpoint_failed(rt, pick, now);
                let refused = matches!(e, UpstreamError::Connect(_));
                let safe = replay.is_some() && (refused || idempotent);
                tracing::debug!(endpoint = %tried[attempt], error = %e, safe, "request to endpoint failed");
                if !safe || attempt == retries {
                    return Err(Failure::Upstream);
                }
                // A connection that never opened cost the endpoints nothing, so its
                // retry is free; a retry of a request an endpoint may have worked on
                // is paid from the budget.
                if !refused && !shared.retry_budget.withdraw() {
                    shared.metrics.retry(false);
                    return Err(Failure::Upstream);
                }
                shared.metrics.retry(true);
            }
            Err(_elapsed) => {
                stats.count(NO_RESPONSE);
                shared.endpoint_failed(rt, pick, now);
                return Err(Failure::Timeout);
            }
        }
    }
    Err(Failure::Upstream)
}

/// Methods that may be sent twice without changing the outcome (RFC 9110 §9.2.2).
fn is_idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

/// The consistent-hashing key of a request; none when the request lacks it.
fn request_hash(key: &HashKey, headers: &HeaderMap, peer: SocketAddr) -> Option<u64> {
    match key {
        HashKey::SourceIp => Some(match peer.ip() {
            std::net::IpAddr::V4(ip) => hash_key(&ip.octets()),
            std::net::IpAddr::V6(ip) => hash_key(&ip.octets()),
        }),
        HashKey::Header(name) => headers.get(name).map(|v| hash_key(v.as_bytes())),
        HashKey::Cookie(name) => cookie(headers, name).map(|v| hash_key(v.as_bytes())),
    }
}

/// The value of cookie `name`, from any `Cookie` header.
pub(crate) fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
/// `Transfer-Encoding` goes too: hyper frames each side's body itself.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names instead of nine lookups.
    let any = headers.keys().any(|k| k == header::TRANSFER_ENCODING || HOP_BY_HOP.contains(k));
    if !any {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.eq_ignore_ascii_case("close") && !t.eq_ignore_ascii_case("keep-alive"))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::TRANSFER_ENCODING);
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Rewrites a client request for an endpoint: HTTP/1.1, hop-by-hop headers
/// removed, `Host` kept (taken from the URI for HTTP/2 clients),
/// `x-forwarded-for` appended and `x-forwarded-proto` set when absent.
fn prepare_request(parts: &mut http::request::Parts, peer: &Peer) {
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);
    if !headers.contains_key(header::HOST)
        && let Some(auth) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(auth.as_str())
    {
        headers.insert(header::HOST, v);
    }
    let forwarded = match headers.get(&X_FORWARDED_FOR).map(|v| v.as_bytes()) {
        Some(prior) if !prior.is_empty() => {
            let mut v = Vec::with_capacity(prior.len() + 2 + peer.ip_header.len());
            v.extend_from_slice(prior);
            v.extend_from_slice(b", ");
            v.extend_from_slice(peer.ip_header.as_bytes());
            HeaderValue::from_bytes(&v).unwrap_or_else(|_| peer.ip_header.clone())
        }
        _ => peer.ip_header.clone(),
    };
    headers.insert(X_FORWARDED_FOR.clone(), forwarded);
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    }
    parts.version = Version::HTTP_11;
}

/// The request URI aimed at an endpoint: `http://<endpoint>/<path and query>`.
fn upstream_uri(original: &Uri, authority: &http::uri::Authority) -> Uri {
    let mut p = http::uri::Parts::default();
    p.scheme = Some(http::uri::Scheme::HTTP);
    p.authority = Some(authority.clone());
    // Origin form only: the asterisk form (`OPTIONS *`) is sent as `/`.
    p.path_and_query = Some(
        original
            .path_and_query()
            .filter(|pq| pq.as_str().starts_with('/'))
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    // Scheme, authority and path are all present, which is all `from_parts` checks.
    Uri::from_parts(p).unwrap_or_default()
}

/// An endpoint's response body on its way to the client. The endpoint stays
/// counted as busy until the body ends, so long downloads weigh on
/// LeastConnections and LeastRequest as they should.
///
/// When the body ends cleanly the connection goes back to the endpoint's
/// pool; if the client goes away first, it is dropped with the body (hyper
/// closes it), since it may still carry the rest of the response.
pub struct TrackedBody {
    inner: Incoming,
    done: Option<(Pick, Outcome, Lease)>,
}

impl TrackedBody {
    fn new(inner: Incoming, pick: Pick, outcome: Outcome, lease: Lease) -> Self {
        let mut body = TrackedBody { inner, done: Some((pick, outcome, lease)) };
        if body.inner.is_end_stream() {
            body.finish(false);
        }
        body
    }

    fn finish(&mut self, failed: bool) {
        if let Some((pick, outcome, lease)) = self.done.take() {
            if failed {
                pick.complete(Outcome::Failure);
            } else {
                pick.complete(outcome);
                lease.release();
            }
        }
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.finish(false),
            Poll::Ready(Some(Err(_))) => self.finish(true),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.finish(false),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_named_by_connection_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn forwarded_for_is_appended_and_proto_set_once() {
        let peer = Peer::new("10.0.0.9:5555".parse().unwrap());
        let req = Request::builder().uri("/a?b=1").header("x-forwarded-for", "1.2.3.4").body(()).unwrap();
        let (mut parts, ()) = req.into_parts();
        prepare_request(&mut parts, &peer);
        assert_eq!(parts.headers["x-forwarded-for"], "1.2.3.4, 10.0.0.9");
        assert_eq!(parts.headers["x-forwarded-proto"], "http");
        assert_eq!(parts.version, Version::HTTP_11);
    }

    #[test]
    fn an_http2_request_gets_a_host_header_from_its_authority() {
        let peer = Peer::new("10.0.0.9:5555".parse().unwrap());
        let req = Request::builder().uri("http://shop.example:8080/x").version(Version::HTTP_2).body(()).unwrap();
        let (mut parts, ()) = req.into_parts();
        prepare_request(&mut parts, &peer);
        assert_eq!(parts.headers[header::HOST], "shop.example:8080");
    }

    #[test]
    fn the_upstream_uri_keeps_path_and_query_and_targets_the_endpoint() {
        let auth = "127.0.0.2:8081".parse().unwrap();
        let uri = upstream_uri(&"http://front/p/q?x=1".parse().unwrap(), &auth);
        assert_eq!(uri.to_string(), "http://127.0.0.2:8081/p/q?x=1");
        assert_eq!(upstream_uri(&"*".parse().unwrap(), &auth).to_string(), "http://127.0.0.2:8081/");
    }

    #[test]
    fn cookies_are_found_among_several_headers_and_pairs() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; b=2"));
        h.append(header::COOKIE, HeaderValue::from_static("FULCRUM_AFFINITY=\"00ff\""));
        assert_eq!(cookie(&h, "b"), Some("2"));
        assert_eq!(cookie(&h, "FULCRUM_AFFINITY"), Some("00ff"));
        assert_eq!(cookie(&h, "c"), None);
    }

    #[test]
    fn only_safe_methods_count_as_idempotent() {
        assert!(is_idempotent(&Method::GET) && is_idempotent(&Method::PUT));
        assert!(!is_idempotent(&Method::POST) && !is_idempotent(&Method::PATCH));
    }

    #[test]
    fn each_failure_has_its_status() {
        assert_eq!(Failure::NoEndpoint.status(), 503);
        assert_eq!(Failure::Upstream.status(), 502);
        assert_eq!(Failure::Timeout.status(), 504);
    }
}
