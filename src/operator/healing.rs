//! Healing as a pure policy: from the observed pods, the spec's healing and
//! availability settings and the time, which pods to delete (so that their
//! ReplicaSet replaces them) and why. No I/O: the reconciler applies the plan.
//!
//! The rules:
//! - a pod in phase `Failed` is replaced;
//! - a pod that never started (phase `Pending`: unschedulable, pulling or
//!   failing to pull its image, waiting on a missing ConfigMap or Secret) is
//!   never deleted: its replacement would wait for the same thing, and each
//!   deletion would reset the kubelet's back-off and flood Events. Once it has
//!   waited longer than `unreadyTimeout` it is reported, with its reason;
//! - a pod not ready for longer than `unreadyTimeout` is replaced, unless it
//!   is crash-looping: a crash loop is the app's bug, and a new pod would
//!   loop too, so it is reported (`Degraded`) instead of deleted in a loop;
//! - at most `maxConcurrent` pods are being replaced at any time, counting
//!   those already terminating;
//! - a ready pod is never deleted, unless (opt-in, `ejectedTimeout`) more
//!   than half of the app's proxies have kept ejecting it for that long: it
//!   passes its probes but fails real requests; and a deletion never takes
//!   the ready pods below `minAvailable`;
//! - failed pods go first, then the longest unready; ties by name, so the
//!   plan is deterministic.

use std::time::{Duration, SystemTime};

/// What the policy needs to know about one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    pub name: String,
    pub phase: Phase,
    /// The pod's Ready condition is True.
    pub ready: bool,
    /// When the Ready condition last became False (or the pod was created, if never ready).
    pub unready_since: Option<SystemTime>,
    /// A container is waiting in CrashLoopBackOff.
    pub crash_looping: bool,
    /// Deletion has started (deletionTimestamp set).
    pub terminating: bool,
    /// Why a pod that has not started waits, as the scheduler or the kubelet
    /// says it (`Unschedulable`, `ImagePullBackOff`, `CreateContainerConfigError`…).
    pub waiting_reason: Option<String>,
    /// How long a quorum of the app's proxies has kept ejecting the pod
    /// (see [`EjectionStreaks`]); `None` while they do not.
    pub ejected_for: Option<Duration>,
}

/// Pod phases that matter here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

/// The spec's healing and availability settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub unready_timeout: Duration,
    pub max_concurrent: usize,
    pub min_available: usize,
    /// Replace a ready pod the proxies have kept ejecting this long (opt-in).
    pub ejected_timeout: Option<Duration>,
}

/// Why a pod is replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Phase Failed.
    Failed,
    /// Not ready for longer than the timeout.
    UnreadyTooLong,
    /// Ready, but ejected by a quorum of the proxies for longer than `ejectedTimeout`.
    EjectedByProxies,
}

impl Reason {
    /// Every reason.
    pub const ALL: [Reason; 3] = [Reason::Failed, Reason::UnreadyTooLong, Reason::EjectedByProxies];

    /// The name used in Events and status.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Failed => "Failed",
            Reason::UnreadyTooLong => "UnreadyTooLong",
            Reason::EjectedByProxies => "EjectedByProxies",
        }
    }
}

/// Why an eligible pod waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// `maxConcurrent` replacements are already under way.
    MaxConcurrent,
    /// Deleting it would take ready pods below `minAvailable`.
    MinAvailable,
}

/// The outcome of one evaluation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Pods to delete now, in order.
    pub delete: Vec<(String, Reason)>,
    /// Eligible pods left for a later pass.
    pub held: Vec<(String, Held)>,
    /// Pods crash-looping: reported, not deleted.
    pub crash_looping: Vec<String>,
    /// Pods that have not started for longer than `unreadyTimeout`, with the
    /// reason they wait: reported, not deleted.
    pub not_started: Vec<(String, String)>,
    /// When the next unready pod becomes eligible, if one will.
    pub next_check: Option<Duration>,
}

/// How long each pod has been kept out by the proxies: a streak starts when
/// more than half of the proxies that answered report the pod ejected, and
/// lasts while they keep doing so, allowing gaps of up to `grace` (passive
/// health checking lets an ejected endpoint back after its ejection time, and
/// a pod still failing is ejected again as soon as it fails again). A pod
/// out of the quorum's ejections for longer than `grace` starts over.
#[derive(Clone, Debug, Default)]
pub struct EjectionStreaks {
    /// By pod uid: (streak start, last time the quorum ejected it).
    streaks: std::collections::HashMap<String, (SystemTime, SystemTime)>,
}

impl EjectionStreaks {
    /// Records one observation: the pods (by uid) a quorum ejects now,
    /// among `live` pods (the others are forgotten).
    pub fn observe(&mut self, ejected: &[String], live: &[String], now: SystemTime, grace: Duration) {
        self.streaks
            .retain(|uid, (_, last)| live.contains(uid) && now.duration_since(*last).unwrap_or_default() <= grace);
        for uid in ejected {
            let entry = self.streaks.entry(uid.clone()).or_insert((now, now));
            entry.1 = now;
        }
    }

    /// How long the pod's streak has lasted, if it has one.
    pub fn ejected_for(&self, uid: &str, now: SystemTime) -> Option<Duration> {
        self.streaks.get(uid).map(|(since, _)| now.duration_since(*since).unwrap_or_default())
    }

    /// Whether any pod is in a streak.
    pub fn any(&self) -> bool {
        !self.streaks.is_empty()
    }
}

/// Decides which pods to replace now.
pub fn heal_plan(pods: &[PodView], policy: &Policy, now: SystemTime) -> Plan {
    let mut plan = Plan::default();
    let mut ready = pods.iter().filter(|p| p.ready && !p.terminating).count();
    let in_progress = pods.iter().filter(|p| p.terminating).count();
    let mut budget = policy.max_concurrent.saturating_sub(in_progress);

    let mut eligible: Vec<(&PodView, Reason, Duration)> = Vec::new();
    for p in pods.iter().filter(|p| !p.terminating && p.phase != Phase::Succeeded) {
        let unready_for = p.unready_since.map_or(Duration::ZERO, |t| now.duration_since(t).unwrap_or_default());
        if p.phase == Phase::Failed {
            eligible.push((p, Reason::Failed, unready_for));
        } else if p.ready {
            if let (Phase::Running, Some(timeout), Some(ejected_for)) = (p.phase, policy.ejected_timeout, p.ejected_for)
            {
                if ejected_for >= timeout {
                    eligible.push((p, Reason::EjectedByProxies, ejected_for));
                } else {
                    let wait = timeout - ejected_for;
                    plan.next_check = Some(plan.next_check.map_or(wait, |w: Duration| w.min(wait)));
                }
            }
        } else if p.phase == Phase::Pending {
            if unready_for >= policy.unready_timeout {
                let reason = p.waiting_reason.clone().unwrap_or_else(|| "Pending".to_owned());
                plan.not_started.push((p.name.clone(), reason));
            } else if p.unready_since.is_some() {
                let wait = policy.unready_timeout - unready_for;
                plan.next_check = Some(plan.next_check.map_or(wait, |w: Duration| w.min(wait)));
            }
        } else if p.crash_looping {
            plan.crash_looping.push(p.name.clone());
        } else if p.unready_since.is_some() && unready_for >= policy.unready_timeout {
            eligible.push((p, Reason::UnreadyTooLong, unready_for));
        } else if p.unready_since.is_some() {
            let wait = policy.unready_timeout - unready_for;
            plan.next_check = Some(plan.next_check.map_or(wait, |w: Duration| w.min(wait)));
        }
    }
    eligible.sort_by(|a, b| {
        let rank = |r: Reason| match r {
            Reason::Failed => 0,
            Reason::UnreadyTooLong => 1,
            Reason::EjectedByProxies => 2,
        };
        rank(a.1).cmp(&rank(b.1)).then(b.2.cmp(&a.2)).then(a.0.name.cmp(&b.0.name))
    });
    for (p, reason, _) in eligible {
        let ready_after = ready - usize::from(p.ready);
        if p.ready && ready_after < policy.min_available {
            plan.held.push((p.name.clone(), Held::MinAvailable));
        } else if budget == 0 {
            plan.held.push((p.name.clone(), Held::MaxConcurrent));
        } else {
            budget -= 1;
            ready = ready_after;
            plan.delete.push((p.name.clone(), reason));
        }
    }
    plan.crash_looping.sort();
    plan.not_started.sort();
    plan
}
