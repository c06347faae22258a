//! HTTP/2 clients' requests without a body or with a small one of known
//! length, to HTTP/1.1 endpoints, over the fast path's pooled sockets
//! instead of hyper's client.
//!
//! hyper's HTTP/1 client runs each endpoint connection as a task of its own
//! and hands every request and response across a channel to it: per request,
//! two wake-ups between tasks, a second head encoder and a second parser on
//! top of the HTTP/2 server's. A request whose stream ended with its headers
//! (`GET`, `HEAD`, `DELETE`, ...), or whose body has a `Content-Length` of at
//! most [`MAX_BODY`] bytes (read whole first, as the HTTP/1.1 fast path
//! does), needs none of it, nor header maps: the HTTP/2 server writes its
//! decoded head as the HTTP/1.1 head a client would have sent
//! ([`h1_head`], [`RawRequest`]), which the fast path's rewriting turns
//! into the endpoint's ([`fast::prepare`]); it goes, with the body, in one
//! write on a socket of [`Upstream::raw_connection`] (the fast path's pool,
//! under the same `maxConnections`); the response head is parsed in place
//! ([`h1::parse_response`]) and the HTTP/2 server encodes it straight from
//! the endpoint's bytes ([`RawBody::head_fields`]); the body is read by its
//! framing in the same task as the stream ([`RawBody`]): Content-Length,
//! chunked (decoded, its trailers passed on as HTTP/2 trailers) or until
//! the endpoint closes. A request [`h1_head`] does not take (odd bytes, a
//! gRPC call) is built into a header map as every other request is, and
//! still comes this way when it can ([`request_head`]).
//!
//! The caller ([`super::http`]) keeps everything else as it is for hyper's
//! client: the pick, retries, circuit breaking, timeouts, the outcome at the
//! end of the body, `bodyIdle` per stream.

use std::cell::RefCell;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use super::fast::{self, Broken};
use super::h1::{self, BadChunk, Chunked, Framing, Kind, ResponseHead, Span};
use super::upstream::{ConnSettings, RawConn, Upstream, UpstreamError};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use hyper::body::{Body, Frame, SizeHint};

/// Size of the reads from the endpoint.
const READ: usize = 16 * 1024;

/// Field lists kept per worker for heads.
const POOLED_FIELD_LISTS: usize = 256;

thread_local! {
    static FIELD_LISTS: RefCell<Vec<Vec<Span>>> = const { RefCell::new(Vec::new()) };
}

/// A field list from this worker's pool (or a new one).
pub(crate) fn take_fields() -> Vec<Span> {
    FIELD_LISTS.with_borrow_mut(Vec::pop).unwrap_or_default()
}

/// Gives a head's field list back to this worker's pool.
pub(crate) fn give_fields(mut fields: Vec<Span>) {
    if fields.capacity() == 0 {
        return;
    }
    fields.clear();
    FIELD_LISTS.with_borrow_mut(|pool| {
        if pool.len() < POOLED_FIELD_LISTS {
            pool.push(fields);
        }
    });
}

/// Largest request body read whole to take this path; a larger one, or one
/// of unknown length, streams through hyper's client.
pub(crate) const MAX_BODY: usize = 64 * 1024;

/// Whether a request from an HTTP/2 client can take this path, and the
/// length of its body: none (its stream ended with its headers, and its
/// head says nothing of a body), or a `Content-Length` of at most
/// [`MAX_BODY`] bytes.
pub(crate) fn body_length(parts: &http::request::Parts, end_stream: bool) -> Option<usize> {
    if parts.method == Method::CONNECT || parts.headers.contains_key(header::TRANSFER_ENCODING) {
        return None;
    }
    let mut lengths = parts.headers.get_all(header::CONTENT_LENGTH).iter();
    let length = match (lengths.next(), lengths.next()) {
        (None, _) => None,
        (Some(v), None) if !v.is_empty() && v.as_bytes().iter().all(u8::is_ascii_digit) && v.len() <= 6 => {
            std::str::from_utf8(v.as_bytes()).ok()?.parse::<usize>().ok()
        }
        _ => return None,
    };
    match (end_stream, length) {
        (true, None | Some(0)) => Some(0),
        (false, Some(n)) if (1..=MAX_BODY).contains(&n) => Some(n),
        _ => None,
    }
}

/// An HTTP/2 client's request on this path without a header map: its head
/// written as the HTTP/1.1 head a client would have sent, which the fast
/// path's rewriting ([`fast::prepare`]) turns into the endpoint's.
pub(crate) struct RawRequest {
    /// The head's bytes (a buffer of the worker's pool).
    pub(crate) buf: Vec<u8>,
    pub(crate) head: h1::RequestHead,
    pub(crate) body: super::http::RequestBody,
}

impl RawRequest {
    /// The request of `head` on this path ([`h1_head`]) towards endpoints
    /// that speak `to`, or its body back. `last` is the connection's last
    /// one: when `head` is that head again ([`Head::serial`]), and so is
    /// the rest, its HTTP/1.1 head is copied rather than written again.
    ///
    /// [`Head::serial`]: super::h2conn::Head::serial
    pub(crate) fn of(
        head: &super::h2conn::Head,
        end_stream: bool,
        body: super::http::RequestBody,
        to: Towards,
        last: &mut Written,
    ) -> Result<RawRequest, super::http::RequestBody> {
        let mut buf = fast::take_buffer();
        let headers = take_fields();
        let mut h1 = h1::RequestHead { headers, ..h1::RequestHead::default() };
        let taken = if last.serial == head.serial() && last.end_stream == end_stream && last.to == to {
            if last.taken {
                buf.extend_from_slice(&last.buf);
                h1.copy_from(&last.head);
            }
            last.taken
        } else {
            let taken = h1_head(head, end_stream, &mut buf, &mut h1, to);
            *last = Written { serial: head.serial(), end_stream, to, taken, ..std::mem::take(last) };
            if taken {
                last.buf.clear();
                last.buf.extend_from_slice(&buf);
                last.head.copy_from(&h1);
            }
            taken
        };
        if taken {
            return Ok(RawRequest { buf, head: h1, body });
        }
        fast::give_buffer(buf);
        give_fields(h1.headers);
        Err(body)
    }

    /// Gives the head's buffers back to the worker's pools.
    pub(crate) fn recycle(buf: Vec<u8>, head: h1::RequestHead) {
        fast::give_buffer(buf);
        give_fields(head.headers);
    }
}

/// What [`RawRequest::of`] made of a connection's last request head.
#[derive(Default)]
pub(crate) struct Written {
    /// The head's [`serial`](super::h2conn::Head::serial) (0: none yet).
    serial: u64,
    end_stream: bool,
    to: Towards,
    /// It took this path; then its HTTP/1.1 head, as written.
    taken: bool,
    buf: Vec<u8>,
    head: h1::RequestHead,
}

/// The endpoints an HTTP/2 client's request without a header map goes to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Towards {
    /// HTTP/1.1 endpoints, over the fast path's sockets.
    #[default]
    Http1,
    /// HTTP/2 endpoints, through the proxy's HTTP/2 client
    /// ([`super::relay`]): the head is encoded from the fields written here.
    Http2,
}

/// Writes `head`, an HTTP/2 request whose stream ended with it
/// (`end_stream`) or not, as an HTTP/1.1 head into `out` and `req`, when it
/// can take this path: a method other than `CONNECT`, an `http` or `https`
/// scheme, a target and an authority of plain bytes, field values the
/// `http` crate accepts, at most one `Content-Length`; towards HTTP/1.1 not a
/// gRPC call and a body as [`body_length`] takes it, towards HTTP/2 an
/// `:authority` and no `Host` field. `false` otherwise: the request goes the
/// way of every other (its header map built, and refused there if it must
/// be), so nothing odd reaches an endpoint by this path.
///
/// The `Host` is the `:authority` unless the client sent one; the
/// `Cookie` fields are joined into one (RFC 9113 §8.2.3); towards HTTP/1.1
/// a `POST`, `PUT` or `PATCH` without a body says `Content-Length: 0`, as
/// hyper's client does.
pub(crate) fn h1_head(
    head: &super::h2conn::Head,
    end_stream: bool,
    out: &mut Vec<u8>,
    req: &mut h1::RequestHead,
    to: Towards,
) -> bool {
    let method = head.method();
    let Ok(parsed) = Method::from_bytes(method) else { return false };
    let Some(path) = head.path() else { return false };
    let plain_target =
        path.first() == Some(&b'/') && path.iter().fold(true, |ok, &b| ok & (b > b' ' && b < 0x7f && b != b'#'));
    let plain_authority = head.authority().is_none_or(|a| {
        !a.is_empty() && a.iter().fold(true, |ok, &b| ok & (b.is_ascii_alphanumeric() || b"-._:[]".contains(&b)))
    });
    if parsed == Method::CONNECT
        || !matches!(head.scheme(), Some(b"http" | b"https"))
        || !plain_target
        || !plain_authority
    {
        return false;
    }
    let body = match (to, end_stream, head.content_length()) {
        // Streamed as it comes, whatever its length.
        (Towards::Http2, ..) if head.authority().is_some() => 0,
        (Towards::Http2, ..) => return false,
        (Towards::Http1, true, None | Some(0)) => 0,
        (Towards::Http1, false, Some(n)) if (1..=MAX_BODY as u64).contains(&n) => n,
        _ => return false,
    };
    out.clear();
    req.headers.clear();
    out.extend_from_slice(method);
    req.method = 0..method.len();
    out.push(b' ');
    let start = out.len();
    out.extend_from_slice(path);
    req.target = start..out.len();
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let (mut host, mut lengths, mut cookies) = (false, 0, 0);
    let field = |out: &mut Vec<u8>, req: &mut h1::RequestHead, name: &[u8], value: &[u8]| {
        let start = out.len();
        out.extend_from_slice(name);
        let name = start..out.len();
        out.extend_from_slice(b": ");
        let start = out.len();
        out.extend_from_slice(value);
        let value = start..out.len();
        out.extend_from_slice(b"\r\n");
        let kind = h1::kind_of(&out[name.clone()]);
        req.headers.push(h1::Span { name, value, kind });
        kind
    };
    // What `HeaderValue` refuses (the codec lets other control bytes by).
    if head.has_controls() {
        return false;
    }
    for (name, value) in head.fields() {
        if name == b"cookie" {
            cookies += 1;
            continue;
        }
        match field(out, req, name, value) {
            // HTTP/2 carries only `TE: trailers`, which goes on (the fast
            // path drops `TE` as the hop-by-hop field it is in HTTP/1.1;
            // here the proxy itself passes trailers on to the client).
            Kind::HopByHop if name == b"te" => {
                if let Some(te) = req.headers.last_mut() {
                    te.kind = Kind::Other;
                }
            }
            // Towards HTTP/2 the `:authority` is the host: one the client
            // also sent as a field is for the map path to weigh.
            Kind::Host if to == Towards::Http2 => return false,
            Kind::Host => host = true,
            Kind::ContentLength => lengths += 1,
            Kind::TransferEncoding => return false,
            // A gRPC call is not for an HTTP/1.1 endpoint: the hyper path answers it.
            Kind::ContentType if to == Towards::Http1 && super::grpc::is_grpc_type(value) => return false,
            _ => {}
        }
    }
    if lengths > 1 {
        return false;
    }
    if cookies > 0 {
        let start = out.len();
        out.extend_from_slice(b"cookie: ");
        let value = out.len();
        for (i, (_, v)) in head.fields().filter(|(n, _)| *n == b"cookie").enumerate() {
            if i > 0 {
                out.extend_from_slice(b"; ");
            }
            out.extend_from_slice(v);
        }
        req.headers.push(h1::Span { name: start..start + 6, value: value..out.len(), kind: Kind::Cookie });
        out.extend_from_slice(b"\r\n");
    }
    if !host && let Some(authority) = head.authority() {
        field(out, req, b"host", authority);
    }
    if to == Towards::Http1 && lengths == 0 && matches!(method, b"POST" | b"PUT" | b"PATCH") {
        field(out, req, b"content-length", b"0");
    }
    out.extend_from_slice(b"\r\n");
    req.len = out.len();
    req.body = body;
    req.close = false;
    req.head = method == b"HEAD";
    req.idempotent = super::http::is_idempotent(&parsed);
    true
}

/// Why a request body could not be read whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BodyRead {
    /// The client sent nothing for `timeouts.bodyIdle`.
    Timeout,
    /// The stream broke off, or its data did not match its `Content-Length`.
    Failed,
}

/// Reads a request body of `len` bytes onto `wire` (after its head), each
/// frame within `idle`; trailers are dropped, as hyper's HTTP/1.1 client
/// does with a body of known length.
pub(crate) async fn read_body(
    mut body: super::http::RequestBody,
    len: usize,
    wire: &mut Vec<u8>,
    idle: std::time::Duration,
    clock: Option<&super::conn::StreamClock>,
) -> Result<(), BodyRead> {
    use http_body_util::BodyExt;
    let want = wire.len() + len;
    wire.reserve(len);
    loop {
        match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(BodyRead::Timeout),
            Ok(None) => break,
            Ok(Some(Err(_))) => return Err(BodyRead::Failed),
            Ok(Some(Ok(frame))) => {
                if let Some(clock) = clock {
                    clock.touch();
                }
                if let Ok(data) = frame.into_data() {
                    if wire.len() + data.len() > want {
                        return Err(BodyRead::Failed);
                    }
                    wire.extend_from_slice(&data);
                }
            }
        }
    }
    if wire.len() == want { Ok(()) } else { Err(BodyRead::Failed) }
}

/// The HTTP/1.1 head of a request prepared for an endpoint (hop-by-hop
/// headers already removed, `Host` and forwarding headers set).
pub(crate) fn request_head(parts: &http::request::Parts) -> Vec<u8> {
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let target = if target.starts_with('/') { target } else { "/" };
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // As hyper's client does: a method that usually carries a body says it has none.
    if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH)
        && !parts.headers.contains_key(header::CONTENT_LENGTH)
    {
        out.extend_from_slice(b"content-length: 0\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Sends `wire` (head and body) to `upstream` and reads the response head
/// ([`fast::send_raw`], the fast path's exchange).
pub(crate) async fn exchange(
    upstream: &Arc<Upstream>,
    wire: &[u8],
    is_head: bool,
    settings: ConnSettings,
    idempotent: bool,
) -> Result<Response<RawBody>, UpstreamError> {
    let mut buf = fast::take_buffer();
    let headers = take_fields();
    let mut head = ResponseHead { headers, ..ResponseHead::default() };
    let sent = fast::send_raw(upstream, settings, idempotent, (wire, &[]), &mut buf, is_head, &mut head).await;
    match sent {
        Ok(conn) => response(upstream, conn, buf, head),
        Err(broken) => {
            fast::give_buffer(buf);
            give_fields(head.headers);
            Err(match broken {
                Broken::Upstream(e) => e,
                Broken::Exchange => UpstreamError::Io(std::io::Error::other(
                    "the endpoint closed the connection or answered an invalid head",
                )),
            })
        }
    }
}

/// The response for the HTTP/2 server: its header map empty, the head's
/// fields (less the hop-by-hop ones) left where they were read, with the
/// body still on the socket.
///
/// `httparse` accepts exactly the names and values the `http` crate does
/// (tokens; visible ASCII, space, tab and obs-text, without obsolete line
/// folding), so they pass on unchecked.
fn response(
    upstream: &Arc<Upstream>,
    conn: RawConn,
    buf: Vec<u8>,
    mut head: ResponseHead,
) -> Result<Response<RawBody>, UpstreamError> {
    let Ok(status) = StatusCode::from_u16(head.status) else {
        give_fields(head.headers);
        fast::give_buffer(buf);
        return Err(UpstreamError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, "invalid response status")));
    };
    // Without the hop-by-hop fields, which HTTP/2 does not carry
    // (`Transfer-Encoding` included: the body is decoded here).
    let mut fields = std::mem::take(&mut head.headers);
    h1::keep_passed_on(&buf, &mut fields);
    let state = match head.framing {
        Framing::Empty => State::Done,
        Framing::Length(0) => State::Done,
        Framing::Length(n) => State::Length(n),
        Framing::Chunked => State::Chunked(Chunked::default(), Vec::new()),
        Framing::Close => State::Close,
    };
    let mut body = RawBody {
        conn: Some(conn),
        upstream: upstream.clone(),
        buf,
        at: head.len,
        state,
        reusable: head.reusable,
        fields,
    };
    if matches!(body.state, State::Done) {
        body.finish();
    }
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    Ok(resp)
}

enum State {
    /// Bytes of the body left.
    Length(u64),
    /// Decoding, with the trailer section's bytes collected so far.
    Chunked(Chunked, Vec<u8>),
    /// Until the endpoint closes.
    Close,
    /// The trailers, once the chunked body ended.
    Trailers(HeaderMap),
    Done,
}

/// An endpoint's response body read from its socket. At its clean end the
/// connection goes back to the endpoint's pool if it can carry another
/// request; dropped before, it is closed with the body.
///
/// It also holds its response's head fields, which are not in the
/// response's header map: whoever passes the response on reads them with
/// [`RawBody::head_fields`] before the body (the HTTP/2 server, the only
/// one that serves a response of this path).
pub(crate) struct RawBody {
    conn: Option<RawConn>,
    upstream: Arc<Upstream>,
    /// What was read and not passed on yet is `buf[at..]`. The buffer comes
    /// from the worker's pool and goes back to it with the body.
    buf: Vec<u8>,
    at: usize,
    state: State,
    reusable: bool,
    /// The head's fields passed on, in `buf` until the body is first read.
    fields: Vec<Span>,
}

impl Drop for RawBody {
    fn drop(&mut self) {
        fast::give_buffer(std::mem::take(&mut self.buf));
        give_fields(std::mem::take(&mut self.fields));
    }
}

impl RawBody {
    /// The response head's fields as the endpoint sent them (names in its
    /// case), less the hop-by-hop ones; none once the body has been read.
    pub(crate) fn head_fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields.iter().map(|f| (&self.buf[f.name.clone()], &self.buf[f.value.clone()]))
    }

    /// The first value of the head's field `name` (lower case).
    pub(crate) fn field(&self, name: &[u8]) -> Option<&[u8]> {
        // The parser knows `Content-Type` (asked of every response) by its kind.
        let found = match name {
            b"content-type" => self.fields.iter().find(|f| f.kind == Kind::ContentType),
            _ => self.fields.iter().find(|f| self.buf[f.name.clone()].eq_ignore_ascii_case(name)),
        };
        found.map(|f| &self.buf[f.value.clone()])
    }

    fn finish(&mut self) {
        self.state = State::Done;
        if let Some(conn) = self.conn.take()
            && self.reusable
            && self.at == self.buf.len()
        {
            self.upstream.checkin_raw(conn);
        }
    }

    /// Reads more of the body; `Ok(0)` at the end of the stream.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let Some(conn) = self.conn.as_mut() else { return Poll::Ready(Ok(0)) };
        // The head's bytes are about to go.
        self.fields.clear();
        if self.at == self.buf.len() {
            self.buf.clear();
            self.at = 0;
        }
        if self.buf.capacity() - self.buf.len() < READ / 4 {
            self.buf.drain(..self.at);
            self.at = 0;
            self.buf.reserve(READ);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut self.buf)
    }

    /// The next data in the buffer, by the framing; `None` when more must be read.
    fn next_data(&mut self) -> Result<Option<Frame<Bytes>>, std::io::Error> {
        let bad = |_: BadChunk| std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed chunked body");
        match &mut self.state {
            State::Length(left) if self.at < self.buf.len() => {
                let take = (self.buf.len() - self.at).min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= take as u64;
                let data = Bytes::copy_from_slice(&self.buf[self.at..self.at + take]);
                self.at += take;
                if *left == 0 {
                    self.finish();
                }
                Ok(Some(Frame::data(data)))
            }
            State::Close if self.at < self.buf.len() => {
                let data = Bytes::copy_from_slice(&self.buf[self.at..]);
                self.at = self.buf.len();
                Ok(Some(Frame::data(data)))
            }
            State::Chunked(decoder, trailers) => {
                while self.at < self.buf.len() {
                    let rest = &self.buf[self.at..];
                    let d = decoder.decode(rest, trailers).map_err(bad)?;
                    let data = (!d.data.is_empty()).then(|| Bytes::copy_from_slice(&rest[d.data.clone()]));
                    self.at += d.consumed;
                    if d.ended {
                        let trailers = parse_trailers(trailers)?;
                        self.finish();
                        if let Some(data) = data {
                            if !trailers.is_empty() {
                                self.state = State::Trailers(trailers);
                            }
                            return Ok(Some(Frame::data(data)));
                        }
                        return Ok((!trailers.is_empty()).then(|| Frame::trailers(trailers)));
                    }
                    if let Some(data) = data {
                        return Ok(Some(Frame::data(data)));
                    }
                }
                Ok(None)
            }
            State::Trailers(_) => match std::mem::replace(&mut self.state, State::Done) {
                State::Trailers(t) => Ok(Some(Frame::trailers(t))),
                _ => Ok(None),
            },
            _ => Ok(None),
        }
    }
}

/// The trailer section of a chunked body as a header map (the fields a
/// trailer may not carry are dropped with every endpoint body's, in
/// [`super::http::EndpointBody`]).
fn parse_trailers(raw: &[u8]) -> Result<HeaderMap, std::io::Error> {
    let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidData, "invalid trailer section");
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut map = HeaderMap::new();
    if raw.len() <= 2 {
        return Ok(map);
    }
    let httparse::Status::Complete((_, fields)) = httparse::parse_headers(raw, &mut fields).map_err(|_| invalid())?
    else {
        return Err(invalid());
    };
    for f in fields {
        let name = HeaderName::from_bytes(f.name.as_bytes()).map_err(|_| invalid())?;
        let value = HeaderValue::from_bytes(f.value).map_err(|_| invalid())?;
        map.append(name, value);
    }
    Ok(map)
}

impl Body for RawBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        loop {
            if matches!(self.state, State::Done) {
                return Poll::Ready(None);
            }
            match self.next_data() {
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(None) if matches!(self.state, State::Done) => return Poll::Ready(None),
                Ok(None) => {}
                Err(e) => {
                    self.conn = None;
                    self.state = State::Done;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            match ready!(self.poll_read(cx)) {
                Ok(0) if matches!(self.state, State::Close) => {
                    self.conn = None;
                    self.state = State::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    self.conn = None;
                    self.state = State::Done;
                    return Poll::Ready(Some(Err(std::io::ErrorKind::UnexpectedEof.into())));
                }
                Ok(_) => {}
                Err(e) => {
                    self.conn = None;
                    self.state = State::Done;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_is_written_from_the_prepared_map() {
        let req = http::Request::builder()
            .method("GET")
            .uri("http://shop.example/a?b=1")
            .header("host", "shop.example")
            .header("x-a", "1")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        assert_eq!(body_length(&parts, true), Some(0));
        assert_eq!(body_length(&parts, false), None, "a body of unknown length streams");
        assert_eq!(
            String::from_utf8(request_head(&parts)).unwrap(),
            "GET /a?b=1 HTTP/1.1\r\nhost: shop.example\r\nx-a: 1\r\n\r\n"
        );
        let (mut post, ()) = http::Request::post("/p").body(()).unwrap().into_parts();
        assert!(String::from_utf8(request_head(&post)).unwrap().ends_with("content-length: 0\r\n\r\n"));
        post.headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        assert_eq!(body_length(&post, true), None, "a stream that ended short of its length");
        assert_eq!(body_length(&post, false), Some(3));
        post.headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("65537"));
        assert_eq!(body_length(&post, false), None, "larger than the path reads whole");
        post.headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("+3"));
        assert_eq!(body_length(&post, false), None);
        post.headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        post.headers.append(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        assert_eq!(body_length(&post, false), None, "a repeated length");
    }

    #[test]
    fn trailers_keep_what_a_trailer_may_carry() {
        let mut t =
            parse_trailers(b"grpc-status: 0\r\ncontent-length: 9\r\nconnection: x\r\nx-sum: abc\r\n\r\n").unwrap();
        super::super::http::sanitize_trailers(&mut t);
        assert_eq!(t.len(), 2);
        assert_eq!(t["x-sum"], "abc");
        assert!(parse_trailers(b"\r\n").unwrap().is_empty());
        assert!(parse_trailers(b"bad header\r\n\r\n").is_err());
    }
}
