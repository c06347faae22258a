//! The small HTTP/1 listeners: the proxy's admin and probe listener and the
//! operator's health and metrics listener. They answer GET only, and face
//! whatever can reach their port (often 0.0.0.0), so each is bounded: a
//! request head within [`HEADER_TIMEOUT`] (which also ends an idle
//! keep-alive connection), at most [`MAX_CONNECTIONS`] connections at once
//! (more wait in the kernel's backlog rather than taking descriptors the
//! client listener needs), and no connection longer than [`MAX_LIFETIME`].

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Time for a request head, and for an idle keep-alive connection.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 256;

/// Longest a connection is kept.
pub const MAX_LIFETIME: Duration = Duration::from_secs(60);

/// Accepts connections on a small listener, one permit each.
#[derive(Clone, Debug)]
pub struct Gate(Arc<Semaphore>);

impl Default for Gate {
    fn default() -> Self {
        Gate(Arc::new(Semaphore::new(MAX_CONNECTIONS)))
    }
}

impl Gate {
    /// The next connection, once fewer than [`MAX_CONNECTIONS`] are open.
    pub async fn accept(&self, listener: &TcpListener) -> (TcpStream, OwnedSemaphorePermit) {
        loop {
            let Ok(permit) = self.0.clone().acquire_owned().await else {
                // The semaphore is never closed.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            match listener.accept().await {
                Ok((stream, _)) => return (stream, permit),
                // Out of descriptors, say: back off briefly.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

/// Serves one connection with `handler` in its own task, within the bounds.
pub fn serve<F, Fut>(stream: TcpStream, permit: OwnedSemaphorePermit, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    tokio::spawn(async move {
        let _permit = permit;
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(16 * 1024)
            .serve_connection(TokioIo::new(stream), service_fn(handler));
        let _ = tokio::time::timeout(MAX_LIFETIME, conn).await;
    });
}
