//! A client connection's life in HTTP mode, bounded in every phase.
//!
//! hyper bounds an HTTP/1 request head only once the protocol is known, and
//! an HTTP/2 connection only by its PINGs; a connection that sends nothing,
//! one that dribbles a head, one with no stream for an hour or one whose
//! response stopped moving would otherwise be held for ever. Each connection
//! therefore has an [`Activity`] record, kept up to date by its socket
//! wrapper ([`ClientIo`]) and by the requests in flight on it ([`InFlight`]),
//! and a watchdog that sleeps until the earliest deadline it implies:
//!
//! - **detection** (`timeouts.header`): the first bytes, enough to tell
//!   HTTP/1 from the HTTP/2 preface, arrive in time ([`detect`]);
//! - **request head** (`timeouts.header`, HTTP/1): once a byte of a request
//!   has arrived on an idle connection, the whole head does, and the request
//!   starts;
//! - **idle** (`timeouts.idle`): a connection with no request in flight is
//!   closed gracefully (HTTP/2: `GOAWAY`), PINGs and other control frames
//!   notwithstanding (hyper's own HTTP/1 keep-alive timer ends the wait for
//!   the next head at the same time);
//! - **body idle** (`timeouts.bodyIdle`): with requests in flight, no byte in
//!   either direction for this long ends the connection, releasing the
//!   endpoints (a client that stopped reading, an endpoint that stopped
//!   sending). On an HTTP/2 connection each stream also has its own
//!   [`StreamClock`]: a stream whose response stops while others keep the
//!   connection busy is ended on its own after the same time (the response
//!   body enforces it; see `TrackedBody`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// Milliseconds since the first call in this process: a cheap, shared time
/// base for what is counted in milliseconds and seconds (a stream's
/// silence, an idle pooled connection, the tracks' seconds), read several
/// times per request.
pub(crate) fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let now = coarse_ms();
    now.saturating_sub(*EPOCH.get_or_init(|| now))
}

/// The kernel's coarse monotonic clock, in milliseconds: read from the
/// vDSO without the TSC (about 8 ns against 34 for `Instant::now` on a
/// virtual machine), it moves once per scheduler tick (1–4 ms).
#[cfg(target_os = "linux")]
fn coarse_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write to, and the clock exists
    // on every Linux since 2.6.32.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) } != 0 {
        return fine_ms();
    }
    u64::try_from(ts.tv_sec).unwrap_or(0).saturating_mul(1000) + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1_000_000
}

#[cfg(not(target_os = "linux"))]
fn coarse_ms() -> u64 {
    fine_ms()
}

/// Milliseconds of `Instant`, from the first reading.
fn fine_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// When a byte of one HTTP/2 stream last moved, either way: its request body
/// marks it as the client sends, its response body as the endpoint answers.
#[derive(Clone, Debug)]
pub(crate) struct StreamClock(Arc<AtomicU64>);

impl StreamClock {
    pub(crate) fn new() -> Self {
        StreamClock(Arc::new(AtomicU64::new(now_ms())))
    }

    pub(crate) fn touch(&self) {
        self.0.store(now_ms(), Ordering::Relaxed);
    }

    /// How long the stream has been silent.
    pub(crate) fn idle_for(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.0.load(Ordering::Relaxed)))
    }
}

/// The HTTP/2 client preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection has been doing, in milliseconds since its start.
#[derive(Debug)]
pub(crate) struct Activity {
    start: Instant,
    /// Requests in flight (from the service call to the end of the response body).
    in_flight: AtomicU32,
    /// When the connection last had no request in flight (or started).
    idle_since: AtomicU64,
    /// When the first byte of a request arrived on an idle connection; `u64::MAX`: none pending.
    head_since: AtomicU64,
    /// When a byte last moved either way.
    last_io: AtomicU64,
    /// HTTP/1 (request heads are timed) rather than HTTP/2.
    http1: AtomicBool,
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Activity {
            start: Instant::now(),
            in_flight: AtomicU32::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(u64::MAX),
            last_io: AtomicU64::new(0),
            http1: AtomicBool::new(true),
        })
    }

    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    fn read(&self) {
        let now = self.now();
        self.last_io.store(now, Ordering::Relaxed);
        if self.in_flight.load(Ordering::Relaxed) == 0 && self.head_since.load(Ordering::Relaxed) == u64::MAX {
            self.head_since.store(now, Ordering::Relaxed);
        }
    }

    fn wrote(&self) {
        self.last_io.store(self.now(), Ordering::Relaxed);
    }

    /// Counts a request as in flight until the guard drops.
    pub(crate) fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_since.store(u64::MAX, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// What the watchdog should do now, or when to look again.
    pub(crate) fn check(&self, limits: &Limits) -> Verdict {
        let now = self.now();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 4);
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            let due = self.last_io.load(Ordering::Relaxed).saturating_add(ms(limits.body_idle));
            return if now >= due { Verdict::Close("bodyIdle") } else { self.at(due, limits) };
        }
        let mut next = self.idle_since.load(Ordering::Relaxed).saturating_add(ms(limits.idle));
        if now >= next {
            return Verdict::Drain;
        }
        let head = self.head_since.load(Ordering::Relaxed);
        if head != u64::MAX && self.http1.load(Ordering::Relaxed) {
            let due = head.saturating_add(ms(limits.header));
            if now >= due {
                return Verdict::Close("header");
            }
            next = next.min(due);
        }
        self.at(next, limits)
    }

    /// Waits until `ms`, or less: the socket and the requests change the
    /// state without waking the watchdog, and a request that starts (or a
    /// head that begins) now may be due after the shortest limit.
    fn at(&self, ms: u64, limits: &Limits) -> Verdict {
        let soonest = limits.header.min(limits.body_idle).min(limits.idle);
        Verdict::Wait((self.start + Duration::from_millis(ms)).min(Instant::now() + soonest))
    }
}

/// The time limits the watchdog applies.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) header: Duration,
    pub(crate) idle: Duration,
    pub(crate) body_idle: Duration,
}

/// The watchdog's decision.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nothing is due before this instant.
    Wait(Instant),
    /// Idle too long: close gracefully.
    Drain,
    /// A phase overran (named by its timeout: `header`, `bodyIdle`): close now.
    Close(&'static str),
}

/// What a connection does after its watchdog looked: [`Watchdog::check`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Watch {
    /// Nothing to do before this instant.
    Wait(Instant),
    /// Close gracefully now (HTTP/2: `GOAWAY`), and look again at this instant.
    Drain(Instant),
    /// Close now.
    Stop,
}

/// A connection's watchdog: the [`Activity`] verdicts turned into what the
/// connection does, with the drain bounded by `timeouts.header` (a peer that
/// does not take part in the graceful close, such as an HTTP/2 client that
/// never answers the `GOAWAY`'s PING, is let go).
#[derive(Debug, Default)]
pub(crate) struct Watchdog {
    draining: Option<Instant>,
}

impl Watchdog {
    /// The graceful close has begun.
    pub(crate) fn draining(&self) -> bool {
        self.draining.is_some()
    }

    /// Records that the graceful close began (the proxy is draining).
    pub(crate) fn drain_started(&mut self) {
        self.draining.get_or_insert_with(Instant::now);
    }

    /// What the connection of `peer` must do now, counting a timeout that
    /// ends it in `shared`'s metrics.
    pub(crate) fn check(
        &mut self,
        activity: &Activity,
        limits: &Limits,
        shared: &super::state::Shared,
        peer: std::net::SocketAddr,
    ) -> Watch {
        match activity.check(limits) {
            Verdict::Wait(at) => Watch::Wait(at),
            Verdict::Drain => match self.draining {
                None => {
                    let now = Instant::now();
                    self.draining = Some(now);
                    Watch::Drain(now + limits.header)
                }
                Some(since) if since.elapsed() >= limits.header => {
                    shared.metrics.timed_out("idle");
                    Watch::Stop
                }
                Some(since) => Watch::Wait(since + limits.header),
            },
            Verdict::Close(timeout) => {
                tracing::debug!(%peer, timeout, "client connection past its timeout; closed");
                shared.metrics.timed_out(timeout);
                Watch::Stop
            }
        }
    }
}

/// A request in flight on a connection.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        if a.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            a.idle_since.store(a.now(), Ordering::Relaxed);
        }
    }
}

/// A response body that keeps its request counted in flight until it ends.
pub(crate) struct Guarded<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B> Guarded<B> {
    pub(crate) fn new(inner: B, in_flight: InFlight) -> Self {
        Guarded { inner, _in_flight: in_flight }
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Reads the first bytes of a connection into `buf`, enough to tell the
/// HTTP/2 preface from an HTTP/1 request, within `limit`: as much as has
/// arrived, so an HTTP/1 request head usually comes whole with the first
/// read. Returns them (to be read again by the HTTP server) and whether the
/// connection speaks HTTP/1; `None` when the client sent too little in time
/// or closed.
pub(crate) async fn detect<S: AsyncRead + Unpin>(
    io: &mut S,
    limit: Duration,
    buf: impl FnOnce() -> Vec<u8>,
) -> Option<(Vec<u8>, bool)> {
    let read = async move {
        let mut buf = buf();
        loop {
            if buf.capacity() - buf.len() < H2_PREFACE.len() {
                buf.reserve(4096);
            }
            let n = io.read_buf(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            let seen = buf.len().min(H2_PREFACE.len());
            if buf[..seen] != H2_PREFACE[..seen] {
                return Some((buf, true));
            }
            if seen == H2_PREFACE.len() {
                return Some((buf, false));
            }
        }
    };
    tokio::time::timeout(limit, read).await.ok()?
}

/// A client socket that replays the bytes [`detect`] read, and records its
/// activity.
pub(crate) struct ClientIo<S> {
    io: S,
    prefix: Bytes,
    activity: Arc<Activity>,
}

impl<S> ClientIo<S> {
    pub(crate) fn new(io: S, prefix: Bytes, http1: bool, activity: Arc<Activity>) -> Self {
        activity.http1.store(http1, Ordering::Relaxed);
        activity.read();
        ClientIo { io, prefix, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ClientIo<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.read();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ClientIo<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.wrote();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.wrote();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        header: Duration::from_millis(100),
        idle: Duration::from_millis(300),
        body_idle: Duration::from_millis(200),
    };

    #[test]
    fn the_millisecond_clock_moves_with_time_and_never_back() {
        let a = now_ms();
        std::thread::sleep(Duration::from_millis(60));
        let b = now_ms();
        // One scheduler tick (up to 4 ms here, 10 ms on the slowest) either side.
        assert!((45..2_000).contains(&(b - a)), "{a} then {b}");
        let mut last = b;
        for _ in 0..10_000 {
            let now = now_ms();
            assert!(now >= last);
            last = now;
        }
    }

    #[tokio::test]
    async fn detection_tells_http1_from_the_preface_and_gives_up_on_silence() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut b, b"GET / HTTP/1.1\r\n").await.unwrap();
        let (bytes, http1) = detect(&mut a, Duration::from_secs(1), Vec::new).await.unwrap();
        assert!(http1 && bytes == b"GET / HTTP/1.1\r\n", "the whole first read is kept");
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut b, H2_PREFACE).await.unwrap();
        assert_eq!(
            detect(&mut a, Duration::from_secs(1), Vec::new).await.map(|(b, h)| (b.len(), h)),
            Some((24, false))
        );
        // The preface's first bytes, then nothing: not a hang.
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut b, b"PRI * HTTP").await.unwrap();
        assert!(detect(&mut a, Duration::from_millis(50), Vec::new).await.is_none());
        let (mut a, _b) = tokio::io::duplex(64);
        assert!(detect(&mut a, Duration::from_millis(50), Vec::new).await.is_none());
    }

    #[tokio::test]
    async fn each_phase_has_its_deadline() {
        let a = Activity::new();
        // Idle from the start, with nothing pending: drained after `idle`.
        assert!(matches!(a.check(&LIMITS), Verdict::Wait(_)));
        a.read();
        tokio::time::sleep(Duration::from_millis(130)).await;
        assert_eq!(a.check(&LIMITS), Verdict::Close("header"));
        // A request in flight: the head timer stops; no byte for body_idle closes.
        let guard = a.request();
        a.wrote();
        assert!(matches!(a.check(&LIMITS), Verdict::Wait(_)));
        tokio::time::sleep(Duration::from_millis(230)).await;
        assert_eq!(a.check(&LIMITS), Verdict::Close("bodyIdle"));
        drop(guard);
        assert!(matches!(a.check(&LIMITS), Verdict::Wait(_)), "idle time counts from the last request's end");
        tokio::time::sleep(Duration::from_millis(330)).await;
        assert_eq!(a.check(&LIMITS), Verdict::Drain);
        // HTTP/2 connections have no head timer (control frames arrive while idle).
        let h2 = Activity::new();
        h2.http1.store(false, Ordering::Relaxed);
        h2.read();
        tokio::time::sleep(Duration::from_millis(130)).await;
        assert!(matches!(h2.check(&LIMITS), Verdict::Wait(_)));
    }
}
