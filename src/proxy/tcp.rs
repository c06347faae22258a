//! TCP mode: each client connection is balanced once and copied both ways
//! until both directions end. A half-close is passed on: when one side stops
//! sending, the other side's write half is shut down and the other direction
//! keeps flowing.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::config::{HashKey, MAX_RETRY_ATTEMPTS};
use super::state::Shared;
use crate::balance::{self, Outcome, hash_key};

/// Slot of [`EndpointStats`](super::metrics::EndpointStats) counting connections made.
const CONNECTED: usize = 1;

/// Serves one client connection.
pub(crate) async fn serve(shared: Arc<Shared>, mut client: TcpStream, peer: SocketAddr) {
    let rt = shared.current.load_full();
    let hash = match rt.hash {
        Some(HashKey::SourceIp) => Some(match peer.ip() {
            std::net::IpAddr::V4(ip) => hash_key(&ip.octets()),
            std::net::IpAddr::V6(ip) => hash_key(&ip.octets()),
        }),
        _ => None,
    };
    let retries = rt.config.retries.attempts.min(MAX_RETRY_ATTEMPTS) as usize;
    let mut tried = [SocketAddr::from(([0, 0, 0, 0], 0)); MAX_RETRY_ATTEMPTS as usize + 1];
    let clock = rt.set.clock().clone();
    for attempt in 0..=retries {
        let req = balance::Request { hash, affinity: None, exclude: &tried[..attempt] };
        let Some(mut pick) = shared.pick(&rt, &req, clock.now()) else {
            tracing::debug!(%peer, "no endpoint for a TCP connection; closing it");
            return;
        };
        let addr = pick.addr();
        tried[attempt] = addr;
        let Some(stats) = rt.upstreams.get(&addr).map(|u| &u.stats) else { return };
        let connected = tokio::time::timeout(rt.config.timeouts.connect.0, TcpStream::connect(addr)).await;
        match connected {
            Ok(Ok(mut upstream)) => {
                pick.observe_latency_at(clock.now());
                stats.count(CONNECTED);
                let _ = upstream.set_nodelay(true);
                // Nothing has been sent yet, so a connection failure above was safe to retry;
                // from here on, bytes flow and the connection is the client's.
                let outcome = match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                    Ok((to_endpoint, to_client)) => {
                        stats.count_bytes(to_endpoint, to_client);
                        Outcome::Success
                    }
                    // A reset on either side ends the copy; it does not say the endpoint is unhealthy.
                    Err(_) => Outcome::Cancelled,
                };
                pick.complete(outcome);
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(endpoint = %addr, error = %e, "TCP connect failed");
            }
            Err(_) => {
                tracing::debug!(endpoint = %addr, "TCP connect timed out");
            }
        }
        stats.count(super::metrics::NO_RESPONSE);
        shared.endpoint_failed(&rt, pick, clock.now());
        if attempt == retries {
            return;
        }
        // No byte reached the endpoint: the retry costs the endpoints nothing and
        // is not charged to the retry budget.
        shared.metrics.retry(true);
    }
}
