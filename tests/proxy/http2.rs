//! HTTP/2 on the wire, both sides of the proxy, with peers other than its
//! own: the `h2` crate's client, and clients and endpoints scripted frame by
//! frame (stream resets, rapid resets, an endpoint stingy with its window).

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// An HTTP/1.1 endpoint that answers `GET /` at once and holds `GET /hold`
/// unanswered, reporting when the proxy closes a held request's connection.
async fn holding_endpoint(host: u8) -> (std::net::SocketAddr, tokio::sync::mpsc::Receiver<Instant>) {
    let listener = TcpListener::bind(("127.0.0.".to_owned() + &host.to_string(), 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (closed, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        for _ in 0..64 {
            let Ok((mut s, _)) = listener.accept().await else { return };
            let closed = closed.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while buf.len() < 65536 {
                    let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(20), s.read(&mut chunk)).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = buf.drain(..end + 4).collect();
                        if head.starts_with(b"GET /hold ") {
                            // Nothing more comes; the end of the connection is the news.
                            let mut rest = [0u8; 64];
                            let end = tokio::time::timeout(Duration::from_secs(20), s.read(&mut rest)).await;
                            if matches!(end, Ok(Ok(0) | Err(_))) {
                                let _ = closed.send(Instant::now()).await;
                            }
                            return;
                        }
                        if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// Everything the proxy sends on `s` until it closes the connection; `None`
/// when it is still open after `within`.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 16384];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return Some(seen),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
}

/// A client that resets its stream (`RST_STREAM CANCEL`, what a browser or
/// a gRPC client sends when the user gives up) before the answer: the
/// request is abandoned at once, its endpoint connection closed rather than
/// left waiting for an answer nobody reads, and the client's connection
/// goes on serving its other streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_client_resets_is_abandoned_at_the_endpoint_and_the_connection_goes_on() {
    let (addr, mut closed) = holding_endpoint(2).await;
    let p = proxy1(&format!("timeouts: {{request: 30s}}\nendpoints:\n  - {{address: \"{addr}\"}}\n")).await;
    let H2Call { client, conn, response: held, mut stream } = h2_get(p.addr, "/hold").await;
    let head = |path: &str| http::Request::get(format!("http://{}{path}", p.addr)).body(()).expect("request");
    // Once the endpoint holds the request, the client gives up on it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reset = Instant::now();
    stream.send_reset(h2::Reason::CANCEL);
    let at = tokio::time::timeout(Duration::from_secs(5), closed.recv()).await.expect("endpoint released");
    let took = at.expect("closed").duration_since(reset);
    assert!(took < Duration::from_secs(1), "the endpoint's connection closed {took:?} after the reset");
    assert!(held.await.is_err(), "the reset stream has no answer");
    // The same connection serves the next request.
    let mut client = client.ready().await.expect("ready again");
    let (resp, _) = client.send_request(head("/"), true).expect("send");
    let resp = tokio::time::timeout(Duration::from_secs(5), resp).await.expect("answered").expect("response");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    assert_eq!(body.data().await.expect("data").expect("ok"), "ok");
    drop((client, body));
    conn.abort();
    p.shutdown().await;
}

/// The proxy PINGs an HTTP/2 client every half of `timeouts.idle`: a client
/// that answers keeps a connection whose only stream waits on a slow
/// endpoint, one that has vanished (it sent its request and then nothing,
/// not even a PONG) loses it by the next PING, and its request is dropped
/// at the endpoint, long before `timeouts.request` or `bodyIdle` would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_pings_unanswered_loses_its_connection_and_one_that_answers_keeps_it() {
    let (addr, mut closed) = holding_endpoint(2).await;
    let timeouts = "timeouts: {idle: 400ms, request: 30s, bodyIdle: 30s}";
    let p = proxy1(&format!("{timeouts}\nendpoints:\n  - {{address: \"{addr}\"}}\n")).await;

    // The h2 crate's client answers PINGs: five intervals later its request still waits.
    let H2Call { client, conn, response: held, mut stream } = h2_get(p.addr, "/hold").await;
    let waited = tokio::time::timeout(Duration::from_millis(1000), held).await;
    assert!(waited.is_err(), "an answering client's stream ended: {waited:?}");
    assert!(!conn.is_finished(), "an answering client's connection closed");
    stream.send_reset(h2::Reason::CANCEL);
    tokio::time::timeout(Duration::from_secs(5), closed.recv()).await.expect("first request released");
    drop(client);
    conn.abort();

    // A client scripted frame by frame: its request, then silence.
    let mut s = TcpStream::connect(p.addr).await.expect("connect");
    let mut hello = H2_PREFACE.to_vec();
    hello.extend(h2_frame(4, 0, 0, &[]));
    // GET /hold on http://a, the request complete.
    let mut block = vec![0x82, 0x86, 0x04, 5];
    block.extend_from_slice(b"/hold");
    block.extend_from_slice(&[0x01, 0x01, b'a']);
    hello.extend(h2_frame(1, 0x5, 1, &block));
    s.write_all(&hello).await.expect("request");
    let sent = Instant::now();
    let seen = read_until_closed(&mut s, Duration::from_secs(5))
        .await
        .expect("a client that answers no PING kept its connection 5 s");
    let took = sent.elapsed();
    let frames = h2_frames(&seen);
    assert!(frames.iter().any(|f| f.0 == 6), "no PING before the close: {frames:?}");
    assert!(took >= Duration::from_millis(300), "closed after {took:?}, before a PING could go unanswered");
    let released = tokio::time::timeout(Duration::from_secs(5), closed.recv()).await.expect("second request released");
    assert!(released.expect("closed").duration_since(sent) < Duration::from_secs(3));
    p.shutdown().await;
}

/// Rapid reset (CVE-2023-44487): a client that opens streams and resets
/// them at once, hundreds in one write, gets its connection ended with
/// `GOAWAY ENHANCE_YOUR_CALM`, and few of its requests reach an endpoint;
/// a well-behaved client's requests on another connection all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_resets_end_the_connection_and_spare_the_endpoints() {
    let bs = backends(1).await;
    let p = proxy(&endpoints_yaml(&bs)).await;
    let mut burst = H2_PREFACE.to_vec();
    burst.extend(h2_frame(4, 0, 0, &[]));
    // GET / on http://a, then RST_STREAM CANCEL, 500 times.
    let block = [0x82, 0x86, 0x84, 0x01, 0x01, b'a'];
    for i in 0..500u32 {
        burst.extend(h2_frame(1, 0x5, 2 * i + 1, &block));
        burst.extend(h2_frame(3, 0, 2 * i + 1, &8u32.to_be_bytes()));
    }
    let mut s = TcpStream::connect(p.addr).await.expect("connect");
    // The proxy may close before it has read everything.
    let _ = s.write_all(&burst).await;
    let seen = read_until_closed(&mut s, Duration::from_secs(5))
        .await
        .expect("the connection stayed open 5 s after 500 rapid resets");
    let got = h2_frames(&seen);
    assert!(got.contains(&(7, Some(0xb))), "no GOAWAY ENHANCE_YOUR_CALM in {got:?}");
    let reached = bs[0].hits();
    assert!(reached < 100, "{reached} of 500 reset requests reached the endpoint");
    let c = h2_client();
    for _ in 0..20 {
        assert_eq!(get(&c, &p, "/").await.status, 200);
    }
    p.shutdown().await;
}

/// What the window-hoarding endpoint saw of a stream.
#[derive(Debug, Default)]
struct Seen {
    /// Streams whose HEADERS arrived.
    opened: Vec<u32>,
    /// Streams answered (their request ended).
    answered: Vec<u32>,
}

/// An HTTP/2 endpoint that gives its connection's flow-control window back
/// only once all of it has been used (some peers do: hyper#4003), and
/// answers `200` to each stream once its request has ended.
async fn window_hoarding_endpoint(listener: TcpListener, seen: std::sync::Arc<std::sync::Mutex<Seen>>) {
    let Ok((mut s, _)) = listener.accept().await else { return };
    // Default settings: 65,535 bytes of window per stream and for the connection.
    if s.write_all(&h2_frame(4, 0, 0, &[])).await.is_err() {
        return;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let mut consumed = 0u32;
    let mut preface = false;
    loop {
        let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(20), s.read(&mut chunk)).await else { return };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        if !preface {
            if buf.len() < H2_PREFACE.len() {
                continue;
            }
            buf.drain(..H2_PREFACE.len());
            preface = true;
        }
        let mut out = Vec::new();
        while buf.len() >= 9 {
            let len = usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let f: Vec<u8> = buf.drain(..9 + len).collect();
            let (kind, flags, id) = (f[3], f[4], u32::from_be_bytes([f[5] & 0x7f, f[6], f[7], f[8]]));
            let mut ended = flags & 0x1 != 0;
            match kind {
                // SETTINGS (not an ACK): acknowledged.
                4 if flags & 0x1 == 0 => {
                    out.extend(h2_frame(4, 0x1, 0, &[]));
                    ended = false;
                }
                4 => ended = false,
                // PING: answered.
                6 if flags & 0x1 == 0 => {
                    out.extend(h2_frame(6, 0x1, 0, &f[9..]));
                    ended = false;
                }
                1 => seen.lock().unwrap_or_else(|p| p.into_inner()).opened.push(id),
                0 => {
                    consumed += u32::try_from(len).expect("frame length");
                    if consumed >= 65_535 {
                        out.extend(h2_frame(8, 0, 0, &consumed.to_be_bytes()));
                        consumed = 0;
                    }
                }
                _ => ended = false,
            }
            if ended && (kind == 0 || kind == 1) {
                // `:status: 200` (static table index 8), no body.
                out.extend(h2_frame(1, 0x5, id, &[0x88]));
                seen.lock().unwrap_or_else(|p| p.into_inner()).answered.push(id);
            }
        }
        if !out.is_empty() && s.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// A client request body that has nothing to send yet claims none of the
/// endpoint connection's window: another request's body on the same
/// connection can use all of it, against an endpoint that opens its window
/// again only once every byte of it has been used. (A pump that reserved
/// a byte before it had data pinned that byte, and the second upload
/// stalled a byte short, for ever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_request_body_leaves_the_endpoint_window_to_the_other_streams() {
    use http_body_util::{Full, StreamBody};
    let listener = TcpListener::bind("127.0.0.2:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
    let endpoint = tokio::spawn(window_hoarding_endpoint(listener, seen.clone()));
    let p = proxy1(&format!(
        "appProtocol: H2C\nretries: {{attempts: 0}}\ntimeouts: {{request: 30s}}\nendpoints:\n  - {{address: \"{addr}\"}}\n"
    ))
    .await;
    // A: an upload that has sent nothing yet.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>>(1);
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let idle = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, StreamBody<_>>(hyper_util::client::legacy::connect::HttpConnector::new());
    let req = http::Request::post(format!("http://{}/a", p.addr)).body(body).expect("request");
    let first = tokio::spawn(async move { idle.request(req).await.map(|r| r.status()) });
    let opened = eventually(Duration::from_secs(5), || {
        let seen = seen.clone();
        async move { seen.lock().unwrap_or_else(|p| p.into_inner()).opened.len() == 1 }
    })
    .await;
    assert!(opened, "the first request did not reach the endpoint");
    tokio::time::sleep(Duration::from_millis(100)).await;
    // B: exactly one connection window's worth, on the same endpoint connection.
    let c = client();
    let req = http::Request::post(format!("http://{}/b", p.addr))
        .body(Full::new(bytes::Bytes::from(vec![b'x'; 65_535])))
        .expect("request");
    let second = tokio::time::timeout(Duration::from_secs(5), send(&c, req)).await;
    assert_eq!(second.expect("the second upload stalled").expect("answered").status, 200);
    // A ends; it is answered too.
    tx.send(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(b"late")))).await.expect("send");
    drop(tx);
    let first = tokio::time::timeout(Duration::from_secs(5), first).await.expect("first answered");
    assert_eq!(first.expect("ran").expect("response"), 200);
    let (counts, seen) = {
        let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        ((seen.opened.len(), seen.answered.len()), format!("{seen:?}"))
    };
    assert_eq!(counts, (2, 2), "{seen}");
    endpoint.abort();
    p.shutdown().await;
}
