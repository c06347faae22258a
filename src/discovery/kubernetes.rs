//! The Kubernetes source: the configuration from the app's `<app>-proxy`
//! ConfigMap and the endpoints from the EndpointSlices of its backends
//! Services, both watched through the API server.
//!
//! The source keeps a [`View`] (a sans-IO state machine fed with watch
//! events) and publishes a [`Snapshot`] whenever the view's snapshot changes.
//!
//! - Endpoint conditions: `ready` (or unset) takes new traffic; `serving` and
//!   `terminating` drains (no new requests, in-flight work finishes); anything
//!   else is left out, so a pod that stops being ready stops receiving new
//!   requests as soon as the watch event arrives.
//! - An endpoint is its address and port, whatever slice lists it: slices
//!   being rewritten, split or merged do not reset its load statistics. A
//!   serving endpoint that vanishes from every slice without first being
//!   marked not ready or terminating is held for [`VANISHED_GRACE`], since
//!   the EndpointSlice controller moves endpoints with separate writes.
//! - The track comes from the Service the slice belongs to (`<app>-backends`
//!   is `stable`, `<app>-canary-backends` is `canary`); canary endpoints only
//!   count while the configuration asks for a traffic split.
//! - Fail static: a failing watch, a relist, a missing or invalid ConfigMap
//!   never empty the published endpoints or replace a good configuration.
//!   Watch failures are logged and counted, and the watch retries with
//!   backoff.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;

use super::{Snapshot, SourceMetrics, Target};
use crate::balance::EndpointSpec;
use crate::operator::desired::{BACKEND_PORT_NAME, CONFIG_KEY, Names};
use crate::proxy::config::{ConfigError, ProxyConfig};

/// The label the EndpointSlice controller puts on every slice of a Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The objects one proxy follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watched {
    /// Namespace of the app.
    pub namespace: String,
    /// The ConfigMap holding the configuration under [`CONFIG_KEY`].
    pub config_map: String,
    /// Backends Services and the track of their endpoints.
    pub services: Vec<(String, Arc<str>)>,
    /// The Service in front of the proxies: its ready endpoints per zone are
    /// the proxies' share of the traffic, for zone-aware balancing.
    pub front: Option<String>,
    /// The listener address, whatever the ConfigMap says (the pod's ports are fixed).
    pub listen: SocketAddr,
    /// The admin listener address, likewise.
    pub admin: SocketAddr,
}

impl Watched {
    /// The objects the operator creates for the app `app`.
    pub fn for_app(namespace: &str, app: &str, listen: SocketAddr, admin: SocketAddr) -> Self {
        let n = Names { app: app.to_owned() };
        Watched {
            namespace: namespace.to_owned(),
            config_map: n.proxy(),
            services: vec![(n.backends(), Arc::from("stable")), (n.canary_backends(), Arc::from("canary"))],
            front: Some(app.to_owned()),
            listen,
            admin,
        }
    }

    /// The label selector of every watched Service's slices.
    pub fn slice_selector(&self) -> String {
        let names: Vec<&str> = self.services.iter().map(|(s, _)| s.as_str()).chain(self.front.as_deref()).collect();
        format!("{SERVICE_NAME_LABEL} in ({})", names.join(","))
    }

    fn is_front(&self, slice: &EndpointSlice) -> bool {
        let service = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL));
        service.is_some() && service == self.front.as_ref()
    }

    fn track_of(&self, slice: &EndpointSlice) -> Option<&Arc<str>> {
        let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
        self.services.iter().find(|(s, _)| s == service).map(|(_, t)| t)
    }
}

/// Reads the configuration out of the ConfigMap, with the fixed addresses.
pub fn config_from(cm: &ConfigMap, watched: &Watched) -> Result<ProxyConfig, ConfigError> {
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(CONFIG_KEY))
        .ok_or_else(|| ConfigError::Parse(format!("the ConfigMap has no data key {CONFIG_KEY:?}")))?;
    let mut config = ProxyConfig::parse(text)?;
    config.listen = watched.listen;
    config.admin = Some(watched.admin);
    config.validate()?;
    Ok(config)
}

/// What an endpoint's conditions mean for new traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Use {
    Out,
    Draining,
    Serving,
}

fn use_of(e: &k8s_openapi::api::discovery::v1::Endpoint) -> Use {
    let c = e.conditions.as_ref();
    // Unset `ready` means ready; unset `serving` means the same as `ready`.
    let ready = c.and_then(|c| c.ready).unwrap_or(true);
    let serving = c.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
    if ready && !terminating {
        Use::Serving
    } else if serving && terminating {
        Use::Draining
    } else {
        Use::Out
    }
}

/// The slice's port for the app: the one named like the backends Service
/// port, or the only one.
fn port_of(slice: &EndpointSlice) -> Option<u16> {
    let ports = slice.ports.as_deref()?;
    let port = ports
        .iter()
        .find(|p| p.name.as_deref() == Some(BACKEND_PORT_NAME))
        .or_else(|| if ports.len() == 1 { ports.first() } else { None })?;
    if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
        return None;
    }
    port.port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0)
}

/// Every address the slices list, at its most usable condition (an address
/// listed by several slices, as during a slice rewrite, counts once).
/// Canary endpoints count as out unless `split` is set.
type Listed = (Use, Arc<str>, Option<Arc<str>>);

fn listed<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    watched: &Watched,
    split: bool,
) -> BTreeMap<SocketAddr, Listed> {
    let mut found: BTreeMap<SocketAddr, Listed> = BTreeMap::new();
    for slice in slices {
        if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
            continue;
        }
        let Some(track) = watched.track_of(slice) else { continue };
        let track_used = split || &**track == crate::balance::DEFAULT_TRACK;
        let Some(port) = port_of(slice) else { continue };
        for e in &slice.endpoints {
            let Some(ip) = e.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else { continue };
            let u = if track_used { use_of(e) } else { Use::Out };
            let zone: Option<Arc<str>> = e.zone.as_deref().map(Arc::from);
            let entry = found.entry(SocketAddr::new(ip, port)).or_insert((u, track.clone(), zone.clone()));
            if u > entry.0 {
                *entry = (u, track.clone(), zone);
            }
        }
    }
    found
}

fn target(addr: SocketAddr, (u, track, zone): &Listed) -> Target {
    Target { spec: EndpointSpec::new(addr).track(track).zone(zone.clone()), draining: *u == Use::Draining }
}

/// The ready proxies per zone: the front Service's ready endpoints that have
/// a zone (each address once).
fn proxies_by_zone<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    watched: &Watched,
) -> BTreeMap<String, u32> {
    let mut seen = std::collections::BTreeSet::new();
    let mut zones = BTreeMap::new();
    for e in slices.into_iter().filter(|s| watched.is_front(s)).flat_map(|s| &s.endpoints) {
        if use_of(e) == Use::Serving
            && let (Some(zone), Some(addr)) = (&e.zone, e.addresses.first())
            && seen.insert(addr)
        {
            *zones.entry(zone.clone()).or_insert(0) += 1;
        }
    }
    zones
}

/// The zone the slices give the pod at `ip` (the proxy's own pod, in Sidecar mode).
fn zone_of_ip<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>, ip: &str) -> Option<String> {
    slices
        .into_iter()
        .flat_map(|s| &s.endpoints)
        .find(|e| e.addresses.iter().any(|a| a == ip))
        .and_then(|e| e.zone.clone())
}

/// The endpoints the slices offer, sorted by address. Canary endpoints are
/// kept only when `split` is set.
pub fn targets<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>, watched: &Watched, split: bool) -> Vec<Target> {
    listed(slices, watched, split)
        .into_iter()
        .filter(|(_, l)| l.0 != Use::Out)
        .map(|(addr, l)| target(addr, &l))
        .collect()
}

/// How long an endpoint that was taking traffic stays after it disappears
/// from every slice without first being marked not ready or terminating.
/// The EndpointSlice controller moves endpoints between slices with separate
/// writes (a delete, then a create); holding the endpoint this long keeps its
/// load statistics. A pod that really goes away is marked terminating first,
/// which applies at once.
pub const VANISHED_GRACE: Duration = Duration::from_secs(1);

/// The source's knowledge, fed with watch events. Sans-IO.
#[derive(Debug)]
pub struct View {
    watched: Watched,
    config: Option<Arc<ProxyConfig>>,
    /// The config map seen during a relist, if any.
    relisting_config: Option<Option<ConfigMap>>,
    /// Slices by name.
    slices: BTreeMap<String, EndpointSlice>,
    /// Slices seen during a relist; replaces `slices` when the relist is complete.
    relisting_slices: Option<BTreeMap<String, EndpointSlice>>,
    slices_listed: bool,
    /// The targets of the last snapshot.
    last: Vec<Target>,
    /// Serving endpoints no slice lists any more, and since when.
    vanished: BTreeMap<SocketAddr, Instant>,
}

/// What a configuration event did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigChange {
    /// Nothing new.
    None,
    /// A new valid configuration.
    Applied,
    /// An invalid or missing configuration: the previous one stays.
    Rejected(String),
}

impl View {
    /// Knows nothing yet.
    pub fn new(watched: Watched) -> Self {
        View {
            watched,
            config: None,
            relisting_config: None,
            slices: BTreeMap::new(),
            relisting_slices: None,
            slices_listed: false,
            last: Vec::new(),
            vanished: BTreeMap::new(),
        }
    }

    /// What is watched.
    pub fn watched(&self) -> &Watched {
        &self.watched
    }

    /// Applies one EndpointSlice watch event.
    pub fn on_slice(&mut self, event: Event<EndpointSlice>) {
        let key = |s: &EndpointSlice| s.metadata.name.clone().unwrap_or_default();
        match event {
            Event::Init => self.relisting_slices = Some(BTreeMap::new()),
            Event::InitApply(s) => {
                self.relisting_slices.get_or_insert_with(BTreeMap::new).insert(key(&s), s);
            }
            Event::InitDone => {
                if let Some(listed) = self.relisting_slices.take() {
                    self.slices = listed;
                }
                self.slices_listed = true;
            }
            Event::Apply(s) => {
                self.slices.insert(key(&s), s);
            }
            Event::Delete(s) => {
                self.slices.remove(&key(&s));
            }
        }
    }

    /// Applies one ConfigMap watch event (the watch selects the one ConfigMap).
    pub fn on_config(&mut self, event: Event<ConfigMap>) -> ConfigChange {
        match event {
            Event::Init => {
                self.relisting_config = Some(None);
                ConfigChange::None
            }
            Event::InitApply(cm) => {
                self.relisting_config = Some(Some(cm));
                ConfigChange::None
            }
            Event::InitDone => match self.relisting_config.take().flatten() {
                Some(cm) => self.set_config(&cm),
                None => ConfigChange::Rejected(format!(
                    "ConfigMap {}/{} not found",
                    self.watched.namespace, self.watched.config_map
                )),
            },
            Event::Apply(cm) => self.set_config(&cm),
            Event::Delete(_) => ConfigChange::Rejected(format!(
                "ConfigMap {}/{} was deleted",
                self.watched.namespace, self.watched.config_map
            )),
        }
    }

    fn set_config(&mut self, cm: &ConfigMap) -> ConfigChange {
        match config_from(cm, &self.watched) {
            Ok(c) if self.config.as_deref() == Some(&c) => ConfigChange::None,
            Ok(c) => {
                self.config = Some(Arc::new(c));
                ConfigChange::Applied
            }
            Err(e) => ConfigChange::Rejected(format!(
                "ConfigMap {}/{} key {CONFIG_KEY}: {e}",
                self.watched.namespace, self.watched.config_map
            )),
        }
    }

    /// The snapshot to serve at `now`: once there is a configuration and the
    /// slices have been listed. An endpoint that was serving and that no
    /// slice lists any more stays for [`VANISHED_GRACE`].
    pub fn snapshot(&mut self, now: Instant) -> Option<Snapshot> {
        let mut config = self.config.clone()?;
        if !self.slices_listed {
            return None;
        }
        if let Some(z) = &config.load_balancing.zone_aware {
            // Zone-aware with no zone configured or in FULCRUM_ZONE: the
            // proxy's own pod (POD_IP, in Sidecar mode) is in the slices,
            // with its zone.
            let zone = std::env::var("POD_IP")
                .ok()
                .filter(|_| z.zone.is_none() && std::env::var("FULCRUM_ZONE").unwrap_or_default().is_empty())
                .and_then(|ip| zone_of_ip(self.slices.values(), &ip));
            // With no proxies configured, the front Service's ready endpoints.
            let proxies = if z.proxies.is_empty() {
                proxies_by_zone(self.slices.values(), &self.watched)
            } else {
                BTreeMap::new()
            };
            if zone.is_some() || !proxies.is_empty() {
                let mut c = (*config).clone();
                if let Some(z) = c.load_balancing.zone_aware.as_mut() {
                    z.zone = zone.or(z.zone.take());
                    if !proxies.is_empty() {
                        z.proxies = proxies;
                    }
                }
                config = Arc::new(c);
            }
        }
        let split = !config.load_balancing.tracks.is_empty();
        let listed = listed(self.slices.values(), &self.watched, split);
        let mut targets: Vec<Target> =
            listed.iter().filter(|(_, l)| l.0 != Use::Out).map(|(addr, l)| target(*addr, l)).collect();
        let mut held = BTreeMap::new();
        for t in &self.last {
            let addr = t.spec.addr;
            if t.draining || listed.contains_key(&addr) {
                continue;
            }
            let since = self.vanished.get(&addr).copied().unwrap_or(now);
            if now.saturating_duration_since(since) < VANISHED_GRACE {
                held.insert(addr, since);
                targets.push(t.clone());
            }
        }
        targets.sort_by_key(|t| t.spec.addr);
        self.vanished = held;
        self.last.clone_from(&targets);
        Some(Snapshot { config, targets })
    }

    /// When a held endpoint's grace ends, if one is held.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.vanished.values().min().map(|since| *since + VANISHED_GRACE)
    }
}

/// A change is published once no other event has arrived for this long...
const SETTLE_QUIET: Duration = Duration::from_millis(30);
/// ...or this long after the first one, whichever comes first: well inside
/// the second in which a pod that stops being ready must stop receiving traffic.
const SETTLE_MAX: Duration = Duration::from_millis(150);

/// Watches the API server and publishes snapshots.
pub struct KubernetesSource {
    client: kube::Client,
    view: View,
    metrics: SourceMetrics,
}

enum Input {
    Slice(Result<Event<EndpointSlice>, watcher::Error>),
    Config(Result<Event<ConfigMap>, watcher::Error>),
}

impl KubernetesSource {
    /// A source reading through `client`, counting into `metrics`.
    pub fn new(client: kube::Client, watched: Watched, metrics: SourceMetrics) -> Self {
        KubernetesSource { client, view: View::new(watched), metrics }
    }

    fn inputs(&self) -> impl Stream<Item = Input> + Send + use<> {
        let w = self.view.watched();
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &w.namespace);
        let config_maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), &w.namespace);
        let slices = watcher::watcher(slices, watcher::Config::default().labels(&w.slice_selector()))
            .default_backoff()
            .map(Input::Slice);
        let config = watcher::watcher(
            config_maps,
            watcher::Config::default().fields(&format!("metadata.name={}", w.config_map)),
        )
        .default_backoff()
        .map(Input::Config);
        futures::stream::select(slices, config)
    }

    /// Publishes every new snapshot on `tx` (`None` until the first one)
    /// until every receiver is gone.
    pub async fn run(mut self, tx: watch::Sender<Option<Arc<Snapshot>>>) {
        let w = self.view.watched().clone();
        tracing::info!(
            namespace = %w.namespace,
            config_map = %w.config_map,
            selector = %w.slice_selector(),
            "watching the configuration and endpoints"
        );
        let mut inputs = std::pin::pin!(self.inputs());
        let mut published: Option<Snapshot> = None;
        loop {
            let expiry = self.view.next_expiry().map(tokio::time::Instant::from_std);
            tokio::select! {
                i = inputs.next() => match i {
                    Some(i) => self.take(i),
                    None => return,
                },
                () = sleep_until(expiry) => {}
                () = tx.closed() => return,
            }
            // Settle: a burst of events (a relist, a rollout) becomes one
            // snapshot rather than one per event.
            let settle = tokio::time::Instant::now() + SETTLE_MAX;
            while let Ok(Some(input)) =
                tokio::time::timeout_at(settle.min(tokio::time::Instant::now() + SETTLE_QUIET), inputs.next()).await
            {
                self.take(input);
            }
            let Some(next) = self.view.snapshot(Instant::now()) else { continue };
            if published.as_ref() != Some(&next) {
                tracing::debug!(endpoints = next.targets.len(), "publishing a new snapshot");
                tx.send_replace(Some(Arc::new(next.clone())));
                published = Some(next);
            }
        }
    }

    fn take(&mut self, input: Input) {
        match input {
            Input::Slice(Ok(e)) => self.view.on_slice(e),
            Input::Config(Ok(e)) => match self.view.on_config(e) {
                ConfigChange::None => {}
                ConfigChange::Applied => {
                    tracing::info!(config_map = %self.view.watched().config_map, "configuration loaded");
                    self.metrics.reload(true);
                }
                ConfigChange::Rejected(why) => {
                    tracing::warn!(reason = %why, "configuration not usable; keeping the current one");
                    self.metrics.reload(false);
                }
            },
            Input::Slice(Err(e)) => self.watch_failed("endpointslices", &e),
            Input::Config(Err(e)) => self.watch_failed("configmaps", &e),
        }
    }

    fn watch_failed(&self, resource: &'static str, e: &watcher::Error) {
        self.metrics.watch_error(resource);
        tracing::warn!(
            resource,
            error = %e,
            "watch failed; serving the last known configuration and endpoints while it retries"
        );
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
