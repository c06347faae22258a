//! HTTP/2 clients' requests without a body to HTTP/1.1 endpoints, which go
//! over the fast path's sockets: every response framing an HTTP/1.1
//! endpoint may use arrives whole (chunked trailers as HTTP/2 trailers),
//! hop-by-hop headers stay behind, connections are reused only when clean,
//! a broken body never ends cleanly, and curl agrees.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::support::*;

/// An HTTP/1.1 endpoint that answers by path with the exact bytes of each
/// framing, some of them written a few bytes at a time.
struct Scripted {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    requests: Arc<std::sync::Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

/// `n` bytes of letters, in order.
fn letters(n: usize) -> Vec<u8> {
    (0..n).map(|i| b'a' + (i % 26) as u8).collect()
}

/// Length of the large bodies: many times the proxy's read buffer.
const BIG: usize = 300_000;

static BIG_LENGTH: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let mut v = format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n").into_bytes();
    v.extend(letters(BIG));
    v
});

static BIG_CHUNKED: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let mut v = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for piece in letters(BIG).chunks(7_001) {
        v.extend(format!("{:x}\r\n", piece.len()).into_bytes());
        v.extend_from_slice(piece);
        v.extend_from_slice(b"\r\n");
    }
    v.extend_from_slice(b"0\r\n\r\n");
    v
});

/// What the endpoint writes for `path` (to a request with `method`), and
/// whether it closes the connection after.
fn script(method: &str, path: &str) -> (Vec<&'static [u8]>, bool) {
    match (method, path) {
        ("HEAD", _) => (vec![b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"], false),
        (_, "/len") => (
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nSet-Cookie: a=1\r\nConnection: x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nX-Kept: yes\r\nset-cookie: b=2\r\n\r\nhello"],
            false,
        ),
        (_, "/chunked") => (
            vec![
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n4;e=1\r",
                b"\nwi",
                b"ki\r\n5\r\npe",
                b"dia\r\n0\r\nx-sum: 9\r\nconte",
                b"nt-length: 3\r\n\r\n",
            ],
            false,
        ),
        (_, "/big") => (vec![BIG_LENGTH.as_slice()], false),
        (_, "/bigchunked") => (vec![BIG_CHUNKED.as_slice()], false),
        (_, "/close") => (vec![b"HTTP/1.1 200 OK\r\n\r\nuntil ", b"the end"], true),
        (_, "/interim") => (
            vec![b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"],
            false,
        ),
        (_, "/empty") => (vec![b"HTTP/1.1 204 No Content\r\n\r\n"], false),
        (_, "/cut") => (vec![b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello"], true),
        (_, "/badchunk") => (vec![b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\n"], false),
        // Answers, then closes the connection without saying so: the proxy
        // finds it closed when it next takes it from its pool.
        (_, "/stale") => (vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"], true),
        _ => (vec![b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"], false),
    }
}

impl Scripted {
    async fn start(host: u8) -> Scripted {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, host], 0))).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (count, seen) = (accepted.clone(), requests.clone());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                conns.spawn(serve_scripted(s, seen.clone()));
            }
        });
        Scripted { addr, accepted, requests, task }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

async fn serve_scripted(mut s: TcpStream, seen: Arc<std::sync::Mutex<Vec<String>>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    for _ in 0..100 {
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            match s.read(&mut chunk).await {
                Ok(n) if n > 0 && buf.len() < 65536 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        };
        let head: Vec<u8> = buf.drain(..end + 4).collect();
        let head = String::from_utf8_lossy(&head).into_owned();
        let mut line = head.split(' ');
        let (method, path) = (line.next().unwrap_or("").to_owned(), line.next().unwrap_or("").to_owned());
        let length = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.trim().parse().unwrap_or(0))
            })
            .unwrap_or(0usize);
        while buf.len() < length {
            match s.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        }
        let body: Vec<u8> = buf.drain(..length).collect();
        seen.lock().unwrap_or_else(|p| p.into_inner()).push(head);
        if path == "/echo" {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
            if s.write_all(head.as_bytes()).await.is_err() || s.write_all(&body).await.is_err() {
                return;
            }
            continue;
        }
        let (parts, close) = script(&method, &path);
        for part in parts {
            if s.write_all(part).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if close {
            if path == "/stale" {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            return;
        }
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A response over HTTP/2, read whole: status, headers, body, trailers; or
/// the error that ended it.
async fn fetch(client: &TestClient, req: Request<Full<Bytes>>) -> Result<(Reply, Option<http::HeaderMap>), String> {
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| format!("{e:?}"))?;
    let (parts, body) = resp.into_parts();
    let collected = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .map_err(|_| "body timed out".to_owned())?
        .map_err(|e| format!("{e:?}"))?;
    let trailers = collected.trailers().cloned();
    let body = String::from_utf8_lossy(&collected.to_bytes()).into_owned();
    Ok((Reply { status: parts.status, headers: parts.headers, body }, trailers))
}

fn req(method: &str, url: &str) -> Request<Full<Bytes>> {
    Request::builder().method(method).uri(url).body(Full::default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_framing_reaches_an_http2_client_whole() {
    let e = Scripted::start(41).await;
    let p = proxy1(&format!("endpoints: [{{address: \"{}\"}}]\n", e.addr)).await;
    let h2 = h2_client();
    let url = |path: &str| format!("http://{}{path}", p.addr);
    // An HTTP/1.1 client first: its endpoint connection is the one the
    // HTTP/2 client's requests then reuse (one pool for both).
    let (r, _) = fetch(&client(), req("GET", &url("/len"))).await.unwrap();
    assert_eq!(r.body, "hello");

    let (r, _) = fetch(&h2, req("GET", &url("/len"))).await.unwrap();
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "hello"));
    // Names in the endpoint's case go out in lower case (HTTP/2 refuses
    // others), a repeated field keeps every value in order.
    assert_eq!(r.headers["x-kept"], "yes");
    let cookies: Vec<_> = r.headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    for hop in ["connection", "x-hop", "keep-alive"] {
        assert!(!r.headers.contains_key(hop), "{hop} reached the client: {:?}", r.headers);
    }

    let (r, trailers) = fetch(&h2, req("GET", &url("/chunked"))).await.unwrap();
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "wikipedia"));
    assert!(!r.headers.contains_key("transfer-encoding"));
    let trailers = trailers.expect("the chunked body's trailers arrive as HTTP/2 trailers");
    assert_eq!(trailers["x-sum"], "9");
    assert!(!trailers.contains_key("content-length"), "{trailers:?}");

    let (r, _) = fetch(&h2, req("GET", &url("/interim"))).await.unwrap();
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "ok"));
    let (r, _) = fetch(&h2, req("GET", &url("/empty"))).await.unwrap();
    assert_eq!((r.status.as_u16(), r.body.as_str()), (204, ""));
    let (r, _) = fetch(&h2, req("HEAD", &url("/len"))).await.unwrap();
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, ""));
    assert_eq!(r.headers["content-length"], "5");
    let (r, _) = fetch(&h2, req("DELETE", &url("/len"))).await.unwrap();
    assert_eq!(r.body, "hello");

    // All of these went over one endpoint connection, one after the other,
    // the HTTP/1.1 client's included.
    assert_eq!(e.accepted.load(Ordering::Relaxed), 1, "{:?}", e.requests());
    let (r, _) = fetch(&h2, req("GET", &url("/close"))).await.unwrap();
    assert_eq!(r.body, "until the end");
    let (r, _) = fetch(&h2, req("GET", &url("/len"))).await.unwrap();
    assert_eq!(r.body, "hello");
    assert_eq!(e.accepted.load(Ordering::Relaxed), 2, "a close-delimited body's connection is not reused");

    // The endpoint got HTTP/1.1 heads with the client's host and the forwarding headers.
    let heads = e.requests();
    assert!(heads[0].starts_with("GET /len HTTP/1.1\r\n"), "{heads:?}");
    assert!(heads[0].contains(&format!("host: {}\r\n", p.addr)), "{heads:?}");
    assert!(heads[0].contains("x-forwarded-for: 127.0.0.1\r\n"), "{heads:?}");
    assert!(heads.iter().any(|h| h.starts_with("HEAD /len HTTP/1.1\r\n")), "{heads:?}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_many_times_the_read_buffer_arrive_whole_and_in_order() {
    let e = Scripted::start(48).await;
    let p = proxy1(&format!("endpoints: [{{address: \"{}\"}}]\n", e.addr)).await;
    let h2 = h2_client();
    let want = String::from_utf8(letters(BIG)).unwrap();
    for path in ["/big", "/bigchunked", "/big", "/len"] {
        let (r, _) = fetch(&h2, req("GET", &format!("http://{}{path}", p.addr))).await.unwrap();
        assert_eq!(r.status.as_u16(), 200, "{path}");
        if path == "/len" {
            assert_eq!(r.body, "hello", "the buffer a large body used serves the next response");
            continue;
        }
        assert_eq!(r.body.len(), BIG, "{path}");
        assert!(r.body == want, "{path}: the body arrived out of order or damaged");
        assert!(!r.headers.contains_key("transfer-encoding"), "{path}");
    }
    assert_eq!(e.accepted.load(Ordering::Relaxed), 1, "each body ended cleanly, so one connection served all");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_body_never_ends_cleanly_and_its_connection_is_dropped() {
    let e = Scripted::start(42).await;
    let p = proxy1(&format!("endpoints: [{{address: \"{}\"}}]\n", e.addr)).await;
    let h2 = h2_client();
    let url = |path: &str| format!("http://{}{path}", p.addr);
    let cut = fetch(&h2, req("GET", &url("/cut"))).await;
    assert!(cut.is_err(), "a body cut short ended cleanly: {cut:?}");
    let bad = fetch(&h2, req("GET", &url("/badchunk"))).await;
    assert!(bad.is_err(), "a malformed chunked body ended cleanly: {bad:?}");
    // The client's connection is fine, and the next request gets a new endpoint connection.
    let before = e.accepted.load(Ordering::Relaxed);
    let (r, _) = fetch(&h2, req("GET", &url("/len"))).await.unwrap();
    assert_eq!(r.body, "hello");
    assert_eq!(e.accepted.load(Ordering::Relaxed), before + 1);
    assert!(
        eventually(Duration::from_secs(2), || async { admin(&p, "/endpoints").await.body.contains("\"inFlight\": 0") })
            .await
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_endpoint_closed_is_replaced_without_failing_the_request() {
    let e = Scripted::start(43).await;
    // No retries: the request succeeds on the stale connection's replacement alone.
    let p = proxy1(&format!("retries: {{attempts: 0}}\nendpoints: [{{address: \"{}\"}}]\n", e.addr)).await;
    let h2 = h2_client();
    for i in 0..5 {
        let (r, _) = fetch(&h2, req("GET", &format!("http://{}/stale", p.addr))).await.unwrap();
        assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "ok"), "request {i}");
        // Let the endpoint close the connection while it idles in the pool.
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert_eq!(e.accepted.load(Ordering::Relaxed), 5);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_h2c_gets_every_framing_and_sends_a_body_to_an_http1_endpoint() {
    let e = Scripted::start(44).await;
    let p = proxy1(&format!("endpoints: [{{address: \"{}\"}}]\n", e.addr)).await;
    for (path, data, want) in [
        ("/len", None, "hello"),
        ("/chunked", None, "wikipedia"),
        ("/close", None, "until the end"),
        ("/echo", Some("a form=from curl"), "a form=from curl"),
    ] {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--http2-prior-knowledge", "--max-time", "10", "-w", "|%{http_version}|%{http_code}"])
            .args(data.map(|d| ["--data-binary", d]).into_iter().flatten())
            .arg(format!("http://{}{path}", p.addr))
            .kill_on_drop(true)
            .output()
            .await
            .expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text, format!("{want}|2|200"), "{path}: {}", String::from_utf8_lossy(&out.stderr));
    }
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_of_known_length_arrive_whole_small_or_large() {
    let e = Scripted::start(45).await;
    let p = proxy1(&format!("endpoints: [{{address: \"{}\"}}]\n", e.addr)).await;
    let h2 = h2_client();
    let url = format!("http://{}/echo", p.addr);
    // Small (read whole, sent with its head) and larger than the 64 KiB read
    // whole (streamed by hyper's client), each twice.
    for size in [1000usize, 1000, 100 * 1024, 100 * 1024] {
        let body: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
        let req =
            Request::post(&url).header("content-length", size).body(Full::new(Bytes::from(body.clone()))).unwrap();
        let (r, _) = fetch(&h2, req).await.unwrap();
        assert_eq!(r.status.as_u16(), 200);
        assert_eq!(r.body.as_bytes(), &body[..], "{size} bytes");
    }
    // The small bodies shared one connection of the fast path's pool, the
    // large ones one of hyper's.
    assert_eq!(e.accepted.load(Ordering::Relaxed), 2);
    let heads = e.requests();
    assert_eq!(heads.len(), 4);
    assert!(
        heads[0].starts_with("POST /echo HTTP/1.1\r\n") && heads[0].contains("content-length: 1000\r\n"),
        "{heads:?}"
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_that_stalls_is_answered_400_after_body_idle_and_never_sent() {
    use http_body_util::StreamBody;
    let e = Scripted::start(46).await;
    let p = proxy1(&format!("timeouts: {{bodyIdle: 300ms}}\nendpoints: [{{address: \"{}\"}}]\n", e.addr)).await;
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    // Half of a 10-byte body, then nothing.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>(1);
    tx.send(Ok(hyper::body::Frame::data(Bytes::from_static(b"hello")))).await.unwrap();
    let body = StreamBody::new(tokio_stream_from(rx));
    let req = Request::post(format!("http://{}/echo", p.addr)).header("content-length", "10").body(body).unwrap();
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req)).await.unwrap();
    // hyper's client may report the stream's end (the proxy answers, then
    // resets the request half it stopped reading) instead of the answer.
    if let Ok(resp) = &answer {
        assert_eq!(resp.status(), 400);
    }
    assert!(started.elapsed() >= Duration::from_millis(250), "{:?}", started.elapsed());
    assert!(e.requests().is_empty(), "the endpoint saw {:?}", e.requests());
    let m = admin(&p, "/metrics").await.body;
    assert!(m.contains("fulcrum_proxy_client_timeouts_total{timeout=\"bodyIdle\"} 1"), "{m}");
    assert!(m.contains("fulcrum_proxy_local_responses_total{code=\"400\"} 1"), "{m}");
    drop(tx);
    conn.abort();
    p.shutdown().await;
}

/// A client that goes away in the middle of a request body: its connection's
/// end reaches the stream, which is answered `400` and counted (though no one
/// reads the answer), and the request never reaches the endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_in_the_middle_of_a_body_is_counted_and_its_request_never_sent() {
    let e = Scripted::start(47).await;
    let p = proxy1(&format!("endpoints: [{{address: \"{}\"}}]\n", e.addr)).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let mut hello = H2_PREFACE.to_vec();
    hello.extend(h2_frame(4, 0, 0, &[]));
    // POST /echo on http://a with `content-length: 10` (HPACK static index 28).
    let mut block = vec![0x83, 0x86, 0x04, 5];
    block.extend_from_slice(b"/echo");
    block.extend_from_slice(&[0x01, 0x01, b'a', 0x0f, 0x0d, 2]);
    block.extend_from_slice(b"10");
    hello.extend(h2_frame(1, 0x4, 1, &block));
    // Five bytes of the ten, then the client is gone.
    hello.extend(h2_frame(0, 0, 1, b"hello"));
    s.write_all(&hello).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(s);
    let mut counted = String::new();
    for _ in 0..40 {
        counted = admin(&p, "/metrics").await.body;
        if counted.contains("fulcrum_proxy_local_responses_total{code=\"400\"} 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(counted.contains("fulcrum_proxy_local_responses_total{code=\"400\"} 1"), "{counted}");
    assert!(e.requests().is_empty(), "the endpoint saw {:?}", e.requests());
    p.shutdown().await;
}

/// The receiving half of a channel as a stream of body frames.
fn tokio_stream_from<T: Send + 'static>(mut rx: tokio::sync::mpsc::Receiver<T>) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// An HTTP/2 request on its way to an HTTP/1.1 endpoint (the `h2` crate as
/// the client) arrives as an HTTP/1.1 client would have sent it: the
/// `:authority` as its `Host`, its `Cookie` fields joined into one (RFC 9113
/// §8.2.3), `TE: trailers` kept, the forwarding fields the proxy's own (a
/// client's forged ones gone), `Content-Length: 0` on a `POST` without a
/// body. What an HTTP/1.1 head must not carry never reaches the endpoint: a
/// control byte in a value (the stream is refused) or a fragment in the path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_reach_an_http1_endpoint_as_an_http1_client_would_send_them() {
    let e = Scripted::start(49).await;
    let p = proxy1(&format!("endpoints: [{{address: \"{}\"}}]\n", e.addr)).await;
    let (mut client, conn) = h2_connect(p.addr).await;
    let mut call = async |req: Request<()>| {
        let (response, _) = client.send_request(req, true).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), response).await.unwrap().unwrap();
        let mut body = resp.into_body();
        let mut got = Vec::new();
        while let Some(chunk) = tokio::time::timeout(Duration::from_secs(5), body.data()).await.unwrap() {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            got.extend_from_slice(&chunk);
        }
        String::from_utf8(got).unwrap()
    };
    let get = Request::get("http://shop.example:8080/len")
        .header("cookie", "a=1")
        .header("x-app", "kept")
        .header("cookie", "b=2")
        .header("te", "trailers")
        .header("x-forwarded-for", "9.9.9.9")
        .header("x-forwarded-client-cert", "forged")
        .body(())
        .unwrap();
    assert_eq!(call(get).await, "hello");
    let post = Request::post(format!("http://{}/len", p.addr)).body(()).unwrap();
    assert_eq!(call(post).await, "hello");
    let heads = e.requests();
    assert_eq!(heads.len(), 2, "{heads:?}");
    let get = &heads[0];
    assert!(get.starts_with("GET /len HTTP/1.1\r\n"), "{get}");
    for line in [
        "\r\nhost: shop.example:8080\r\n",
        "\r\ncookie: a=1; b=2\r\n",
        "\r\nx-app: kept\r\n",
        "\r\nte: trailers\r\n",
        "\r\nx-forwarded-for: 127.0.0.1\r\n",
        "\r\nx-forwarded-proto: http\r\n",
    ] {
        assert!(get.contains(line), "{line:?} missing from {get}");
    }
    assert_eq!(get.matches("cookie:").count(), 1, "{get}");
    assert!(!get.contains("9.9.9.9") && !get.contains("forged"), "{get}");
    let post = &heads[1];
    assert!(post.starts_with("POST /len HTTP/1.1\r\n") && post.contains("\r\ncontent-length: 0\r\n"), "{post}");
    drop(client);
    conn.abort();

    // Frame by frame: GET /len on http://a with `x-bad: a<0x01>b`, then
    // GET /len#x on stream 3.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let mut hello = H2_PREFACE.to_vec();
    hello.extend(h2_frame(4, 0, 0, &[]));
    let mut block = vec![0x82, 0x86, 0x04, 4];
    block.extend_from_slice(b"/len");
    block.extend_from_slice(&[0x01, 0x01, b'a', 0x00, 5]);
    block.extend_from_slice(b"x-bad");
    block.extend_from_slice(&[3, b'a', 0x01, b'b']);
    hello.extend(h2_frame(1, 0x5, 1, &block));
    let mut block = vec![0x82, 0x86, 0x04, 6];
    block.extend_from_slice(b"/len#x");
    block.extend_from_slice(&[0x01, 0x01, b'a']);
    hello.extend(h2_frame(1, 0x5, 3, &block));
    s.write_all(&hello).await.unwrap();
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    // Until both streams are answered (a reset, or a head and "hello").
    for _ in 0..50 {
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&chunk[..n]),
            Ok(_) => break,
            Err(_) if h2_frames(&seen).iter().filter(|f| f.0 == 3 || f.0 == 0).count() >= 2 => break,
            Err(_) => {}
        }
    }
    assert!(
        h2_frames(&seen).iter().any(|f| f.0 == 3),
        "the bad value's stream was not refused: {:?}",
        h2_frames(&seen)
    );
    let heads = e.requests();
    assert!(heads[2..].iter().all(|h| !h.contains("x-bad") && !h.contains('#')), "{heads:?}");
    p.shutdown().await;
}
