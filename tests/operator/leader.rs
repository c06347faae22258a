//! Two operator instances: one leads, the other takes over when it stops.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fulcrum::operator::controller::Context;
use fulcrum::operator::desired::Settings;
use fulcrum::operator::leader::{LeaseSettings, run_elected};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;

use crate::apiserver::ApiServer;

fn instance(server: &ApiServer, identity: &str) -> (Arc<AtomicBool>, tokio::task::JoinHandle<()>) {
    let ctx = Arc::new(Context::new(server.client(), Settings { proxy_image: "fulcrum:test".into() }));
    let lease = LeaseSettings {
        name: "fulcrum-operator".into(),
        namespace: "default".into(),
        identity: identity.into(),
        duration: 2,
        grace: 1,
    };
    let leader = Arc::new(AtomicBool::new(false));
    let flag = leader.clone();
    let task = tokio::spawn(async move {
        let _ = run_elected(ctx, lease, flag).await;
    });
    (leader, task)
}

async fn holder(server: &ApiServer) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(server.client(), "default");
    leases.get_opt("fulcrum-operator").await.ok().flatten()?.spec?.holder_identity
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_leads_and_a_standby_takes_over_within_the_lease_duration() {
    let server = ApiServer::start().await;
    let (a, task_a) = instance(&server, "operator-a");
    let (b, task_b) = instance(&server, "operator-b");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(a.load(Ordering::Relaxed) || b.load(Ordering::Relaxed)) {
        assert!(Instant::now() < deadline, "nobody was elected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Exactly one leads, and it is the Lease's holder. On a loaded machine a late
    // renewal can hand the lease over (a lease has no fencing), so this is
    // awaited, within a bound, rather than sampled once.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (la, lb) = (a.load(Ordering::Relaxed), b.load(Ordering::Relaxed));
        let holder = holder(&server).await;
        let expected = if la { "operator-a" } else { "operator-b" };
        if la != lb && holder.as_deref() == Some(expected) {
            break;
        }
        assert!(Instant::now() < deadline, "not exactly one leader: a {la}, b {lb}, holder {holder:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (leader, standby, leader_task, standby_task, leader_name) = if a.load(Ordering::Relaxed) {
        (a, b, task_a, task_b, "operator-a")
    } else {
        (b, a, task_b, task_a, "operator-b")
    };
    assert_eq!(holder(&server).await.as_deref(), Some(leader_name));
    // The leader dies without releasing the lease (a crash, not a shutdown).
    leader_task.abort();
    let stopped = Instant::now();
    let deadline = stopped + Duration::from_secs(10);
    while !standby.load(Ordering::Relaxed) {
        assert!(Instant::now() < deadline, "the standby never took over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = stopped.elapsed();
    println!("standby took over after {took:?}");
    assert!(took <= Duration::from_secs(4), "within the 2 s lease duration plus a renewal period: {took:?}");
    assert_ne!(holder(&server).await.as_deref(), Some(leader_name));
    drop(leader);
    standby_task.abort();
}
