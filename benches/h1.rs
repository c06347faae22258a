//! The HTTP/1.1 fast path's message handling per request, without I/O:
//! parsing a request head in place and writing the endpoint's version of it,
//! the same for a response head, finding a chunked body's end and decoding
//! one (HTTP/2 clients' responses from HTTP/1.1 endpoints). For
//! scale, the same request head taken through a header map (parsed, copied
//! into `http::HeaderMap`, hop-by-hop headers removed, encoded again), the
//! work a map-based proxy does per request.
//!
//! `cargo bench --bench h1` (`make bench-h1`) prints criterion's estimates.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use fulcrum::proxy::h1::{self, Chunked, Forwarded, RequestHead, ResponseHead};

/// What curl sends, with the headers a browser behind a load balancer adds.
const REQUEST: &[u8] = b"GET /api/v1/items?page=2 HTTP/1.1\r\nHost: shop.example\r\nUser-Agent: curl/8.5.0\r\n\
Accept: */*\r\nAccept-Encoding: gzip, br\r\nCookie: session=abc123; theme=dark\r\nX-Request-Id: 5f1c9e\r\n\
Connection: keep-alive\r\n\r\n";

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 27 Nov 2026 03:00:00 GMT\r\n\
Content-Type: application/json\r\nContent-Length: 512\r\nConnection: keep-alive\r\nCache-Control: no-store\r\n\r\n";

fn heads(c: &mut Criterion) {
    let fwd = Forwarded { forwarded_for: b"10.0.0.9", proto: b"http", keep_client_proto: false, client_cert: None };
    let mut req = RequestHead::default();
    let mut out = Vec::with_capacity(4096);
    c.bench_function("request head: parse and rewrite", |b| {
        b.iter(|| {
            let ok = h1::parse_request(black_box(REQUEST), 8192, 100, &mut req);
            h1::write_request(REQUEST, &req, &fwd, &mut out);
            black_box((ok, out.len()))
        })
    });
    c.bench_function("request head: through a header map", |b| {
        b.iter(|| {
            let mut raw = [httparse::EMPTY_HEADER; 100];
            let mut parsed = httparse::Request::new(&mut raw);
            let _ = parsed.parse(black_box(REQUEST));
            let mut map = http::HeaderMap::with_capacity(parsed.headers.len());
            for h in parsed.headers.iter() {
                if let (Ok(n), Ok(v)) =
                    (http::HeaderName::from_bytes(h.name.as_bytes()), http::HeaderValue::from_bytes(h.value))
                {
                    map.append(n, v);
                }
            }
            map.remove(http::header::CONNECTION);
            map.insert("x-forwarded-for", http::HeaderValue::from_static("10.0.0.9"));
            map.insert("x-forwarded-proto", http::HeaderValue::from_static("http"));
            out.clear();
            out.extend_from_slice(parsed.method.unwrap_or("GET").as_bytes());
            for (k, v) in &map {
                out.extend_from_slice(k.as_str().as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(v.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            black_box(out.len())
        })
    });
    let mut resp = ResponseHead::default();
    c.bench_function("response head: parse and rewrite", |b| {
        b.iter(|| {
            let ok = h1::parse_response(black_box(RESPONSE), false, &mut resp);
            h1::write_response(RESPONSE, &resp, None, false, &mut out);
            black_box((ok, out.len()))
        })
    });
    let mut body = Vec::new();
    for _ in 0..16 {
        body.extend_from_slice(b"400\r\n");
        body.extend_from_slice(&[b'x'; 1024]);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    c.bench_function("chunked body: find the end of 16 KiB", |b| {
        b.iter(|| black_box(Chunked::default().feed(black_box(&body))))
    });
    // What the HTTP/2 clients' bridge does with a chunked response: the data
    // of each chunk located, read by read (4 KiB reads).
    let mut trailers = Vec::new();
    c.bench_function("chunked body: decode 16 KiB in 4 KiB reads", |b| {
        b.iter(|| {
            let mut chunked = Chunked::default();
            let mut data = 0;
            for read in black_box(&body).chunks(4096) {
                let mut at = 0;
                while at < read.len() {
                    let Ok(d) = chunked.decode(&read[at..], &mut trailers) else { return 0 };
                    data += d.data.len();
                    at += d.consumed;
                    if d.ended || d.consumed == 0 {
                        return data;
                    }
                }
            }
            data
        })
    });
}

criterion_group!(benches, heads);
criterion_main!(benches);
