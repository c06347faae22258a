//! TCP mode: each client connection is balanced once and copied both ways
//! until both directions end. A half-close is passed on: when one side stops
//! sending, the other side's write half is shut down and the other direction
//! keeps flowing.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
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
        // A TCP connection is both a request and a connection to the endpoint.
        let breakers = &rt.config.circuit_breakers;
        let (cap, limit) = if breakers.max_connections < breakers.max_requests {
            (breakers.max_connections, "maxConnections")
        } else {
            (breakers.max_requests, "maxRequests")
        };
        if pick.endpoint().in_flight() > cap {
            pick.complete(Outcome::Cancelled);
            shared.metrics.overflow(limit);
            tracing::debug!(endpoint = %addr, limit, "endpoint at its circuit breaker; trying another");
            continue;
        }
        let connected = tokio::time::timeout(rt.config.timeouts.connect.0, TcpStream::connect(addr)).await;
        match connected {
            Ok(Ok(mut upstream)) => {
                pick.observe_latency_at(clock.now());
                stats.count(CONNECTED);
                let _ = upstream.set_nodelay(true);
                // Nothing has been sent yet, so a connection failure above was safe to retry;
                // from here on, bytes flow and the connection is the client's. The copy
                // buffers are allocated once either side has something to say, so an
                // idle connection costs its sockets and little else.
                let idle = rt.config.timeouts.idle.0;
                let woke = tokio::time::timeout(idle, async {
                    tokio::select! {
                        r = client.readable() => r,
                        r = upstream.readable() => r,
                    }
                })
                .await;
                if !matches!(woke, Ok(Ok(()))) {
                    pick.complete(Outcome::Cancelled);
                    return;
                }
                let outcome = match copy_until_idle(&mut client, &mut upstream, idle).await {
                    Some(Ok((to_endpoint, to_client))) => {
                        stats.count_bytes(to_endpoint, to_client);
                        Outcome::Success
                    }
                    // A reset on either side ends the copy; it does not say the endpoint is unhealthy.
                    Some(Err(_)) => Outcome::Cancelled,
                    None => {
                        tracing::debug!(%peer, endpoint = %addr, "TCP connection idle past timeouts.idle; closed");
                        Outcome::Cancelled
                    }
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

/// Buffer size of each direction of a TCP copy.
const COPY_BUFFER: usize = 64 * 1024;

/// Copies both ways until both directions end (`Some`), or until no byte has
/// moved in either direction for `idle` (`None`; both connections then close).
pub(crate) async fn copy_until_idle<A, B>(
    client: &mut A,
    upstream: &mut B,
    idle: Duration,
) -> Option<io::Result<(u64, u64)>>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let origin = Instant::now();
    let last = AtomicU64::new(0);
    let mut watched = Watched { inner: client, origin, last: &last };
    // 64 KiB per direction instead of the default 8 KiB: a quarter of the system
    // calls on bulk transfers, for 128 KiB per busy connection.
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut watched, upstream, COPY_BUFFER, COPY_BUFFER);
    tokio::pin!(copy);
    let mut deadline = idle;
    loop {
        tokio::select! {
            done = &mut copy => return Some(done),
            () = tokio::time::sleep_until((origin + deadline).into()) => {
                // Activity on the client side means activity both ways: every byte
                // from the endpoint is written to the client, every byte to it read from the client.
                let active = Duration::from_nanos(last.load(Ordering::Relaxed));
                if origin.elapsed().saturating_sub(active) >= idle {
                    return None;
                }
                deadline = active + idle;
            }
        }
    }
}

/// A stream that records when a byte last moved through it.
struct Watched<'a, S> {
    inner: &'a mut S,
    origin: Instant,
    last: &'a AtomicU64,
}

impl<S> Watched<'_, S> {
    fn touch(&self) {
        let at = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(at, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<'_, S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut *this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<'_, S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut *this.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.touch();
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}
