//! Proxy semantics: protocols, headers, bodies, local error responses.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_removed_and_forwarding_headers_added() {
    let bs = backends(1).await;
    let p = proxy(&endpoints_yaml(&bs)).await;
    let r = get_with(
        &client(),
        &p,
        "/headers",
        &[("connection", "x-private"), ("x-private", "1"), ("x-forwarded-for", "203.0.113.7"), ("x-app", "kept")],
    )
    .await;
    let body = r.body.to_lowercase();
    assert!(!body.contains("x-private"), "{body}");
    assert!(body.contains("x-forwarded-for: 203.0.113.7, 127.0.0.1"), "{body}");
    assert!(body.contains("x-forwarded-proto: http"), "{body}");
    assert!(body.contains("x-app: kept"), "{body}");
    assert!(body.contains(&format!("host: {}", p.addr)), "the client's Host is kept: {body}");
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
