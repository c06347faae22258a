//! Request smuggling: a corpus of ambiguous and malformed requests, each
//! sent as raw bytes. The proxy and a hyper endpoint behind it must never
//! disagree on where a request ends: every request the endpoint completes
//! is one the client gets an answer for, in order, and what the proxy
//! refuses never reaches the endpoint. Ambiguous answers from an endpoint
//! are not passed on either.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// A hyper endpoint that records each request it read whole as
/// `METHOD /path body-length` and answers with that line.
async fn recording_endpoint(host: u8) -> (SocketAddr, Arc<Mutex<Vec<String>>>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, host], 0))).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let log = log.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let Ok(body) = body.collect().await else {
                            return Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::new())));
                        };
                        let line = format!("{} {} {}", parts.method, parts.uri, body.to_bytes().len());
                        log.lock().unwrap().push(line.clone());
                        Ok(http::Response::new(Full::new(Bytes::from(line))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    (addr, seen, task)
}

/// Sends `raw` and reads every response until the proxy closes the
/// connection or is silent for a while: each as (status, body).
async fn exchange(proxy: SocketAddr, raw: &[u8]) -> Vec<(u16, String)> {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_millis(700), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let mut responses = Vec::new();
    let mut rest = &got[..];
    while !rest.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut r = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(len)) = r.parse(rest) else { break };
        let status = r.code.unwrap_or(0);
        let length = r
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
            .unwrap_or(0);
        let end = (len + length).min(rest.len());
        responses.push((status, String::from_utf8_lossy(&rest[len..end]).into_owned()));
        rest = &rest[end..];
    }
    responses
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// Refused with a 4xx before anything reaches the endpoint.
    Refused,
    /// Whatever the reading, the proxy and the endpoint agree on it.
    Agreed,
}

const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";

fn corpus() -> Vec<(&'static str, String, Expect)> {
    use Expect::*;
    let s = SMUGGLED;
    let n = s.len();
    vec![
        (
            "two different Content-Length",
            format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: {n}\r\n\r\n{s}"),
            Refused,
        ),
        (
            "Content-Length with a sign",
            format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +{n}\r\n\r\n{s}"),
            Refused,
        ),
        (
            "Content-Length list of different values",
            format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0, {n}\r\n\r\n{s}"),
            Refused,
        ),
        (
            "Content-Length beyond 64 bits",
            format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n{s}"),
            Refused,
        ),
        ("space before the colon", format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length : {n}\r\n\r\n{s}"), Refused),
        (
            "obs-fold in Transfer-Encoding",
            format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n{s}"),
            Refused,
        ),
        ("NUL in a header value", format!("GET / HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n{s}"), Refused),
        ("header name with a space", format!("GET / HTTP/1.1\r\nHost: x\r\nX A: b\r\n\r\n{s}"), Refused),
        ("two spaces in the request line", format!("GET  / HTTP/1.1\r\nHost: x\r\n\r\n{s}"), Refused),
        (
            "Transfer-Encoding not ending in chunked",
            format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{s}"),
            Refused,
        ),
        (
            "Transfer-Encoding xchunked",
            format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{s}"),
            Refused,
        ),
        (
            "Transfer-Encoding and Content-Length (CL.TE)",
            format!(
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{s}"
            ),
            Agreed,
        ),
        (
            "Content-Length and Transfer-Encoding (TE.CL)",
            format!(
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\n{s}\r\n0\r\n\r\n"
            ),
            Agreed,
        ),
        (
            "chunk size that is not hex",
            format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{s}"),
            Agreed,
        ),
        (
            "chunk size overflowing 64 bits",
            format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\n{s}"),
            Agreed,
        ),
        (
            "a body that looks like a request",
            format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n\r\n{s}"),
            Agreed,
        ),
        (
            "pipelined requests",
            format!("GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\n\r\n{s}"),
            Agreed,
        ),
        ("bare LF line endings", format!("GET /lf HTTP/1.1\nHost: x\n\n{s}"), Agreed),
        (
            "HTTP/1.0 with Transfer-Encoding",
            format!("POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{s}"),
            Agreed,
        ),
        (
            "absolute-form target naming another host",
            format!("GET http://elsewhere/abs HTTP/1.1\r\nHost: x\r\n\r\n{s}"),
            Agreed,
        ),
        (
            "Expect: 100-continue with a body",
            format!("POST /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok{s}"),
            Agreed,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_and_its_endpoint_never_disagree_on_where_a_request_ends() {
    let (addr, seen, task) = recording_endpoint(2).await;
    let p = proxy(&format!("endpoints: [{{address: \"{addr}\"}}]\n")).await;
    for (name, raw, expect) in corpus() {
        seen.lock().unwrap().clear();
        let responses = exchange(p.addr, raw.as_bytes()).await;
        let seen = seen.lock().unwrap().clone();
        let answered: Vec<String> = responses.iter().filter(|(s, _)| *s == 200).map(|(_, b)| b.clone()).collect();
        assert_eq!(seen, answered, "{name}: the endpoint read {seen:?}, the client was answered {responses:?}");
        if expect == Expect::Refused {
            assert!(seen.is_empty(), "{name}: reached the endpoint: {seen:?}");
            assert!(matches!(responses.first(), Some((400..=499, _))), "{name}: {responses:?}");
        }
    }
    // The plain cases went through the fast path and kept their meaning.
    let responses = exchange(
        p.addr,
        format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{SMUGGLED}", SMUGGLED.len()).as_bytes(),
    )
    .await;
    assert_eq!(responses[0], (200, format!("POST / {}", SMUGGLED.len())));
    assert!(!responses.iter().any(|(_, b)| b.contains("/smuggled")), "{responses:?}");
    task.abort();
    p.shutdown().await;
}

/// A raw endpoint that answers every request with `answer`, closing after
/// the first one when `close`.
async fn answering(host: u8, answer: &'static [u8], close: bool) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, host], 0))).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(answer).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_answers_from_an_endpoint_are_not_passed_on() {
    for (name, answer) in [
        ("two different Content-Length", &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc"[..]),
        (
            "Content-Length and Transfer-Encoding",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n",
        ),
        ("an invalid status line", b"HTTP/1.1 2000 OK\r\ncontent-length: 0\r\n\r\n"),
        ("a 101 nobody asked for", b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n"),
    ] {
        let (addr, task) = answering(3, answer, false).await;
        let p = proxy(&format!("endpoints: [{{address: \"{addr}\"}}]\n")).await;
        let responses = exchange(p.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(responses.first().map(|r| r.0), Some(502), "{name}: {responses:?}");
        task.abort();
        p.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_and_close_delimited_answers_pass_whole() {
    let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4;x=1\r\nwiki\r\n5\r\npedia\r\n0\r\nx-trailer: 1\r\n\r\n";
    let (addr, task) = answering(4, chunked, false).await;
    let p = proxy(&format!("endpoints: [{{address: \"{addr}\"}}]\n")).await;
    // Through hyper, a client of the ecosystem: the body whole, twice on one connection.
    let c = client();
    for _ in 0..2 {
        let r = get(&c, &p, "/").await;
        assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "wikipedia"));
    }
    task.abort();
    p.shutdown().await;
    // An HTTP/1.0 answer without a length ends with its connection, and so does the client's.
    let (addr, task) = answering(5, b"HTTP/1.0 200 OK\r\n\r\nuntil the end", true).await;
    let p = proxy(&format!("endpoints: [{{address: \"{addr}\"}}]\n")).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut all = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut all)).await.unwrap().unwrap();
    assert!(all.starts_with("HTTP/1.1 200 OK\r\n") && all.contains("connection: close"), "{all}");
    assert!(all.ends_with("until the end"), "{all}");
    task.abort();
    p.shutdown().await;
}
