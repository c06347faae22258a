//! HTTP/2 endpoints (`appProtocol: H2C`) behind the proxy's own HTTP/2
//! client, with the `h2` crate's server as the endpoint (tonic's is in
//! grpc.rs) and one scripted frame by frame: bodies past the windows of
//! both ends, a request its client gives up on, a response head the proxy
//! cannot pass on, a connection nobody needs any more.

use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::support::*;

/// What an endpoint saw.
#[derive(Debug, PartialEq)]
enum Seen {
    /// A request arrived (its path).
    Request(String),
    /// A stream was reset by the proxy, with this reason.
    Reset(h2::Reason),
    /// A connection ended.
    Closed,
}

struct Endpoint {
    addr: std::net::SocketAddr,
    seen: mpsc::Receiver<Seen>,
    connections: Arc<AtomicUsize>,
}

/// Byte `i` of the bodies the tests send and the endpoint answers.
fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

/// The `h2` crate's server on 127.0.0.`host`, with `window` bytes of
/// stream window: it answers `/hold` never (reporting its reset),
/// `/count` with the length and a checksum of the request body followed by
/// `x-size` bytes of [`pattern`], anything else with `ok`.
async fn h2_endpoint(host: u8, window: u32) -> Endpoint {
    let listener = TcpListener::bind(format!("127.0.0.{host}:0")).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, seen) = mpsc::channel(64);
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        for _ in 0..16 {
            let Ok((s, _)) = listener.accept().await else { return };
            count.fetch_add(1, Ordering::Relaxed);
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut b = h2::server::Builder::new();
                b.initial_window_size(window);
                let Ok(Ok(mut conn)) = tokio::time::timeout(Duration::from_secs(10), b.handshake::<_, Bytes>(s)).await
                else {
                    return;
                };
                while let Some(Ok((req, respond))) = conn.accept().await {
                    tokio::spawn(answer(req, respond, tx.clone()));
                }
                let _ = tx.send(Seen::Closed).await;
            });
        }
    });
    Endpoint { addr, seen, connections }
}

async fn answer(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    tx: mpsc::Sender<Seen>,
) {
    let path = req.uri().path().to_owned();
    let _ = tx.send(Seen::Request(path.clone())).await;
    if path == "/hold" {
        if let Ok(reason) = poll_fn(|cx| respond.poll_reset(cx)).await {
            let _ = tx.send(Seen::Reset(reason)).await;
        }
        return;
    }
    let size: usize = req.headers().get("x-size").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0);
    let mut body = req.into_body();
    let (mut len, mut wrong) = (0usize, 0usize);
    while let Some(Ok(chunk)) = body.data().await {
        wrong += chunk.iter().enumerate().filter(|&(i, &b)| b != pattern(len + i)).count();
        len += chunk.len();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let head = http::Response::builder().status(200).body(()).expect("response");
    let Ok(mut send) = respond.send_response(head, false) else { return };
    let mut out = format!("{len} {wrong}\n").into_bytes();
    if path == "/count" {
        out.extend((0..size).map(pattern));
    } else {
        out = b"ok".to_vec();
    }
    let _ = send.send_data(out.into(), true);
}

/// Several requests at once, each with a 1 MB body and a 6 MB answer, on
/// one connection to an endpoint whose stream window is 16 KiB: the
/// proxy sends each body as the endpoint's windows open, and gives the
/// answers' bytes back to its own windows (2 MiB a stream, 5 MiB the
/// connection) as the clients read them. Every byte arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_past_the_windows_of_both_ends_arrive_whole() {
    const UP: usize = 1_000_000;
    const DOWN: usize = 6_000_000;
    let e = h2_endpoint(2, 16 * 1024).await;
    let p = proxy1(&format!("appProtocol: H2C\nendpoints:\n  - {{address: \"{}\"}}\n", e.addr)).await;
    let c = client();
    let calls = (0..3).map(|_| {
        let req = Request::post(format!("http://{}/count", p.addr))
            .header("x-size", DOWN.to_string())
            .body(Full::new(Bytes::from((0..UP).map(pattern).collect::<Vec<u8>>())))
            .expect("request");
        let c = c.clone();
        async move {
            let resp = tokio::time::timeout(Duration::from_secs(20), c.request(req)).await.expect("answered in time");
            let resp = resp.expect("response");
            assert_eq!(resp.status(), 200);
            tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
                .await
                .expect("body in time")
                .expect("body")
                .to_bytes()
        }
    });
    for body in futures::future::join_all(calls).await {
        let head = format!("{UP} 0\n");
        assert!(body.starts_with(head.as_bytes()), "{:?}", &body[..body.len().min(40)]);
        let rest = &body[head.len()..];
        assert_eq!(rest.len(), DOWN);
        assert!(rest.iter().enumerate().all(|(i, &b)| b == pattern(i)), "the answer arrived out of order");
    }
    assert_eq!(e.connections.load(Ordering::Relaxed), 1, "one connection carries all the streams");
    p.shutdown().await;
}

/// What an endpoint sees next.
async fn next(seen: &mut mpsc::Receiver<Seen>) -> Option<Seen> {
    tokio::time::timeout(Duration::from_secs(5), seen.recv()).await.expect("the endpoint saw it")
}

/// A client that resets its stream while the endpoint holds the request:
/// the proxy resets the endpoint's stream (`CANCEL`) at once rather than
/// leave it open, and the connection serves the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_its_client_gives_up_is_cancelled_at_the_endpoint_and_the_connection_goes_on() {
    let mut e = h2_endpoint(2, 65_535).await;
    let p =
        proxy1(&format!("appProtocol: H2C\ntimeouts: {{request: 30s}}\nendpoints:\n  - {{address: \"{}\"}}\n", e.addr))
            .await;
    let H2Call { client, conn, response: held, mut stream } = h2_get(p.addr, "/hold").await;
    assert_eq!(next(&mut e.seen).await, Some(Seen::Request("/hold".into())));
    stream.send_reset(h2::Reason::CANCEL);
    assert_eq!(next(&mut e.seen).await, Some(Seen::Reset(h2::Reason::CANCEL)));
    assert!(held.await.is_err(), "the reset stream has no answer");
    let r = get(&super::support::client(), &p, "/").await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "ok"));
    assert_eq!(e.connections.load(Ordering::Relaxed), 1, "the connection went on");
    drop(client);
    conn.abort();
    p.shutdown().await;
}

/// With no request on it for `timeouts.idle`, the proxy's connection to an
/// endpoint is closed (a GOAWAY, then the socket), and a request after that
/// opens a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_endpoint_connection_is_closed_and_the_next_request_opens_another() {
    let mut e = h2_endpoint(2, 65_535).await;
    let p = proxy1(&format!("appProtocol: H2C\ntimeouts: {{idle: 1s}}\nendpoints:\n  - {{address: \"{}\"}}\n", e.addr))
        .await;
    let c = client();
    assert_eq!(get(&c, &p, "/").await.status, 200);
    assert_eq!(next(&mut e.seen).await, Some(Seen::Request("/".into())));
    let closed = tokio::time::timeout(Duration::from_secs(6), e.seen.recv()).await;
    assert_eq!(closed.expect("closed within idle and a prune"), Some(Seen::Closed));
    assert_eq!(get(&c, &p, "/").await.status, 200);
    assert_eq!(e.connections.load(Ordering::Relaxed), 2);
    p.shutdown().await;
}

/// An endpoint scripted frame by frame whose first answer carries a value
/// the `http` crate refuses (a control byte) and whose second is fine: the
/// first request gets `502` and its stream is reset (`PROTOCOL_ERROR`:
/// its body is not wanted), the second its answer on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_head_the_proxy_cannot_pass_on_is_a_502_and_the_connection_goes_on() {
    let listener = TcpListener::bind("127.0.0.2:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let endpoint = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        s.write_all(&[h2_frame(4, 0, 0, &[]), h2_frame(4, 0x1, 0, &[])].concat()).await.expect("settings");
        let mut buf = Vec::new();
        let mut at = H2_PREFACE.len();
        let mut resets = Vec::new();
        let mut chunk = [0u8; 4096];
        for _ in 0..64 {
            match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            }
            while buf.len() >= at + 9 {
                let f = &buf[at..];
                let len = usize::from(f[0]) << 16 | usize::from(f[1]) << 8 | usize::from(f[2]);
                if f.len() < 9 + len {
                    break;
                }
                let (kind, stream) = (f[3], u32::from_be_bytes([f[5], f[6], f[7], f[8]]) & 0x7fff_ffff);
                if kind == 3 {
                    resets.push((stream, u32::from_be_bytes([f[9], f[10], f[11], f[12]])));
                }
                at += 9 + len;
                match (kind, stream) {
                    // `:status: 200` (indexed), then `x-bad: a\x01b` (literal);
                    // a body would follow.
                    (1, 1) => {
                        let block = [&[0x88u8, 0x00, 5][..], b"x-bad", &[3], b"a\x01b"].concat();
                        s.write_all(&h2_frame(1, 0x4, 1, &block)).await.expect("write");
                    }
                    (1, 3) => {
                        let answer = [h2_frame(1, 0x4, 3, &[0x88]), h2_frame(0, 0x1, 3, b"ok")].concat();
                        s.write_all(&answer).await.expect("write");
                    }
                    _ => {}
                }
            }
        }
        resets
    });
    let p =
        proxy1(&format!("appProtocol: H2C\nretries: {{attempts: 0}}\nendpoints:\n  - {{address: \"{addr}\"}}\n")).await;
    let c = client();
    assert_eq!(get(&c, &p, "/").await.status, 502);
    let r = get(&c, &p, "/").await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "ok"));
    p.shutdown().await;
    let resets = tokio::time::timeout(Duration::from_secs(15), endpoint).await.expect("endpoint").expect("ran");
    assert!(resets.contains(&(1, 1)), "stream 1 reset with PROTOCOL_ERROR: {resets:?}");
}
