//! Health: active probes of every endpoint, and the passive outlier sweep.
//!
//! Both only raise or clear flags on the shared endpoints
//! ([`Endpoint::set_flag`]); the balancers see the change at their next pick.
//! A probe task per endpoint follows the endpoint set: tasks start for
//! endpoints that join, stop for those that leave, and all restart when the
//! probe settings change.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use tokio::task::JoinHandle;

use super::config::{ActiveCheck, Probe};
use super::grpc;
use super::state::Shared;
use super::tls::TlsState;
use super::upstream::{EndpointIo, connect_endpoint};
use crate::balance::{Endpoint, HealthFlag, OutlierDetector, OutlierEvent};

/// How often the outlier sweep runs and the probe supervisor looks for changes.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// How often idle pooled connections past the idle timeout are closed.
const PRUNE_INTERVAL: Duration = Duration::from_secs(1);

/// Runs the passive outlier sweep and supervises the active probes, until dropped.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut detector = OutlierDetector::new(shared.runtime().config.outlier_config());
    let mut probes = Probes::default();
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut generation = 0;
    let mut last_prune = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shared.sweep_now.notified() => {}
        }
        let rt = shared.runtime();
        if rt.generation != generation {
            generation = rt.generation;
            detector.set_config(rt.config.outlier_config());
            let settings = rt.config.health_check.active.clone().zip(rt.config.probe().ok().flatten());
            probes.follow(&rt.set, settings, &shared.tls);
        }
        if last_prune.elapsed() >= PRUNE_INTERVAL {
            last_prune = std::time::Instant::now();
            for u in rt.upstreams.values() {
                u.prune(rt.config.timeouts.idle.0);
            }
        }
        let now = rt.set.clock().now();
        for event in detector.sweep(&rt.set, now) {
            match event {
                OutlierEvent::Ejected { addr, duration } => {
                    tracing::warn!(endpoint = %addr, seconds = duration.as_secs_f64(), "endpoint ejected after consecutive failures");
                    if let Some(u) = rt.upstreams.get(&addr) {
                        u.stats.count_ejection();
                    }
                }
                OutlierEvent::Restored { addr } => tracing::info!(endpoint = %addr, "ejected endpoint restored"),
                OutlierEvent::Spared { addr } => {
                    tracing::warn!(endpoint = %addr, "endpoint failing but not ejected: max ejection percent reached");
                }
            }
        }
    }
}

/// The probe tasks, by endpoint.
#[derive(Default)]
struct Probes {
    settings: Option<(ActiveCheck, Probe)>,
    tasks: HashMap<SocketAddr, JoinHandle<()>>,
}

impl Probes {
    fn follow(
        &mut self,
        set: &crate::balance::EndpointSet,
        settings: Option<(ActiveCheck, Probe)>,
        tls: &Arc<TlsState>,
    ) {
        if settings != self.settings {
            for (_, t) in self.tasks.drain() {
                t.abort();
            }
            // Probes stopped: their verdicts no longer hold.
            for m in set.members() {
                m.endpoint().set_flag(HealthFlag::ActiveCheckFailed, false);
            }
            self.settings = settings;
        }
        let Some((check, probe)) = &self.settings else { return };
        self.tasks.retain(|addr, task| {
            let keep = set.get(*addr).is_some();
            if !keep {
                task.abort();
            }
            keep
        });
        for m in set.members() {
            let e = m.endpoint();
            self.tasks
                .entry(e.addr())
                .or_insert_with(|| tokio::spawn(probe_loop(e.clone(), check.clone(), probe.clone(), tls.clone())));
        }
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        for (_, t) in self.tasks.drain() {
            t.abort();
        }
    }
}

/// Probes one endpoint forever: down after `unhealthyThreshold` consecutive
/// failures, up again after `healthyThreshold` consecutive successes.
async fn probe_loop(endpoint: Arc<Endpoint>, check: ActiveCheck, probe: Probe, tls: Arc<TlsState>) {
    // Spread the probes of many endpoints over the interval.
    let jitter = check.interval.0.mul_f64(fastrand::f64() * 0.1);
    tokio::time::sleep(jitter).await;
    let mut tick = tokio::time::interval(check.interval.0);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut ok_run, mut fail_run) = (0u32, 0u32);
    loop {
        tick.tick().await;
        let ok =
            tokio::time::timeout(check.timeout.0, probe_once(endpoint.addr(), &probe, &tls)).await.unwrap_or(false);
        if ok {
            ok_run += 1;
            fail_run = 0;
            if ok_run >= check.healthy_threshold && endpoint.set_flag(HealthFlag::ActiveCheckFailed, false) {
                tracing::info!(endpoint = %endpoint.addr(), "active health check passes again");
            }
        } else {
            fail_run += 1;
            ok_run = 0;
            if fail_run >= check.unhealthy_threshold && endpoint.set_flag(HealthFlag::ActiveCheckFailed, true) {
                tracing::warn!(endpoint = %endpoint.addr(), failures = fail_run, "active health check failing; endpoint taken out");
            }
        }
    }
}

/// One probe: a TCP connect, an HTTP GET on a fresh connection expecting
/// 2xx, or a gRPC health check expecting `SERVING`; over TLS when the
/// endpoints are reached over TLS (the handshake itself is then part of
/// every probe, a TCP one included).
async fn probe_once(addr: SocketAddr, probe: &Probe, tls: &TlsState) -> bool {
    let Ok(stream) = connect_endpoint(addr, tls.endpoint().as_deref()).await else { return false };
    let path = match probe {
        Probe::Tcp => return true,
        Probe::Http(path) => path,
        Probe::Grpc(service) => return grpc_probe(addr, stream, service).await,
    };
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await else {
        return false;
    };
    let conn = tokio::spawn(conn);
    let req = http::Request::get(path.as_str())
        .header(http::header::HOST, addr.to_string())
        .header(http::header::USER_AGENT, "fulcrum-health-check")
        .header(http::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new());
    let ok = match req {
        Ok(req) => sender.send_request(req).await.is_ok_and(|r| r.status().is_success()),
        Err(_) => false,
    };
    conn.abort();
    ok
}

/// Largest health-check response read (the message is a few bytes).
const MAX_PROBE_BODY: usize = 4096;

/// `grpc.health.v1.Health/Check` over a fresh HTTP/2 connection: passes when
/// the call ends with `grpc-status: 0` and the answer is `SERVING`.
async fn grpc_probe(addr: SocketAddr, stream: EndpointIo, service: &str) -> bool {
    let handshake = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await;
    let Ok((mut sender, conn)) = handshake else { return false };
    let conn = tokio::spawn(conn);
    let req = http::Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .header(http::header::USER_AGENT, "fulcrum-health-check")
        .body(Full::new(Bytes::from(grpc::health_request(service))));
    let ok = match req {
        Ok(req) => match sender.send_request(req).await {
            Ok(resp) if resp.status().is_success() => {
                let header_status = grpc::status(resp.headers());
                match http_body_util::Limited::new(resp.into_body(), MAX_PROBE_BODY).collect().await {
                    Ok(collected) => {
                        let status = collected.trailers().and_then(grpc::status).or(header_status);
                        status == Some(grpc::code::OK) && grpc::health_serving(&collected.to_bytes())
                    }
                    Err(_) => false,
                }
            }
            _ => false,
        },
        Err(_) => false,
    };
    conn.abort();
    ok
}
