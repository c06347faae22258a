//! HPACK against other implementations. Differentially, against
//! loona-hpack (the hpack-rs lineage): what the proxy's encoder writes,
//! loona's decoder reads back as the same fields, through the peer's table
//! size changes; what loona's encoder writes (indexed, Huffman-coded, with
//! evictions), the proxy's decoder reads back, and damaged copies of it
//! as loona does or refused; on any bytes the proxy's decoder answers
//! fields or an error, never a panic, and agrees with loona's where both
//! accept. On the wire, against the encoders and decoders of the `h2`
//! crate (hyper's) and of nghttp2 (in curl): their request header blocks,
//! read with the proxy's frame parser, decode to what they sent, and the
//! proxy's response header blocks, in frames the proxy wrote, reach them
//! intact.

use std::time::Duration;

use fulcrum::proxy::h2frame::{self, Frame, Reason};
use fulcrum::proxy::hpack::{Block, Decoder, Encoder};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

fn ours(d: &mut Decoder, block: &[u8]) -> Result<Fields, String> {
    let mut out = Vec::new();
    d.decode(block, |f| out.push((f.name.to_vec(), f.value.to_vec()))).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Names from the static table (with and without its values), repeated
/// custom ones, and random ones.
fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => prop::sample::select(vec![
            ":status", ":path", ":method", ":authority", "content-type", "content-length", "server", "date",
            "set-cookie", "cookie", "authorization", "cache-control", "accept-encoding", "location", "etag",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        2 => prop::sample::select(vec!["x-request-id", "x-trace", "grpc-status", "grpc-message"]).prop_map(|s| s.as_bytes().to_vec()),
        1 => "[a-z0-9-]{1,24}".prop_map(String::into_bytes),
    ]
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => prop::sample::select(vec!["", "GET", "/", "200", "404", "gzip, deflate", "application/json", "nginx", "0"])
            .prop_map(|s| s.as_bytes().to_vec()),
        3 => "[ -~]{0,40}".prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..300),
    ]
}

/// Header blocks, each preceded by the peer's table size (or no change).
/// (A block has at least one field: loona refuses one made of a size
/// update alone, which no HTTP/2 message needs.)
fn blocks() -> impl Strategy<Value = Vec<(Option<usize>, Fields)>> {
    let size =
        prop_oneof![4 => Just(None), 1 => prop::sample::select(vec![0usize, 1, 64, 256, 4096, 65536]).prop_map(Some)];
    prop::collection::vec((size, prop::collection::vec((name(), value()), 1..12)), 1..12)
}

/// A block of [`repeating`]: the peer's new table size (if any), which list
/// of fields, which kind of block.
type Step = (Option<usize>, usize, usize);

/// Header blocks drawn again and again from a few lists of fields, each
/// of a kind and preceded by the peer's table size (or no change): the
/// same fields in the same places, others changed between them, so the
/// encoder's table fills, indexes, evicts and shrinks.
fn repeating() -> impl Strategy<Value = (Vec<Fields>, Vec<Step>)> {
    let size = prop_oneof![
        8 => Just(None),
        1 => prop::sample::select(vec![0usize, 1, 64, 100, 256, 4096, 65536]).prop_map(Some)
    ];
    (
        prop::collection::vec(prop::collection::vec((name(), value()), 1..12), 1..4),
        prop::collection::vec((size, 0..3usize, 0..3usize), 1..40),
    )
}

/// Encodes `fields` as a block of `kind` (0 to 2).
fn encode(enc: &mut Encoder, kind: usize, fields: &Fields) -> Vec<u8> {
    let kind = [Block::Request, Block::Response, Block::Trailers][kind];
    let mut block = Vec::new();
    enc.begin(kind, &mut block);
    for (n, v) in fields {
        enc.field(n, v, &mut block);
    }
    block
}

proptest! {
    #[test]
    fn what_the_encoder_writes_loona_and_the_decoder_read_back(blocks in blocks()) {
        let mut enc = Encoder::default();
        let mut dec = Decoder::default();
        let mut reference = loona_hpack::Decoder::new();
        reference.set_max_allowed_table_size(4096);
        for (size, fields) in blocks {
            if let Some(size) = size {
                enc.set_peer_table_size(size);
            }
            let block = encode(&mut enc, 1, &fields);
            let got = reference.decode(&block);
            prop_assert_eq!(got.as_ref().ok(), Some(&fields), "loona: {:?}", got);
            prop_assert_eq!(ours(&mut dec, &block), Ok(fields));
        }
    }

    #[test]
    fn repeated_blocks_come_back_indexed_through_the_peers_table_size_changes(
        (lists, sequence) in repeating()
    ) {
        let mut enc = Encoder::default();
        let mut dec = Decoder::default();
        let mut reference = loona_hpack::Decoder::new();
        reference.set_max_allowed_table_size(4096);
        let mut allowed = 4096;
        for (size, list, kind) in sequence {
            if let Some(size) = size {
                enc.set_peer_table_size(size);
                allowed = allowed.min(size);
            }
            let fields = &lists[list % lists.len()];
            let block = encode(&mut enc, kind, fields);
            let got = reference.decode(&block);
            prop_assert_eq!(got.as_ref().ok(), Some(fields), "loona: {:?}", got);
            prop_assert_eq!(ours(&mut dec, &block), Ok(fields.clone()));
            prop_assert!(dec.table_size() <= allowed, "{} in a table of {}", dec.table_size(), allowed);
        }
    }

    #[test]
    fn what_loona_writes_the_decoder_reads_back(blocks in blocks()) {
        let mut reference = loona_hpack::Encoder::new();
        let mut dec = Decoder::default();
        for (_, fields) in blocks {
            let block = reference.encode(fields.iter().map(|(n, v)| (&n[..], &v[..])));
            prop_assert_eq!(ours(&mut dec, &block), Ok(fields));
        }
    }

    #[test]
    fn the_decoder_takes_any_bytes(blocks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 1..4)) {
        let mut dec = Decoder::default();
        let mut reference = loona_hpack::Decoder::new();
        reference.set_max_allowed_table_size(4096);
        for block in blocks {
            let got = ours(&mut dec, &block);
            let want = reference.decode(&block);
            if let (Ok(got), Ok(want)) = (&got, &want) {
                prop_assert_eq!(got, want);
            }
            if got.is_err() || want.is_err() {
                // A connection error: the rest of the connection is gone.
                break;
            }
        }
    }

    #[test]
    fn the_decoder_takes_damaged_blocks(
        blocks in blocks(),
        damage in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
        which in any::<prop::sample::Index>(),
    ) {
        // loona's encoder indexes and Huffman-codes, so the damage reaches
        // the decoder's table and Huffman paths too.
        let mut enc = loona_hpack::Encoder::new();
        let mut encoded: Vec<Vec<u8>> =
            blocks.iter().map(|(_, fields)| enc.encode(fields.iter().map(|(n, v)| (&n[..], &v[..])))).collect();
        // One block loses its tail or has bytes flipped; the ones after it
        // meet a table that may have gone out of step.
        let hit = which.index(encoded.len());
        let block = &mut encoded[hit];
        if damage.len() == 1 {
            block.truncate(cut.index(block.len() + 1));
        } else {
            for (at, x) in &damage {
                let i = at.index(block.len());
                block[i] ^= x;
            }
        }
        let mut dec = Decoder::default();
        let mut reference = loona_hpack::Decoder::new();
        reference.set_max_allowed_table_size(4096);
        for block in &encoded {
            let got = ours(&mut dec, block);
            let want = reference.decode(block);
            if let (Ok(got), Ok(want)) = (&got, &want) {
                prop_assert_eq!(got, want);
            }
            if got.is_err() || want.is_err() {
                break;
            }
        }
    }
}

// ---- On the wire ----

/// Accepts one client, reads its preface and answers with empty SETTINGS;
/// then reads frames with the proxy's frame parser, collecting header
/// blocks (HEADERS with their CONTINUATIONs) until `blocks` have come,
/// answering each with the block `respond` writes, if any, and hands them
/// to `done`; then says GOAWAY and reads until the client closes (at most 2 s).
async fn serve_blocks(
    listener: TcpListener,
    blocks: usize,
    mut respond: impl FnMut(&mut Vec<u8>) -> bool,
    done: oneshot::Sender<Vec<(u32, Vec<u8>)>>,
) {
    let (mut s, _) = listener.accept().await.expect("accept");
    let mut preface = [0u8; 24];
    s.read_exact(&mut preface).await.expect("preface");
    assert_eq!(&preface, h2frame::PREFACE);
    let mut out = Vec::new();
    h2frame::write_settings(&mut out, &[]);
    s.write_all(&out).await.expect("settings");
    let mut seen = Vec::new();
    let mut open: Option<(u32, Vec<u8>)> = None;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    for _ in 0..1000 {
        if seen.len() == blocks {
            break;
        }
        let n = s.read(&mut chunk).await.expect("read");
        assert!(n > 0, "the client closed early");
        buf.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        out.clear();
        while let Some((head, payload, _)) = h2frame::split(&buf[at..], h2frame::DEFAULT_MAX_FRAME_SIZE).expect("frame")
        {
            at += h2frame::HEAD_LEN + payload.len();
            let (stream, fragment, end) = match h2frame::parse(head, payload).expect("valid") {
                Frame::Settings { ack: false, .. } => {
                    h2frame::write_settings_ack(&mut out);
                    continue;
                }
                Frame::Headers { stream, fragment, end_headers, .. } => {
                    open = Some((stream, Vec::new()));
                    (stream, fragment, end_headers)
                }
                Frame::Continuation { stream, fragment, end_headers } => (stream, fragment, end_headers),
                _ => continue,
            };
            let block = open.as_mut().filter(|(s, _)| *s == stream).expect("a CONTINUATION of the open block");
            block.1.extend_from_slice(fragment);
            if end {
                let (stream, block) = open.take().expect("a block");
                let mut answer = Vec::new();
                if respond(&mut answer) {
                    h2frame::write_headers(&mut out, stream, &answer, true, h2frame::DEFAULT_MAX_FRAME_SIZE);
                }
                seen.push((stream, block));
            }
        }
        buf.drain(..at);
        s.write_all(&out).await.expect("write");
    }
    // GOAWAY, then read until the client closes: closing with its frames
    // unread would reset the connection under what it has not read yet.
    let last = seen.last().map_or(0, |(stream, _)| *stream);
    let _ = done.send(seen);
    out.clear();
    h2frame::write_goaway(&mut out, last, Reason::NoError);
    s.write_all(&out).await.expect("goaway");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
        if n == 0 {
            break;
        }
    }
}

/// Serves `blocks` header blocks on a new listener in a task: its address,
/// the blocks to come and the task.
async fn server(
    blocks: usize,
    respond: impl FnMut(&mut Vec<u8>) -> bool + Send + 'static,
) -> (std::net::SocketAddr, oneshot::Receiver<Vec<(u32, Vec<u8>)>>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = oneshot::channel();
    (addr, rx, tokio::spawn(serve_blocks(listener, blocks, respond, tx)))
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), f).await.expect("in time")
}

fn field<'a>(fields: &'a Fields, name: &str) -> Option<&'a [u8]> {
    fields.iter().find(|(n, _)| n == name.as_bytes()).map(|(_, v)| &v[..])
}

async fn curl(args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new("curl")
        .args(["-s", "--http2-prior-knowledge", "-m", "5"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("curl")
}

/// The `h2` crate's client sends three requests on one connection (the
/// second and third mostly indexed against the first), curl one with
/// nghttp2's Huffman coding: each block decodes to the request sent.
#[tokio::test]
async fn request_blocks_from_the_h2_crate_and_from_curl_decode_to_what_they_sent() {
    let (addr, blocks, task) = server(3, |_| false).await;
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut client, conn) = h2::client::handshake(tcp).await.expect("handshake");
    tokio::spawn(conn);
    let mut pending = Vec::new();
    for i in 0..3 {
        let req = http::Request::get(format!("http://shop.example/items/{i}?page=2"))
            .header("x-request-id", format!("id-{i}"))
            .header("cookie", "session=0123456789abcdef0123456789abcdef")
            .header("accept", "application/json")
            .body(())
            .expect("request");
        client = client.ready().await.expect("ready");
        pending.push(client.send_request(req, true).expect("send").0);
    }
    let blocks = within(blocks).await.expect("blocks");
    let mut dec = Decoder::default();
    for (i, (stream, block)) in blocks.iter().enumerate() {
        assert_eq!(*stream, 1 + 2 * i as u32);
        let fields = ours(&mut dec, block).expect("decodes");
        assert_eq!(field(&fields, ":method"), Some(&b"GET"[..]));
        assert_eq!(field(&fields, ":authority"), Some(&b"shop.example"[..]));
        assert_eq!(field(&fields, ":path"), Some(format!("/items/{i}?page=2").as_bytes()));
        assert_eq!(field(&fields, "x-request-id"), Some(format!("id-{i}").as_bytes()));
        assert_eq!(field(&fields, "cookie"), Some(&b"session=0123456789abcdef0123456789abcdef"[..]));
    }
    assert!(blocks[2].1.len() < blocks[0].1.len(), "the third request is mostly indexed");
    drop((pending, client));
    within(task).await.expect("server");

    let (addr, blocks, task) = server(1, |_| false).await;
    let url = format!("http://{addr}/search?q=caf%C3%A9");
    let curl = curl(&["-H", "X-Custom: Some Value", "-H", "accept-language: fr-CH, fr;q=0.9", &url]).await;
    let blocks = within(blocks).await.expect("blocks");
    drop(curl);
    within(task).await.expect("server");
    let fields = ours(&mut Decoder::default(), &blocks[0].1).expect("decodes");
    assert_eq!(field(&fields, ":path"), Some(&b"/search?q=caf%C3%A9"[..]));
    assert_eq!(field(&fields, "x-custom"), Some(&b"Some Value"[..]));
    assert_eq!(field(&fields, "accept-language"), Some(&b"fr-CH, fr;q=0.9"[..]));
    assert!(field(&fields, "user-agent").is_some_and(|v| v.starts_with(b"curl/")), "{fields:?}");
}

/// Responses written by the proxy's encoder (names with capitals from an
/// HTTP/1.1 endpoint, repeated fields indexed, a cookie never indexed, a
/// status outside the static table) read by the `h2` crate's client and by
/// curl.
#[tokio::test]
async fn response_blocks_from_the_encoder_reach_the_h2_crate_and_curl_intact() {
    fn respond(enc: &mut Encoder, out: &mut Vec<u8>, i: usize) {
        enc.begin(Block::Response, out);
        enc.status(if i == 1 { 201 } else { 200 }, out);
        enc.field(b"Content-Type", b"application/json; charset=utf-8", out);
        enc.field(b"server", b"fulcrum-test", out);
        enc.field(b"content-length", b"0", out);
        enc.field(b"set-cookie", format!("id={i}; HttpOnly").as_bytes(), out);
        enc.field(b"x-round", i.to_string().as_bytes(), out);
    }
    let mut enc = Encoder::default();
    let mut i = 0;
    let (addr, _, task) = server(5, move |out| {
        respond(&mut enc, out, i);
        i += 1;
        true
    })
    .await;
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut client, conn) = h2::client::handshake(tcp).await.expect("handshake");
    tokio::spawn(conn);
    // Plain literals, then literals inserted, then indexes.
    for i in 0..5 {
        client = client.ready().await.expect("ready");
        let (resp, _) =
            client.send_request(http::Request::get("http://h/").body(()).expect("request"), true).expect("send");
        let resp = within(resp).await.expect("response");
        assert_eq!(resp.status().as_u16(), if i == 1 { 201 } else { 200 });
        let h = resp.headers();
        assert_eq!(h["content-type"], "application/json; charset=utf-8");
        assert_eq!(h["server"], "fulcrum-test");
        assert_eq!(h["content-length"], "0");
        assert_eq!(h["set-cookie"], format!("id={i}; HttpOnly").as_str());
        assert_eq!(h["x-round"], i.to_string().as_str());
    }
    drop(client);
    within(task).await.expect("server");

    // curl (nghttp2) reads one response: curl 7.88 fails a second request
    // on a reused prior-knowledge connection ("Error in the HTTP2 framing
    // layer") against any server, HAProxy's too; the proxy's indexed blocks
    // reach nghttp2 under h2load in the benchmarks.
    let mut enc = Encoder::default();
    let (addr, _, task) = server(1, move |out| {
        respond(&mut enc, out, 1);
        true
    })
    .await;
    let curl = curl(&["-D", "-", "-o", "/dev/null", &format!("http://{addr}/")]).await;
    let out = within(curl.wait_with_output()).await.expect("curl");
    within(task).await.expect("server");
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "HTTP/2 201",
        "content-type: application/json; charset=utf-8",
        "server: fulcrum-test",
        "set-cookie: id=1; HttpOnly",
        "x-round: 1",
    ] {
        assert!(text.lines().any(|l| l.trim_end() == line), "{line:?} not in {text}");
    }
}
