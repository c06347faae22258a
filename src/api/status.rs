//! The `LoadBalancedApp` status, written by the operator.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What the operator observed at its last reconcile.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancedAppStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// App replicas (stable track) that exist.
    #[serde(default)]
    pub replicas: i32,
    /// Label selector of the stable track's pods, in the string form
    /// (`fulcrum.dev/app=web,fulcrum.dev/track=stable`): what the scale
    /// subresource reports, so an autoscaler measures only these pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// App replicas (stable track) that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Endpoints the proxy balances over.
    #[serde(default)]
    pub endpoints: Counts,
    /// Proxy instances: ready and desired (one per app pod in Sidecar mode).
    #[serde(default)]
    pub proxy: Counts,
    /// The canary track, when one is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryStatus>,
    /// A progressive rollout (`canary.steps`): the stable version, the one
    /// under test, its step and the evidence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
    /// The last pod the operator deleted to heal the app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_healing: Option<Healed>,
    /// Pods deleted to heal the app since it was created.
    #[serde(default)]
    pub healed_total: i64,
    /// Pods that have waited longer than `healing.unreadyTimeout` without
    /// starting (unschedulable, image pull failing, a missing ConfigMap or
    /// Secret…), grouped by the reason they wait. They are reported here and in
    /// the `Degraded` condition, never deleted: a new pod would wait for the same thing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_started: Vec<NotStarted>,
    /// `Available`, `Progressing` and `Degraded`, following the Kubernetes API conventions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Ready out of a total.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    /// Ready.
    pub ready: i32,
    /// Total (or desired).
    pub total: i32,
}

/// Where a progressive rollout stands.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// The promoted pod template: what the stable track runs.
    #[schemars(schema_with = "super::spec::pod_template_schema")]
    pub stable_template: k8s_openapi::api::core::v1::PodTemplateSpec,
    /// Revision (hash) of the stable template.
    pub stable_revision: String,
    /// Revision of `spec.template` under test, or the one last rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_revision: Option<String>,
    /// `Stable` (nothing under test), `Progressing`, `Paused` or `RolledBack`.
    pub phase: RolloutPhase,
    /// The current step (0-based).
    #[serde(default)]
    pub step: i32,
    /// The canary's share of the traffic now, in percent.
    #[serde(default)]
    pub weight: i32,
    /// When the current step began (or resumed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_started_at: Option<Time>,
    /// The evidence of the last judgement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Evidence>,
    /// Why the rollout is where it is.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Set by a user (`kubectl patch --subresource=status`): roll the canary back now.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub abort: bool,
    /// Set by a user: promote the canary now, skipping the remaining steps.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub promote_full: bool,
}

/// A progressive rollout's phase.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RolloutPhase {
    /// The stable version serves alone.
    #[default]
    Stable,
    /// A canary is being stepped up.
    Progressing,
    /// A canary holds at its step (`canary.paused`).
    Paused,
    /// The canary failed its analysis or was aborted; its version is not run
    /// again until `spec.template` changes.
    RolledBack,
}

/// What the proxies reported of both tracks over a step.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Evidence {
    /// The canary track.
    pub canary: TrackEvidence,
    /// The stable track.
    pub stable: TrackEvidence,
    /// The span the figures cover, in seconds.
    pub window_seconds: i64,
    /// Proxies that answered.
    pub proxies: i32,
}

/// One track's figures over a window, summed over the proxies.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrackEvidence {
    /// Requests that ended.
    pub requests: i64,
    /// Failures among them.
    pub failures: i64,
    /// Success rate in percent (absent without requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_percent: Option<f64>,
    /// p99 time to response headers, in milliseconds (the proxies' p99s weighted by their requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
}

/// The canary track's figures.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanaryStatus {
    /// Canary replicas that exist.
    pub replicas: i32,
    /// Canary replicas that are ready.
    pub ready_replicas: i32,
    /// Percentage of traffic sent to the canary.
    pub weight: i32,
}

/// A healing action.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Healed {
    /// The deleted pod.
    pub pod: String,
    /// Why: `UnreadyTooLong` or `Failed`.
    pub reason: String,
    /// When.
    pub time: Time,
}

/// Pods that have not started, for one reason.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NotStarted {
    /// The reason, as the scheduler or the kubelet reports it (`Unschedulable`,
    /// `ImagePullBackOff`, `CreateContainerConfigError`…), or `Pending`.
    pub reason: String,
    /// How many pods wait for this reason.
    pub count: i32,
    /// The first few of them, by name.
    pub pods: Vec<String>,
}
