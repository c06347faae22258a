//! HTTP/2 client connections, served with the proxy's own codec
//! ([`h2conn`](super::h2conn)): the connection's own task reads the
//! client's frames, runs every stream and writes what they answer.
//!
//! Each read goes through [`Conn::recv`]; a request head becomes a
//! request for the hyper path ([`http::serve`]), or, when the endpoints
//! speak HTTP/1.1 and the request is plain, the HTTP/1.1 head a client
//! would have sent ([`bridge::RawRequest`], [`http::serve_raw`]); its
//! future joins the connection's set of streams (each polled when it is new
//! and when its own waker fired, before the socket, so what they queue goes
//! out with the pass that read the frames that made them ready; a stream the
//! client resets leaves the set at once); its body is fed from the frames
//! as they come ([`StreamBody`]), and given back to the client's windows as
//! it is read. A response's head is encoded straight from its header map
//! (and an HTTP/1.1 endpoint's fields from its bytes), its body sent
//! at the pace of the client's windows, everything one pass produced in one
//! write. No task per stream, no `h2` crate, no channel between tasks.
//!
//! The settings are the ones the `h2` crate had here: 1 MiB windows, 16 KiB
//! frames, at most 400 KiB queued for the client, the stream and header
//! limits of `limits`, the rapid-reset bounds (CVE-2023-44487). The
//! connection's watchdog is the one HTTP/1 connections have
//! ([`conn::Watchdog`]); besides, the proxy sends a PING every half of
//! `timeouts.idle` (at most every 30 s) and closes the connection when one is
//! not answered by the next (as it does towards endpoints,
//! [`super::h2c::drive`]): a client that vanished without a word does not
//! hold a stream's endpoint until `timeouts.request` ends it. The graceful
//! close sends GOAWAY and lets the streams in flight finish; a stream the
//! client resets stops being served at once.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use ::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri, Version, uri};
use bytes::{Buf, Bytes, BytesMut};
use futures::task::AtomicWaker;
use http_body_util::Either;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::bridge::{self, Towards};
use super::config::Limits;
use super::conn::{self, InFlight, StreamClock};
use super::fast;
use super::h2conn::{self, Conn, Handler, Head};
use super::h2frame::Reason;
use super::http::{self, Peer, ProxyBody, RawHead, RequestBody};
use super::state::Shared;

/// The most the connection queues for the client before it stops taking
/// more from the streams' bodies (the `h2` crate's send buffer here).
const MAX_QUEUED: usize = 400 * 1024;

/// How much is read from the client at a time.
const READ_SIZE: usize = 16 * 1024;

/// Room for this many streams' entries stays with a connection that has none
/// left; a larger burst's is given back.
const IDLE_STREAMS: usize = 16;

/// What a connection's task writes: what one pass produced, written in as
/// few writes as the socket takes, then flushed (TLS holds what it took
/// until then).
#[derive(Default)]
pub(crate) struct Outbox {
    buf: Vec<u8>,
    written: usize,
    unflushed: bool,
}

/// What [`Outbox::poll_send`] did.
pub(crate) struct Sent {
    /// Bytes went out.
    pub(crate) wrote: bool,
    /// A flush completed.
    pub(crate) flushed: bool,
}

impl Outbox {
    /// Everything taken has been written (perhaps not flushed).
    pub(crate) fn all_written(&self) -> bool {
        self.written == self.buf.len()
    }

    /// Everything taken has been written and flushed.
    pub(crate) fn done(&self) -> bool {
        self.all_written() && !self.unflushed
    }

    /// Bytes taken and not written yet.
    pub(crate) fn queued(&self) -> usize {
        self.buf.len() - self.written
    }

    /// Takes what `output` holds (leaving it an empty buffer to fill) once
    /// everything before has been written; whether it took anything.
    pub(crate) fn refill(&mut self, output: &mut Vec<u8>) -> bool {
        if !self.all_written() || output.is_empty() {
            return false;
        }
        self.buf.clear();
        self.written = 0;
        std::mem::swap(&mut self.buf, output);
        true
    }

    /// Its buffer, once everything has been written.
    pub(crate) fn take_buffer(&mut self) -> Vec<u8> {
        self.written = 0;
        std::mem::take(&mut self.buf)
    }

    /// Writes what it holds, then flushes; `Err` when the socket failed.
    pub(crate) fn poll_send<W: AsyncWrite + Unpin>(&mut self, io: &mut W, cx: &mut Context<'_>) -> Result<Sent, ()> {
        let mut sent = Sent { wrote: false, flushed: false };
        while self.written < self.buf.len() {
            match Pin::new(&mut *io).poll_write(cx, &self.buf[self.written..]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Err(()),
                Poll::Ready(Ok(n)) => {
                    self.written += n;
                    self.unflushed = true;
                    sent.wrote = true;
                }
                Poll::Pending => break,
            }
        }
        if self.unflushed && self.all_written() {
            match Pin::new(&mut *io).poll_flush(cx) {
                Poll::Ready(Ok(())) => {
                    self.unflushed = false;
                    sent.flushed = true;
                }
                Poll::Ready(Err(_)) => return Err(()),
                Poll::Pending => {}
            }
        }
        Ok(sent)
    }
}

/// The connection settings, with `limits`.
pub(crate) fn config(limits: &Limits) -> h2conn::Config {
    h2conn::Config {
        max_concurrent_streams: limits.max_concurrent_streams,
        max_header_list_size: limits.max_request_header_bytes,
        // HTTP/2 heads are bounded by their size alone (as with hyper).
        max_header_fields: usize::MAX,
        stream_window: 1024 * 1024,
        connection_window: 1024 * 1024,
        max_frame_size: 16 * 1024,
        max_pending_resets: 32,
        max_local_resets: 256,
    }
}

/// A body's pieces as the codec hands them over, until its reader takes
/// them (a client's request body here, an endpoint's response body in
/// [`super::h2c`]).
#[derive(Default)]
pub(crate) struct Arrived {
    /// The oldest piece not taken (most bodies a proxy passes on come in
    /// one; the queue is for the rest).
    first: Option<Bytes>,
    chunks: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    /// The sender's side ended.
    end: bool,
    /// A piece has arrived.
    started: bool,
}

impl Arrived {
    /// A piece of data, copied; `end` when it ends the sender's side. The
    /// body's first piece and its last, when small (a unary call's message
    /// is both), are cut from `copies`; the pieces between get buffers of
    /// their own, so that a long body of tiny pieces, held for a retry or
    /// queued for a slow reader, does not keep one of the connection's
    /// buffers alive per piece.
    pub(crate) fn data(&mut self, data: &[u8], end: bool, copies: &mut HeadCopies) {
        if !data.is_empty() {
            let data = if !self.started || end { copies.copy_piece(data) } else { Bytes::copy_from_slice(data) };
            self.started = true;
            if self.first.is_none() && self.chunks.is_empty() {
                self.first = Some(data);
            } else {
                self.chunks.push_back(data);
            }
        }
        self.end |= end;
    }

    /// The sender's side ended when `end` says so (a head with END_STREAM).
    pub(crate) fn ends(&mut self, end: bool) {
        self.end |= end;
    }

    /// The trailers, which end the sender's side.
    pub(crate) fn trailers(&mut self, trailers: HeaderMap) {
        self.trailers = Some(trailers);
        self.end = true;
    }

    /// The next piece for the reader: data (its length counted off
    /// `length`), then the trailers, then the end (`Some(None)`); `None`
    /// while more is to come.
    pub(crate) fn next(&mut self, length: &mut Option<u64>) -> Option<Option<Frame<Bytes>>> {
        if let Some(data) = self.first.take().or_else(|| self.chunks.pop_front()) {
            if let Some(left) = length {
                *left = left.saturating_sub(data.len() as u64);
            }
            return Some(Some(Frame::data(data)));
        }
        if let Some(trailers) = self.trailers.take() {
            return Some(Some(Frame::trailers(trailers)));
        }
        self.end.then_some(None)
    }

    /// Pieces wait for the reader (data or trailers).
    pub(crate) fn holds_pieces(&self) -> bool {
        self.first.is_some() || !self.chunks.is_empty() || self.trailers.is_some()
    }

    /// The sender's side ended, and the reader has taken everything.
    pub(crate) fn is_end(&self) -> bool {
        self.end && self.first.is_none() && self.chunks.is_empty() && self.trailers.is_none()
    }

    /// Drops what nobody will read; how many data bytes that was.
    pub(crate) fn discard(&mut self) -> usize {
        self.first.take().into_iter().chain(self.chunks.drain(..)).map(|c| c.len()).sum()
    }
}

/// What a stream's request body and its future share with the connection.
#[derive(Default)]
struct Slot {
    arrived: Arrived,
    /// The stream broke off (reset, or the connection ended): the body fails.
    gone: bool,
    body: Option<Waker>,
}

type SharedSlot = Arc<Mutex<Slot>>;

/// Body bytes the streams' readers have taken and the connection has not
/// yet given back to the client's windows, by stream, in the order read:
/// the connection learns what was read without asking each stream.
#[derive(Default)]
struct Consumed(Mutex<Vec<(u32, usize)>>);

impl Consumed {
    fn add(&self, stream: u32, n: usize) {
        let mut list = lock(&self.0);
        match list.last_mut() {
            Some((last, sum)) if *last == stream => *sum += n,
            _ => list.push((stream, n)),
        }
    }

    /// What was read since the last call, in `into` (emptied first).
    fn take(&self, into: &mut Vec<(u32, usize)>) {
        into.clear();
        std::mem::swap(&mut *lock(&self.0), into);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn wake(slot: &mut Slot) {
    if let Some(w) = slot.body.take() {
        w.wake();
    }
}

/// The body of a client's request on an HTTP/2 stream.
pub(crate) struct StreamBody {
    slot: SharedSlot,
    stream: u32,
    consumed: Arc<Consumed>,
    /// What is left of the client's `Content-Length` (the codec holds the data to it).
    length: Option<u64>,
    ended: bool,
    /// The slot held pieces not yet taken when this body last took one, so
    /// it has not ended: only this body takes them, or the connection drops
    /// them when the stream breaks off, which ends the body in an error,
    /// not cleanly ([`Body::is_end_stream`] needs no lock either way).
    held: bool,
}

/// The stream broke off before its request body ended.
#[derive(Debug, thiserror::Error)]
#[error("the HTTP/2 stream broke off")]
pub(crate) struct StreamGone;

impl Body for StreamBody {
    type Data = Bytes;
    type Error = StreamGone;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, StreamGone>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        let mut slot = lock(&this.slot);
        if let Some(piece) = slot.arrived.next(&mut this.length) {
            this.held = slot.arrived.holds_pieces();
            drop(slot);
            match piece.as_ref().map(Frame::data_ref) {
                Some(Some(data)) => this.consumed.add(this.stream, data.len()),
                _ => this.ended = true,
            }
            return Poll::Ready(piece.map(Ok));
        }
        if slot.gone {
            this.ended = true;
            return Poll::Ready(Some(Err(StreamGone)));
        }
        slot.body = Some(cx.waker().clone());
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        if self.ended {
            return true;
        }
        if self.held {
            return false;
        }
        lock(&self.slot).arrived.is_end()
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(n) => SizeHint::with_exact(n),
            None if self.is_end_stream() => SizeHint::with_exact(0),
            None => SizeHint::default(),
        }
    }
}

/// The request of a head, for the hyper path; `None` when it cannot be one
/// (a malformed authority, scheme or path: the stream is reset, as the `h2`
/// crate did).
fn request_of(head: &Head, body: RequestBody, copies: &mut HeadCopies) -> Option<Request<RequestBody>> {
    let method = Method::from_bytes(head.method()).ok()?;
    let connect = method == Method::CONNECT;
    // One copy of the head, whose slices the authority, the path and the
    // values keep (rather than one allocation each).
    let shared = copies.copy(head.bytes());
    let slice = |part: &[u8]| shared.slice(head.range_of(part));
    let mut parts = uri::Parts::default();
    if let Some(a) = head.authority() {
        parts.authority = Some(uri::Authority::from_maybe_shared(slice(a)).ok()?);
    }
    if let Some(s) = head.scheme() {
        let scheme = uri::Scheme::try_from(s).ok()?;
        // A URI has no scheme without an authority.
        if parts.authority.is_some() {
            parts.scheme = Some(scheme);
        }
    }
    if let Some(p) = head.path() {
        parts.path_and_query = Some(uri::PathAndQuery::from_maybe_shared(slice(p)).ok()?);
    } else if !connect {
        return None;
    }
    let uri = Uri::from_parts(parts).ok()?;
    // Room for what the request path adds: a map that grows is rebuilt.
    let mut headers = fields_map(head, &shared, http::ADDED_FIELDS)?;
    // The `:authority` is the `Host` (RFC 9113 §8.3.1) for whatever reads
    // one: hashing, the HTTP/1.1 head, the HTTP/2 endpoint's `:authority`.
    if let Some(a) = head.authority()
        && !headers.contains_key(::http::header::HOST)
    {
        headers.insert(::http::header::HOST, HeaderValue::from_maybe_shared(slice(a)).ok()?);
    }
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_2;
    *req.headers_mut() = headers;
    Some(req)
}

/// Copies of a connection's heads and small body pieces, cut from one
/// buffer: a copy of its own would be an allocation, and the first slice
/// of it another (to share it, as a held request body does for a retry);
/// here both happen once a buffer's worth. A head's map or a piece keeps at
/// most one buffer of [`HeadCopies::ROOM`] alive while it lives.
#[derive(Default)]
pub(crate) struct HeadCopies(BytesMut);

impl HeadCopies {
    /// Size of each buffer (a gRPC call's head takes 150–300 bytes).
    const ROOM: usize = 2048;

    /// Body pieces up to this size are copied here too (a unary gRPC
    /// call's message, a small upload); larger ones get a buffer of their
    /// own, not to keep a shared one alive for longer than its heads.
    const SMALL_PIECE: usize = 512;

    /// A copy of a body's piece: here when it is small, else on its own.
    pub(crate) fn copy_piece(&mut self, bytes: &[u8]) -> Bytes {
        if bytes.len() <= Self::SMALL_PIECE { self.copy(bytes) } else { Bytes::copy_from_slice(bytes) }
    }

    /// A copy of `bytes`.
    pub(crate) fn copy(&mut self, bytes: &[u8]) -> Bytes {
        if self.0.capacity() < bytes.len() {
            self.0 = BytesMut::with_capacity(Self::ROOM.max(bytes.len()));
        }
        self.0.extend_from_slice(bytes);
        self.0.split().freeze()
    }

    /// Lets the buffer go (an idle connection holds none).
    pub(crate) fn release(&mut self) {
        self.0 = BytesMut::new();
    }
}

/// The regular fields of `head` as a header map with room for `room` more,
/// their values slices of `shared` (a copy of [`Head::bytes`]); `None` when
/// one is not a valid field.
pub(crate) fn fields_map(head: &Head, shared: &Bytes, room: usize) -> Option<HeaderMap> {
    let mut map = http::header_map(head.fields().size_hint().0 + room);
    for (name, value) in head.fields() {
        let value = HeaderValue::from_maybe_shared(shared.slice(head.range_of(value))).ok()?;
        map.append(HeaderName::from_bytes(name).ok()?, value);
    }
    Some(map)
}

/// The open streams' slots: at most the connection's stream limit, found
/// by a scan (cheaper than hashing at these sizes).
#[derive(Default)]
struct Slots(Vec<(u32, SharedSlot)>);

impl Slots {
    fn insert(&mut self, stream: u32, slot: SharedSlot) {
        self.0.push((stream, slot));
    }

    fn get(&self, stream: u32) -> Option<&SharedSlot> {
        self.0.iter().find(|(s, _)| *s == stream).map(|(_, slot)| slot)
    }

    fn remove(&mut self, stream: u32) -> Option<SharedSlot> {
        let i = self.0.iter().position(|(s, _)| *s == stream)?;
        Some(self.0.swap_remove(i).1)
    }

    fn all(&self) -> impl Iterator<Item = &SharedSlot> {
        self.0.iter().map(|(_, slot)| slot)
    }
}

/// What the codec hands over during one read.
#[derive(Default)]
struct Events {
    slots: Slots,
    /// The endpoints the requests go to: a plain request goes to them
    /// without a header map ([`bridge::h1_head`]).
    towards: Towards,
    /// The last request head written for that path.
    written: bridge::Written,
    /// New requests: their stream and request (`None`: malformed).
    opened: Vec<(u32, Option<Opened>)>,
    copies: HeadCopies,
    writable: Vec<u32>,
    /// Streams the client reset, with their slots (to give back what they hold).
    gone: Vec<(u32, Option<SharedSlot>)>,
    /// What the streams' bodies have read, shared with them.
    consumed: Arc<Consumed>,
    /// The last pass's reads ([`Consumed::take`]) and the streams that
    /// left ([`Conn::left`]), kept for their capacity.
    released: Vec<(u32, usize)>,
    left: Vec<u32>,
}

impl Handler for Events {
    fn request(&mut self, stream: u32, head: &Head, end_stream: bool) {
        let slot = SharedSlot::default();
        lock(&slot).arrived.ends(end_stream);
        let body = StreamBody {
            slot: slot.clone(),
            stream,
            consumed: self.consumed.clone(),
            length: head.content_length(),
            ended: false,
            held: false,
        };
        self.slots.insert(stream, slot);
        let body = Either::Right(body);
        let opened = match bridge::RawRequest::of(head, end_stream, body, self.towards, &mut self.written) {
            Ok(raw) if self.towards == Towards::Http1 => Some(Opened::Raw(raw)),
            Ok(raw) => Some(Opened::Relay(raw)),
            Err(body) => request_of(head, body, &mut self.copies).map(Opened::Map),
        };
        self.opened.push((stream, opened));
    }

    fn data(&mut self, stream: u32, data: &[u8], end_stream: bool) {
        if let Some(slot) = self.slots.get(stream) {
            let mut slot = lock(slot);
            slot.arrived.data(data, end_stream, &mut self.copies);
            wake(&mut slot);
        }
    }

    fn trailers(&mut self, stream: u32, head: &Head) {
        if let Some(slot) = self.slots.get(stream) {
            let mut map = HeaderMap::new();
            for (name, value) in head.fields() {
                if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
                    map.append(n, v);
                }
            }
            let mut slot = lock(slot);
            slot.arrived.trailers(map);
            wake(&mut slot);
        }
    }

    fn reset(&mut self, stream: u32, _: u32) {
        let slot = self.slots.remove(stream);
        if let Some(slot) = &slot {
            let mut slot = lock(slot);
            slot.gone = true;
            wake(&mut slot);
        }
        self.gone.push((stream, slot));
    }

    fn writable(&mut self, stream: u32) {
        self.writable.push(stream);
    }
}

/// A stream's request, as the hyper path takes it or without a header map
/// (towards HTTP/1.1 or HTTP/2 endpoints).
enum Opened {
    Map(Request<RequestBody>),
    Raw(bridge::RawRequest),
    Relay(bridge::RawRequest),
}

/// A stream's request's future: its response (the proxy's own when the
/// endpoints did not answer).
trait Answer: Future<Output = Result<Response<ProxyBody>, std::convert::Infallible>> {}

impl<F: Future<Output = Result<Response<ProxyBody>, std::convert::Infallible>>> Answer for F {}

/// A stream's request being served, by the way it was [`Opened`]: its
/// future, boxed (the set of a connection's streams moves its entries).
enum Serving<M, R, H> {
    Map(Pin<Box<M>>),
    Raw(Pin<Box<R>>),
    Relay(Pin<Box<H>>),
}

impl<M, R, H> Serving<M, R, H>
where
    M: Answer,
    R: Answer,
    H: Answer,
{
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Response<ProxyBody>> {
        let polled = match self {
            Serving::Map(f) => f.as_mut().poll(cx),
            Serving::Raw(f) => f.as_mut().poll(cx),
            Serving::Relay(f) => f.as_mut().poll(cx),
        };
        polled.map(|Ok(resp)| resp)
    }
}

/// A stream being served, in its connection's set: polled when it is new
/// and whenever its own waker fired, never for another stream's sake.
/// A stream the client resets leaves the set at once, its future dropped
/// (and with it the request to the endpoint).
struct Entry<M, R, H> {
    stream: u32,
    serving: Serving<M, R, H>,
    ready: Arc<ReadyWaker>,
    waker: Waker,
    /// Handed to the response once the stream answers.
    in_flight: InFlight,
}

impl<M, R, H> Entry<M, R, H> {
    fn new(stream: u32, serving: Serving<M, R, H>, connection: &Arc<AtomicWaker>, in_flight: InFlight) -> Self {
        let (ready, waker) = ReadyWaker::new(connection);
        Entry { stream, serving, ready, waker, in_flight }
    }
}

/// Polls the streams whose wakers fired, in `set`; each answered stream
/// leaves the set and is handed to `answered` with its response.
fn poll_ready<M, R, H>(
    set: &mut Vec<Entry<M, R, H>>,
    mut answered: impl FnMut(u32, Response<ProxyBody>, InFlight),
) -> bool
where
    M: Answer,
    R: Answer,
    H: Answer,
{
    let mut progress = false;
    let mut i = 0;
    while i < set.len() {
        let entry = &mut set[i];
        if !entry.ready.take() {
            i += 1;
            continue;
        }
        match entry.serving.poll(&mut Context::from_waker(&entry.waker)) {
            Poll::Ready(resp) => {
                progress = true;
                let Entry { stream, in_flight, .. } = set.swap_remove(i);
                answered(stream, resp, in_flight);
            }
            Poll::Pending => i += 1,
        }
    }
    progress
}

/// A response whose body is being sent.
struct Sending {
    stream: u32,
    body: ProxyBody,
    /// Data taken from the body and not yet all sent: the bytes and how many went.
    pending: Option<(Bytes, usize)>,
    /// Waiting for the client's window.
    blocked: bool,
    /// The body's own waker, from the first time it had nothing to give
    /// (most bodies a proxy passes on are whole when their head is sent).
    waker: Option<(Arc<ReadyWaker>, Waker)>,
    _in_flight: InFlight,
}

/// Wakes the connection for one stream's future or one response body and
/// marks it ready, so that a pass polls only what has something for it,
/// not each stream still waiting for its endpoint (a connection may carry
/// a hundred).
struct ReadyWaker {
    ready: AtomicBool,
    connection: Arc<AtomicWaker>,
}

impl ReadyWaker {
    /// A waker for `connection`, marked ready (what it wakes is polled once
    /// before anything wakes it).
    fn new(connection: &Arc<AtomicWaker>) -> (Arc<ReadyWaker>, Waker) {
        let ready = Arc::new(ReadyWaker { ready: AtomicBool::new(true), connection: connection.clone() });
        let waker = Waker::from(ready.clone());
        (ready, waker)
    }

    /// Whether it was woken since the last call (a plain load first: most
    /// of what a pass looks at is waiting).
    fn take(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && self.ready.swap(false, Ordering::AcqRel)
    }
}

impl Wake for ReadyWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.store(true, Ordering::Release);
        self.connection.wake();
    }
}

/// Serves one HTTP/2 client connection (its preface is in `io`'s replayed
/// prefix) until it closes, its watchdog ends it or the drain has finished it.
pub(crate) async fn serve<S>(
    shared: &Arc<Shared>,
    mut io: conn::ClientIo<S>,
    client: &Peer,
    activity: &Arc<conn::Activity>,
    limits: conn::Limits,
    graceful: &CancellationToken,
    config: &h2conn::Config,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = client.addr;
    let mut conn = Conn::server(*config);
    let mut events = Events::default();
    let mut read = BytesMut::new();
    let mut out = Outbox::default();
    let mut read_closed = false;
    let ping_every = (limits.idle / 2).min(Duration::from_secs(30));
    let mut next_ping = Instant::now() + ping_every;
    let mut pings = 0u64;
    let mut watchdog = conn::Watchdog::default();
    // The streams being served (their futures, each polled when its own waker fired).
    let mut streams = Vec::new();
    let mut sending: Vec<Sending> = Vec::new();
    let mut timer = pin!(tokio::time::sleep(Duration::ZERO));
    let mut drain = pin!(graceful.cancelled());
    // Wakes this task for the response bodies ([`BodyWaker`]).
    let connection = Arc::new(AtomicWaker::new());
    std::future::poll_fn(|cx| {
        connection.register(cx.waker());
        loop {
            let mut progress = false;
            // The streams first: what they answer goes out with this pass.
            if !streams.is_empty() {
                progress |= poll_ready(&mut streams, |stream, resp, in_flight| {
                    let (parts, body) = resp.into_parts();
                    let end = body.is_end_stream();
                    if conn.output().capacity() == 0 {
                        // Room for a pass's worth of answers at once, from the
                        // worker's pool rather than the allocator.
                        *conn.output() = fast::take_buffer();
                    }
                    let map = parts.headers.iter().map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
                    let status = parts.status.as_u16();
                    let sent = match http::raw_head(&body) {
                        RawHead::Bridged(raw) => conn.send_response(stream, status, raw.head_fields().chain(map), end),
                        RawHead::Http2(h2) => conn.send_response(stream, status, h2.head_fields().chain(map), end),
                        RawHead::None => conn.send_response(stream, status, map, end),
                    };
                    http::recycle(parts.headers);
                    if sent.is_ok() && !end {
                        sending.push(Sending {
                            stream,
                            body,
                            pending: None,
                            blocked: false,
                            waker: None,
                            _in_flight: in_flight,
                        });
                    }
                });
                if streams.is_empty() && streams.capacity() > IDLE_STREAMS {
                    // A burst's room is not kept by a connection with no stream.
                    streams = Vec::new();
                }
            }
            // Bodies read give their bytes back to the client's windows; a
            // stream the codec has closed (its response ended, or it was
            // reset) gives back what its body still holds, and goes.
            events.consumed.take(&mut events.released);
            for &(stream, n) in &events.released {
                conn.release(stream, n);
            }
            conn.left(&mut events.left);
            for &stream in &events.left {
                if let Some(slot) = events.slots.remove(stream) {
                    retire(&mut conn, stream, &slot);
                }
            }
            for stream in events.writable.drain(..) {
                if let Some(s) = sending.iter_mut().find(|s| s.stream == stream) {
                    s.blocked = false;
                }
            }
            for (stream, slot) in events.gone.drain(..) {
                // The client reset it: its request is abandoned at once.
                if let Some(i) = streams.iter().position(|e| e.stream == stream) {
                    streams.swap_remove(i);
                }
                sending.retain(|s| s.stream != stream);
                if let Some(slot) = slot {
                    retire(&mut conn, stream, &slot);
                }
            }
            if pump(&mut conn, &mut sending, out.queued(), &connection, cx) {
                progress = true;
            }
            // Write what the pass produced, in one write when the socket takes it.
            out.refill(conn.output());
            let Ok(sent) = out.poll_send(&mut io, cx) else { return Poll::Ready(()) };
            progress |= sent.wrote;
            if sent.flushed && conn.streams() == 0 {
                // An idle connection holds no write buffer: they go back to the worker's pool.
                fast::give_buffer(out.take_buffer());
                events.copies.release();
                if conn.output().is_empty() {
                    fast::give_buffer(std::mem::take(conn.output()));
                }
            }
            if conn.is_done() && out.done() {
                return Poll::Ready(());
            }
            // Read while nothing waits to be written (so the client cannot
            // make replies pile up) and the streams have room.
            if out.all_written() && !read_closed {
                if read.capacity() - read.len() < READ_SIZE {
                    read.reserve(READ_SIZE);
                }
                match tokio_util::io::poll_read_buf(Pin::new(&mut io), cx, &mut read) {
                    Poll::Ready(Ok(0)) => read_closed = true,
                    Poll::Ready(Ok(_)) => {
                        events.towards = if shared.current.load().config.app_protocol.is_http2() {
                            Towards::Http2
                        } else {
                            Towards::Http1
                        };
                        match conn.recv(&read, &mut events) {
                            Ok(taken) => {
                                read.advance(taken);
                                if read.is_empty() {
                                    // An idle connection holds no read buffer.
                                    read = BytesMut::new();
                                }
                            }
                            Err(e) => {
                                tracing::debug!(%peer, error = %e, "HTTP/2 client connection failed");
                                read.clear();
                            }
                        }
                        for (stream, req) in events.opened.drain(..) {
                            let Some(req) = req else {
                                conn.reset(stream, Reason::ProtocolError);
                                if let Some(slot) = events.slots.remove(stream) {
                                    retire(&mut conn, stream, &slot);
                                }
                                continue;
                            };
                            if events.slots.get(stream).is_none() {
                                continue;
                            }
                            let serving = open_stream(shared.clone(), client.clone(), req);
                            streams.push(Entry::new(stream, serving, &connection, activity.request()));
                        }
                        progress = true;
                    }
                    Poll::Ready(Err(_)) => read_closed = true,
                    Poll::Pending => {}
                }
            }
            if read_closed && out.done() {
                return Poll::Ready(());
            }
            if progress {
                continue;
            }
            if !watchdog.draining() && drain.as_mut().poll(cx).is_ready() {
                watchdog.drain_started();
                conn.shutdown();
                continue;
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            let wake = match watchdog.check(activity, &limits, shared, peer) {
                conn::Watch::Wait(at) => at,
                conn::Watch::Drain(at) => {
                    conn.shutdown();
                    at
                }
                conn::Watch::Stop => return Poll::Ready(()),
            };
            if now >= next_ping {
                if conn.ping_pending() {
                    tracing::debug!(%peer, "a client left a PING unanswered; closing the connection");
                    return Poll::Ready(());
                }
                pings += 1;
                conn.ping(pings.to_be_bytes());
                next_ping = now + ping_every;
            }
            timer.as_mut().reset(wake.min(next_ping).into());
        }
    })
    .await;
    // The connection's end reaches its streams, and each is polled once
    // more to see it, as a stream task of its own would be: a request still
    // reading its body answers `400` and is counted; one waiting for its
    // endpoint is dropped, and its endpoint released.
    for slot in events.slots.all() {
        let mut slot = lock(slot);
        slot.gone = true;
        wake(&mut slot);
    }
    drop(sending);
    // Each woken stream is polled to see its end; one that answers may wake
    // another (a few passes at most: what still waits is dropped).
    for _ in 0..4 {
        if !poll_ready(&mut streams, |_, _, _| {}) {
            break;
        }
    }
}

/// Gives back to the client's windows what a stream's body read and what
/// it holds unread, as the stream leaves.
fn retire(conn: &mut Conn, stream: u32, slot: &SharedSlot) {
    let mut slot = lock(slot);
    // A reader still at it sees the stream gone rather than wait.
    slot.gone = true;
    wake(&mut slot);
    let held = slot.arrived.discard();
    if held > 0 {
        conn.release(stream, held);
    }
}

/// Moves what the responses' bodies have into the connection, as far as
/// the client's windows and the queue's bound allow; whether anything moved.
/// A body is polled when it is new or its waker says it has something.
fn pump(
    conn: &mut Conn,
    sending: &mut Vec<Sending>,
    queued: usize,
    connection: &Arc<AtomicWaker>,
    cx: &mut Context<'_>,
) -> bool {
    let mut progress = false;
    sending.retain_mut(|s| {
        loop {
            if s.blocked || queued + conn.output().len() > MAX_QUEUED {
                return true;
            }
            if let Some((data, sent)) = &mut s.pending {
                match conn.send_data(s.stream, &data[*sent..], false) {
                    Ok(n) => {
                        *sent += n;
                        progress |= n > 0;
                        if *sent < data.len() {
                            s.blocked = true;
                            return true;
                        }
                        s.pending = None;
                    }
                    Err(_) => return false,
                }
            }
            let polled = match &s.waker {
                Some((own, _)) if !own.take() => return true,
                Some((_, waker)) => Pin::new(&mut s.body).poll_frame(&mut Context::from_waker(waker)),
                None => Pin::new(&mut s.body).poll_frame(cx),
            };
            if let (Poll::Ready(_), Some((own, _))) = (&polled, &s.waker) {
                // Nothing wakes a body that gave something: it is asked again.
                own.ready.store(true, Ordering::Relaxed);
            }
            match polled {
                Poll::Ready(Some(Ok(frame))) => {
                    progress = true;
                    match frame.into_data() {
                        Ok(data) => s.pending = Some((data, 0)),
                        Err(frame) => {
                            if let Ok(trailers) = frame.into_trailers() {
                                let map = trailers.iter().map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
                                let _ = match http::raw_head(&s.body) {
                                    RawHead::Http2(h2) => conn.send_trailers(s.stream, h2.trailer_fields().chain(map)),
                                    _ => conn.send_trailers(s.stream, map),
                                };
                                http::recycle(trailers);
                                return false;
                            }
                        }
                    }
                }
                Poll::Ready(None) => {
                    progress = true;
                    let _ = conn.send_data(s.stream, &[], true);
                    return false;
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(error = %e, "a response body failed; resetting its HTTP/2 stream");
                    conn.reset(s.stream, Reason::InternalError);
                    return false;
                }
                Poll::Pending => {
                    if s.waker.is_none() {
                        // It waits on the connection's waker: polled once
                        // more, on the next pass, with its own.
                        s.waker = Some(ReadyWaker::new(connection));
                    }
                    return true;
                }
            }
        }
    });
    progress
}

/// A stream's request, served the way it was [`Opened`].
fn open_stream(shared: Arc<Shared>, client: Peer, req: Opened) -> Serving<impl Answer, impl Answer, impl Answer> {
    match req {
        Opened::Map(req) => Serving::Map(Box::pin(http::serve(shared, client, req, Some(StreamClock::new())))),
        Opened::Raw(req) => Serving::Raw(Box::pin(http::serve_raw(shared, client, req, StreamClock::new()))),
        Opened::Relay(req) => Serving::Relay(Box::pin(http::serve_relay(shared, client, req, StreamClock::new()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream's future that answers once `open` is set, keeping the waker
    /// of each poll and counting the polls.
    struct Gate {
        open: Arc<AtomicBool>,
        polls: Arc<std::sync::atomic::AtomicUsize>,
        waker: Arc<Mutex<Option<Waker>>>,
    }

    impl Future for Gate {
        type Output = Result<Response<ProxyBody>, std::convert::Infallible>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            if self.open.load(Ordering::Relaxed) {
                return Poll::Ready(Ok(Response::new(Either::Right(http_body_util::Full::new(Bytes::new())))));
            }
            *lock(&self.waker) = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[test]
    fn a_head_recognised_again_is_written_as_the_same_http1_head() {
        use super::super::{h1, h2frame, hpack};
        let mut conn = Conn::server(h2conn::Config::default());
        let mut events = Events { towards: Towards::Http2, ..Events::default() };
        let mut input = h2frame::PREFACE.to_vec();
        h2frame::write_settings(&mut input, &[]);
        let mut enc = hpack::Encoder::default();
        let call = [
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":authority", b"a"),
            (b":path", b"/svc/M"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ];
        let other = [(&b":method"[..], &b"GET"[..]), (b":scheme", b"http"), (b":authority", b"b"), (b":path", b"/x")];
        // The call four times (a literal, then inserted, then indexed twice:
        // recognised the fourth time), another head, the call again with a
        // body to come.
        type Fields<'a> = &'a [(&'a [u8], &'a [u8])];
        let heads: [(Fields, bool); 6] =
            [(&call, true), (&call, true), (&call, true), (&call, true), (&other, true), (&call, false)];
        for (i, (fields, end)) in heads.iter().enumerate() {
            let mut block = Vec::new();
            enc.begin(hpack::Block::Request, &mut block);
            for (n, v) in fields.iter() {
                enc.field(n, v, &mut block);
            }
            h2frame::write_headers(&mut input, 1 + 2 * i as u32, &block, *end, 16_384);
        }
        assert_eq!(conn.recv(&input, &mut events).map_err(|e| e.to_string()), Ok(input.len()));
        let written: Vec<(u32, String, Vec<h1::Span>, usize)> = events
            .opened
            .drain(..)
            .map(|(stream, opened)| match opened {
                Some(Opened::Relay(raw)) => {
                    (stream, String::from_utf8(raw.buf.clone()).expect("text"), raw.head.headers.clone(), raw.head.len)
                }
                _ => panic!("stream {stream} not taken"),
            })
            .collect();
        let want = "POST /svc/M HTTP/1.1\r\ncontent-type: application/grpc\r\nte: trailers\r\nhost: a\r\n\r\n";
        for (stream, text, spans, len) in &written {
            let expect = if *stream == 9 { "GET /x HTTP/1.1\r\nhost: b\r\n\r\n" } else { want };
            assert_eq!((text.as_str(), *len), (expect, expect.len()), "stream {stream}");
            assert_eq!(spans, &written[if *stream == 9 { 4 } else { 0 }].2, "stream {stream}");
        }
        assert_eq!(written.iter().map(|w| w.0).collect::<Vec<_>>(), [1, 3, 5, 7, 9, 11]);
    }

    #[test]
    fn a_stream_is_polled_when_new_and_when_its_own_waker_fires_and_leaves_once_answered() {
        let connection = Arc::new(AtomicWaker::new());
        let activity = conn::Activity::new();
        let gates: Vec<_> = (0..3)
            .map(|i| Gate { open: Arc::new(AtomicBool::new(i == 0)), polls: Arc::default(), waker: Arc::default() })
            .collect();
        let handles: Vec<_> = gates.iter().map(|g| (g.open.clone(), g.polls.clone(), g.waker.clone())).collect();
        let mut set: Vec<Entry<Gate, Gate, Gate>> = Vec::new();
        for (i, gate) in gates.into_iter().enumerate() {
            let stream = 1 + 2 * i as u32;
            set.push(Entry::new(stream, Serving::Relay(Box::pin(gate)), &connection, activity.request()));
        }
        let polls = |i: usize| handles[i].1.load(Ordering::Relaxed);
        let mut answered = Vec::new();
        // New: each is polled once; the open one answers and leaves.
        assert!(poll_ready(&mut set, |stream, _, _| answered.push(stream)));
        assert_eq!(answered, [1]);
        assert_eq!((polls(0), polls(1), polls(2)), (1, 1, 1));
        assert_eq!(set.len(), 2);
        // Nothing woke: nothing is polled.
        assert!(!poll_ready(&mut set, |stream, _, _| answered.push(stream)));
        assert_eq!((polls(1), polls(2)), (1, 1));
        // Stream 5's waker fires: it alone is polled, and answers.
        handles[2].0.store(true, Ordering::Relaxed);
        lock(&handles[2].2).take().expect("it waits with a waker").wake();
        assert!(poll_ready(&mut set, |stream, _, _| answered.push(stream)));
        assert_eq!(answered, [1, 5]);
        assert_eq!((polls(1), polls(2)), (1, 2));
        // A waker that fires for a stream still waiting: polled, stays.
        lock(&handles[1].2).take().expect("it waits with a waker").wake_by_ref();
        assert!(!poll_ready(&mut set, |stream, _, _| answered.push(stream)));
        assert_eq!(polls(1), 2);
        assert_eq!(set.iter().map(|e| e.stream).collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn head_copies_are_cut_one_after_the_other_from_one_buffer() {
        let mut copies = HeadCopies::default();
        let heads: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 100 + usize::from(i)]).collect();
        let copied: Vec<Bytes> = heads.iter().map(|h| copies.copy(h)).collect();
        for (h, c) in heads.iter().zip(&copied) {
            assert_eq!(&h[..], &c[..]);
        }
        // Each copy follows the one before in the same buffer until it is full.
        let adjacent = copied.windows(2).filter(|w| w[0].as_ptr() as usize + w[0].len() == w[1].as_ptr() as usize);
        let buffers = copied.len() - adjacent.count();
        let total: usize = heads.iter().map(Vec::len).sum();
        assert!(buffers <= total / HeadCopies::ROOM + 2, "{buffers} buffers for {total} bytes");
        // A head larger than a buffer is copied whole; a released one starts afresh.
        let big = vec![7u8; 3 * HeadCopies::ROOM];
        assert_eq!(&copies.copy(&big)[..], &big[..]);
        copies.release();
        assert_eq!(&copies.copy(b"after")[..], b"after");
    }

    #[test]
    fn small_body_pieces_share_the_heads_buffer_and_large_ones_do_not() {
        let mut copies = HeadCopies::default();
        let head = copies.copy(b"a head");
        let mut arrived = Arrived::default();
        arrived.data(b"a unary call's message", false, &mut copies);
        let large = vec![9u8; HeadCopies::SMALL_PIECE + 1];
        arrived.data(&large, true, &mut copies);
        let mut length = None;
        let Some(Some(first)) = arrived.next(&mut length) else { panic!("a piece") };
        let first = first.into_data().unwrap();
        assert_eq!(&first[..], b"a unary call's message");
        assert_eq!(head.as_ptr() as usize + head.len(), first.as_ptr() as usize, "cut after the head");
        let Some(Some(second)) = arrived.next(&mut length) else { panic!("a piece") };
        let second = second.into_data().unwrap();
        assert_eq!(second, large);
        let next = copies.copy(b"x");
        assert_ne!(second.as_ptr() as usize + second.len(), next.as_ptr() as usize, "a buffer of its own");
        assert!(matches!(arrived.next(&mut length), Some(None)), "then the end");
        // A body of many small pieces: its first and last share the buffer,
        // the ones between do not (each would keep a buffer alive).
        let mut copies = HeadCopies::default();
        let mut arrived = Arrived::default();
        for i in 0..10u8 {
            arrived.data(&[i], i == 9, &mut copies);
        }
        let after = copies.copy(b"y");
        let pieces: Vec<Bytes> =
            std::iter::from_fn(|| arrived.next(&mut length).flatten()).map(|f| f.into_data().unwrap()).collect();
        assert_eq!(pieces.len(), 10);
        // The first piece, then the last, then `after`, one after the other.
        let end = after.as_ptr() as usize;
        let shared: Vec<bool> = pieces.iter().map(|b| (end - 2..end).contains(&(b.as_ptr() as usize))).collect();
        let want: Vec<bool> = (0..10).map(|i| i == 0 || i == 9).collect();
        assert_eq!(shared, want);
    }
}
