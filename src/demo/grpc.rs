//! The demo's gRPC section: one client channel (one HTTP/2 connection)
//! making unary calls through the proxy to three gRPC backends, once per
//! algorithm with `appProtocol: GRPC`, and once through the proxy in TCP mode,
//! which balances connections as kube-proxy does: the whole channel then
//! lands on one backend.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use super::DemoError;
use crate::balance::Algorithm;
use crate::discovery::Snapshot;
use crate::proxy::ProxyHandle;
use crate::proxy::config::ProxyConfig;

/// The calls of one run, by backend.
#[derive(Clone, Debug)]
pub struct GrpcReport {
    /// What balanced the calls.
    pub balancer: String,
    /// Calls answered by each backend, in backend order.
    pub calls: Vec<u64>,
    /// Calls that did not end with `grpc-status: 0`.
    pub errors: u64,
}

/// Runs `calls` unary calls on one channel per balancer: the TCP (per
/// connection) proxy first, then each of `algorithms` in gRPC mode.
pub async fn run(algorithms: &[Algorithm], calls: usize) -> Result<Vec<GrpcReport>, DemoError> {
    let backends =
        [GrpcDemoBackend::start(2).await?, GrpcDemoBackend::start(3).await?, GrpcDemoBackend::start(4).await?];
    let mut reports = Vec::new();
    let mut runs = vec![("per connection (TCP mode, as kube-proxy)".to_owned(), None)];
    runs.extend(algorithms.iter().map(|a| (a.name().to_owned(), Some(*a))));
    for (balancer, algorithm) in runs {
        let mut yaml = match algorithm {
            None => "listen: 127.0.0.1:0\nprotocol: TCP\n".to_owned(),
            Some(a) => {
                let hash = if a == Algorithm::ConsistentHash { "  hashOn: {header: x-user-id}\n" } else { "" };
                format!("listen: 127.0.0.1:0\nappProtocol: GRPC\nloadBalancing:\n  algorithm: {a}\n{hash}")
            }
        };
        yaml.push_str("endpoints:\n");
        for b in &backends {
            let _ = writeln!(yaml, "  - {{address: \"{}\"}}", b.addr);
        }
        let before: Vec<u64> = backends.iter().map(|b| b.calls.load(Ordering::Relaxed)).collect();
        let proxy = ProxyHandle::start(Snapshot::standalone(ProxyConfig::parse(&yaml)?)).await?;
        let errors = one_channel(proxy.addr, calls).await;
        proxy.shutdown().await;
        let after = backends.iter().map(|b| b.calls.load(Ordering::Relaxed));
        reports.push(GrpcReport { balancer, calls: after.zip(before).map(|(a, b)| a - b).collect(), errors });
    }
    Ok(reports)
}

/// `calls` unary calls, eight at a time, on one HTTP/2 connection; the calls that failed.
async fn one_channel(proxy: SocketAddr, calls: usize) -> u64 {
    let Ok(stream) = tokio::net::TcpStream::connect(proxy).await else { return calls as u64 };
    let Ok((sender, conn)) =
        hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(TokioExecutor::new(), TokioIo::new(stream)).await
    else {
        return calls as u64;
    };
    let conn = tokio::spawn(conn);
    let mut failed = 0;
    let mut in_flight = JoinSet::new();
    for i in 0..calls {
        if in_flight.len() >= 8
            && let Some(done) = in_flight.join_next().await
        {
            failed += u64::from(!done.unwrap_or(false));
        }
        let mut sender = sender.clone();
        in_flight.spawn(async move {
            let req = Request::post(format!("http://{proxy}/demo.Echo/Unary"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .header("x-user-id", format!("user-{}", i % 100))
                .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])));
            let Ok(req) = req else { return false };
            let answer = tokio::time::timeout(Duration::from_secs(5), async {
                let resp = sender.send_request(req).await.ok()?;
                let body = resp.into_body().collect().await.ok()?;
                Some(body.trailers().and_then(|t| t.get("grpc-status")).is_some_and(|s| s == "0"))
            });
            answer.await.ok().flatten().unwrap_or(false)
        });
    }
    while let Some(done) = in_flight.join_next().await {
        failed += u64::from(!done.unwrap_or(false));
    }
    conn.abort();
    failed
}

/// An HTTP/2 server answering every call with an empty message and `grpc-status: 0`.
struct GrpcDemoBackend {
    addr: SocketAddr,
    calls: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

type GrpcBody =
    StreamBody<futures::stream::Iter<std::array::IntoIter<Result<Frame<Bytes>, std::convert::Infallible>, 2>>>;

impl GrpcDemoBackend {
    async fn start(host: u8) -> Result<Self, DemoError> {
        let addr = SocketAddr::from(([127, 0, 0, host], 0));
        let listener = TcpListener::bind(addr).await.map_err(|source| DemoError::Bind { addr, source })?;
        let addr = listener.local_addr().map_err(|source| DemoError::Bind { addr, source })?;
        let calls = Arc::new(AtomicU64::new(0));
        let counter = calls.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let counter = counter.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |_req: Request<Incoming>| {
                        counter.fetch_add(1, Ordering::Relaxed);
                        let mut trailers = HeaderMap::new();
                        trailers.insert("grpc-status", HeaderValue::from_static("0"));
                        let frames =
                            [Ok(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0]))), Ok(Frame::trailers(trailers))];
                        let mut resp: Response<GrpcBody> =
                            Response::new(StreamBody::new(futures::stream::iter(frames)));
                        resp.headers_mut().insert("content-type", HeaderValue::from_static("application/grpc"));
                        async move { Ok::<_, std::convert::Infallible>(resp) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(GrpcDemoBackend { addr, calls, task })
    }
}

impl Drop for GrpcDemoBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The gRPC reports as a text table.
pub fn render(reports: &[GrpcReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{:<42} {:>8} {:>8} {:>8} {:>7}", "balancer", "g1", "g2", "g3", "errors");
    for r in reports {
        let total = r.calls.iter().sum::<u64>().max(1);
        let _ = write!(out, "{:<42}", r.balancer);
        for n in &r.calls {
            let _ = write!(out, " {:>7.1}%", *n as f64 * 100.0 / total as f64);
        }
        let _ = writeln!(out, " {:>7}", r.errors);
    }
    out
}
