//! Per-endpoint state of the proxy: counters for metrics, and the pool of
//! keep-alive HTTP/1.1 connections to the endpoint.
//!
//! The pool is the proxy's own rather than a generic client's: each worker
//! thread has its own idle list per endpoint (its connections are driven by
//! that worker's event loop, so a request never wakes another thread),
//! checking a connection out and back in costs no task spawn, and a
//! connection found closed when a request is about to use it gives the
//! request back untouched, so it goes out on a fresh connection instead of
//! failing.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::http::UpstreamBody;
use super::metrics::EndpointStats;

/// Idle keep-alive connections kept per endpoint and worker.
pub(crate) const MAX_IDLE: usize = 256;

thread_local! {
    /// The worker this thread is (1-based); 0 on threads that are not workers.
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Marks the current thread as worker `index` (0-based).
pub(crate) fn enter_worker(index: usize) {
    WORKER.with(|w| w.set(index + 1));
}

/// One endpoint as the proxy sees it.
#[derive(Debug)]
pub(crate) struct Upstream {
    pub(crate) addr: SocketAddr,
    /// The address as an HTTP authority, built once.
    pub(crate) authority: http::uri::Authority,
    pub(crate) stats: EndpointStats,
    /// Idle connections, one list per worker (and one for other threads).
    /// Each list is only ever locked by its own thread, so the lock is uncontended.
    idle: Box<[Mutex<Vec<Idle>>]>,
}

struct Idle {
    sender: SendRequest<UpstreamBody>,
    since: Instant,
}

impl std::fmt::Debug for Idle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idle").field("since", &self.since).finish_non_exhaustive()
    }
}

/// Why an exchange with an endpoint produced no response.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// No connection could be opened: nothing reached the endpoint.
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// The connection failed after the request may have been sent.
    #[error("exchange: {0}")]
    Exchange(hyper::Error),
}

/// A connection in use by one request; back to the pool when the response ends.
pub(crate) struct Lease {
    upstream: Arc<Upstream>,
    sender: SendRequest<UpstreamBody>,
}

impl Lease {
    /// Returns the connection for the next request (the response has ended cleanly).
    pub(crate) fn release(self) {
        self.upstream.checkin(self.sender);
    }
}

impl Upstream {
    pub(crate) fn new(addr: SocketAddr, workers: usize) -> Self {
        let label = addr.to_string();
        // A socket address always formats as a valid authority.
        let authority = label.parse().unwrap_or_else(|_| http::uri::Authority::from_static("invalid"));
        let idle = (0..=workers).map(|_| Mutex::new(Vec::new())).collect();
        Upstream { addr, authority, stats: EndpointStats::new(label), idle }
    }

    fn idle_list(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        let i = WORKER.with(Cell::get).min(self.idle.len() - 1);
        self.idle[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `req` on a pooled connection, or a new one. A pooled connection
    /// that turns out closed before the request was written is skipped and
    /// the request goes out on the next one.
    pub(crate) async fn send(
        self: &Arc<Self>,
        mut req: Request<UpstreamBody>,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Result<(Response<Incoming>, Lease), UpstreamError> {
        loop {
            let (mut sender, pooled) = match self.checkout(idle_timeout) {
                Some(s) => (s, true),
                None => (self.connect(connect_timeout).await?, false),
            };
            // A pooled connection may still be finishing the previous response.
            if sender.ready().await.is_err() {
                if pooled {
                    continue;
                }
                return Err(UpstreamError::Connect(std::io::Error::other("connection closed before use")));
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, Lease { upstream: self.clone(), sender })),
                Err(mut e) => match e.take_message() {
                    // Never written: safe to send on another connection, whatever the method.
                    Some(unsent) if pooled => req = unsent,
                    _ => return Err(UpstreamError::Exchange(e.into_error())),
                },
            }
        }
    }

    async fn connect(&self, timeout: Duration) -> Result<SendRequest<UpstreamBody>, UpstreamError> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(self.addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(UpstreamError::Connect(e)),
            Err(_) => return Err(UpstreamError::Connect(std::io::ErrorKind::TimedOut.into())),
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError::Connect(std::io::Error::other(e)))?;
        tokio::spawn(async move {
            // Ends when the endpoint or the pool closes the connection.
            let _ = conn.await;
        });
        Ok(sender)
    }

    fn checkout(&self, idle_timeout: Duration) -> Option<SendRequest<UpstreamBody>> {
        let mut idle = self.idle_list();
        // Most recently used first: its socket is warm and least likely to have been closed.
        while let Some(i) = idle.pop() {
            if !i.sender.is_closed() && i.since.elapsed() < idle_timeout {
                return Some(i.sender);
            }
        }
        None
    }

    fn checkin(&self, sender: SendRequest<UpstreamBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle_list();
        if idle.len() < MAX_IDLE {
            idle.push(Idle { sender, since: Instant::now() });
        }
    }

    /// Closes connections idle for longer than `idle_timeout` (or closed by the endpoint).
    pub(crate) fn prune(&self, idle_timeout: Duration) {
        for list in &self.idle {
            let mut idle = list.lock().unwrap_or_else(|p| p.into_inner());
            idle.retain(|i| !i.sender.is_closed() && i.since.elapsed() < idle_timeout);
        }
    }

    /// Idle connections held now, over all workers.
    pub(crate) fn idle_count(&self) -> usize {
        self.idle.iter().map(|l| l.lock().map(|v| v.len()).unwrap_or(0)).sum()
    }
}

/// Upstreams for a new endpoint set, reusing those of endpoints that stay
/// (their counters and pooled connections survive the update).
pub(crate) fn carry(
    previous: Option<&std::collections::HashMap<SocketAddr, Arc<Upstream>>>,
    addrs: impl Iterator<Item = SocketAddr>,
    workers: usize,
) -> std::collections::HashMap<SocketAddr, Arc<Upstream>> {
    addrs
        .map(|a| {
            let u = previous.and_then(|p| p.get(&a).cloned()).unwrap_or_else(|| Arc::new(Upstream::new(a, workers)));
            (a, u)
        })
        .collect()
}
