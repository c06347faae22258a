//! Waiting for a condition in tests: bounded in time, with a report of what
//! the processes involved said when it never holds.

use std::time::Duration;

use tokio::time::Instant;

/// Polls `f` every `every` until it holds, for at most `limit`; on a
/// timeout, fails with `report()` (the logs that explain it).
pub async fn until<F, Fut>(what: &str, limit: Duration, every: Duration, report: impl Fn() -> String, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(every).await;
    }
    panic!("timed out after {limit:?} waiting for {what}\n{}", report());
}
