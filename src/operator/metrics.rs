//! The operator's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HealedLabel {
    namespace: String,
    app: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppLabel {
    namespace: String,
    app: String,
}

/// One app's state as the last reconcile saw it, for alerting.
#[derive(Clone, Copy, Debug, Default)]
pub struct AppFigures {
    pub available: bool,
    pub ready_endpoints: i64,
    pub pods_not_started: i64,
    pub rolled_back: bool,
}

/// Counters of the control loop.
#[derive(Debug)]
pub struct OperatorMetrics {
    registry: Registry,
    reconciles: Family<ResultLabel, Counter>,
    errors: Family<KindLabel, Counter>,
    duration: Histogram,
    healed: Family<HealedLabel, Counter>,
    leader: Gauge,
    available: Family<AppLabel, Gauge>,
    ready_endpoints: Family<AppLabel, Gauge>,
    not_started: Family<AppLabel, Gauge>,
    rolled_back: Family<AppLabel, Gauge>,
    rollbacks: Family<AppLabel, Counter>,
    /// The apps with per-app series, to remove them when the app goes.
    apps: std::sync::Mutex<std::collections::BTreeSet<(String, String)>>,
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("fulcrum_operator");
        let reconciles = Family::default();
        registry.register("reconciles", "Reconciles by result", reconciles.clone());
        let errors = Family::default();
        registry.register("reconcile_errors", "Failed reconciles by kind of error", errors.clone());
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        registry.register("reconcile_duration_seconds", "Time taken by one reconcile", duration.clone());
        let healed = Family::default();
        registry.register("healed_pods", "Pods deleted to heal apps, by app and reason", healed.clone());
        let leader = Gauge::default();
        registry.register("leader", "1 while this instance holds the leader lease", leader.clone());
        let available = Family::default();
        registry.register("app_available", "1 while the app's Available condition is True", available.clone());
        let ready_endpoints = Family::default();
        registry.register("app_ready_endpoints", "Ready app pods behind the app's proxies", ready_endpoints.clone());
        let not_started = Family::default();
        registry.register(
            "app_pods_not_started",
            "App pods that never started past unreadyTimeout",
            not_started.clone(),
        );
        let rolled_back = Family::default();
        registry.register("app_rolled_back", "1 while the app's last canary stands rolled back", rolled_back.clone());
        let rollbacks = Family::default();
        registry.register("canary_rollbacks", "Canaries rolled back, by app", rollbacks.clone());
        OperatorMetrics {
            registry,
            reconciles,
            errors,
            duration,
            healed,
            leader,
            available,
            ready_endpoints,
            not_started,
            rolled_back,
            rollbacks,
            apps: Default::default(),
        }
    }
}

impl OperatorMetrics {
    pub fn reconciled(&self, ok: bool, seconds: f64) {
        self.reconciles.get_or_create(&ResultLabel { result: if ok { "ok" } else { "error" } }).inc();
        self.duration.observe(seconds);
    }

    pub fn error(&self, kind: &'static str) {
        self.errors.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn healed(&self, namespace: &str, app: &str, reason: &'static str) {
        self.known(namespace, app);
        self.healed.get_or_create(&HealedLabel { namespace: namespace.into(), app: app.into(), reason }).inc();
    }

    fn known(&self, namespace: &str, app: &str) {
        let mut apps = self.apps.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        apps.insert((namespace.to_owned(), app.to_owned()));
    }

    /// Removes every series of the apps for which `gone` holds.
    pub fn forget_apps(&self, gone: impl Fn(&str, &str) -> bool) {
        let mut apps = self.apps.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        apps.retain(|(namespace, app)| {
            if !gone(namespace, app) {
                return true;
            }
            let l = AppLabel { namespace: namespace.clone(), app: app.clone() };
            for family in [&self.available, &self.ready_endpoints, &self.not_started, &self.rolled_back] {
                family.remove(&l);
            }
            self.rollbacks.remove(&l);
            for reason in super::healing::Reason::ALL {
                let h = HealedLabel { namespace: namespace.clone(), app: app.clone(), reason: reason.name() };
                self.healed.remove(&h);
            }
            false
        });
    }

    /// The app's figures after a reconcile.
    pub fn app(&self, namespace: &str, app: &str, f: AppFigures) {
        self.known(namespace, app);
        let l = AppLabel { namespace: namespace.into(), app: app.into() };
        self.available.get_or_create(&l).set(i64::from(f.available));
        self.ready_endpoints.get_or_create(&l).set(f.ready_endpoints);
        self.not_started.get_or_create(&l).set(f.pods_not_started);
        self.rolled_back.get_or_create(&l).set(i64::from(f.rolled_back));
    }

    /// A canary of the app was rolled back.
    pub fn rolled_back(&self, namespace: &str, app: &str) {
        self.known(namespace, app);
        self.rollbacks.get_or_create(&AppLabel { namespace: namespace.into(), app: app.into() }).inc();
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// The metrics in the Prometheus/OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
