//! `fulcrum demo` end to end, shortened.

use std::time::Duration;

use fulcrum::balance::Algorithm;
use fulcrum::demo::{DemoOptions, render, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_reports_shares_latency_and_no_errors_despite_the_killed_backend() {
    let opts = DemoOptions {
        algorithms: vec![Algorithm::RoundRobin, Algorithm::LeastRequest],
        duration: Duration::from_millis(800),
        concurrency: 8,
        progress: false,
        ..DemoOptions::default()
    };
    let reports = run(&opts).await.unwrap();
    let table = render(&reports);
    println!("{table}");
    assert_eq!(table.lines().count(), 3);
    for r in &reports {
        assert_eq!(r.errors, 0, "{table}");
        assert!(r.ok > 100, "{table}");
        assert!(r.p99 >= r.p50);
        let share =
            |i: usize| r.backends[i].requests as f64 / r.backends.iter().map(|b| b.requests).sum::<u64>() as f64;
        // b4 served only until it was killed half-way.
        assert!(share(3) < share(0), "{table}");
    }
    let slow = |r: &fulcrum::demo::RunReport| r.backends[2].requests as f64 / r.ok as f64;
    // The exact property is tested in tests/balance; here, with real sockets and
    // a machine that may be busy (which narrows the gap between fast and slow
    // backends), only that the load-aware algorithm clearly avoids the slow one.
    assert!(slow(&reports[1]) < slow(&reports[0]) * 0.75, "LeastRequest avoids the slow backend: {table}");
}
