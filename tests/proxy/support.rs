//! Test backends, a client, and a proxy started from YAML, all on loopback.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fulcrum::discovery::Snapshot;
use fulcrum::proxy::ProxyHandle;
use fulcrum::proxy::config::ProxyConfig;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// What a test backend does; changed by the test while it runs.
#[derive(Debug)]
pub struct Behaviour {
    pub delay_ms: AtomicU64,
    pub status: AtomicU16,
    pub healthy: AtomicBool,
    /// Close the connection on each request instead of answering.
    pub hang_up: AtomicBool,
    pub hits: AtomicU64,
    /// Connections accepted so far.
    pub accepted: AtomicU64,
    /// Answer 500 to every n-th request (0: never).
    pub fail_every: AtomicU64,
}

/// An HTTP backend on its own loopback address.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub behaviour: Arc<Behaviour>,
    task: Option<JoinHandle<()>>,
    conns: Arc<Mutex<JoinSet<()>>>,
}

impl Backend {
    /// Starts backend `name` on 127.0.0.`host`, on an ephemeral port.
    pub async fn start(name: &str, host: u8) -> Backend {
        Self::start_on(name, SocketAddr::from(([127, 0, 0, host], 0))).await
    }

    pub async fn start_on(name: &str, addr: SocketAddr) -> Backend {
        let listener = TcpListener::bind(addr).await.expect("bind test backend");
        let addr = listener.local_addr().expect("backend address");
        let behaviour = Arc::new(Behaviour {
            delay_ms: AtomicU64::new(0),
            status: AtomicU16::new(200),
            healthy: AtomicBool::new(true),
            hang_up: AtomicBool::new(false),
            hits: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            fail_every: AtomicU64::new(0),
        });
        let (b, n) = (behaviour.clone(), name.to_owned());
        let conns = Arc::new(Mutex::new(JoinSet::new()));
        let accepted = conns.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                b.accepted.fetch_add(1, Ordering::Relaxed);
                let (b, n) = (b.clone(), n.clone());
                let mut set = accepted.lock().unwrap_or_else(|p| p.into_inner());
                set.spawn(async move {
                    let svc = service_fn(move |req| respond(b.clone(), n.clone(), req));
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
                while set.try_join_next().is_some() {}
            }
        });
        Backend { name: name.to_owned(), addr, behaviour, task: Some(task), conns }
    }

    /// Stops listening and closes every open connection, like a crashed
    /// process; returns once the listener and the connections are gone (an
    /// abort alone takes effect whenever the runtime next polls the tasks).
    pub async fn kill(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
        let mut set = std::mem::take(&mut *self.conns.lock().unwrap_or_else(|p| p.into_inner()));
        set.shutdown().await;
    }

    pub fn hits(&self) -> u64 {
        self.behaviour.hits.load(Ordering::Relaxed)
    }

    pub fn set_delay(&self, d: Duration) {
        self.behaviour.delay_ms.store(d.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn set_status(&self, s: u16) {
        self.behaviour.status.store(s, Ordering::Relaxed);
    }

    pub fn set_hang_up(&self, h: bool) {
        self.behaviour.hang_up.store(h, Ordering::Relaxed);
    }

    pub fn set_healthy(&self, h: bool) {
        self.behaviour.healthy.store(h, Ordering::Relaxed);
    }

    /// Answers 500 to every `n`-th request from now on (0: never), as a faulty version would.
    pub fn set_fail_every(&self, n: u64) {
        self.behaviour.fail_every.store(n, Ordering::Relaxed);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).abort_all();
    }
}

type TestBody = Either<Full<Bytes>, Incoming>;

/// `/healthz`: 200 or 503; `/echo`: streams the request body back;
/// `/headers`: the request headers, one per line; anything else: the
/// backend's name after the configured delay, with the configured status.
async fn respond(
    b: Arc<Behaviour>,
    name: String,
    req: Request<Incoming>,
) -> Result<Response<TestBody>, std::io::Error> {
    let text = |status: u16, body: String| {
        let mut r = Response::new(Either::Left(Full::new(Bytes::from(body))));
        *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        r.headers_mut().insert("x-backend", name.parse().expect("backend name is a header value"));
        r
    };
    match req.uri().path() {
        "/healthz" => {
            let ok = b.healthy.load(Ordering::Relaxed);
            return Ok(text(if ok { 200 } else { 503 }, String::new()));
        }
        "/echo" => {
            b.hits.fetch_add(1, Ordering::Relaxed);
            let mut r = Response::new(Either::Right(req.into_body()));
            r.headers_mut().insert("x-backend", name.parse().expect("header value"));
            return Ok(r);
        }
        "/headers" => {
            b.hits.fetch_add(1, Ordering::Relaxed);
            let lines: String =
                req.headers().iter().map(|(k, v)| format!("{k}: {}\n", v.to_str().unwrap_or("?"))).collect();
            return Ok(text(200, lines));
        }
        _ => {}
    }
    let hit = b.hits.fetch_add(1, Ordering::Relaxed) + 1;
    if b.hang_up.load(Ordering::Relaxed) {
        // An error from the service makes hyper close the connection without a response.
        return Err(std::io::Error::other("hanging up"));
    }
    let delay = b.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let every = b.fail_every.load(Ordering::Relaxed);
    if every > 0 && hit.is_multiple_of(every) {
        return Ok(text(500, name.clone()));
    }
    Ok(text(b.status.load(Ordering::Relaxed), name.clone()))
}

/// Starts `n` backends named b1..bn on 127.0.0.2.. .
pub async fn backends(n: u8) -> Vec<Backend> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(Backend::start(&format!("b{}", i + 1), i + 2).await);
    }
    v
}

/// The YAML `endpoints:` block for `backends`.
pub fn endpoints_yaml(backends: &[Backend]) -> String {
    let mut s = String::from("endpoints:\n");
    for b in backends {
        s.push_str(&format!("  - {{address: \"{}\"}}\n", b.addr));
    }
    s
}

/// Starts a proxy with one worker thread: one balancer, so rotations are
/// exact across connections (each worker keeps its own rotation).
pub async fn proxy1(yaml: &str) -> ProxyHandle {
    proxy(&format!("workers: 1\n{yaml}")).await
}

/// Starts a proxy from YAML (without `listen` and `admin`: both are added on ephemeral ports).
pub async fn proxy(yaml: &str) -> ProxyHandle {
    let text = format!("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n{yaml}");
    let config = ProxyConfig::parse(&text).unwrap_or_else(|e| panic!("test config invalid: {e}\n{text}"));
    ProxyHandle::start(Snapshot::standalone(config)).await.expect("proxy starts")
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

/// An HTTP/1.1 keep-alive client.
pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// An h2c (prior knowledge) client.
pub fn h2_client() -> TestClient {
    Client::builder(TokioExecutor::new()).http2_only(true).build(HttpConnector::new())
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn backend(&self) -> &str {
        self.headers.get("x-backend").and_then(|v| v.to_str().ok()).unwrap_or("")
    }
}

pub async fn send(client: &TestClient, req: Request<Full<Bytes>>) -> Result<Reply, String> {
    let fut = client.request(req);
    let resp = tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| "request timed out".to_owned())?
        .map_err(|e| format!("{e:?}"))?;
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Reply { status: parts.status, headers: parts.headers, body: String::from_utf8_lossy(&bytes).into_owned() })
}

pub async fn get(client: &TestClient, proxy: &ProxyHandle, path: &str) -> Reply {
    get_with(client, proxy, path, &[]).await
}

pub async fn get_with(client: &TestClient, proxy: &ProxyHandle, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut b = Request::get(format!("http://{}{path}", proxy.addr));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(client, b.body(Full::default()).expect("request")).await.expect("request through the proxy")
}

/// Requests per backend over `n` sequential GETs.
pub async fn spread(client: &TestClient, proxy: &ProxyHandle, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let r = get(client, proxy, "/").await;
        assert_eq!(r.status, 200, "{r:?}");
        *counts.entry(r.backend().to_owned()).or_insert(0) += 1;
    }
    counts
}

/// Polls `cond` every 20 ms until it holds or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// GET on the admin listener.
pub async fn admin(proxy: &ProxyHandle, path: &str) -> Reply {
    let addr = proxy.admin.expect("admin listener");
    let req = Request::get(format!("http://{addr}{path}")).body(Full::default()).expect("request");
    send(&client(), req).await.expect("admin request")
}

/// A raw HTTP/1.1 backend that records each request head as received (the
/// request line and the header lines, byte for byte) and answers 200.
pub struct RawBackend {
    pub addr: SocketAddr,
    pub heads: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl RawBackend {
    pub async fn start(host: u8) -> RawBackend {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, host], 0))).await.expect("bind raw backend");
        let addr = listener.local_addr().expect("raw backend address");
        let heads = Arc::new(Mutex::new(Vec::new()));
        let recorded = heads.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                let recorded = recorded.clone();
                conns.spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // Bodyless requests only; at most 64 KiB of heads per connection.
                    while buf.len() < 65536 {
                        let Ok(n) = stream.read(&mut chunk).await else { return };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head: Vec<u8> = buf.drain(..end + 4).collect();
                            recorded
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(String::from_utf8_lossy(&head).into_owned());
                            let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if stream.write_all(reply).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        RawBackend { addr, heads, task }
    }

    /// The request heads received so far.
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A `GET` sent with the `h2` crate's client, on a connection of its own.
pub struct H2Call {
    pub client: h2::client::SendRequest<Bytes>,
    /// The connection's task.
    pub conn: JoinHandle<Result<(), h2::Error>>,
    pub response: h2::client::ResponseFuture,
    pub stream: h2::SendStream<Bytes>,
}

/// An HTTP/2 connection of the `h2` crate's client to `addr`, ready for a
/// request, and the task driving it.
pub async fn h2_connect(
    addr: SocketAddr,
) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<Result<(), h2::Error>>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("handshake");
    let conn = tokio::spawn(conn);
    (client.ready().await.expect("ready"), conn)
}

/// Sends `GET path` to `addr` over HTTP/2 (prior knowledge).
pub async fn h2_get(addr: SocketAddr, path: &str) -> H2Call {
    let (mut client, conn) = h2_connect(addr).await;
    let head = Request::get(format!("http://{addr}{path}")).body(()).expect("request");
    let (response, stream) = client.send_request(head, true).expect("send");
    H2Call { client, conn, response, stream }
}

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One HTTP/2 frame, for peers scripted byte by byte.
pub fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("small frame").to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HTTP/2 frames in `bytes` (after any preface): their types and, for a
/// `GOAWAY`, its error code.
pub fn h2_frames(mut bytes: &[u8]) -> Vec<(u8, Option<u32>)> {
    let mut out = Vec::new();
    while bytes.len() >= 9 {
        let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        let payload = &bytes[9..(9 + len).min(bytes.len())];
        let code = (bytes[3] == 7 && payload.len() >= 8)
            .then(|| u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]));
        out.push((bytes[3], code));
        bytes = &bytes[(9 + len).min(bytes.len())..];
    }
    out
}
