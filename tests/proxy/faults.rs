//! Faults: killed, slow and failing endpoints; retries and their limits.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_endpoint_under_load_fails_no_idempotent_request() {
    let mut bs = backends(3).await;
    let p = proxy(&endpoints_yaml(&bs)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (c, addr, stop, ok, failed) = (client(), p.addr, stop.clone(), ok.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            // Bounded: at most 5000 requests per client.
            for _ in 0..5000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let req = http::Request::get(format!("http://{addr}/")).body(Full::default()).unwrap();
                match send(&c, req).await {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        println!("failed: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed_at = bs[1].hits();
    bs[1].kill().await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("ok {ok}, failed {failed}, killed endpoint served {killed_at}");
    assert!(ok > 100, "traffic flowed: {ok}");
    assert_eq!(failed, 0);
    assert!(bs[0].hits() > 0 && bs[2].hits() > 0);
    let m = admin(&p, "/metrics").await.body;
    assert!(m.contains("fulcrum_proxy_retries_total{result=\"sent\"}"), "{m}");
    let doc: serde_json::Value = serde_json::from_str(&admin(&p, "/endpoints").await.body).unwrap();
    let dead = doc["endpoints"].as_array().unwrap().iter().find(|e| e["address"] == bs[1].addr.to_string()).unwrap();
    assert_eq!(dead["flags"], serde_json::json!(["ejected"]), "passive detection ejected it: {dead}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_5xx_eject_an_endpoint_and_it_comes_back_after_the_ejection_time() {
    let bs = backends(3).await;
    bs[0].set_status(500);
    let p = proxy1(&format!(
        "healthCheck: {{passive: {{consecutiveFailures: 3, baseEjectionTime: 1s}}}}\n{}",
        endpoints_yaml(&bs)
    ))
    .await;
    let c = client();
    let mut errors = 0;
    for _ in 0..30 {
        if get(&c, &p, "/").await.status == 500 {
            errors += 1;
        }
    }
    // 3 failures eject it; the sweep runs every 100 ms, so a few more may slip through before.
    assert!(errors >= 3, "{errors}");
    let before = bs[0].hits();
    assert!(
        eventually(Duration::from_secs(2), || async { admin(&p, "/endpoints").await.body.contains("\"ejected\"") })
            .await
    );
    let during = spread(&c, &p, 30).await;
    assert_eq!(bs[0].hits(), before, "no traffic while ejected: {during:?}");
    bs[0].set_status(200);
    let back =
        eventually(Duration::from_secs(3), || async { !admin(&p, "/endpoints").await.body.contains("\"ejected\"") })
            .await;
    assert!(back, "restored after the ejection time");
    let after = spread(&c, &p, 30).await;
    assert_eq!(after.get("b1"), Some(&10), "{after:?}");
    let m = admin(&p, "/metrics").await.body;
    assert!(m.contains(&format!("fulcrum_proxy_ejections_total{{endpoint=\"{}\"}} 1", bs[0].addr)), "{m}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_beyond_the_request_timeout_gives_504() {
    let bs = backends(1).await;
    bs[0].set_delay(Duration::from_secs(3));
    let p = proxy(&format!("timeouts: {{request: 200ms}}\n{}", endpoints_yaml(&bs))).await;
    let started = std::time::Instant::now();
    let r = get(&client(), &p, "/").await;
    assert_eq!(r.status, 504);
    assert!(started.elapsed() < Duration::from_secs(2));
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_retried_elsewhere_and_when_every_endpoint_refuses_503() {
    let mut bs = backends(2).await;
    bs[0].kill().await;
    let p = proxy1(&format!("healthCheck: {{passive: {{consecutiveFailures: 0}}}}\n{}", endpoints_yaml(&bs))).await;
    let c = client();
    for _ in 0..10 {
        assert_eq!(get(&c, &p, "/").await.status, 200);
    }
    bs[1].kill().await;
    // Nothing reached any endpoint: unavailable (as from Envoy and HAProxy), not a bad gateway.
    let r = get(&c, &p, "/").await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (503, "no endpoint reachable\n"));
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_is_replayed_only_when_no_endpoint_may_have_seen_it() {
    let mut bs = backends(2).await;
    bs[0].kill().await;
    let p = proxy1(&format!(
        "loadBalancing: {{algorithm: RoundRobin}}\nhealthCheck: {{passive: {{consecutiveFailures: 0}}}}\n{}",
        endpoints_yaml(&bs)
    ))
    .await;
    let c = client();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let req =
            http::Request::post(format!("http://{}/echo", p.addr)).body(Full::new(Bytes::from_static(b"x"))).unwrap();
        statuses.push(send(&c, req).await.unwrap().status.as_u16());
    }
    assert_eq!(statuses, [200; 4], "a refused connection took no byte of the body: it goes elsewhere");
    // An endpoint that reads the request and hangs up may have acted on it: a POST is not sent twice.
    bs[1].set_hang_up(true);
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let req = http::Request::post(format!("http://{}/", p.addr)).body(Full::new(Bytes::from_static(b"x"))).unwrap();
        statuses.push(send(&c, req).await.unwrap().status.as_u16());
    }
    assert_eq!(statuses, [502, 502]);
    assert_eq!(bs[1].hits(), 6, "each POST reached the endpoint once");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_caps_retries_of_requests_an_endpoint_may_have_seen() {
    let bs = backends(2).await;
    bs[0].set_hang_up(true);
    let p = proxy1(&format!(
        "retries: {{attempts: 1, budgetPercent: 0}}\nhealthCheck: {{passive: {{consecutiveFailures: 0}}}}\n{}",
        endpoints_yaml(&bs)
    ))
    .await;
    let c = client();
    let mut failed = 0;
    for _ in 0..60 {
        if get(&c, &p, "/").await.status == 502 {
            failed += 1;
        }
    }
    // While retries are allowed, each request tries the failing endpoint first and its
    // retry takes the next turn, so the first 10 requests use up the reserve (a 0% budget
    // adds nothing); the other 50 alternate and half of them fail.
    assert_eq!(failed, 25);
    let m = admin(&p, "/metrics").await.body;
    assert!(m.contains("fulcrum_proxy_retries_total{result=\"sent\"} 10"), "{m}");
    assert!(m.contains("fulcrum_proxy_retries_total{result=\"budget_exhausted\"} 25"), "{m}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_are_retried_without_spending_the_budget() {
    let mut bs = backends(2).await;
    bs[0].kill().await;
    let p = proxy1(&format!(
        "retries: {{attempts: 1, budgetPercent: 0}}\nhealthCheck: {{passive: {{consecutiveFailures: 0}}}}\n{}",
        endpoints_yaml(&bs)
    ))
    .await;
    let c = client();
    for _ in 0..60 {
        assert_eq!(get(&c, &p, "/").await.status, 200);
    }
    p.shutdown().await;
}
