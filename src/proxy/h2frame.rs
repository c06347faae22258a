//! HTTP/2 frames (RFC 9113 §4 and §6) for the proxy's own HTTP/2 codec,
//! without I/O: a frame is split off a read buffer and parsed with its
//! payload borrowed, every rule of its type checked (stream identifier,
//! length, flags, padding, setting values), and frames are written straight
//! into an output buffer. What a frame's type alone makes invalid is a
//! [`FrameError`]: a connection error, or a stream error that leaves the
//! connection up. Rules that need the connection's state (stream states,
//! header blocks and their CONTINUATIONs, flow-control windows) belong to
//! the connection layer above.

/// What a client sends first (RFC 9113 §3.4), before its SETTINGS.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A frame header's length.
pub const HEAD_LEN: usize = 9;

/// `SETTINGS_MAX_FRAME_SIZE`'s initial value, and its smallest.
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 16_384;

/// The largest `SETTINGS_MAX_FRAME_SIZE` (2^24 - 1).
pub const MAX_FRAME_SIZE_LIMIT: u32 = (1 << 24) - 1;

/// `SETTINGS_INITIAL_WINDOW_SIZE`'s initial value, and the connection's window.
pub const DEFAULT_WINDOW: u32 = 65_535;

/// The largest flow-control window (2^31 - 1).
pub const MAX_WINDOW: u32 = (1 << 31) - 1;

/// Frame types.
pub mod kind {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const PRIORITY: u8 = 0x2;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PUSH_PROMISE: u8 = 0x5;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;
}

/// Frame flags.
pub mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

/// Setting identifiers (RFC 9113 §6.5.2, RFC 8441).
pub mod setting {
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    pub const ENABLE_PUSH: u16 = 0x2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub const MAX_FRAME_SIZE: u16 = 0x5;
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
    pub const ENABLE_CONNECT_PROTOCOL: u16 = 0x8;
}

/// Error codes (RFC 9113 §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Reason {
    NoError = 0x0,
    ProtocolError = 0x1,
    InternalError = 0x2,
    FlowControlError = 0x3,
    SettingsTimeout = 0x4,
    StreamClosed = 0x5,
    FrameSizeError = 0x6,
    RefusedStream = 0x7,
    Cancel = 0x8,
    CompressionError = 0x9,
    ConnectError = 0xa,
    EnhanceYourCalm = 0xb,
    InadequateSecurity = 0xc,
    Http11Required = 0xd,
}

impl Reason {
    pub fn code(self) -> u32 {
        self as u32
    }
}

/// A frame the peer sent that its type's rules refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The connection ends with GOAWAY carrying this code.
    #[error("connection error {0:?}: {1}")]
    Connection(Reason, &'static str),
    /// The stream is reset with this code; the connection goes on.
    #[error("stream {0} error {1:?}: {2}")]
    Stream(u32, Reason, &'static str),
}

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub len: u32,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl Head {
    pub fn parse(b: &[u8; HEAD_LEN]) -> Head {
        Head {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            kind: b[3],
            flags: b[4],
            // The reserved bit is ignored on receipt (RFC 9113 §4.1).
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        let len = self.len.to_be_bytes();
        out.extend_from_slice(&[len[1], len[2], len[3], self.kind, self.flags]);
        out.extend_from_slice(&(self.stream & 0x7fff_ffff).to_be_bytes());
    }
}

/// A frame's header, its payload, and the bytes after it.
pub type Split<'a> = (Head, &'a [u8], &'a [u8]);

/// Splits the first whole frame off `buf`: its header, its payload and the
/// bytes after it. `Ok(None)` while the frame is incomplete; a frame longer
/// than `max_frame_size` (the `SETTINGS_MAX_FRAME_SIZE` announced) is a
/// connection error as soon as its header is in (RFC 9113 §4.2), so a peer
/// cannot make the reader wait for, or hold, more than that.
pub fn split(buf: &[u8], max_frame_size: u32) -> Result<Option<Split<'_>>, FrameError> {
    let Some(head) = buf.first_chunk::<HEAD_LEN>() else { return Ok(None) };
    let head = Head::parse(head);
    if head.len > max_frame_size {
        return Err(FrameError::Connection(Reason::FrameSizeError, "frame larger than SETTINGS_MAX_FRAME_SIZE"));
    }
    let end = HEAD_LEN + head.len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some((head, &buf[HEAD_LEN..end], &buf[end..])))
}

/// A stream's priority (RFC 9113 §5.3.2, deprecated: parsed and ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Priority {
    pub dependency: u32,
    pub exclusive: bool,
    pub weight: u8,
}

/// The settings a SETTINGS frame changes; later values of one identifier
/// win, unknown identifiers are ignored (RFC 9113 §6.5.2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settings {
    pub header_table_size: Option<u32>,
    pub enable_push: Option<bool>,
    pub max_concurrent_streams: Option<u32>,
    pub initial_window_size: Option<u32>,
    pub max_frame_size: Option<u32>,
    pub max_header_list_size: Option<u32>,
    pub enable_connect_protocol: Option<bool>,
}

/// A frame, its payload borrowed from the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    Data {
        stream: u32,
        end_stream: bool,
        data: &'a [u8],
        /// The whole payload's length, padding included: what flow control counts.
        flow_len: u32,
    },
    Headers {
        stream: u32,
        end_stream: bool,
        end_headers: bool,
        priority: Option<Priority>,
        fragment: &'a [u8],
    },
    Priority {
        stream: u32,
        priority: Priority,
    },
    RstStream {
        stream: u32,
        code: u32,
    },
    Settings {
        ack: bool,
        settings: Settings,
    },
    Ping {
        ack: bool,
        data: [u8; 8],
    },
    GoAway {
        last_stream: u32,
        code: u32,
        debug: &'a [u8],
    },
    WindowUpdate {
        stream: u32,
        increment: u32,
    },
    Continuation {
        stream: u32,
        end_headers: bool,
        fragment: &'a [u8],
    },
    /// A frame of an unknown type: ignored (RFC 9113 §4.1, §5.5), except
    /// inside a header block, which the connection layer checks.
    Unknown {
        kind: u8,
        stream: u32,
    },
}

const fn conn(reason: Reason, why: &'static str) -> FrameError {
    FrameError::Connection(reason, why)
}

/// Takes the padding off a PADDED frame's payload.
fn unpad(flags: u8, payload: &[u8]) -> Result<&[u8], FrameError> {
    if flags & flag::PADDED == 0 {
        return Ok(payload);
    }
    let (&pad, rest) =
        payload.split_first().ok_or(conn(Reason::FrameSizeError, "padded frame without its pad length"))?;
    let pad = usize::from(pad);
    if pad > rest.len() {
        return Err(conn(Reason::ProtocolError, "padding longer than the payload"));
    }
    Ok(&rest[..rest.len() - pad])
}

fn priority_of(stream: u32, b: &[u8; 5]) -> Result<Priority, FrameError> {
    let dep = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let priority = Priority { dependency: dep & 0x7fff_ffff, exclusive: dep & 0x8000_0000 != 0, weight: b[4] };
    if priority.dependency == stream {
        return Err(FrameError::Stream(stream, Reason::ProtocolError, "stream depends on itself"));
    }
    Ok(priority)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses a frame split off by [`split`].
pub fn parse(head: Head, payload: &[u8]) -> Result<Frame<'_>, FrameError> {
    let stream = head.stream;
    let on_stream = || {
        if stream == 0 { Err(conn(Reason::ProtocolError, "frame needs a stream")) } else { Ok(()) }
    };
    let on_connection = || {
        if stream != 0 { Err(conn(Reason::ProtocolError, "connection frame on a stream")) } else { Ok(()) }
    };
    match head.kind {
        kind::DATA => {
            on_stream()?;
            Ok(Frame::Data {
                stream,
                end_stream: head.flags & flag::END_STREAM != 0,
                data: unpad(head.flags, payload)?,
                flow_len: head.len,
            })
        }
        kind::HEADERS => {
            on_stream()?;
            let mut block = unpad(head.flags, payload)?;
            let mut priority = None;
            if head.flags & flag::PRIORITY != 0 {
                let Some((p, rest)) = block.split_first_chunk::<5>() else {
                    return Err(conn(Reason::FrameSizeError, "HEADERS too short for its priority"));
                };
                priority = Some(priority_of(stream, p)?);
                block = rest;
            }
            Ok(Frame::Headers {
                stream,
                end_stream: head.flags & flag::END_STREAM != 0,
                end_headers: head.flags & flag::END_HEADERS != 0,
                priority,
                fragment: block,
            })
        }
        kind::PRIORITY => {
            on_stream()?;
            let Some(p) = payload.first_chunk::<5>().filter(|_| payload.len() == 5) else {
                return Err(FrameError::Stream(stream, Reason::FrameSizeError, "PRIORITY is five bytes"));
            };
            Ok(Frame::Priority { stream, priority: priority_of(stream, p)? })
        }
        kind::RST_STREAM => {
            on_stream()?;
            if payload.len() != 4 {
                return Err(conn(Reason::FrameSizeError, "RST_STREAM is four bytes"));
            }
            Ok(Frame::RstStream { stream, code: u32_at(payload, 0) })
        }
        kind::SETTINGS => {
            on_connection()?;
            let ack = head.flags & flag::ACK != 0;
            if ack && !payload.is_empty() {
                return Err(conn(Reason::FrameSizeError, "SETTINGS acknowledgement with a payload"));
            }
            if !payload.len().is_multiple_of(6) {
                return Err(conn(Reason::FrameSizeError, "SETTINGS not a multiple of six bytes"));
            }
            let mut settings = Settings::default();
            for s in payload.chunks_exact(6) {
                let value = u32_at(s, 2);
                match u16::from_be_bytes([s[0], s[1]]) {
                    setting::HEADER_TABLE_SIZE => settings.header_table_size = Some(value),
                    setting::ENABLE_PUSH if value > 1 => {
                        return Err(conn(Reason::ProtocolError, "ENABLE_PUSH not 0 or 1"));
                    }
                    setting::ENABLE_PUSH => settings.enable_push = Some(value == 1),
                    setting::MAX_CONCURRENT_STREAMS => settings.max_concurrent_streams = Some(value),
                    setting::INITIAL_WINDOW_SIZE if value > MAX_WINDOW => {
                        return Err(conn(Reason::FlowControlError, "INITIAL_WINDOW_SIZE above 2^31-1"));
                    }
                    setting::INITIAL_WINDOW_SIZE => settings.initial_window_size = Some(value),
                    setting::MAX_FRAME_SIZE if !(DEFAULT_MAX_FRAME_SIZE..=MAX_FRAME_SIZE_LIMIT).contains(&value) => {
                        return Err(conn(Reason::ProtocolError, "MAX_FRAME_SIZE outside 2^14..2^24-1"));
                    }
                    setting::MAX_FRAME_SIZE => settings.max_frame_size = Some(value),
                    setting::MAX_HEADER_LIST_SIZE => settings.max_header_list_size = Some(value),
                    setting::ENABLE_CONNECT_PROTOCOL if value > 1 => {
                        return Err(conn(Reason::ProtocolError, "ENABLE_CONNECT_PROTOCOL not 0 or 1"));
                    }
                    setting::ENABLE_CONNECT_PROTOCOL => settings.enable_connect_protocol = Some(value == 1),
                    _ => {}
                }
            }
            Ok(Frame::Settings { ack, settings })
        }
        // Push is never enabled towards the proxy (its SETTINGS say so as a
        // client; a server cannot be pushed to).
        kind::PUSH_PROMISE => Err(conn(Reason::ProtocolError, "PUSH_PROMISE")),
        kind::PING => {
            on_connection()?;
            let Some(data) = payload.first_chunk::<8>().filter(|_| payload.len() == 8) else {
                return Err(conn(Reason::FrameSizeError, "PING is eight bytes"));
            };
            Ok(Frame::Ping { ack: head.flags & flag::ACK != 0, data: *data })
        }
        kind::GOAWAY => {
            on_connection()?;
            if payload.len() < 8 {
                return Err(conn(Reason::FrameSizeError, "GOAWAY shorter than eight bytes"));
            }
            Ok(Frame::GoAway {
                last_stream: u32_at(payload, 0) & 0x7fff_ffff,
                code: u32_at(payload, 4),
                debug: &payload[8..],
            })
        }
        kind::WINDOW_UPDATE => {
            if payload.len() != 4 {
                return Err(conn(Reason::FrameSizeError, "WINDOW_UPDATE is four bytes"));
            }
            let increment = u32_at(payload, 0) & 0x7fff_ffff;
            if increment == 0 {
                return Err(match stream {
                    0 => conn(Reason::ProtocolError, "WINDOW_UPDATE of zero"),
                    s => FrameError::Stream(s, Reason::ProtocolError, "WINDOW_UPDATE of zero"),
                });
            }
            Ok(Frame::WindowUpdate { stream, increment })
        }
        kind::CONTINUATION => {
            on_stream()?;
            Ok(Frame::Continuation { stream, end_headers: head.flags & flag::END_HEADERS != 0, fragment: payload })
        }
        kind => Ok(Frame::Unknown { kind, stream }),
    }
}

// ---- Writing ----

fn head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    Head { len: len as u32, kind, flags, stream }.write(out);
}

/// A DATA frame's header; its `len` bytes of payload follow it.
pub fn write_data_head(out: &mut Vec<u8>, stream: u32, len: usize, end_stream: bool) {
    head(out, len, kind::DATA, if end_stream { flag::END_STREAM } else { 0 }, stream);
}

/// A header block as HEADERS and as many CONTINUATIONs as frames of at most
/// `max_frame_size` bytes need.
pub fn write_headers(out: &mut Vec<u8>, stream: u32, block: &[u8], end_stream: bool, max_frame_size: u32) {
    let max = max_frame_size as usize;
    let mut chunks = block.chunks(max.max(1));
    let first = chunks.next().unwrap_or(&[]);
    let last = first.len() == block.len();
    let flags = if end_stream { flag::END_STREAM } else { 0 } | if last { flag::END_HEADERS } else { 0 };
    head(out, first.len(), kind::HEADERS, flags, stream);
    out.extend_from_slice(first);
    let mut sent = first.len();
    for chunk in chunks {
        sent += chunk.len();
        let flags = if sent == block.len() { flag::END_HEADERS } else { 0 };
        head(out, chunk.len(), kind::CONTINUATION, flags, stream);
        out.extend_from_slice(chunk);
    }
}

/// A SETTINGS frame with these identifiers and values.
pub fn write_settings(out: &mut Vec<u8>, settings: &[(u16, u32)]) {
    head(out, settings.len() * 6, kind::SETTINGS, 0, 0);
    for (id, value) in settings {
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&value.to_be_bytes());
    }
}

pub fn write_settings_ack(out: &mut Vec<u8>) {
    head(out, 0, kind::SETTINGS, flag::ACK, 0);
}

pub fn write_ping(out: &mut Vec<u8>, data: [u8; 8], ack: bool) {
    head(out, 8, kind::PING, if ack { flag::ACK } else { 0 }, 0);
    out.extend_from_slice(&data);
}

pub fn write_goaway(out: &mut Vec<u8>, last_stream: u32, reason: Reason) {
    head(out, 8, kind::GOAWAY, 0, 0);
    out.extend_from_slice(&(last_stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(&reason.code().to_be_bytes());
}

pub fn write_rst_stream(out: &mut Vec<u8>, stream: u32, reason: Reason) {
    head(out, 4, kind::RST_STREAM, 0, stream);
    out.extend_from_slice(&reason.code().to_be_bytes());
}

pub fn write_window_update(out: &mut Vec<u8>, stream: u32, increment: u32) {
    head(out, 4, kind::WINDOW_UPDATE, 0, stream);
    out.extend_from_slice(&(increment & 0x7fff_ffff).to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        head(&mut out, payload.len(), kind, flags, stream);
        out.extend_from_slice(payload);
        out
    }

    fn one(bytes: &[u8]) -> Result<Frame<'_>, FrameError> {
        let (head, payload, rest) = split(bytes, DEFAULT_MAX_FRAME_SIZE)?.expect("a whole frame");
        assert!(rest.is_empty());
        parse(head, payload)
    }

    fn conn_err(bytes: &[u8]) -> Reason {
        match one(bytes) {
            Err(FrameError::Connection(r, _)) => r,
            other => panic!("not a connection error: {other:?}"),
        }
    }

    #[test]
    fn frames_are_split_off_whole_and_oversized_ones_refused_from_their_header() {
        let mut buf = frame(kind::PING, 0, 0, &[1; 8]);
        buf.extend_from_slice(&frame(kind::PING, flag::ACK, 0, &[2; 8])[..10]);
        let (h, payload, rest) = split(&buf, DEFAULT_MAX_FRAME_SIZE).unwrap().unwrap();
        assert_eq!((h.kind, h.len, payload), (kind::PING, 8, &[1u8; 8][..]));
        assert_eq!(split(rest, DEFAULT_MAX_FRAME_SIZE), Ok(None));
        assert_eq!(split(&rest[..5], DEFAULT_MAX_FRAME_SIZE), Ok(None));
        // The header of a frame one byte too long is enough.
        let mut big = Vec::new();
        head(&mut big, 16_385, kind::DATA, 0, 1);
        assert!(matches!(split(&big, DEFAULT_MAX_FRAME_SIZE), Err(FrameError::Connection(Reason::FrameSizeError, _))));
        assert_eq!(split(&big, 1 << 20), Ok(None));
        // The reserved bit of the stream identifier is ignored.
        let mut r = frame(kind::DATA, 0, 3, b"x");
        r[5] |= 0x80;
        assert!(matches!(one(&r), Ok(Frame::Data { stream: 3, .. })));
    }

    #[test]
    fn padding_and_priority_come_off_data_and_headers() {
        let f = frame(kind::DATA, flag::PADDED | flag::END_STREAM, 1, &[3, b'a', b'b', 0, 0, 0]);
        assert_eq!(one(&f), Ok(Frame::Data { stream: 1, end_stream: true, data: b"ab", flow_len: 6 }));
        let f = frame(kind::DATA, flag::PADDED, 1, &[7, b'a', 0, 0, 0, 0, 0]);
        assert_eq!(conn_err(&f), Reason::ProtocolError);
        let f = frame(kind::DATA, flag::PADDED, 1, &[]);
        assert_eq!(conn_err(&f), Reason::FrameSizeError);
        let f = frame(
            kind::HEADERS,
            flag::PADDED | flag::PRIORITY | flag::END_HEADERS,
            5,
            &[1, 0x80, 0, 0, 3, 200, 0x82, 0],
        );
        let priority = Some(Priority { dependency: 3, exclusive: true, weight: 200 });
        assert_eq!(
            one(&f),
            Ok(Frame::Headers { stream: 5, end_stream: false, end_headers: true, priority, fragment: &[0x82] })
        );
        let f = frame(kind::HEADERS, flag::PRIORITY, 5, &[0, 0, 0, 5, 16]);
        assert_eq!(one(&f), Err(FrameError::Stream(5, Reason::ProtocolError, "stream depends on itself")));
        let f = frame(kind::HEADERS, flag::PRIORITY, 5, &[0, 0, 0]);
        assert_eq!(conn_err(&f), Reason::FrameSizeError);
    }

    #[test]
    fn each_type_keeps_to_its_stream_and_length_rules() {
        assert_eq!(conn_err(&frame(kind::DATA, 0, 0, b"x")), Reason::ProtocolError);
        assert_eq!(conn_err(&frame(kind::HEADERS, 0, 0, b"")), Reason::ProtocolError);
        assert_eq!(conn_err(&frame(kind::CONTINUATION, 0, 0, b"")), Reason::ProtocolError);
        assert_eq!(conn_err(&frame(kind::PRIORITY, 0, 0, &[0; 5])), Reason::ProtocolError);
        assert!(matches!(
            one(&frame(kind::PRIORITY, 0, 1, &[0; 4])),
            Err(FrameError::Stream(1, Reason::FrameSizeError, _))
        ));
        assert_eq!(conn_err(&frame(kind::RST_STREAM, 0, 0, &[0; 4])), Reason::ProtocolError);
        assert_eq!(conn_err(&frame(kind::RST_STREAM, 0, 1, &[0; 3])), Reason::FrameSizeError);
        assert_eq!(one(&frame(kind::RST_STREAM, 0, 1, &[0, 0, 0, 8])), Ok(Frame::RstStream { stream: 1, code: 8 }));
        assert_eq!(conn_err(&frame(kind::SETTINGS, 0, 1, b"")), Reason::ProtocolError);
        assert_eq!(conn_err(&frame(kind::SETTINGS, flag::ACK, 0, &[0; 6])), Reason::FrameSizeError);
        assert_eq!(conn_err(&frame(kind::SETTINGS, 0, 0, &[0; 5])), Reason::FrameSizeError);
        assert_eq!(conn_err(&frame(kind::PUSH_PROMISE, 0, 1, &[0; 4])), Reason::ProtocolError);
        assert_eq!(conn_err(&frame(kind::PING, 0, 1, &[0; 8])), Reason::ProtocolError);
        assert_eq!(conn_err(&frame(kind::PING, 0, 0, &[0; 7])), Reason::FrameSizeError);
        assert_eq!(one(&frame(kind::PING, flag::ACK, 0, &[7; 8])), Ok(Frame::Ping { ack: true, data: [7; 8] }));
        assert_eq!(conn_err(&frame(kind::GOAWAY, 0, 1, &[0; 8])), Reason::ProtocolError);
        assert_eq!(conn_err(&frame(kind::GOAWAY, 0, 0, &[0; 7])), Reason::FrameSizeError);
        assert_eq!(
            one(&frame(kind::GOAWAY, 0, 0, &[0x80, 0, 0, 9, 0, 0, 0, 1, b'!'])),
            Ok(Frame::GoAway { last_stream: 9, code: 1, debug: b"!" })
        );
        assert_eq!(conn_err(&frame(kind::WINDOW_UPDATE, 0, 0, &[0; 4])), Reason::ProtocolError);
        assert!(matches!(
            one(&frame(kind::WINDOW_UPDATE, 0, 3, &[0; 4])),
            Err(FrameError::Stream(3, Reason::ProtocolError, _))
        ));
        assert_eq!(conn_err(&frame(kind::WINDOW_UPDATE, 0, 3, &[0; 5])), Reason::FrameSizeError);
        assert_eq!(one(&frame(0xfa, 0xff, 7, b"anything")), Ok(Frame::Unknown { kind: 0xfa, stream: 7 }));
    }

    #[test]
    fn settings_are_read_and_out_of_range_values_refused() {
        let mut f = Vec::new();
        write_settings(
            &mut f,
            &[
                (setting::HEADER_TABLE_SIZE, 0),
                (setting::ENABLE_PUSH, 0),
                (setting::MAX_CONCURRENT_STREAMS, 100),
                (setting::INITIAL_WINDOW_SIZE, 1),
                (setting::INITIAL_WINDOW_SIZE, MAX_WINDOW),
                (setting::MAX_FRAME_SIZE, MAX_FRAME_SIZE_LIMIT),
                (setting::MAX_HEADER_LIST_SIZE, 8192),
                (0x99, 5),
            ],
        );
        let want = Settings {
            header_table_size: Some(0),
            enable_push: Some(false),
            max_concurrent_streams: Some(100),
            initial_window_size: Some(MAX_WINDOW),
            max_frame_size: Some(MAX_FRAME_SIZE_LIMIT),
            max_header_list_size: Some(8192),
            enable_connect_protocol: None,
        };
        assert_eq!(one(&f), Ok(Frame::Settings { ack: false, settings: want }));
        for (id, value, reason) in [
            (setting::ENABLE_PUSH, 2, Reason::ProtocolError),
            (setting::INITIAL_WINDOW_SIZE, MAX_WINDOW + 1, Reason::FlowControlError),
            (setting::MAX_FRAME_SIZE, DEFAULT_MAX_FRAME_SIZE - 1, Reason::ProtocolError),
            (setting::MAX_FRAME_SIZE, MAX_FRAME_SIZE_LIMIT + 1, Reason::ProtocolError),
            (setting::ENABLE_CONNECT_PROTOCOL, 2, Reason::ProtocolError),
        ] {
            let mut f = Vec::new();
            write_settings(&mut f, &[(id, value)]);
            assert_eq!(conn_err(&f), reason, "setting {id} = {value}");
        }
        let mut ack = Vec::new();
        write_settings_ack(&mut ack);
        assert_eq!(one(&ack), Ok(Frame::Settings { ack: true, settings: Settings::default() }));
    }

    #[test]
    fn a_long_header_block_is_written_as_headers_and_continuations() {
        let block: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        let mut out = Vec::new();
        write_headers(&mut out, 9, &block, true, DEFAULT_MAX_FRAME_SIZE);
        let mut rest = &out[..];
        let mut got = Vec::new();
        let mut frames = Vec::new();
        while let Some((h, payload, next)) = split(rest, DEFAULT_MAX_FRAME_SIZE).unwrap() {
            frames.push((h.kind, h.flags));
            match parse(h, payload).unwrap() {
                Frame::Headers { fragment, .. } | Frame::Continuation { fragment, .. } => {
                    got.extend_from_slice(fragment)
                }
                other => panic!("{other:?}"),
            }
            rest = next;
        }
        assert_eq!(got, block);
        assert_eq!(
            frames,
            [(kind::HEADERS, flag::END_STREAM), (kind::CONTINUATION, 0), (kind::CONTINUATION, flag::END_HEADERS)]
        );
        let mut small = Vec::new();
        write_headers(&mut small, 1, &[0x88], false, DEFAULT_MAX_FRAME_SIZE);
        assert_eq!(small, frame(kind::HEADERS, flag::END_HEADERS, 1, &[0x88]));
    }

    #[test]
    fn written_control_frames_parse_back() {
        let mut out = Vec::new();
        write_ping(&mut out, [1, 2, 3, 4, 5, 6, 7, 8], false);
        assert_eq!(one(&out), Ok(Frame::Ping { ack: false, data: [1, 2, 3, 4, 5, 6, 7, 8] }));
        out.clear();
        write_goaway(&mut out, 7, Reason::EnhanceYourCalm);
        assert_eq!(one(&out), Ok(Frame::GoAway { last_stream: 7, code: 0xb, debug: b"" }));
        out.clear();
        write_rst_stream(&mut out, 3, Reason::RefusedStream);
        assert_eq!(one(&out), Ok(Frame::RstStream { stream: 3, code: 7 }));
        out.clear();
        write_window_update(&mut out, 0, MAX_WINDOW);
        assert_eq!(one(&out), Ok(Frame::WindowUpdate { stream: 0, increment: MAX_WINDOW }));
        out.clear();
        write_data_head(&mut out, 5, 3, true);
        out.extend_from_slice(b"abc");
        assert_eq!(one(&out), Ok(Frame::Data { stream: 5, end_stream: true, data: b"abc", flow_len: 3 }));
    }

    proptest! {
        #[test]
        fn any_bytes_split_and_parse_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..200), max in 0u32..64) {
            let mut rest = &bytes[..];
            for _ in 0..100 {
                match split(rest, max) {
                    Ok(Some((h, payload, next))) => {
                        prop_assert_eq!(payload.len(), h.len as usize);
                        let _ = parse(h, payload);
                        rest = next;
                    }
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}
