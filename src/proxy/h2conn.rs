//! Both ends of an HTTP/2 connection (RFC 9113), without I/O: the proxy's
//! own codec, for its client connections ([`Conn::server`]) and its
//! connections to HTTP/2 endpoints ([`Conn::client`]). Bytes read go in
//! through [`Conn::recv`], which calls a [`Handler`] for each head (a
//! request, or a final response), body piece, trailer block, reset and
//! opened window; heads go out through [`Conn::send_response`] and
//! [`Conn::send_request`], bodies through [`Conn::send_data`] and
//! [`Conn::send_trailers`]; everything to write gathers in
//! [`Conn::output`], which the caller writes out whole before it calls
//! `recv` again (so replies to the peer's control frames never pile up
//! beyond one read's worth).
//!
//! A head is decoded straight into one buffer the connection reuses
//! ([`Head`]): no header map, no allocation per message once the buffers
//! have grown. Streams sit in a flat table. The rules are the RFC's: the
//! preface and SETTINGS first; client streams odd and increasing, none
//! opened by a server (push is off); header blocks whole, with nothing
//! between HEADERS and their CONTINUATIONs; both flow-control windows on
//! both sides, the peer's `SETTINGS_INITIAL_WINDOW_SIZE` changes applied to
//! open streams; frames on streams the proxy reset are ignored, on streams
//! that ended, refused. A malformed message (RFC 9113 §8.1.1: bad, missing
//! or misplaced pseudo-headers, capitals or invalid bytes in names, bytes a
//! value may not hold, connection-specific fields, `TE` other than
//! `trailers`, conflicting `Content-Length` or one the body does not match)
//! resets its stream with `PROTOCOL_ERROR`. A server answers a request head
//! over the limit `431` and refuses a stream over its limit
//! (`REFUSED_STREAM`); a client keeps to the server's stream limit, skips
//! 1xx heads, and after the server's GOAWAY reports the streams it did not
//! process as refused (safe to retry).
//!
//! Abuse of a server ends the connection with GOAWAY `ENHANCE_YOUR_CALM`:
//! more than [`Config::max_pending_resets`] streams reset by the client
//! before their response ended, net of the responses that did end (rapid
//! reset, CVE-2023-44487); more than [`Config::max_local_resets`] streams
//! the proxy had to reset for the client's errors; a header block longer
//! than twice the header list limit (CONTINUATION flood, CVE-2024-27316).
//! On either end, a head's decoded size is bounded by the limit whatever
//! its block names (an HPACK bomb).

use std::collections::VecDeque;

use super::h1;
use super::h2frame::{self, Frame, FrameError, Reason, setting};
use super::hpack::{self, Field};

/// The connection's settings.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`.
    pub max_concurrent_streams: u32,
    /// `SETTINGS_MAX_HEADER_LIST_SIZE`: a request head larger (in RFC
    /// 9113's accounting, 32 bytes a field over its name and value) is
    /// answered `431`.
    pub max_header_list_size: u32,
    /// The most fields a request head may have (also answered `431`).
    pub max_header_fields: usize,
    /// `SETTINGS_INITIAL_WINDOW_SIZE`: each stream's receive window.
    pub stream_window: u32,
    /// The connection's receive window.
    pub connection_window: u32,
    /// `SETTINGS_MAX_FRAME_SIZE`: the largest frame taken.
    pub max_frame_size: u32,
    /// Streams the client may reset before their response ended, net of
    /// those answered, before the connection ends.
    pub max_pending_resets: u32,
    /// Streams the proxy may reset for the client's errors before the
    /// connection ends.
    pub max_local_resets: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 128,
            max_header_list_size: 16 * 1024,
            max_header_fields: 100,
            stream_window: 1024 * 1024,
            connection_window: 1024 * 1024,
            max_frame_size: h2frame::DEFAULT_MAX_FRAME_SIZE,
            max_pending_resets: 32,
            max_local_resets: 256,
        }
    }
}

/// Why the connection ended: the GOAWAY sent (already in the output).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("HTTP/2 connection error {reason:?}: {why}")]
pub struct ConnError {
    pub reason: Reason,
    pub why: &'static str,
}

/// What a response cannot be sent on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("stream {0} is not open")]
    NoStream(u32),
    #[error("stream {0} has its head already")]
    HeadSent(u32),
    #[error("stream {0} has no head yet")]
    NoHead(u32),
    #[error("no stream can be opened now")]
    CannotOpen,
}

/// What the connection tells the proxy, as it reads.
pub trait Handler {
    /// A server's: a request head, valid; `end_stream` when there is no body.
    fn request(&mut self, stream: u32, head: &Head, end_stream: bool) {
        let _ = (stream, head, end_stream);
    }
    /// A client's: the final response head (1xx ones are skipped), valid.
    fn response(&mut self, stream: u32, status: u16, head: &Head, end_stream: bool) {
        let _ = (stream, status, head, end_stream);
    }
    /// A piece of the peer's body (give its bytes back with
    /// [`Conn::release`] once they are consumed).
    fn data(&mut self, stream: u32, data: &[u8], end_stream: bool);
    /// The peer's trailers, which end its side.
    fn trailers(&mut self, stream: u32, head: &Head);
    /// The stream is gone: reset by the peer (its code), by the proxy for
    /// the peer's error (the code sent), or, for a client, left unprocessed
    /// by the server's GOAWAY (`REFUSED_STREAM`, safe to retry). Nothing
    /// more is sent on it.
    fn reset(&mut self, stream: u32, code: u32);
    /// The stream's send window opened after a [`Conn::send_data`] that
    /// could not send everything.
    fn writable(&mut self, stream: u32);
}

#[derive(Debug, Clone, Copy, Default)]
struct Span {
    start: u32,
    end: u32,
}

/// A request or response head (or a trailer block), decoded into one reused buffer.
#[derive(Debug, Default)]
pub struct Head {
    bytes: Vec<u8>,
    fields: Vec<(Span, Span)>,
    method: Option<Span>,
    scheme: Option<Span>,
    authority: Option<Span>,
    path: Option<Span>,
    protocol: Option<Span>,
    status: Option<Span>,
    content_length: Option<u64>,
    /// Size in RFC 9113's accounting.
    size: usize,
    /// Past this size nothing more is kept (a small block of indexed
    /// fields can name kilobytes each): the head is too large.
    limit: usize,
    malformed: Option<&'static str>,
    /// A value holds a control byte other than tab, or DEL, which HTTP/2
    /// allows but the `http` crate's values and HTTP/1.1 heads do not.
    controls: bool,
    /// Counts the blocks decoded into this head ([`Head::serial`]).
    serial: u64,
}

impl Head {
    fn clear(&mut self) {
        self.serial += 1;
        self.bytes.clear();
        self.fields.clear();
        self.method = None;
        self.scheme = None;
        self.authority = None;
        self.path = None;
        self.protocol = None;
        self.status = None;
        self.content_length = None;
        self.size = 0;
        self.malformed = None;
        self.controls = false;
    }

    fn too_large(&self) -> bool {
        self.size > self.limit
    }

    fn get(&self, s: Span) -> &[u8] {
        &self.bytes[s.start as usize..s.end as usize]
    }

    fn opt(&self, s: Option<Span>) -> Option<&[u8]> {
        s.map(|s| self.get(s))
    }

    fn push(&mut self, b: &[u8]) -> Span {
        let start = self.bytes.len() as u32;
        self.bytes.extend_from_slice(b);
        Span { start, end: self.bytes.len() as u32 }
    }

    pub fn method(&self) -> &[u8] {
        self.opt(self.method).unwrap_or_default()
    }

    pub fn scheme(&self) -> Option<&[u8]> {
        self.opt(self.scheme)
    }

    pub fn authority(&self) -> Option<&[u8]> {
        self.opt(self.authority)
    }

    pub fn path(&self) -> Option<&[u8]> {
        self.opt(self.path)
    }

    /// A response's `:status`, when it is three digits.
    pub fn status(&self) -> Option<u16> {
        match self.opt(self.status)? {
            &[a, b, c] if [a, b, c].iter().all(u8::is_ascii_digit) && a != b'0' => {
                Some(u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0'))
            }
            _ => None,
        }
    }

    pub fn content_length(&self) -> Option<u64> {
        self.content_length
    }

    /// The regular fields, in order (a `cookie` may come in several).
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields.iter().map(|&(n, v)| (self.get(n), self.get(v)))
    }

    /// Every byte of the head: the names and values [`Head::fields`] and
    /// the pseudo-header accessors hand out are slices of it.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Where `part`, a slice this head handed out, lies in [`Head::bytes`]
    /// (so a caller that copies the head once can keep its values as
    /// slices of that copy); an empty range for any other slice.
    pub fn range_of(&self, part: &[u8]) -> std::ops::Range<usize> {
        let base = self.bytes.as_ptr() as usize;
        let start = (part.as_ptr() as usize).wrapping_sub(base);
        match start.checked_add(part.len()) {
            Some(end) if end <= self.bytes.len() => start..end,
            _ => 0..0,
        }
    }

    fn bad(&mut self, why: &'static str) {
        self.malformed.get_or_insert(why);
    }

    /// Takes one decoded field, checking RFC 9113 §8.2 and §8.3.
    fn take(&mut self, f: Field<'_>, trailers: bool) {
        self.size += f.name.len() + f.value.len() + 32;
        if self.too_large() {
            return;
        }
        if let Some(pseudo) = f.name.strip_prefix(b":") {
            if trailers || !self.fields.is_empty() {
                return self.bad("pseudo-header after a regular field or in trailers");
            }
            let span = self.push(f.value);
            let slot = match pseudo {
                b"method" => &mut self.method,
                b"scheme" => &mut self.scheme,
                b"authority" => &mut self.authority,
                b"path" => &mut self.path,
                b"protocol" => &mut self.protocol,
                b"status" => &mut self.status,
                _ => return self.bad("unknown pseudo-header"),
            };
            if slot.replace(span).is_some() {
                self.bad("repeated pseudo-header");
            }
            return self.check_value(f.value);
        }
        // Every byte looked at (no early exit), so the check vectorizes.
        if f.name.is_empty() || !f.name.iter().fold(true, |ok, &b| ok & is_name_byte(b)) {
            return self.bad("invalid byte or capital in a field name");
        }
        match f.name {
            name if is_connection_specific(name) => return self.bad("connection-specific field"),
            b"te" if f.value != b"trailers" => return self.bad("TE other than trailers"),
            b"content-length" if !trailers => match (h1::digits(f.value), self.content_length) {
                (None, _) => return self.bad("invalid Content-Length"),
                (Some(n), Some(m)) if n != m => return self.bad("conflicting Content-Length"),
                (Some(n), _) => self.content_length = Some(n),
            },
            _ => {}
        }
        self.check_value(f.value);
        let name = self.push(f.name);
        let value = self.push(f.value);
        self.fields.push((name, value));
    }

    fn check_value(&mut self, v: &[u8]) {
        // Every byte looked at (no early exit), so the check vectorizes.
        // NUL, CR and LF are among the control bytes: one pass over a
        // value without any, a second only over one with some.
        let controls = v.iter().fold(false, |c, &b| c | ((b < b' ' && b != b'\t') || b == 0x7f));
        self.controls |= controls;
        if (controls && v.iter().any(|&b| matches!(b, 0 | b'\r' | b'\n')))
            || v.first().is_some_and(|&b| b == b' ' || b == b'\t')
            || v.last().is_some_and(|&b| b == b' ' || b == b'\t')
        {
            self.bad("invalid byte or surrounding whitespace in a field value");
        }
    }

    /// Changes each time a block is decoded into this head, and only then:
    /// a head handed over again with the same serial, on the same
    /// connection and of the same kind (a request's or response's head,
    /// or trailers), is the same head, with the same verdict (a block
    /// recognised rather than decoded), so what a handler made of it the
    /// last time holds again. Never 0 for a head handed over.
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// Whether a value (a pseudo-header's or a field's) holds a control
    /// byte other than tab, or DEL: valid in HTTP/2, refused by the `http`
    /// crate's values and by HTTP/1.1.
    pub fn has_controls(&self) -> bool {
        self.controls
    }

    /// A response has `:status` alone (RFC 9113 §8.3.2).
    fn check_response(&mut self) {
        let request = self.method.or(self.scheme).or(self.authority).or(self.path).or(self.protocol);
        if self.status().is_none() || request.is_some() {
            self.bad("a response needs :status alone");
        }
    }

    /// The pseudo-headers a request needs (RFC 9113 §8.3.1).
    fn check_request(&mut self) {
        if self.status.is_some() {
            return self.bad(":status in a request");
        }
        match (self.method(), self.protocol) {
            (_, Some(_)) => self.bad(":protocol without extended CONNECT"),
            (b"", _) => self.bad("no :method"),
            (b"CONNECT", _) => {
                if self.authority.is_none() || self.scheme.is_some() || self.path.is_some() {
                    self.bad("CONNECT needs :authority alone");
                }
            }
            _ => {
                if self.scheme.is_none() || self.path().is_none_or(<[u8]>::is_empty) {
                    self.bad("no :scheme or :path");
                }
            }
        }
    }
}

/// A field name's bytes: lowercase `tchar`s (RFC 9110 §5.6.2).
fn is_name_byte(b: u8) -> bool {
    NAME_BYTES[usize::from(b)]
}

/// [`is_name_byte`] for each byte.
const NAME_BYTES: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = matches!(b as u8, b'a'..=b'z' | b'0'..=b'9' | b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~');
        b += 1;
    }
    t
};

#[derive(Debug)]
struct Stream {
    id: u32,
    /// The peer's side ended (END_STREAM received).
    recv_done: bool,
    /// The proxy's side ended (END_STREAM sent).
    send_done: bool,
    /// The head went out (a server's response; a client's request, at once).
    head_sent: bool,
    /// The peer's head came (a client's: the final response head).
    head_received: bool,
    /// A client's: the request was HEAD (its response has no body).
    head_request: bool,
    send_window: i64,
    recv_window: i64,
    /// Body bytes consumed and not yet given back with WINDOW_UPDATE.
    unacked: u32,
    /// A send_data could not send everything: say when the window opens.
    blocked: bool,
    content_length: Option<u64>,
    received: u64,
}

/// The bytes of the block a head was decoded from, kept while decoding
/// them again would give the same head.
#[derive(Debug, Default)]
struct Decoded {
    block: Vec<u8>,
    /// The decoder's [`hpack::Decoder::table_changes`] when the block was
    /// decoded (it changed nothing itself); `None` when nothing is kept.
    table: Option<u64>,
}

/// Where [`Conn`] keeps a request's or a response's head.
const HEAD: usize = 0;
/// Where [`Conn`] keeps trailers.
const TRAILERS: usize = 1;

/// Blocks up to this size are kept to be recognised ([`Decoded`]); a
/// connection's heads are usually a few dozen bytes once indexed.
const MAX_DECODED_FROM: usize = 512;

/// A header block being gathered from HEADERS and CONTINUATIONs.
#[derive(Debug)]
struct Block {
    stream: u32,
    end_stream: bool,
}

/// How many stream ids the proxy reset to remember (frames on them are ignored).
const RESET_MEMORY: usize = 128;

/// Which end of the connection the proxy is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Server,
    Client,
}

/// A connection's state, either end.
#[derive(Debug)]
pub struct Conn {
    cfg: Config,
    role: Role,
    preface: bool,
    got_settings: bool,
    decoder: hpack::Decoder,
    encoder: hpack::Encoder,
    /// The last heads decoded: a request's or a response's ([`HEAD`]),
    /// and trailers ([`TRAILERS`]).
    heads: [Head; 2],
    /// What each of `heads` was decoded from, while the same bytes would
    /// decode to it again.
    decoded_from: [Decoded; 2],
    block: Option<Block>,
    block_buf: Vec<u8>,
    encoded: Vec<u8>,
    /// Open streams, by id (ascending: each new stream's id is higher).
    /// A deque: streams mostly end in the order they opened, so most
    /// leave from the front.
    streams: VecDeque<Stream>,
    /// The highest stream id opened (by the client: the peer, or the proxy).
    last_stream: u32,
    /// The server's `SETTINGS_MAX_CONCURRENT_STREAMS` (a client's limit).
    peer_max_streams: u32,
    reset_ids: VecDeque<u32>,
    peer_stream_window: u32,
    peer_max_frame: u32,
    send_window: i64,
    recv_window: i64,
    unacked: u32,
    pending_resets: u32,
    local_resets: u32,
    goaway_sent: bool,
    goaway_received: bool,
    ping: Option<[u8; 8]>,
    closed: Option<ConnError>,
    /// A server's streams that left since [`Conn::left`] last took them.
    left: Vec<u32>,
    out: Vec<u8>,
}

impl Conn {
    /// The server end of a client's connection; its SETTINGS (and the
    /// connection window's increase) are in the output, to go with the
    /// first write.
    pub fn server(cfg: Config) -> Self {
        Self::new(cfg, Role::Server)
    }

    /// The client end of a connection to a server; the preface and SETTINGS
    /// (push disabled) are in the output. `max_concurrent_streams` and the
    /// reset limits do not apply: the server's own limit does.
    pub fn client(cfg: Config) -> Self {
        Self::new(cfg, Role::Client)
    }

    fn new(cfg: Config, role: Role) -> Self {
        let mut out = Vec::with_capacity(64);
        let mut settings = vec![
            (setting::INITIAL_WINDOW_SIZE, cfg.stream_window),
            (setting::MAX_HEADER_LIST_SIZE, cfg.max_header_list_size),
        ];
        match role {
            Role::Server => settings.insert(0, (setting::MAX_CONCURRENT_STREAMS, cfg.max_concurrent_streams)),
            Role::Client => {
                out.extend_from_slice(h2frame::PREFACE);
                settings.insert(0, (setting::ENABLE_PUSH, 0));
            }
        }
        if cfg.max_frame_size != h2frame::DEFAULT_MAX_FRAME_SIZE {
            settings.push((setting::MAX_FRAME_SIZE, cfg.max_frame_size));
        }
        h2frame::write_settings(&mut out, &settings);
        if cfg.connection_window > h2frame::DEFAULT_WINDOW {
            h2frame::write_window_update(&mut out, 0, cfg.connection_window - h2frame::DEFAULT_WINDOW);
        }
        Self {
            cfg,
            role,
            // A client has nothing to read before the server's SETTINGS.
            preface: role == Role::Client,
            got_settings: false,
            decoder: hpack::Decoder::default(),
            encoder: hpack::Encoder::default(),
            heads: Default::default(),
            decoded_from: Default::default(),
            block: None,
            block_buf: Vec::new(),
            encoded: Vec::new(),
            streams: VecDeque::new(),
            last_stream: 0,
            // Until the server's SETTINGS say otherwise (RFC 9113 §6.5.2
            // leaves it unlimited; the `h2` crate starts at 100 too).
            peer_max_streams: 100,
            reset_ids: VecDeque::new(),
            peer_stream_window: h2frame::DEFAULT_WINDOW,
            peer_max_frame: h2frame::DEFAULT_MAX_FRAME_SIZE,
            send_window: i64::from(h2frame::DEFAULT_WINDOW),
            recv_window: i64::from(cfg.connection_window.max(h2frame::DEFAULT_WINDOW)),
            unacked: 0,
            pending_resets: 0,
            local_resets: 0,
            goaway_sent: false,
            goaway_received: false,
            ping: None,
            closed: None,
            left: Vec::new(),
            out,
        }
    }

    /// What to write to the client; the caller writes it and clears it.
    pub fn output(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// Streams open.
    pub fn streams(&self) -> usize {
        self.streams.len()
    }

    /// Whether `stream` is open (neither ended both ways nor reset).
    pub fn is_open(&self, stream: u32) -> bool {
        self.find(stream).is_some()
    }

    /// A server's: the streams that have left since the last call (ended
    /// both ways, or reset by either side), in `into` (emptied first), so
    /// that the server learns of them without asking after each of its
    /// streams. The server takes them after every read and send: they are
    /// kept until it does.
    pub fn left(&mut self, into: &mut Vec<u32>) {
        into.clear();
        std::mem::swap(&mut self.left, into);
    }

    /// The connection has ended (its GOAWAY is in the output), or is
    /// closing and has no stream left.
    pub fn is_done(&self) -> bool {
        self.closed.is_some() || ((self.goaway_sent || self.goaway_received) && self.streams.is_empty())
    }

    /// Reads what `input` holds of the client's frames; returns how many
    /// bytes it took (an incomplete frame's stay for the next call).
    pub fn recv(&mut self, input: &[u8], h: &mut impl Handler) -> Result<usize, ConnError> {
        if let Some(e) = self.closed {
            return Err(e);
        }
        let mut at = 0;
        if !self.preface {
            if input.len() < h2frame::PREFACE.len() {
                return if h2frame::PREFACE.starts_with(input) {
                    Ok(0)
                } else {
                    Err(self.fail(Reason::ProtocolError, "no preface"))
                };
            }
            if &input[..24] != h2frame::PREFACE {
                return Err(self.fail(Reason::ProtocolError, "no preface"));
            }
            self.preface = true;
            at = 24;
        }
        loop {
            let (head, payload) = match h2frame::split(&input[at..], self.cfg.max_frame_size) {
                Ok(Some((head, payload, _))) => (head, payload),
                Ok(None) => return Ok(at),
                Err(e) => {
                    self.frame_error(e, h)?;
                    return Ok(at);
                }
            };
            at += h2frame::HEAD_LEN + payload.len();
            self.frame(head, payload, h)?;
        }
    }

    fn fail(&mut self, reason: Reason, why: &'static str) -> ConnError {
        let e = ConnError { reason, why };
        if self.closed.is_none() {
            let last = self.peer_last_stream();
            h2frame::write_goaway(&mut self.out, last, reason);
            self.closed = Some(e);
        }
        e
    }

    /// A connection error ends the connection; a stream error resets the stream.
    fn frame_error(&mut self, e: FrameError, h: &mut impl Handler) -> Result<(), ConnError> {
        match e {
            FrameError::Connection(reason, why) => Err(self.fail(reason, why)),
            FrameError::Stream(id, reason, _) => self.local_reset(id, reason, h),
        }
    }

    fn frame(&mut self, head: h2frame::Head, payload: &[u8], h: &mut impl Handler) -> Result<(), ConnError> {
        if self.block.is_some() && head.kind != h2frame::kind::CONTINUATION {
            return Err(self.fail(Reason::ProtocolError, "frame inside a header block"));
        }
        if !self.got_settings && head.kind != h2frame::kind::SETTINGS {
            return Err(self.fail(Reason::ProtocolError, "first frame not SETTINGS"));
        }
        let frame = match h2frame::parse(head, payload) {
            Ok(f) => f,
            // A HEADERS frame's block cannot be decoded without it: the
            // table would be out of step (RFC 9113 §5.4.1 lets a stream
            // error end the connection).
            Err(FrameError::Stream(_, reason, why)) if head.kind == h2frame::kind::HEADERS => {
                return Err(self.fail(reason, why));
            }
            Err(e) => return self.frame_error(e, h),
        };
        match frame {
            Frame::Settings { ack: true, .. } => {
                if !self.got_settings {
                    return Err(self.fail(Reason::ProtocolError, "first frame not SETTINGS"));
                }
            }
            Frame::Settings { ack: false, settings } => {
                self.got_settings = true;
                self.settings(settings, h)?;
                h2frame::write_settings_ack(&mut self.out);
            }
            Frame::Headers { stream, end_stream, end_headers, fragment, .. } => {
                self.block_buf.clear();
                self.block_buf.extend_from_slice(fragment);
                self.block = Some(Block { stream, end_stream });
                if end_headers {
                    return self.header_block(h);
                }
                self.check_block_size()?;
            }
            Frame::Continuation { stream, end_headers, fragment } => {
                if self.block.as_ref().is_none_or(|b| b.stream != stream) {
                    return Err(self.fail(Reason::ProtocolError, "CONTINUATION without its HEADERS"));
                }
                self.block_buf.extend_from_slice(fragment);
                if end_headers {
                    return self.header_block(h);
                }
                self.check_block_size()?;
            }
            Frame::Data { stream, end_stream, data, flow_len } => {
                return self.data(stream, end_stream, data, flow_len, h);
            }
            Frame::WindowUpdate { stream: 0, increment } => {
                self.send_window += i64::from(increment);
                if self.send_window > i64::from(h2frame::MAX_WINDOW) {
                    return Err(self.fail(Reason::FlowControlError, "connection window above 2^31-1"));
                }
                self.wake_blocked(h);
            }
            Frame::WindowUpdate { stream, increment } => {
                self.check_known(stream)?;
                if let Some(i) = self.find(stream) {
                    let s = &mut self.streams[i];
                    s.send_window += i64::from(increment);
                    if s.send_window > i64::from(h2frame::MAX_WINDOW) {
                        return self.local_reset(stream, Reason::FlowControlError, h);
                    }
                    if s.blocked && s.send_window > 0 && self.send_window > 0 {
                        s.blocked = false;
                        h.writable(stream);
                    }
                }
            }
            Frame::RstStream { stream, code } => {
                self.check_known(stream)?;
                if let Some(i) = self.find(stream) {
                    self.remove(i);
                    self.remember_reset(stream);
                    h.reset(stream, code);
                    if self.role == Role::Server {
                        self.pending_resets += 1;
                    }
                    if self.pending_resets > self.cfg.max_pending_resets {
                        return Err(self.fail(Reason::EnhanceYourCalm, "too many streams reset by the client"));
                    }
                }
            }
            Frame::Ping { ack: false, data } => h2frame::write_ping(&mut self.out, data, true),
            Frame::Ping { ack: true, data } => {
                if self.ping == Some(data) {
                    self.ping = None;
                }
            }
            Frame::GoAway { last_stream, .. } => {
                self.goaway_received = true;
                if self.role == Role::Client {
                    // Streams past the server's last were not processed
                    // (the newest: at the back).
                    while let Some(id) = self.streams.back().map(|s| s.id).filter(|id| *id > last_stream) {
                        self.streams.pop_back();
                        self.remember_reset(id);
                        h.reset(id, Reason::RefusedStream.code());
                    }
                }
            }
            Frame::Priority { .. } | Frame::Unknown { .. } => {}
        }
        Ok(())
    }

    /// The last stream the peer opened that the proxy took (none for a client).
    fn peer_last_stream(&self) -> u32 {
        if self.role == Role::Server { self.last_stream } else { 0 }
    }

    /// A stream id that is not open must be one the client has used.
    fn check_known(&mut self, stream: u32) -> Result<(), ConnError> {
        if stream > self.last_stream {
            return Err(self.fail(Reason::ProtocolError, "frame on an idle stream"));
        }
        Ok(())
    }

    /// The open streams are in the order they opened, which is their ids'
    /// (each new one's is higher), so a stream is found by halving the
    /// deque's part that holds it (most often all of it is one part).
    #[inline]
    fn find(&self, stream: u32) -> Option<usize> {
        let (front, back) = self.streams.as_slices();
        match back.first() {
            Some(first) if stream >= first.id => {
                back.binary_search_by_key(&stream, |s| s.id).ok().map(|i| front.len() + i)
            }
            _ => front.binary_search_by_key(&stream, |s| s.id).ok(),
        }
    }

    /// Takes the `i`th stream out of the open ones, keeping their order; a
    /// server's is listed for [`Conn::left`].
    fn remove(&mut self, i: usize) -> Option<Stream> {
        let s = self.streams.remove(i)?;
        if self.role == Role::Server {
            self.left.push(s.id);
        }
        Some(s)
    }

    fn remember_reset(&mut self, stream: u32) {
        if self.reset_ids.len() == RESET_MEMORY {
            self.reset_ids.pop_front();
        }
        self.reset_ids.push_back(stream);
    }

    fn check_block_size(&mut self) -> Result<(), ConnError> {
        let cap = (self.cfg.max_header_list_size as usize).max(16 * 1024) * 2;
        if self.block_buf.len() > cap {
            return Err(self.fail(Reason::EnhanceYourCalm, "header block too long"));
        }
        Ok(())
    }

    fn settings(&mut self, s: h2frame::Settings, h: &mut impl Handler) -> Result<(), ConnError> {
        if let Some(size) = s.header_table_size {
            self.encoder.set_peer_table_size(size as usize);
        }
        if let Some(size) = s.max_frame_size {
            self.peer_max_frame = size;
        }
        if let Some(n) = s.max_concurrent_streams {
            self.peer_max_streams = n;
        }
        if let Some(window) = s.initial_window_size {
            let delta = i64::from(window) - i64::from(self.peer_stream_window);
            self.peer_stream_window = window;
            for st in &mut self.streams {
                st.send_window += delta;
                if st.send_window > i64::from(h2frame::MAX_WINDOW) {
                    return Err(self.fail(Reason::FlowControlError, "stream window above 2^31-1"));
                }
            }
            if delta > 0 {
                self.wake_blocked(h);
            }
        }
        Ok(())
    }

    fn wake_blocked(&mut self, h: &mut impl Handler) {
        if self.send_window <= 0 {
            return;
        }
        for s in &mut self.streams {
            if s.blocked && s.send_window > 0 {
                s.blocked = false;
                h.writable(s.id);
            }
        }
    }

    /// Resets a stream for the client's error.
    fn local_reset(&mut self, stream: u32, reason: Reason, h: &mut impl Handler) -> Result<(), ConnError> {
        if stream > self.last_stream {
            // No RST_STREAM on an idle stream (RFC 9113 §6.4).
            return Err(self.fail(reason, "stream error on an idle stream"));
        }
        h2frame::write_rst_stream(&mut self.out, stream, reason);
        if let Some(i) = self.find(stream) {
            self.remove(i);
            h.reset(stream, reason.code());
        }
        self.remember_reset(stream);
        self.local_resets += 1;
        if self.local_resets > self.cfg.max_local_resets {
            return Err(self.fail(Reason::EnhanceYourCalm, "too many streams reset for the client's errors"));
        }
        Ok(())
    }

    fn data(
        &mut self,
        stream: u32,
        end_stream: bool,
        data: &[u8],
        flow_len: u32,
        h: &mut impl Handler,
    ) -> Result<(), ConnError> {
        self.recv_window -= i64::from(flow_len);
        if self.recv_window < 0 {
            return Err(self.fail(Reason::FlowControlError, "DATA beyond the connection window"));
        }
        let padding = flow_len - data.len() as u32;
        let Some(i) = self.find(stream) else {
            self.check_known(stream)?;
            if !self.reset_ids.contains(&stream) {
                return Err(self.fail(Reason::StreamClosed, "DATA on a closed stream"));
            }
            // In flight when the stream was reset: give its window back.
            self.release_connection(flow_len);
            return Ok(());
        };
        let s = &mut self.streams[i];
        if s.recv_done {
            return self.local_reset(stream, Reason::StreamClosed, h);
        }
        if !s.head_received {
            return self.local_reset(stream, Reason::ProtocolError, h);
        }
        s.recv_window -= i64::from(flow_len);
        if s.recv_window < 0 {
            return self.local_reset(stream, Reason::FlowControlError, h);
        }
        s.received += data.len() as u64;
        let over = s.content_length.is_some_and(|cl| s.received > cl || (end_stream && s.received != cl));
        if over {
            return self.local_reset(stream, Reason::ProtocolError, h);
        }
        if end_stream {
            s.recv_done = true;
        }
        if padding > 0 {
            self.release(stream, padding as usize);
        }
        h.data(stream, data, end_stream);
        if end_stream {
            self.close_if_done(stream);
        }
        Ok(())
    }

    fn release_connection(&mut self, n: u32) {
        self.unacked += n;
        if self.unacked >= self.cfg.connection_window / 2 {
            h2frame::write_window_update(&mut self.out, 0, self.unacked);
            self.recv_window += i64::from(self.unacked);
            self.unacked = 0;
        }
    }

    /// Gives `n` body bytes of `stream` back to the client's windows once
    /// consumed (WINDOW_UPDATEs go out when half a window is owed).
    pub fn release(&mut self, stream: u32, n: usize) {
        let n = n as u32;
        self.release_connection(n);
        let half = self.cfg.stream_window / 2;
        if let Some(i) = self.find(stream) {
            let s = &mut self.streams[i];
            if s.recv_done {
                return;
            }
            s.unacked += n;
            if s.unacked >= half {
                h2frame::write_window_update(&mut self.out, stream, s.unacked);
                s.recv_window += i64::from(s.unacked);
                s.unacked = 0;
            }
        }
    }

    fn header_block(&mut self, h: &mut impl Handler) -> Result<(), ConnError> {
        let Some(Block { stream, end_stream }) = self.block.take() else { return Ok(()) };
        let existing = self.find(stream);
        let trailers = existing.is_some_and(|i| self.role == Role::Server || self.streams[i].head_received);
        let fresh = existing.is_none() && stream > self.last_stream;
        if self.role == Role::Client && (fresh || stream % 2 == 0) {
            return Err(self.fail(Reason::ProtocolError, "HEADERS on a stream the proxy did not open"));
        }
        if existing.is_none() && !fresh && !self.reset_ids.contains(&stream) {
            return Err(self.fail(Reason::StreamClosed, "HEADERS on a closed stream"));
        }
        if fresh && stream % 2 == 0 {
            return Err(self.fail(Reason::ProtocolError, "even stream id from a client"));
        }
        // A peer that indexes its fields sends the same bytes for the same
        // head (a call's trailers, an RPC's request to the same method):
        // when they decoded to the last head of their kind without touching
        // the table, and the table has not changed since, they would decode
        // to it again, checks and all.
        let kind = if trailers { TRAILERS } else { HEAD };
        let changes = self.decoder.table_changes();
        let from = &mut self.decoded_from[kind];
        if from.table != Some(changes) || from.block != self.block_buf {
            from.table = None;
            let head = &mut self.heads[kind];
            head.clear();
            head.limit = self.cfg.max_header_list_size as usize;
            let (decoder, block) = (&mut self.decoder, &self.block_buf);
            if let Err(e) = decoder.decode(block, |f| head.take(f, trailers)) {
                return Err(self.fail(Reason::CompressionError, hpack_why(e)));
            }
            if self.decoder.table_changes() == changes && block.len() <= MAX_DECODED_FROM {
                from.block.clear();
                from.block.extend_from_slice(block);
                from.table = Some(changes);
            }
        }
        if fresh {
            self.last_stream = stream;
        }
        match existing {
            Some(i) if trailers => self.trailer_block(i, end_stream, h),
            Some(i) => self.response_head(i, end_stream, h),
            None => self.request_head(stream, fresh, end_stream, h),
        }
    }

    /// Trailers: they end the peer's side and hold no pseudo-header.
    fn trailer_block(&mut self, i: usize, end_stream: bool, h: &mut impl Handler) -> Result<(), ConnError> {
        let s = &self.streams[i];
        let stream = s.id;
        if s.recv_done || !end_stream {
            let reason = if s.recv_done { Reason::StreamClosed } else { Reason::ProtocolError };
            return self.local_reset(stream, reason, h);
        }
        if self.heads[TRAILERS].malformed.is_some()
            || self.heads[TRAILERS].too_large()
            || s.content_length.is_some_and(|cl| cl != s.received)
        {
            return self.local_reset(stream, Reason::ProtocolError, h);
        }
        self.streams[i].recv_done = true;
        h.trailers(stream, &self.heads[TRAILERS]);
        self.close_if_done(stream);
        Ok(())
    }

    /// A client's: a response head on a stream it opened; 1xx heads are skipped.
    fn response_head(&mut self, i: usize, end_stream: bool, h: &mut impl Handler) -> Result<(), ConnError> {
        let stream = self.streams[i].id;
        if !self.heads[HEAD].too_large() {
            self.heads[HEAD].check_response();
        }
        let status = self.heads[HEAD].status().unwrap_or(0);
        if self.heads[HEAD].malformed.is_some() || self.heads[HEAD].too_large() || status == 101 {
            return self.local_reset(stream, Reason::ProtocolError, h);
        }
        if status < 200 {
            if end_stream {
                return self.local_reset(stream, Reason::ProtocolError, h);
            }
            return Ok(());
        }
        let s = &mut self.streams[i];
        s.head_received = true;
        // A response to HEAD, or a 304, names a length it has no body for.
        s.content_length = self.heads[HEAD].content_length.filter(|_| !s.head_request && status != 304);
        if end_stream && s.content_length.is_some_and(|cl| cl != 0) {
            return self.local_reset(stream, Reason::ProtocolError, h);
        }
        s.recv_done = end_stream;
        h.response(stream, status, &self.heads[HEAD], end_stream);
        if end_stream {
            self.close_if_done(stream);
        }
        Ok(())
    }

    /// A server's: a request head on a new stream.
    fn request_head(
        &mut self,
        stream: u32,
        fresh: bool,
        end_stream: bool,
        h: &mut impl Handler,
    ) -> Result<(), ConnError> {
        if !fresh || self.goaway_sent {
            // On a stream the proxy reset, or after its GOAWAY: decoded for
            // the table's sake only (and its DATA ignored).
            if fresh {
                self.remember_reset(stream);
            }
            return Ok(());
        }
        if self.streams.len() >= self.cfg.max_concurrent_streams as usize {
            h2frame::write_rst_stream(&mut self.out, stream, Reason::RefusedStream);
            self.remember_reset(stream);
            return Ok(());
        }
        if !self.heads[HEAD].too_large() {
            self.heads[HEAD].check_request();
        }
        if self.heads[HEAD].malformed.is_some() {
            return self.local_reset(stream, Reason::ProtocolError, h);
        }
        debug_assert!(self.streams.back().is_none_or(|s| s.id < stream), "streams open in their ids' order");
        self.streams.push_back(Stream {
            id: stream,
            recv_done: end_stream,
            send_done: false,
            head_sent: false,
            head_received: true,
            head_request: false,
            send_window: i64::from(self.peer_stream_window),
            recv_window: i64::from(self.cfg.stream_window),
            unacked: 0,
            blocked: false,
            content_length: self.heads[HEAD].content_length,
            received: 0,
        });
        if end_stream && self.heads[HEAD].content_length.is_some_and(|cl| cl != 0) {
            return self.local_reset(stream, Reason::ProtocolError, h);
        }
        if self.heads[HEAD].too_large() || self.heads[HEAD].fields.len() > self.cfg.max_header_fields {
            // Answered here (earning no credit against rapid resets); the
            // request is not the proxy's to serve.
            self.pending_resets += 1;
            let _ = self.send_response(stream, 431, [], true);
            return Ok(());
        }
        h.request(stream, &self.heads[HEAD], end_stream);
        Ok(())
    }

    /// Removes a stream whose both sides have ended.
    fn close_if_done(&mut self, stream: u32) {
        if let Some(i) = self.find(stream)
            && self.streams[i].recv_done
            && self.streams[i].send_done
        {
            self.remove(i);
        }
    }

    /// The peer's first SETTINGS frame has been read.
    pub fn settled(&self) -> bool {
        self.got_settings
    }

    /// A client's: the server's `SETTINGS_MAX_CONCURRENT_STREAMS`.
    pub fn peer_max_streams(&self) -> u32 {
        self.peer_max_streams
    }

    /// No new stream will open: the connection ended, or a GOAWAY went
    /// either way.
    pub fn is_closing(&self) -> bool {
        self.closed.is_some() || self.goaway_sent || self.goaway_received
    }

    /// A client's: whether a request may be sent now (the server's stream
    /// limit, no GOAWAY either way, stream ids left).
    pub fn can_open(&self) -> bool {
        self.role == Role::Client
            && self.closed.is_none()
            && !self.goaway_sent
            && !self.goaway_received
            && self.streams.len() < self.peer_max_streams as usize
            && self.last_stream < h2frame::MAX_WINDOW - 2
    }

    /// A client's: writes a request head on a new stream and returns its
    /// id; `end_stream` when there is no body. Connection-specific fields
    /// are left out.
    pub fn send_request<'a>(
        &mut self,
        method: &[u8],
        scheme: &[u8],
        authority: &[u8],
        path: &[u8],
        fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
        end_stream: bool,
    ) -> Result<u32, SendError> {
        if !self.can_open() {
            return Err(SendError::CannotOpen);
        }
        let stream = self.last_stream + if self.last_stream == 0 { 1 } else { 2 };
        self.last_stream = stream;
        self.encoded.clear();
        self.encoder.begin(hpack::Block::Request, &mut self.encoded);
        for (name, value) in
            [(&b":method"[..], method), (b":scheme", scheme), (b":authority", authority), (b":path", path)]
        {
            self.encoder.field(name, value, &mut self.encoded);
        }
        for (name, value) in fields {
            if !is_connection_specific(name) {
                self.encoder.field(name, value, &mut self.encoded);
            }
        }
        h2frame::write_headers(&mut self.out, stream, &self.encoded, end_stream, self.peer_max_frame);
        debug_assert!(self.streams.back().is_none_or(|s| s.id < stream), "streams open in their ids' order");
        self.streams.push_back(Stream {
            id: stream,
            recv_done: false,
            send_done: end_stream,
            head_sent: true,
            head_received: false,
            head_request: method == b"HEAD",
            send_window: i64::from(self.peer_stream_window),
            recv_window: i64::from(self.cfg.stream_window),
            unacked: 0,
            blocked: false,
            content_length: None,
            received: 0,
        });
        Ok(stream)
    }

    /// Writes a response head; `end_stream` when there is no body.
    /// Connection-specific fields are left out (RFC 9113 §8.2.2).
    pub fn send_response<'a>(
        &mut self,
        stream: u32,
        status: u16,
        fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
        end_stream: bool,
    ) -> Result<(), SendError> {
        let i = self.find(stream).ok_or(SendError::NoStream(stream))?;
        if self.role == Role::Client || self.streams[i].head_sent {
            return Err(SendError::HeadSent(stream));
        }
        self.streams[i].head_sent = true;
        self.encoded.clear();
        self.encoder.begin(hpack::Block::Response, &mut self.encoded);
        self.encoder.status(status, &mut self.encoded);
        for (name, value) in fields {
            if is_connection_specific(name) {
                continue;
            }
            self.encoder.field(name, value, &mut self.encoded);
        }
        h2frame::write_headers(&mut self.out, stream, &self.encoded, end_stream, self.peer_max_frame);
        if end_stream {
            self.end_send(i);
        }
        Ok(())
    }

    /// Writes trailers, which end the response.
    pub fn send_trailers<'a>(
        &mut self,
        stream: u32,
        fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<(), SendError> {
        let i = self.find(stream).ok_or(SendError::NoStream(stream))?;
        if !self.streams[i].head_sent {
            return Err(SendError::NoHead(stream));
        }
        self.encoded.clear();
        self.encoder.begin(hpack::Block::Trailers, &mut self.encoded);
        for (name, value) in fields {
            if !is_connection_specific(name) {
                self.encoder.field(name, value, &mut self.encoded);
            }
        }
        h2frame::write_headers(&mut self.out, stream, &self.encoded, true, self.peer_max_frame);
        self.end_send(i);
        Ok(())
    }

    /// Writes as much of `data` as both send windows allow, in frames of
    /// the client's size; returns how much. `end_stream` ends the response
    /// when all of `data` went. When not all did, [`Handler::writable`]
    /// says when to go on.
    pub fn send_data(&mut self, stream: u32, data: &[u8], end_stream: bool) -> Result<usize, SendError> {
        let i = self.find(stream).ok_or(SendError::NoStream(stream))?;
        let s = &mut self.streams[i];
        if !s.head_sent || s.send_done {
            return Err(SendError::NoHead(stream));
        }
        let room = s.send_window.min(self.send_window).max(0) as usize;
        let n = data.len().min(room);
        let max = self.peer_max_frame as usize;
        let end = end_stream && n == data.len();
        if n == 0 && !end {
            s.blocked = !data.is_empty();
            return Ok(0);
        }
        let mut sent = 0;
        loop {
            let len = (n - sent).min(max);
            let last = sent + len == n;
            h2frame::write_data_head(&mut self.out, stream, len, end && last);
            self.out.extend_from_slice(&data[sent..sent + len]);
            sent += len;
            if last {
                break;
            }
        }
        s.send_window -= n as i64;
        self.send_window -= n as i64;
        if n < data.len() {
            s.blocked = true;
        }
        if end {
            self.end_send(i);
        }
        Ok(n)
    }

    /// The proxy's side ended. A server's stream goes, and if the request
    /// has not ended the client is asked to stop sending (RFC 9113 §8.1); a
    /// client's goes once the response has ended too.
    fn end_send(&mut self, i: usize) {
        self.streams[i].send_done = true;
        match self.role {
            Role::Server => {
                self.pending_resets = self.pending_resets.saturating_sub(1);
                if let Some(s) = self.remove(i)
                    && !s.recv_done
                {
                    h2frame::write_rst_stream(&mut self.out, s.id, Reason::NoError);
                    self.remember_reset(s.id);
                }
            }
            Role::Client if self.streams[i].recv_done => {
                self.remove(i);
            }
            Role::Client => {}
        }
    }

    /// Resets a stream the proxy gives up on (`INTERNAL_ERROR` when its
    /// endpoint failed mid-response, `CANCEL`, ...).
    pub fn reset(&mut self, stream: u32, reason: Reason) {
        if let Some(i) = self.find(stream) {
            self.remove(i);
            h2frame::write_rst_stream(&mut self.out, stream, reason);
            self.remember_reset(stream);
        }
    }

    /// Sends a PING to be answered; false while one is unanswered.
    pub fn ping(&mut self, data: [u8; 8]) -> bool {
        if self.ping.is_some() {
            return false;
        }
        self.ping = Some(data);
        h2frame::write_ping(&mut self.out, data, false);
        true
    }

    /// A PING sent is still unanswered.
    pub fn ping_pending(&self) -> bool {
        self.ping.is_some()
    }

    /// Starts the graceful close: GOAWAY with the last stream taken; the
    /// open ones finish, new ones are ignored.
    pub fn shutdown(&mut self) {
        if !self.goaway_sent && self.closed.is_none() {
            let last = self.peer_last_stream();
            h2frame::write_goaway(&mut self.out, last, Reason::NoError);
            self.goaway_sent = true;
        }
    }
}

fn hpack_why(e: hpack::HpackError) -> &'static str {
    match e {
        hpack::HpackError::Truncated => "header block ends inside a field",
        hpack::HpackError::IntegerOverflow => "HPACK integer too long",
        hpack::HpackError::BadIndex(_) => "HPACK index in neither table",
        hpack::HpackError::Huffman => "invalid Huffman string",
        hpack::HpackError::TableSize(_) => "HPACK table size above the limit",
        hpack::HpackError::LateSizeUpdate => "HPACK table size update after a field",
    }
}

fn is_connection_specific(name: &[u8]) -> bool {
    // By length first: most names are none of these.
    matches!(name.len(), 7 | 10 | 16 | 17)
        && (name.eq_ignore_ascii_case(b"connection")
            || name.eq_ignore_ascii_case(b"keep-alive")
            || name.eq_ignore_ascii_case(b"proxy-connection")
            || name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"upgrade"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::h2frame::{Head as FrameHead, flag, kind};
    use proptest::prelude::*;

    #[derive(Debug, PartialEq, Eq)]
    enum Ev {
        Request(u32, Vec<(String, String)>, bool),
        Response(u32, u16, Vec<(String, String)>, bool),
        Data(u32, Vec<u8>, bool),
        Trailers(u32, Vec<(String, String)>),
        Reset(u32, u32),
        Writable(u32),
    }

    impl Ev {
        /// A request's fields.
        fn fields(self) -> Vec<(String, String)> {
            match self {
                Ev::Request(_, f, _) => f,
                _ => Vec::new(),
            }
        }
    }

    fn text(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    #[derive(Default)]
    struct Events(Vec<Ev>);

    impl Handler for Events {
        fn request(&mut self, stream: u32, head: &Head, end_stream: bool) {
            // Every part a head hands out is found again in its bytes.
            let parts = head.fields().flat_map(|(n, v)| [n, v]).chain(head.authority()).chain(head.path());
            for part in parts.chain([head.method()]) {
                assert_eq!(&head.bytes()[head.range_of(part)], part);
            }
            assert_eq!(head.range_of(b"elsewhere"), 0..0);
            let mut f = vec![(":method".to_owned(), text(head.method()))];
            f.extend(head.path().map(|p| (":path".to_owned(), text(p))));
            f.extend(head.fields().map(|(n, v)| (text(n), text(v))));
            self.0.push(Ev::Request(stream, f, end_stream));
        }
        fn response(&mut self, stream: u32, status: u16, head: &Head, end_stream: bool) {
            self.0.push(Ev::Response(
                stream,
                status,
                head.fields().map(|(n, v)| (text(n), text(v))).collect(),
                end_stream,
            ));
        }
        fn data(&mut self, stream: u32, data: &[u8], end_stream: bool) {
            self.0.push(Ev::Data(stream, data.to_vec(), end_stream));
        }
        fn trailers(&mut self, stream: u32, head: &Head) {
            self.0.push(Ev::Trailers(stream, head.fields().map(|(n, v)| (text(n), text(v))).collect()));
        }
        fn reset(&mut self, stream: u32, code: u32) {
            self.0.push(Ev::Reset(stream, code));
        }
        fn writable(&mut self, stream: u32) {
            self.0.push(Ev::Writable(stream));
        }
    }

    /// A client writing frames by hand, its own HPACK encoder in step.
    struct Client {
        enc: hpack::Encoder,
        dec: hpack::Decoder,
        buf: Vec<u8>,
    }

    impl Client {
        fn new() -> Self {
            let mut buf = h2frame::PREFACE.to_vec();
            h2frame::write_settings(&mut buf, &[]);
            Self { enc: hpack::Encoder::default(), dec: hpack::Decoder::default(), buf }
        }
        fn block(&mut self, fields: &[(&str, &str)]) -> Vec<u8> {
            let mut block = Vec::new();
            self.enc.begin(hpack::Block::Request, &mut block);
            for (n, v) in fields {
                if n.bytes().any(|b| b.is_ascii_uppercase()) {
                    // What the encoder would lowercase: a literal written by hand.
                    block.push(0);
                    for s in [n, v] {
                        block.push(s.len() as u8);
                        block.extend_from_slice(s.as_bytes());
                    }
                } else {
                    self.enc.field(n.as_bytes(), v.as_bytes(), &mut block);
                }
            }
            block
        }
        fn headers(&mut self, stream: u32, fields: &[(&str, &str)], end_stream: bool) {
            let block = self.block(fields);
            h2frame::write_headers(&mut self.buf, stream, &block, end_stream, 16_384);
        }
        fn data(&mut self, stream: u32, data: &[u8], end_stream: bool) {
            h2frame::write_data_head(&mut self.buf, stream, data.len(), end_stream);
            self.buf.extend_from_slice(data);
        }
        fn raw(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
            FrameHead { len: payload.len() as u32, kind, flags, stream }.write(&mut self.buf);
            self.buf.extend_from_slice(payload);
        }
        /// A response head the server wrote, decoded.
        fn fields(&mut self, block: &[u8]) -> Vec<(String, String)> {
            let mut out = Vec::new();
            self.dec.decode(block, |f| out.push((text(f.name), text(f.value)))).expect("a valid block");
            out
        }
    }

    fn get(path: &str) -> Vec<(&'static str, String)> {
        vec![(":method", "GET".into()), (":scheme", "http".into()), (":authority", "a".into()), (":path", path.into())]
    }

    fn with<'a>(base: &'a [(&'static str, String)], extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        base.iter().map(|(n, v)| (*n, v.as_str())).chain(extra.iter().copied()).collect()
    }

    /// A frame the server wrote: its header and payload.
    type Out = (FrameHead, Vec<u8>);

    /// Feeds the client's bytes to the server: the events, the result, and
    /// the frames the server wrote.
    fn run(conn: &mut Conn, c: &mut Client) -> (Vec<Ev>, Result<(), ConnError>, Vec<Out>) {
        let mut ev = Events::default();
        let r = conn.recv(&c.buf, &mut ev).map(|n| assert_eq!(n, c.buf.len(), "a frame left unread"));
        c.buf.clear();
        (ev.0, r, written(conn))
    }

    fn written(conn: &mut Conn) -> Vec<Out> {
        let out = std::mem::take(conn.output());
        let mut rest = &out[..];
        let mut frames = Vec::new();
        while let Some((head, payload, next)) = h2frame::split(rest, h2frame::MAX_FRAME_SIZE_LIMIT).expect("valid") {
            frames.push((head, payload.to_vec()));
            rest = next;
        }
        assert!(rest.is_empty());
        frames
    }

    fn kinds(frames: &[Out]) -> Vec<(u8, u32)> {
        frames.iter().map(|(h, _)| (h.kind, h.stream)).collect()
    }

    /// The code of the RST_STREAM or GOAWAY among `frames`.
    fn code(frames: &[Out], of: u8) -> Option<u32> {
        frames.iter().find(|(h, _)| h.kind == of).map(|(h, p)| {
            let at = if h.kind == kind::GOAWAY { 4 } else { 0 };
            u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]])
        })
    }

    /// A connection past the handshake.
    fn open(cfg: Config) -> (Conn, Client) {
        let mut conn = Conn::server(cfg);
        let mut c = Client::new();
        let (ev, r, frames) = run(&mut conn, &mut c);
        assert_eq!((ev, r), (vec![], Ok(())));
        assert!(frames.iter().any(|(h, _)| h.kind == kind::SETTINGS && h.flags & flag::ACK != 0));
        (conn, c)
    }

    #[test]
    fn the_same_block_decodes_to_the_same_head_only_while_the_table_is_unchanged() {
        let (mut conn, mut c) = open(Config::default());
        // GET http://a/, the authority a literal that leaves the table alone.
        let base = [0x82, 0x86, 0x84, 0x01, 0x01, b'a'];
        let block = |extra: &[u8]| [&base[..], extra].concat();
        let insert = |n: &str, v: &str| [&[0x40, n.len() as u8], n.as_bytes(), &[v.len() as u8], v.as_bytes()].concat();
        let request = |stream, f: &[(&str, &str)]| {
            let mut all = vec![(":method".to_owned(), "GET".to_owned()), (":path".to_owned(), "/".to_owned())];
            all.extend(f.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())));
            Ev::Request(stream, all, true)
        };
        let send = |c: &mut Client, stream, b: &[u8], end| h2frame::write_headers(&mut c.buf, stream, b, end, 16_384);
        // Index 62 is `x-a: 1`, then named twice by the same bytes.
        send(&mut c, 1, &block(&insert("x-a", "1")), true);
        send(&mut c, 3, &block(&[0xbe]), true);
        send(&mut c, 5, &block(&[0xbe]), true);
        // Trailers insert `x-b: 2`: the same bytes as stream 5's now name it.
        send(&mut c, 7, &block(&[0xbe]), false);
        send(&mut c, 7, &insert("x-b", "2"), true);
        send(&mut c, 9, &block(&[0xbe]), true);
        // A block that inserts, sent again, inserts again: 65 is `x-a: 1`.
        send(&mut c, 11, &block(&insert("x-c", "3")), true);
        send(&mut c, 13, &block(&insert("x-c", "3")), true);
        send(&mut c, 15, &block(&[0xc1]), true);
        let (ev, r, _) = run(&mut conn, &mut c);
        assert_eq!(r, Ok(()));
        assert_eq!(
            ev,
            [
                request(1, &[("x-a", "1")]),
                request(3, &[("x-a", "1")]),
                request(5, &[("x-a", "1")]),
                Ev::Request(7, request(7, &[("x-a", "1")]).fields(), false),
                Ev::Trailers(7, vec![("x-b".to_owned(), "2".to_owned())]),
                request(9, &[("x-b", "2")]),
                request(11, &[("x-c", "3")]),
                request(13, &[("x-c", "3")]),
                request(15, &[("x-a", "1")]),
            ]
        );
        // A malformed head is refused each time its bytes come again.
        let bad = block(&[0x00, 10, b'c', b'o', b'n', b'n', b'e', b'c', b't', b'i', b'o', b'n', 1, b'x']);
        for stream in [17, 19] {
            send(&mut c, stream, &bad, true);
            let (ev, r, frames) = run(&mut conn, &mut c);
            assert_eq!((ev, r), (vec![], Ok(())));
            assert_eq!(code(&frames, kind::RST_STREAM), Some(Reason::ProtocolError.code()), "stream {stream}");
        }
        // Trailers are remembered apart from heads: the same bytes as a
        // trailer block, then a request head the same as the last one.
        send(&mut c, 21, &block(&[0xbe]), false);
        send(&mut c, 21, &[0xbe], true);
        send(&mut c, 23, &block(&[0xbe]), true);
        send(&mut c, 25, &[0xbe], true);
        let (ev, r, frames) = run(&mut conn, &mut c);
        assert_eq!(r, Ok(()));
        assert_eq!(
            ev[..3],
            [
                Ev::Request(21, request(21, &[("x-c", "3")]).fields(), false),
                Ev::Trailers(21, vec![("x-c".to_owned(), "3".to_owned())]),
                request(23, &[("x-c", "3")]),
            ]
        );
        // A head with no pseudo-header is no request, remembered or not.
        assert_eq!(code(&frames, kind::RST_STREAM), Some(Reason::ProtocolError.code()));
    }

    #[test]
    fn a_request_and_its_response_go_through_after_the_settings() {
        let mut conn = Conn::server(Config::default());
        let settings = written(&mut conn);
        assert_eq!(kinds(&settings), [(kind::SETTINGS, 0), (kind::WINDOW_UPDATE, 0)]);
        let mut c = Client::new();
        c.headers(1, &with(&get("/a?b"), &[("user-agent", "t"), ("cookie", "a=1"), ("cookie", "b=2")]), true);
        let (ev, r, frames) = run(&mut conn, &mut c);
        assert_eq!(r, Ok(()));
        assert_eq!(kinds(&frames), [(kind::SETTINGS, 0)]);
        let want: Vec<(String, String)> =
            [(":method", "GET"), (":path", "/a?b"), ("user-agent", "t"), ("cookie", "a=1"), ("cookie", "b=2")]
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect();
        assert_eq!(ev, [Ev::Request(1, want, true)]);
        conn.send_response(1, 200, [(&b"Content-Type"[..], &b"text/plain"[..]), (b"Connection", b"close")], false)
            .unwrap();
        assert_eq!(conn.send_data(1, b"hello", true), Ok(5));
        let frames = written(&mut conn);
        assert_eq!(kinds(&frames), [(kind::HEADERS, 1), (kind::DATA, 1)]);
        let head = c.fields(&frames[0].1);
        assert_eq!(
            head,
            [(":status".to_owned(), "200".to_owned()), ("content-type".to_owned(), "text/plain".to_owned())]
        );
        assert_eq!((frames[1].0.flags, &frames[1].1[..]), (flag::END_STREAM, &b"hello"[..]));
        assert_eq!(conn.streams(), 0);
        assert_eq!(conn.send_data(1, b"late", true), Err(SendError::NoStream(1)));
    }

    #[test]
    fn a_body_counts_against_both_windows_and_goes_back_when_released() {
        let cfg = Config { stream_window: 100_000, connection_window: 400_000, ..Config::default() };
        let (mut conn, mut c) = open(cfg);
        c.headers(1, &with(&get("/"), &[]), false);
        c.data(1, &[7; 16_384], false);
        let (ev, r, frames) = run(&mut conn, &mut c);
        assert_eq!((ev.len(), r, frames.len()), (2, Ok(()), 0));
        // Half the stream's window consumed: both windows are topped up.
        conn.release(1, 16_384);
        assert!(written(&mut conn).is_empty());
        conn.release(1, 40_000);
        let frames = written(&mut conn);
        assert_eq!(kinds(&frames), [(kind::WINDOW_UPDATE, 1)]);
        // The client goes past the stream's window: its stream is reset.
        let mut c2 = Client { buf: Vec::new(), ..c };
        for _ in 0..9 {
            c2.data(1, &[7; 16_384], false);
        }
        let (ev, r, frames) = run(&mut conn, &mut c2);
        assert_eq!(r, Ok(()));
        assert_eq!(ev.last(), Some(&Ev::Reset(1, Reason::FlowControlError.code())));
        assert_eq!(code(&frames, kind::RST_STREAM), Some(Reason::FlowControlError.code()));
        // A body that does not match its Content-Length is malformed.
        c2.headers(3, &with(&get("/"), &[("content-length", "5")]), false);
        c2.data(3, b"abc", true);
        let (ev, _, frames) = run(&mut conn, &mut c2);
        assert_eq!(ev.last(), Some(&Ev::Reset(3, Reason::ProtocolError.code())));
        assert_eq!(code(&frames, kind::RST_STREAM), Some(Reason::ProtocolError.code()));
    }

    #[test]
    fn the_connection_window_is_shared_and_overrunning_it_ends_the_connection() {
        let cfg = Config { stream_window: 65_535, connection_window: 65_535, ..Config::default() };
        let (mut conn, mut c) = open(cfg);
        for s in [1, 3, 5] {
            c.headers(s, &with(&get("/"), &[]), false);
            c.data(s, &[0; 16_384], false);
            c.data(s, &[0; 8_000], false);
        }
        let (_, r, frames) = run(&mut conn, &mut c);
        assert_eq!(r.map_err(|e| e.reason), Err(Reason::FlowControlError));
        assert_eq!(code(&frames, kind::GOAWAY), Some(Reason::FlowControlError.code()));
        assert!(conn.is_done());
    }

    #[test]
    fn a_response_waits_for_the_clients_windows() {
        let (mut conn, mut c) = open(Config::default());
        h2frame::write_settings(&mut c.buf, &[(setting::INITIAL_WINDOW_SIZE, 10), (setting::MAX_FRAME_SIZE, 16_384)]);
        c.headers(1, &with(&get("/"), &[]), true);
        c.headers(3, &with(&get("/"), &[]), true);
        assert_eq!(run(&mut conn, &mut c).1, Ok(()));
        conn.send_response(1, 200, [], false).unwrap();
        assert_eq!(conn.send_data(1, &[1; 25], true), Ok(10));
        assert_eq!(conn.send_data(1, &[1; 15], true), Ok(0));
        let frames = written(&mut conn);
        assert_eq!(kinds(&frames), [(kind::HEADERS, 1), (kind::DATA, 1)]);
        assert_eq!(frames[1].1.len(), 10);
        // The stream's window opens: the stream is told, and goes on.
        h2frame::write_window_update(&mut c.buf, 1, 100);
        let (ev, _, _) = run(&mut conn, &mut c);
        assert_eq!(ev, [Ev::Writable(1)]);
        assert_eq!(conn.send_data(1, &[1; 15], true), Ok(15));
        // A larger initial window opens stream 3 too.
        conn.send_response(3, 200, [], false).unwrap();
        assert_eq!(conn.send_data(3, &[1; 30], false), Ok(10));
        h2frame::write_settings(&mut c.buf, &[(setting::INITIAL_WINDOW_SIZE, 40)]);
        let (ev, _, _) = run(&mut conn, &mut c);
        assert_eq!(ev, [Ev::Writable(3)]);
        assert_eq!(conn.send_data(3, &[1; 30], false), Ok(30));
        // The connection's window (65,535 at first) bounds every stream.
        h2frame::write_settings(&mut c.buf, &[(setting::INITIAL_WINDOW_SIZE, 1 << 20)]);
        assert_eq!(run(&mut conn, &mut c).1, Ok(()));
        let sent: usize = (0..3).map(|_| conn.send_data(3, &[1; 40_000], false).unwrap()).sum();
        assert_eq!(sent, 65_535 - 10 - 15 - 10 - 30);
        let frames = written(&mut conn);
        assert!(frames.iter().all(|(h, _)| h.len <= 16_384));
        // A window pushed past 2^31-1 resets the stream.
        h2frame::write_window_update(&mut c.buf, 3, h2frame::MAX_WINDOW);
        let (ev, _, frames) = run(&mut conn, &mut c);
        assert_eq!(ev, [Ev::Reset(3, Reason::FlowControlError.code())]);
        assert_eq!(code(&frames, kind::RST_STREAM), Some(Reason::FlowControlError.code()));
    }

    #[test]
    fn malformed_requests_reset_their_stream_and_the_next_one_is_served() {
        let cases: [&[(&str, &str)]; 14] = [
            &[(":method", "GET"), (":scheme", "http"), (":path", "/"), ("X-Upper", "1")],
            &[(":method", "GET"), (":scheme", "http"), (":path", "/"), ("connection", "keep-alive")],
            &[(":method", "GET"), (":scheme", "http"), (":path", "/"), ("transfer-encoding", "chunked")],
            &[(":method", "GET"), (":scheme", "http"), (":path", "/"), ("te", "gzip")],
            &[(":method", "GET"), (":scheme", "http")],
            &[(":method", "GET"), (":path", "/")],
            &[(":scheme", "http"), (":path", "/")],
            &[(":method", "GET"), ("x", "1"), (":scheme", "http"), (":path", "/")],
            &[(":method", "GET"), (":method", "GET"), (":scheme", "http"), (":path", "/")],
            &[(":method", "GET"), (":scheme", "http"), (":path", "/"), (":status", "200")],
            &[(":method", "GET"), (":scheme", "http"), (":path", "/"), ("x", " padded")],
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("content-length", "1"),
                ("content-length", "2"),
            ],
            &[(":method", "CONNECT"), (":authority", "a:1"), (":path", "/")],
            &[(":method", "GET"), (":scheme", "http"), (":path", "/"), ("content-length", "5")],
        ];
        let (mut conn, mut c) = open(Config::default());
        let mut stream = 1;
        for case in cases {
            c.headers(stream, case, true);
            let (ev, r, frames) = run(&mut conn, &mut c);
            assert_eq!(r, Ok(()), "{case:?}");
            assert!(!ev.iter().any(|e| matches!(e, Ev::Request(..))), "{case:?} taken: {ev:?}");
            assert_eq!(code(&frames, kind::RST_STREAM), Some(Reason::ProtocolError.code()), "{case:?}");
            stream += 2;
        }
        c.headers(stream, &with(&get("/ok"), &[("x-after", "malformed")]), true);
        let (ev, _, _) = run(&mut conn, &mut c);
        assert!(
            matches!(&ev[..], [Ev::Request(s, f, true)] if *s == stream && f.contains(&("x-after".into(), "malformed".into())))
        );
        // A value with a NUL byte is refused too.
        let mut block = Vec::new();
        let mut enc = std::mem::take(&mut c.enc);
        enc.begin(hpack::Block::Request, &mut block);
        for (n, v) in [(&b":method"[..], &b"GET"[..]), (b":scheme", b"http"), (b":path", b"/"), (b"x", b"a\0b")] {
            enc.field(n, v, &mut block);
        }
        c.enc = enc;
        h2frame::write_headers(&mut c.buf, stream + 2, &block, true, 16_384);
        let (_, _, frames) = run(&mut conn, &mut c);
        assert_eq!(code(&frames, kind::RST_STREAM), Some(Reason::ProtocolError.code()));
    }

    #[test]
    fn values_are_checked_in_one_pass_that_also_notes_control_bytes() {
        let cases: [(&[u8], bool, bool); 10] = [
            (b"plain", false, false),
            (b"a\tb", false, false),
            (b"", false, false),
            (b"a\x01b", false, true),
            (b"a\x7fb", false, true),
            (b"a\rb", true, true),
            (b"a\nb", true, true),
            (b"a\0b", true, true),
            (b" a", true, false),
            (b"a\t", true, false),
        ];
        for (value, malformed, controls) in cases {
            for pseudo in [false, true] {
                let mut head = Head { limit: 1 << 16, ..Head::default() };
                let name: &[u8] = if pseudo { b":path" } else { b"x-value" };
                head.take(Field { name, value, never_indexed: false }, false);
                assert_eq!(head.malformed.is_some(), malformed, "{value:?}");
                assert_eq!(head.has_controls(), controls, "{value:?}");
                head.clear();
                assert!(!head.has_controls() && head.malformed.is_none());
            }
        }
    }

    #[test]
    fn header_blocks_join_across_continuations_and_trailers_end_the_request() {
        let (mut conn, mut c) = open(Config::default());
        let long = "v".repeat(3000);
        let base = get("/");
        let fields = with(&base, &[("x-long", &long), ("te", "trailers")]);
        let block = c.block(&fields);
        let (a, b) = block.split_at(block.len() / 2);
        c.raw(kind::HEADERS, 0, 1, a);
        c.raw(kind::CONTINUATION, 0, 1, &b[..10]);
        c.raw(kind::CONTINUATION, flag::END_HEADERS, 1, &b[10..]);
        c.data(1, b"body", false);
        c.headers(1, &[("grpc-timeout", "1S")], true);
        let (ev, r, _) = run(&mut conn, &mut c);
        assert_eq!(r, Ok(()));
        assert!(matches!(&ev[0], Ev::Request(1, f, false) if f.iter().any(|(n, v)| n == "x-long" && v.len() == 3000)));
        assert_eq!(ev[1], Ev::Data(1, b"body".to_vec(), false));
        assert_eq!(ev[2], Ev::Trailers(1, vec![("grpc-timeout".into(), "1S".into())]));
        // Anything between HEADERS and its CONTINUATION ends the connection.
        let block = c.block(&with(&get("/"), &[]));
        c.raw(kind::HEADERS, 0, 3, &block);
        h2frame::write_ping(&mut c.buf, [0; 8], false);
        let (_, r, frames) = run(&mut conn, &mut c);
        assert_eq!(r.map_err(|e| e.reason), Err(Reason::ProtocolError));
        assert_eq!(code(&frames, kind::GOAWAY), Some(Reason::ProtocolError.code()));
    }

    #[test]
    fn limits_answer_431_refuse_streams_and_end_floods() {
        let cfg = Config { max_concurrent_streams: 2, max_header_list_size: 1000, ..Config::default() };
        let (mut conn, mut c) = open(cfg);
        let big = "x".repeat(1000);
        c.headers(1, &with(&get("/"), &[("x-big", &big)]), true);
        let (ev, _, frames) = run(&mut conn, &mut c);
        assert!(ev.is_empty());
        assert_eq!(kinds(&frames), [(kind::HEADERS, 1)]);
        assert_eq!(c.fields(&frames[0].1), [(":status".to_owned(), "431".to_owned())]);
        for s in [3, 5, 7] {
            c.headers(s, &with(&get("/"), &[]), true);
        }
        let (ev, _, frames) = run(&mut conn, &mut c);
        assert_eq!(ev.len(), 2);
        assert_eq!(kinds(&frames), [(kind::RST_STREAM, 7)]);
        assert_eq!(code(&frames, kind::RST_STREAM), Some(Reason::RefusedStream.code()));
        // A small block of indexed fields naming a large table entry
        // (an HPACK bomb): answered 431, with no more than the limit kept.
        conn.send_response(3, 200, [], true).unwrap();
        conn.send_response(5, 200, [], true).unwrap();
        for (_, block) in written(&mut conn) {
            c.fields(&block);
        }
        let mut block = c.block(&with(&get("/"), &[]));
        // `x-entry: y…` (900 bytes) inserted in the table (a literal with
        // incremental indexing, which the proxy's encoder never sends), then
        // named again and again (index 62).
        block.extend_from_slice(&[0x40, 7]);
        block.extend_from_slice(b"x-entry");
        block.extend_from_slice(&[0x7f, 0x85, 0x06]);
        block.extend(std::iter::repeat_n(b'y', 900));
        block.extend(std::iter::repeat_n(0xbe, 2000));
        h2frame::write_headers(&mut c.buf, 9, &block, true, 16_384);
        let (ev, r, frames) = run(&mut conn, &mut c);
        assert_eq!((ev, r), (vec![], Ok(())));
        assert_eq!(kinds(&frames), [(kind::HEADERS, 9)], "{frames:?}");
        assert_eq!(c.fields(&frames[0].1), [(":status".to_owned(), "431".to_owned())]);
        assert!(conn.heads[HEAD].bytes.len() <= 1000, "{} bytes kept", conn.heads[HEAD].bytes.len());
        // CONTINUATION flood: the block outgrows twice the limit.
        let block = c.block(&with(&get("/"), &[]));
        c.raw(kind::HEADERS, 0, 11, &block);
        for _ in 0..3 {
            c.raw(kind::CONTINUATION, 0, 11, &[0x82; 16_000]);
        }
        let (_, r, frames) = run(&mut conn, &mut c);
        assert_eq!(r.map_err(|e| e.reason), Err(Reason::EnhanceYourCalm));
        assert_eq!(code(&frames, kind::GOAWAY), Some(Reason::EnhanceYourCalm.code()));
    }

    #[test]
    fn rapid_resets_end_the_connection_and_answered_streams_earn_their_credit_back() {
        let (mut conn, mut c) = open(Config::default());
        // Answered streams make up for the ones reset.
        for i in 0..100u32 {
            let s = 2 * i + 1;
            c.headers(s, &with(&get("/"), &[]), true);
            if i % 2 == 0 {
                h2frame::write_rst_stream(&mut c.buf, s, Reason::Cancel);
                assert_eq!(run(&mut conn, &mut c).1, Ok(()));
            } else {
                assert_eq!(run(&mut conn, &mut c).1, Ok(()));
                conn.send_response(s, 200, [], true).unwrap();
            }
        }
        for i in 100..200u32 {
            c.headers(2 * i + 1, &with(&get("/"), &[]), true);
            h2frame::write_rst_stream(&mut c.buf, 2 * i + 1, Reason::Cancel);
        }
        let (ev, r, frames) = run(&mut conn, &mut c);
        assert_eq!(r.map_err(|e| e.reason), Err(Reason::EnhanceYourCalm));
        assert_eq!(ev.iter().filter(|e| matches!(e, Ev::Request(..))).count(), 33);
        assert_eq!(code(&frames, kind::GOAWAY), Some(Reason::EnhanceYourCalm.code()));
    }

    #[test]
    fn protocol_errors_end_the_connection_with_their_code() {
        type Case = (&'static str, Box<dyn Fn(&mut Client)>, Reason);
        let cases: Vec<Case> = vec![
            ("even stream", Box::new(|c| c.headers(2, &with(&get("/"), &[]), true)), Reason::ProtocolError),
            (
                "decreasing stream",
                Box::new(|c| {
                    c.headers(5, &with(&get("/"), &[]), true);
                    c.headers(3, &with(&get("/"), &[]), true);
                }),
                Reason::StreamClosed,
            ),
            ("DATA on an idle stream", Box::new(|c| c.data(1, b"x", true)), Reason::ProtocolError),
            (
                "DATA on a stream that ended",
                Box::new(|c| {
                    c.headers(1, &with(&get("/"), &[]), true);
                    c.data(1, b"x", true);
                }),
                Reason::ProtocolError,
            ),
            ("bad HPACK", Box::new(|c| c.raw(kind::HEADERS, flag::END_HEADERS, 1, &[0xbf])), Reason::CompressionError),
            (
                "CONTINUATION alone",
                Box::new(|c| c.raw(kind::CONTINUATION, flag::END_HEADERS, 1, &[0x82])),
                Reason::ProtocolError,
            ),
            (
                "RST_STREAM on an idle stream",
                Box::new(|c| h2frame::write_rst_stream(&mut c.buf, 9, Reason::Cancel)),
                Reason::ProtocolError,
            ),
            (
                "connection window past 2^31-1",
                Box::new(|c| h2frame::write_window_update(&mut c.buf, 0, h2frame::MAX_WINDOW)),
                Reason::FlowControlError,
            ),
            ("oversized frame", Box::new(|c| c.raw(kind::DATA, 0, 1, &[0; 16_385])), Reason::FrameSizeError),
            (
                "self-dependent HEADERS",
                Box::new(|c| c.raw(kind::HEADERS, flag::PRIORITY | flag::END_HEADERS, 1, &[0, 0, 0, 1, 0, 0x82])),
                Reason::ProtocolError,
            ),
        ];
        for (name, write, reason) in cases {
            let (mut conn, mut c) = open(Config::default());
            write(&mut c);
            let (_, r, frames) = run(&mut conn, &mut c);
            if name == "DATA on a stream that ended" {
                // Half-closed (remote): a stream error, the connection goes on.
                assert_eq!(r, Ok(()), "{name}");
                assert_eq!(code(&frames, kind::RST_STREAM), Some(Reason::StreamClosed.code()), "{name}");
                continue;
            }
            assert_eq!(r.map_err(|e| e.reason), Err(reason), "{name}");
            assert_eq!(code(&frames, kind::GOAWAY), Some(reason.code()), "{name}");
            assert!(conn.is_done(), "{name}");
        }
        // No preface, or a first frame that is not SETTINGS.
        let mut conn = Conn::server(Config::default());
        assert_eq!(
            conn.recv(b"GET / HTTP/1.1\r\n\r\n......", &mut Events::default()).map_err(|e| e.reason),
            Err(Reason::ProtocolError)
        );
        let mut conn = Conn::server(Config::default());
        assert_eq!(conn.recv(&h2frame::PREFACE[..10], &mut Events::default()), Ok(0));
        let mut bytes = h2frame::PREFACE.to_vec();
        h2frame::write_ping(&mut bytes, [0; 8], false);
        assert_eq!(conn.recv(&bytes, &mut Events::default()).map_err(|e| e.reason), Err(Reason::ProtocolError));
    }

    #[test]
    fn frames_on_a_stream_the_proxy_reset_are_ignored_and_their_window_given_back() {
        let cfg = Config { connection_window: 65_535, stream_window: 65_535, ..Config::default() };
        let (mut conn, mut c) = open(cfg);
        c.headers(1, &with(&get("/"), &[]), false);
        assert_eq!(run(&mut conn, &mut c).1, Ok(()));
        conn.reset(1, Reason::Cancel);
        assert_eq!(code(&written(&mut conn), kind::RST_STREAM), Some(Reason::Cancel.code()));
        for _ in 0..3 {
            c.data(1, &[0; 16_000], false);
        }
        c.headers(1, &[("x-trailer", "1")], true);
        h2frame::write_window_update(&mut c.buf, 1, 5);
        let (ev, r, frames) = run(&mut conn, &mut c);
        assert_eq!((ev, r), (vec![], Ok(())));
        // Half the connection's window came back.
        assert_eq!(kinds(&frames), [(kind::WINDOW_UPDATE, 0)]);
    }

    #[test]
    fn pings_are_answered_ours_tracked_and_shutdown_lets_streams_finish() {
        let (mut conn, mut c) = open(Config::default());
        h2frame::write_ping(&mut c.buf, [9; 8], false);
        c.headers(1, &with(&get("/"), &[]), true);
        let (_, _, frames) = run(&mut conn, &mut c);
        assert_eq!((frames[0].0.kind, frames[0].0.flags, &frames[0].1[..]), (kind::PING, flag::ACK, &[9u8; 8][..]));
        assert!(conn.ping([1; 8]));
        assert!(!conn.ping([2; 8]));
        written(&mut conn);
        h2frame::write_ping(&mut c.buf, [1; 8], true);
        assert_eq!(run(&mut conn, &mut c).1, Ok(()));
        assert!(!conn.ping_pending());
        conn.shutdown();
        assert_eq!(code(&written(&mut conn), kind::GOAWAY), Some(0));
        // A stream opened after the GOAWAY is ignored, its body too.
        c.headers(3, &with(&get("/"), &[]), false);
        c.data(3, b"ignored", true);
        let (ev, r, _) = run(&mut conn, &mut c);
        assert_eq!((ev, r), (vec![], Ok(())));
        assert!(!conn.is_done());
        conn.send_response(1, 204, [], true).unwrap();
        assert!(conn.is_done());
    }

    /// A client connection past the server's SETTINGS (`max_streams`).
    fn client(max_streams: u32) -> (Conn, Client) {
        let mut conn = Conn::client(Config::default());
        let start = std::mem::take(conn.output());
        assert!(start.starts_with(h2frame::PREFACE));
        let (head, payload, _) = h2frame::split(&start[24..], 16_384).unwrap().unwrap();
        let Ok(Frame::Settings { settings, .. }) = h2frame::parse(head, payload) else { panic!("no SETTINGS first") };
        assert_eq!(settings.enable_push, Some(false));
        let mut server = Client { enc: hpack::Encoder::default(), dec: hpack::Decoder::default(), buf: Vec::new() };
        h2frame::write_settings(&mut server.buf, &[(setting::MAX_CONCURRENT_STREAMS, max_streams)]);
        let (ev, r, frames) = run(&mut conn, &mut server);
        assert_eq!((ev, r), (vec![], Ok(())));
        assert_eq!(kinds(&frames), [(kind::SETTINGS, 0)]);
        (conn, server)
    }

    /// What the server sends, read by a client: response heads apart.
    fn feed(conn: &mut Conn, server: &mut Client) -> (Responses, Result<(), ConnError>, Vec<Out>) {
        let (ev, res, frames) = run(conn, server);
        let (heads, rest) = ev.into_iter().partition(|e| matches!(e, Ev::Response(..)));
        (Responses(heads, rest), res, frames)
    }

    struct Responses(Vec<Ev>, Vec<Ev>);

    #[test]
    fn a_client_sends_requests_and_reads_responses_past_1xx_heads() {
        let (mut conn, mut server) = client(2);
        let fields = [(&b"content-type"[..], &b"application/grpc"[..]), (b"te", b"trailers"), (b"connection", b"x")];
        let id = conn.send_request(b"POST", b"http", b"svc:50051", b"/pkg.S/M", fields, false).unwrap();
        assert_eq!(id, 1);
        assert_eq!(conn.send_data(1, b"abc", true), Ok(3));
        let frames = written(&mut conn);
        assert_eq!(kinds(&frames), [(kind::HEADERS, 1), (kind::DATA, 1)]);
        let head = server.fields(&frames[0].1);
        let names: Vec<&str> = head.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, [":method", ":scheme", ":authority", ":path", "content-type", "te"]);
        // A 100 is skipped; the 200, its body and trailers come through.
        server.headers(1, &[(":status", "100")], false);
        server.headers(1, &[(":status", "200"), ("content-type", "application/grpc"), ("content-length", "2")], false);
        server.data(1, b"ok", false);
        server.headers(1, &[("grpc-status", "0")], true);
        let (r, res, _) = feed(&mut conn, &mut server);
        assert_eq!(res, Ok(()));
        let want = vec![
            ("content-type".to_owned(), "application/grpc".to_owned()),
            ("content-length".to_owned(), "2".to_owned()),
        ];
        assert_eq!(r.0, [Ev::Response(1, 200, want, false)]);
        assert_eq!(
            r.1,
            [Ev::Data(1, b"ok".to_vec(), false), Ev::Trailers(1, vec![("grpc-status".into(), "0".into())])]
        );
        assert_eq!(conn.streams(), 0);
        // A HEAD's response names a length it has no body for.
        let id = conn.send_request(b"HEAD", b"http", b"a", b"/", [], true).unwrap();
        assert_eq!(id, 3);
        server.headers(3, &[(":status", "200"), ("content-length", "1234")], true);
        let (r, res, _) = feed(&mut conn, &mut server);
        assert_eq!((r.0.len(), r.1, res), (1, vec![], Ok(())));
        assert_eq!(conn.streams(), 0);
    }

    #[test]
    fn a_client_keeps_to_the_servers_stream_limit_and_its_goaway() {
        let (mut conn, mut server) = client(2);
        for _ in 0..2 {
            conn.send_request(b"GET", b"http", b"a", b"/", [], true).unwrap();
        }
        assert!(!conn.can_open());
        assert_eq!(conn.send_request(b"GET", b"http", b"a", b"/", [], true), Err(SendError::CannotOpen));
        // GOAWAY naming stream 1: stream 3 was not processed, and may be retried.
        h2frame::write_goaway(&mut server.buf, 1, Reason::NoError);
        let (r, res, _) = feed(&mut conn, &mut server);
        assert_eq!((r.1, res), (vec![Ev::Reset(3, Reason::RefusedStream.code())], Ok(())));
        assert!(!conn.can_open());
        server.headers(1, &[(":status", "204")], true);
        let (r, _, _) = feed(&mut conn, &mut server);
        assert_eq!(r.0.len(), 1);
        assert!(conn.is_done());
    }

    #[test]
    fn a_client_refuses_malformed_responses_and_streams_it_did_not_open() {
        let (mut conn, mut server) = client(10);
        for _ in 0..3 {
            conn.send_request(b"GET", b"http", b"a", b"/", [], true).unwrap();
        }
        written(&mut conn);
        server.headers(1, &[("content-type", "x")], true);
        server.headers(3, &[(":status", "200"), (":path", "/")], true);
        server.data(5, b"before its head", true);
        let (r, res, frames) = feed(&mut conn, &mut server);
        assert_eq!(res, Ok(()));
        let resets: Vec<_> = r.1.iter().filter(|e| matches!(e, Ev::Reset(_, 1))).collect();
        assert_eq!(resets.len(), 3, "{:?}", r.1);
        assert_eq!(kinds(&frames), [(kind::RST_STREAM, 1), (kind::RST_STREAM, 3), (kind::RST_STREAM, 5)]);
        // A server cannot open a stream (push is off).
        server.headers(7, &[(":status", "200")], true);
        let (_, res, frames) = feed(&mut conn, &mut server);
        assert_eq!(res.map_err(|e| e.reason), Err(Reason::ProtocolError));
        assert_eq!(code(&frames, kind::GOAWAY), Some(Reason::ProtocolError.code()));
    }

    /// One step of a near-valid client.
    #[derive(Debug, Clone)]
    enum Op {
        Headers {
            stream: u8,
            fields: u8,
            end: bool,
            split: bool,
        },
        Data {
            stream: u8,
            len: u16,
            end: bool,
            padded: bool,
        },
        Window {
            stream: u8,
            increment: u32,
        },
        Reset {
            stream: u8,
        },
        Settings {
            window: u32,
            frame: bool,
        },
        Ping,
        Priority {
            stream: u8,
        },
        /// The proxy answers the oldest open stream (head, some body, maybe the end).
        Answer {
            body: u16,
            end: bool,
        },
        /// The next frame written has one byte changed.
        Damage {
            at: u16,
            xor: u8,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..6, 0u8..6, any::<bool>(), any::<bool>()).prop_map(|(stream, fields, end, split)| Op::Headers { stream, fields, end, split }),
            4 => (0u8..6, 0u16..20_000, any::<bool>(), any::<bool>()).prop_map(|(stream, len, end, padded)| Op::Data { stream, len, end, padded }),
            2 => (0u8..6, prop_oneof![Just(1u32), Just(65_535), Just(1 << 30), 0u32..(1 << 31)]).prop_map(|(stream, increment)| Op::Window { stream, increment }),
            1 => (0u8..6).prop_map(|stream| Op::Reset { stream }),
            1 => (prop_oneof![Just(0u32), Just(1), Just(65_535), Just(1 << 20), Just(h2frame::MAX_WINDOW)], any::<bool>()).prop_map(|(window, frame)| Op::Settings { window, frame }),
            1 => Just(Op::Ping),
            1 => (0u8..6).prop_map(|stream| Op::Priority { stream }),
            3 => (0u16..40_000, any::<bool>()).prop_map(|(body, end)| Op::Answer { body, end }),
            1 => (any::<u16>(), 1u8..=255).prop_map(|(at, xor)| Op::Damage { at, xor }),
        ]
    }

    proptest! {
        /// Near-valid clients (streams opened, bodies, windows, resets,
        /// settings, split and damaged frames) against a proxy that answers:
        /// never a panic, only valid frames written, a connection error
        /// always ends the connection.
        #[test]
        fn near_valid_clients_get_valid_frames_and_no_panic(ops in prop::collection::vec(op(), 1..40)) {
            let cfg = Config { stream_window: 65_535, connection_window: 100_000, max_concurrent_streams: 4, ..Config::default() };
            let (mut conn, mut c) = open(cfg);
            let field_sets: [&[(&str, &str)]; 6] = [
                &[(":method", "GET"), (":scheme", "http"), (":authority", "a"), (":path", "/")],
                &[(":method", "POST"), (":scheme", "http"), (":authority", "a"), (":path", "/p"), ("content-length", "10")],
                &[(":method", "GET"), (":scheme", "http"), (":path", "/"), ("te", "trailers"), ("cookie", "a=1")],
                &[("grpc-status", "0")],
                &[(":method", "GET"), (":path", "/")],
                &[(":status", "200")],
            ];
            let mut damage: Option<(u16, u8)> = None;
            let mut left = Vec::new();
            for op in ops {
                let open_before: Vec<u32> = conn.streams.iter().map(|s| s.id).collect();
                let before = c.buf.len();
                let id = |s: u8| u32::from(s) * 2 + 1;
                match op {
                    Op::Headers { stream, fields, end, split } => {
                        let block = c.block(field_sets[usize::from(fields)]);
                        if split && block.len() > 1 {
                            let (a, b) = block.split_at(block.len() / 2);
                            c.raw(kind::HEADERS, if end { flag::END_STREAM } else { 0 }, id(stream), a);
                            c.raw(kind::CONTINUATION, flag::END_HEADERS, id(stream), b);
                        } else {
                            h2frame::write_headers(&mut c.buf, id(stream), &block, end, 16_384);
                        }
                    }
                    Op::Data { stream, len, end, padded } => {
                        let len = usize::from(len).min(16_000);
                        let mut payload = Vec::new();
                        if padded {
                            payload.push(7);
                        }
                        payload.resize(payload.len() + len, b'd');
                        if padded {
                            payload.extend_from_slice(&[0; 7]);
                        }
                        let flags = if end { flag::END_STREAM } else { 0 } | if padded { flag::PADDED } else { 0 };
                        c.raw(kind::DATA, flags, id(stream), &payload);
                    }
                    Op::Window { stream, increment } => {
                        let s = if stream == 0 { 0 } else { id(stream - 1) };
                        h2frame::write_window_update(&mut c.buf, s, increment.max(1));
                    }
                    Op::Reset { stream } => h2frame::write_rst_stream(&mut c.buf, id(stream), Reason::Cancel),
                    Op::Settings { window, frame } => {
                        let mut set = vec![(setting::INITIAL_WINDOW_SIZE, window)];
                        if frame {
                            set.push((setting::MAX_FRAME_SIZE, 20_000));
                        }
                        h2frame::write_settings(&mut c.buf, &set);
                    }
                    Op::Ping => h2frame::write_ping(&mut c.buf, [3; 8], false),
                    Op::Priority { stream } => c.raw(kind::PRIORITY, 0, id(stream), &[0, 0, 0, 0, 16]),
                    Op::Answer { body, end } => {
                        if let Some(s) = conn.streams.front().map(|s| s.id) {
                            let _ = conn.send_response(s, 200, [(&b"x"[..], &b"y"[..])], false);
                            let _ = conn.send_data(s, &vec![b'r'; usize::from(body)], end);
                        }
                    }
                    Op::Damage { at, xor } => damage = Some((at, xor)),
                }
                if let Some((at, xor)) = damage.filter(|_| c.buf.len() > before) {
                    let i = before + usize::from(at) % (c.buf.len() - before);
                    c.buf[i] ^= xor;
                    damage = None;
                }
                let mut ev = Events::default();
                match conn.recv(&c.buf, &mut ev) {
                    Ok(n) => {
                        c.buf.drain(..n);
                    }
                    Err(_) => {
                        prop_assert!(conn.is_done());
                        written(&mut conn);
                        break;
                    }
                }
                written(&mut conn);
                // The open streams stay in their ids' order (found by
                // halving), and every stream that leaves is listed once.
                prop_assert!(conn.streams.iter().zip(conn.streams.iter().skip(1)).all(|(a, b)| a.id < b.id));
                conn.left(&mut left);
                for id in &open_before {
                    prop_assert_eq!(conn.is_open(*id), !left.contains(id), "stream {}", id);
                }
                for id in &left {
                    prop_assert!(!conn.is_open(*id));
                    prop_assert_eq!(left.iter().filter(|l| *l == id).count(), 1);
                }
            }
        }
    }

    proptest! {
        #[test]
        fn any_frames_are_answered_with_valid_frames_and_no_panic(
            frames in prop::collection::vec((0u8..11, any::<u8>(), 0u32..8, prop::collection::vec(any::<u8>(), 0..40)), 0..30),
        ) {
            let (mut conn, mut c) = open(Config::default());
            c.headers(1, &with(&get("/"), &[]), false);
            for (kind, flags, stream, payload) in frames {
                c.raw(kind, flags, stream, &payload);
            }
            let mut ev = Events::default();
            let _ = conn.recv(&c.buf, &mut ev);
            let _ = conn.send_response(1, 200, [], false);
            let _ = conn.send_data(1, b"x", true);
            written(&mut conn);
        }
    }
}
