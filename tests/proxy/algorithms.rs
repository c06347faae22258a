//! Distribution through the proxy, per algorithm and option.

use std::collections::HashMap;
use std::time::Duration;

use fulcrum::balance::Algorithm;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_algorithm_spreads_sequential_requests_over_all_endpoints() {
    let bs = backends(3).await;
    for algorithm in Algorithm::ALL {
        let hash = if algorithm == Algorithm::ConsistentHash { "  hashOn: {header: x-user}\n" } else { "" };
        let p = proxy1(&format!("loadBalancing:\n  algorithm: {algorithm}\n{hash}{}", endpoints_yaml(&bs))).await;
        let c = client();
        let mut counts: HashMap<String, usize> = HashMap::new();
        for i in 0..300 {
            let user = format!("user-{i}");
            let r = get_with(&c, &p, "/", &[("x-user", &user)]).await;
            assert_eq!(r.status, 200);
            *counts.entry(r.backend().to_owned()).or_default() += 1;
        }
        assert_eq!(counts.len(), 3, "{algorithm}: {counts:?}");
        match algorithm {
            Algorithm::RoundRobin | Algorithm::WeightedRoundRobin | Algorithm::LeastConnections => {
                // Sequential requests leave every endpoint idle: strict rotation.
                assert!(counts.values().all(|&n| n == 100), "{algorithm}: {counts:?}");
            }
            // Latency-driven: identical endpoints get uneven shares, since one whose first
            // answers were slower (a new connection's handshake) is avoided until its
            // estimate decays; but every endpoint is tried.
            Algorithm::PeakEwma => assert!(counts.values().all(|&n| n >= 1), "{algorithm}: {counts:?}"),
            _ => assert!(counts.values().all(|&n| n >= 50), "{algorithm}: {counts:?}"),
        }
        p.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_follows_the_weights() {
    let bs = backends(3).await;
    let yaml = format!(
        "loadBalancing: {{algorithm: WeightedRoundRobin}}\nendpoints:\n  - {{address: \"{}\", weight: 5}}\n  - {{address: \"{}\", weight: 1}}\n  - {{address: \"{}\", weight: 1}}\n",
        bs[0].addr, bs[1].addr, bs[2].addr
    );
    let p = proxy1(&yaml).await;
    let c = client();
    let mut seq = String::new();
    for _ in 0..7 {
        seq.push_str(get(&c, &p, "/").await.backend());
        seq.push(' ');
    }
    assert_eq!(seq.trim(), "b1 b1 b2 b1 b3 b1 b1");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_keeps_each_key_on_one_endpoint() {
    let bs = backends(4).await;
    for hash_on in ["{header: x-user}", "{cookie: session}"] {
        let p =
            proxy(&format!("loadBalancing: {{algorithm: ConsistentHash, hashOn: {hash_on}}}\n{}", endpoints_yaml(&bs)))
                .await;
        let c = client();
        let mut owners = HashMap::new();
        for round in 0..3 {
            for user in 0..40 {
                let (h, v) = if hash_on.contains("header") {
                    ("x-user", format!("u{user}"))
                } else {
                    ("cookie", format!("a=1; session=u{user}"))
                };
                let backend = get_with(&c, &p, "/", &[(h, &v)]).await.backend().to_owned();
                let owner = owners.entry(user).or_insert_with(|| backend.clone());
                assert_eq!(*owner, backend, "{hash_on}: key u{user} moved in round {round}");
            }
        }
        let distinct: std::collections::HashSet<_> = owners.values().collect();
        assert!(distinct.len() >= 3, "40 keys should land on most of 4 endpoints: {owners:?}");
        p.shutdown().await;
    }
}

/// Hashing on `Host`: an HTTP/2 client's `:authority` is its host (RFC 9113
/// §8.3.1), so a host lands on the endpoint it lands on over HTTP/1.1,
/// whether the request goes without a header map (a `GET`) or with one (a
/// body of unknown length).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashing_on_host_reads_an_http2_clients_authority() {
    let bs = backends(4).await;
    let p = proxy(&format!(
        "loadBalancing: {{algorithm: ConsistentHash, hashOn: {{header: host}}}}\n{}",
        endpoints_yaml(&bs)
    ))
    .await;
    let c = client();
    let (mut h2, conn) = h2_connect(p.addr).await;
    let mut owners = HashMap::new();
    for n in 0..24 {
        let host = format!("u{n}.example");
        let http1 = get_with(&c, &p, "/", &[("host", &host)]).await.backend().to_owned();
        for streamed in [false, true] {
            let req = http::Request::builder()
                .method(if streamed { "POST" } else { "GET" })
                .uri(format!("http://{host}/"))
                .body(())
                .unwrap();
            let (response, mut body) = h2.send_request(req, !streamed).unwrap();
            if streamed {
                body.send_data(bytes::Bytes::from_static(b"x"), true).unwrap();
            }
            let resp = tokio::time::timeout(std::time::Duration::from_secs(5), response).await.unwrap().unwrap();
            let backend = resp.headers().get("x-backend").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            assert_eq!(backend, http1, "{host} (streamed body: {streamed}) went elsewhere over HTTP/2");
        }
        owners.insert(n, http1);
    }
    let distinct: std::collections::HashSet<_> = owners.values().collect();
    assert!(distinct.len() >= 3, "24 hosts should land on most of 4 endpoints: {owners:?}");
    drop(h2);
    conn.abort();
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_ip_hashing_pins_a_client_address() {
    let bs = backends(3).await;
    let p = proxy(&format!(
        "loadBalancing: {{algorithm: ConsistentHash, hashOn: {{sourceIP: true}}}}\n{}",
        endpoints_yaml(&bs)
    ))
    .await;
    let counts = spread(&client(), &p, 30).await;
    assert_eq!(counts.len(), 1, "one client address, one endpoint: {counts:?}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_affinity_cookie_pins_a_client_and_falls_back_when_its_endpoint_goes() {
    let mut bs = backends(3).await;
    let p = proxy(&format!(
        "loadBalancing: {{sessionAffinity: {{cookie: STICKY, ttl: 10m}}}}\nhealthCheck: {{passive: {{consecutiveFailures: 1}}}}\n{}",
        endpoints_yaml(&bs)
    ))
    .await;
    let c = client();
    let first = get(&c, &p, "/").await;
    let set_cookie =
        first.headers.get("set-cookie").expect("first response sets the cookie").to_str().unwrap().to_owned();
    assert!(set_cookie.starts_with("STICKY=") && set_cookie.contains("Max-Age=600"), "{set_cookie}");
    let token = set_cookie.split(';').next().unwrap().to_owned();
    for _ in 0..20 {
        let r = get_with(&c, &p, "/", &[("cookie", &token)]).await;
        assert_eq!(r.backend(), first.backend());
        assert!(r.headers.get("set-cookie").is_none(), "a valid cookie is not set again");
    }
    let pinned = bs.iter_mut().find(|b| b.name == first.backend()).unwrap();
    pinned.kill().await;
    let r = get_with(&c, &p, "/", &[("cookie", &token)]).await;
    assert_eq!(r.status, 200, "retried on another endpoint: {r:?}");
    assert_ne!(r.backend(), first.backend());
    let moved = r.headers.get("set-cookie").expect("a new pin is issued").to_str().unwrap().to_owned();
    assert_ne!(moved.split(';').next().unwrap(), token);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_track_split_sends_the_canary_its_share() {
    let bs = backends(4).await;
    let yaml = format!(
        "loadBalancing: {{tracks: {{stable: 90, canary: 10}}}}\nendpoints:\n  - {{address: \"{}\"}}\n  - {{address: \"{}\"}}\n  - {{address: \"{}\"}}\n  - {{address: \"{}\", track: canary}}\n",
        bs[0].addr, bs[1].addr, bs[2].addr, bs[3].addr
    );
    let p = proxy1(&yaml).await;
    let counts = spread(&client(), &p, 1000).await;
    let canary = counts.get("b4").copied().unwrap_or(0);
    assert!((80..=120).contains(&canary), "canary share {canary}/1000: {counts:?}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_and_least_request_starve_a_slow_endpoint_round_robin_does_not() {
    let bs = backends(3).await;
    bs[2].set_delay(Duration::from_millis(40));
    let mut share = HashMap::new();
    for algorithm in ["RoundRobin", "LeastRequest", "PeakEwma"] {
        let p = proxy(&format!("loadBalancing: {{algorithm: {algorithm}}}\n{}", endpoints_yaml(&bs))).await;
        let before = bs[2].hits();
        let total = 8 * 40;
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (c, addr) = (client(), p.addr);
            tasks.push(tokio::spawn(async move {
                for _ in 0..40 {
                    let req = http::Request::get(format!("http://{addr}/")).body(Default::default()).unwrap();
                    assert_eq!(send(&c, req).await.unwrap().status, 200);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        share.insert(algorithm, (bs[2].hits() - before) as f64 / total as f64);
        p.shutdown().await;
    }
    println!("slow endpoint share: {share:?}");
    assert!(share["RoundRobin"] > 0.30, "{share:?}");
    assert!(share["LeastRequest"] < 0.2, "{share:?}");
    assert!(share["PeakEwma"] < 0.2, "{share:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_aware_keeps_requests_in_the_proxys_zone_and_spills_over_without_loss() {
    let bs = backends(4).await;
    let zone = |i: usize| if i < 2 { "a" } else { "b" };
    let eps: String =
        bs.iter().enumerate().map(|(i, b)| format!("  - {{address: \"{}\", zone: {}}}\n", b.addr, zone(i))).collect();
    let p = proxy(&format!(
        "loadBalancing: {{algorithm: RoundRobin, zoneAware: {{zone: a, minHealthyPercent: 60}}}}\n\
         healthCheck: {{active: {{http: {{path: /healthz}}, interval: 50ms, healthyThreshold: 1, unhealthyThreshold: 1}}}}\n\
         endpoints:\n{eps}"
    ))
    .await;
    let c = client();
    let local = spread(&c, &p, 100).await;
    let mut names: Vec<&String> = local.keys().collect();
    names.sort();
    assert_eq!(names, ["b1", "b2"], "the local zone takes it all: {local:?}");
    // A client running throughout sees no failure while one local endpoint goes down.
    let url = format!("http://{}/", p.addr);
    let steady = tokio::spawn(async move {
        let c = client();
        let mut failed = 0;
        for _ in 0..150 {
            let r = send(&c, http::Request::get(&url).body(Default::default()).unwrap()).await;
            failed += usize::from(!matches!(r, Ok(ref r) if r.status == 200));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        failed
    });
    bs[0].set_healthy(false);
    // Half the local zone is below 60%: every zone's available endpoints share the traffic.
    let spilled = eventually(Duration::from_secs(3), || async { spread(&client(), &p, 30).await.len() == 3 }).await;
    assert!(spilled, "spill-over to zone b: {:?}", spread(&c, &p, 30).await);
    assert_eq!(steady.await.unwrap(), 0, "no request failed during the shift");
    bs[0].set_healthy(true);
    let back = eventually(Duration::from_secs(3), || async {
        spread(&client(), &p, 30).await.keys().all(|k| k == "b1" || k == "b2")
    })
    .await;
    assert!(back, "the zone takes the traffic back");
    let doc = admin(&p, "/endpoints").await.body;
    assert!(doc.contains("\"zone\": \"b\""), "{doc}");
    p.shutdown().await;
}
