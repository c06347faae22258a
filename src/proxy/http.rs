//! HTTP mode: one request in, one endpoint chosen, the request forwarded over
//! a pooled keep-alive HTTP/1.1 connection or as a stream of a multiplexed
//! HTTP/2 connection, the response streamed back.
//!
//! [`serve`] is the whole request path, from the parsed request to the
//! response headers; failures are mapped to what the client reads in one
//! place ([`local_response`]): an HTTP status, or for a gRPC call a
//! trailers-only gRPC status. Bodies stream in both directions and are never
//! buffered whole. A request is retried on another endpoint only when that
//! is safe: nothing reached the endpoint (the connection never opened, or an
//! HTTP/2 stream was refused) or the method is idempotent; its body is still
//! whole ([`replay`](super::replay)); and only within the retry budget.
//! An HTTP/1.1 `Upgrade` request (WebSocket) becomes a tunnel on `101`
//! ([`upgrade`](super::upgrade)).

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::config::{HashKey, MAX_RETRY_ATTEMPTS};
use super::conn::StreamClock;
use super::metrics::{NO_RESPONSE, class_of};
use super::relay::Relay;
use super::replay::{ReplayError, Replayable};
use super::state::{Runtime, Shared};
use super::tls::ClientCert;
use super::upstream::{ConnSettings, Lease, Upstream, UpstreamError};
use super::{bridge, forwarding, grpc, h1, tracks, upgrade};
use crate::balance::{self, AffinityToken, Outcome, Pick, hash_key};

/// A client's request body as the server that read its head hands it over:
/// hyper's HTTP/1.1 server (connections the fast path handed on, `Left`), or
/// an HTTP/2 stream of [`h2s`](super::h2s) (`Right`).
pub(crate) type RequestBody = Either<Incoming, super::h2s::StreamBody>;

/// Why a client's request body could not be read (the error of [`RequestBody`]).
pub(crate) type BodyFailure = Box<dyn std::error::Error + Send + Sync>;

/// A client's request body; on an HTTP/2 connection each frame marks its
/// stream's progress.
pub(crate) struct ClientBody {
    inner: RequestBody,
    clock: Option<StreamClock>,
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BodyFailure;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyFailure>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let (Some(clock), Poll::Ready(Some(Ok(_)))) = (&this.clock, &polled) {
            clock.touch();
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

/// Body of a request sent to an endpoint.
pub(crate) enum UpstreamBody {
    /// The client's, streamed once (no retries configured).
    Client(ClientBody),
    /// The client's, kept for a replay while it is small.
    Replay(Replayable<ClientBody>),
    /// No body.
    Empty,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = ReplayError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ReplayError>>> {
        match self.get_mut() {
            UpstreamBody::Client(b) => Pin::new(b).poll_frame(cx).map_err(ReplayError::Client),
            UpstreamBody::Replay(b) => Pin::new(b).poll_frame(cx),
            UpstreamBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Client(b) => b.is_end_stream(),
            UpstreamBody::Replay(b) => b.is_end_stream(),
            UpstreamBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Client(b) => b.size_hint(),
            UpstreamBody::Replay(b) => b.size_hint(),
            UpstreamBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// Body of a response to a client: an endpoint's, streamed, or the proxy's own.
///
/// An endpoint's is boxed: the response passes up through several futures
/// on its way to the client, each a copy of it, and the box keeps each copy
/// to a fifth of the size (one allocation against a dozen moves of some
/// 300 bytes).
pub type ProxyBody = Either<Box<TrackedBody>, Full<Bytes>>;

/// Why no endpoint's response reached the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// No endpoint can take traffic.
    NoEndpoint,
    /// Every endpoint tried refused the connection: nothing reached any of them.
    Unreachable,
    /// Exchanging with the endpoint failed (after any retries).
    Upstream,
    /// The endpoint did not answer in time.
    Timeout,
    /// Every endpoint tried was at its `circuitBreakers.maxRequests`, or had
    /// `maxConnections` open and `maxPendingRequests` waiting.
    Overflow,
    /// The client's request body ended early, broke off or stalled past
    /// `timeouts.bodyIdle` while the proxy read it (nothing was sent).
    ClientBody,
}

impl Failure {
    /// The HTTP status a plain HTTP client reads.
    pub(crate) fn status(self) -> StatusCode {
        match self {
            Failure::NoEndpoint | Failure::Unreachable | Failure::Overflow => StatusCode::SERVICE_UNAVAILABLE,
            Failure::Upstream => StatusCode::BAD_GATEWAY,
            Failure::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Failure::ClientBody => StatusCode::BAD_REQUEST,
        }
    }

    /// The gRPC status a gRPC client reads.
    pub(crate) fn grpc_status(self) -> u16 {
        match self {
            Failure::Timeout => grpc::code::DEADLINE_EXCEEDED,
            _ => grpc::code::UNAVAILABLE,
        }
    }

    pub(crate) fn message(self) -> &'static str {
        match self {
            Failure::NoEndpoint => "no healthy endpoint",
            Failure::Unreachable => "no endpoint reachable",
            Failure::Upstream => "endpoint failed",
            Failure::Timeout => "endpoint timed out",
            Failure::Overflow => "endpoints at their request limit",
            Failure::ClientBody => "request body incomplete",
        }
    }
}

/// A response the proxy writes itself: plain text with an HTTP status, or
/// for a gRPC call a trailers-only response carrying the gRPC status.
pub(crate) fn local_response(shared: &Shared, failure: Failure, grpc_call: bool) -> Response<ProxyBody> {
    if grpc_call {
        let code = failure.grpc_status();
        shared.metrics.local_grpc_response(code);
        let mut resp = Response::new(Either::Right(Full::new(Bytes::new())));
        grpc::status_headers(resp.headers_mut(), code, failure.message());
        return resp;
    }
    let status = failure.status();
    shared.metrics.local_response(status.as_u16());
    let mut body = String::with_capacity(32);
    body.push_str(failure.message());
    body.push('\n');
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body))));
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
    /// Whether the connection is TLS the proxy terminated.
    pub(crate) https: bool,
    /// The client's verified certificate, on a terminated connection.
    pub(crate) cert: Option<Arc<ClientCert>>,
}

impl Peer {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        let mut text = [0; 15];
        let ip_header = match addr.ip() {
            std::net::IpAddr::V4(ip) => HeaderValue::from_bytes(dotted(ip, &mut text)),
            ip => HeaderValue::from_str(&ip.to_string()),
        };
        Peer { addr, ip_header: ip_header.unwrap_or(HeaderValue::from_static("unknown")), https: false, cert: None }
    }

    /// A client on a TLS connection the proxy terminated.
    pub(crate) fn tls(addr: SocketAddr, cert: Option<ClientCert>) -> Self {
        Peer { https: true, cert: cert.map(Arc::new), ..Peer::new(addr) }
    }
}

/// `ip` in dotted decimal into `out`, as `Ipv4Addr`'s `Display` writes it,
/// without the formatting machinery (a tenth of the work, once per connection).
fn dotted(ip: std::net::Ipv4Addr, out: &mut [u8; 15]) -> &[u8] {
    let mut n = 0;
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out[n] = b'.';
            n += 1;
        }
        if octet >= 100 {
            out[n] = b'0' + octet / 100;
            n += 1;
        }
        if octet >= 10 {
            out[n] = b'0' + octet / 10 % 10;
            n += 1;
        }
        out[n] = b'0' + octet % 10;
        n += 1;
    }
    &out[..n]
}

/// The header carrying the client certificate to the endpoint (Envoy's).
static X_FORWARDED_CLIENT_CERT: header::HeaderName = header::HeaderName::from_static("x-forwarded-client-cert");

/// Serves one client request.
///
/// `stream` is the clock of the request's HTTP/2 stream: its response is
/// ended once neither direction has moved for `timeouts.bodyIdle`.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    peer: Peer,
    req: Request<RequestBody>,
    stream: Option<StreamClock>,
) -> Result<Response<ProxyBody>, Infallible> {
    let rt = shared.current.load_full();
    let clock = rt.set.clock().clone();
    let start = clock.now();
    let grpc_call = grpc::is_grpc(req.headers());
    let resp = match forward(&shared, &rt, &peer, req, start, grpc_call, stream).await {
        Ok(resp) => resp,
        Err(failure) => local_response(&shared, failure, grpc_call),
    };
    shared.metrics.request_duration.observe_nanos(balance::duration_nanos(clock.now().since(start)));
    Ok(resp)
}

/// The request body as sent on each attempt.
enum Sendable {
    /// Sent once; a retry is impossible once it has gone.
    Once(Option<ClientBody>),
    /// Read through a holder that can start it again.
    Held(Replayable<ClientBody>),
    Empty,
}

impl Sendable {
    /// A request's body, held for a retry when one may come.
    fn of(body: RequestBody, rt: &Runtime, stream: Option<&StreamClock>) -> Self {
        let retries = rt.config.retries.attempts.min(MAX_RETRY_ATTEMPTS);
        if body.is_end_stream() {
            Sendable::Empty
        } else if retries > 0 {
            Sendable::Held(Replayable::new(ClientBody { inner: body, clock: stream.cloned() }))
        } else {
            Sendable::Once(Some(ClientBody { inner: body, clock: stream.cloned() }))
        }
    }

    fn next(&mut self) -> Option<UpstreamBody> {
        match self {
            Sendable::Once(b) => b.take().map(UpstreamBody::Client),
            Sendable::Held(h) => h.replay().map(UpstreamBody::Replay),
            Sendable::Empty => Some(UpstreamBody::Empty),
        }
    }
}

async fn forward(
    shared: &Arc<Shared>,
    rt: &Runtime,
    peer: &Peer,
    mut req: Request<RequestBody>,
    start: balance::Nanos,
    grpc_call: bool,
    stream: Option<StreamClock>,
) -> Result<Response<ProxyBody>, Failure> {
    let http2 = rt.config.app_protocol.is_http2();
    // HTTP/2 has no Upgrade (RFC 9113 §8.6): towards an HTTP/2 endpoint the
    // header is dropped with the other hop-by-hop ones and the request goes as is.
    let upgrade = if http2 { None } else { upgrade::requested(&req) };
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let timeouts = &rt.config.timeouts;
    // A gRPC call's own deadline bounds the whole call when it is the shorter.
    let call_timeout = if grpc_call { grpc::timeout(&parts.headers).filter(|t| *t < timeouts.request.0) } else { None };
    let presented = rt
        .affinity
        .as_ref()
        .and_then(|a| cookie(&parts.headers, &a.cookie))
        .and_then(|v| v.parse::<AffinityToken>().ok());
    let hash_source = rt.hash.as_ref().map(|key| request_hash_input(key, &parts.headers, peer));
    let client_ip = prepare_request(&mut parts, peer, &rt.trusted, http2);
    let hash = hash_source.and_then(|h| h.resolve(client_ip));
    if let Some(value) = &upgrade {
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, value.clone());
    }
    // Towards HTTP/2 the client's host travels as `:authority`.
    let authority = if http2 {
        parts.headers.remove(header::HOST).and_then(|h| match parts.uri.authority() {
            // An HTTP/2 client's, already parsed.
            Some(a) if a.as_str().as_bytes() == h.as_bytes() => Some(a.clone()),
            _ => http::uri::Authority::try_from(h.as_bytes()).ok(),
        })
    } else {
        None
    };
    let ask = Ask { hash, presented, idempotent: is_idempotent(&parts.method), call_timeout, start };

    // An HTTP/2 client's request without a body, or with a small one of
    // known length (read whole first), to an HTTP/1.1 endpoint: over the fast
    // path's sockets, its head and body written once for every attempt.
    let bridged = (!http2 && stream.is_some() && upgrade.is_none() && !grpc_call)
        .then(|| bridge::body_length(&parts, body.is_end_stream()))
        .flatten();
    let mut out = match bridged {
        Some(len) => {
            let mut wire = bridge::request_head(&parts);
            // The head is all the endpoint needs of the request.
            recycle(std::mem::take(&mut parts.headers));
            if len > 0 {
                read_body_onto(shared, rt, body, len, &mut wire, stream.as_ref()).await?;
            }
            Outgoing::Raw(wire, parts.method == Method::HEAD)
        }
        None => {
            let body = Sendable::of(body, rt, stream.as_ref());
            Outgoing::Sent { parts, body, authority, upgrade, client_upgrade }
        }
    };
    attempts(shared, rt, &mut out, ask, stream).await
}

/// Serves an HTTP/2 client's request taken without a header map
/// ([`bridge::RawRequest`]): its head rewritten as the fast path does, its
/// body (of known length) read whole, then sent as [`forward`] sends a
/// bridged request.
pub(crate) async fn serve_raw(
    shared: Arc<Shared>,
    peer: Peer,
    req: bridge::RawRequest,
    stream: StreamClock,
) -> Result<Response<ProxyBody>, Infallible> {
    // The configuration of now: endpoints that came to speak HTTP/2 since
    // the request was read fail it as any other endpoint failure would.
    let rt = shared.current.load_full();
    let clock = rt.set.clock().clone();
    let start = clock.now();
    let bridge::RawRequest { buf, head, body } = req;
    let mut wire = super::fast::take_buffer();
    let (hash, presented) = super::fast::prepare(&rt, &peer, &buf, &head, &mut wire);
    let ask = Ask { hash, presented, idempotent: head.idempotent, call_timeout: None, start };
    let (len, is_head) = (head.body as usize, head.head);
    bridge::RawRequest::recycle(buf, head);
    let read = if len > 0 { read_body_onto(&shared, &rt, body, len, &mut wire, Some(&stream)).await } else { Ok(()) };
    let mut out = Outgoing::Raw(wire, is_head);
    let forwarded = match read {
        Ok(()) => attempts(&shared, &rt, &mut out, ask, Some(stream)).await,
        Err(failure) => Err(failure),
    };
    if let Outgoing::Raw(wire, _) = out {
        super::fast::give_buffer(wire);
    }
    let resp = forwarded.unwrap_or_else(|failure| local_response(&shared, failure, false));
    shared.metrics.request_duration.observe_nanos(balance::duration_nanos(clock.now().since(start)));
    Ok(resp)
}

/// Serves an HTTP/2 client's request to HTTP/2 endpoints taken without a
/// header map ([`Relay`]): read for balancing and forwarding as the fast
/// path reads a head, its body streamed as [`forward`] streams one.
pub(crate) async fn serve_relay(
    shared: Arc<Shared>,
    peer: Peer,
    req: bridge::RawRequest,
    stream: StreamClock,
) -> Result<Response<ProxyBody>, Infallible> {
    let rt = shared.current.load_full();
    let clock = rt.set.clock().clone();
    let start = clock.now();
    let bridge::RawRequest { buf, head, body } = req;
    let field = |name| h1::value_of(&buf, &head.headers, name);
    let grpc_call = field("content-type").is_some_and(grpc::is_grpc_type);
    let timeouts = &rt.config.timeouts;
    // A gRPC call's own deadline bounds the whole call when it is the shorter.
    let call_timeout = if grpc_call {
        field("grpc-timeout").and_then(grpc::timeout_value).filter(|t| *t < timeouts.request.0)
    } else {
        None
    };
    let look = super::fast::look(&rt, &peer, &buf, &head.headers);
    let ask = Ask { hash: look.hash, presented: look.presented, idempotent: head.idempotent, call_timeout, start };
    let body = Sendable::of(body, &rt, Some(&stream));
    let mut out = Outgoing::Relay { head: Relay::new(buf, head, look, peer), body };
    let resp = match attempts(&shared, &rt, &mut out, ask, Some(stream)).await {
        Ok(resp) => resp,
        Err(failure) => local_response(&shared, failure, grpc_call),
    };
    drop(out);
    shared.metrics.request_duration.observe_nanos(balance::duration_nanos(clock.now().since(start)));
    Ok(resp)
}

/// Reads a request body of `len` bytes onto `wire`, each frame within
/// `timeouts.bodyIdle` ([`bridge::read_body`]).
async fn read_body_onto(
    shared: &Shared,
    rt: &Runtime,
    body: RequestBody,
    len: usize,
    wire: &mut Vec<u8>,
    stream: Option<&StreamClock>,
) -> Result<(), Failure> {
    match bridge::read_body(body, len, wire, rt.config.timeouts.body_idle.0, stream).await {
        Ok(()) => Ok(()),
        Err(e) => {
            if e == bridge::BodyRead::Timeout {
                shared.metrics.timed_out("bodyIdle");
            }
            Err(Failure::ClientBody)
        }
    }
}

/// What a request sends to an endpoint on each attempt.
#[allow(
    clippy::large_enum_variant,
    reason = "made once per request in its future's state; a box would be an allocation"
)]
enum Outgoing {
    /// Over the fast path's sockets ([`bridge`]): the HTTP/1.1 head and
    /// body, and whether the method is `HEAD`.
    Raw(Vec<u8>, bool),
    /// To HTTP/2 endpoints without a header map ([`Upstream::send_relay`]).
    Relay { head: Relay, body: Sendable },
    /// Through the endpoint's client ([`Upstream::send`]).
    Sent {
        parts: http::request::Parts,
        body: Sendable,
        /// Towards HTTP/2, the client's host.
        authority: Option<http::uri::Authority>,
        /// The protocol an upgrade asks for, and the client's side of it.
        upgrade: Option<HeaderValue>,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    },
}

/// What a request's attempts need to know of it.
struct Ask {
    hash: Option<u64>,
    presented: Option<AffinityToken>,
    idempotent: bool,
    /// A gRPC call's own deadline, when shorter than `timeouts.request`.
    call_timeout: Option<std::time::Duration>,
    start: balance::Nanos,
}

/// Sends `out` to endpoints until one answers (retries, circuit breaking,
/// timeouts as configured); the response, its body tracked to its end.
async fn attempts(
    shared: &Arc<Shared>,
    rt: &Runtime,
    out: &mut Outgoing,
    ask: Ask,
    stream: Option<StreamClock>,
) -> Result<Response<ProxyBody>, Failure> {
    let http2 = rt.config.app_protocol.is_http2();
    let timeouts = &rt.config.timeouts;
    let Ask { hash, presented, idempotent, call_timeout, start } = ask;
    let mut attempts = Attempts::new(shared, rt, idempotent);
    let retries = attempts.retries;
    let settings = attempts.settings();
    let began = tokio::time::Instant::now();
    let deadline = began + call_timeout.unwrap_or(timeouts.request.0);

    let mut now = start;
    for attempt in 0..=retries {
        let Some((mut pick, upstream)) = attempts.pick(attempt, hash, presented, now)? else { continue };
        let stats = &upstream.stats;
        let per_attempt = match (call_timeout, attempt) {
            (Some(_), _) => deadline,
            (None, 0) => began + timeouts.request.0,
            (None, _) => tokio::time::Instant::now() + timeouts.request.0,
        };
        let sent = match out {
            Outgoing::Raw(wire, is_head) => {
                let exchange = bridge::exchange(upstream, wire, *is_head, settings, idempotent);
                tokio::time::timeout_at(per_attempt, exchange)
                    .await
                    .map(|r| r.map(|resp| (resp.map(EndpointBody::Raw), Lease::raw(upstream.clone()))))
            }
            Outgoing::Relay { head, body } => {
                let Some(attempt_body) = body.next() else { return Err(Failure::Upstream) };
                let exchange = upstream.send_relay(head, attempt_body, settings);
                tokio::time::timeout_at(per_attempt, exchange).await
            }
            Outgoing::Sent { parts, body, authority, .. } => {
                let Some(attempt_body) = body.next() else { return Err(Failure::Upstream) };
                parts.uri = upstream_uri(&parts.uri, authority.as_ref().unwrap_or(&upstream.authority), http2);
                // Boxed by `send`, sized to the protocol it speaks.
                let exchange = upstream.send(parts, attempt == retries, attempt_body, settings);
                tokio::time::timeout_at(per_attempt, exchange).await
            }
        };
        let clock = rt.set.clock();
        now = clock.now();
        match sent {
            Ok(Ok((mut resp, lease))) => {
                if stream.is_none()
                    && let EndpointBody::H2(body) = resp.body_mut()
                {
                    // hyper's server writes the head from the header map alone.
                    let mut map = HeaderMap::new();
                    body.fields_into(&mut map);
                    *resp.headers_mut() = map;
                }
                pick.observe_latency_at(now);
                let status = resp.status();
                let class = class_of(status.as_u16());
                stats.count(class);
                let second = tracks::now_s();
                upstream.track.answered(second, class, balance::duration_nanos(now.since(start)));
                if let Outgoing::Sent { client_upgrade, upgrade: Some(requested), .. } = out {
                    if let Some(client) = client_upgrade.take()
                        && status == StatusCode::SWITCHING_PROTOCOLS
                    {
                        upstream.track.completed(second, false);
                        return Ok(upgrade::tunnel(shared, rt, client, resp, requested, pick, lease));
                    }
                    shared.metrics.upgrade("refused");
                }
                // A bridged response's fields are not in its map.
                let field = |name: &HeaderName| match resp.body() {
                    EndpointBody::Raw(raw) => raw.field(name.as_str().as_bytes()),
                    EndpointBody::H2(h2) => h2
                        .field(name.as_str().as_bytes())
                        .or_else(|| resp.headers().get(name).map(HeaderValue::as_bytes)),
                    EndpointBody::Hyper(_) => resp.headers().get(name).map(HeaderValue::as_bytes),
                };
                let grpc_response = field(&header::CONTENT_TYPE).is_some_and(grpc::is_grpc_type);
                let mut outcome = if status.is_server_error() { Outcome::Failure } else { Outcome::Success };
                if grpc_response && let Some(code) = field(&grpc::GRPC_STATUS).and_then(grpc::status_value) {
                    // A trailers-only answer: the call's outcome is in the headers.
                    stats.count_grpc(code);
                    upstream.track.grpc_status(code);
                    if grpc::is_endpoint_failure(code) {
                        outcome = Outcome::Failure;
                    }
                }
                match out {
                    // The request's head has gone out for good.
                    Outgoing::Sent { parts, .. } => {
                        strip_hop_by_hop(resp.headers_mut());
                        recycle(std::mem::take(&mut parts.headers));
                    }
                    // A bridged response's head left them out already, an
                    // HTTP/2 endpoint's raw fields too.
                    Outgoing::Raw(..) | Outgoing::Relay { .. } => {}
                }
                if let Some(a) = &rt.affinity
                    && presented != Some(pick.affinity_token())
                    && let Ok(v) =
                        HeaderValue::from_str(&format!("{}={}{}", a.cookie, pick.affinity_token(), a.attributes))
                {
                    resp.headers_mut().append(header::SET_COOKIE, v);
                }
                let (rparts, rbody) = resp.into_parts();
                let mut tracked = Box::new(TrackedBody::new(rbody, pick, outcome, lease, grpc_response));
                if call_timeout.is_some() {
                    tracked.deadline = Some(Box::pin(tokio::time::sleep_until(deadline)));
                }
                if let Some(clock) = stream {
                    clock.touch();
                    tracked.idle =
                        Some(StreamIdle { clock, limit: timeouts.body_idle.0, timer: None, shared: shared.clone() });
                }
                return Ok(Response::from_parts(rparts, Either::Left(tracked)));
            }
            Ok(Err(UpstreamError::Overflow)) => attempts.overflowed(pick, attempt)?,
            Ok(Err(e)) => {
                if matches!(out, Outgoing::Sent { upgrade: Some(_), .. }) {
                    shared.metrics.upgrade("failed");
                }
                let connect_failed = matches!(e, UpstreamError::Connect(_));
                let unprocessed = connect_failed || matches!(e, UpstreamError::Refused(_));
                attempts.failed(pick, upstream, now, attempt, connect_failed, unprocessed, &e)?;
            }
            Err(_elapsed) => return Err(attempts.timed_out(pick, upstream, now)),
        }
    }
    Err(Failure::Upstream)
}

/// One request's attempts at endpoints, for the hyper path and the fast
/// path alike: the pick that avoids endpoints already tried, circuit
/// breaking, and what a failure means for the endpoint, the retry budget
/// and the client.
pub(crate) struct Attempts<'a> {
    shared: &'a Arc<Shared>,
    rt: &'a Runtime,
    /// Retries allowed after the first attempt.
    pub(crate) retries: usize,
    tried: [SocketAddr; MAX_RETRY_ATTEMPTS as usize + 1],
    /// Every endpoint tried refused the connection so far.
    all_refused: bool,
    idempotent: bool,
}

impl<'a> Attempts<'a> {
    /// A request's attempts under `rt`'s retry policy (a request that may be
    /// retried earns the retry budget its share).
    pub(crate) fn new(shared: &'a Arc<Shared>, rt: &'a Runtime, idempotent: bool) -> Self {
        let retries = rt.config.retries.attempts.min(MAX_RETRY_ATTEMPTS) as usize;
        if retries > 0 {
            shared.retry_budget.deposit();
        }
        let tried = [SocketAddr::from(([0, 0, 0, 0], 0)); MAX_RETRY_ATTEMPTS as usize + 1];
        Attempts { shared, rt, retries, tried, all_refused: true, idempotent }
    }

    /// The settings of connections to endpoints.
    pub(crate) fn settings(&self) -> ConnSettings {
        let (timeouts, breakers) = (&self.rt.config.timeouts, &self.rt.config.circuit_breakers);
        ConnSettings {
            connect_timeout: timeouts.connect.0,
            idle_timeout: timeouts.idle.0,
            max_connections: breakers.max_connections as usize,
            max_pending: breakers.max_pending_requests as usize,
        }
    }

    /// The endpoint of attempt `attempt`, one not tried yet; `None` when it is
    /// at `circuitBreakers.maxRequests` and skipped before anything is sent
    /// (the next attempt is free); past the last attempt, or with no
    /// endpoint left, the failure the client reads.
    pub(crate) fn pick(
        &mut self,
        attempt: usize,
        hash: Option<u64>,
        affinity: Option<AffinityToken>,
        now: balance::Nanos,
    ) -> Result<Option<(Pick, &'a Arc<Upstream>)>, Failure> {
        let breq = balance::Request { hash, affinity, exclude: &self.tried[..attempt] };
        let Some(pick) = self.shared.pick(self.rt, &breq, now) else {
            return Err(match attempt {
                0 => Failure::NoEndpoint,
                _ if self.all_refused => Failure::Unreachable,
                _ => Failure::Upstream,
            });
        };
        self.tried[attempt] = pick.addr();
        // Every member of the set has an upstream; a miss would be a bug, not a client's fault.
        let upstream = self.rt.upstreams.get(&pick.addr()).ok_or(Failure::Upstream)?;
        if pick.endpoint().in_flight() > self.rt.config.circuit_breakers.max_requests {
            pick.complete(Outcome::Cancelled);
            self.shared.metrics.overflow("maxRequests");
            return if attempt == self.retries { Err(Failure::Overflow) } else { Ok(None) };
        }
        Ok(Some((pick, upstream)))
    }

    /// The endpoint had `maxConnections` open and `maxPendingRequests`
    /// waiting: nothing was sent and it is not at fault, like `maxRequests`.
    pub(crate) fn overflowed(&self, pick: Pick, attempt: usize) -> Result<(), Failure> {
        pick.complete(Outcome::Cancelled);
        self.shared.metrics.overflow("maxPendingRequests");
        if attempt == self.retries { Err(Failure::Overflow) } else { Ok(()) }
    }

    /// The exchange failed (the connection could not open when
    /// `connect_failed`; the endpoint never processed the request when
    /// `unprocessed`). `Ok` when the request goes to another endpoint.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn failed(
        &mut self,
        pick: Pick,
        upstream: &Upstream,
        now: balance::Nanos,
        attempt: usize,
        connect_failed: bool,
        unprocessed: bool,
        error: &dyn std::fmt::Display,
    ) -> Result<(), Failure> {
        upstream.stats.count(NO_RESPONSE);
        upstream.track.no_response(tracks::now_s());
        self.shared.endpoint_failed(self.rt, pick, now);
        self.all_refused &= connect_failed;
        let safe = unprocessed || self.idempotent;
        tracing::debug!(endpoint = %self.tried[attempt], %error, safe, "request to endpoint failed");
        if !safe || attempt == self.retries {
            return Err(if self.all_refused { Failure::Unreachable } else { Failure::Upstream });
        }
        // A request the endpoint never processed cost it nothing, so its
        // retry is free; a retry of a request an endpoint may have worked on
        // is paid from the budget.
        if !unprocessed && !self.shared.retry_budget.withdraw() {
            self.shared.metrics.retry(false);
            return Err(Failure::Upstream);
        }
        self.shared.metrics.retry(true);
        Ok(())
    }

    /// No answer within the request's timeout: the endpoint failed, and the
    /// client reads a timeout (not retried: the time is spent).
    pub(crate) fn timed_out(&self, pick: Pick, upstream: &Upstream, now: balance::Nanos) -> Failure {
        upstream.stats.count(NO_RESPONSE);
        upstream.track.no_response(tracks::now_s());
        self.shared.endpoint_failed(self.rt, pick, now);
        Failure::Timeout
    }
}

/// Methods that may be sent twice without changing the outcome (RFC 9110 §9.2.2).
pub(crate) fn is_idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

/// What a request's consistent-hashing key is made of, read before the
/// headers are rewritten; the client address is known only after.
pub(crate) enum HashInput {
    ClientIp,
    Value(u64),
    Missing,
}

impl HashInput {
    pub(crate) fn resolve(self, client: IpAddr) -> Option<u64> {
        match self {
            HashInput::ClientIp => Some(match client {
                IpAddr::V4(ip) => hash_key(&ip.octets()),
                IpAddr::V6(ip) => hash_key(&ip.octets()),
            }),
            HashInput::Value(h) => Some(h),
            HashInput::Missing => None,
        }
    }
}

fn request_hash_input(key: &HashKey, headers: &HeaderMap, peer: &Peer) -> HashInput {
    hash_input(key, peer, |name| headers.get(name).map(HeaderValue::as_bytes), |name| cookie(headers, name))
}

/// A request's hashing key, from its header named `header(name)` or its
/// cookie `cookie(name)`, or the connection.
pub(crate) fn hash_input<'h>(
    key: &HashKey,
    peer: &Peer,
    header: impl FnOnce(&HeaderName) -> Option<&'h [u8]>,
    cookie: impl FnOnce(&str) -> Option<&'h str>,
) -> HashInput {
    let found = match key {
        HashKey::ClientCertificate => peer.cert.as_ref().map(|c| c.subject_hash),
        HashKey::SourceIp => return HashInput::ClientIp,
        HashKey::Header(name) => header(name).map(hash_key),
        HashKey::Cookie(name) => cookie(name).map(|v| hash_key(v.as_bytes())),
    };
    found.map_or(HashInput::Missing, HashInput::Value)
}

/// The value of cookie `name`, from any `Cookie` header.
pub(crate) fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    cookie_in(headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()), name)
}

/// The value of cookie `name` among `Cookie` header values.
pub(crate) fn cookie_in<'h>(values: impl Iterator<Item = &'h str>, name: &str) -> Option<&'h str> {
    values
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1),
/// `Connection` first ([`strip_hop_by_hop`] relies on it).
const HOP_BY_HOP_COUNT: usize = 8;
const HOP_BY_HOP: [HeaderName; HOP_BY_HOP_COUNT] = [
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
    // One pass over the names, then a lookup only for those present: most
    // messages carry none, a gRPC call only `TE`.
    let mut present = [false; HOP_BY_HOP_COUNT];
    let mut transfer_encoding = false;
    for name in headers.keys() {
        if name == header::TRANSFER_ENCODING {
            transfer_encoding = true;
        } else if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
        }
    }
    // `HOP_BY_HOP[0]` is `Connection`: the fields it names go too.
    if present[0] {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.eq_ignore_ascii_case("close") && !t.eq_ignore_ascii_case("keep-alive"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in &named {
            headers.remove(name);
        }
    }
    for (name, here) in HOP_BY_HOP.iter().zip(present) {
        if here {
            headers.remove(name);
        }
    }
    if transfer_encoding {
        headers.remove(header::TRANSFER_ENCODING);
    }
}

/// Whether the client accepts trailers (`TE: trailers`); gRPC needs it to reach the endpoint.
fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers")))
}

/// Header maps kept per worker for the next messages (as many as the fast
/// path keeps buffers: a burst of streams takes dozens at once).
const POOLED_MAPS: usize = 256;

/// The least room a map is made with: a request's dozen fields with what
/// the proxy adds, so that a pooled map made for a small response does not
/// have to grow (and be made anew) for the next request.
const MAP_ROOM: usize = 12;

/// A map is pooled while its room is at most this many fields (a message
/// with more fields is rare, and its map large).
const POOLED_MAP_ROOM: usize = 48;

thread_local! {
    static MAPS: std::cell::RefCell<Vec<HeaderMap>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An empty header map with room for `fields`, from this worker's pool (a
/// map is two allocations, one of them above glibc's per-thread cache for a
/// dozen fields), or a new one.
pub(crate) fn header_map(fields: usize) -> HeaderMap {
    match MAPS.with_borrow_mut(Vec::pop) {
        Some(mut map) => {
            map.reserve(fields);
            map
        }
        None => HeaderMap::with_capacity(fields.max(MAP_ROOM)),
    }
}

/// Gives a map whose fields have been sent back to this worker's pool.
pub(crate) fn recycle(mut map: HeaderMap) {
    if map.capacity() == 0 || map.capacity() > POOLED_MAP_ROOM {
        return;
    }
    map.clear();
    MAPS.with_borrow_mut(|pool| {
        if pool.len() < POOLED_MAPS {
            pool.push(map);
        }
    });
}

/// How many fields [`prepare_request`] may add to a request (`TE`, `Host`,
/// `X-Forwarded-Client-Cert`, `X-Forwarded-For`, `X-Forwarded-Proto`): room
/// to leave in a header map made for one.
pub(crate) const ADDED_FIELDS: usize = 5;

/// Rewrites a client request for an endpoint: hop-by-hop headers removed
/// (`TE: trailers` kept), `Host` kept (taken from the URI for HTTP/2
/// clients), the forwarding headers set ([`forwarding`]), and
/// `X-Forwarded-Client-Cert` set from a verified client certificate only
/// (a client's own is always removed). Returns the client's address.
fn prepare_request(
    parts: &mut http::request::Parts,
    peer: &Peer,
    trusted: &[super::config::Cidr],
    http2: bool,
) -> IpAddr {
    let headers = &mut parts.headers;
    let trailers = accepts_trailers(headers);
    strip_hop_by_hop(headers);
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if !headers.contains_key(header::HOST)
        && let Some(auth) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(auth.as_str())
    {
        headers.insert(header::HOST, v);
    }
    parts.version = if http2 { Version::HTTP_2 } else { Version::HTTP_11 };
    headers.remove(&X_FORWARDED_CLIENT_CERT);
    if let Some(cert) = &peer.cert {
        headers.insert(X_FORWARDED_CLIENT_CERT.clone(), cert.xfcc.clone());
    }
    forwarding::apply(headers, peer, trusted)
}

/// The request target sent to an endpoint. HTTP/1.1 gets the origin form
/// (`/path?query`, RFC 9112 §3.2.1): an origin server takes the host from an
/// absolute target, and it must see the client's `Host`, not the endpoint's
/// address. HTTP/2 carries scheme and authority as pseudo-headers: the
/// client's host, or the endpoint's address when the client sent none.
fn upstream_uri(original: &Uri, authority: &http::uri::Authority, http2: bool) -> Uri {
    // The asterisk form (`OPTIONS *`) is sent as `/`.
    let path = original
        .path_and_query()
        .filter(|pq| pq.as_str().starts_with('/'))
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    if !http2 {
        return Uri::from(path);
    }
    let mut p = http::uri::Parts::default();
    p.scheme = Some(http::uri::Scheme::HTTP);
    p.authority = Some(authority.clone());
    p.path_and_query = Some(path);
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
    inner: EndpointBody,
    done: Option<(Pick, Outcome, Lease)>,
    /// A gRPC response: its `grpc-status` trailer decides the outcome, and a
    /// failure mid-stream ends it with gRPC trailers rather than a reset.
    grpc: bool,
    /// The end of a gRPC call's `grpc-timeout`, if it set one.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The stream's `bodyIdle` watch (HTTP/2 clients).
    idle: Option<StreamIdle>,
    /// The proxy ended the body itself (trailers sent).
    ended: bool,
}

/// Where a response's head fields are when its header map does not hold
/// them; to be read before the body.
pub(crate) enum RawHead<'a> {
    /// All in the map.
    None,
    /// A bridged response's ([`bridge::RawBody::head_fields`]).
    Bridged(&'a bridge::RawBody),
    /// An HTTP/2 endpoint's ([`super::h2c::H2Body::head_fields`]).
    Http2(&'a super::h2c::H2Body),
}

/// Where the head fields of the response whose body is `body` are.
pub(crate) fn raw_head(body: &ProxyBody) -> RawHead<'_> {
    match body {
        Either::Left(tracked) => match &tracked.inner {
            EndpointBody::Raw(raw) => RawHead::Bridged(raw),
            EndpointBody::H2(h2) => RawHead::Http2(h2),
            EndpointBody::Hyper(_) => RawHead::None,
        },
        Either::Right(_) => RawHead::None,
    }
}

/// An endpoint's response body: from hyper's client, or read from a socket
/// of the fast path's pool.
pub(crate) enum EndpointBody {
    Hyper(Incoming),
    Raw(bridge::RawBody),
    H2(super::h2c::H2Body),
}

impl Body for EndpointBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let polled = match self.get_mut() {
            EndpointBody::Hyper(b) => ready!(Pin::new(b).poll_frame(cx)).map(|f| f.map_err(BodyError::Endpoint)),
            EndpointBody::Raw(b) => ready!(Pin::new(b).poll_frame(cx)).map(|f| f.map_err(BodyError::EndpointIo)),
            EndpointBody::H2(b) => ready!(Pin::new(b).poll_frame(cx)).map(|f| f.map_err(BodyError::EndpointStream)),
        };
        Poll::Ready(polled.map(|frame| {
            frame.map(|mut frame| {
                if let Some(trailers) = frame.trailers_mut() {
                    sanitize_trailers(trailers);
                }
                frame
            })
        }))
    }

    fn is_end_stream(&self) -> bool {
        match self {
            EndpointBody::Hyper(b) => b.is_end_stream(),
            EndpointBody::Raw(b) => b.is_end_stream(),
            EndpointBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            EndpointBody::Hyper(b) => b.size_hint(),
            EndpointBody::Raw(b) => b.size_hint(),
            EndpointBody::H2(b) => b.size_hint(),
        }
    }
}

/// Removes from an endpoint's trailers the fields a trailer section may not
/// carry (RFC 9110 §6.5.1: framing, routing, connection management), which
/// an HTTP/2 client would take as a protocol error.
pub(crate) fn sanitize_trailers(trailers: &mut HeaderMap) {
    const NOT_IN_TRAILERS: [HeaderName; 4] =
        [header::CONTENT_LENGTH, header::HOST, header::CONTENT_ENCODING, header::CONTENT_TYPE];
    strip_hop_by_hop(trailers);
    // Trailers are few (gRPC's two or three): look up only when one is there.
    if trailers.keys().any(|k| NOT_IN_TRAILERS.contains(k)) {
        for name in NOT_IN_TRAILERS {
            trailers.remove(name);
        }
    }
}

/// Why an endpoint's response body did not reach its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The endpoint's connection failed.
    #[error("endpoint body: {0}")]
    Endpoint(hyper::Error),
    /// The endpoint's connection failed, or its body was malformed (read
    /// by [`bridge::RawBody`]).
    #[error("endpoint body: {0}")]
    EndpointIo(std::io::Error),
    /// The endpoint's HTTP/2 stream failed.
    #[error("endpoint body: {0}")]
    EndpointStream(super::h2c::StreamError),
    /// Neither direction of the HTTP/2 stream moved for `timeouts.bodyIdle`.
    #[error("stream idle past timeouts.bodyIdle")]
    StreamIdle,
}

/// The `timeouts.bodyIdle` of one HTTP/2 stream. Its timer is armed only
/// when the endpoint's body is waited on, and not reset on every frame: when
/// it fires, the stream's clock says whether anything moved meanwhile.
struct StreamIdle {
    clock: StreamClock,
    limit: std::time::Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    shared: Arc<Shared>,
}

impl StreamIdle {
    /// Whether the stream has been silent for its limit (polling the timer
    /// until then, so the task wakes when it may have been).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let left = self.limit.saturating_sub(self.clock.idle_for());
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(left)));
        while timer.as_mut().poll(cx).is_ready() {
            let idle = self.clock.idle_for();
            if idle >= self.limit {
                return true;
            }
            timer.as_mut().reset(tokio::time::Instant::now() + (self.limit - idle));
        }
        false
    }
}

impl TrackedBody {
    fn new(inner: EndpointBody, pick: Pick, outcome: Outcome, lease: Lease, grpc: bool) -> Self {
        let mut body =
            TrackedBody { inner, done: Some((pick, outcome, lease)), grpc, deadline: None, idle: None, ended: false };
        if body.inner.is_end_stream() {
            body.finish(false);
        }
        body
    }

    fn finish(&mut self, failed: bool) {
        if let Some((pick, outcome, lease)) = self.done.take() {
            lease.upstream().track.completed(tracks::now_s(), failed || outcome == Outcome::Failure);
            if failed {
                pick.complete(Outcome::Failure);
            } else {
                pick.complete(outcome);
                lease.release();
            }
        }
    }

    /// Counts the `grpc-status` of the trailer block and makes it the outcome.
    fn grpc_outcome(&mut self, code: u16) {
        if let Some((_, outcome, lease)) = &mut self.done {
            lease.upstream().stats.count_grpc(code);
            lease.upstream().track.grpc_status(code);
            if grpc::is_endpoint_failure(code) {
                *outcome = Outcome::Failure;
            }
        }
    }

    /// Ends a gRPC response with the proxy's own status: the endpoint failed
    /// or the call's deadline passed after the response had started.
    fn end_grpc(&mut self, failure: Failure) -> Frame<Bytes> {
        if let Some((_, _, lease)) = &self.done {
            lease.upstream().stats.count_grpc(failure.grpc_status());
            lease.upstream().track.grpc_status(failure.grpc_status());
        }
        self.finish(true);
        self.ended = true;
        let mut trailers = HeaderMap::with_capacity(2);
        trailers.insert(grpc::GRPC_STATUS.clone(), HeaderValue::from(failure.grpc_status()));
        trailers.insert(grpc::GRPC_MESSAGE.clone(), HeaderValue::from_static(failure.message()));
        Frame::trailers(trailers)
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if let Some(deadline) = &mut self.deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            // The endpoint's stream is reset (cancelled) when this body is dropped.
            return Poll::Ready(Some(Ok(self.end_grpc(Failure::Timeout))));
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Some(idle) = &mut self.idle {
            if polled.is_ready() {
                idle.clock.touch();
            } else if idle.expired(cx) {
                // Nothing moved either way on this stream: the endpoint is let go
                // (its stream reset when this body drops) and the client's stream ends.
                idle.shared.metrics.timed_out("bodyIdle");
                if self.grpc {
                    return Poll::Ready(Some(Ok(self.end_grpc(Failure::Timeout))));
                }
                self.finish(true);
                self.ended = true;
                return Poll::Ready(Some(Err(BodyError::StreamIdle)));
            }
        }
        match &polled {
            Poll::Ready(None) => self.finish(false),
            Poll::Ready(Some(Err(_))) if self.grpc => {
                // The endpoint went away mid-call: a clean UNAVAILABLE, which
                // the client's retry policy understands, instead of a reset stream.
                return Poll::Ready(Some(Ok(self.end_grpc(Failure::Upstream))));
            }
            Poll::Ready(Some(Err(_))) => self.finish(true),
            Poll::Ready(Some(Ok(frame))) => {
                if self.grpc
                    && let Some(trailers) = frame.trailers_ref()
                {
                    // An HTTP/2 endpoint's trailers are its fields, not the map's.
                    let status = grpc::status(trailers).or_else(|| match &self.inner {
                        EndpointBody::H2(h2) => {
                            h2.trailer(grpc::GRPC_STATUS.as_str().as_bytes()).and_then(grpc::status_value)
                        }
                        _ => None,
                    });
                    self.grpc_outcome(status.unwrap_or(grpc::code::UNKNOWN));
                }
                if self.inner.is_end_stream() {
                    self.finish(false);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || (self.deadline.is_none() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.grpc { SizeHint::default() } else { self.inner.size_hint() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn an_ipv4_address_is_written_as_display_writes_it(bits: u32) {
            let ip = std::net::Ipv4Addr::from(bits);
            let (mut text, display) = ([0; 15], ip.to_string());
            proptest::prop_assert_eq!(dotted(ip, &mut text), display.as_bytes());
        }
    }

    #[test]
    fn the_forwarded_for_value_is_the_peers_address_for_both_families() {
        for (addr, want) in [
            ("127.0.0.1:80", "127.0.0.1"),
            ("10.200.3.45:1", "10.200.3.45"),
            ("255.255.255.255:9", "255.255.255.255"),
            ("0.0.0.0:9", "0.0.0.0"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            ("[::ffff:192.0.2.7]:443", "::ffff:192.0.2.7"),
        ] {
            let peer = Peer::new(addr.parse().unwrap());
            assert_eq!(peer.ip_header, want, "{addr}");
        }
    }

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
    fn every_hop_by_hop_header_goes_with_all_its_values_and_only_those() {
        for name in HOP_BY_HOP.iter().chain([&header::TRANSFER_ENCODING]) {
            let mut h = HeaderMap::new();
            h.append(name, HeaderValue::from_static("a"));
            h.append(name, HeaderValue::from_static("b"));
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.append("x-kept", HeaderValue::from_static("1"));
            h.append("x-kept", HeaderValue::from_static("2"));
            strip_hop_by_hop(&mut h);
            assert!(!h.contains_key(name), "{name} kept");
            assert_eq!(h.len(), 3, "{name}: {h:?}");
        }
        // Several at once, with fields named by more than one Connection value.
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("x-one"));
        h.append(header::CONNECTION, HeaderValue::from_static("X-Two , keep-alive"));
        for name in ["x-one", "x-two", "te", "trailer", "proxy-authorization", "x-three"] {
            h.insert(name, HeaderValue::from_static("v"));
        }
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-three"]);
    }

    #[test]
    fn trailers_lose_the_fields_a_trailer_section_may_not_carry() {
        let mut t = HeaderMap::new();
        for name in ["grpc-status", "content-length", "host", "content-encoding", "content-type", "te", "grpc-message"]
        {
            t.insert(name, HeaderValue::from_static("0"));
        }
        sanitize_trailers(&mut t);
        assert_eq!(t.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["grpc-status", "grpc-message"]);
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        sanitize_trailers(&mut t);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn forwarded_for_is_appended_for_a_trusted_peer_and_proto_set_once() {
        let peer = Peer::new("10.0.0.9:5555".parse().unwrap());
        let req = Request::builder().uri("/a?b=1").header("x-forwarded-for", "1.2.3.4").body(()).unwrap();
        let (mut parts, ()) = req.into_parts();
        let trusted = ["10.0.0.0/8".parse().unwrap()];
        prepare_request(&mut parts, &peer, &trusted, false);
        assert_eq!(parts.headers["x-forwarded-for"], "1.2.3.4, 10.0.0.9");
        assert_eq!(parts.headers["x-forwarded-proto"], "http");
        assert_eq!(parts.version, Version::HTTP_11);
    }

    #[test]
    fn recycled_header_maps_come_back_empty_with_their_room_and_large_ones_are_not_kept() {
        let mut m = header_map(12);
        m.insert(header::HOST, HeaderValue::from_static("a"));
        let room = m.capacity();
        assert!(room >= 12);
        recycle(m);
        let again = header_map(4);
        assert!(again.is_empty());
        assert_eq!(again.capacity(), room);
        recycle(HeaderMap::with_capacity(200));
        assert!(header_map(1).capacity() < 200);
    }

    #[test]
    fn an_http2_request_gets_a_host_header_from_its_authority() {
        let peer = Peer::new("10.0.0.9:5555".parse().unwrap());
        let req = Request::builder().uri("http://shop.example:8080/x").version(Version::HTTP_2).body(()).unwrap();
        let (mut parts, ()) = req.into_parts();
        prepare_request(&mut parts, &peer, &[], false);
        assert_eq!(parts.headers[header::HOST], "shop.example:8080");
    }

    #[test]
    fn the_upstream_uri_is_origin_form_for_http1_and_carries_the_authority_for_http2() {
        let auth = "shop.example".parse().unwrap();
        let uri = upstream_uri(&"http://front/p/q?x=1".parse().unwrap(), &auth, false);
        assert_eq!(uri.to_string(), "/p/q?x=1");
        assert_eq!(upstream_uri(&"*".parse().unwrap(), &auth, false).to_string(), "/");
        let uri = upstream_uri(&"/p?x=1".parse().unwrap(), &auth, true);
        assert_eq!(uri.to_string(), "http://shop.example/p?x=1");
    }

    #[test]
    fn te_trailers_survives_and_other_te_values_do_not() {
        let peer = Peer::new("10.0.0.9:5555".parse().unwrap());
        for (te, kept) in [("trailers", true), ("gzip, Trailers;q=1", true), ("gzip", false)] {
            let req = Request::builder().uri("/").header("te", te).body(()).unwrap();
            let (mut parts, ()) = req.into_parts();
            prepare_request(&mut parts, &peer, &[], true);
            assert_eq!(parts.headers.get("te").is_some(), kept, "{te}");
            assert_eq!(parts.version, Version::HTTP_2);
        }
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
        assert_eq!(Failure::Unreachable.status(), 503);
        assert_eq!(Failure::Upstream.status(), 502);
        assert_eq!(Failure::Timeout.status(), 504);
        assert_eq!(Failure::NoEndpoint.grpc_status(), grpc::code::UNAVAILABLE);
        assert_eq!(Failure::Upstream.grpc_status(), grpc::code::UNAVAILABLE);
        assert_eq!(Failure::Timeout.grpc_status(), grpc::code::DEADLINE_EXCEEDED);
    }
}
