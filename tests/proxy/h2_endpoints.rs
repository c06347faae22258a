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
/// `x-size` bytes of [`pattern`], `/fields` with the fields of [`FIELDS`],
/// `/head` with the request's head as it arrived ([`head_of`]) and its
/// body's length, anything else with `ok`.
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

/// The response fields `/fields` answers with: a repeated `set-cookie`
/// (order matters), and hop-by-hop fields HTTP/2 lets an endpoint send.
const FIELDS: [(&str, &str); 6] = [
    ("content-type", "text/plain"),
    ("set-cookie", "a=1"),
    ("x-tag", "Mixed Case, and a comma"),
    ("set-cookie", "b=2"),
    ("te", "trailers"),
    ("proxy-authenticate", "Basic realm=\"x\""),
];

/// A request head as an endpoint received it: the pseudo-headers, then
/// each field on a line of its own, in order.
fn head_of(req: &http::Request<h2::RecvStream>) -> String {
    let uri = req.uri();
    let mut out = format!(
        ":method: {}\n:scheme: {}\n:authority: {}\n:path: {}\n",
        req.method(),
        uri.scheme_str().unwrap_or(""),
        uri.authority().map_or("", |a| a.as_str()),
        uri.path_and_query().map_or("", |p| p.as_str())
    );
    for (name, value) in req.headers() {
        out += &format!("{name}: {}\n", String::from_utf8_lossy(value.as_bytes()));
    }
    out
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
    let seen_head = head_of(&req);
    let mut body = req.into_body();
    let (mut len, mut wrong) = (0usize, 0usize);
    while let Some(Ok(chunk)) = body.data().await {
        wrong += chunk.iter().enumerate().filter(|&(i, &b)| b != pattern(len + i)).count();
        len += chunk.len();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let mut head = http::Response::builder().status(200);
    if path == "/fields" {
        for (name, value) in FIELDS {
            head = head.header(name, value);
        }
    }
    let head = head.body(()).expect("response");
    let Ok(mut send) = respond.send_response(head, false) else { return };
    let mut out = format!("{len} {wrong}\n").into_bytes();
    if path == "/count" {
        out.extend((0..size).map(pattern));
    } else if path == "/head" {
        out = format!("{seen_head}body: {len}\n").into_bytes();
    } else {
        out = b"ok".to_vec();
    }
    if path == "/fields" {
        let _ = send.send_data(out.into(), false);
        let mut trailers = http::HeaderMap::new();
        for (name, value) in TRAILERS {
            trailers.append(name, http::HeaderValue::from_static(value));
        }
        let _ = send.send_trailers(trailers);
        return;
    }
    let _ = send.send_data(out.into(), true);
}

/// The trailers `/fields` ends with: two that go on, and fields a trailer
/// section may not carry.
const TRAILERS: [(&str, &str); 5] = [
    ("grpc-status", "0"),
    ("content-type", "text/plain"),
    ("x-trailer", "One, Two"),
    ("host", "elsewhere"),
    ("x-trailer", "three"),
];

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
    // A new client: the first one's kept-alive connection to the proxy has
    // been idle as long, and the proxy may be closing it as it is reused.
    assert_eq!(get(&client(), &p, "/").await.status, 200);
    assert_eq!(e.connections.load(Ordering::Relaxed), 2);
    p.shutdown().await;
}

/// An endpoint scripted frame by frame whose first answer carries a value
/// the `http` crate refuses (a control byte) and whose second is fine: the
/// first request gets `502` and its stream is reset (`PROTOCOL_ERROR`:
/// its body is not wanted), the second its answer on the same connection.
/// An HTTP/1.1 client's request and an HTTP/2 client's (whose response
/// head is passed on without a header map) both meet it.
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
                    (1, 1 | 3) => {
                        let block = [&[0x88u8, 0x00, 5][..], b"x-bad", &[3], b"a\x01b"].concat();
                        s.write_all(&h2_frame(1, 0x4, stream, &block)).await.expect("write");
                    }
                    (1, 5) => {
                        let answer = [h2_frame(1, 0x4, 5, &[0x88]), h2_frame(0, 0x1, 5, b"ok")].concat();
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
    assert_eq!(get(&h2_client(), &p, "/").await.status, 502);
    let r = get(&c, &p, "/").await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "ok"));
    p.shutdown().await;
    let resets = tokio::time::timeout(Duration::from_secs(15), endpoint).await.expect("endpoint").expect("ran");
    for stream in [1, 3] {
        assert!(resets.contains(&(stream, 1)), "stream {stream} reset with PROTOCOL_ERROR: {resets:?}");
    }
}

/// An endpoint's response fields reach HTTP/1.1 and HTTP/2 clients as it
/// sent them: values byte for byte, a repeated field in its order, the
/// hop-by-hop ones (`te`, `proxy-authenticate`) left out, and the
/// affinity cookie the proxy adds after the endpoint's own; an HTTP/2
/// client gets its trailers likewise, less the fields a trailer section
/// may not carry. An HTTP/2
/// client's response head is encoded from the endpoint's fields without a
/// header map, its trailers too; hyper's HTTP/1.1 server is given maps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoints_response_fields_reach_both_kinds_of_client_as_it_sent_them() {
    let endpoint = h2_endpoint(2, 65_535).await;
    let p = proxy1(&format!(
        "appProtocol: H2C\nloadBalancing: {{sessionAffinity: {{cookie: lb}}}}\nendpoints:\n  - {{address: \"{}\"}}\n",
        endpoint.addr
    ))
    .await;
    for (kind, c) in [("HTTP/1.1", client()), ("HTTP/2", h2_client())] {
        let req = Request::get(format!("http://{}/fields", p.addr)).header("te", "trailers").body(Full::default());
        let resp = tokio::time::timeout(Duration::from_secs(10), c.request(req.expect("request")))
            .await
            .expect("in time")
            .expect("response");
        let (head, body) = resp.into_parts();
        let body = tokio::time::timeout(Duration::from_secs(10), body.collect()).await.expect("in time").expect("body");
        let trailers = body.trailers().cloned().unwrap_or_default();
        let r = Reply { status: head.status, headers: head.headers, body: String::new() };
        let values = |map: &http::HeaderMap, name: &str| -> Vec<String> {
            map.get_all(name).iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect()
        };
        if kind == "HTTP/2" {
            assert_eq!(values(&trailers, "grpc-status"), ["0"], "{kind}: {trailers:?}");
            assert_eq!(values(&trailers, "x-trailer"), ["One, Two", "three"], "{kind}: {trailers:?}");
            assert_eq!(trailers.len(), 3, "{kind}: content-type and host are not for trailers: {trailers:?}");
        }
        let all = |name: &str| -> Vec<String> {
            r.headers.get_all(name).iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect()
        };
        assert_eq!(all("content-type"), ["text/plain"], "{kind}");
        assert_eq!(all("x-tag"), ["Mixed Case, and a comma"], "{kind}");
        let cookies = all("set-cookie");
        assert_eq!(cookies.len(), 3, "{kind}: {cookies:?}");
        assert_eq!(cookies[..2], ["a=1", "b=2"], "{kind}");
        assert!(cookies[2].starts_with("lb="), "{kind}: the proxy's cookie comes last: {cookies:?}");
        for hop in ["te", "proxy-authenticate"] {
            assert!(r.headers.get(hop).is_none(), "{kind}: {hop} is hop-by-hop: {:?}", r.headers);
        }
    }
    p.shutdown().await;
}

/// An HTTP/2 client's request reaches an HTTP/2 endpoint as the proxy
/// rewrites any request: its method, `:authority` and `:path` as sent, the
/// scheme `http`, its fields in order, `te: trailers` kept (gRPC needs
/// it), its `cookie` fields joined into one after the others (RFC 9113
/// §8.2.3), hop-by-hop
/// fields gone, the forwarding fields the proxy's own (the client's forged
/// `x-forwarded-for`, `-proto` and `-client-cert` replaced), and its body
/// streamed. Such a request is encoded without a header map; one with a
/// `host` field of its own goes the map way and arrives alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_clients_request_reaches_an_http2_endpoint_rewritten_as_any_request() {
    let endpoint = h2_endpoint(2, 65_535).await;
    let p = proxy1(&format!("appProtocol: H2C\nendpoints:\n  - {{address: \"{}\"}}\n", endpoint.addr)).await;
    let (mut client, conn) = h2_connect(p.addr).await;
    let mut call = async |req: Request<()>| {
        let (response, mut send) = client.send_request(req, false).expect("send");
        send.send_data(Bytes::from_static(b"hello"), true).expect("body");
        let resp = tokio::time::timeout(Duration::from_secs(5), response).await.expect("in time").expect("response");
        let mut body = resp.into_body();
        let mut got = Vec::new();
        while let Some(chunk) = tokio::time::timeout(Duration::from_secs(5), body.data()).await.expect("in time") {
            let chunk = chunk.expect("data");
            let _ = body.flow_control().release_capacity(chunk.len());
            got.extend_from_slice(&chunk);
        }
        String::from_utf8(got).expect("text")
    };
    let request = |host: Option<&str>| {
        let mut b = Request::post("https://shop.example:8080/head?q=1")
            .header("content-type", "application/grpc")
            .header("cookie", "a=1")
            .header("x-app", "Kept As Is")
            .header("cookie", "b=2")
            .header("te", "trailers")
            .header("x-forwarded-for", "9.9.9.9")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-client-cert", "forged")
            .header("proxy-authorization", "Basic eDp5")
            .header("x-last", "1");
        if let Some(host) = host {
            b = b.header("host", host);
        }
        b.body(()).expect("request")
    };
    let relayed = call(request(None)).await;
    let expected = [
        ":method: POST",
        ":scheme: http",
        ":authority: shop.example:8080",
        ":path: /head?q=1",
        "content-type: application/grpc",
        "x-app: Kept As Is",
        "te: trailers",
        "x-last: 1",
        "cookie: a=1; b=2",
        "x-forwarded-for: 127.0.0.1",
        "x-forwarded-proto: http",
        "body: 5",
    ];
    assert_eq!(relayed.lines().collect::<Vec<_>>(), expected, "{relayed}");
    // The map path sends the cookies as the client did, one field each, and
    // the forwarding fields where the map has them; the same fields else.
    let mapped = call(request(Some("shop.example:8080"))).await;
    let mut mapped: Vec<&str> = mapped.lines().filter(|l| !l.starts_with("cookie: ")).collect();
    let mut relayed: Vec<&str> = relayed.lines().filter(|l| !l.starts_with("cookie: ")).collect();
    mapped.sort_unstable();
    relayed.sort_unstable();
    assert_eq!(mapped, relayed);
    drop(client);
    conn.abort();
    p.shutdown().await;
}
