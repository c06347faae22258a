//! The proxy's HTTP/2 server connection ([`ServerConn`]) against the
//! clients of the ecosystem: the `h2` crate's (hyper's) and nghttp2's (in
//! curl), over loopback, with an echo application on top: many streams at
//! once, request and response bodies far larger than the default windows
//! (so both sides' flow control has to work), trailers, a graceful close.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use fulcrum::proxy::h2conn::{Config, Handler, RequestHead, ServerConn};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An application answering each request, once it has ended, with its
/// path in `x-path`, its `x-request-id`, and its body echoed back.
#[derive(Default)]
struct Echo {
    requests: HashMap<u32, (String, String, Vec<u8>)>,
    ended: Vec<u32>,
    consumed: Vec<(u32, usize)>,
    /// Response bodies not yet sent whole: the bytes and how many went.
    sending: HashMap<u32, (Vec<u8>, usize)>,
    writable: Vec<u32>,
    served: usize,
}

impl Handler for Echo {
    fn request(&mut self, stream: u32, head: &RequestHead, end_stream: bool) {
        let path = String::from_utf8_lossy(head.path().unwrap_or_default()).into_owned();
        let id = head
            .fields()
            .find(|(n, _)| *n == b"x-request-id")
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        self.requests.insert(stream, (path, id, Vec::new()));
        if end_stream {
            self.ended.push(stream);
        }
    }
    fn data(&mut self, stream: u32, data: &[u8], end_stream: bool) {
        if let Some((_, _, body)) = self.requests.get_mut(&stream) {
            body.extend_from_slice(data);
        }
        self.consumed.push((stream, data.len()));
        if end_stream {
            self.ended.push(stream);
        }
    }
    fn trailers(&mut self, stream: u32, _: &RequestHead) {
        self.ended.push(stream);
    }
    fn reset(&mut self, stream: u32, _: u32) {
        self.requests.remove(&stream);
        self.sending.remove(&stream);
    }
    fn writable(&mut self, stream: u32) {
        self.writable.push(stream);
    }
}

impl Echo {
    /// What the application does after each read.
    fn act(&mut self, conn: &mut ServerConn) {
        for (stream, n) in self.consumed.drain(..) {
            conn.release(stream, n);
        }
        for stream in std::mem::take(&mut self.ended) {
            let Some((path, id, body)) = self.requests.remove(&stream) else { continue };
            let len = body.len().to_string();
            let fields = [
                (&b"x-path"[..], path.as_bytes()),
                (b"x-request-id", id.as_bytes()),
                (b"content-length", len.as_bytes()),
            ];
            conn.send_response(stream, 200, fields, body.is_empty()).expect("open stream");
            if body.is_empty() {
                self.served += 1;
            } else {
                self.sending.insert(stream, (body, 0));
                self.writable.push(stream);
            }
        }
        for stream in std::mem::take(&mut self.writable) {
            let Some((body, sent)) = self.sending.get_mut(&stream) else { continue };
            *sent += conn.send_data(stream, &body[*sent..], true).expect("open stream");
            if *sent == body.len() {
                self.sending.remove(&stream);
                self.served += 1;
            }
        }
    }
}

/// Serves one connection with [`Echo`] until it is done, the client
/// closes, or 10 s pass; then how many responses were sent whole.
async fn serve(listener: TcpListener, shutdown_after: Option<usize>) -> usize {
    let (mut s, _) = listener.accept().await.expect("accept");
    let mut conn = ServerConn::new(Config::default());
    let mut app = Echo::default();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = std::mem::take(conn.output());
        if s.write_all(&out).await.is_err() || conn.is_done() {
            break;
        }
        let n = match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        buf.extend_from_slice(&chunk[..n]);
        let taken = conn.recv(&buf, &mut app).expect("a conforming client");
        buf.drain(..taken);
        app.act(&mut conn);
        if shutdown_after.is_some_and(|n| app.served >= n) {
            conn.shutdown();
        }
    }
    app.served
}

fn body(i: usize) -> Vec<u8> {
    let len = [0, 1, 1000, 70_000, 300_000][i % 5];
    (0..len).map(|j| (i * 31 + j) as u8).collect()
}

/// Twenty streams at once from the `h2` crate's client, bodies up to
/// 300 KB each way (the client's windows are 64 KiB), trailers on some;
/// then a graceful close after the twenty-first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_h2_crates_client_gets_every_stream_answered_through_both_windows() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(serve(listener, Some(21)));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("handshake");
    let conn = tokio::spawn(conn);
    let mut calls = Vec::new();
    for i in 0..20 {
        let mut client = client.clone();
        calls.push(tokio::spawn(async move {
            let sent = body(i);
            let req = http::Request::post(format!("http://a/call/{i}"))
                .header("x-request-id", format!("r{i}"))
                .body(())
                .expect("request");
            client = client.ready().await.expect("ready");
            let (resp, mut out) = client.send_request(req, sent.is_empty()).expect("send");
            if !sent.is_empty() {
                let mut rest = Bytes::from(sent.clone());
                while !rest.is_empty() {
                    out.reserve_capacity(rest.len());
                    let cap = std::future::poll_fn(|cx| out.poll_capacity(cx)).await.expect("capacity").expect("open");
                    let piece = rest.split_to(cap.min(rest.len()));
                    out.send_data(piece, false).expect("data");
                }
                if i % 2 == 0 {
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("x-checksum", "1".parse().expect("value"));
                    out.send_trailers(trailers).expect("trailers");
                } else {
                    out.send_data(Bytes::new(), true).expect("end");
                }
            }
            let resp = resp.await.expect("response");
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.headers()["x-path"], format!("/call/{i}").as_str());
            assert_eq!(resp.headers()["x-request-id"], format!("r{i}").as_str());
            let mut got = Vec::new();
            let mut rx = resp.into_body();
            while let Some(chunk) = rx.data().await {
                let chunk = chunk.expect("chunk");
                rx.flow_control().release_capacity(chunk.len()).expect("release");
                got.extend_from_slice(&chunk);
            }
            assert_eq!(got.len(), sent.len(), "stream {i}");
            assert!(got == sent, "stream {i}: the body came back changed");
        }));
    }
    for call in calls {
        tokio::time::timeout(Duration::from_secs(10), call).await.expect("in time").expect("call");
    }
    // The twenty-first response starts the graceful close: the connection ends.
    let mut client = client.ready().await.expect("ready");
    let (resp, _) =
        client.send_request(http::Request::get("http://a/last").body(()).expect("request"), true).expect("send");
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), resp).await.expect("in time").expect("response").status(),
        200
    );
    drop(client);
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the client's connection ends")
        .expect("task")
        .expect("clean");
    assert_eq!(tokio::time::timeout(Duration::from_secs(5), server).await.expect("in time").expect("server"), 21);
}

/// curl (nghttp2) uploads 300 KB and gets it back. (One request per
/// connection: curl 7.88 fails to reuse a prior-knowledge HTTP/2
/// connection, hyper's server's too.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_uploads_and_downloads_through_the_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(serve(listener, None));
    let dir = std::env::temp_dir().join(format!("fulcrum-h2conn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let upload = dir.join("upload.bin");
    let sent = body(4);
    std::fs::write(&upload, &sent).expect("write");
    let got = dir.join("got.bin");
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--http2-prior-knowledge", "-m", "10", "-D", "-", "-H", "x-request-id: curl-1"])
        .arg("--data-binary")
        .arg(format!("@{}", upload.display()))
        .arg("-o")
        .arg(&got)
        .arg(format!("http://{addr}/upload"))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(15), out).await.expect("in time").expect("curl");
    let heads = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "curl: {heads} {}", String::from_utf8_lossy(&out.stderr));
    for line in ["HTTP/2 200", "x-path: /upload", "x-request-id: curl-1", "content-length: 300000"] {
        assert!(heads.lines().any(|l| l.trim_end() == line), "{line:?} not in {heads}");
    }
    assert!(std::fs::read(&got).expect("read") == sent, "the upload came back changed");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(tokio::time::timeout(Duration::from_secs(5), server).await.expect("in time").expect("server"), 1);
}
