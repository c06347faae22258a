//! Proxy semantics: protocols, headers, bodies, local error responses.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Version};
use http_body_util::Full;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_keep_alive_and_h2c_share_the_listener() {
    let bs = backends(2).await;
    let p = proxy(&endpoints_yaml(&bs)).await;
    let h1 = get(&client(), &p, "/").await;
    assert_eq!((h1.status, h1.headers.contains_key("x-backend")), (http::StatusCode::OK, true));
    let h2 = h2_client();
    let req = Request::get(format!("http://{}/", p.addr)).version(Version::HTTP_2).body(Full::default()).unwrap();
    let r = send(&h2, req).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body == "b1" || r.body == "b2", "{r:?}");
    // Requests on one h2 connection are balanced one by one.
    let counts = {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..4 {
            let req = Request::get(format!("http://{}/", p.addr)).body(Full::default()).unwrap();
            seen.insert(send(&h2, req).await.unwrap().body);
        }
        seen.len()
    };
    assert_eq!(counts, 2);
    p.shutdown().await;
}

/// The head a raw backend received for one request sent through the proxy.
async fn head_through(raw: &RawBackend, req: Request<Full<Bytes>>) -> String {
    let before = raw.heads().len();
    let c = client();
    let r = send(&c, req).await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let heads = raw.heads();
    assert_eq!(heads.len(), before + 1, "{heads:?}");
    heads[before].to_lowercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_get_origin_form_the_clients_host_and_no_hop_by_hop_headers() {
    let raw = RawBackend::start(2).await;
    let p = proxy(&format!("endpoints: [{{address: \"{}\"}}]\n", raw.addr)).await;
    let req = Request::get(format!("http://{}/p?q=1", p.addr))
        .header("host", "shop.example")
        .header("connection", "x-private")
        .header("x-private", "1")
        .header("keep-alive", "timeout=5")
        .header("x-app", "kept")
        .body(Full::default())
        .unwrap();
    let head = head_through(&raw, req).await;
    assert!(head.starts_with("get /p?q=1 http/1.1\r\n"), "origin form, not the endpoint's absolute URI: {head}");
    assert!(head.contains("\r\nhost: shop.example\r\n"), "{head}");
    assert!(!head.contains("x-private") && !head.contains("keep-alive"), "{head}");
    assert!(head.contains("\r\nx-app: kept\r\n"), "{head}");
    // An HTTP/2 client's :authority becomes the Host; the request line is origin form too.
    let req = Request::get("http://api.example:8443/v1/items?x=%20y").body(Full::default()).unwrap();
    let head = head_through_authority(&p, &raw, req).await;
    assert!(head.starts_with("get /v1/items?x=%20y http/1.1\r\n"), "{head}");
    assert!(head.contains("\r\nhost: api.example:8443\r\n"), "{head}");
    p.shutdown().await;
}

/// Sends an HTTP/2 request with its own authority over a connection to the proxy.
async fn head_through_authority(
    p: &fulcrum::proxy::ProxyHandle,
    raw: &RawBackend,
    req: Request<Full<Bytes>>,
) -> String {
    let before = raw.heads().len();
    let stream = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    conn.abort();
    let heads = raw.heads();
    assert_eq!(heads.len(), before + 1, "{heads:?}");
    heads[before].to_lowercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_what_the_proxy_saw_unless_the_peer_is_trusted() {
    let raw = RawBackend::start(3).await;
    let get = |p: &fulcrum::proxy::ProxyHandle| {
        Request::get(format!("http://{}/", p.addr))
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-for", "203.0.113.7")
            .body(Full::default())
            .unwrap()
    };
    let endpoints = format!("endpoints: [{{address: \"{}\"}}]\n", raw.addr);
    let p = proxy(&endpoints).await;
    let head = head_through(&raw, get(&p)).await;
    assert!(head.contains("\r\nx-forwarded-proto: http\r\n"), "a plain-HTTP client cannot claim https: {head}");
    assert!(head.contains("\r\nx-forwarded-for: 127.0.0.1\r\n"), "nor another address: {head}");
    p.shutdown().await;
    // The same request from a trusted load balancer in front keeps its claims.
    let p = proxy(&format!("forwarding: {{trustedProxies: [127.0.0.0/8]}}\n{endpoints}")).await;
    let head = head_through(&raw, get(&p)).await;
    assert!(head.contains("\r\nx-forwarded-proto: https\r\n"), "{head}");
    assert!(head.contains("\r\nx-forwarded-for: 203.0.113.7, 127.0.0.1\r\n"), "{head}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_ip_hashing_behind_a_trusted_proxy_follows_the_real_client() {
    let bs = backends(3).await;
    let p = proxy(&format!(
        "forwarding: {{trustedProxies: [127.0.0.1/32]}}\nloadBalancing: {{algorithm: ConsistentHash, hashOn: {{sourceIP: true}}}}\n{}",
        endpoints_yaml(&bs)
    ))
    .await;
    let c = client();
    let mut owners = std::collections::HashSet::new();
    // Twelve clients: the backends' ports change from run to run and with
    // them the hash ring, so with six all six landed on one of three
    // backends in about one run of 243; with twelve, one in 177,000.
    for i in 1..=12 {
        let client_ip = format!("198.51.100.{i}");
        let client_ip = client_ip.as_str();
        let first = get_with(&c, &p, "/", &[("x-forwarded-for", client_ip)]).await.backend().to_owned();
        for _ in 0..3 {
            assert_eq!(get_with(&c, &p, "/", &[("x-forwarded-for", client_ip)]).await.backend(), first);
        }
        owners.insert(first);
    }
    assert!(owners.len() > 1, "clients behind one load balancer are spread by their own address: {owners:?}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways() {
    let bs = backends(1).await;
    let p = proxy(&endpoints_yaml(&bs)).await;
    let payload: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
    let req = Request::post(format!("http://{}/echo", p.addr)).body(Full::new(Bytes::from(payload.clone()))).unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let got = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    assert_eq!(got.len(), payload.len());
    assert!(got[..] == payload[..]);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_endpoint_answers_503() {
    let p = proxy("endpoints: []\n").await;
    let r = get(&client(), &p, "/").await;
    assert_eq!(r.status, 503);
    assert!(r.body.contains("no healthy endpoint"));
    let m = admin(&p, "/metrics").await.body;
    assert!(m.contains("fulcrum_proxy_local_responses_total{code=\"503\"} 1"), "{m}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_gets_400() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let bs = backends(1).await;
    let p = proxy(&endpoints_yaml(&bs)).await;
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n").await.unwrap();
    let mut buf = vec![0; 256];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert_eq!(bs[0].hits(), 0);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_report_health_load_and_counts() {
    let bs = backends(2).await;
    let p = proxy1(&endpoints_yaml(&bs)).await;
    let c = client();
    for _ in 0..10 {
        get(&c, &p, "/").await;
    }
    assert_eq!(admin(&p, "/healthz").await.status, 200);
    assert_eq!(admin(&p, "/readyz").await.status, 200);
    // A request is counted done once its last byte is written: the client
    // may read the answer a moment before the proxy's task books it.
    let settled = || async {
        let body = admin(&p, "/endpoints").await.body;
        body.matches("\"inFlight\": 0").count() == 2
    };
    assert!(eventually(Duration::from_secs(2), settled).await);
    let doc: serde_json::Value = serde_json::from_str(&admin(&p, "/endpoints").await.body).unwrap();
    let eps = doc["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 2);
    for e in eps {
        assert_eq!(e["requests"], 5, "{e}");
        assert_eq!(e["responses"]["2xx"], 5);
        assert_eq!(e["healthy"], true);
        assert_eq!(e["inFlight"], 0);
        assert!(e["latencyEwmaMs"].as_f64().unwrap() > 0.0);
        assert_eq!(e["weight"], 1);
    }
    let m = admin(&p, "/metrics").await.body;
    for needle in [
        format!("fulcrum_proxy_upstream_requests_total{{endpoint=\"{}\",class=\"2xx\"}} 5", bs[0].addr),
        format!("fulcrum_proxy_endpoint_healthy{{endpoint=\"{}\"}} 1", bs[1].addr),
        "fulcrum_proxy_request_duration_seconds_count 10".to_owned(),
        // The test client may open a second connection while the first returns to its pool.
        "fulcrum_proxy_connections_total ".to_owned(),
        "# TYPE fulcrum_proxy_request_duration_seconds histogram".to_owned(),
    ] {
        assert!(m.contains(&needle), "missing {needle} in\n{m}");
    }
    p.shutdown().await;
}

/// The value of a metric line `name` (with its labels) in a scrape.
fn metric(scrape: &str, name: &str) -> Option<f64> {
    scrape.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The kernel hashes connections to workers blind to load (with four
/// workers, 120 connections split within ±3 of even about one time in a
/// thousand); the proxy hands new connections from a busier worker to the
/// least busy one, and a handed-over connection serves like any other, in
/// HTTP mode and in TCP mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_spread_evenly_over_workers() {
    spread_over_workers("HTTP").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_spread_evenly_over_workers() {
    spread_over_workers("TCP").await;
}

async fn spread_over_workers(protocol: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const N: usize = 120;
    const WORKERS: usize = 4;
    let bs = backends(2).await;
    let p = proxy(&format!("protocol: {protocol}\nworkers: {WORKERS}\n{}", endpoints_yaml(&bs))).await;
    let mut conns = Vec::with_capacity(N);
    for _ in 0..N {
        conns.push(tokio::net::TcpStream::connect(p.addr).await.expect("connect"));
    }
    let serving = |m: &str| -> Vec<f64> {
        (0..WORKERS)
            .map(|w| metric(m, &format!("fulcrum_proxy_worker_connections{{worker=\"{w}\"}}")).unwrap_or(-1.0))
            .collect()
    };
    let mut last = Vec::new();
    for _ in 0..250 {
        last = serving(&admin(&p, "/metrics").await.body);
        if last.iter().sum::<f64>() == N as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(last.iter().sum::<f64>(), N as f64, "connections per worker: {last:?}");
    let (min, max) = last.iter().fold((f64::MAX, 0f64), |(lo, hi), &n| (lo.min(n), hi.max(n)));
    assert!(max - min <= 3.0, "connections per worker: {last:?}");
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(b"GET / HTTP/1.1\r\nHost: spread\r\n\r\n").await.expect("write");
        let mut buf = vec![0; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await.expect("answer").expect("read");
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 200"), "{protocol} connection {i}: {head}");
    }
    drop(conns);
    let empty = eventually(Duration::from_secs(5), || async {
        serving(&admin(&p, "/metrics").await.body).iter().all(|&n| n == 0.0)
    })
    .await;
    assert!(empty, "{:?}", serving(&admin(&p, "/metrics").await.body));
    p.shutdown().await;
}
