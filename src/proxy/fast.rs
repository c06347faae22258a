//! The HTTP/1.1 fast path: one task moves a request from the client's socket
//! to an endpoint's and the response back, with no header map built, no
//! task per connection to the endpoint and no wake-ups between tasks (the
//! model of HAProxy and Pingora).
//!
//! A client connection starts here when it speaks HTTP/1 and the endpoints
//! speak HTTP/1.1. Each request head is parsed in place ([`super::h1`]);
//! a plain request (see [`h1::Decline`]) with a body of at most
//! [`MAX_BODY`] bytes is read whole, the endpoint is picked and the request
//! sent with its head rewritten as the hyper path would (hop-by-hop headers
//! removed, forwarding headers set, affinity and hashing keys read), over a
//! pooled socket of the endpoint ([`Upstream::raw_connection`]). The
//! response head is parsed, rewritten and written with the first body bytes
//! in one vectored write; the body streams through as it comes, its end
//! found by its framing. Retries, circuit breaking, timeouts, outcomes and
//! metrics follow the hyper path ([`super::http`]) step by step.
//!
//! The first request that is not plain hands the connection, with every
//! byte read and not yet served, to hyper's server for the rest of its life:
//! upgrades, chunked or large uploads, `Expect`, HTTP/1.0 and every head
//! hyper refuses (`400`, `431`) are served exactly as before.
//!
//! While a connection waits for its next request it holds no buffer: they
//! go back to a per-worker pool, so an idle keep-alive connection costs its
//! socket and its task.

use std::cell::RefCell;
use std::io::IoSlice;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::BufMut;
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::conn::Limits;
use super::h1::{self, Chunked, Framing, Kind, RequestHead, ResponseHead, Span};
use super::http::{Attempts, Failure, Peer, cookie_in, hash_input};
use super::metrics::class_of;
use super::socket::ClientSocket;
use super::state::{Runtime, Shared};
use super::upstream::{ConnSettings, RawConn, Upstream, UpstreamError};
use super::{forwarding, tracks};
use crate::balance::{self, AffinityToken, Outcome};

/// Largest request body the fast path takes; a larger one is streamed by
/// the hyper path.
pub(crate) const MAX_BODY: u64 = 64 * 1024;

/// Size of the buffers an endpoint's response is read into: a body streams
/// through in reads of this size.
const BUFFER: usize = 16 * 1024;

/// Size of the buffers a client's request is read into and heads are
/// written into; they grow when a message needs more.
const SMALL: usize = 4 * 1024;

/// Buffers of each size kept per worker for connections between requests.
const POOLED_BUFFERS: usize = 256;

thread_local! {
    static BIG: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    static SMALL_BUFFERS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A small buffer from this worker's pool (or a new one).
pub(crate) fn take_buffer() -> Vec<u8> {
    SMALL_BUFFERS.with_borrow_mut(Vec::pop).unwrap_or_else(|| Vec::with_capacity(SMALL))
}

/// A buffer for an endpoint's response from this worker's pool (or a new one).
fn take_big() -> Vec<u8> {
    BIG.with_borrow_mut(Vec::pop).unwrap_or_else(|| Vec::with_capacity(BUFFER))
}

/// Gives a buffer back to the pool of its size (one grown past four times
/// the larger size is shrunk first).
pub(crate) fn give_buffer(mut buf: Vec<u8>) {
    if buf.capacity() < SMALL {
        return;
    }
    buf.clear();
    if buf.capacity() > 4 * BUFFER {
        buf.shrink_to(BUFFER);
    }
    let pool = if buf.capacity() >= BUFFER { &BIG } else { &SMALL_BUFFERS };
    pool.with_borrow_mut(|pool| {
        if pool.len() < POOLED_BUFFERS {
            pool.push(buf);
        }
    });
}

/// A client socket the fast path serves.
pub(crate) trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {
    /// Whether [`ClientStream::readable`] tells when bytes arrive, so that
    /// the connection can wait for its next request without a buffer.
    const WAITS_WITHOUT_BUFFER: bool;

    /// Completes when the socket may have bytes to read.
    fn readable(&mut self) -> impl Future<Output = std::io::Result<()>> + Send;
}

impl ClientStream for ClientSocket {
    const WAITS_WITHOUT_BUFFER: bool = true;

    fn readable(&mut self) -> impl Future<Output = std::io::Result<()>> + Send {
        ClientSocket::readable(self)
    }
}

impl ClientStream for tokio_rustls::server::TlsStream<ClientSocket> {
    /// The TLS session may hold decrypted bytes the socket no longer signals.
    const WAITS_WITHOUT_BUFFER: bool = false;

    fn readable(&mut self) -> impl Future<Output = std::io::Result<()>> + Send {
        std::future::ready(Ok(()))
    }
}

/// How a client connection left the fast path.
pub(crate) enum Left {
    /// Closed (by either side, a timeout or the drain).
    Closed,
    /// A request the fast path does not take: these bytes, read from the
    /// client and not yet served, go to hyper's server with the connection.
    Handoff(Vec<u8>),
}

/// One client connection's buffers and parsed heads, reused request after request.
struct Conn<'a> {
    shared: &'a Arc<Shared>,
    peer: &'a Peer,
    limits: Limits,
    /// Bytes from the client not yet served.
    client: Vec<u8>,
    /// Bytes from the endpoint.
    upstream: Vec<u8>,
    /// The head being written.
    out: Vec<u8>,
    /// The request head sent to the endpoint.
    sent: Vec<u8>,
    req: RequestHead,
    resp: ResponseHead,
}

/// Why an exchange with an endpoint failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Broken {
    #[error(transparent)]
    Upstream(UpstreamError),
    /// The endpoint's connection failed or answered nonsense after the
    /// request may have reached it.
    #[error("exchange failed after the request was sent")]
    Exchange,
}

impl From<UpstreamError> for Broken {
    fn from(e: UpstreamError) -> Self {
        Broken::Upstream(e)
    }
}

/// Serves `io`, whose first bytes are in `client`, until it closes or hands off.
pub(crate) async fn serve<S: ClientStream>(
    shared: &Arc<Shared>,
    io: &mut S,
    client: Vec<u8>,
    peer: &Peer,
    limits: Limits,
    graceful: &CancellationToken,
) -> Left {
    let mut c = Conn {
        shared,
        peer,
        limits,
        client,
        upstream: take_big(),
        out: take_buffer(),
        sent: take_buffer(),
        req: RequestHead::default(),
        resp: ResponseHead::default(),
    };
    let left = c.run(io, graceful).await;
    for buf in [c.client, c.upstream, c.out, c.sent] {
        give_buffer(buf);
    }
    left
}

/// `f` unless `deadline` passes first.
async fn within<T>(deadline: Instant, f: impl Future<Output = T>) -> Option<T> {
    tokio::time::timeout_at(deadline, f).await.ok()
}

/// Reads what is there into `buf`, making room first; 0 at the end of the stream.
async fn read_more<R: AsyncRead + Unpin>(io: &mut R, buf: &mut Vec<u8>, limit: usize) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(SMALL);
    }
    let mut limited = buf.limit(limit);
    io.read_buf(&mut limited).await
}

/// Writes the head of `req` (read from `buf`) for the endpoint into
/// `sent`: hop-by-hop fields removed, the forwarding fields set (from a
/// trusted proxy's chain, or the peer); returns the request's hashing key
/// and the affinity token it presented. The fast path's and the HTTP/2
/// bridge's ([`super::bridge::RawRequest`]).
pub(crate) fn prepare(
    rt: &Runtime,
    peer: &Peer,
    buf: &[u8],
    req: &RequestHead,
    sent: &mut Vec<u8>,
) -> (Option<u64>, Option<AffinityToken>) {
    let look = look(rt, peer, buf, &req.headers);
    h1::write_request(buf, req, &look.forwarded(peer), sent);
    (look.hash, look.presented)
}

/// What the proxy reads of a request's head (its fields `headers`, in
/// `buf`) before it goes on: its keys for balancing and the forwarding
/// fields it is to carry.
pub(crate) struct Look {
    /// The consistent-hashing key.
    pub(crate) hash: Option<u64>,
    /// The affinity token the request presented.
    pub(crate) presented: Option<AffinityToken>,
    /// A trusted peer's `X-Forwarded-For` chain with the peer added.
    chain: Vec<u8>,
    /// The peer is a trusted proxy.
    trusted: bool,
}

impl Look {
    /// The forwarding fields for the request of `peer`.
    pub(crate) fn forwarded<'a>(&'a self, peer: &'a Peer) -> h1::Forwarded<'a> {
        h1::Forwarded {
            forwarded_for: if self.trusted { &self.chain } else { peer.ip_header.as_bytes() },
            proto: if peer.https { b"https" } else { b"http" },
            keep_client_proto: self.trusted,
            client_cert: peer.cert.as_ref().map(|c| c.xfcc.as_bytes()),
        }
    }
}

/// Reads a request head's fields `headers` (in `buf`) for [`Look`].
pub(crate) fn look(rt: &Runtime, peer: &Peer, buf: &[u8], headers: &[Span]) -> Look {
    let cookies = || h1::values(buf, headers, Kind::Cookie);
    let presented = rt
        .affinity
        .as_ref()
        .and_then(|a| cookie_in(cookies(), &a.cookie))
        .and_then(|v| v.parse::<AffinityToken>().ok());
    let hash_source = rt.hash.as_ref().map(|key| {
        hash_input(key, peer, |name| h1::value_of(buf, headers, name.as_str()), |name| cookie_in(cookies(), name))
    });
    let peer_ip = peer.addr.ip();
    let trusted = !rt.trusted.is_empty() && rt.trusted.iter().any(|c| c.contains(peer_ip));
    let mut chain = Vec::new();
    let client_ip: IpAddr = if trusted {
        for v in headers.iter().filter(|h| h.kind == Kind::ForwardedFor) {
            if !chain.is_empty() {
                chain.extend_from_slice(b", ");
            }
            chain.extend_from_slice(&buf[v.value.clone()]);
        }
        let client = forwarding::client_of(&chain, peer_ip, &rt.trusted);
        if !chain.is_empty() {
            chain.extend_from_slice(b", ");
        }
        chain.extend_from_slice(peer.ip_header.as_bytes());
        client
    } else {
        peer_ip
    };
    Look { hash: hash_source.and_then(|h| h.resolve(client_ip)), presented, chain, trusted }
}

/// Sends a request (`head` and `body`, both raw bytes) on a connection of
/// `upstream`'s fast-path pool and reads the response head into `resp`,
/// its bytes and any that followed into `buf` (to a `HEAD` request when
/// `is_head`). A pooled connection the endpoint closed before answering
/// anything is replaced by a new one once, for a request that may be sent
/// twice. For the fast path and for HTTP/2 clients' requests
/// ([`super::bridge`]).
pub(crate) async fn send_raw(
    upstream: &Upstream,
    settings: ConnSettings,
    idempotent: bool,
    (head, body): (&[u8], &[u8]),
    buf: &mut Vec<u8>,
    is_head: bool,
    resp: &mut ResponseHead,
) -> Result<RawConn, Broken> {
    let mut stale_retry = idempotent;
    loop {
        let (mut conn, pooled) = upstream.raw_connection(settings).await?;
        buf.clear();
        let read = match write_both(&mut conn.io, head, body).await {
            Ok(()) => read_response_head(&mut conn, buf, is_head, resp).await,
            Err(_) => Err(0),
        };
        match read {
            Ok(()) => return Ok(conn),
            Err(0) if pooled && stale_retry => stale_retry = false,
            Err(_) => return Err(Broken::Exchange),
        }
    }
}

/// Reads a response head into `resp`, skipping interim (`1xx`) ones as
/// the hyper path does. `Err(n)`: failed after `n` bytes.
async fn read_response_head(
    conn: &mut RawConn,
    buf: &mut Vec<u8>,
    is_head: bool,
    resp: &mut ResponseHead,
) -> Result<(), usize> {
    let mut got = 0;
    loop {
        match h1::parse_response(buf, is_head, resp) {
            Ok(true) if (100..200).contains(&resp.status) => {
                buf.drain(..resp.len);
                continue;
            }
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(error = %e, "endpoint response refused");
                return Err(got.max(1));
            }
        }
        match read_more(&mut conn.io, buf, usize::MAX).await {
            Ok(0) | Err(_) => return Err(got),
            Ok(n) => got += n,
        }
    }
}

/// Writes `head` and `body` (vectored while both are left).
async fn write_both<W: AsyncWrite + Unpin>(io: &mut W, mut head: &[u8], mut body: &[u8]) -> std::io::Result<()> {
    while !head.is_empty() && !body.is_empty() {
        let n = io.write_vectored(&[IoSlice::new(head), IoSlice::new(body)]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_head = n.min(head.len());
        head = &head[from_head..];
        body = &body[n - from_head..];
    }
    io.write_all(head).await?;
    io.write_all(body).await
}

impl Conn<'_> {
    async fn run<S: ClientStream>(&mut self, io: &mut S, graceful: &CancellationToken) -> Left {
        loop {
            if self.client.is_empty() {
                let idle_until = Instant::now() + self.limits.idle;
                tokio::select! {
                    next = within(idle_until, self.next_request(io)) => {
                        if !matches!(next, Some(true)) {
                            return Left::Closed;
                        }
                    }
                    () = graceful.cancelled() => return Left::Closed,
                }
            }
            let rt = self.shared.current.load_full();
            let max_head = rt.config.limits.max_request_header_bytes as usize;
            let max_headers = rt.config.limits.max_request_headers as usize;
            let head_by = Instant::now() + self.limits.header;
            loop {
                match h1::parse_request(&self.client, max_head, max_headers, &mut self.req) {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(_) => return Left::Handoff(std::mem::take(&mut self.client)),
                }
                match within(head_by, read_more(io, &mut self.client, usize::MAX)).await {
                    None => {
                        self.shared.metrics.timed_out("header");
                        return Left::Closed;
                    }
                    Some(Ok(0) | Err(_)) => return Left::Closed,
                    Some(Ok(_)) => {}
                }
            }
            if rt.config.app_protocol.is_http2() || self.req.body > MAX_BODY {
                return Left::Handoff(std::mem::take(&mut self.client));
            }
            let total = self.req.len + self.req.body as usize;
            while self.client.len() < total {
                let want = total - self.client.len();
                match within(Instant::now() + self.limits.body_idle, read_more(io, &mut self.client, want)).await {
                    None => {
                        self.shared.metrics.timed_out("bodyIdle");
                        return Left::Closed;
                    }
                    Some(Ok(0) | Err(_)) => return Left::Closed,
                    Some(Ok(_)) => {}
                }
            }
            let close = self.req.close || graceful.is_cancelled();
            let keep = self.exchange(&rt, io, close).await;
            self.client.drain(..total);
            if !keep || close {
                return Left::Closed;
            }
        }
    }

    /// Waits for the first bytes of the next request; `false` when the
    /// client closed. Over plain TCP the buffers go back to the worker's pool
    /// while the connection waits.
    async fn next_request<S: ClientStream>(&mut self, io: &mut S) -> bool {
        if S::WAITS_WITHOUT_BUFFER {
            for buf in [&mut self.client, &mut self.upstream, &mut self.out, &mut self.sent] {
                give_buffer(std::mem::take(buf));
            }
            loop {
                if io.readable().await.is_err() {
                    return false;
                }
                let mut buf = take_buffer();
                // Readiness can be stale: a read that would wait means wait again.
                match read_more(io, &mut buf, usize::MAX).now_or_never() {
                    None => give_buffer(buf),
                    Some(Ok(0) | Err(_)) => {
                        give_buffer(buf);
                        return false;
                    }
                    Some(Ok(_)) => {
                        self.client = buf;
                        self.upstream = take_big();
                        self.out = take_buffer();
                        self.sent = take_buffer();
                        return true;
                    }
                }
            }
        }
        matches!(read_more(io, &mut self.client, usize::MAX).await, Ok(n) if n > 0)
    }

    /// Forwards the request in `client` and writes the response (the
    /// endpoint's, or the proxy's on failure). Returns whether the client
    /// connection can carry another request.
    async fn exchange<S: ClientStream>(&mut self, rt: &Runtime, io: &mut S, close: bool) -> bool {
        let clock = rt.set.clock();
        let start = clock.now();
        let forwarded = self.forward(rt, io, close, start).await;
        match forwarded {
            Ok(keep) => keep,
            Err(failure) => {
                self.shared.metrics.request_duration.observe_nanos(balance::duration_nanos(clock.now().since(start)));
                self.local_response(io, failure, close).await
            }
        }
    }

    /// Writes the proxy's own answer to a failure.
    async fn local_response<S: ClientStream>(&mut self, io: &mut S, failure: Failure, close: bool) -> bool {
        let status = failure.status();
        self.shared.metrics.local_response(status.as_u16());
        let message = failure.message();
        self.out.clear();
        let head = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n{}\r\n{message}\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            message.len() + 1,
            if close { "connection: close\r\n" } else { "" },
        );
        matches!(within(Instant::now() + self.limits.body_idle, io.write_all(head.as_bytes())).await, Some(Ok(())))
    }

    /// Prepares the head for the endpoint ([`prepare`]).
    fn prepare(&mut self, rt: &Runtime) -> (Option<u64>, Option<AffinityToken>) {
        prepare(rt, self.peer, &self.client, &self.req, &mut self.sent)
    }

    /// The hyper path's `forward`, on sockets: picks, sends, retries, and
    /// streams the response. `Ok(keep)` once a response was written.
    async fn forward<S: ClientStream>(
        &mut self,
        rt: &Runtime,
        io: &mut S,
        close: bool,
        start: balance::Nanos,
    ) -> Result<bool, Failure> {
        let shared = self.shared;
        let (hash, presented) = self.prepare(rt);
        let idempotent = self.req.idempotent;
        let mut attempts = Attempts::new(shared, rt, idempotent);
        let settings = attempts.settings();
        let mut now = start;
        for attempt in 0..=attempts.retries {
            let Some((mut pick, upstream)) = attempts.pick(attempt, hash, presented, now)? else { continue };
            let stats = &upstream.stats;
            let deadline = Instant::now() + rt.config.timeouts.request.0;
            let sent = within(deadline, self.attempt(upstream, settings, idempotent)).await;
            now = rt.set.clock().now();
            match sent {
                Some(Ok(conn)) => {
                    pick.observe_latency_at(now);
                    let status = self.resp.status;
                    let class = class_of(status);
                    stats.count(class);
                    let second = tracks::now_s();
                    upstream.track.answered(second, class, balance::duration_nanos(now.since(start)));
                    let outcome = if status >= 500 { Outcome::Failure } else { Outcome::Success };
                    let cookie = rt
                        .affinity
                        .as_ref()
                        .filter(|_| presented != Some(pick.affinity_token()))
                        .map(|a| format!("{}={}{}", a.cookie, pick.affinity_token(), a.attributes));
                    let framing = self.resp.framing;
                    let close = close || framing == Framing::Close;
                    let extra = cookie.as_deref().map(|c| (&b"set-cookie"[..], c.as_bytes()));
                    h1::write_response(&self.upstream, &self.resp, extra, close, &mut self.out);
                    shared.metrics.request_duration.observe_nanos(balance::duration_nanos(now.since(start)));
                    let relayed = self.relay(io, conn, framing).await;
                    let failed = matches!(relayed, Relayed::EndpointFailed);
                    match relayed {
                        Relayed::ClientGone => return Ok(false),
                        Relayed::Done(reusable) => {
                            upstream.track.completed(tracks::now_s(), outcome == Outcome::Failure);
                            pick.complete(outcome);
                            if let Some(conn) = reusable {
                                upstream.checkin_raw(conn);
                            }
                        }
                        Relayed::EndpointFailed => {
                            upstream.track.completed(tracks::now_s(), true);
                            pick.complete(Outcome::Failure);
                        }
                    }
                    return Ok(!close && !failed);
                }
                Some(Err(Broken::Upstream(UpstreamError::Overflow))) => attempts.overflowed(pick, attempt)?,
                Some(Err(e)) => {
                    let connect_failed = matches!(e, Broken::Upstream(UpstreamError::Connect(_)));
                    attempts.failed(pick, upstream, now, attempt, connect_failed, connect_failed, &e)?;
                }
                None => return Err(attempts.timed_out(pick, upstream, now)),
            }
        }
        Err(Failure::Upstream)
    }

    /// Sends the request and reads the response head ([`send_raw`]).
    async fn attempt(
        &mut self,
        upstream: &Upstream,
        settings: ConnSettings,
        idempotent: bool,
    ) -> Result<RawConn, Broken> {
        let body = &self.client[self.req.len..self.req.len + self.req.body as usize];
        let sent = (&self.sent[..], body);
        send_raw(upstream, settings, idempotent, sent, &mut self.upstream, self.req.head, &mut self.resp).await
    }

    /// Writes the response head and streams the body to the client.
    async fn relay<S: ClientStream>(&mut self, io: &mut S, mut conn: RawConn, framing: Framing) -> Relayed {
        let idle = self.limits.body_idle;
        let shared = self.shared;
        let after_head = self.resp.len;
        let mut chunked = Chunked::default();
        let (mut left, mut reusable) = match framing {
            Framing::Empty => (0, self.upstream.len() == after_head),
            Framing::Length(n) => (n, true),
            Framing::Chunked | Framing::Close => (u64::MAX, framing == Framing::Chunked),
        };
        // The body bytes that came with the head.
        let mut end = self.upstream.len();
        let mut done = left == 0;
        match framing {
            Framing::Length(n) => {
                let have = (end - after_head) as u64;
                if have > n {
                    reusable = false;
                }
                let take = have.min(n);
                end = after_head + take as usize;
                left = n - take;
                done = left == 0;
            }
            Framing::Chunked => match chunked.feed(&self.upstream[after_head..]) {
                Ok((used, ended)) => {
                    end = after_head + used;
                    done = ended;
                    reusable = !ended || end == self.upstream.len();
                }
                Err(_) => return self.abort(io).await,
            },
            _ => {}
        }
        let first = &self.upstream[after_head..end];
        if !self.to_client(io, &self.out, first).await {
            return Relayed::ClientGone;
        }
        while !done {
            self.upstream.clear();
            let want = usize::try_from(left).unwrap_or(usize::MAX).min(BUFFER);
            match within(Instant::now() + idle, read_more(&mut conn.io, &mut self.upstream, want)).await {
                None => {
                    shared.metrics.timed_out("bodyIdle");
                    return Relayed::EndpointFailed;
                }
                Some(Ok(0)) if framing == Framing::Close => {
                    return Relayed::Done(None);
                }
                Some(Ok(0) | Err(_)) => return Relayed::EndpointFailed,
                Some(Ok(n)) => {
                    let mut send = n;
                    match framing {
                        Framing::Length(_) => {
                            left -= n as u64;
                            done = left == 0;
                        }
                        Framing::Chunked => match chunked.feed(&self.upstream) {
                            Ok((used, ended)) => {
                                send = used;
                                done = ended;
                                reusable = used == n;
                            }
                            Err(_) => return Relayed::EndpointFailed,
                        },
                        _ => {}
                    }
                    if !self.to_client(io, &[], &self.upstream[..send]).await {
                        return Relayed::ClientGone;
                    }
                }
            }
        }
        Relayed::Done(reusable.then_some(conn))
    }

    /// Writes to the client within `timeouts.bodyIdle`; `false` when it went
    /// away or stopped reading (counted as a `bodyIdle` timeout).
    async fn to_client<S: ClientStream>(&self, io: &mut S, head: &[u8], body: &[u8]) -> bool {
        match within(Instant::now() + self.limits.body_idle, write_both(io, head, body)).await {
            Some(result) => result.is_ok(),
            None => {
                self.shared.metrics.timed_out("bodyIdle");
                false
            }
        }
    }

    /// An endpoint's body that cannot be passed on, found before anything was
    /// written: the client reads a `502`.
    async fn abort<S: ClientStream>(&mut self, io: &mut S) -> Relayed {
        if self.local_response(io, Failure::Upstream, true).await {
            Relayed::EndpointFailed
        } else {
            Relayed::ClientGone
        }
    }
}

/// How a response body's relay ended.
enum Relayed {
    /// Whole; the endpoint's connection, if it can carry another request.
    Done(Option<RawConn>),
    /// The endpoint failed or stalled mid-body: the client connection closes.
    EndpointFailed,
    /// The client went away or stopped reading.
    ClientGone,
}
