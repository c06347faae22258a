//! Canary tracks: which pod template each track runs, at which weight, and
//! the progressive rollout's state machine.
//!
//! Two modes. A manual canary (`canary.template`) runs beside the stable
//! pods at `canary.weight`, as the user set them. A progressive rollout
//! (`canary.steps`) follows Argo Rollouts' model: `spec.template` is the
//! version the user wants; the operator records the promoted one in
//! `status.rollout.stableTemplate`, which the stable track keeps running,
//! and runs a new `spec.template` as the canary, stepping its weight, until
//! the evidence of the app's proxies promotes it (it becomes the stable
//! template) or rolls it back (weight 0, no canary pods, its revision
//! remembered so that it is not tried again until the template changes).
//! The user's spec is never rewritten, so a GitOps tool sees no drift, and a
//! promotion is recorded in status, so the next reconcile keeps it.
//!
//! [`advance`] is pure: the previous rollout, the spec, the evidence and the
//! time in; the next rollout and what happened out.

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::api::{Analysis, Canary, Evidence, LoadBalancedAppSpec, Rollout, RolloutPhase, TrackEvidence};

/// The revision of a pod template: a hash of its JSON form.
pub fn revision(template: &PodTemplateSpec) -> String {
    let bytes = serde_json::to_vec(template).unwrap_or_default();
    format!("{:016x}", crate::balance::hash_key(&bytes))
}

/// What the tracks run.
#[derive(Debug, PartialEq)]
pub struct Plan<'a> {
    /// The stable track's pods.
    pub stable: &'a PodTemplateSpec,
    /// The canary's pods, replicas and traffic share, if a canary runs.
    pub canary: Option<(&'a PodTemplateSpec, i32, i32)>,
}

/// The tracks of an app, given its rollout status (progressive mode).
pub fn plan<'a>(spec: &'a LoadBalancedAppSpec, rollout: Option<&'a Rollout>) -> Plan<'a> {
    let Some(canary) = &spec.canary else { return Plan { stable: &spec.template, canary: None } };
    let replicas = canary.replica_count(spec.replicas);
    if let Some(template) = &canary.template {
        return Plan { stable: &spec.template, canary: Some((template, replicas, canary.weight)) };
    }
    let Some(r) = rollout else { return Plan { stable: &spec.template, canary: None } };
    let testing = matches!(r.phase, RolloutPhase::Progressing | RolloutPhase::Paused)
        && r.canary_revision.as_deref() == Some(revision(&spec.template).as_str());
    Plan { stable: &r.stable_template, canary: testing.then_some((&spec.template, replicas, r.weight)) }
}

/// Something worth an Event and a condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Happened {
    /// A new version started as the canary.
    Started,
    /// The canary moved to the next step.
    Stepped,
    /// The canary became the stable version.
    Promoted(String),
    /// The canary was rolled back.
    RolledBack(String),
}

/// The evidence a step needs, and the verdict it gives.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Not enough requests yet.
    Wait(String),
    /// The canary does as well as the stable track.
    Pass,
    /// The canary does worse.
    Fail(String),
}

/// Requests each track needs in the window before p99s are compared.
pub const MIN_REQUESTS_FOR_P99: i64 = 100;

/// Judges a step's evidence by the analysis.
pub fn judge(a: &Analysis, e: &Evidence) -> Verdict {
    let min = i64::from(a.min_requests);
    if e.canary.requests < min || e.stable.requests < min {
        return Verdict::Wait(format!(
            "waiting for {min} requests on each track (canary {}, stable {})",
            e.canary.requests, e.stable.requests
        ));
    }
    let (Some(canary_ok), Some(stable_ok)) = (e.canary.success_percent, e.stable.success_percent) else {
        return Verdict::Wait("no success rate yet".into());
    };
    if canary_ok < stable_ok - f64::from(a.max_success_rate_drop) {
        return Verdict::Fail(format!(
            "canary success rate {canary_ok:.2}% is more than {} points below the stable track's {stable_ok:.2}% \
             ({} of {} canary requests failed)",
            a.max_success_rate_drop, e.canary.failures, e.canary.requests
        ));
    }
    // A p99 of fewer than a hundred requests is their maximum: one slow
    // request (a new pod's first connection) would decide. It is compared
    // once both tracks have had enough.
    if let (Some(c), Some(s)) = (e.canary.p99_ms, e.stable.p99_ms)
        && e.canary.requests.min(e.stable.requests) >= MIN_REQUESTS_FOR_P99
        && c > s * f64::from(a.max_latency_percent) / 100.0
        && c - s > f64::from(a.latency_tolerance_ms)
    {
        return Verdict::Fail(format!(
            "canary p99 {c:.1} ms is above {}% of the stable track's {s:.1} ms",
            a.max_latency_percent
        ));
    }
    Verdict::Pass
}

/// Parses a step's pause (`30s`, `1m`); the schema admits only valid ones.
fn pause_of(step: &crate::api::CanaryStep) -> SignedDuration {
    humantime::parse_duration(&step.pause)
        .ok()
        .and_then(|d| SignedDuration::try_from(d).ok())
        .unwrap_or(SignedDuration::from_secs(60))
}

/// How long the current step has lasted at `now`.
pub fn step_age(r: &Rollout, now: Timestamp) -> SignedDuration {
    r.step_started_at.as_ref().map_or(SignedDuration::ZERO, |t| now.duration_since(t.0))
}

/// The next state of a progressive rollout. `evidence` is gathered by the
/// caller for a rollout in progress (see [`needs_evidence`]); `None` when
/// none was (or no proxy answered).
pub fn advance(
    spec: &LoadBalancedAppSpec,
    canary: &Canary,
    previous: Option<&Rollout>,
    evidence: Option<Evidence>,
    now: Timestamp,
) -> (Rollout, Option<Happened>) {
    let steps = canary.steps.as_deref().unwrap_or_default();
    let wanted = revision(&spec.template);
    // The first version an app runs is stable at once; so is the current
    // template when the app turns progressive.
    let Some(prev) = previous else {
        return (
            Rollout {
                stable_template: spec.template.clone(),
                stable_revision: wanted,
                phase: RolloutPhase::Stable,
                ..Rollout::default()
            },
            None,
        );
    };
    let mut r = prev.clone();
    // Status times are kept to the second: a step's start is rounded up, so
    // that its pause is never cut short.
    let started = Timestamp::from_second(now.as_second() + i64::from(now.subsec_nanosecond() > 0)).unwrap_or(now);
    let at = |r: &mut Rollout, step: usize| {
        r.step = step as i32;
        r.weight = steps.get(step).map_or(0, |s| s.weight);
        r.step_started_at = Some(Time(started));
    };
    if wanted == r.stable_revision {
        // Back at the stable version (promoted, or the change was reverted).
        let cancelled = r.phase != RolloutPhase::Stable && r.phase != RolloutPhase::RolledBack;
        r.phase = RolloutPhase::Stable;
        r.canary_revision = None;
        r.weight = 0;
        r.abort = false;
        r.promote_full = false;
        if cancelled {
            r.message = "spec.template is the stable version again: the canary was withdrawn".into();
        }
        return (r, None);
    }
    if r.canary_revision.as_deref() != Some(wanted.as_str()) {
        // A new version to test.
        r.canary_revision = Some(wanted);
        r.phase = RolloutPhase::Progressing;
        r.evidence = None;
        r.abort = false;
        r.promote_full = false;
        r.message = format!("step 1 of {}", steps.len());
        at(&mut r, 0);
        return (r, Some(Happened::Started));
    }
    if r.phase == RolloutPhase::RolledBack {
        return (r, None);
    }
    let roll_back = |mut r: Rollout, why: String| {
        r.phase = RolloutPhase::RolledBack;
        r.weight = 0;
        r.abort = false;
        r.message = why.clone();
        (r, Some(Happened::RolledBack(why)))
    };
    let promote = |mut r: Rollout, why: String| {
        r.stable_template = spec.template.clone();
        r.stable_revision = r.canary_revision.take().unwrap_or_default();
        r.phase = RolloutPhase::Stable;
        r.weight = 0;
        r.step = 0;
        r.step_started_at = None;
        r.promote_full = false;
        r.message = why.clone();
        (r, Some(Happened::Promoted(why)))
    };
    if r.abort {
        return roll_back(r, "aborted by a user (status.rollout.abort)".into());
    }
    if r.promote_full {
        return promote(r, "promoted by a user (status.rollout.promoteFull)".into());
    }
    if canary.paused == Some(true) {
        r.phase = RolloutPhase::Paused;
        r.message = format!("paused at step {} of {} (canary.paused)", r.step + 1, steps.len());
        return (r, None);
    }
    if r.phase == RolloutPhase::Paused {
        // Resumed: the step's pause starts again.
        r.phase = RolloutPhase::Progressing;
        let step = r.step.max(0) as usize;
        at(&mut r, step);
    }
    let analysis = canary.analysis.clone().unwrap_or_default();
    let Some(e) = evidence else {
        r.message = format!("step {} of {}: no proxy reported evidence yet", r.step + 1, steps.len());
        return (r, None);
    };
    let verdict = judge(&analysis, &e);
    r.evidence = Some(e);
    match verdict {
        Verdict::Fail(why) => roll_back(r, why),
        Verdict::Wait(why) => {
            r.message = format!("step {} of {}: {why}", r.step + 1, steps.len());
            (r, None)
        }
        Verdict::Pass => {
            let step = r.step.max(0) as usize;
            let pause = steps.get(step).map_or(SignedDuration::ZERO, pause_of);
            if step_age(&r, now) < pause {
                r.message = format!("step {} of {}: healthy so far", step + 1, steps.len());
                return (r, None);
            }
            if step + 1 >= steps.len() {
                return promote(r, format!("promoted after {} steps of healthy evidence", steps.len()));
            }
            at(&mut r, step + 1);
            r.message = format!("step {} of {}", step + 2, steps.len());
            (r, Some(Happened::Stepped))
        }
    }
}

/// Whether the rollout waits on the proxies' evidence.
pub fn needs_evidence(r: &Rollout) -> bool {
    r.phase == RolloutPhase::Progressing && !r.abort && !r.promote_full
}

/// The window of evidence a step is judged on: its age, at least 5 s and at
/// most the proxies' whole window.
pub fn evidence_window(r: &Rollout, now: Timestamp) -> u64 {
    let age = step_age(r, now).as_secs().max(0) as u64;
    age.clamp(crate::proxy::tracks::SLOT_SECONDS, crate::proxy::tracks::WINDOW_SECONDS)
}

/// Sums one track's figures over the proxies' `/tracks` documents.
pub fn sum_track(docs: &[serde_json::Value], track: &str) -> TrackEvidence {
    let mut t = TrackEvidence::default();
    let mut weighted_p99 = 0.0;
    let mut with_p99 = 0i64;
    for doc in docs {
        let Some(entry) = doc["tracks"].as_array().and_then(|a| a.iter().find(|e| e["track"] == track)) else {
            continue;
        };
        let w = &entry["window"];
        let requests = w["requests"].as_i64().unwrap_or(0);
        t.requests += requests;
        t.failures += w["failures"].as_i64().unwrap_or(0);
        if let Some(p99) = w["p99Ms"].as_f64() {
            weighted_p99 += p99 * requests as f64;
            with_p99 += requests;
        }
    }
    if t.requests > 0 {
        t.success_percent = Some(100.0 * (1.0 - t.failures as f64 / t.requests as f64));
    }
    if with_p99 > 0 {
        t.p99_ms = Some(weighted_p99 / with_p99 as f64);
    }
    t
}
