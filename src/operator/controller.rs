//! The reconciler: for each `LoadBalancedApp`, apply the desired objects with
//! server-side apply under one field manager, heal pods by the policy, and
//! write the status when (and only when) it changes.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::{FutureExt, StreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::{Instrument, info, info_span, warn};

use super::desired::{
    APP_LABEL, COMPONENT_LABEL, Desired, MANAGED_BY_SELECTOR, Names, PROXY_CONTAINER, Settings, TRACK_LABEL, desired,
    stable_selector,
};
use super::healing::{EjectionStreaks, Phase, PodView, Policy, heal_plan};
use super::metrics::OperatorMetrics;
use super::rollout;
use crate::api::{Counts, Healed, LoadBalancedApp, LoadBalancedAppStatus, ProxyMode, RolloutPhase};

/// The field manager of every write.
pub const FIELD_MANAGER: &str = "fulcrum-operator";

/// What failed in a reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API request failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The object lacks what every stored object has.
    #[error("{0}")]
    Malformed(String),
}

impl Error {
    /// A label for counting errors.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Malformed(_) => "malformed",
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub recorder: Recorder,
    pub metrics: Arc<OperatorMetrics>,
    /// Owned objects already seen under their app's control: (kind, namespace,
    /// name, app uid). Only objects not in here are read before they are
    /// applied, so the check costs a read per object once, not per reconcile.
    verified: std::sync::Mutex<std::collections::HashSet<(&'static str, String, String, String)>>,
    /// Consecutive failed reconciles per app, for the back-off.
    failures: std::sync::Mutex<std::collections::HashMap<(String, String), u32>>,
    /// The namespaces served; empty: all.
    namespaces: Vec<String>,
    /// Per app (namespace, name): how long its proxies have kept ejecting each pod.
    streaks: std::sync::Mutex<std::collections::HashMap<(String, String), EjectionStreaks>>,
}

impl Context {
    pub fn new(client: Client, settings: Settings) -> Self {
        let reporter = Reporter { controller: FIELD_MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            metrics: Arc::default(),
            verified: Default::default(),
            failures: Default::default(),
            namespaces: Vec::new(),
            streaks: Default::default(),
        }
    }

    /// Serves only the apps of `namespaces` (all when empty): every watch is
    /// namespaced, so the operator needs rights in those namespaces only.
    pub fn confined_to(mut self, namespaces: Vec<String>) -> Self {
        self.namespaces = namespaces.into_iter().map(|n| n.trim().to_owned()).filter(|n| !n.is_empty()).collect();
        self
    }
}

/// The wait before retrying a reconcile that failed `failures` times in a
/// row: 1 s doubling to 5 min, spread by ±20% (`jitter` in [0, 1)) so that
/// many apps failing together do not retry together.
pub fn backoff(failures: u32, jitter: f64) -> Duration {
    let base = Duration::from_secs(1).saturating_mul(1u32 << failures.saturating_sub(1).min(9));
    base.min(Duration::from_secs(300)).mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0))
}

/// Runs the controller until the stream of reconciles ends: one over all
/// namespaces, or one per namespace the operator is confined to.
pub async fn run(ctx: Arc<Context>) {
    if ctx.namespaces.is_empty() {
        run_in(ctx, None).await;
    } else {
        info!(namespaces = ?ctx.namespaces, "serving these namespaces only");
        let controllers = ctx.namespaces.clone().into_iter().map(|ns| run_in(ctx.clone(), Some(ns)));
        futures::future::join_all(controllers).await;
    }
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

async fn run_in(ctx: Arc<Context>, namespace: Option<String>) {
    let client = ctx.client.clone();
    let ns = namespace.as_deref();
    let apps: Api<LoadBalancedApp> = api(&client, ns);
    let pods: Api<Pod> = api(&client, ns);
    // Only the objects the operator made are watched (and cached): a cluster's
    // other ConfigMaps, Services and Deployments would cost memory for nothing.
    let owned = || watcher::Config::default().labels(MANAGED_BY_SELECTOR);
    let controller = Controller::new(apps, watcher::Config::default());
    let sweeper = tokio::spawn(forget_deleted(ctx.clone(), controller.store(), namespace.clone()));
    controller
        .owns(api::<Deployment>(&client, ns), owned())
        .owns(api::<Service>(&client, ns), owned())
        .owns(api::<ConfigMap>(&client, ns), owned())
        // App pods belong to ReplicaSets, not to the app: map them back by label.
        .watches(pods, watcher::Config::default().labels(APP_LABEL), |pod: Pod| {
            let ns = pod.namespace()?;
            let app = pod.labels().get(APP_LABEL)?.clone();
            Some(ObjectRef::<LoadBalancedApp>::new(&app).within(&ns))
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                warn!(error = %e, "reconcile failed");
            }
        })
        .await;
    sweeper.abort();
}

/// How often what the operator keeps per app is checked against the apps
/// that still exist.
const FORGET_PERIOD: Duration = Duration::from_secs(5);

/// Forgets deleted apps: their metric series (an alert on a gauge of a
/// deleted app would fire forever) and the back-off, ejection streaks and
/// verified objects kept for them. A deleted app gets no reconcile (and the
/// operator puts no finalizer on apps, which would block their deletion
/// while it is down), so the controller's cache is compared instead, for
/// the apps of `namespace` (all when `None`).
async fn forget_deleted(
    ctx: Arc<Context>,
    store: kube::runtime::reflector::Store<LoadBalancedApp>,
    namespace: Option<String>,
) {
    let mut tick = tokio::time::interval(FORGET_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Not before the cache holds the first list. (Polled, not awaited: the
        // store wakes only the last of several waiters, and the controller
        // waits on it too.)
        if store.wait_until_ready().now_or_never().is_none_or(|r| r.is_err()) {
            continue;
        }
        let gone = |ns: &str, app: &str| {
            namespace.as_deref().is_none_or(|n| n == ns) && store.get(&ObjectRef::new(app).within(ns)).is_none()
        };
        ctx.metrics.forget_apps(gone);
        ctx.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|(ns, app), _| !gone(ns, app));
        ctx.streaks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|(ns, app), _| !gone(ns, app));
    }
}

fn error_policy(app: Arc<LoadBalancedApp>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(error.metric_label());
    let key = (app.namespace().unwrap_or_default(), app.name_any());
    let failures = {
        let mut f = ctx.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = f.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let wait = backoff(failures, fastrand::f64());
    warn!(
        name = %app.name_any(), error = %error, kind = error.metric_label(), failures,
        retry_in_seconds = wait.as_secs_f64(), "reconcile error; retrying"
    );
    Action::requeue(wait)
}

/// Whether `obj` names the app with `owner_uid` as its controller.
fn controlled_by<K: Resource>(obj: &K, owner_uid: &str) -> bool {
    obj.owner_references().iter().any(|o| o.controller == Some(true) && o.uid == owner_uid)
}

/// An object the app would write that exists under someone else's control,
/// described for the status (`Service web`), or none.
async fn foreign<K>(ctx: &Context, ns: &str, obj: &K, owner_uid: &str) -> Result<Option<String>, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + DeserializeOwned + Clone + std::fmt::Debug,
{
    let name = obj.meta().name.clone().ok_or_else(|| Error::Malformed("an owned object has no name".into()))?;
    let kind = match K::kind(&()) {
        std::borrow::Cow::Borrowed(k) => k,
        std::borrow::Cow::Owned(_) => "object",
    };
    let key = (kind, ns.to_owned(), name.clone(), owner_uid.to_owned());
    if ctx.verified.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(&key) {
        return Ok(None);
    }
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    // ConfigMaps are listed by name rather than read: the operator may list
    // them (it watches its own) and needs no `get` on every ConfigMap.
    let existing = if kind == "ConfigMap" {
        api.list(&ListParams::default().fields(&format!("metadata.name={name}"))).await?.items.into_iter().next()
    } else {
        api.get_opt(&name).await?
    };
    match existing {
        Some(existing) if !controlled_by(&existing, owner_uid) => Ok(Some(format!("{kind} {name}"))),
        Some(_) => {
            let mut verified = ctx.verified.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // Entries of deleted apps linger; a full set starts over (and re-reads once).
            if verified.len() >= 100_000 {
                verified.clear();
            }
            verified.insert(key);
            Ok(None)
        }
        // Created by this reconcile's apply; verified on the next.
        None => Ok(None),
    }
}

/// The desired objects that already exist under someone else's control.
async fn conflicts(ctx: &Context, ns: &str, d: &Desired, uid: &str) -> Result<Vec<String>, Error> {
    let mut found = Vec::new();
    if let Some(sa) = &d.service_account {
        found.extend(foreign(ctx, ns, sa, uid).await?);
    }
    found.extend(foreign(ctx, ns, &d.role, uid).await?);
    found.extend(foreign(ctx, ns, &d.role_binding, uid).await?);
    found.extend(foreign(ctx, ns, &d.proxy_config, uid).await?);
    found.extend(foreign(ctx, ns, &d.backends, uid).await?);
    if let Some(s) = &d.canary_backends {
        found.extend(foreign(ctx, ns, s, uid).await?);
    }
    found.extend(foreign(ctx, ns, &d.front, uid).await?);
    found.extend(foreign(ctx, ns, &d.deployment, uid).await?);
    if let Some(c) = &d.canary_deployment {
        found.extend(foreign(ctx, ns, c, uid).await?);
    }
    if let Some(p) = &d.proxy_deployment {
        found.extend(foreign(ctx, ns, p, uid).await?);
    }
    found.extend(foreign(ctx, ns, &d.pdb, uid).await?);
    if let Some(p) = &d.proxy_pdb {
        found.extend(foreign(ctx, ns, p, uid).await?);
    }
    Ok(found)
}

async fn apply<K>(client: &Client, ns: &str, obj: &K) -> Result<(), Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + std::fmt::Debug,
{
    let name = obj.meta().name.clone().ok_or_else(|| Error::Malformed("an owned object has no name".into()))?;
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(obj)).await?;
    Ok(())
}

/// Deletes the owned objects the spec no longer asks for: the canary's
/// Deployment and Service when the canary is removed, the dedicated proxy's
/// Deployment, PodDisruptionBudget and ServiceAccount when the proxy moves
/// into the app's pods. Only objects this app controls are deleted.
async fn prune(client: &Client, ns: &str, app: &LoadBalancedApp, d: &Desired) -> Result<(), Error> {
    let n = Names { app: app.name_any() };
    let Some(uid) = app.uid() else { return Ok(()) };
    if d.canary_deployment.is_none() {
        delete_owned::<Deployment>(client, ns, &n.canary(), &uid).await?;
    }
    if d.canary_backends.is_none() {
        delete_owned::<Service>(client, ns, &n.canary_backends(), &uid).await?;
    }
    if d.proxy_deployment.is_none() {
        delete_owned::<Deployment>(client, ns, &n.proxy(), &uid).await?;
    }
    if d.proxy_pdb.is_none() {
        delete_owned::<PodDisruptionBudget>(client, ns, &n.proxy(), &uid).await?;
    }
    if d.service_account.is_none() {
        delete_owned::<ServiceAccount>(client, ns, &n.proxy(), &uid).await?;
    }
    Ok(())
}

async fn delete_owned<K>(client: &Client, ns: &str, name: &str, owner_uid: &str) -> Result<(), Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + DeserializeOwned + Clone + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let Some(obj) = api.get_opt(name).await? else { return Ok(()) };
    if !controlled_by(&obj, owner_uid) {
        return Ok(());
    }
    let dp = DeleteParams {
        preconditions: Some(Preconditions { uid: obj.uid(), resource_version: None }),
        ..DeleteParams::background()
    };
    match api.delete(name, &dp).await {
        Ok(_) => {
            info!(kind = K::kind(&()).as_ref(), object = name, "deleted an object the spec no longer asks for");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn apply_all(client: &Client, ns: &str, d: &Desired) -> Result<(), Error> {
    if let Some(sa) = &d.service_account {
        apply::<ServiceAccount>(client, ns, sa).await?;
    }
    apply::<Role>(client, ns, &d.role).await?;
    apply::<RoleBinding>(client, ns, &d.role_binding).await?;
    apply::<ConfigMap>(client, ns, &d.proxy_config).await?;
    apply::<Service>(client, ns, &d.backends).await?;
    if let Some(s) = &d.canary_backends {
        apply::<Service>(client, ns, s).await?;
    }
    apply::<Service>(client, ns, &d.front).await?;
    apply::<Deployment>(client, ns, &d.deployment).await?;
    if let Some(c) = &d.canary_deployment {
        apply::<Deployment>(client, ns, c).await?;
    }
    if let Some(p) = &d.proxy_deployment {
        apply::<Deployment>(client, ns, p).await?;
    }
    apply::<PodDisruptionBudget>(client, ns, &d.pdb).await?;
    if let Some(p) = &d.proxy_pdb {
        apply::<PodDisruptionBudget>(client, ns, p).await?;
    }
    Ok(())
}

/// One pod as the healing policy sees it.
pub fn pod_view(p: &Pod) -> PodView {
    let status = p.status.as_ref();
    let phase = match status.and_then(|s| s.phase.as_deref()) {
        Some("Pending") => Phase::Pending,
        Some("Running") => Phase::Running,
        Some("Succeeded") => Phase::Succeeded,
        Some("Failed") => Phase::Failed,
        _ => Phase::Unknown,
    };
    let ready_cond = status.and_then(|s| s.conditions.as_ref()).and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    let ready = ready_cond.is_some_and(|c| c.status == "True");
    let since = |t: &Time| SystemTime::from(t.0);
    let unready_since = if ready {
        None
    } else {
        ready_cond
            .and_then(|c| c.last_transition_time.as_ref().map(since))
            .or_else(|| p.metadata.creation_timestamp.as_ref().map(since))
    };
    let crash_looping = status.and_then(|s| s.container_statuses.as_ref()).is_some_and(|cs| {
        cs.iter().any(|c| {
            c.state.as_ref().and_then(|s| s.waiting.as_ref()).and_then(|w| w.reason.as_deref())
                == Some("CrashLoopBackOff")
        })
    });
    PodView {
        ejected_for: None,
        name: p.name_any(),
        phase,
        ready,
        unready_since,
        crash_looping,
        terminating: p.metadata.deletion_timestamp.is_some(),
        waiting_reason: if phase == Phase::Pending { waiting_reason(p) } else { None },
    }
}

/// Why a pod that has not started waits: the scheduler's reason while it is
/// unscheduled, else the first waiting container's reason (init containers first).
fn waiting_reason(p: &Pod) -> Option<String> {
    let status = p.status.as_ref()?;
    let unscheduled = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        .map(|c| c.reason.clone().unwrap_or_else(|| "Unschedulable".to_owned()));
    unscheduled.or_else(|| {
        let containers =
            status.init_container_statuses.iter().flatten().chain(status.container_statuses.iter().flatten());
        containers.filter_map(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone()).find(|r| r != "PodInitializing")
    })
}

/// Groups the pods that have not started by reason, naming the first few of each.
fn not_started(pods: &[(String, String)]) -> Vec<crate::api::NotStarted> {
    let mut by_reason: std::collections::BTreeMap<&str, Vec<&str>> = std::collections::BTreeMap::new();
    for (pod, reason) in pods {
        by_reason.entry(reason).or_default().push(pod);
    }
    by_reason
        .into_iter()
        .map(|(reason, pods)| crate::api::NotStarted {
            reason: reason.to_owned(),
            count: i32::try_from(pods.len()).unwrap_or(i32::MAX),
            pods: pods.into_iter().take(5).map(str::to_owned).collect(),
        })
        .collect()
}

/// Whether the pod's proxy container is ready: a native sidecar (an init
/// container that keeps running) or, in pods made before that, a plain container.
fn proxy_ready(p: &Pod) -> bool {
    p.status.as_ref().is_some_and(|s| {
        s.init_container_statuses
            .iter()
            .flatten()
            .chain(s.container_statuses.iter().flatten())
            .any(|c| c.name == PROXY_CONTAINER && c.ready)
    })
}

fn duration(s: &str, fallback: Duration) -> Duration {
    humantime::parse_duration(s).unwrap_or(fallback)
}

/// A condition, keeping the previous transition time when the status did not change.
fn condition(
    old: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let previous = old.iter().find(|c| c.type_ == type_);
    let last_transition_time = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => Time(k8s_openapi::jiff::Timestamp::now()),
    };
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time,
        observed_generation: generation,
    }
}

/// Reconciles one app.
pub async fn reconcile(app: Arc<LoadBalancedApp>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = app.name_any();
    let ns = app.namespace().ok_or_else(|| Error::Malformed(format!("LoadBalancedApp {name} has no namespace")))?;
    let span = info_span!("reconcile", app = %name, namespace = %ns);
    let started = std::time::Instant::now();
    let metrics = ctx.metrics.clone();
    let key = (ns.clone(), name.clone());
    let result = reconcile_app(app, ctx.clone(), name, ns).instrument(span).await;
    metrics.reconciled(result.is_ok(), started.elapsed().as_secs_f64());
    if result.is_ok() {
        ctx.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&key);
    }
    result
}

async fn reconcile_app(
    app: Arc<LoadBalancedApp>,
    ctx: Arc<Context>,
    name: String,
    ns: String,
) -> Result<Action, Error> {
    let client = &ctx.client;
    let apps: Api<LoadBalancedApp> = Api::namespaced(client.clone(), &ns);
    let old = app.status.clone().unwrap_or_default();
    let generation = app.metadata.generation;
    let reference = app.object_ref(&());

    // A progressive rollout takes its next step first: what it decides
    // (the stable template, the canary's weight) shapes the objects below.
    let (app, happened) = step_rollout(client, &apps, &ns, &name, app).await?;
    let d = match desired(&app, &ctx.settings) {
        Ok(d) => d,
        Err(invalid) => {
            refuse(&ctx, &apps, &app, "InvalidSpec", invalid.to_string()).await?;
            return Ok(Action::await_change());
        }
    };
    let uid = app.uid().ok_or_else(|| Error::Malformed(format!("LoadBalancedApp {name} has no uid")))?;
    let taken = conflicts(&ctx, &ns, &d, &uid).await?;
    if !taken.is_empty() {
        // Never take over what this app did not create: deleting the app
        // would then delete it. The user renames the app or the object.
        let msg = format!(
            "{} already exist{} and {} not controlled by this app; nothing was changed (rename the app or remove them)",
            taken.join(", "),
            if taken.len() == 1 { "s" } else { "" },
            if taken.len() == 1 { "is" } else { "are" },
        );
        refuse(&ctx, &apps, &app, "OwnershipConflict", msg).await?;
        return Ok(Action::requeue(Duration::from_secs(60)));
    }
    let created = old.observed_generation.is_none();
    apply_all(client, &ns, &d).await?;
    if old.observed_generation != generation || happened.is_some() {
        // A rollout that promoted or rolled back leaves a canary Deployment
        // the plan no longer has. A generation not yet observed: objects it no longer asks for go. Also
        // when no status was ever written (`created`): the first status write
        // may have failed while the spec changed, and a generation whose
        // objects were never pruned must not be marked observed.
        prune(client, &ns, &app, &d).await?;
    }
    if created {
        info!("owned objects created");
        let _ = ctx
            .recorder
            .publish(
                &Event {
                    type_: EventType::Normal,
                    reason: "Created".into(),
                    note: Some("app, proxy and services created".into()),
                    action: "Reconcile".into(),
                    secondary: None,
                },
                &reference,
            )
            .await;
    }

    // Observe the app's pods (those with a track: dedicated proxy pods carry
    // the app label too, but are not the app's replicas) and heal. A label
    // is anyone's to set: only pods whose controller chain leads to the app
    // (pod → ReplicaSet → one of the app's Deployments) are counted or healed.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let mut listed = pods.list(&ListParams::default().labels(&format!("{APP_LABEL}={name},{TRACK_LABEL}"))).await?;
    let sets = app_replica_sets(client, &ns, &name, &uid).await?;
    listed.items.retain(|p| p.owner_references().iter().any(|o| o.controller == Some(true) && sets.contains(&o.uid)));
    let mut views: Vec<PodView> = listed.items.iter().map(pod_view).collect();
    let spec = &app.spec;
    let min_available = spec.availability.min_available.unwrap_or((spec.replicas - 1).max(0));
    let policy = Policy {
        unready_timeout: duration(&spec.healing.unready_timeout, Duration::from_secs(120)),
        max_concurrent: usize::try_from(spec.healing.max_concurrent).unwrap_or(1).max(1),
        min_available: usize::try_from(min_available).unwrap_or(0),
        ejected_timeout: spec.healing.ejected_timeout.as_deref().map(|t| duration(t, Duration::from_secs(120))),
    };
    let mut ejection_poll: Option<Duration> = None;
    if policy.ejected_timeout.is_some() {
        let docs = fetch_proxies(client, &ns, &name, spec, "/endpoints").await;
        let ejected = ejected_by_quorum(&docs, &listed.items);
        let live: Vec<String> = listed.items.iter().map(|p| p.uid().unwrap_or_default()).collect();
        tracing::debug!(proxies = docs.len(), ejected = ejected.len(), "the proxies' ejections");
        let now = SystemTime::now();
        let mut all = ctx.streaks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let streaks = all.entry((ns.clone(), name.clone())).or_default();
        if !docs.is_empty() {
            streaks.observe(&ejected, &live, now, EJECTION_GRACE);
        }
        for (view, pod) in views.iter_mut().zip(&listed.items) {
            view.ejected_for = streaks.ejected_for(&pod.uid().unwrap_or_default(), now);
        }
        // Opted in: the proxies are asked again every 5 s (every 2 s while a
        // pod is in a streak), so a streak's start is seen within seconds.
        ejection_poll = Some(Duration::from_secs(if streaks.any() { 2 } else { 5 }));
    }
    let plan = heal_plan(&views, &policy, SystemTime::now());
    let mut status = old.clone();
    status.rollout = app.status.as_ref().and_then(|s| s.rollout.clone());
    let mut healed_now = 0;
    for (pod, reason) in &plan.delete {
        let uid = listed.items.iter().find(|p| p.name_any() == *pod).and_then(|p| p.metadata.uid.clone());
        // Delete exactly the pod observed, not a successor that took its name.
        let dp = DeleteParams {
            preconditions: Some(Preconditions { uid, resource_version: None }),
            ..DeleteParams::default()
        };
        match pods.delete(pod, &dp).await {
            Ok(_) => {
                info!(pod = %pod, reason = reason.name(), "pod deleted to heal the app");
                ctx.metrics.healed(&ns, &name, reason.name());
                healed_now += 1;
                status.last_healing = Some(Healed {
                    pod: pod.clone(),
                    reason: reason.name().into(),
                    time: Time(k8s_openapi::jiff::Timestamp::now()),
                });
                let _ = ctx
                    .recorder
                    .publish(
                        &Event {
                            type_: EventType::Normal,
                            reason: "Healed".into(),
                            note: Some(match views.iter().find(|v| v.name == *pod).and_then(|v| v.ejected_for) {
                                Some(d) if *reason == super::healing::Reason::EjectedByProxies => format!(
                                    "deleted pod {pod} (EjectedByProxies: ready, but ejected by most of the proxies \
                                     sending it traffic for {}s) so that it is replaced",
                                    d.as_secs()
                                ),
                                _ => format!("deleted pod {pod} ({}) so that it is replaced", reason.name()),
                            }),
                            action: "DeletePod".into(),
                            secondary: None,
                        },
                        &reference,
                    )
                    .await;
            }
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }

    // Status from what was observed.
    let track = |t: &'static str| {
        listed.items.iter().filter(move |p| p.labels().get(TRACK_LABEL).map(String::as_str) == Some(t))
    };
    let is_ready = |p: &Pod| pod_view(p).ready && p.metadata.deletion_timestamp.is_none();
    let stable_total = track("stable").count() as i32;
    let stable_ready = track("stable").filter(|p| is_ready(p)).count() as i32;
    let all_ready = listed.items.iter().filter(|p| is_ready(p)).count() as i32;
    status.observed_generation = generation;
    status.replicas = stable_total;
    status.ready_replicas = stable_ready;
    status.endpoints = Counts { ready: all_ready, total: listed.items.len() as i32 };
    status.proxy = match spec.proxy.mode {
        ProxyMode::Sidecar => {
            let proxy_ready = listed.items.iter().filter(|p| proxy_ready(p)).count() as i32;
            Counts { ready: proxy_ready, total: listed.items.len() as i32 }
        }
        ProxyMode::Dedicated => {
            let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
            let ready =
                deps.get_opt(&format!("{name}-proxy")).await?.and_then(|d| d.status?.ready_replicas).unwrap_or(0);
            Counts { ready, total: spec.proxy.replicas.unwrap_or(2) }
        }
    };
    let canary_weight = super::rollout::plan(spec, status.rollout.as_ref()).canary.map_or(0, |(_, _, w)| w);
    status.canary = spec.canary.as_ref().map(|_| crate::api::CanaryStatus {
        replicas: track("canary").count() as i32,
        ready_replicas: track("canary").filter(|p| is_ready(p)).count() as i32,
        weight: canary_weight,
    });
    if let Some(h) = &happened {
        if matches!(h, rollout::Happened::RolledBack(_)) {
            ctx.metrics.rolled_back(&ns, &name);
        }
        publish_rollout(&ctx, &reference, h).await;
    }
    let rollout = status.rollout.as_ref();
    let rolled_back = rollout.is_some_and(|r| r.phase == RolloutPhase::RolledBack);
    let rolling = rollout.is_some_and(|r| matches!(r.phase, RolloutPhase::Progressing | RolloutPhase::Paused));
    let is_available = stable_ready >= min_available.max(1) && status.proxy.ready > 0;
    let progressing = stable_total != spec.replicas || stable_ready < spec.replicas || rolling;
    status.not_started = not_started(&plan.not_started);
    let degraded = !plan.crash_looping.is_empty() || !plan.not_started.is_empty() || rolled_back;
    let mut degraded_because = Vec::new();
    if let Some(r) = rollout.filter(|_| rolled_back) {
        degraded_because.push(format!("canary rolled back: {}", r.message));
    }
    if !plan.crash_looping.is_empty() {
        degraded_because.push(format!("crash-looping pods (not deleted): {}", plan.crash_looping.join(", ")));
    }
    for w in &status.not_started {
        degraded_because.push(format!(
            "{} pod(s) not started ({}, not deleted): {}",
            w.count,
            w.reason,
            w.pods.join(", ")
        ));
    }
    status.conditions = vec![
        condition(
            &old.conditions,
            "Available",
            is_available,
            if is_available { "MinimumReplicasAvailable" } else { "MinimumReplicasUnavailable" },
            format!("{stable_ready}/{} replicas ready, {} proxies ready", spec.replicas, status.proxy.ready),
            generation,
        ),
        condition(
            &old.conditions,
            "Progressing",
            progressing,
            match (rolling, progressing) {
                (true, _) => "RolloutInProgress",
                (false, true) => "ReplicasUpdating",
                (false, false) => "ReplicasReady",
            },
            match rollout.filter(|_| rolling) {
                Some(r) => format!("canary at {}%: {}", r.weight, r.message),
                None => format!("{stable_total} replicas exist, {stable_ready} ready, {} wanted", spec.replicas),
            },
            generation,
        ),
        condition(
            &old.conditions,
            "Degraded",
            degraded,
            match (plan.crash_looping.is_empty(), plan.not_started.is_empty(), rolled_back) {
                (true, true, false) => "AsExpected",
                (false, _, _) => "CrashLoop",
                (true, false, _) => "PodsNotStarted",
                (true, true, true) => "RolledBack",
            },
            if degraded { degraded_because.join("; ") } else { "no crash loops, every pod started".into() },
            generation,
        ),
    ];
    status.healed_total = old.healed_total + healed_now;
    ctx.metrics.app(
        &ns,
        &name,
        super::metrics::AppFigures {
            available: is_available,
            ready_endpoints: i64::from(all_ready),
            pods_not_started: status.not_started.iter().map(|n| i64::from(n.count)).sum(),
            rolled_back,
        },
    );
    if status != old {
        write_status(&apps, &name, &status, healed_now).await?;
    }
    let next = plan
        .next_check
        .map_or(Duration::from_secs(60), |d| d.min(Duration::from_secs(60)) + Duration::from_millis(100));
    // A rollout in progress is judged again every 2 s.
    let soon = !plan.held.is_empty() || rolling;
    let next = ejection_poll.map_or(next, |poll| next.min(poll));
    Ok(Action::requeue(if soon { Duration::from_secs(2) } else { next }))
}

/// The app with its progressive rollout advanced (`status.rollout` as it
/// should be now), and what happened; the app unchanged otherwise.
async fn step_rollout(
    client: &Client,
    apps: &Api<LoadBalancedApp>,
    ns: &str,
    name: &str,
    app: Arc<LoadBalancedApp>,
) -> Result<(Arc<LoadBalancedApp>, Option<rollout::Happened>), Error> {
    if app.spec.canary.as_ref().is_none_or(|c| c.steps.is_none()) {
        if app.status.as_ref().is_some_and(|s| s.rollout.is_some()) {
            let mut a = (*app).clone();
            if let Some(s) = a.status.as_mut() {
                s.rollout = None;
            }
            return Ok((Arc::new(a), None));
        }
        return Ok((app, None));
    }
    // The rollout's state is read fresh, not from the watch cache: a step
    // decided on a status the cache has not caught up with would undo the
    // last one (a promotion, say).
    let app = Arc::new(apps.get(name).await?);
    let Some(canary) = app.spec.canary.as_ref().filter(|c| c.steps.is_some()) else { return Ok((app, None)) };
    let previous = app.status.as_ref().and_then(|s| s.rollout.as_ref());
    let now = k8s_openapi::jiff::Timestamp::now();
    let evidence = match previous.filter(|r| rollout::needs_evidence(r)) {
        Some(r) => gather_evidence(client, ns, name, &app.spec, rollout::evidence_window(r, now)).await,
        None => None,
    };
    let (next, happened) = rollout::advance(&app.spec, canary, previous, evidence, now);
    let mut a = (*app).clone();
    a.status.get_or_insert_with(LoadBalancedAppStatus::default).rollout = Some(next);
    Ok((Arc::new(a), happened))
}

/// Both tracks' figures over the last `window` seconds, summed over the
/// app's proxies (each pod's sidecar, or the dedicated proxy pods), read
/// from their admin port's `/tracks`; `None` when no proxy answered.
async fn gather_evidence(
    client: &Client,
    ns: &str,
    name: &str,
    spec: &crate::api::LoadBalancedAppSpec,
    window: u64,
) -> Option<crate::api::Evidence> {
    let docs = fetch_proxies(client, ns, name, spec, &format!("/tracks?window={window}")).await;
    if docs.is_empty() {
        return None;
    }
    Some(crate::api::Evidence {
        canary: rollout::sum_track(&docs, "canary"),
        stable: rollout::sum_track(&docs, "stable"),
        window_seconds: i64::try_from(window).unwrap_or(i64::MAX),
        proxies: i32::try_from(docs.len()).unwrap_or(i32::MAX),
    })
}

/// How long the proxies may let a pod back in between two ejections and
/// still count it as kept out (a base ejection time is 30 s).
const EJECTION_GRACE: Duration = Duration::from_secs(60);

/// The JSON documents at `path` of the app's proxies' admin port (each
/// pod's sidecar, or the dedicated proxy pods), from those that answer
/// within a second.
async fn fetch_proxies(
    client: &Client,
    ns: &str,
    name: &str,
    spec: &crate::api::LoadBalancedAppSpec,
    path: &str,
) -> Vec<serde_json::Value> {
    let selector = match spec.proxy.mode {
        ProxyMode::Sidecar => format!("{APP_LABEL}={name},{TRACK_LABEL}"),
        ProxyMode::Dedicated => format!("{APP_LABEL}={name},{COMPONENT_LABEL}=proxy"),
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let Ok(listed) = pods.list(&ListParams::default().labels(&selector)).await else { return Vec::new() };
    let admins: Vec<std::net::SocketAddr> = listed
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.status.as_ref()?.pod_ip.as_deref()?.parse().ok())
        .map(|ip| std::net::SocketAddr::new(ip, super::render::ADMIN_PORT))
        .collect();
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let fetches = admins.iter().map(|admin| {
        let http = http.clone();
        let url = format!("http://{admin}{path}");
        async move {
            let uri: http::Uri = url.parse().ok()?;
            let fetch = async {
                let resp = http.get(uri).await.ok()?;
                if !resp.status().is_success() {
                    return None;
                }
                let body = http_body_util::BodyExt::collect(resp.into_body()).await.ok()?.to_bytes();
                serde_json::from_slice::<serde_json::Value>(&body).ok()
            };
            tokio::time::timeout(Duration::from_secs(1), fetch).await.ok().flatten()
        }
    });
    futures::future::join_all(fetches).await.into_iter().flatten().collect()
}

/// The uids of the pods that more than half of the proxies sending them
/// traffic report ejected, from the proxies' `/endpoints` documents (a proxy
/// with no request to a pod abstains).
fn ejected_by_quorum(docs: &[serde_json::Value], pods: &[Pod]) -> Vec<String> {
    let mut votes: std::collections::HashMap<std::net::IpAddr, (usize, usize)> = std::collections::HashMap::new();
    for e in docs.iter().flat_map(|d| d["endpoints"].as_array().into_iter().flatten()) {
        let ejected = e["flags"].as_array().is_some_and(|f| f.iter().any(|f| f == "ejected"));
        let seen = ejected || e["requests"].as_u64().is_some_and(|n| n > 0);
        if let (true, Some(addr)) = (seen, e["address"].as_str().and_then(|a| a.parse::<std::net::SocketAddr>().ok())) {
            let v = votes.entry(addr.ip()).or_default();
            v.0 += usize::from(ejected);
            v.1 += 1;
        }
    }
    pods.iter()
        .filter(|p| {
            let ip = p.status.as_ref().and_then(|s| s.pod_ip.as_deref()?.parse().ok());
            ip.and_then(|ip| votes.get(&ip)).is_some_and(|(out, of)| 2 * out > *of)
        })
        .map(|p| p.uid().unwrap_or_default())
        .collect()
}

/// The JSON merge patch (RFC 7386) that turns `from` into `to`: `to`, with
/// `null` for every key of `from` that `to` lacks, recursively into objects.
fn merge_patch(from: &serde_json::Value, to: &serde_json::Value) -> serde_json::Value {
    match (from, to) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            let mut out = serde_json::Map::new();
            for (k, v) in b {
                out.insert(k.clone(), a.get(k).map_or_else(|| v.clone(), |old| merge_patch(old, v)));
            }
            for k in a.keys().filter(|k| !b.contains_key(*k)) {
                out.insert(k.clone(), serde_json::Value::Null);
            }
            serde_json::Value::Object(out)
        }
        _ => to.clone(),
    }
}

/// An Event for a rollout's milestone.
async fn publish_rollout(
    ctx: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    h: &rollout::Happened,
) {
    let (type_, reason, note) = match h {
        rollout::Happened::Started => {
            (EventType::Normal, "RolloutStarted", "a new spec.template runs as the canary".to_owned())
        }
        rollout::Happened::Stepped => {
            (EventType::Normal, "RolloutStepped", "the canary moved to its next step".to_owned())
        }
        rollout::Happened::Promoted(why) => (EventType::Normal, "RolloutPromoted", why.clone()),
        rollout::Happened::RolledBack(why) => (EventType::Warning, "RolledBack", why.clone()),
    };
    info!(reason, note = %note, "rollout");
    let event = Event { type_, reason: reason.into(), note: Some(note), action: "Rollout".into(), secondary: None };
    let _ = ctx.recorder.publish(&event, reference).await;
}

/// The uids of the ReplicaSets of the app's Deployments (its own and its canary's).
async fn app_replica_sets(client: &Client, ns: &str, name: &str, app_uid: &str) -> Result<Vec<String>, Error> {
    let n = Names { app: name.to_owned() };
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let mut ours = Vec::new();
    for d in [name.to_owned(), n.canary()] {
        if let Some(d) = deployments.get_opt(&d).await?
            && controlled_by(&d, app_uid)
            && let Some(uid) = d.uid()
        {
            ours.push(uid);
        }
    }
    let sets: Api<ReplicaSet> = Api::namespaced(client.clone(), ns);
    let listed = sets.list(&ListParams::default().labels(&format!("{APP_LABEL}={name}"))).await?;
    Ok(listed
        .items
        .iter()
        .filter(|s| s.owner_references().iter().any(|o| o.controller == Some(true) && ours.contains(&o.uid)))
        .filter_map(ResourceExt::uid)
        .collect())
}

/// Changes nothing of what exists and says why in the status (`Degraded`
/// with `reason`) and in a Warning Event.
async fn refuse(
    ctx: &Context,
    apps: &Api<LoadBalancedApp>,
    app: &LoadBalancedApp,
    reason: &str,
    msg: String,
) -> Result<(), Error> {
    let old = app.status.clone().unwrap_or_default();
    let generation = app.metadata.generation;
    let mut status = old.clone();
    status.observed_generation = generation;
    status.conditions = vec![
        condition(
            &old.conditions,
            "Available",
            available(&old),
            "AsBefore",
            "the last good configuration keeps serving".into(),
            generation,
        ),
        condition(&old.conditions, "Progressing", false, reason, msg.clone(), generation),
        condition(&old.conditions, "Degraded", true, reason, msg.clone(), generation),
    ];
    if status != old {
        warn!(reason, message = %msg, "app cannot be reconciled");
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(msg),
            action: "Reconcile".into(),
            secondary: None,
        };
        let _ = ctx.recorder.publish(&event, &app.object_ref(&())).await;
        write_status(apps, &app.name_any(), &status, 0).await?;
    }
    Ok(())
}

/// Gives each condition whose status is the stored one's the stored time
/// of its last transition: a reconcile that worked from a stale cache
/// computed its conditions against an older status, and would otherwise
/// date a condition that did not change anew (and write it).
fn keep_transition_times(conditions: &mut [Condition], stored: &[Condition]) {
    for c in conditions {
        if let Some(s) = stored.iter().find(|s| s.type_ == c.type_ && s.status == c.status) {
            c.last_transition_time = s.last_transition_time.clone();
        }
    }
}

fn available(s: &LoadBalancedAppStatus) -> bool {
    s.conditions.iter().any(|c| c.type_ == "Available" && c.status == "True")
}

/// Writes the status, conditional on the version it was computed from, so
/// that a reconcile working from a stale cache cannot roll counters back. On
/// a conflict, the counters are rebased on the stored status and the write
/// is tried again.
async fn write_status(
    apps: &Api<LoadBalancedApp>,
    name: &str,
    status: &LoadBalancedAppStatus,
    healed_now: i64,
) -> Result<(), Error> {
    let mut status = status.clone();
    status.selector = Some(stable_selector(name));
    for attempt in 0..5 {
        let current = apps.get(name).await?;
        let stored = current.status.clone().unwrap_or_default();
        status.healed_total = stored.healed_total + healed_now;
        // A user's abort or promotion, set while this reconcile ran, is kept
        // for the next one (unless this one ended the rollout).
        if let (Some(ours), Some(theirs)) = (status.rollout.as_mut(), stored.rollout.as_ref())
            && matches!(ours.phase, RolloutPhase::Progressing | RolloutPhase::Paused)
            && ours.canary_revision == theirs.canary_revision
        {
            ours.abort |= theirs.abort;
            ours.promote_full |= theirs.promote_full;
        }
        if status.last_healing.is_none() {
            status.last_healing = stored.last_healing.clone();
        }
        keep_transition_times(&mut status.conditions, &stored.conditions);
        if current.status.as_ref() == Some(&status) {
            return Ok(());
        }
        // A merge patch leaves alone what it does not name: fields the new
        // status no longer has (a canary's figures, a finished rollout's
        // revision under test) are removed explicitly.
        let stored_json = serde_json::to_value(&stored).unwrap_or_default();
        let wanted = serde_json::to_value(&status).unwrap_or_default();
        let patch = json!({
            "metadata": {"resourceVersion": current.metadata.resource_version},
            "status": merge_patch(&stored_json, &wanted),
        });
        match apps.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 && attempt < 4 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64, type_: &str, ok: bool) -> Condition {
        let mut c = condition(&[], type_, ok, "Reason", String::new(), Some(1));
        c.last_transition_time = Time(k8s_openapi::jiff::Timestamp::from_second(seconds).expect("time"));
        c
    }

    #[test]
    fn an_unchanged_condition_keeps_its_stored_transition_time_and_a_changed_one_its_own() {
        // Computed from a stale status: Available "became" True at 200,
        // Degraded "became" False at 200, Progressing became False at 200.
        let mut ours = vec![at(200, "Available", true), at(200, "Degraded", false), at(200, "Progressing", false)];
        // Stored: Available True since 100, Degraded False since 50,
        // Progressing still True since 100.
        let stored = vec![at(100, "Available", true), at(50, "Degraded", false), at(100, "Progressing", true)];
        keep_transition_times(&mut ours, &stored);
        let seconds: Vec<i64> = ours.iter().map(|c| c.last_transition_time.0.as_second()).collect();
        assert_eq!(seconds, [100, 50, 200]);
    }
}
