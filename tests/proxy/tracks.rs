//! Evidence per track: what a canary analysis reads from each proxy.

use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_track_reports_its_requests_failures_and_latency() {
    let bs = backends(3).await;
    // The canary fails one request in five and is slower; the stable track is healthy.
    bs[2].set_delay(Duration::from_millis(30));
    let p = proxy(&format!(
        "loadBalancing: {{algorithm: RoundRobin, tracks: {{stable: 50, canary: 50}}}}\n\
         healthCheck: {{passive: {{consecutiveFailures: 0}}}}\nretries: {{attempts: 0}}\n\
         endpoints:\n  - {{address: \"{}\"}}\n  - {{address: \"{}\"}}\n  - {{address: \"{}\", track: canary}}\n",
        bs[0].addr, bs[1].addr, bs[2].addr
    ))
    .await;
    bs[2].set_fail_every(5);
    let c = client();
    let mut canary_failures = 0;
    for _ in 0..200 {
        let r = get(&c, &p, "/").await;
        if r.backend() == "b3" && r.status == 500 {
            canary_failures += 1;
        }
    }
    assert!(canary_failures > 0, "the canary failed some requests");
    let doc: serde_json::Value = serde_json::from_str(&admin(&p, "/tracks").await.body).unwrap();
    let track = |name: &str| doc["tracks"].as_array().unwrap().iter().find(|t| t["track"] == name).unwrap().clone();
    let (stable, canary) = (track("stable"), track("canary"));
    assert_eq!(doc["windowSeconds"], 60);
    let total = |t: &serde_json::Value, k: &str| t["total"][k].as_u64().unwrap();
    assert_eq!(total(&stable, "requests") + total(&canary, "requests"), 200);
    assert_eq!((total(&stable, "failures"), total(&canary, "failures")), (0, canary_failures));
    assert_eq!(stable["window"]["successRate"], 1.0);
    let rate = canary["window"]["successRate"].as_f64().unwrap();
    assert!(rate < 1.0 && rate > 0.5, "{canary}");
    let p99 = |t: &serde_json::Value| t["window"]["p99Ms"].as_f64().unwrap();
    // Every canary answer takes 30 ms: its p99 cannot be below; the stable
    // track's median is far below it (its p99 could catch a slow scheduler tick).
    let p50 = |t: &serde_json::Value| t["window"]["p50Ms"].as_f64().unwrap();
    assert!(p99(&canary) >= 30.0 && p50(&stable) < 30.0, "stable {stable}, canary {canary}");
    // A shorter window, and a window out of bounds.
    let short: serde_json::Value = serde_json::from_str(&admin(&p, "/tracks?window=10").await.body).unwrap();
    assert_eq!(short["windowSeconds"], 10);
    assert_eq!(admin(&p, "/tracks?window=600").await.status, 400);
    // The same on /metrics, cumulative.
    let m = admin(&p, "/metrics").await.body;
    assert!(
        m.contains(&format!(
            "fulcrum_proxy_track_outcomes_total{{track=\"canary\",outcome=\"failure\"}} {canary_failures}"
        )),
        "{m}"
    );
    assert!(m.contains("fulcrum_proxy_track_requests_total{track=\"stable\",class=\"2xx\"}"), "{m}");
    assert!(
        m.contains("fulcrum_proxy_track_request_duration_seconds_bucket{le=\"0.025\",track=\"canary\"} 0\n"),
        "{m}"
    );
    p.shutdown().await;
}
