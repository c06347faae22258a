//! Active health checks and panic mode.

use std::time::{Duration, Instant};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_check_takes_an_endpoint_out_within_interval_times_threshold_and_back() {
    let bs = backends(3).await;
    let p = proxy1(&format!(
        "healthCheck:\n  active: {{http: {{path: /healthz}}, interval: 100ms, timeout: 50ms, healthyThreshold: 2, unhealthyThreshold: 3}}\n{}",
        endpoints_yaml(&bs)
    ))
    .await;
    let c = client();
    bs[1].set_healthy(false);
    let t0 = Instant::now();
    let down = eventually(Duration::from_secs(3), || async {
        admin(&p, "/endpoints").await.body.contains("activeCheckFailed")
    })
    .await;
    let took = t0.elapsed();
    assert!(down);
    // interval × unhealthyThreshold = 300 ms, plus one interval of phase and the 100 ms jitter bound.
    assert!(took < Duration::from_millis(900), "down after {took:?}");
    let before = bs[1].hits();
    let counts = spread(&c, &p, 20).await;
    assert_eq!(bs[1].hits(), before, "{counts:?}");
    bs[1].set_healthy(true);
    assert!(
        eventually(Duration::from_secs(3), || async {
            !admin(&p, "/endpoints").await.body.contains("activeCheckFailed")
        })
        .await
    );
    assert_eq!(spread(&c, &p, 30).await.get("b2"), Some(&10));
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_check_notices_a_dead_endpoint() {
    let mut bs = backends(2).await;
    let p = proxy(&format!(
        "healthCheck:\n  active: {{tcp: {{}}, interval: 50ms, timeout: 50ms, unhealthyThreshold: 2}}\n{}",
        endpoints_yaml(&bs)
    ))
    .await;
    bs[0].kill().await;
    assert!(
        eventually(Duration::from_secs(3), || async {
            admin(&p, "/endpoints").await.body.contains("activeCheckFailed")
        })
        .await
    );
    assert_eq!(admin(&p, "/readyz?require=endpoints").await.status, 200, "one endpoint is enough");
    bs[1].kill().await;
    assert!(
        eventually(Duration::from_secs(3), || async { admin(&p, "/readyz?require=endpoints").await.status == 503 })
            .await
    );
    let plain = admin(&p, "/readyz").await;
    assert_eq!(plain.status, 200, "a proxy serving its configuration is ready without endpoints: {}", plain.body);
    assert!(plain.body.contains("no endpoint available"), "{}", plain.body);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_panic_threshold_traffic_goes_to_all_endpoints() {
    let bs = backends(4).await;
    let p = proxy1(&format!(
        "loadBalancing: {{panicThresholdPercent: 50}}\nhealthCheck:\n  active: {{http: {{}}, interval: 50ms, unhealthyThreshold: 1}}\n{}",
        endpoints_yaml(&bs)
    ))
    .await;
    let c = client();
    // Two of four failing: exactly at the threshold, no panic, the healthy two share the traffic.
    bs[0].set_healthy(false);
    bs[1].set_healthy(false);
    assert!(
        eventually(Duration::from_secs(3), || async {
            admin(&p, "/endpoints").await.body.matches("activeCheckFailed").count() == 2
        })
        .await
    );
    let counts = spread(&c, &p, 20).await;
    assert_eq!(counts.len(), 2, "{counts:?}");
    // Three of four failing: 25% healthy is below 50%, so all four share it rather than overload one.
    bs[2].set_healthy(false);
    assert!(
        eventually(Duration::from_secs(3), || async {
            admin(&p, "/endpoints").await.body.matches("activeCheckFailed").count() == 3
        })
        .await
    );
    let doc: serde_json::Value = serde_json::from_str(&admin(&p, "/endpoints").await.body).unwrap();
    assert_eq!(doc["panic"], true);
    let counts = spread(&c, &p, 40).await;
    assert_eq!(counts.len(), 4, "{counts:?}");
    p.shutdown().await;
}
