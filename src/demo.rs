//! `fulcrum demo`: the proxy at work in about ten seconds, no cluster needed.
//!
//! In one process: four backends on 127.0.0.2–5 (two fast, one ten times
//! slower, one killed half-way through each run), a proxy per algorithm in
//! front of them, and a closed-loop load generator. At the end, a table per
//! algorithm: each backend's share, latency percentiles and errors. Then
//! [`grpc`]: one gRPC channel's calls, spread call by call, next to what a
//! per-connection balancer makes of the same channel.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

pub mod grpc;

use crate::balance::Algorithm;
use crate::discovery::Snapshot;
use crate::proxy::ProxyHandle;
use crate::proxy::config::ProxyConfig;

/// Demo settings.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Algorithms to run, in order.
    pub algorithms: Vec<Algorithm>,
    /// Load time per algorithm.
    pub duration: Duration,
    /// Concurrent clients.
    pub concurrency: usize,
    /// Service time of the fast backends; the slow one takes ten times as long.
    pub latency: Duration,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            algorithms: Algorithm::ALL.to_vec(),
            duration: Duration::from_millis(1200),
            concurrency: 16,
            latency: Duration::from_millis(2),
            progress: true,
        }
    }
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A backend or the proxy could not bind its loopback address.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The proxy refused to start.
    #[error(transparent)]
    Proxy(#[from] crate::proxy::StartError),
    /// The generated configuration was refused (a bug).
    #[error(transparent)]
    Config(#[from] crate::proxy::config::ConfigError),
}

/// One backend's part of a run.
#[derive(Clone, Debug)]
pub struct BackendShare {
    /// Name with its role, as printed.
    pub label: String,
    /// Requests it answered.
    pub requests: u64,
}

/// The outcome of one algorithm's run.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// The algorithm.
    pub algorithm: Algorithm,
    /// Per backend.
    pub backends: Vec<BackendShare>,
    /// Successful requests.
    pub ok: u64,
    /// Requests that failed or got a non-2xx answer.
    pub errors: u64,
    /// Median latency seen by clients.
    pub p50: Duration,
    /// 99th percentile latency seen by clients.
    pub p99: Duration,
}

/// Runs the demo and returns one report per algorithm.
pub async fn run(opts: &DemoOptions) -> Result<Vec<RunReport>, DemoError> {
    let bar = opts.progress.then(|| {
        let total = opts.algorithms.len() as u64 * opts.duration.as_millis() as u64;
        let bar = indicatif::ProgressBar::new(total);
        if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg:<20} [{bar:40}] {percent:>3}%") {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    });
    let mut reports = Vec::new();
    for &algorithm in &opts.algorithms {
        if let Some(b) = &bar {
            b.set_message(algorithm.name());
        }
        reports.push(run_one(algorithm, opts, bar.as_ref()).await?);
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(reports)
}

async fn run_one(
    algorithm: Algorithm,
    opts: &DemoOptions,
    bar: Option<&indicatif::ProgressBar>,
) -> Result<RunReport, DemoError> {
    let fast = opts.latency;
    let mut backends = vec![
        DemoBackend::start(2, fast).await?,
        DemoBackend::start(3, fast).await?,
        DemoBackend::start(4, fast * 10).await?,
        DemoBackend::start(5, fast).await?,
    ];
    let labels = [
        format!("b1 ({} ms)", fast.as_millis()),
        format!("b2 ({} ms)", fast.as_millis()),
        format!("b3 ({} ms, slow)", (fast * 10).as_millis()),
        "b4 (killed at 50%)".to_owned(),
    ];
    let mut yaml = format!(
        "listen: 127.0.0.1:0\nloadBalancing:\n  algorithm: {algorithm}\n{}healthCheck:\n  active: {{tcp: {{}}, interval: 250ms, timeout: 100ms}}\nendpoints:\n",
        if algorithm == Algorithm::ConsistentHash { "  hashOn: {header: x-user-id}\n" } else { "" }
    );
    for b in &backends {
        let _ = writeln!(yaml, "  - {{address: \"{}\"}}", b.addr);
    }
    let proxy = ProxyHandle::start(Snapshot::standalone(ProxyConfig::parse(&yaml)?)).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = JoinSet::new();
    for i in 0..opts.concurrency {
        clients.spawn(client_loop(proxy.addr, i, stop.clone()));
    }
    let started = Instant::now();
    let mut killed = false;
    while started.elapsed() < opts.duration {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if !killed && started.elapsed() >= opts.duration / 2 {
            backends[3].kill();
            killed = true;
        }
        if let Some(b) = bar {
            b.inc(20);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let (mut ok, mut errors) = (0, 0);
    while let Some(done) = clients.join_next().await {
        if let Ok(c) = done {
            latencies.extend(c.latencies_us);
            ok += c.ok;
            errors += c.errors;
        }
    }
    proxy.shutdown().await;
    latencies.sort_unstable();
    let pct = |q: f64| {
        let i = ((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1));
        Duration::from_micros(latencies.get(i).copied().unwrap_or(0))
    };
    let shares = backends
        .iter()
        .zip(labels)
        .map(|(b, label)| BackendShare { label, requests: b.hits.load(Ordering::Relaxed) })
        .collect();
    Ok(RunReport { algorithm, backends: shares, ok, errors, p50: pct(0.50), p99: pct(0.99) })
}

struct ClientResult {
    latencies_us: Vec<u64>,
    ok: u64,
    errors: u64,
}

/// Sends requests one after another until told to stop.
async fn client_loop(proxy: SocketAddr, id: usize, stop: Arc<AtomicBool>) -> ClientResult {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let mut r = ClientResult { latencies_us: Vec::new(), ok: 0, errors: 0 };
    let mut n = 0u64;
    // Bounded: a client stops after a million requests even if never told to.
    while !stop.load(Ordering::Relaxed) && n < 1_000_000 {
        n += 1;
        let user = format!("user-{}", (id as u64 * 7919 + n) % 1000);
        let Ok(req) = Request::get(format!("http://{proxy}/")).header("x-user-id", user).body(Full::default()) else {
            break;
        };
        let t = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(5), client.request(req)).await;
        let good = match answer {
            Ok(Ok(resp)) => resp.status().is_success() && resp.into_body().collect().await.is_ok(),
            _ => false,
        };
        if good {
            r.ok += 1;
            r.latencies_us.push(t.elapsed().as_micros() as u64);
        } else {
            r.errors += 1;
        }
    }
    r
}

/// A backend that answers after a fixed service time and can be killed.
struct DemoBackend {
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
    task: Option<JoinHandle<()>>,
}

impl DemoBackend {
    async fn start(host: u8, delay: Duration) -> Result<Self, DemoError> {
        let addr = SocketAddr::from(([127, 0, 0, host], 0));
        let listener = TcpListener::bind(addr).await.map_err(|source| DemoError::Bind { addr, source })?;
        let addr = listener.local_addr().map_err(|source| DemoError::Bind { addr, source })?;
        let hits = Arc::new(AtomicU64::new(0));
        let counter = hits.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let counter = counter.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |_req: Request<Incoming>| {
                        let counter = counter.clone();
                        async move {
                            tokio::time::sleep(delay).await;
                            counter.fetch_add(1, Ordering::Relaxed);
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                                b"hello from fulcrum demo\n",
                            ))))
                        }
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(DemoBackend { addr, hits, task: Some(task) })
    }

    /// Closes the listener and every connection, as a crash would.
    fn kill(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Drop for DemoBackend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The reports as a text table.
pub fn render(reports: &[RunReport]) -> String {
    let mut out = String::new();
    let Some(first) = reports.first() else { return out };
    let _ = write!(out, "{:<20} {:>9}", "algorithm", "requests");
    for b in &first.backends {
        let _ = write!(out, " {:>19}", b.label);
    }
    let _ = writeln!(out, " {:>9} {:>9} {:>7}", "p50", "p99", "errors");
    for r in reports {
        let total: u64 = r.backends.iter().map(|b| b.requests).sum::<u64>().max(1);
        let _ = write!(out, "{:<20} {:>9}", r.algorithm.name(), r.ok + r.errors);
        for b in &r.backends {
            let _ = write!(out, " {:>18.1}%", b.requests as f64 * 100.0 / total as f64);
        }
        let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
        let _ = writeln!(out, " {:>9} {:>9} {:>7}", ms(r.p50), ms(r.p99), r.errors);
    }
    out
}
