//! HTTP/2 towards endpoints, with the proxy's own codec
//! ([`Conn::client`]).
//!
//! A connection is shared by the requests on it (through [`Client`]
//! handles) and driven by a task of its own ([`handshake`]'s future) that
//! owns the socket: it writes what the requests queued and reads the
//! endpoint's frames through the codec, which hands each response head, body
//! piece, trailer block and reset to the stream's slot and wakes the
//! request's task. A request opens its stream in its own task
//! ([`Client::open`]): the head is encoded straight from its header map; its
//! body is sent while it waits for the response head (a unary call's body is
//! complete by then, so nothing is spawned); the response body is read from
//! the slot, its bytes given back to the endpoint's windows as the client
//! takes them ([`H2Body`]). Only a request body still streaming when the
//! response head arrives (client or bidirectional streaming) moves to a task
//! of its own ([`Pump`]): the response may be read while the request is
//! still being sent. No task per stream, no channel between tasks. The
//! response head and trailers are kept as the endpoint's fields, slices of
//! one copy of each block ([`RawFields`]): an HTTP/2 client's stream
//! encodes them as they are (the body's trailers frame comes with an empty
//! map), and header maps are built only for hyper's HTTP/1.1 server
//! ([`H2Body::fields_into`]).
//!
//! The settings are the ones the proxy had with the `h2` crate: 2 MiB stream
//! and 5 MiB connection windows (bulk transfers on a fast network), 16 KiB
//! frames, at most 1 MiB queued for the endpoint, no server push. The
//! driver publishes the endpoint's stream limit when its SETTINGS arrive and
//! whenever they change it ([`Watch`]), sends a PING every interval and
//! closes the connection when the previous one is still unanswered (an
//! endpoint that hangs, or a network path that silently dropped the
//! connection, does not keep requests waiting on it), and closes it with a
//! GOAWAY once no handle and no stream holds it. A stream whose request is
//! dropped (its client went away, a timeout) is reset with `CANCEL`.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode, Version, request};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};

use super::bridge;
use super::h1::{self, Kind, Span};
use super::h2conn::{self, Conn, Handler};
use super::h2frame::Reason;
use super::h2s::{Arrived, HeadCopies, Outbox};
use super::http::UpstreamBody;
use super::relay::Relay;

/// The most queued for the endpoint before request bodies wait.
const MAX_QUEUED: usize = 1024 * 1024;

/// How much is read from the endpoint at a time.
const READ_SIZE: usize = 16 * 1024;

/// The connection's settings.
fn config() -> h2conn::Config {
    h2conn::Config {
        stream_window: 2 * 1024 * 1024,
        connection_window: 5 * 1024 * 1024,
        max_frame_size: 16 * 1024,
        max_header_list_size: 16 * 1024,
        ..h2conn::Config::default()
    }
}

/// Why a stream produced no response, or its response body did not end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The connection takes no new stream (it is closing or closed): the
    /// request was not sent.
    #[error("the connection takes no new stream: {0}")]
    Unavailable(&'static str),
    /// The endpoint never processed the stream: it reset it with
    /// `REFUSED_STREAM`, or it was above the endpoint's `GOAWAY` (RFC 9113
    /// §8.7), so it is safe to send again.
    #[error("the endpoint refused the stream")]
    Refused,
    /// The stream was reset (by the endpoint, or by the proxy for the
    /// endpoint's protocol error), with this error code.
    #[error("the stream was reset with error code {0}")]
    Reset(u32),
    /// The connection ended while the stream was open.
    #[error("the connection to the endpoint ended: {0}")]
    Closed(&'static str),
}

impl StreamError {
    /// The endpoint never processed the request.
    pub(crate) fn is_refused(&self) -> bool {
        matches!(self, StreamError::Refused)
    }

    /// Nothing more goes out on the connection.
    pub(crate) fn ends_connection(&self) -> bool {
        matches!(self, StreamError::Unavailable(_) | StreamError::Closed(_))
    }
}

/// What a connection tells the pool as it runs.
pub(crate) trait Watch: Send + Sync + 'static {
    /// The endpoint's `SETTINGS_MAX_CONCURRENT_STREAMS`: once its first
    /// SETTINGS arrive, and whenever a later one changes it.
    fn max_streams(&self, n: usize);
    /// The connection takes no new stream (a GOAWAY either way, or it ended).
    fn closing(&self);
}

/// A stream's side of what the connection's task reads.
struct Slot {
    id: u32,
    /// The response head (its fields in `fields`), until the request's task takes it.
    head: Option<Response<()>>,
    fields: RawFields,
    /// The trailers' fields, until the body's reader reaches them.
    trailers: RawFields,
    length: Option<u64>,
    /// The response body.
    arrived: Arrived,
    error: Option<StreamError>,
    /// The task reading the response.
    reader: Option<Waker>,
    /// The task sending the request body, waiting for the stream's window.
    sender: Option<Waker>,
    /// The handles on the stream ([`Stream`]): the response's and, while
    /// it runs, the request body's.
    refs: u8,
}

impl Slot {
    fn wake(&mut self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
        if let Some(w) = self.sender.take() {
            w.wake();
        }
    }
}

struct Inner {
    conn: Conn,
    slots: Vec<Slot>,
    /// The connection's task, to write what the streams queued.
    driver: Option<Waker>,
    /// Tasks waiting for room: a stream to open, or the queue to drain.
    waiting: Vec<Waker>,
    /// The connection has ended: why.
    ended: Option<&'static str>,
}

/// The slot of stream `id`, if it is still held.
fn find(slots: &mut [Slot], id: u32) -> Option<&mut Slot> {
    slots.iter_mut().find(|s| s.id == id)
}

impl Inner {
    fn slot(&mut self, id: u32) -> Option<&mut Slot> {
        find(&mut self.slots, id)
    }

    /// Wakes the connection's task when there is something to write.
    fn kick(&mut self) {
        if !self.conn.output().is_empty()
            && let Some(w) = self.driver.take()
        {
            w.wake();
        }
    }

    fn wake_waiting(&mut self) {
        for w in self.waiting.drain(..) {
            w.wake();
        }
    }
}

struct Shared {
    inner: Mutex<Inner>,
    /// [`Client`] handles alive: with none and no stream, the connection closes.
    handles: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A handle on a connection to an endpoint.
pub(crate) struct Client {
    shared: Arc<Shared>,
}

impl Clone for Client {
    fn clone(&self) -> Self {
        self.shared.handles.fetch_add(1, Ordering::Relaxed);
        Client { shared: self.shared.clone() }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if self.shared.handles.fetch_sub(1, Ordering::AcqRel) == 1
            && let Some(w) = self.shared.lock().driver.take()
        {
            w.wake();
        }
    }
}

/// Starts the client end of a connection on `io`: a handle, and the future
/// that drives the connection until it ends (to be spawned). It sends a PING
/// every `ping` and tells `watch` what it learns.
pub(crate) fn handshake<T, W>(io: T, ping: Duration, watch: W) -> (Client, impl Future<Output = ()> + Send)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    W: Watch,
{
    let inner =
        Inner { conn: Conn::client(config()), slots: Vec::new(), driver: None, waiting: Vec::new(), ended: None };
    let shared = Arc::new(Shared { inner: Mutex::new(inner), handles: AtomicUsize::new(1) });
    (Client { shared: shared.clone() }, drive(shared, io, ping, watch))
}

/// A request head to send: a header map's, or one without a map.
#[derive(Clone, Copy)]
pub(crate) enum Head<'a> {
    Map(&'a request::Parts),
    Relay(&'a Relay),
}

impl Client {
    /// Opens a stream with the request head `head` (`end_stream` when it
    /// has no body), once the endpoint's stream limit has room.
    pub(crate) fn open<'a>(
        &'a self,
        head: Head<'a>,
        end_stream: bool,
    ) -> impl Future<Output = Result<Stream, StreamError>> + 'a {
        std::future::poll_fn(move |cx| {
            let mut inner = self.shared.lock();
            if let Some(why) = inner.ended {
                return Poll::Ready(Err(StreamError::Unavailable(why)));
            }
            if inner.conn.is_closing() {
                return Poll::Ready(Err(StreamError::Unavailable("a GOAWAY went either way")));
            }
            if !inner.conn.can_open() {
                if inner.conn.streams() < inner.conn.peer_max_streams() as usize {
                    return Poll::Ready(Err(StreamError::Unavailable("its stream ids are used up")));
                }
                inner.waiting.push(cx.waker().clone());
                return Poll::Pending;
            }
            let opened = match head {
                Head::Map(parts) => {
                    let uri = &parts.uri;
                    let fields = parts.headers.iter().map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
                    inner.conn.send_request(
                        parts.method.as_str().as_bytes(),
                        uri.scheme_str().unwrap_or("http").as_bytes(),
                        uri.authority().map_or("", |a| a.as_str()).as_bytes(),
                        uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes(),
                        fields,
                        end_stream,
                    )
                }
                // As `upstream_uri` sends a request: scheme `http`.
                Head::Relay(r) => {
                    inner.conn.send_request(r.method(), b"http", r.authority(), r.path(), r.fields(), end_stream)
                }
            };
            let Ok(id) = opened else {
                return Poll::Ready(Err(StreamError::Unavailable("no stream can open")));
            };
            inner.slots.push(Slot {
                id,
                head: None,
                fields: RawFields::default(),
                trailers: RawFields::default(),
                length: None,
                arrived: Arrived::default(),
                error: None,
                reader: None,
                sender: None,
                refs: 1,
            });
            inner.kick();
            Poll::Ready(Ok(Stream { shared: self.shared.clone(), id }))
        })
    }
}

/// A response head (its map empty), its fields, its `Content-Length`, and
/// whether pieces of its body came with it.
type ResponseHead = (Response<()>, RawFields, Option<u64>, bool);

/// A handle on an open stream; the last one dropped before the stream
/// ended resets it (`CANCEL`).
pub(crate) struct Stream {
    shared: Arc<Shared>,
    id: u32,
}

impl Stream {
    fn another(&self) -> Stream {
        if let Some(s) = self.shared.lock().slot(self.id) {
            s.refs += 1;
        }
        Stream { shared: self.shared.clone(), id: self.id }
    }

    /// Sends `body` while it waits for the response head.
    pub(crate) async fn exchange(self, body: UpstreamBody) -> Result<Response<H2Body>, StreamError> {
        // Sent under this handle while the head is awaited (a unary call's
        // body has usually all gone by then); a body still streaming when
        // the head comes goes on in a task with a handle of its own.
        let mut out = (!body.is_end_stream()).then(|| Outgoing { body, pending: None });
        let (head, fields, length, held) = std::future::poll_fn(|cx| {
            if let Some(o) = &mut out
                && o.poll_send(&self, cx).is_ready()
            {
                out = None;
            }
            self.poll_head(cx)
        })
        .await?;
        if let Some(out) = out {
            // The request body is still streaming: it goes on beside the response.
            tokio::spawn(Pump { stream: self.another(), out });
        }
        let trailers = RawFields::default();
        Ok(head.map(|()| H2Body { stream: self, fields, trailers, maps: false, length, ended: false, held }))
    }

    /// The response head and its `Content-Length`, once they came.
    fn poll_head(&self, cx: &mut Context<'_>) -> Poll<Result<ResponseHead, StreamError>> {
        let mut inner = self.shared.lock();
        let Some(slot) = inner.slot(self.id) else {
            return Poll::Ready(Err(StreamError::Closed("the stream is gone")));
        };
        if let Some(head) = slot.head.take() {
            let held = slot.arrived.holds_pieces();
            return Poll::Ready(Ok((head, std::mem::take(&mut slot.fields), slot.length, held)));
        }
        if let Some(e) = &slot.error {
            return Poll::Ready(Err(e.clone()));
        }
        slot.reader = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        let Some(i) = inner.slots.iter().position(|s| s.id == self.id) else { return };
        inner.slots[i].refs -= 1;
        if inner.slots[i].refs > 0 {
            return;
        }
        let mut slot = inner.slots.swap_remove(i);
        if inner.conn.is_open(self.id) {
            inner.conn.reset(self.id, Reason::Cancel);
        }
        // What the endpoint sent and nobody read goes back to its window.
        let held = slot.arrived.discard();
        if held > 0 {
            inner.conn.release(self.id, held);
        }
        inner.wake_waiting();
        if inner.slots.is_empty() && self.shared.handles.load(Ordering::Acquire) == 0 {
            // The last user is gone: the connection's task closes it.
            if let Some(w) = inner.driver.take() {
                w.wake();
            }
        }
        inner.kick();
    }
}

/// A request body on its way into its stream, at the pace of the
/// endpoint's windows and of the connection's queue. A body that fails
/// resets the stream (`CANCEL`).
struct Outgoing {
    body: UpstreamBody,
    /// Data taken from the body and not all sent: the bytes, how many went,
    /// whether they end the body.
    pending: Option<(Bytes, usize, bool)>,
}

/// A request body that still streams once the response head came, in a
/// task of its own, with a handle on the stream of its own.
struct Pump {
    stream: Stream,
    out: Outgoing,
}

impl Future for Pump {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        this.out.poll_send(&this.stream, cx)
    }
}

impl Outgoing {
    /// Sends what the body has into `stream`; ready once it all went, or
    /// the stream or the body failed.
    fn poll_send(&mut self, stream: &Stream, cx: &mut Context<'_>) -> Poll<()> {
        let this = self;
        let id = stream.id;
        loop {
            if let Some((data, sent, end)) = &mut this.pending {
                let mut inner = stream.shared.lock();
                if inner.slot(id).is_none_or(|s| s.error.is_some()) {
                    return Poll::Ready(());
                }
                if inner.conn.output().len() >= MAX_QUEUED {
                    inner.waiting.push(cx.waker().clone());
                    return Poll::Pending;
                }
                let Ok(n) = inner.conn.send_data(id, &data[*sent..], *end) else { return Poll::Ready(()) };
                *sent += n;
                inner.kick();
                if *sent < data.len() {
                    // The codec says when the window opens.
                    if let Some(s) = inner.slot(id) {
                        s.sender = Some(cx.waker().clone());
                    }
                    return Poll::Pending;
                }
                if *end {
                    return Poll::Ready(());
                }
                drop(inner);
                this.pending = None;
            }
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => this.pending = Some((data, 0, this.body.is_end_stream())),
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            let mut inner = stream.shared.lock();
                            let fields = trailers.iter().map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
                            let _ = inner.conn.send_trailers(id, fields);
                            inner.kick();
                            return Poll::Ready(());
                        }
                    }
                },
                Poll::Ready(None) => this.pending = Some((Bytes::new(), 0, true)),
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(error = %e, "a request body failed on its way to an HTTP/2 endpoint; the stream is reset");
                    let mut inner = stream.shared.lock();
                    inner.conn.reset(id, Reason::Cancel);
                    if let Some(s) = inner.slot(id) {
                        s.error.get_or_insert(StreamError::Reset(Reason::Cancel.code()));
                        s.wake();
                    }
                    inner.kick();
                    return Poll::Ready(());
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// An endpoint's response body: its data, each chunk's bytes given back to
/// the endpoint's windows as it is taken, then its trailers.
pub(crate) struct H2Body {
    stream: Stream,
    /// The response head's fields.
    fields: RawFields,
    /// The trailers' fields, once the body reached them.
    trailers: RawFields,
    /// The reader takes header maps only (hyper's server): the head's
    /// fields were moved into its map, the trailers come as a map of theirs.
    maps: bool,
    /// What is left of the endpoint's `Content-Length` (the codec holds the data to it).
    length: Option<u64>,
    ended: bool,
    /// The slot held pieces not yet taken when this body last looked, so it
    /// has not ended: only this body takes them, so that stays true until
    /// it takes the last ([`Body::is_end_stream`] needs no lock then).
    held: bool,
}

impl H2Body {
    /// The response head's fields as the endpoint sent them, less the
    /// hop-by-hop ones; none once [`H2Body::fields_into`] took them.
    pub(crate) fn head_fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields.iter()
    }

    /// The first value of the head's field `name` (lower case).
    pub(crate) fn field(&self, name: &[u8]) -> Option<&[u8]> {
        self.fields.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// The trailers' fields as the endpoint sent them, less those a
    /// trailer section may not carry, once the body's trailers frame (its
    /// map empty) was read.
    pub(crate) fn trailer_fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.trailers.iter()
    }

    /// The first value of the trailers' field `name` (lower case).
    pub(crate) fn trailer(&self, name: &[u8]) -> Option<&[u8]> {
        self.trailers.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Moves the head's fields into `map`, for a client served from
    /// header maps (the trailers will come as one too).
    pub(crate) fn fields_into(&mut self, map: &mut HeaderMap) {
        self.maps = true;
        std::mem::take(&mut self.fields).into_map(map);
    }
}

/// A response head's or trailer block's regular fields without a header
/// map: where each name and value lies in one copy of the block (the
/// list from the worker's pool of field lists, [`bridge::take_fields`]).
#[derive(Default)]
pub(crate) struct RawFields {
    bytes: Bytes,
    spans: Vec<Span>,
}

impl RawFields {
    /// The fields of `head` (copied into `copies`), less the hop-by-hop
    /// ones (the codec has refused the connection-specific ones already),
    /// and in a trailer block less those a trailer section may not carry
    /// ([`super::http::sanitize_trailers`]); `None` when a value holds a
    /// byte the `http` crate refuses (a control byte other than tab, or
    /// DEL), as the header map did.
    fn of(head: &h2conn::Head, copies: &mut HeadCopies, trailers: bool) -> Option<Self> {
        if head.has_controls() {
            return None;
        }
        let mut spans = bridge::take_fields();
        for (name, value) in head.fields() {
            let kind = h1::kind_of(name);
            let dropped = match kind {
                Kind::HopByHop => true,
                Kind::Host | Kind::ContentLength | Kind::ContentType => trailers,
                _ => trailers && name == b"content-encoding",
            };
            if dropped {
                continue;
            }
            spans.push(Span { name: head.range_of(name), value: head.range_of(value), kind });
        }
        Some(RawFields { bytes: copies.copy(head.bytes()), spans })
    }

    fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let b = &self.bytes[..];
        self.spans.iter().map(move |f| (&b[f.name.clone()], &b[f.value.clone()]))
    }

    /// Appends the fields to `map`.
    fn into_map(self, map: &mut HeaderMap) {
        map.reserve(self.spans.len());
        for f in &self.spans {
            let name = HeaderName::from_bytes(&self.bytes[f.name.clone()]);
            let value = HeaderValue::from_maybe_shared(self.bytes.slice(f.value.clone()));
            // Both were checked as the head arrived ([`RawFields::of`]).
            if let (Ok(name), Ok(value)) = (name, value) {
                map.append(name, value);
            }
        }
    }
}

impl Drop for RawFields {
    fn drop(&mut self) {
        bridge::give_fields(std::mem::take(&mut self.spans));
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = StreamError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, StreamError>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        let id = this.stream.id;
        let mut inner = this.stream.shared.lock();
        let Some(slot) = inner.slot(id) else {
            this.ended = true;
            return Poll::Ready(Some(Err(StreamError::Closed("the stream is gone"))));
        };
        if let Some(mut piece) = slot.arrived.next(&mut this.length) {
            this.held = slot.arrived.holds_pieces();
            match piece.as_mut().map(|f| (f.is_data(), f)) {
                Some((true, frame)) => {
                    let n = frame.data_ref().map_or(0, Bytes::len);
                    inner.conn.release(id, n);
                    inner.kick();
                }
                Some((false, frame)) => {
                    this.ended = true;
                    this.trailers = std::mem::take(&mut slot.trailers);
                    if this.maps
                        && let Some(map) = frame.trailers_mut()
                    {
                        std::mem::take(&mut this.trailers).into_map(map);
                    }
                }
                None => this.ended = true,
            }
            return Poll::Ready(piece.map(Ok));
        }
        if let Some(e) = &slot.error {
            this.ended = true;
            return Poll::Ready(Some(Err(e.clone())));
        }
        slot.reader = Some(cx.waker().clone());
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        if self.ended {
            return true;
        }
        if self.held {
            return false;
        }
        let mut inner = self.stream.shared.lock();
        inner.slot(self.stream.id).is_some_and(|s| s.arrived.is_end())
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(n) => SizeHint::with_exact(n),
            None if self.ended => SizeHint::with_exact(0),
            None => SizeHint::default(),
        }
    }
}

/// What the codec hands the streams during one read.
struct Events<'a> {
    slots: &'a mut Vec<Slot>,
    copies: &'a mut HeadCopies,
    /// Streams whose head or trailers the `http` crate refuses: reset
    /// (`PROTOCOL_ERROR`) once the read is done.
    malformed: Vec<u32>,
}

impl Events<'_> {
    /// A head or trailer block for `stream`: `apply` it to the slot, or,
    /// when the `http` crate refused it (`None`), fail the stream and have
    /// it reset once the read is done.
    fn deliver(&mut self, stream: u32, apply: Option<impl FnOnce(&mut Slot)>) {
        let Some(slot) = find(self.slots, stream) else { return };
        match apply {
            Some(apply) => apply(slot),
            None => {
                slot.error = Some(StreamError::Reset(Reason::ProtocolError.code()));
                self.malformed.push(stream);
            }
        }
        slot.wake();
    }
}

impl Handler for Events<'_> {
    fn response(&mut self, stream: u32, status: u16, head: &h2conn::Head, end_stream: bool) {
        let length = head.content_length();
        let fields = StatusCode::from_u16(status).ok().zip(RawFields::of(head, self.copies, false));
        let resp = fields.map(|(status, fields)| {
            move |slot: &mut Slot| {
                let mut resp = Response::new(());
                *resp.status_mut() = status;
                *resp.version_mut() = Version::HTTP_2;
                slot.head = Some(resp);
                slot.fields = fields;
                slot.length = length;
                slot.arrived.ends(end_stream);
            }
        });
        self.deliver(stream, resp);
    }

    fn data(&mut self, stream: u32, data: &[u8], end_stream: bool) {
        if let Some(slot) = find(self.slots, stream) {
            slot.arrived.data(data, end_stream, self.copies);
            slot.wake();
        }
    }

    fn trailers(&mut self, stream: u32, head: &h2conn::Head) {
        // The map stays empty: the body's reader takes the fields.
        let fields = RawFields::of(head, self.copies, true);
        self.deliver(
            stream,
            fields.map(|fields| {
                move |slot: &mut Slot| {
                    slot.trailers = fields;
                    slot.arrived.trailers(HeaderMap::new());
                }
            }),
        );
    }

    fn reset(&mut self, stream: u32, code: u32) {
        if let Some(slot) = find(self.slots, stream) {
            let e = if code == Reason::RefusedStream.code() { StreamError::Refused } else { StreamError::Reset(code) };
            slot.error.get_or_insert(e);
            slot.wake();
        }
    }

    fn writable(&mut self, stream: u32) {
        if let Some(w) = find(self.slots, stream).and_then(|s| s.sender.take()) {
            w.wake();
        }
    }
}

/// Drives the connection until it ends: the endpoint closed it, it failed,
/// a PONG was overdue, or no handle and no stream holds it any more.
async fn drive<T: AsyncRead + AsyncWrite + Unpin>(shared: Arc<Shared>, mut io: T, every: Duration, watch: impl Watch) {
    let mut read: Vec<u8> = Vec::new();
    let mut out = Outbox::default();
    let mut copies = HeadCopies::default();
    let mut max_streams = None;
    let mut closing = false;
    let mut failed = None;
    let mut pings = 0u64;
    let mut timer = pin!(tokio::time::sleep(every));
    let why = std::future::poll_fn(|cx| {
        loop {
            let mut progress = false;
            {
                let mut inner = shared.lock();
                if !inner.driver.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    inner.driver = Some(cx.waker().clone());
                }
                if shared.handles.load(Ordering::Acquire) == 0 && inner.slots.is_empty() {
                    // Nobody can use it any more.
                    inner.conn.shutdown();
                }
                if out.refill(inner.conn.output()) {
                    // Request bodies waiting for the queue to drain go on.
                    inner.wake_waiting();
                }
                if inner.conn.is_done() && out.done() {
                    return Poll::Ready(failed.unwrap_or("it closed"));
                }
            }
            match out.poll_send(&mut io, cx) {
                Ok(sent) => progress |= sent.wrote,
                Err(()) => return Poll::Ready("writing to the endpoint failed"),
            }
            // Read while nothing waits to be written (so the endpoint cannot
            // make replies pile up).
            if out.all_written() && failed.is_none() {
                if read.capacity() - read.len() < READ_SIZE {
                    read.reserve(READ_SIZE);
                }
                match tokio_util::io::poll_read_buf(Pin::new(&mut io), cx, &mut read) {
                    Poll::Ready(Ok(0)) => return Poll::Ready("the endpoint closed it"),
                    Poll::Ready(Err(_)) => return Poll::Ready("reading from the endpoint failed"),
                    Poll::Ready(Ok(_)) => {
                        progress = true;
                        let mut inner = shared.lock();
                        let inner = &mut *inner;
                        let mut events = Events { slots: &mut inner.slots, copies: &mut copies, malformed: Vec::new() };
                        match inner.conn.recv(&read, &mut events) {
                            Ok(taken) => drop(read.drain(..taken)),
                            Err(e) => {
                                // Its GOAWAY is in the output: it goes, then the connection ends.
                                failed = Some(e.why);
                                read.clear();
                            }
                        }
                        for id in events.malformed {
                            inner.conn.reset(id, Reason::ProtocolError);
                        }
                        if inner.conn.settled() {
                            let n = inner.conn.peer_max_streams() as usize;
                            if max_streams.replace(n) != Some(n) {
                                watch.max_streams(n);
                            }
                        }
                        if inner.conn.is_closing() && !closing {
                            closing = true;
                            watch.closing();
                        }
                        if inner.slots.is_empty() {
                            // An idle connection holds no copies' buffer.
                            copies.release();
                        }
                        // Streams may have ended, or the limit grown.
                        inner.wake_waiting();
                    }
                    Poll::Pending => {}
                }
            }
            if progress {
                continue;
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let mut inner = shared.lock();
            if inner.conn.ping_pending() {
                tracing::debug!("an endpoint left a PING unanswered; closing the connection");
                return Poll::Ready("a PING went unanswered");
            }
            pings += 1;
            inner.conn.ping(pings.to_be_bytes());
            timer.as_mut().reset(tokio::time::Instant::now() + every);
        }
    })
    .await;
    tracing::debug!(why, "an HTTP/2 connection to an endpoint ended");
    let mut inner = shared.lock();
    inner.ended = Some(why);
    for slot in &mut inner.slots {
        slot.error.get_or_insert(StreamError::Closed(why));
        slot.wake();
    }
    inner.wake_waiting();
    drop(inner);
    watch.closing();
}
