//! The proxy's live state: the current [`Runtime`] (configuration, endpoint
//! set, upstream client), swapped atomically on every applied snapshot, and
//! the per-thread balancers that pick from it.
//!
//! Each worker thread keeps its own [`Balancer`] per proxy (the Envoy model):
//! picks take no lock and share only the endpoints' atomic counters. A
//! thread notices a new runtime by its generation and updates its balancer
//! before the next pick.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use super::config::{HashKey, ProxyConfig};
use super::metrics::Metrics;
use super::retry::RetryBudget;
use super::tls::TlsState;
use super::tracks::TrackStats;
use super::upstream::{self, Upstreams};
use crate::balance::{
    Balancer, BalancerConfig, EndpointSet, EwmaConfig, HealthFlag, Nanos, Outcome, Pick, Request, SetError, SystemClock,
};
use crate::discovery::{Snapshot, SourceMetrics};
use arc_swap::ArcSwap;

/// Cookie-based session affinity, ready to use.
#[derive(Debug)]
pub(crate) struct Affinity {
    pub(crate) cookie: String,
    /// `; Max-Age=…; Path=/; HttpOnly; SameSite=Lax`, appended after `name=token`.
    pub(crate) attributes: String,
}

/// Everything one request needs, immutable once published.
pub struct Runtime {
    /// Increases with every applied snapshot.
    pub(crate) generation: u64,
    /// The configuration in force.
    pub config: Arc<ProxyConfig>,
    pub(crate) balancer: BalancerConfig,
    pub(crate) hash: Option<HashKey>,
    pub(crate) affinity: Option<Affinity>,
    /// `forwarding.trustedProxies`, parsed.
    pub(crate) trusted: Vec<super::config::Cidr>,
    /// The endpoints.
    pub set: Arc<EndpointSet>,
    /// Per-endpoint counters and connection pools, by address.
    pub(crate) upstreams: Upstreams,
    /// The evidence of each track of the set, by name (carried across reloads).
    pub(crate) tracks: Vec<Arc<TrackStats>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("generation", &self.generation).field("set", &self.set).finish_non_exhaustive()
    }
}

/// Why a snapshot could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The configuration failed validation.
    #[error(transparent)]
    Config(#[from] super::config::ConfigError),
    /// The endpoint list cannot form a set.
    #[error("endpoints: {0}")]
    Endpoints(#[from] SetError),
    /// A TLS file cannot be read or used.
    #[error(transparent)]
    Tls(#[from] super::tls::TlsError),
}

/// State shared by every task of one proxy.
pub struct Shared {
    /// The runtime in force.
    pub(crate) current: Arc<ArcSwap<Runtime>>,
    /// The proxy's metrics.
    pub metrics: Metrics,
    pub(crate) retry_budget: RetryBudget,
    /// Set on SIGTERM: readiness fails, keep-alive connections are closed.
    pub(crate) draining: AtomicBool,
    /// Wakes the outlier sweep before its next tick.
    pub(crate) sweep_now: tokio::sync::Notify,
    /// Client connections open now, over all workers (for `limits.maxConnections`).
    pub(crate) open_connections: std::sync::atomic::AtomicUsize,
    /// Wakes the workers' accept loops when a connection closes.
    pub(crate) connection_closed: tokio::sync::Notify,
    /// The TLS material in use.
    pub(crate) tls: Arc<TlsState>,
    /// Identifies this proxy's balancers in each thread's table.
    token: Arc<()>,
    next_generation: AtomicU64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("current", &self.current.load()).finish_non_exhaustive()
    }
}

impl Shared {
    /// State serving `snapshot`.
    pub fn new(snapshot: &Snapshot) -> Result<Arc<Self>, ApplyError> {
        Self::with_source_metrics(snapshot, SourceMetrics::default())
    }

    /// State serving `snapshot`, exporting the discovery source's `metrics` with its own.
    pub fn with_source_metrics(snapshot: &Snapshot, source: SourceMetrics) -> Result<Arc<Self>, ApplyError> {
        snapshot.config.validate()?;
        let tls = Arc::new(TlsState::load(&snapshot.config)?);
        let set = EndpointSet::new(
            Arc::new(SystemClock::new()),
            EwmaConfig::default(),
            snapshot.targets.iter().map(|t| t.spec.clone()),
        )?;
        let rt = build_runtime(1, snapshot, Arc::new(set), None, &tls)?;
        let budget = RetryBudget::new(snapshot.config.retries.budget_percent);
        let current = Arc::new(ArcSwap::from_pointee(rt));
        let metrics = Metrics::new(current.clone(), source, snapshot.config.worker_count());
        // Known from the first scrape: a gauge at 0 until the first reload
        // would read as a certificate expiring now.
        metrics.tls_expiry(tls.seconds_to_expiry());
        Ok(Arc::new(Shared {
            metrics,
            current,
            retry_budget: budget,
            draining: AtomicBool::new(false),
            sweep_now: tokio::sync::Notify::new(),
            open_connections: std::sync::atomic::AtomicUsize::new(0),
            connection_closed: tokio::sync::Notify::new(),
            tls,
            token: Arc::new(()),
            next_generation: AtomicU64::new(2),
        }))
    }

    /// Fails readiness from now on (shutdown has begun); serving goes on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// The runtime in force.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.current.load_full()
    }

    /// Applies a new snapshot. Endpoints that stay keep their load, latency
    /// and health; listener addresses and the protocol only change on restart.
    pub fn apply(&self, snapshot: &Snapshot) -> Result<(), ApplyError> {
        snapshot.config.validate()?;
        let old = self.current.load_full();
        let mut config = (*snapshot.config).clone();
        for (field, changed) in [
            ("listen", config.listen != old.config.listen),
            ("admin", config.admin != old.config.admin),
            ("protocol", config.protocol != old.config.protocol),
            ("workers", config.workers != old.config.workers),
        ] {
            if changed {
                tracing::warn!(field, "changing this field needs a restart; keeping the running value");
            }
        }
        config.listen = old.config.listen;
        config.admin = old.config.admin;
        config.protocol = old.config.protocol;
        config.workers = old.config.workers;
        let set = Arc::new(old.set.update(snapshot.targets.iter().map(|t| t.spec.clone()))?);
        if config.tls != old.config.tls
            || config.endpoint_tls != old.config.endpoint_tls
            || config.app_protocol != old.config.app_protocol
        {
            // New TLS settings: their files must load, or the snapshot is refused.
            self.tls.replace(&config)?;
        }
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let snapshot = Snapshot { config: Arc::new(config), targets: snapshot.targets.clone() };
        let rt = build_runtime(generation, &snapshot, set, Some(&old), &self.tls)?;
        self.retry_budget.set_percent(snapshot.config.retries.budget_percent);
        self.current.store(Arc::new(rt));
        Ok(())
    }

    /// Picks an endpoint with this thread's balancer for `rt`.
    pub(crate) fn pick(&self, rt: &Runtime, req: &Request<'_>, now: Nanos) -> Option<Pick> {
        LOCAL.with_borrow_mut(|locals| {
            let i = match locals.iter().position(|l| l.owner.as_ptr() == Arc::as_ptr(&self.token)) {
                Some(i) => i,
                None => {
                    locals.retain(|l| l.owner.strong_count() > 0);
                    let balancer = Balancer::new(rt.balancer.clone(), rt.set.clone(), fastrand::u64(..)).ok()?;
                    locals.push(Local { owner: Arc::downgrade(&self.token), generation: rt.generation, balancer });
                    locals.len() - 1
                }
            };
            let local = &mut locals[i];
            // A task may still hold an older runtime for a moment; the newer one wins.
            if rt.generation > local.generation {
                if *local.balancer.config() != rt.balancer {
                    local.balancer = Balancer::new(rt.balancer.clone(), rt.set.clone(), fastrand::u64(..)).ok()?;
                } else {
                    local.balancer.update_set(rt.set.clone());
                }
                local.generation = rt.generation;
            }
            local.balancer.pick_at(req, now)
        })
    }

    /// Completes a failed pick. When the endpoint's run of failures reaches
    /// the ejection threshold, the sweep runs at once instead of at its next
    /// tick: under load, 100 ms of a dead endpoint is many failed attempts.
    pub(crate) fn endpoint_failed(&self, rt: &Runtime, pick: Pick, now: Nanos) {
        let endpoint = pick.endpoint().clone();
        pick.complete_at(Outcome::Failure, now);
        let threshold = rt.config.health_check.passive.consecutive_failures;
        if threshold > 0 && endpoint.consecutive_failures() >= threshold {
            self.sweep_now.notify_one();
        }
    }

    /// Whether this thread's balancer for the current runtime is in panic mode.
    pub(crate) fn in_panic(&self) -> bool {
        let rt = self.runtime();
        Balancer::new(rt.balancer.clone(), rt.set.clone(), 0).map(|mut b| b.in_panic()).unwrap_or(false)
    }
}

struct Local {
    owner: Weak<()>,
    generation: u64,
    balancer: Balancer,
}

thread_local! {
    static LOCAL: RefCell<Vec<Local>> = const { RefCell::new(Vec::new()) };
}

fn build_runtime(
    generation: u64,
    snapshot: &Snapshot,
    set: Arc<EndpointSet>,
    old: Option<&Runtime>,
    tls: &Arc<TlsState>,
) -> Result<Runtime, ApplyError> {
    let config = snapshot.config.clone();
    for t in &snapshot.targets {
        if let Some(m) = set.get(t.spec.addr) {
            m.endpoint().set_flag(HealthFlag::Draining, t.draining);
        }
    }
    let tracks: Vec<Arc<TrackStats>> = set
        .tracks()
        .iter()
        .map(|name| {
            old.and_then(|o| o.tracks.iter().find(|t| t.name == *name).cloned())
                .unwrap_or_else(|| Arc::new(TrackStats::new(name.clone())))
        })
        .collect();
    let track_of = |m: &crate::balance::Member| {
        let name = set.track_of(m);
        tracks.iter().find(|t| &*t.name == name).cloned().unwrap_or_else(|| Arc::new(TrackStats::new(name.into())))
    };
    let endpoints = set.members().iter().map(|m| (m.endpoint().addr(), track_of(m)));
    let http2 = config.app_protocol.is_http2();
    let upstreams = upstream::carry(old.map(|o| &o.upstreams), endpoints, config.worker_count(), http2, tls);
    let affinity = config.load_balancing.session_affinity.as_ref().map(|a| Affinity {
        cookie: a.cookie.clone(),
        attributes: format!("; Max-Age={}; Path=/; HttpOnly; SameSite=Lax", a.ttl.0.as_secs().max(1)),
    });
    Ok(Runtime {
        generation,
        balancer: config.balancer_config(),
        hash: config.hash_key()?,
        affinity,
        trusted: config.trusted_proxies()?,
        set,
        upstreams,
        tracks,
        config,
    })
}
