//! Where the proxy's configuration and endpoints come from.
//!
//! A source publishes [`Snapshot`]s on a `tokio::sync::watch` channel; the
//! proxy applies each new one without a restart. The standalone source reads a
//! file ([`file`](mod@file)); the Kubernetes source (EndpointSlices and a ConfigMap)
//! publishes the same type, so the proxy does not know which one feeds it.

pub mod file;
pub mod kubernetes;

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::balance::EndpointSpec;
use crate::proxy::config::ProxyConfig;

/// One endpoint as discovery reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Address, weight and track.
    pub spec: EndpointSpec,
    /// Terminating: in-flight work finishes, no new work is sent.
    pub draining: bool,
}

impl From<EndpointSpec> for Target {
    fn from(spec: EndpointSpec) -> Self {
        Target { spec, draining: false }
    }
}

/// Everything the proxy needs to serve: a validated configuration and the
/// endpoints to balance over.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// The configuration (its `endpoints` list is ignored in favour of `targets`).
    pub config: Arc<ProxyConfig>,
    /// The endpoints.
    pub targets: Vec<Target>,
}

impl Snapshot {
    /// A snapshot of a standalone configuration, whose endpoints it lists.
    pub fn standalone(config: ProxyConfig) -> Self {
        let targets = config.endpoint_specs().into_iter().map(Target::from).collect();
        Snapshot { config: Arc::new(config), targets }
    }
}

/// Whether a reload attempt applied or was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReloadResult {
    /// A new configuration was published.
    Applied,
    /// The new configuration was invalid; the old one stays.
    Rejected,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabel {
    pub(crate) result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResourceLabel {
    pub(crate) resource: &'static str,
}

/// What a source counts, exported with the proxy's metrics. Cloning shares the counters.
#[derive(Clone, Debug, Default)]
pub struct SourceMetrics {
    pub(crate) reloads: Family<ResultLabel, Counter>,
    pub(crate) watch_errors: Family<ResourceLabel, Counter>,
}

impl SourceMetrics {
    /// Counts a configuration reload attempt.
    pub fn reload(&self, applied: bool) {
        let result = if applied { "success" } else { "failure" };
        self.reloads.get_or_create(&ResultLabel { result }).inc();
    }

    /// Counts a failed watch of `resource` (the source keeps serving what it knew).
    pub fn watch_error(&self, resource: &'static str) {
        self.watch_errors.get_or_create(&ResourceLabel { resource }).inc();
    }
}
