//! Operator HA: leader election on a `coordination.k8s.io` Lease (with the
//! kube-lease-manager crate). Only the leader runs the controller; a standby
//! waits, and takes over once the leader stops renewing for the lease
//! duration.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kube_lease_manager::{DurationSeconds, LeaseManagerBuilder};
use tracing::{info, warn};

use super::controller::{Context, run};

/// Where and how long the leadership lease is held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseSettings {
    /// Name of the Lease object.
    pub name: String,
    /// Namespace of the Lease (the operator's own).
    pub namespace: String,
    /// This instance's identity (its pod name).
    pub identity: String,
    /// A leader that has not renewed for this long loses the lease.
    pub duration: DurationSeconds,
    /// The leader renews this long before the lease would expire.
    pub grace: DurationSeconds,
}

/// Runs the controller whenever this instance holds the lease, until the
/// election task ends. `leader` reflects the current state (for /readyz and metrics).
pub async fn run_elected(
    ctx: Arc<Context>,
    lease: LeaseSettings,
    leader: Arc<AtomicBool>,
) -> Result<(), kube_lease_manager::LeaseManagerError> {
    let manager = LeaseManagerBuilder::new(ctx.client.clone(), &lease.name)
        .with_namespace(&lease.namespace)
        .with_identity(&lease.identity)
        .with_duration(lease.duration)
        .with_grace(lease.grace)
        .build()
        .await?;
    let (mut state, task) = manager.watch().await;
    loop {
        // Standby until elected.
        while !*state.borrow_and_update() {
            if state.changed().await.is_err() {
                return task.await.map_or(Ok(()), |r| r.map(|_| ()));
            }
        }
        info!(identity = %lease.identity, "elected leader; reconciling");
        leader.store(true, Ordering::Relaxed);
        ctx.metrics.set_leader(true);
        let lost = async {
            loop {
                if state.changed().await.is_err() || !*state.borrow_and_update() {
                    return;
                }
            }
        };
        tokio::select! {
            () = run(ctx.clone()) => {
                leader.store(false, Ordering::Relaxed);
                ctx.metrics.set_leader(false);
                drop(state);
                // Closing the channel releases the lease for a standby.
                return task.await.map_or(Ok(()), |r| r.map(|_| ()));
            }
            () = lost => warn!(identity = %lease.identity, "lost the lease; reconciles stop until re-elected"),
        }
        leader.store(false, Ordering::Relaxed);
        ctx.metrics.set_leader(false);
    }
}
