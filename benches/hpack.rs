//! HPACK per message, without I/O: decoding a browser's request header
//! block once the dynamic table knows its fields (what every request after
//! a connection's first costs), decoding the first one (literals, Huffman),
//! encoding that request for an endpoint and an HTTP/1.1 endpoint's
//! response head for an HTTP/2 client.
//! For scale, the same work by loona-hpack, the hpack-rs lineage.
//!
//! `cargo bench --bench hpack` (`make bench-hpack`) prints criterion's estimates.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use fulcrum::proxy::hpack::{Block, Decoder, Encoder};

/// What a browser sends for a page's API call.
const REQUEST: [(&[u8], &[u8]); 9] = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"shop.example"),
    (b":path", b"/api/v1/items?page=2"),
    (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"),
    (b"accept", b"application/json"),
    (b"accept-encoding", b"gzip, deflate, br, zstd"),
    (b"accept-language", b"en-US,en;q=0.5"),
    (b"cookie", b"session=0f3c9a7e5b1d4c2a8e6f0b9d7c5a3e1f; theme=dark"),
];

/// An nginx response head, names as HTTP/1.1 endpoints write them.
const RESPONSE: [(&[u8], &[u8]); 5] = [
    (b"Server", b"nginx/1.22.1"),
    (b"Date", b"Fri, 27 Nov 2026 03:00:00 GMT"),
    (b"Content-Type", b"application/json"),
    (b"Content-Length", b"512"),
    (b"Cache-Control", b"no-store"),
];

fn encode_request(enc: &mut Encoder) -> Vec<u8> {
    let mut block = Vec::new();
    enc.begin(Block::Request, &mut block);
    for (n, v) in REQUEST {
        enc.field(n, v, &mut block);
    }
    block
}

fn hpack(c: &mut Criterion) {
    // A browser's encoder indexes what repeats (the proxy's own does not).
    let mut browser = loona_hpack::Encoder::new();
    let first = browser.encode(REQUEST);
    let steady = browser.encode(REQUEST);

    c.bench_function("decode a request block, fields indexed", |b| {
        let mut dec = Decoder::default();
        dec.decode(&first, |_| {}).expect("valid");
        b.iter(|| {
            let mut bytes = 0;
            dec.decode(black_box(&steady), |f| bytes += f.name.len() + f.value.len()).expect("valid");
            bytes
        })
    });
    c.bench_function("decode a request block, first on its connection", |b| {
        b.iter(|| {
            let mut dec = Decoder::default();
            let mut bytes = 0;
            dec.decode(black_box(&first), |f| bytes += f.name.len() + f.value.len()).expect("valid");
            bytes
        })
    });
    c.bench_function("encode a request head", |b| {
        let mut enc = Encoder::default();
        b.iter(|| encode_request(black_box(&mut enc)).len())
    });
    c.bench_function("encode a response head, steady state", |b| {
        let mut enc = Encoder::default();
        let mut out = Vec::with_capacity(256);
        b.iter(|| {
            out.clear();
            enc.begin(Block::Response, &mut out);
            enc.status(200, &mut out);
            for (n, v) in RESPONSE {
                enc.field(black_box(n), black_box(v), &mut out);
            }
            out.len()
        })
    });

    c.bench_function("loona-hpack: decode a request block, fields indexed", |b| {
        let mut reference = loona_hpack::Encoder::new();
        let first = reference.encode(REQUEST);
        let steady = reference.encode(REQUEST);
        let mut dec = loona_hpack::Decoder::new();
        dec.decode(&first).expect("valid");
        b.iter(|| {
            let mut bytes = 0;
            dec.decode_with_cb(black_box(&steady), |n, v| bytes += n.len() + v.len()).expect("valid");
            bytes
        })
    });
    c.bench_function("loona-hpack: encode a response head, steady state", |b| {
        let mut enc = loona_hpack::Encoder::new();
        let lower: Vec<(Vec<u8>, &[u8])> = RESPONSE.iter().map(|(n, v)| (n.to_ascii_lowercase(), *v)).collect();
        let mut out = Vec::with_capacity(256);
        b.iter(|| {
            out.clear();
            enc.encode_header_into((b":status", b"200"), &mut out).expect("in memory");
            for (n, v) in &lower {
                enc.encode_header_into((black_box(n), black_box(v)), &mut out).expect("in memory");
            }
            out.len()
        })
    });
}

criterion_group!(benches, hpack);
criterion_main!(benches);
