//! The proxy's HTTP/2 connection ([`Conn`]) against the ecosystem's peers,
//! over loopback. Its server end serves the `h2` crate's (hyper's) client
//! and curl (nghttp2) with an echo application: many streams at once,
//! request and response bodies far larger than the default windows (so both
//! sides' flow control has to work), trailers, a graceful close. Its client
//! end calls a tonic server (gRPC unary, answers in trailers) and the `h2`
//! crate's server (bodies echoed through both windows).

use std::collections::HashMap;
use std::time::Duration;

use crate::grpc_peer;
use bytes::Bytes;
use fulcrum::proxy::h2conn::{Config, Conn, Handler, Head};
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
    fn request(&mut self, stream: u32, head: &Head, end_stream: bool) {
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
    fn trailers(&mut self, stream: u32, _: &Head) {
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
    fn act(&mut self, conn: &mut Conn) {
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
    let mut conn = Conn::server(Config::default());
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

// ---- The client end ----

/// What a client connection reads back: per stream, the status, the
/// fields, the body and the trailers, and resets.
#[derive(Default)]
struct Collect {
    heads: HashMap<u32, (u16, Vec<(String, String)>)>,
    bodies: HashMap<u32, Vec<u8>>,
    trailers: HashMap<u32, Vec<(String, String)>>,
    ended: Vec<u32>,
    resets: Vec<(u32, u32)>,
    consumed: Vec<(u32, usize)>,
    writable: Vec<u32>,
}

fn pairs(head: &Head) -> Vec<(String, String)> {
    head.fields()
        .map(|(n, v)| (String::from_utf8_lossy(n).into_owned(), String::from_utf8_lossy(v).into_owned()))
        .collect()
}

impl Handler for Collect {
    fn response(&mut self, stream: u32, status: u16, head: &Head, end_stream: bool) {
        self.heads.insert(stream, (status, pairs(head)));
        if end_stream {
            self.ended.push(stream);
        }
    }
    fn data(&mut self, stream: u32, data: &[u8], end_stream: bool) {
        self.bodies.entry(stream).or_default().extend_from_slice(data);
        self.consumed.push((stream, data.len()));
        if end_stream {
            self.ended.push(stream);
        }
    }
    fn trailers(&mut self, stream: u32, head: &Head) {
        self.trailers.insert(stream, pairs(head));
        self.ended.push(stream);
    }
    fn reset(&mut self, stream: u32, code: u32) {
        self.resets.push((stream, code));
    }
    fn writable(&mut self, stream: u32) {
        self.writable.push(stream);
    }
}

/// Sends one request per body on a client connection to `addr` (bodies
/// sent as windows allow) and reads until every stream has ended or been
/// reset, within 10 s.
async fn exchange(addr: std::net::SocketAddr, path: &str, fields: &[(&str, &str)], bodies: &[Vec<u8>]) -> Collect {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut conn = Conn::client(Config::default());
    let mut app = Collect::default();
    let mut sending: HashMap<u32, (usize, usize)> = HashMap::new();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut opened = 0;
    loop {
        // Open what the server's limit allows, then send what the windows allow.
        while opened < bodies.len() && conn.can_open() {
            let f = fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes()));
            let id = conn.send_request(b"POST", b"http", b"peer", path.as_bytes(), f, false).expect("open");
            sending.insert(id, (opened, 0));
            app.writable.push(id);
            opened += 1;
        }
        for id in std::mem::take(&mut app.writable) {
            let Some((i, sent)) = sending.get_mut(&id) else { continue };
            *sent += conn.send_data(id, &bodies[*i][*sent..], true).expect("open stream");
            if *sent == bodies[*i].len() {
                sending.remove(&id);
            }
        }
        s.write_all(&std::mem::take(conn.output())).await.expect("write");
        if app.ended.len() + app.resets.len() == bodies.len() {
            return app;
        }
        let n = match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => n,
            other => panic!("the server stopped answering: {other:?}"),
        };
        buf.extend_from_slice(&chunk[..n]);
        let taken = conn.recv(&buf, &mut app).expect("a conforming server");
        buf.drain(..taken);
        for (id, n) in app.consumed.drain(..) {
            conn.release(id, n);
        }
    }
}

/// A gRPC message framed for the wire.
fn grpc_frame(msg: &grpc_peer::Msg) -> Vec<u8> {
    let body = prost::Message::encode_to_vec(msg);
    let mut framed = vec![0];
    framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
    framed.extend_from_slice(&body);
    framed
}

/// A tonic server answers unary calls sent through the client end: eight
/// at once, payloads up to 300 KB (past tonic's 64 KiB windows), the
/// answer and `grpc-status` in the trailers read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tonic_server_answers_unary_calls_sent_through_the_client_end() {
    let backend = grpc_peer::GrpcBackend::start_on("tonic-1", "127.0.0.1:0".parse().expect("addr"), None).await;
    let payloads: Vec<Vec<u8>> = (0..8).map(body).collect();
    let bodies: Vec<Vec<u8>> =
        payloads.iter().map(|p| grpc_frame(&grpc_peer::Msg { payload: p.clone(), ..Default::default() })).collect();
    let fields = [("content-type", "application/grpc"), ("te", "trailers")];
    let got = exchange(backend.addr, "/test.Echo/Unary", &fields, &bodies).await;
    assert!(got.resets.is_empty(), "{:?}", got.resets);
    for (i, payload) in payloads.iter().enumerate() {
        let id = 1 + 2 * i as u32;
        let (status, head) = &got.heads[&id];
        assert_eq!(*status, 200);
        assert!(head.contains(&("content-type".into(), "application/grpc".into())), "{head:?}");
        assert_eq!(got.trailers[&id].iter().find(|(n, _)| n == "grpc-status").map(|(_, v)| v.as_str()), Some("0"));
        let framed = &got.bodies[&id];
        let answer: grpc_peer::Msg = prost::Message::decode(&framed[5..]).expect("a message");
        assert_eq!(answer.server, "tonic-1");
        assert!(answer.payload == *payload, "stream {id}: the payload came back changed");
    }
}

/// The `h2` crate's server echoes bodies up to 300 KB: the client end's
/// sending waits for the server's windows, and its own windows are given
/// back as it reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_h2_crates_server_echoes_bodies_through_both_windows() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.expect("accept");
        let mut conn = h2::server::handshake(s).await.expect("handshake");
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            tokio::spawn(async move {
                let mut body = req.into_body();
                let mut got = Vec::new();
                while let Some(chunk) = body.data().await {
                    let chunk = chunk.expect("chunk");
                    body.flow_control().release_capacity(chunk.len()).expect("release");
                    got.extend_from_slice(&chunk);
                }
                let resp = http::Response::builder().header("x-length", got.len()).body(()).expect("response");
                let mut send = respond.send_response(resp, false).expect("respond");
                let mut rest = Bytes::from(got);
                while !rest.is_empty() {
                    send.reserve_capacity(rest.len());
                    let cap = std::future::poll_fn(|cx| send.poll_capacity(cx)).await.expect("capacity").expect("open");
                    send.send_data(rest.split_to(cap.min(rest.len())), false).expect("data");
                }
                send.send_data(Bytes::new(), true).expect("end");
            });
        }
    });
    let bodies: Vec<Vec<u8>> = (0..10).map(body).collect();
    let got = exchange(addr, "/echo", &[], &bodies).await;
    assert!(got.resets.is_empty(), "{:?}", got.resets);
    for (i, sent) in bodies.iter().enumerate() {
        let id = 1 + 2 * i as u32;
        assert_eq!(got.heads[&id].1, [("x-length".to_owned(), sent.len().to_string())]);
        let back = got.bodies.get(&id).map_or(&[][..], Vec::as_slice);
        assert!(back == &sent[..], "stream {id}: {} bytes back of {}", back.len(), sent.len());
    }
}

/// A head or trailer section handed over: its stream, whether trailers,
/// its fields (a head's `:path` first).
type Handed = (u32, bool, Vec<(String, String)>);

/// Requests' heads and trailers, kept in the order they came.
#[derive(Default)]
struct Heads(Vec<Handed>);

impl Handler for Heads {
    fn request(&mut self, stream: u32, head: &Head, _: bool) {
        let mut all = vec![(":path".to_owned(), String::from_utf8_lossy(head.path().unwrap_or_default()).into_owned())];
        all.extend(pairs(head));
        self.0.push((stream, false, all));
    }
    fn data(&mut self, _: u32, _: &[u8], _: bool) {}
    fn trailers(&mut self, stream: u32, head: &Head) {
        self.0.push((stream, true, pairs(head)));
    }
    fn reset(&mut self, stream: u32, code: u32) {
        panic!("stream {stream} reset ({code})");
    }
    fn writable(&mut self, _: u32) {}
}

/// Regular fields a request may carry: names and values from a few, so
/// that lists repeat whole and in part.
fn regular_fields() -> impl proptest::strategy::Strategy<Value = Vec<(String, String)>> {
    use proptest::prelude::*;
    let name = prop_oneof![
        prop::sample::select(vec!["content-type", "user-agent", "accept", "grpc-timeout", "x-request-id", "x-trace"])
            .prop_map(str::to_owned),
        "x-[a-z0-9]{1,10}",
    ];
    let value = prop_oneof![
        prop::sample::select(vec!["application/grpc", "1S", "a", "curl/7.88", "*/*"]).prop_map(str::to_owned),
        "[!-~]{1,20}"
    ];
    prop::collection::vec((name, value), 0..8)
}

proptest::proptest! {
    /// Blocks drawn again and again from a few lists, as heads and as
    /// trailers, encoded by loona's encoder (every field indexed, so a list
    /// sent again is the same bytes while the table holds it) or by the
    /// proxy's own (indexing by place, with table size updates): each head
    /// and each trailer section reaches the application as it was sent,
    /// whether the connection decoded its block or recognised it.
    #[test]
    fn a_connection_hands_over_each_head_as_sent_whether_decoded_or_recognised(
        lists in proptest::collection::vec(regular_fields(), 1..4),
        paths in proptest::collection::vec("/[a-z]{0,6}", 1..3),
        steps in proptest::collection::vec((0..4usize, 0..3usize, 0..2usize, proptest::option::weighted(0.1, proptest::sample::select(vec![0usize, 64, 256, 4096]))), 1..40),
        loona in proptest::bool::ANY,
    ) {
        use fulcrum::proxy::{h2frame, hpack};
        let mut conn = Conn::server(Config::default());
        let mut input = h2frame::PREFACE.to_vec();
        h2frame::write_settings(&mut input, &[]);
        let mut ours = hpack::Encoder::default();
        let mut theirs = loona_hpack::Encoder::new();
        let mut want = Vec::new();
        for (i, (list, path, trailers, size)) in steps.into_iter().enumerate() {
            let stream = 1 + 2 * i as u32;
            let fields = &lists[list % lists.len()];
            let path = &paths[path % paths.len()];
            let head: Vec<(&str, &str)> = [(":method", "POST"), (":scheme", "http"), (":authority", "a"), (":path", path.as_str())]
                .into_iter()
                .chain(fields.iter().map(|(n, v)| (n.as_str(), v.as_str())))
                .collect();
            let mut blocks = vec![(head, false)];
            if trailers == 1 {
                blocks.push((fields.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect(), true));
            }
            let last = blocks.len() - 1;
            let mut ended = false;
            for (k, (block_fields, is_trailers)) in blocks.into_iter().enumerate() {
                let mut block = Vec::new();
                if loona {
                    block = theirs.encode(block_fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
                } else {
                    if let Some(size) = size {
                        ours.set_peer_table_size(size);
                    }
                    ours.begin(if is_trailers { hpack::Block::Trailers } else { hpack::Block::Request }, &mut block);
                    for (n, v) in &block_fields {
                        ours.field(n.as_bytes(), v.as_bytes(), &mut block);
                    }
                }
                if block.is_empty() {
                    // No trailer section without a field: the head ends the stream.
                    continue;
                }
                h2frame::write_headers(&mut input, stream, &block, k == last, 16_384);
                ended = k == last;
                let mut expect: Vec<(String, String)> = Vec::new();
                if !is_trailers {
                    expect.push((":path".to_owned(), path.clone()));
                }
                expect.extend(block_fields.iter().filter(|(n, _)| !n.starts_with(':')).map(|(n, v)| ((*n).to_owned(), (*v).to_owned())));
                want.push((stream, is_trailers, expect));
            }
            if !ended {
                // The head did not end the stream and no trailers came: end it.
                h2frame::write_data_head(&mut input, stream, 0, true);
            }
        }
        let mut got = Heads::default();
        let read = conn.recv(&input, &mut got);
        proptest::prop_assert_eq!(read.map_err(|e| e.to_string()), Ok(input.len()));
        proptest::prop_assert_eq!(got.0, want);
    }
}
