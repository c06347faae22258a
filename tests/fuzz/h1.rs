//! Differential fuzzing of the HTTP/1.1 fast path's request parser against
//! hyper's server: whatever request head the fast path takes, hyper takes
//! too, with the same method, target, header fields and body. (What the
//! fast path declines goes to hyper itself, so agreement on what it takes
//! is the whole contract.) Inputs are near-valid requests with the classic
//! smuggling ingredients: repeated, signed or listed `Content-Length`,
//! `Transfer-Encoding` variants, bare LF, folded lines, odd bytes in names,
//! values and targets.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use fulcrum::proxy::h1::{self, RequestHead};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just("GET".to_owned()),
        4 => Just("POST".to_owned()),
        1 => Just("HEAD".to_owned()),
        1 => Just("PUT".to_owned()),
        1 => Just("CONNECT".to_owned()),
        1 => Just("get".to_owned()),
        2 => "[A-Z!#$%&'*+.^_`|~-]{1,8}",
        1 => "[\\x21-\\x7e]{1,4}",
    ]
}

fn target() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => Just("/".to_owned()),
        2 => Just("/a?b=c&d".to_owned()),
        1 => Just("*".to_owned()),
        1 => Just("http://h/x".to_owned()),
        4 => "/[\\x21-\\x7e]{0,12}",
        1 => "/\\PC{0,6}",
    ]
}

fn version() -> impl Strategy<Value = &'static str> {
    prop_oneof![16 => Just("HTTP/1.1"), 1 => Just("HTTP/1.0"), 1 => Just("HTTP/2.0"), 1 => Just("http/1.1"), 1 => Just("HTTP/1.10")]
}

fn header() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just("Host: x".to_owned()),
        4 => "[0-9]{1,3}".prop_map(|n| format!("Content-Length: {n}")),
        1 => prop_oneof![
            Just("Content-Length: +3"),
            Just("Content-Length: 3, 3"),
            Just("Content-Length: 3 "),
            Just("Content-Length : 3"),
            Just("Content-Length:3"),
            Just("content-length: 003"),
            Just("Content-Length: 99999999999999999999"),
            Just("Content-Length:"),
        ]
        .prop_map(str::to_owned),
        2 => prop_oneof![
            Just("Transfer-Encoding: chunked"),
            Just("Transfer-Encoding: Chunked"),
            Just("Transfer-Encoding: chunked, identity"),
            Just("Transfer-Encoding: xchunked"),
            Just("Transfer-Encoding:\r\n chunked"),
            Just("Transfer-Encoding\t: chunked"),
            Just("Connection: close"),
            Just("Connection: keep-alive, Upgrade"),
            Just("Connection: close, x-secret"),
            Just("Upgrade: websocket"),
            Just("Expect: 100-continue"),
            Just("TE: trailers"),
            Just("X-Forwarded-For: 1.2.3.4"),
            Just("Cookie: a=1; b=2"),
        ]
        .prop_map(str::to_owned),
        8 => ("[A-Za-z0-9!#$%&'*+.^_`|~-]{1,10}", "[\\x20-\\x7e\\t]{0,12}").prop_map(|(n, v)| format!("{n}: {v}")),
        2 => ("[\\x21-\\x7e]{1,6}", "\\PC{0,6}").prop_map(|(n, v)| format!("{n}: {v}")),
    ]
}

prop_compose! {
    fn request()(
        m in method(), t in target(), v in version(), lf in prop::bool::weighted(0.05),
        headers in prop::collection::vec(header(), 0..6),
        body in prop::collection::vec(any::<u8>(), 0..12),
        raw_byte in prop::option::weighted(0.05, (0usize..64, any::<u8>())),
    ) -> Vec<u8> {
        let eol = if lf { "\n" } else { "\r\n" };
        let mut s = format!("{m} {t} {v}{eol}");
        for h in &headers {
            s.push_str(h);
            s.push_str(eol);
        }
        s.push_str(eol);
        let mut bytes = s.into_bytes();
        if let Some((at, b)) = raw_byte {
            let at = at % bytes.len();
            bytes[at] = b;
        }
        bytes.extend_from_slice(&body);
        bytes
    }
}

/// A request as read: method, target, header fields (lower-case names,
/// sorted) and the body, if it arrived whole.
type Read = (String, String, Vec<(String, Vec<u8>)>, Option<Bytes>);

/// What hyper's server made of `raw`'s first request, or `None` if it refused it.
fn hyper_reads(raw: &[u8]) -> Option<Read> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
    rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let tx = tx.clone();
            async move {
                let (parts, body) = req.into_parts();
                let mut headers: Vec<(String, Vec<u8>)> =
                    parts.headers.iter().map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec())).collect();
                headers.sort();
                let body = tokio::time::timeout(Duration::from_millis(200), body.collect()).await;
                let body = body.ok().and_then(Result::ok).map(|b| b.to_bytes());
                let _ = tx.send((parts.method.to_string(), parts.uri.to_string(), headers, body));
                Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::new())))
            }
        });
        let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(server), svc);
        let raw = raw.to_vec();
        // The client's side stays open: hyper reads the first request and
        // answers; what it made of it arrives on the channel.
        let _ = client.write_all(&raw).await;
        let read = tokio::select! {
            _ = conn => None,
            read = rx.recv() => read,
            () = tokio::time::sleep(Duration::from_millis(500)) => None,
        };
        drop(client);
        read.or_else(|| rx.try_recv().ok())
    })
}

proptest! {
    #[test]
    fn what_the_fast_path_takes_hyper_reads_the_same_way(raw in request()) {
        let mut head = RequestHead::default();
        let Ok(true) = h1::parse_request(&raw, 8192, 100, &mut head) else { return Ok(()) };
        let Some((method, target, mut headers, body)) = hyper_reads(&raw) else {
            return Err(TestCaseError::fail(format!("hyper refused what the fast path took: {:?}", String::from_utf8_lossy(&raw))));
        };
        prop_assert_eq!(method.as_bytes(), &raw[head.method.clone()]);
        prop_assert_eq!(target.as_bytes(), &raw[head.target.clone()]);
        let mut ours: Vec<(String, Vec<u8>)> = head
            .headers
            .iter()
            .map(|h| (String::from_utf8_lossy(&raw[h.name.clone()]).to_ascii_lowercase(), raw[h.value.clone()].to_vec()))
            .collect();
        ours.sort();
        headers.sort();
        prop_assert_eq!(ours, headers);
        let end = head.len + head.body as usize;
        if raw.len() >= end {
            prop_assert_eq!(body.as_deref(), Some(&raw[head.len..end]));
        }
    }

    #[test]
    fn the_chunked_decoder_takes_any_bytes_and_any_split(bytes in prop::collection::vec(any::<u8>(), 0..64), split in 0usize..64) {
        let mut whole = h1::Chunked::default();
        let mut parts = h1::Chunked::default();
        let split = split.min(bytes.len());
        let one = whole.feed(&bytes);
        let two = parts.feed(&bytes[..split]).and_then(|(a, done)| {
            if done { Ok((a, true)) } else { parts.feed(&bytes[split..]).map(|(b, d)| (a + b, d)) }
        });
        prop_assert_eq!(one.is_ok(), two.is_ok());
        if let (Ok(a), Ok(b)) = (one, two) {
            prop_assert_eq!(a, b);
        }
    }

    /// What an HTTP/2 client receives from a chunked HTTP/1.1 answer: the
    /// data and the trailer section, whatever the reads' boundaries, ending
    /// where `feed` (which finds the end on the fast path) says it ends.
    #[test]
    fn decoding_a_chunked_body_yields_its_data_and_trailers_over_any_splits(
        chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..40), 0..6),
        extension in any::<bool>(),
        trailers in prop::collection::vec("[a-z]{1,8}: [a-z0-9 ]{0,12}", 0..3),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..4),
    ) {
        let mut wire = Vec::new();
        for c in &chunks {
            wire.extend_from_slice(format!("{:x}{}\r\n", c.len(), if extension { ";a=b" } else { "" }).as_bytes());
            wire.extend_from_slice(c);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b"0\r\n");
        let mut section = Vec::new();
        for t in &trailers {
            section.extend_from_slice(t.as_bytes());
            section.extend_from_slice(b"\r\n");
        }
        section.extend_from_slice(b"\r\n");
        wire.extend_from_slice(&section);
        let end = wire.len();
        wire.extend_from_slice(b"NEXT");

        let mut bounds: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
        bounds.push(wire.len());
        bounds.sort_unstable();
        let (mut decoder, mut data, mut got, mut at, mut ended) = (h1::Chunked::default(), Vec::new(), Vec::new(), 0, false);
        let mut from = 0;
        for to in bounds {
            let piece = &wire[from..to];
            let mut i = 0;
            while i < piece.len() && !ended {
                let d = decoder.decode(&piece[i..], &mut got).expect("a valid chunked body");
                prop_assert!(d.data.end <= d.consumed && d.consumed > 0);
                data.extend_from_slice(&piece[i..][d.data.clone()]);
                i += d.consumed;
                ended = d.ended;
            }
            at += i;
            from = to;
            if ended {
                break;
            }
        }
        prop_assert!(ended);
        prop_assert_eq!(at, end);
        prop_assert_eq!(data, chunks.concat());
        prop_assert_eq!(got, section);
        prop_assert_eq!(h1::Chunked::default().feed(&wire), Ok((end, true)));
    }

    #[test]
    fn decoding_and_finding_the_end_agree_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let (mut decoder, mut trailers, mut i, mut verdict) = (h1::Chunked::default(), Vec::new(), 0, Ok(false));
        while i < bytes.len() {
            match decoder.decode(&bytes[i..], &mut trailers) {
                Ok(d) => {
                    i += d.consumed;
                    if d.ended {
                        verdict = Ok(true);
                        break;
                    }
                }
                Err(e) => {
                    verdict = Err(e);
                    break;
                }
            }
        }
        match (h1::Chunked::default().feed(&bytes), verdict) {
            (Ok((n, true)), Ok(true)) => prop_assert_eq!(n, i),
            (Ok((_, false)), Ok(false)) | (Err(_), Err(_)) => {}
            (a, b) => prop_assert!(false, "feed {:?}, decode {:?}", a, b),
        }
    }
}
