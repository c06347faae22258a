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
