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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demos_grpc_section_shows_one_channel_spread_call_by_call() {
    let reports = fulcrum::demo::grpc::run(&[Algorithm::RoundRobin, Algorithm::LeastRequest], 300).await.unwrap();
    let table = fulcrum::demo::grpc::render(&reports);
    println!("{table}");
    assert_eq!(reports.len(), 3, "{table}");
    for r in &reports {
        assert_eq!((r.errors, r.calls.iter().sum::<u64>()), (0, 300), "{table}");
    }
    // Per connection: the whole channel on one backend.
    let mut per_connection = reports[0].calls.clone();
    per_connection.sort_unstable();
    assert_eq!(per_connection, [0, 0, 300], "{table}");
    // Per call: a third each, exactly, for round robin (one worker per connection).
    assert_eq!(reports[1].calls, [100, 100, 100], "{table}");
    assert!(reports[2].calls.iter().all(|n| *n > 50), "{table}");
}
