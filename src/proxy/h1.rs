//! The HTTP/1.1 fast path's message handling, sans I/O: request and
//! response heads parsed with `httparse` into spans of the bytes read (no
//! header map is built), the request's framing decided, the heads written
//! out for the other side, and a chunked body's end found while its bytes
//! pass through untouched.
//!
//! The fast path takes only requests whose meaning is plain: HTTP/1.1, an
//! origin-form target, no `Transfer-Encoding`, at most one `Content-Length`
//! made of digits, no `Upgrade`, `Expect` or `TE`, and a `Connection` header
//! naming nothing but `close` or `keep-alive`. Everything else, including
//! every head `httparse` refuses and every head over the size or count
//! limits, is [`Decline`]d: the connection goes on with hyper's server,
//! which answers it exactly as before (an upgrade, a chunked upload, or a
//! `400`/`431`). So the fast path can never accept what hyper would refuse,
//! and never reads a request's framing differently from it: the property the
//! differential fuzz test (`tests/fuzz`) checks against hyper itself.

use std::mem::MaybeUninit;
use std::ops::Range;

/// A header of a parsed head: byte ranges of its name and value in the buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    /// The name's bytes.
    pub name: Range<usize>,
    /// The value's bytes (without surrounding whitespace).
    pub value: Range<usize>,
    /// What the name is, for the headers the proxy looks at.
    pub kind: Kind,
}

/// The headers the proxy treats specially; all others pass through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Any other header.
    Other,
    /// `Host`.
    Host,
    /// `Content-Length`.
    ContentLength,
    /// `Transfer-Encoding`.
    TransferEncoding,
    /// `Connection`.
    Connection,
    /// Hop-by-hop headers always removed: `Keep-Alive`, `Proxy-Connection`,
    /// `Proxy-Authenticate`, `Proxy-Authorization`, `TE`, `Trailer`, `Upgrade`.
    HopByHop,
    /// `Cookie`.
    Cookie,
    /// `X-Forwarded-For`.
    ForwardedFor,
    /// `X-Forwarded-Proto`.
    ForwardedProto,
    /// `X-Forwarded-Client-Cert`: set by the proxy only.
    ClientCert,
    /// `Content-Type`.
    ContentType,
}

pub fn kind_of(name: &[u8]) -> Kind {
    let is = |s: &[u8]| name.eq_ignore_ascii_case(s);
    match name.len() {
        4 if is(b"host") => Kind::Host,
        6 if is(b"cookie") => Kind::Cookie,
        2 if is(b"te") => Kind::HopByHop,
        7 if is(b"upgrade") || is(b"trailer") => Kind::HopByHop,
        10 if is(b"connection") => Kind::Connection,
        10 if is(b"keep-alive") => Kind::HopByHop,
        12 if is(b"content-type") => Kind::ContentType,
        14 if is(b"content-length") => Kind::ContentLength,
        15 if is(b"x-forwarded-for") => Kind::ForwardedFor,
        16 if is(b"proxy-connection") => Kind::HopByHop,
        17 if is(b"transfer-encoding") => Kind::TransferEncoding,
        17 if is(b"x-forwarded-proto") => Kind::ForwardedProto,
        18 if is(b"proxy-authenticate") => Kind::HopByHop,
        19 if is(b"proxy-authorization") => Kind::HopByHop,
        23 if is(b"x-forwarded-client-cert") => Kind::ClientCert,
        _ => Kind::Other,
    }
}

/// Why a request is left to hyper's server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decline {
    /// `httparse` refused the head (hyper answers `400`).
    Invalid,
    /// The head is over `limits.maxRequestHeaderBytes` or
    /// `limits.maxRequestHeaders` (hyper answers `431`).
    TooLarge,
    /// A valid request the fast path does not take (HTTP/1.0, `CONNECT`,
    /// absolute or asterisk target, `Transfer-Encoding`, a `Content-Length`
    /// that is not one plain number, `Upgrade`, `Expect`, `TE`, a
    /// `Connection` header naming other headers, a gRPC content type).
    Unusual,
}

/// A complete request head the fast path takes.
#[derive(Debug, Default)]
pub struct RequestHead {
    /// The head's length in bytes, up to and including the empty line.
    pub len: usize,
    /// The method's bytes.
    pub method: Range<usize>,
    /// The origin-form target's bytes.
    pub target: Range<usize>,
    /// The body's length (`Content-Length`, or 0).
    pub body: u64,
    /// The client asked to close after this exchange (`Connection: close`).
    pub close: bool,
    /// The method may be sent twice (RFC 9110 §9.2.2).
    pub idempotent: bool,
    /// The method is `HEAD`: the response has no body whatever it says.
    pub head: bool,
    /// The headers, in order.
    pub headers: Vec<Span>,
}

impl RequestHead {
    /// Makes this head a copy of `other`, keeping its header list's room.
    pub fn copy_from(&mut self, other: &RequestHead) {
        let RequestHead { len, method, target, body, close, idempotent, head, headers } = other;
        self.len = *len;
        self.method = method.clone();
        self.target = target.clone();
        self.body = *body;
        self.close = *close;
        self.idempotent = *idempotent;
        self.head = *head;
        self.headers.clear();
        self.headers.extend_from_slice(headers);
    }
}

/// Parses a request head at the start of `buf` into `out` (its header list
/// is reused). `Ok(false)`: the head is not complete yet (and within the
/// limits so far).
pub fn parse_request(buf: &[u8], max_head: usize, max_headers: usize, out: &mut RequestHead) -> Result<bool, Decline> {
    const MAX: usize = 128;
    // Left uninitialised: httparse writes each header before it is read.
    let mut raw = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX];
    let room = max_headers.min(MAX);
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut raw[..room]) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > max_head => return Err(Decline::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(false),
        Err(httparse::Error::TooManyHeaders) => return Err(Decline::TooLarge),
        Err(_) => return Err(Decline::Invalid),
    };
    if len > max_head {
        return Err(Decline::TooLarge);
    }
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Err(Decline::Unusual);
    };
    if !target.starts_with('/') || method == "CONNECT" || !target.bytes().all(plain_target_byte) {
        return Err(Decline::Unusual);
    }
    let at = |s: &[u8]| {
        let start = s.as_ptr() as usize - buf.as_ptr() as usize;
        start..start + s.len()
    };
    out.len = len;
    out.method = at(method.as_bytes());
    out.target = at(target.as_bytes());
    out.body = 0;
    out.close = false;
    out.head = method == "HEAD";
    out.idempotent = matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE");
    out.headers.clear();
    out.headers.reserve(req.headers.len());
    let mut length: Option<u64> = None;
    for h in req.headers.iter() {
        let kind = kind_of(h.name.as_bytes());
        match kind {
            Kind::ContentLength => {
                if length.is_some() {
                    return Err(Decline::Unusual);
                }
                length = Some(digits(h.value).ok_or(Decline::Unusual)?);
            }
            // Transfer-Encoding, and TE, Upgrade or Trailer (the hop-by-hop
            // headers of 2 and 7 letters): hyper's.
            Kind::TransferEncoding => return Err(Decline::Unusual),
            Kind::HopByHop if matches!(h.name.len(), 2 | 7) => return Err(Decline::Unusual),
            Kind::Connection => {
                for token in h.value.split(|b| *b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        out.close = true;
                    } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                        return Err(Decline::Unusual);
                    }
                }
            }
            Kind::ContentType if is_grpc(h.value) => return Err(Decline::Unusual),
            Kind::Other if h.name.len() == 6 && h.name.eq_ignore_ascii_case("expect") => {
                return Err(Decline::Unusual);
            }
            _ => {}
        }
        out.headers.push(Span { name: at(h.name.as_bytes()), value: at(h.value), kind });
    }
    out.body = length.unwrap_or(0);
    Ok(true)
}

/// A byte of a target the fast path passes on as it is: visible ASCII
/// but for the characters the `http` crate's URI parser refuses or reads
/// otherwise (`#` starts a fragment it drops).
fn plain_target_byte(b: u8) -> bool {
    matches!(b, 0x21..=0x7e) && !matches!(b, b'"' | b'#' | b'<' | b'>' | b'\\' | b'^' | b'`' | b'{' | b'|' | b'}')
}

/// A `Content-Length` value of plain digits that fits a `u64`.
pub(crate) fn digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

fn is_grpc(v: &[u8]) -> bool {
    v.len() >= 16 && v[..16].eq_ignore_ascii_case(b"application/grpc") && matches!(v.get(16), None | Some(b'+' | b';'))
}

/// How a response's body ends (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Framing {
    /// No body (`HEAD`, `204`, `304`).
    #[default]
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// Chunked: passed through as it is, its end found by [`Chunked`].
    Chunked,
    /// Until the endpoint closes the connection.
    Close,
}

/// A complete response head.
#[derive(Debug, Default)]
pub struct ResponseHead {
    /// The head's length in bytes.
    pub len: usize,
    /// The status code.
    pub status: u16,
    /// The reason phrase's bytes.
    pub reason: Range<usize>,
    /// How the body ends.
    pub framing: Framing,
    /// The connection can carry another request after this response.
    pub reusable: bool,
    /// The headers, in order.
    pub headers: Vec<Span>,
}

/// A response the fast path cannot pass on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadResponse {
    /// Not a valid HTTP/1 response head.
    #[error("invalid response head")]
    Invalid,
    /// The head is larger than the proxy reads.
    #[error("response head too large")]
    TooLarge,
    /// Conflicting or invalid `Content-Length`, `Content-Length` with
    /// `Transfer-Encoding`, or `101` to a request that asked no upgrade.
    #[error("ambiguous response framing")]
    Framing,
}

/// Largest response head read.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Parses a response head at the start of `buf` (to a request with method
/// `HEAD` when `head`). `Ok(false)`: not complete yet.
pub fn parse_response(buf: &[u8], head: bool, out: &mut ResponseHead) -> Result<bool, BadResponse> {
    let mut raw = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 128];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, buf, &mut raw) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD => return Err(BadResponse::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(false),
        Err(httparse::Error::TooManyHeaders) => return Err(BadResponse::TooLarge),
        Err(_) => return Err(BadResponse::Invalid),
    };
    let (Some(status), Some(version)) = (resp.code, resp.version) else { return Err(BadResponse::Invalid) };
    if status == 101 {
        return Err(BadResponse::Framing);
    }
    let at = |s: &[u8]| {
        let start = s.as_ptr() as usize - buf.as_ptr() as usize;
        start..start + s.len()
    };
    out.len = len;
    out.status = status;
    out.reason = resp.reason.map_or(0..0, |r| at(r.as_bytes()));
    out.headers.clear();
    out.headers.reserve(resp.headers.len());
    let mut length: Option<u64> = None;
    let mut chunked = None;
    let mut close = version == 0;
    for h in resp.headers.iter() {
        let kind = kind_of(h.name.as_bytes());
        match kind {
            Kind::ContentLength => {
                let n = digits(h.value).ok_or(BadResponse::Framing)?;
                if length.is_some_and(|l| l != n) {
                    return Err(BadResponse::Framing);
                }
                length = Some(n);
            }
            Kind::TransferEncoding => {
                let last = h.value.rsplit(|b| *b == b',').next().unwrap_or_default().trim_ascii();
                chunked = Some(last.eq_ignore_ascii_case(b"chunked"));
            }
            Kind::Connection => {
                for token in h.value.split(|b| *b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") && version == 0 {
                        close = false;
                    }
                }
            }
            _ => {}
        }
        out.headers.push(Span { name: at(h.name.as_bytes()), value: at(h.value), kind });
    }
    let framing = if (100..200).contains(&status) || head || status == 204 || status == 304 {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(_), Some(_)) => return Err(BadResponse::Framing),
            (Some(true), None) => Framing::Chunked,
            (Some(false), None) | (None, None) => Framing::Close,
            (None, Some(n)) => Framing::Length(n),
        }
    };
    out.reusable = !close && framing != Framing::Close;
    out.framing = framing;
    Ok(true)
}

/// Whether a header goes on to the other side: hop-by-hop headers and those
/// a `Connection` header names stay behind (RFC 9110 §7.6.1). `listed`
/// are the `Connection` values of the message.
fn named_by_connection(buf: &[u8], name: &[u8], listed: &[Range<usize>]) -> bool {
    listed.iter().any(|v| {
        buf[v.clone()].split(|b| *b == b',').any(|t| {
            let t = t.trim_ascii();
            !t.eq_ignore_ascii_case(b"close") && !t.eq_ignore_ascii_case(b"keep-alive") && t.eq_ignore_ascii_case(name)
        })
    })
}

/// What the proxy adds to a request on its way to an endpoint.
#[derive(Clone, Copy, Debug)]
pub struct Forwarded<'a> {
    /// The `X-Forwarded-For` value to send.
    pub forwarded_for: &'a [u8],
    /// The `X-Forwarded-Proto` the proxy saw.
    pub proto: &'a [u8],
    /// Keep the client's `X-Forwarded-Proto` if it sent one (a trusted peer).
    pub keep_client_proto: bool,
    /// `X-Forwarded-Client-Cert` from a verified client certificate.
    pub client_cert: Option<&'a [u8]>,
}

/// Writes the request head for the endpoint into `out`: the client's
/// request line and headers as they came, less the hop-by-hop ones and the
/// forwarding headers the proxy sets itself, which follow.
pub fn write_request(buf: &[u8], req: &RequestHead, fwd: &Forwarded<'_>, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&buf[req.method.clone()]);
    out.push(b' ');
    out.extend_from_slice(&buf[req.target.clone()]);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for h in req.headers.iter().filter(|h| fwd.passes(h.kind)) {
        header(out, &buf[h.name.clone()], &buf[h.value.clone()]);
    }
    for (name, value) in fwd.fields(&req.headers) {
        header(out, name, value);
    }
    out.extend_from_slice(b"\r\n");
}

impl<'a> Forwarded<'a> {
    /// Whether a client's field of this kind goes on to the endpoint: not
    /// the hop-by-hop ones nor the forwarding fields the proxy sets itself.
    pub fn passes(&self, kind: Kind) -> bool {
        match kind {
            Kind::Connection | Kind::HopByHop | Kind::ClientCert | Kind::ForwardedFor => false,
            Kind::ForwardedProto => self.keep_client_proto,
            _ => true,
        }
    }

    /// The forwarding fields the proxy adds after the client's
    /// (`headers`) that [`Forwarded::passes`] lets through.
    pub fn fields(&self, headers: &[Span]) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + use<'a> {
        let proto = (!self.keep_client_proto || !headers.iter().any(|h| h.kind == Kind::ForwardedProto))
            .then_some((&b"x-forwarded-proto"[..], self.proto));
        let cert = self.client_cert.map(|cert| (&b"x-forwarded-client-cert"[..], cert));
        std::iter::once((&b"x-forwarded-for"[..], self.forwarded_for)).chain(proto).chain(cert)
    }
}

/// Writes the response head for the client into `out`: the endpoint's status
/// and headers less the hop-by-hop ones, `extra` (a `Set-Cookie`) and, when
/// the client connection closes after it, `Connection: close`.
pub fn write_response(buf: &[u8], resp: &ResponseHead, extra: Option<(&[u8], &[u8])>, close: bool, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    let mut code = itoa_u16(resp.status);
    out.extend_from_slice(code.as_mut());
    out.push(b' ');
    out.extend_from_slice(&buf[resp.reason.clone()]);
    out.extend_from_slice(b"\r\n");
    // Passed through as chunked (or until the endpoint closes), the body keeps its coding.
    let coded = matches!(resp.framing, Framing::Chunked | Framing::Close);
    for h in passed_on(buf, resp, coded) {
        header(out, &buf[h.name.clone()], &buf[h.value.clone()]);
    }
    if let Some((name, value)) = extra {
        header(out, name, value);
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The fields of a response head that go on to the client: not the
/// hop-by-hop ones nor those its `Connection` header names (RFC 9110
/// §7.6.1); `Transfer-Encoding` only when `transfer_encoding` (the body is
/// passed on in its coding).
pub fn passed_on<'a>(
    buf: &'a [u8],
    resp: &'a ResponseHead,
    transfer_encoding: bool,
) -> impl Iterator<Item = &'a Span> + 'a {
    let (listed, n) = connection_listed(buf, &resp.headers);
    resp.headers.iter().filter(move |h| passes(buf, h, &listed[..n], transfer_encoding))
}

/// Leaves in `fields` (of a response head in `buf`) those [`passed_on`]
/// keeps, `Transfer-Encoding` not among them.
pub fn keep_passed_on(buf: &[u8], fields: &mut Vec<Span>) {
    let (listed, n) = connection_listed(buf, fields);
    fields.retain(|h| passes(buf, h, &listed[..n], false));
}

/// The `Connection` values that name a field (most name none: `keep-alive`,
/// `close`), at most four, and how many.
fn connection_listed(buf: &[u8], headers: &[Span]) -> ([Range<usize>; 4], usize) {
    let mut listed = [0..0, 0..0, 0..0, 0..0];
    let mut n = 0;
    let names_a_field = |v: &[u8]| {
        v.split(|b| *b == b',')
            .map(<[u8]>::trim_ascii)
            .any(|t| !t.is_empty() && !t.eq_ignore_ascii_case(b"close") && !t.eq_ignore_ascii_case(b"keep-alive"))
    };
    for h in headers.iter().filter(|h| h.kind == Kind::Connection) {
        if n < listed.len() && names_a_field(&buf[h.value.clone()]) {
            listed[n] = h.value.clone();
            n += 1;
        }
    }
    (listed, n)
}

/// Whether a field goes on to the client ([`passed_on`]).
#[inline]
fn passes(buf: &[u8], h: &Span, listed: &[Range<usize>], transfer_encoding: bool) -> bool {
    match h.kind {
        Kind::Connection | Kind::HopByHop => false,
        Kind::TransferEncoding => transfer_encoding,
        _ => listed.is_empty() || !named_by_connection(buf, &buf[h.name.clone()], listed),
    }
}

fn header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A status code's three digits.
fn itoa_u16(code: u16) -> [u8; 3] {
    let c = code.min(999);
    [b'0' + (c / 100) as u8, b'0' + (c / 10 % 10) as u8, b'0' + (c % 10) as u8]
}

/// The values of the headers of `kind`, as text (others skipped).
pub fn values<'b>(buf: &'b [u8], headers: &'b [Span], kind: Kind) -> impl Iterator<Item = &'b str> + 'b {
    headers.iter().filter(move |h| h.kind == kind).filter_map(move |h| std::str::from_utf8(&buf[h.value.clone()]).ok())
}

/// The first value of the header named `name` (lower case).
pub fn value_of<'b>(buf: &'b [u8], headers: &[Span], name: &str) -> Option<&'b [u8]> {
    headers.iter().find(|h| buf[h.name.clone()].eq_ignore_ascii_case(name.as_bytes())).map(|h| &buf[h.value.clone()])
}

/// Finds the end of a chunked body as its bytes pass (RFC 9112 §7.1):
/// chunk sizes, extensions, data and the trailer section, without copying.
#[derive(Clone, Debug, Default)]
pub struct Chunked {
    state: ChunkState,
    /// Bytes of data left in the current chunk.
    left: u64,
    /// Bytes of the current size or trailer line, bounded.
    line: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

/// One step of [`Chunked::decode`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// Bytes of the input taken.
    pub consumed: usize,
    /// Where the data among them is (empty when there is none).
    pub data: Range<usize>,
    /// The body ended with them.
    pub ended: bool,
}

/// Largest trailer section [`Chunked::decode`] collects.
pub const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// A malformed chunked body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body")]
pub struct BadChunk;

/// Longest chunk-size line (with extensions) or trailer line accepted.
const MAX_CHUNK_LINE: usize = 4096;

impl Chunked {
    /// Takes the next bytes of the body; returns how many belong to it (all
    /// of them until its end) and whether it ended there.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(usize, bool), BadChunk> {
        let mut i = 0;
        while i < bytes.len() {
            if self.state == ChunkState::Data {
                let take = (bytes.len() - i).min(usize::try_from(self.left).unwrap_or(usize::MAX));
                i += take;
                self.left -= take as u64;
                if self.left == 0 {
                    self.state = ChunkState::DataCr;
                }
                continue;
            }
            let b = bytes[i];
            i += 1;
            self.line += 1;
            if self.line > MAX_CHUNK_LINE {
                return Err(BadChunk);
            }
            self.state = match (self.state, b) {
                (ChunkState::Size, b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F') => {
                    let digit = u64::from((b as char).to_digit(16).unwrap_or(0));
                    self.left = self.left.checked_mul(16).and_then(|v| v.checked_add(digit)).ok_or(BadChunk)?;
                    if self.line > 16 {
                        return Err(BadChunk);
                    }
                    ChunkState::Size
                }
                (ChunkState::Size, b';' | b' ' | b'\t') if self.line > 1 => ChunkState::Extension,
                (ChunkState::Size, b'\r') if self.line > 1 => ChunkState::SizeLf,
                (ChunkState::Extension, b'\r') => ChunkState::SizeLf,
                (ChunkState::Extension, b'\n') => return Err(BadChunk),
                (ChunkState::Extension, _) => ChunkState::Extension,
                (ChunkState::SizeLf, b'\n') => {
                    self.line = 0;
                    if self.left == 0 { ChunkState::TrailerStart } else { ChunkState::Data }
                }
                (ChunkState::DataCr, b'\r') => ChunkState::DataLf,
                (ChunkState::DataLf, b'\n') => {
                    self.line = 0;
                    ChunkState::Size
                }
                (ChunkState::TrailerStart, b'\r') => ChunkState::EndLf,
                (ChunkState::TrailerStart | ChunkState::Trailer, b'\n') => return Err(BadChunk),
                (ChunkState::Trailer, b'\r') => ChunkState::TrailerLf,
                (ChunkState::TrailerStart | ChunkState::Trailer, _) => ChunkState::Trailer,
                (ChunkState::TrailerLf, b'\n') => {
                    self.line = 0;
                    ChunkState::TrailerStart
                }
                (ChunkState::EndLf, b'\n') => {
                    self.state = ChunkState::Done;
                    return Ok((i, true));
                }
                _ => return Err(BadChunk),
            };
        }
        Ok((i, false))
    }

    /// Takes the next bytes of the body up to the end of the first data run
    /// among them (or all of them), for a reader that wants the data without
    /// the framing. The trailer section's bytes, its final empty line
    /// included, are appended to `trailers`.
    pub fn decode(&mut self, bytes: &[u8], trailers: &mut Vec<u8>) -> Result<Decoded, BadChunk> {
        let mut i = 0;
        while i < bytes.len() {
            if self.state == ChunkState::Data {
                let take = (bytes.len() - i).min(usize::try_from(self.left).unwrap_or(usize::MAX));
                self.left -= take as u64;
                if self.left == 0 {
                    self.state = ChunkState::DataCr;
                }
                return Ok(Decoded { consumed: i + take, data: i..i + take, ended: false });
            }
            let in_trailers = matches!(
                self.state,
                ChunkState::TrailerStart | ChunkState::Trailer | ChunkState::TrailerLf | ChunkState::EndLf
            );
            if in_trailers {
                if trailers.len() >= MAX_TRAILER_BYTES {
                    return Err(BadChunk);
                }
                trailers.push(bytes[i]);
            }
            // One framing byte at a time through the same state machine.
            let (_, ended) = self.feed(&bytes[i..=i])?;
            i += 1;
            if ended {
                return Ok(Decoded { consumed: i, data: i..i, ended: true });
            }
        }
        Ok(Decoded { consumed: i, data: i..i, ended: false })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<RequestHead, Decline> {
        let mut head = RequestHead::default();
        match parse_request(raw.as_bytes(), 8192, 100, &mut head)? {
            true => Ok(head),
            false => Err(Decline::Invalid),
        }
    }

    #[test]
    fn a_plain_request_is_taken_with_its_framing() {
        let raw = "POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello";
        let h = parse(raw).unwrap();
        assert_eq!(&raw[h.method.clone()], "POST");
        assert_eq!(&raw[h.target.clone()], "/a?b=1");
        assert_eq!((h.body, h.close, h.idempotent, h.len), (5, false, false, raw.len() - 5));
        assert!(parse("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap().close);
        let mut head = RequestHead::default();
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\nHost", 8192, 100, &mut head), Ok(false));
    }

    #[test]
    fn anything_unusual_or_ambiguous_is_left_to_hyper() {
        for raw in [
            "GET / HTTP/1.0\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nTE: trailers\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: close, x-secret\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Type: application/grpc\r\n\r\n",
        ] {
            assert_eq!(parse(raw).err(), Some(Decline::Unusual), "{raw:?}");
        }
        for raw in [
            "GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n",
            "GET / HTTP/1.1\r\nA b: c\r\n\r\n",
            "GET / HTTP/1.1\r\nA: \x01\r\n\r\n",
        ] {
            assert_eq!(parse(raw).err(), Some(Decline::Invalid), "{raw:?}");
        }
        let mut head = RequestHead::default();
        let big = format!("GET / HTTP/1.1\r\nA: {}\r\n\r\n", "x".repeat(9000));
        assert_eq!(parse_request(big.as_bytes(), 8192, 100, &mut head), Err(Decline::TooLarge));
        let many: String = (0..20).map(|i| format!("h{i}: v\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(parse_request(many.as_bytes(), 8192, 10, &mut head), Err(Decline::TooLarge));
    }

    #[test]
    fn the_request_for_the_endpoint_loses_hop_by_hop_headers_and_gets_the_proxy_s() {
        let raw = "GET /p HTTP/1.1\r\nHost: shop\r\nKeep-Alive: 5\r\nConnection: keep-alive\r\n\
                   X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Client-Cert: forged\r\nX-A: 1\r\n\r\n";
        let h = parse(raw).unwrap();
        let mut out = Vec::new();
        let fwd = Forwarded { forwarded_for: b"10.0.0.9", proto: b"http", keep_client_proto: false, client_cert: None };
        write_request(raw.as_bytes(), &h, &fwd, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /p HTTP/1.1\r\nHost: shop\r\nX-A: 1\r\nx-forwarded-for: 10.0.0.9\r\nx-forwarded-proto: http\r\n\r\n"
        );
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let framing = |raw: &str, head: bool| {
            let mut r = ResponseHead::default();
            parse_response(raw.as_bytes(), head, &mut r).map(|_| (r.framing, r.reusable))
        };
        assert_eq!(framing("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", false), Ok((Framing::Length(3), true)));
        assert_eq!(framing("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true), Ok((Framing::Empty, true)));
        assert_eq!(framing("HTTP/1.1 204 No\r\n\r\n", false), Ok((Framing::Empty, true)));
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", false),
            Ok((Framing::Chunked, true))
        );
        assert_eq!(framing("HTTP/1.1 200 OK\r\n\r\n", false), Ok((Framing::Close, false)));
        assert_eq!(framing("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false), Ok((Framing::Length(1), false)));
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: keep-alive\r\n\r\n", false),
            Ok((Framing::Length(1), true))
        );
        assert!(!framing("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n", false).unwrap().1);
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            "HTTP/1.1 101 Switching\r\n\r\n",
        ] {
            assert_eq!(framing(bad, false).err(), Some(BadResponse::Framing), "{bad:?}");
        }
    }

    #[test]
    fn the_response_for_the_client_drops_what_connection_names() {
        let raw = "HTTP/1.1 200 OK\r\nConnection: x-hop, keep-alive\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nContent-Length: 0\r\n\r\n";
        let mut r = ResponseHead::default();
        assert_eq!(parse_response(raw.as_bytes(), false, &mut r), Ok(true));
        let mut out = Vec::new();
        write_response(raw.as_bytes(), &r, Some((b"set-cookie", b"a=b")), true, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nset-cookie: a=b\r\nconnection: close\r\n\r\n"
        );
    }

    #[test]
    fn only_connection_values_that_name_a_field_remove_one() {
        let raw = "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: Close , X-A\r\nX-A: 1\r\nX-B: 2\r\n\
                   Transfer-Encoding: chunked\r\nTE: x\r\n\r\n";
        let mut r = ResponseHead::default();
        assert_eq!(parse_response(raw.as_bytes(), false, &mut r), Ok(true));
        let names = |te| -> Vec<&str> {
            passed_on(raw.as_bytes(), &r, te)
                .map(|h| std::str::from_utf8(&raw.as_bytes()[h.name.clone()]).unwrap())
                .collect()
        };
        assert_eq!(names(false), ["X-B"]);
        assert_eq!(names(true), ["X-B", "Transfer-Encoding"]);
    }

    #[test]
    fn a_chunked_body_s_end_is_found_across_any_split() {
        let body = b"4;ext=1\r\nwiki\r\n5\r\npedia\r\n0\r\nExpires: never\r\n\r\n";
        for split in 0..body.len() {
            let mut c = Chunked::default();
            let (a, done_a) = c.feed(&body[..split]).unwrap();
            assert_eq!((a, done_a), (split, false));
            let mut rest = body[split..].to_vec();
            rest.extend_from_slice(b"NEXT");
            assert_eq!(c.feed(&rest), Ok((body.len() - split, true)), "split at {split}");
        }
        for bad in [&b"x\r\n"[..], b"4\r\nwikiXX", b"\r\n", b"0\r\n\n", b"fffffffffffffffff\r\n", b"4\nwiki"] {
            assert_eq!(Chunked::default().feed(bad), Err(BadChunk), "{bad:?}");
        }
    }

    #[test]
    fn a_chunked_body_decodes_to_its_data_and_trailers_across_any_split() {
        let body = b"4;ext=1\r\nwiki\r\n5\r\npedia\r\n0\r\nExpires: never\r\n\r\nNEXT";
        for split in 0..body.len() {
            let (mut c, mut data, mut trailers, mut at, mut ended) =
                (Chunked::default(), Vec::new(), Vec::new(), 0, false);
            for part in [&body[..split], &body[split..]] {
                let mut from = 0;
                while from < part.len() && !ended {
                    let d = c.decode(&part[from..], &mut trailers).unwrap();
                    data.extend_from_slice(&part[from..][d.data.clone()]);
                    from += d.consumed;
                    ended = d.ended;
                }
                at += from;
            }
            assert!(ended, "split at {split}");
            assert_eq!(
                (&data[..], &trailers[..], at),
                (&b"wikipedia"[..], &b"Expires: never\r\n\r\n"[..], body.len() - 4)
            );
        }
        let mut trailers = Vec::new();
        assert_eq!(Chunked::default().decode(b"0\r\n\r\n", &mut trailers).map(|d| d.ended), Ok(true));
        assert_eq!(trailers, b"\r\n");
        assert_eq!(Chunked::default().decode(b"4\nwiki", &mut trailers), Err(BadChunk));
    }
}
