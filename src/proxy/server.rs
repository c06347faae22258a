//! Listeners and the proxy's life cycle: bind, serve, apply updates, drain.
//!
//! Clients are served by worker threads, one per CPU by default, each with
//! its own listening socket on the shared address (SO_REUSEPORT: the kernel
//! spreads new connections over them), its own single-threaded event loop,
//! balancer and upstream connections. A worker that accepts a connection
//! while it serves clearly more than another hands it over (`Spread`), so
//! that the kernel's hashing does not leave one worker with more than its
//! share of long-lived connections. A request is handled start to finish
//! on one thread and never waits for another to wake up (the NGINX and
//! Envoy model). Updates, health checks and the admin listener run on the
//! runtime that calls [`Proxy::run`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::unix::AsyncFd;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::config::{Protocol, ProxyConfig};
use super::socket::ClientSocket;
use super::state::{ApplyError, Shared};
use super::{admin, conn, fast, h2s, health, http, tcp, tls};
use crate::discovery::{Snapshot, SourceMetrics};
use crate::small_http;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration or endpoints were refused.
    #[error(transparent)]
    Invalid(#[from] ApplyError),
    /// A listener could not bind.
    #[error("{field}: cannot listen on {addr}: {source}")]
    Bind {
        /// The config field naming the address.
        field: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A bound proxy, ready to run.
pub struct Proxy {
    shared: Arc<Shared>,
    /// One per worker, all on the same address.
    listeners: Vec<std::net::TcpListener>,
    admin: Option<TcpListener>,
}

impl Proxy {
    /// Validates the snapshot and binds the listeners.
    pub async fn bind(snapshot: &Snapshot) -> Result<Self, StartError> {
        Self::bind_with(snapshot, None, SourceMetrics::default()).await
    }

    /// Like [`Proxy::bind`], taking over an admin listener that is already
    /// bound (one that answered probes while the configuration was awaited)
    /// and exporting the discovery source's metrics.
    pub async fn bind_with(
        snapshot: &Snapshot,
        admin: Option<TcpListener>,
        source: SourceMetrics,
    ) -> Result<Self, StartError> {
        let shared = Shared::with_source_metrics(snapshot, source)?;
        let config = &snapshot.config;
        let listeners = bind_workers(config.listen, config.worker_count())?;
        let admin = match (admin, config.admin) {
            (Some(listener), _) => Some(listener),
            (None, Some(addr)) => Some(TcpListener::bind(addr).await.map_err(|source| StartError::Bind {
                field: "admin",
                addr,
                source,
            })?),
            (None, None) => None,
        };
        Ok(Proxy { shared, listeners, admin })
    }

    /// The client listener's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listeners.first().and_then(|l| l.local_addr().ok()).unwrap_or(self.shared.runtime().config.listen)
    }

    /// The admin listener's address, if there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The proxy's shared state (runtime, metrics).
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Serves until `shutdown` completes, applying every snapshot published on
    /// `updates`; then stops accepting, lets in-flight work finish for up to
    /// `timeouts.drain`, and returns.
    pub async fn run(self, updates: watch::Receiver<Arc<Snapshot>>, shutdown: impl Future<Output = ()>) {
        let listen = self.local_addr();
        let Proxy { shared, listeners, admin } = self;
        let mut background = JoinSet::new();
        background.spawn(health::run(shared.clone()));
        background.spawn(apply_updates(shared.clone(), updates));
        background.spawn(tls::watch(shared.clone()));
        if let Some(admin) = admin {
            background.spawn(serve_admin(shared.clone(), admin));
        }
        let protocol = shared.runtime().config.protocol;
        let workers = listeners.len();
        let (stop, stopped) = watch::channel(false);
        let (spread, inboxes) = Spread::new(&shared.metrics.worker_connections);
        let mut done = Vec::new();
        for ((index, listener), inbox) in listeners.into_iter().enumerate().zip(inboxes) {
            let (tx, rx) = oneshot::channel();
            let (shared, stopped) = (shared.clone(), stopped.clone());
            let seats = Seats { spread: spread.clone(), worker: index, inbox };
            let spawned = std::thread::Builder::new().name(format!("fulcrum-worker-{index}")).spawn(move || {
                worker(index, shared, listener, seats, protocol, stopped);
                let _ = tx.send(());
            });
            match spawned {
                Ok(_) => done.push(rx),
                Err(e) => tracing::error!(error = %e, index, "cannot start a worker thread"),
            }
        }
        tracing::info!(%listen, ?protocol, workers, "proxy serving");
        shutdown.await;
        shared.draining.store(true, Ordering::Relaxed);
        let grace = shared.runtime().config.timeouts.drain.0;
        tracing::info!(grace_seconds = grace.as_secs_f64(), "stopped accepting; draining in-flight work");
        let _ = stop.send(true);
        for rx in done {
            let _ = rx.await;
        }
        tracing::info!("drained; proxy stopped");
        background.abort_all();
    }
}

/// One listening socket per worker on `addr`, with SO_REUSEPORT so that the
/// kernel balances new connections over the workers. Port 0 is resolved by
/// the first socket and shared by the others.
fn bind_workers(addr: SocketAddr, workers: usize) -> Result<Vec<std::net::TcpListener>, StartError> {
    let mut bound = addr;
    let mut listeners = Vec::with_capacity(workers);
    for _ in 0..workers.max(1) {
        let listener =
            reuseport_listener(bound).map_err(|source| StartError::Bind { field: "listen", addr, source })?;
        bound = listener.local_addr().map_err(|source| StartError::Bind { field: "listen", addr, source })?;
        listeners.push(listener);
    }
    Ok(listeners)
}

fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// A worker thread: its own event loop serving one listener until `stopped`,
/// then draining its connections for up to `timeouts.drain`.
fn worker(
    index: usize,
    shared: Arc<Shared>,
    listener: std::net::TcpListener,
    seats: Seats,
    protocol: Protocol,
    mut stopped: watch::Receiver<bool>,
) {
    super::upstream::enter_worker(index);
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, index, "cannot start a worker's event loop");
            return;
        }
    };
    runtime.block_on(async move {
        // SAFETY: the listener owns its descriptor, which stays open and the
        // same until the AsyncFd that owns the listener is dropped.
        let listener = match unsafe { AsyncFd::register_with_interest(listener, tokio::io::Interest::READABLE) } {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, index, "cannot register a worker's listener");
                return;
            }
        };
        let shutdown = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        let connections = Connections::new();
        tokio::spawn(heartbeat());
        match protocol {
            Protocol::Http => accept_http(&shared, listener, seats, &connections, shutdown).await,
            Protocol::Tcp => accept_tcp(&shared, listener, seats, &connections, shutdown).await,
        }
        let grace = shared.runtime().config.timeouts.drain.0;
        connections.drain(grace).await;
    });
}

/// Keeps a timer due within [`HEARTBEAT`] on the worker's event loop. A
/// timer armed while the loop is busy (a request's timeout, every request)
/// costs a wake-up of the loop through its event fd when no timer is due
/// sooner: tokio must then shorten its next sleep. With this one always due
/// first, request timers never do, at the price of a few idle wake-ups a
/// second.
async fn heartbeat() {
    loop {
        tokio::time::sleep(HEARTBEAT).await;
    }
}

/// The heartbeat's period: well below the shortest timeout a request arms.
const HEARTBEAT: Duration = Duration::from_millis(50);

async fn apply_updates(shared: Arc<Shared>, mut updates: watch::Receiver<Arc<Snapshot>>) {
    while updates.changed().await.is_ok() {
        let snapshot = updates.borrow_and_update().clone();
        match shared.apply(&snapshot) {
            Ok(()) => tracing::info!(
                generation = shared.runtime().generation,
                endpoints = snapshot.targets.len(),
                algorithm = %snapshot.config.load_balancing.algorithm,
                "configuration applied"
            ),
            Err(e) => {
                shared.metrics.reload(false);
                tracing::warn!(error = %e, "update refused; keeping the current configuration");
            }
        }
    }
}

/// Open client connections: a graceful signal for HTTP, a count for all,
/// and a hard stop once the grace period is over.
struct Connections {
    graceful: CancellationToken,
    tracker: TaskTracker,
    hard_stop: CancellationToken,
}

impl Connections {
    fn new() -> Self {
        Connections {
            graceful: CancellationToken::new(),
            tracker: TaskTracker::new(),
            hard_stop: CancellationToken::new(),
        }
    }

    async fn drain(self, grace: Duration) {
        self.tracker.close();
        let Connections { graceful, tracker, hard_stop } = self;
        graceful.cancel();
        let drained = tokio::time::timeout(grace, tracker.wait()).await;
        match drained {
            Ok(()) => tracing::debug!("worker drained"),
            Err(_) => {
                tracing::warn!(open = tracker.len(), "grace period over; closing the remaining connections");
                hard_stop.cancel();
                tracker.wait().await;
            }
        }
    }
}

/// A client connection counted against `limits.maxConnections`, and against
/// the worker serving it, until dropped.
pub(crate) struct Admitted {
    shared: Arc<Shared>,
    _seat: Seat,
}

impl Admitted {
    fn new(shared: &Arc<Shared>, seat: Seat) -> Self {
        shared.open_connections.fetch_add(1, Ordering::Relaxed);
        shared.metrics.active_connections.inc();
        Admitted { shared: shared.clone(), _seat: seat }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.shared.open_connections.fetch_sub(1, Ordering::Relaxed);
        self.shared.metrics.active_connections.dec();
        self.shared.connection_closed.notify_waiters();
    }
}

/// How many connections each worker serves, and a way to hand a connection
/// to another worker.
///
/// SO_REUSEPORT hashes each new connection to a worker, blind to load: 50
/// long-lived connections can split 28/22, and the busier worker then sets
/// the tail latency for all. A worker that accepts a connection while it
/// serves more than [`SPREAD_SLACK`] connections over the least busy worker
/// passes the socket to that one instead (HAProxy, too, gives each accepted
/// connection to its least loaded thread). Short-lived connections rarely
/// move: the counts stay within the slack.
struct Spread {
    /// Connections each worker serves now (the `worker_connections` gauges).
    serving: Box<[Gauge]>,
    inboxes: Box<[mpsc::UnboundedSender<Handed>]>,
}

/// How far a worker's connection count may exceed the least busy worker's
/// before it hands new connections over.
const SPREAD_SLACK: i64 = 2;

/// A connection on its way to another worker.
struct Handed {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    admitted: Admitted,
}

impl Spread {
    fn new(serving: &[Gauge]) -> (Arc<Spread>, Vec<mpsc::UnboundedReceiver<Handed>>) {
        let (senders, receivers): (Vec<_>, Vec<_>) = serving.iter().map(|_| mpsc::unbounded_channel()).unzip();
        let spread = Spread { serving: serving.into(), inboxes: senders.into_boxed_slice() };
        (Arc::new(spread), receivers)
    }

    /// The worker that should serve a connection `worker` just accepted:
    /// itself, unless it serves more than [`SPREAD_SLACK`] connections over
    /// the least busy worker.
    fn choose(&self, worker: usize) -> usize {
        let Some(mine) = self.serving.get(worker).map(Gauge::get) else { return worker };
        let (least, count) =
            self.serving.iter().map(Gauge::get).enumerate().min_by_key(|&(_, n)| n).unwrap_or((worker, mine));
        if mine > count + SPREAD_SLACK { least } else { worker }
    }

    fn seat(self: &Arc<Self>, worker: usize) -> Seat {
        self.serving[worker].inc();
        Seat { spread: self.clone(), worker }
    }
}

/// One connection counted against a worker until dropped.
struct Seat {
    spread: Arc<Spread>,
    worker: usize,
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.spread.serving[self.worker].dec();
    }
}

/// A worker's side of [`Spread`]: its index and the connections other
/// workers hand it.
struct Seats {
    spread: Arc<Spread>,
    worker: usize,
    inbox: mpsc::UnboundedReceiver<Handed>,
}

impl Seats {
    /// Serves an accepted connection here, or hands it to a less busy
    /// worker. A connection that cannot be handed over (the other worker
    /// has stopped) is served here.
    fn place(
        &self,
        stream: std::net::TcpStream,
        peer: SocketAddr,
        shared: &Arc<Shared>,
    ) -> Option<(std::net::TcpStream, Admitted)> {
        let to = self.spread.choose(self.worker);
        if to == self.worker {
            return Some((stream, Admitted::new(shared, self.spread.seat(to))));
        }
        let handed = Handed { stream, peer, admitted: Admitted::new(shared, self.spread.seat(to)) };
        let mpsc::error::SendError(back) = self.spread.inboxes[to].send(handed).err()?;
        drop(back.admitted);
        Some((back.stream, Admitted::new(shared, self.spread.seat(self.worker))))
    }
}

/// Accepts until `shutdown`, holding off while `limits.maxConnections` are
/// open (new connections wait in the kernel's backlog); a failed accept (out
/// of file descriptors) backs off briefly. Connections other workers hand
/// over are served as they come, cap or not: they were admitted already.
async fn accept_loop(
    shared: &Arc<Shared>,
    listener: AsyncFd<std::net::TcpListener>,
    mut seats: Seats,
    shutdown: impl Future<Output = ()>,
    mut on_conn: impl FnMut(std::net::TcpStream, SocketAddr, Admitted),
) {
    tokio::pin!(shutdown);
    let max = shared.runtime().config.limits.max_connections as usize;
    let mut capped: Option<std::time::Instant> = None;
    loop {
        let closed = shared.connection_closed.notified();
        let open = shared.open_connections.load(Ordering::Relaxed) < max;
        match (open, capped) {
            (true, Some(since)) => {
                shared.metrics.at_connection_cap(since.elapsed());
                capped = None;
            }
            (false, None) => capped = Some(std::time::Instant::now()),
            _ => {}
        }
        tokio::select! {
            () = &mut shutdown => return,
            Some(handed) = seats.inbox.recv() => {
                let Handed { stream, peer, admitted } = handed;
                on_conn(stream, peer, admitted);
            }
            accepted = accept(&listener), if open => match accepted {
                Ok((stream, peer)) => {
                    shared.metrics.connections.inc();
                    if let Some((stream, admitted)) = seats.place(stream, peer, shared) {
                        on_conn(stream, peer, admitted);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            () = closed, if !open => {}
            // A notification may go to another worker first; look again soon.
            () = tokio::time::sleep(Duration::from_millis(50)), if !open => {}
        }
    }
}

/// The next connection on `listener`, as a non-blocking socket not yet
/// registered with the event loop (see [`ClientSocket`]). Cancel-safe: a
/// connection is taken from the kernel only when it is returned.
async fn accept(listener: &AsyncFd<std::net::TcpListener>) -> std::io::Result<(std::net::TcpStream, SocketAddr)> {
    loop {
        let mut ready = listener.readable().await?;
        if let Ok(accepted) = ready.try_io(|l| accept_nonblocking(l.get_ref())) {
            return accepted;
        }
    }
}

/// `accept4(2)` with `SOCK_NONBLOCK`: one system call for the socket and its mode.
#[cfg(target_os = "linux")]
fn accept_nonblocking(listener: &std::net::TcpListener) -> std::io::Result<(std::net::TcpStream, SocketAddr)> {
    let (socket, addr) = socket2::SockRef::from(listener).accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)?;
    let peer = addr.as_socket().ok_or_else(|| std::io::Error::other("a TCP peer without an IP address"))?;
    Ok((socket.into(), peer))
}

#[cfg(not(target_os = "linux"))]
fn accept_nonblocking(listener: &std::net::TcpListener) -> std::io::Result<(std::net::TcpStream, SocketAddr)> {
    let (stream, peer) = listener.accept()?;
    stream.set_nonblocking(true)?;
    Ok((stream, peer))
}

/// How client connections in HTTP mode are served once their protocol is
/// known: HTTP/1.1 connections the fast path hands on go to hyper's server,
/// HTTP/2 connections to [`h2s`].
struct Builders {
    http1: hyper::server::conn::http1::Builder,
    http2: super::h2conn::Config,
}

async fn accept_http(
    shared: &Arc<Shared>,
    listener: AsyncFd<std::net::TcpListener>,
    seats: Seats,
    conns: &Connections,
    shutdown: impl Future<Output = ()>,
) {
    let config: Arc<ProxyConfig> = shared.runtime().config.clone();
    let t = &config.timeouts;
    let limits = conn::Limits { header: t.header.0, idle: t.idle.0, body_idle: t.body_idle.0 };
    let l = &config.limits;
    let mut http1 = hyper::server::conn::http1::Builder::new();
    // hyper's timer ends the wait for the next request head on a kept-alive
    // connection; the watchdog bounds the head itself and everything else.
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(t.idle.0)
        .max_buf_size(l.max_request_header_bytes as usize)
        .max_headers(l.max_request_headers as usize);
    let builder = Builders { http1, http2: h2s::config(l) };
    let builder = Arc::new(builder);
    accept_loop(shared, listener, seats, shutdown, |stream, peer, admitted| {
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let builder = builder.clone();
        let graceful = conns.graceful.clone();
        let hard_stop = conns.hard_stop.clone();
        conns.tracker.spawn(async move {
            let _admitted = admitted;
            // Boxed: the connection's state (the fast path's, hyper's or
            // HTTP/2's, whichever serves it) is some kilobytes, which the task
            // would otherwise copy each time it is moved on its way to the
            // scheduler and again when it completes.
            let stream = ClientSocket::new(stream);
            let serving = Box::pin(serve_http_connection(&shared, &builder, stream, peer, limits, &graceful));
            tokio::select! {
                () = serving => {}
                () = hard_stop.cancelled() => {}
            }
        });
    })
    .await;
}

/// One HTTP client connection: the TLS handshake when the listener
/// terminates TLS, then [`serve_http_io`]. The wait for the first bytes, the
/// handshake and the protocol detection share the `timeouts.header` budget.
async fn serve_http_connection(
    shared: &Arc<Shared>,
    builder: &Builders,
    mut stream: ClientSocket,
    peer: SocketAddr,
    limits: conn::Limits,
    graceful: &CancellationToken,
) {
    // A connection that has sent nothing yet holds no buffer and no TLS
    // session, and a drain does not wait for it (a client's preconnect, a
    // pooled connection it never used).
    let started = std::time::Instant::now();
    let tls = shared.tls.server();
    let arrived = tokio::select! {
        waited = tokio::time::timeout(limits.header, stream.readable()) => matches!(waited, Ok(Ok(()))),
        () = graceful.cancelled() => return,
    };
    if !arrived {
        if tls.is_some() {
            // A TLS client that never began its handshake.
            shared.metrics.tls_handshake("timeout");
        }
        shared.metrics.timed_out("header");
        return;
    }
    let within = limits.header.saturating_sub(started.elapsed());
    let Some(config) = tls else {
        return serve_http_io(shared, builder, stream, http::Peer::new(peer), within, limits, graceful).await;
    };
    // Boxed: a cleartext connection's task does not carry room for a TLS
    // session's state.
    Box::pin(serve_https(shared, builder, stream, peer, within, limits, graceful, config)).await;
}

/// A client connection whose TLS the proxy terminates: the handshake, then
/// [`serve_http_io`] over the TLS stream, both within `within`.
#[allow(clippy::too_many_arguments)]
async fn serve_https(
    shared: &Arc<Shared>,
    builder: &Builders,
    stream: ClientSocket,
    peer: SocketAddr,
    within: Duration,
    limits: conn::Limits,
    graceful: &CancellationToken,
    config: Arc<rustls::ServerConfig>,
) {
    let started = std::time::Instant::now();
    let handshake = tokio_rustls::TlsAcceptor::from(config).accept(stream);
    let stream = match tokio::time::timeout(within, handshake).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let reason = tls::failure_reason(&e);
            tracing::debug!(%peer, error = %e, reason, "TLS handshake failed");
            shared.metrics.tls_handshake(reason);
            return;
        }
        Err(_) => {
            shared.metrics.tls_handshake("timeout");
            shared.metrics.timed_out("header");
            return;
        }
    };
    shared.metrics.tls_handshake("ok");
    let (_, session) = stream.get_ref();
    let version = match session.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "other",
    };
    let alpn = match session.alpn_protocol() {
        Some(b"h2") => "h2",
        Some(b"http/1.1") => "http/1.1",
        Some(_) => "other",
        None => "none",
    };
    shared.metrics.tls_connection(version, alpn);
    let cert = session.peer_certificates().and_then(|c| c.first()).and_then(|c| tls::ClientCert::from_der(c));
    let left = within.saturating_sub(started.elapsed());
    serve_http_io(shared, builder, stream, http::Peer::tls(peer, cert), left, limits, graceful).await;
}

/// One HTTP client connection (cleartext or after TLS) that has sent its
/// first bytes, from protocol detection (within `detect_within`) to its
/// close, under the watchdog of
/// [`conn`]: HTTP/1.1 through the fast path (hyper's server for what it hands
/// on), HTTP/2 through [`h2s`].
async fn serve_http_io<S>(
    shared: &Arc<Shared>,
    builder: &Builders,
    mut stream: S,
    client: http::Peer,
    detect_within: Duration,
    limits: conn::Limits,
    graceful: &CancellationToken,
) where
    S: fast::ClientStream + 'static,
{
    let peer = client.addr;
    let Some((mut first, http1)) = conn::detect(&mut stream, detect_within, fast::take_buffer).await else {
        shared.metrics.timed_out("header");
        return;
    };
    if http1 {
        match fast::serve(shared, &mut stream, first, &client, limits, graceful).await {
            fast::Left::Closed => return,
            fast::Left::Handoff(rest) => first = rest,
        }
    }
    let prefix = bytes::Bytes::from(first);
    let activity = conn::Activity::new();
    let io = conn::ClientIo::new(stream, prefix, http1, activity.clone());
    if !http1 {
        return h2s::serve(shared, io, &client, &activity, limits, graceful, &builder.http2).await;
    }
    let svc_shared = shared.clone();
    let svc_activity = activity.clone();
    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let guard = svc_activity.request();
        let req = req.map(http_body_util::Either::Left);
        let served = http::serve(svc_shared.clone(), client.clone(), req, None);
        async move { served.await.map(|resp| resp.map(|body| conn::Guarded::new(body, guard))) }
    });
    let connection = builder.http1.serve_connection(TokioIo::new(io), svc).with_upgrades();
    tokio::pin!(connection);
    let mut watchdog = conn::Watchdog::default();
    loop {
        let wake = match watchdog.check(&activity, &limits, shared, peer) {
            conn::Watch::Wait(at) => at,
            conn::Watch::Drain(at) => {
                connection.as_mut().graceful_shutdown();
                at
            }
            conn::Watch::Stop => return,
        };
        tokio::select! {
            _ = connection.as_mut() => return,
            () = tokio::time::sleep_until(wake.into()) => {}
            () = graceful.cancelled(), if !watchdog.draining() => {
                connection.as_mut().graceful_shutdown();
                watchdog.drain_started();
            }
        }
    }
}

async fn accept_tcp(
    shared: &Arc<Shared>,
    listener: AsyncFd<std::net::TcpListener>,
    seats: Seats,
    conns: &Connections,
    shutdown: impl Future<Output = ()>,
) {
    accept_loop(shared, listener, seats, shutdown, |stream, peer, admitted| {
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let hard_stop = conns.hard_stop.clone();
        conns.tracker.spawn(async move {
            let _admitted = admitted;
            // TCP mode waits for either side at once: the socket registers now.
            let Ok(stream) = TcpStream::from_std(stream) else { return };
            tokio::select! {
                () = tcp::serve(shared.clone(), stream, peer) => {}
                () = hard_stop.cancelled() => {}
            }
        });
    })
    .await;
}

async fn serve_admin(shared: Arc<Shared>, listener: TcpListener) {
    let gate = small_http::Gate::default();
    loop {
        let (stream, permit) = gate.accept(&listener).await;
        let shared = shared.clone();
        small_http::serve(stream, permit, move |req| admin::serve(shared.clone(), req));
    }
}

/// Answers probes on the admin listener until `ready` completes, then gives
/// the listener back for [`Proxy::bind_with`]: before its first
/// configuration, a proxy is alive (`/healthz` 200) but not ready
/// (`/readyz` 503), so the kubelet neither restarts it nor sends it traffic.
pub async fn serve_admin_until(listener: TcpListener, ready: impl Future<Output = ()>) -> TcpListener {
    let mut ready = std::pin::pin!(ready);
    let gate = small_http::Gate::default();
    loop {
        let (stream, permit) = tokio::select! {
            () = &mut ready => return listener,
            accepted = gate.accept(&listener) => accepted,
        };
        small_http::serve(stream, permit, admin::serve_waiting);
    }
}

/// A proxy running in the background of the current tokio runtime: for the
/// demo, tests and embedding.
pub struct ProxyHandle {
    /// The client listener's address.
    pub addr: SocketAddr,
    /// The admin listener's address.
    pub admin: Option<SocketAddr>,
    /// Shared state, for inspection.
    pub shared: Arc<Shared>,
    updates: watch::Sender<Arc<Snapshot>>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl ProxyHandle {
    /// Binds and starts a proxy serving `snapshot`.
    pub async fn start(snapshot: Snapshot) -> Result<Self, StartError> {
        Self::start_with(snapshot, SourceMetrics::default()).await
    }

    /// Like [`ProxyHandle::start`], exporting a discovery source's metrics.
    pub async fn start_with(snapshot: Snapshot, source: SourceMetrics) -> Result<Self, StartError> {
        let proxy = Proxy::bind_with(&snapshot, None, source).await?;
        let (addr, admin, shared) = (proxy.local_addr(), proxy.admin_addr(), proxy.shared());
        let (updates, rx) = watch::channel(Arc::new(snapshot));
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(proxy.run(rx, async {
            let _ = stopped.await;
        }));
        Ok(ProxyHandle { addr, admin, shared, updates, stop: Some(stop), task })
    }

    /// The channel the proxy takes its snapshots from, for a discovery source to publish on.
    pub fn updates(&self) -> watch::Sender<Arc<Snapshot>> {
        self.updates.clone()
    }

    /// Publishes a new snapshot, as a discovery source would.
    pub fn update(&self, snapshot: Snapshot) {
        self.updates.send_replace(Arc::new(snapshot));
    }

    /// Stops accepting, drains, and waits for the proxy to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spread(counts: &[i64]) -> Arc<Spread> {
        let gauges: Vec<Gauge> = counts
            .iter()
            .map(|&n| {
                let g = Gauge::default();
                g.set(n);
                g
            })
            .collect();
        Spread::new(&gauges).0
    }

    #[test]
    fn a_worker_keeps_connections_within_the_slack() {
        assert_eq!(spread(&[0, 0]).choose(0), 0);
        assert_eq!(spread(&[12, 10]).choose(0), 0);
        assert_eq!(spread(&[10, 12]).choose(1), 1);
        assert_eq!(spread(&[5]).choose(0), 0);
    }

    #[test]
    fn a_busier_worker_hands_over_to_the_least_busy() {
        assert_eq!(spread(&[13, 10]).choose(0), 1);
        assert_eq!(spread(&[9, 20, 7, 8]).choose(1), 2);
        // The least busy never hands over.
        assert_eq!(spread(&[9, 20, 7, 8]).choose(2), 2);
    }

    #[test]
    fn seats_count_while_held() {
        let s = spread(&[0, 0]);
        let a = s.seat(1);
        let b = s.seat(1);
        assert_eq!(s.serving.iter().map(Gauge::get).collect::<Vec<_>>(), [0, 2]);
        drop((a, b));
        assert_eq!(s.serving.iter().map(Gauge::get).collect::<Vec<_>>(), [0, 0]);
    }
}
