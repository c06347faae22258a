//! Per-endpoint state of the proxy: counters for metrics, and the
//! connections to the endpoint: a pool of keep-alive HTTP/1.1 connections,
//! or a few multiplexed HTTP/2 connections.
//!
//! The pools are the proxy's own rather than a generic client's: each worker
//! thread has its own connections per endpoint (driven by that worker's
//! event loop, so a request never wakes another thread), checking a
//! connection out and back in costs no task spawn, and a connection found
//! closed when a request is about to use it gives the request back
//! untouched, so it goes out on another connection instead of failing.
//!
//! HTTP/2: a request is a stream on the first connection of the worker with
//! room under the endpoint's `SETTINGS_MAX_CONCURRENT_STREAMS` (read from the
//! live connection); when all are full, another connection opens. A
//! connection that received `GOAWAY` takes no new stream and finishes those
//! below its last stream id; streams the endpoint refused (`REFUSED_STREAM`,
//! or above the `GOAWAY` id) were never processed and are reported as
//! [`UpstreamError::Refused`], so the caller may send them again elsewhere.
//!
//! Circuit breaking (Envoy's `max_connections` and `max_pending_requests`):
//! the connections to an endpoint are counted over all workers, and a request
//! that needs a new one while the endpoint has `maxConnections` open waits
//! for one to come back to a pool (or for an HTTP/2 stream to end), taking
//! idle connections from other workers' pools too. At most
//! `maxPendingRequests` wait; one more is turned away at once
//! ([`UpstreamError::Overflow`]), and a waiter is bounded by the request's
//! own timeout.

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use http::{Request, Response};
use hyper::body::Body;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::tls::{EndpointConnector, TlsState};

use super::h2c;
use super::http::{EndpointBody, UpstreamBody};
use super::metrics::EndpointStats;
use super::relay::Relay;
use super::tracks::TrackStats;

/// Idle keep-alive connections kept per endpoint and worker.
pub(crate) const MAX_IDLE: usize = 256;

/// HTTP/2 connections kept per endpoint and worker.
const MAX_H2_CONNECTIONS: usize = 64;

thread_local! {
    /// The worker this thread is (1-based); 0 on threads that are not workers.
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Marks the current thread as worker `index` (0-based).
pub(crate) fn enter_worker(index: usize) {
    WORKER.with(|w| w.set(index + 1));
}

fn worker_slot(slots: usize) -> usize {
    WORKER.with(Cell::get).min(slots - 1)
}

/// This worker's list of `lists`.
fn own<T>(lists: &[Mutex<Vec<T>>]) -> std::sync::MutexGuard<'_, Vec<T>> {
    lists[worker_slot(lists.len())].lock().unwrap_or_else(|p| p.into_inner())
}

/// One endpoint as the proxy sees it.
#[derive(Debug)]
pub(crate) struct Upstream {
    pub(crate) addr: SocketAddr,
    /// The address as an HTTP authority, built once.
    pub(crate) authority: http::uri::Authority,
    pub(crate) stats: EndpointStats,
    /// The evidence of the endpoint's track.
    pub(crate) track: Arc<TrackStats>,
    /// Whether the endpoint is spoken to over HTTP/2.
    pub(crate) http2: bool,
    /// Idle HTTP/1.1 connections, one list per worker (and one for other threads).
    /// Each list is only ever locked by its own thread, so the lock is uncontended.
    idle: Pools<http1::SendRequest<UpstreamBody>>,
    /// Idle HTTP/1.1 connections of the fast path ([`super::fast`]), kept
    /// as sockets, one list per worker like `idle`.
    raw: Pools<RawConn>,
    /// HTTP/2 connections, one list per worker (and one for other threads).
    h2: Box<[Mutex<Vec<H2Conn>>]>,
    /// Held while a worker opens an HTTP/2 connection, so a burst of requests
    /// waits for one connection instead of opening one each.
    h2_opening: Box<[tokio::sync::Mutex<()>]>,
    /// Set once the endpoint failed its first HTTP/2 exchange (logged once).
    warned: AtomicBool,
    /// Connections open and requests waiting for one.
    capacity: Arc<Capacity>,
    /// The TLS material (new connections use the current set).
    tls: Arc<TlsState>,
    /// Whether connections to the endpoint use TLS.
    tls_enabled: bool,
}

/// The connections open to an endpoint over all workers, and the requests
/// waiting for one. Shared with each connection's task (which must not hold
/// the [`Upstream`]: its pools hold the connection).
#[derive(Debug, Default)]
struct Capacity {
    connections: AtomicUsize,
    pending: AtomicUsize,
    /// Woken when a connection or an HTTP/2 stream frees up while requests wait.
    freed: tokio::sync::Notify,
}

impl Capacity {
    /// Counts one more connection unless `max` are open.
    fn try_open(self: &Arc<Self>, max: usize) -> Option<OpenConn> {
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| OpenConn(self.clone()))
    }

    /// Counts one more waiting request unless `max` wait.
    fn queue(self: &Arc<Self>, max: usize) -> Option<Pending> {
        self.pending
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Pending(self.clone()))
    }

    /// Wakes the waiting requests, if any, to look again.
    fn wake(&self) {
        if self.pending.load(Ordering::SeqCst) > 0 {
            self.freed.notify_waiters();
        }
    }
}

/// One connection counted against `maxConnections`, until its task ends.
struct OpenConn(Arc<Capacity>);

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
        self.0.wake();
    }
}

/// One request counted against `maxPendingRequests` while it waits.
struct Pending(Arc<Capacity>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Idle connections, one list per worker (and one for other threads).
type Pools<T> = Box<[Mutex<Vec<Idle<T>>>]>;

/// A pooled connection and when it went idle.
struct Idle<T> {
    conn: T,
    since: Instant,
}

impl<T> std::fmt::Debug for Idle<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idle").field("since", &self.since).finish_non_exhaustive()
    }
}

/// A connection that can wait in a pool.
trait Pooled {
    /// Whether it can still carry a request (the endpoint has not closed it).
    fn usable(&self) -> bool;
}

impl Pooled for http1::SendRequest<UpstreamBody> {
    fn usable(&self) -> bool {
        !self.is_closed()
    }
}

/// An HTTP/1.1 connection of the fast path: the socket itself, counted
/// against `maxConnections` until it is dropped.
pub(crate) struct RawConn {
    pub(crate) io: EndpointIo,
    _slot: OpenConn,
}

impl Pooled for RawConn {
    /// Looks at the socket's readiness without a system call unless the event
    /// loop has seen it become readable: an idle connection that is readable
    /// was closed by the endpoint (or sent bytes nobody asked for). Over TLS,
    /// bytes may be a session ticket: only a close counts.
    fn usable(&self) -> bool {
        let (tcp, tls) = match &self.io {
            EndpointIo::Left(tcp) => (tcp, false),
            EndpointIo::Right(s) => (s.get_ref().0, true),
        };
        let mut byte = [0u8; 1];
        let mut buf = tokio::io::ReadBuf::new(&mut byte);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match tcp.poll_peek(&mut cx, &mut buf) {
            Poll::Pending => true,
            Poll::Ready(Ok(n)) => tls && n > 0,
            Poll::Ready(Err(_)) => false,
        }
    }
}

/// One HTTP/2 connection to an endpoint.
struct H2Conn {
    client: h2c::Client,
    state: Arc<H2State>,
}

impl std::fmt::Debug for H2Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Conn").field("streams", &self.state.streams.load(Ordering::Relaxed)).finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct H2State {
    /// Streams open now.
    streams: AtomicUsize,
    /// Streams opened so far.
    opened: AtomicU64,
    /// The endpoint's `SETTINGS_MAX_CONCURRENT_STREAMS`, updated as the connection runs.
    max_streams: AtomicUsize,
    /// Milliseconds since [`epoch`] when the last stream ended.
    idle_since_ms: AtomicU64,
    /// The endpoint's first SETTINGS frame has been read.
    settled: AtomicBool,
    settled_notify: tokio::sync::Notify,
    /// The connection has ended, or refused a new stream (it received
    /// `GOAWAY`): it takes no more.
    closed: AtomicBool,
}

impl H2State {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    fn settle(&self, max_streams: usize) {
        self.max_streams.store(max_streams, Ordering::Relaxed);
        self.settled.store(true, Ordering::Release);
        self.settled_notify.notify_waiters();
    }

    /// Waits until the endpoint's SETTINGS are known (or `limit` passes).
    async fn settled(&self, limit: Duration) {
        let wait = async {
            loop {
                let notified = self.settled_notify.notified();
                if self.settled.load(Ordering::Acquire) {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(limit, wait).await;
    }
}

impl h2c::Watch for Arc<H2State> {
    fn max_streams(&self, n: usize) {
        self.settle(n);
    }

    fn closing(&self) {
        self.closed.store(true, Ordering::Relaxed);
        // Requests waiting for its SETTINGS go elsewhere.
        self.settle(self.max_streams.load(Ordering::Relaxed));
    }
}

/// Streams allowed on a connection whose endpoint sets no limit: h2's initial
/// value, which stays in force until the endpoint sets one.
pub(crate) const DEFAULT_MAX_STREAMS: usize = 100;

use super::conn::now_ms;

impl H2Conn {
    fn has_room(&self) -> bool {
        !self.state.is_closed()
            && self.state.streams.load(Ordering::Relaxed) < self.state.max_streams.load(Ordering::Relaxed).max(1)
    }

    fn idle_for(&self) -> Option<Duration> {
        (self.state.streams.load(Ordering::Relaxed) == 0)
            .then(|| Duration::from_millis(now_ms().saturating_sub(self.state.idle_since_ms.load(Ordering::Relaxed))))
    }
}

/// Why an exchange with an endpoint produced no response.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// No connection could be opened: nothing reached the endpoint.
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// The endpoint refused the stream (`REFUSED_STREAM`, or above its
    /// `GOAWAY`): it never processed the request.
    #[error("refused by the endpoint: {0}")]
    Refused(h2c::StreamError),
    /// The connection failed after the request may have been sent.
    #[error("exchange: {0}")]
    Exchange(hyper::Error),
    /// The HTTP/2 stream failed after the request may have been sent.
    #[error("exchange: {0}")]
    Stream(h2c::StreamError),
    /// A connection of the fast path's pool failed, or its endpoint
    /// answered nonsense, after the request may have been sent.
    #[error("exchange: {0}")]
    Io(std::io::Error),
    /// The endpoint has `maxConnections` open and `maxPendingRequests`
    /// waiting: the request was not sent.
    #[error("maxConnections open and maxPendingRequests waiting")]
    Overflow,
}

/// A connection in use by one request: an HTTP/1.1 connection goes back to
/// the pool when the response ends; an HTTP/2 stream frees its slot.
pub(crate) struct Lease {
    upstream: Arc<Upstream>,
    kind: Option<LeaseKind>,
}

enum LeaseKind {
    Http1(http1::SendRequest<UpstreamBody>),
    Http2(Arc<H2State>),
}

impl Lease {
    /// A request on a connection of the fast path's pool, which the
    /// response body itself gives back ([`super::bridge::RawBody`]).
    pub(crate) fn raw(upstream: Arc<Upstream>) -> Self {
        Lease { upstream, kind: None }
    }

    /// The endpoint.
    pub(crate) fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Returns the connection for the next request (the response has ended cleanly).
    pub(crate) fn release(mut self) {
        match self.kind.take() {
            Some(LeaseKind::Http1(sender)) => self.upstream.checkin(sender),
            // An HTTP/2 stream's slot is freed by `drop`, whichever way the lease ends.
            other => self.kind = other,
        }
    }

    /// Gives up an HTTP/1.1 connection for good (it was upgraded to a tunnel).
    pub(crate) fn detach(mut self) {
        if let Some(LeaseKind::Http1(_)) = self.kind {
            self.kind = None;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(LeaseKind::Http2(state)) = &self.kind {
            if state.streams.fetch_sub(1, Ordering::Relaxed) == 1 {
                state.idle_since_ms.store(now_ms(), Ordering::Relaxed);
            }
            self.upstream.capacity.wake();
        }
    }
}

/// Settings of the connections to an endpoint.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnSettings {
    pub(crate) connect_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    /// `circuitBreakers.maxConnections`.
    pub(crate) max_connections: usize,
    /// `circuitBreakers.maxPendingRequests`.
    pub(crate) max_pending: usize,
}

impl Upstream {
    pub(crate) fn new(
        addr: SocketAddr,
        workers: usize,
        http2: bool,
        track: Arc<TrackStats>,
        tls: Arc<TlsState>,
    ) -> Self {
        let label = addr.to_string();
        // A socket address always formats as a valid authority.
        let authority = label.parse().unwrap_or_else(|_| http::uri::Authority::from_static("invalid"));
        let slots = if http2 { 0 } else { workers + 1 };
        let idle = (0..slots).map(|_| Mutex::new(Vec::new())).collect();
        let raw = (0..slots).map(|_| Mutex::new(Vec::new())).collect();
        let h2_slots = if http2 { workers + 1 } else { 0 };
        let h2 = (0..h2_slots).map(|_| Mutex::new(Vec::new())).collect();
        let h2_opening = (0..h2_slots).map(|_| tokio::sync::Mutex::new(())).collect();
        Upstream {
            addr,
            authority,
            stats: EndpointStats::new(label),
            track,
            http2,
            idle,
            raw,
            h2,
            h2_opening,
            warned: AtomicBool::new(false),
            capacity: Arc::default(),
            tls_enabled: tls.endpoint().is_some(),
            tls,
        }
    }

    /// Connections open to the endpoint now (HTTP/1.1 and HTTP/2), over all workers.
    pub(crate) fn connections(&self) -> usize {
        self.capacity.connections.load(Ordering::Relaxed)
    }

    /// Requests waiting for a connection to the endpoint now.
    pub(crate) fn pending(&self) -> usize {
        self.capacity.pending.load(Ordering::Relaxed)
    }

    /// Sends the request `head` with `body` to the endpoint, over HTTP/1.1
    /// or HTTP/2 as configured. HTTP/2 encodes the head where it lies;
    /// hyper's HTTP/1.1 client takes the request whole, so it gets a copy
    /// unless this is the `last` attempt (the head is then taken).
    ///
    /// Boxed, each protocol's future on its own: a request's future would
    /// otherwise hold room for the larger of the two (hyper's HTTP/1.1 client
    /// future is 2.5 KiB, an HTTP/2 exchange less than half of that), and be
    /// moved whole on its way into its task.
    pub(crate) fn send<'a>(
        self: &'a Arc<Self>,
        head: &'a mut http::request::Parts,
        last: bool,
        body: UpstreamBody,
        settings: ConnSettings,
    ) -> BoxFuture<'a, Result<(Response<EndpointBody>, Lease), UpstreamError>> {
        if self.http2 {
            Box::pin(self.send_h2(h2c::Head::Map(head), body, settings))
        } else {
            let head = if last { std::mem::replace(head, Request::new(()).into_parts().0) } else { head.clone() };
            Box::pin(async move {
                let (resp, lease) = self.send_h1(Request::from_parts(head, body), settings).await?;
                Ok((resp.map(EndpointBody::Hyper), lease))
            })
        }
    }

    /// Sends an HTTP/2 client's request taken without a header map
    /// ([`Relay`]) on a stream to this HTTP/2 endpoint. Boxed as
    /// [`Upstream::send`]'s futures are.
    pub(crate) fn send_relay<'a>(
        self: &'a Arc<Self>,
        head: &'a Relay,
        body: UpstreamBody,
        settings: ConnSettings,
    ) -> BoxFuture<'a, Result<(Response<EndpointBody>, Lease), UpstreamError>> {
        if !self.http2 {
            // The endpoints came to speak HTTP/1.1 since the request was read.
            let e = std::io::Error::other("the endpoint no longer speaks HTTP/2");
            return Box::pin(std::future::ready(Err(UpstreamError::Connect(e))));
        }
        Box::pin(self.send_h2(h2c::Head::Relay(head), body, settings))
    }

    /// Sends `req` on a pooled connection, or a new one. A pooled connection
    /// that turns out closed before the request was written is skipped and
    /// the request goes out on the next one.
    async fn send_h1(
        self: &Arc<Self>,
        mut req: Request<UpstreamBody>,
        settings: ConnSettings,
    ) -> Result<(Response<Incoming>, Lease), UpstreamError> {
        loop {
            let (mut sender, pooled) = self.h1_connection(settings).await?;
            // A pooled connection may still be finishing the previous response.
            if sender.ready().await.is_err() {
                if pooled {
                    continue;
                }
                return Err(UpstreamError::Connect(std::io::Error::other("connection closed before use")));
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    return Ok((resp, Lease { upstream: self.clone(), kind: Some(LeaseKind::Http1(sender)) }));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: safe to send on another connection, whatever the method.
                    Some(unsent) if pooled => req = unsent,
                    _ => return Err(UpstreamError::Exchange(e.into_error())),
                },
            }
        }
    }

    /// A new connection to the endpoint (TLS when configured), within `timeout`.
    async fn open(&self, timeout: Duration) -> Result<EndpointIo, UpstreamError> {
        match tokio::time::timeout(timeout, connect_endpoint(self.addr, self.tls.endpoint().as_deref())).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(UpstreamError::Connect(e)),
            Err(_) => Err(UpstreamError::Connect(std::io::ErrorKind::TimedOut.into())),
        }
    }

    /// A pooled connection (and `true`), or a new one while fewer than
    /// `maxConnections` are open; otherwise waits, among at most
    /// `maxPendingRequests`, for one to come back to any worker's pool or to close.
    async fn h1_connection(
        &self,
        settings: ConnSettings,
    ) -> Result<(http1::SendRequest<UpstreamBody>, bool), UpstreamError> {
        if let Some(found) = Self::checkout(&mut own(&self.idle), settings.idle_timeout) {
            return Ok((found, true));
        }
        let evict = || Self::evict(&self.raw);
        Box::pin(self.opened(&self.idle, settings, evict, |slot| self.connect_h1(settings.connect_timeout, slot))).await
    }

    /// A connection of the fast path to the endpoint: pooled (and `true`), or
    /// new, under the same caps as [`Upstream::send`]'s.
    pub(crate) async fn raw_connection(&self, settings: ConnSettings) -> Result<(RawConn, bool), UpstreamError> {
        if let Some(found) = Self::checkout(&mut own(&self.raw), settings.idle_timeout) {
            return Ok((found, true));
        }
        Box::pin(self.opened(
            &self.raw,
            settings,
            || Self::evict(&self.idle),
            |slot| async move { Ok(RawConn { io: self.open(settings.connect_timeout).await?, _slot: slot }) },
        ))
        .await
    }

    /// Gives a fast-path connection back for the next request.
    pub(crate) fn checkin_raw(&self, conn: RawConn) {
        self.checkin_to(&self.raw, conn);
    }

    /// A new connection within the caps, when the caller's pool had no
    /// usable one; waiting at `maxConnections`, for one to come back to
    /// `lists` or for an idle connection of the other path's pool to be
    /// closed (`evict`) so that its slot serves this request.
    ///
    /// Callers box it: opening a connection is the exception, and this
    /// future (1.7 KiB) would otherwise be part of every request's, and of
    /// every fast-path client connection's while it waits.
    async fn opened<T: Pooled, F>(
        &self,
        lists: &[Mutex<Vec<Idle<T>>>],
        settings: ConnSettings,
        evict: impl Fn() -> bool,
        connect: impl FnOnce(OpenConn) -> F,
    ) -> Result<(T, bool), UpstreamError>
    where
        F: Future<Output = Result<T, UpstreamError>>,
    {
        let mut queued = None;
        loop {
            // Armed before looking, so a connection freed meanwhile is not missed.
            let freed = self.capacity.freed.notified();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            if let Some(slot) = self.capacity.try_open(settings.max_connections) {
                return Ok((connect(slot).await?, false));
            }
            if queued.is_some() {
                for list in lists {
                    let mut idle = list.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(s) = Self::checkout(&mut idle, settings.idle_timeout) {
                        return Ok((s, true));
                    }
                }
                // Its slot frees when it closes, which wakes this wait.
                evict();
                freed.await;
            } else {
                queued = Some(self.capacity.queue(settings.max_pending).ok_or(UpstreamError::Overflow)?);
            }
        }
    }

    /// Closes one idle connection of `lists`; whether there was one.
    fn evict<T>(lists: &[Mutex<Vec<Idle<T>>>]) -> bool {
        lists.iter().any(|l| l.lock().unwrap_or_else(|p| p.into_inner()).pop().is_some())
    }

    async fn connect_h1(
        &self,
        timeout: Duration,
        slot: OpenConn,
    ) -> Result<http1::SendRequest<UpstreamBody>, UpstreamError> {
        let io = TokioIo::new(self.open(timeout).await?);
        let (sender, conn) =
            http1::Builder::new().handshake(io).await.map_err(|e| UpstreamError::Connect(std::io::Error::other(e)))?;
        tokio::spawn(async move {
            // Ends when the endpoint or the pool closes the connection, or
            // when a 101 response hands the socket to a tunnel (which then
            // counts as a request in flight, not as a connection).
            let _ = conn.with_upgrades().await;
            drop(slot);
        });
        Ok(sender)
    }

    fn checkout<T: Pooled>(idle: &mut Vec<Idle<T>>, idle_timeout: Duration) -> Option<T> {
        // Most recently used first: its socket is warm and least likely to have been closed.
        while let Some(i) = idle.pop() {
            if i.conn.usable() && i.since.elapsed() < idle_timeout {
                return Some(i.conn);
            }
        }
        None
    }

    fn checkin(&self, sender: http1::SendRequest<UpstreamBody>) {
        self.checkin_to(&self.idle, sender);
    }

    fn checkin_to<T: Pooled>(&self, lists: &[Mutex<Vec<Idle<T>>>], conn: T) {
        if !conn.usable() {
            return;
        }
        {
            let mut idle = own(lists);
            if idle.len() < MAX_IDLE {
                idle.push(Idle { conn, since: Instant::now() });
            }
        }
        self.capacity.wake();
    }

    /// Sends the request `parts` with `body` as a stream on this worker's
    /// first HTTP/2 connection with room, opening one when all are full.
    async fn send_h2(
        self: &Arc<Self>,
        head: h2c::Head<'_>,
        body: UpstreamBody,
        settings: ConnSettings,
    ) -> Result<(Response<EndpointBody>, Lease), UpstreamError> {
        // A connection that closes between checkout and dispatch takes no
        // stream: the request goes out on another. Bounded, in case
        // connections keep closing as they open.
        for _ in 0..4 {
            let (client, state) = self.h2_stream(settings).await?;
            let first = state.opened.load(Ordering::Relaxed) == 0;
            let stream = match client.open(head, body.is_end_stream()).await {
                Ok(stream) => stream,
                Err(e) if first => {
                    // It closed before it took a stream: as good as not opened.
                    state.closed.store(true, Ordering::Relaxed);
                    self.warn_not_h2(&e);
                    return Err(UpstreamError::Connect(std::io::Error::other(e)));
                }
                Err(_) => {
                    state.closed.store(true, Ordering::Relaxed);
                    continue;
                }
            };
            drop(client);
            state.streams.fetch_add(1, Ordering::Relaxed);
            state.opened.fetch_add(1, Ordering::Relaxed);
            let lease = Lease { upstream: self.clone(), kind: Some(LeaseKind::Http2(state.clone())) };
            return match stream.exchange(body).await {
                Ok(resp) => Ok((resp.map(EndpointBody::H2), lease)),
                Err(e) => {
                    if e.ends_connection() {
                        // Nothing more goes out on this connection.
                        state.closed.store(true, Ordering::Relaxed);
                    }
                    if first {
                        self.warn_not_h2(&e);
                    }
                    Err(if e.is_refused() { UpstreamError::Refused(e) } else { UpstreamError::Stream(e) })
                }
            };
        }
        Err(UpstreamError::Connect(std::io::Error::other("HTTP/2 connections kept closing before use")))
    }

    /// Says once that the first HTTP/2 exchange with the endpoint failed.
    fn warn_not_h2(&self, e: &h2c::StreamError) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                endpoint = %self.addr, error = %e,
                "the first HTTP/2 exchange with the endpoint failed: does it speak HTTP/2 cleartext \
                 (prior knowledge), as appProtocol says? It is treated as failing"
            );
        }
    }

    /// A connection with room for one more stream: an open one, or a new one.
    async fn h2_stream(&self, settings: ConnSettings) -> Result<(h2c::Client, Arc<H2State>), UpstreamError> {
        if let Some(found) = Self::h2_with_room(&own(&self.h2)) {
            return Ok(found);
        }
        // Boxed: opening a connection is rare, and its future (1.5 KiB) would
        // otherwise be part of every request's.
        Box::pin(self.h2_stream_opening(settings)).await
    }

    /// [`Self::h2_stream`] when no connection has room: opens one, or waits
    /// for room at `maxConnections`.
    async fn h2_stream_opening(&self, settings: ConnSettings) -> Result<(h2c::Client, Arc<H2State>), UpstreamError> {
        let mut queued = None;
        loop {
            let freed = self.capacity.freed.notified();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            {
                let _opening = self.h2_opening[worker_slot(self.h2_opening.len())].lock().await;
                // Another request of this worker may have opened one meanwhile.
                if let Some(found) = Self::h2_with_room(&own(&self.h2)) {
                    return Ok(found);
                }
                if let Some(slot) = self.capacity.try_open(settings.max_connections) {
                    let (client, state) = self.connect_h2(settings, slot).await?;
                    // The endpoint's limit arrives in its first frame, one round trip
                    // after the connection opens: wait for it, so a burst of requests on a
                    // new connection does not pile onto it past the limit.
                    state.settled(settings.connect_timeout).await;
                    let mut list = own(&self.h2);
                    list.retain(|c| !c.state.is_closed());
                    if list.len() < MAX_H2_CONNECTIONS {
                        list.push(H2Conn { client: client.clone(), state: state.clone() });
                    }
                    return Ok((client, state));
                }
            }
            if queued.is_some() {
                // At maxConnections: a stream ending on any worker's connection makes room.
                for list in &self.h2 {
                    if let Some(found) = Self::h2_with_room(&list.lock().unwrap_or_else(|p| p.into_inner())) {
                        return Ok(found);
                    }
                }
                freed.await;
            } else {
                queued = Some(self.capacity.queue(settings.max_pending).ok_or(UpstreamError::Overflow)?);
            }
        }
    }

    fn h2_with_room(list: &[H2Conn]) -> Option<(h2c::Client, Arc<H2State>)> {
        list.iter().find(|c| c.has_room()).map(|c| (c.client.clone(), c.state.clone()))
    }

    async fn connect_h2(
        &self,
        settings: ConnSettings,
        slot: OpenConn,
    ) -> Result<(h2c::Client, Arc<H2State>), UpstreamError> {
        let stream = self.open(settings.connect_timeout).await?;
        let state = Arc::new(H2State {
            streams: AtomicUsize::new(0),
            opened: AtomicU64::new(0),
            max_streams: AtomicUsize::new(DEFAULT_MAX_STREAMS),
            idle_since_ms: AtomicU64::new(now_ms()),
            settled: AtomicBool::new(false),
            settled_notify: tokio::sync::Notify::new(),
            closed: AtomicBool::new(false),
        });
        let ping = (settings.idle_timeout / 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
        let (client, drive) = h2c::handshake(stream, ping, state.clone());
        tokio::spawn(async move {
            // Until the endpoint closes it, or no request holds it any more.
            drive.await;
            drop(slot);
        });
        Ok((client, state))
    }

    /// Closes connections idle for longer than `idle_timeout` (or closed by the endpoint).
    pub(crate) fn prune(&self, idle_timeout: Duration) {
        for list in &self.idle {
            let mut idle = list.lock().unwrap_or_else(|p| p.into_inner());
            idle.retain(|i| i.conn.usable() && i.since.elapsed() < idle_timeout);
        }
        for list in &self.raw {
            let mut idle = list.lock().unwrap_or_else(|p| p.into_inner());
            idle.retain(|i| i.conn.usable() && i.since.elapsed() < idle_timeout);
        }
        for list in &self.h2 {
            let mut conns = list.lock().unwrap_or_else(|p| p.into_inner());
            conns.retain(|c| !c.state.is_closed() && c.idle_for().is_none_or(|d| d < idle_timeout));
        }
    }

    /// Connections held now with no request on them, over all workers.
    pub(crate) fn idle_count(&self) -> usize {
        let h1: usize = self.idle.iter().map(|l| l.lock().map(|v| v.len()).unwrap_or(0)).sum::<usize>()
            + self.raw.iter().map(|l| l.lock().map(|v| v.len()).unwrap_or(0)).sum::<usize>();
        let h2: usize = self
            .h2
            .iter()
            .map(|l| l.lock().map(|v| v.iter().filter(|c| c.idle_for().is_some()).count()).unwrap_or(0))
            .sum();
        h1 + h2
    }

    /// HTTP/2 connections open now, over all workers.
    pub(crate) fn h2_connections(&self) -> usize {
        self.h2.iter().map(|l| l.lock().map(|v| v.iter().filter(|c| !c.state.is_closed()).count()).unwrap_or(0)).sum()
    }
}

/// Upstreams for a new endpoint set (each address with its track's
/// evidence), reusing those of endpoints that stay (their counters and pooled
/// connections survive the update) unless the protocol spoken to the
/// endpoints or the endpoint's track changed.
/// Per-endpoint state by address. Its keys come from the configuration or
/// discovery, never from clients, and it is read on every request: hashed
/// with foldhash rather than SipHash (a fifth of the instructions).
pub(crate) type Upstreams = std::collections::HashMap<SocketAddr, Arc<Upstream>, foldhash::fast::RandomState>;

pub(crate) fn carry(
    previous: Option<&Upstreams>,
    endpoints: impl Iterator<Item = (SocketAddr, Arc<TrackStats>)>,
    workers: usize,
    http2: bool,
    tls: &Arc<TlsState>,
) -> Upstreams {
    // Pools of plaintext connections are not reused for TLS, nor the reverse.
    let tls_enabled = tls.endpoint().is_some();
    endpoints
        .map(|(a, track)| {
            let u = previous
                .and_then(|p| {
                    p.get(&a)
                        .filter(|u| u.http2 == http2 && u.tls_enabled == tls_enabled && Arc::ptr_eq(&u.track, &track))
                        .cloned()
                })
                .unwrap_or_else(|| Arc::new(Upstream::new(a, workers, http2, track, tls.clone())));
            (a, u)
        })
        .collect()
}

/// A connection to an endpoint: plain TCP, or TLS over it.
pub(crate) type EndpointIo = tokio_util::either::Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// Connects to `addr`, with TLS when `tls` is given.
pub(crate) async fn connect_endpoint(addr: SocketAddr, tls: Option<&EndpointConnector>) -> std::io::Result<EndpointIo> {
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    match tls {
        Some(c) => Ok(EndpointIo::Right(Box::new(c.connect(addr.ip(), tcp).await?))),
        None => Ok(EndpointIo::Left(tcp)),
    }
}
