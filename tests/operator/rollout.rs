//! The progressive rollout's state machine and its judgement, exactly: the
//! evidence and the time are given, nothing runs.

use fulcrum::api::{Evidence, LoadBalancedAppSpec, Rollout, RolloutPhase, TrackEvidence};
use fulcrum::operator::rollout::{Happened, Verdict, advance, judge, plan};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::{Value, json};

fn spec(image: &str, canary: Value) -> LoadBalancedAppSpec {
    serde_json::from_value(json!({
        "replicas": 4,
        "port": 8080,
        "template": {"spec": {"containers": [{"name": "web", "image": image}]}},
        "canary": canary,
    }))
    .unwrap()
}

fn steps() -> Value {
    json!({"replicasPercent": 25, "steps": [{"weight": 10, "pause": "30s"}, {"weight": 50, "pause": "30s"}],
           "analysis": {"minRequests": 50}})
}

fn track(requests: i64, failures: i64, p99_ms: f64) -> TrackEvidence {
    TrackEvidence {
        requests,
        failures,
        success_percent: Some(100.0 * (1.0 - failures as f64 / requests.max(1) as f64)),
        p99_ms: Some(p99_ms),
    }
}

fn evidence(canary: TrackEvidence, stable: TrackEvidence) -> Option<Evidence> {
    Some(Evidence { canary, stable, window_seconds: 30, proxies: 3 })
}

fn healthy() -> Option<Evidence> {
    evidence(track(100, 0, 12.0), track(900, 1, 11.0))
}

/// One reconcile: the rollout's next state and what happened.
fn step(s: &LoadBalancedAppSpec, prev: &Rollout, e: Option<Evidence>, at: Timestamp) -> (Rollout, Option<Happened>) {
    advance(s, s.canary.as_ref().unwrap(), Some(prev), e, at)
}

fn image_of(t: &k8s_openapi::api::core::v1::PodTemplateSpec) -> String {
    t.spec.as_ref().unwrap().containers[0].image.clone().unwrap()
}

#[test]
fn a_healthy_canary_steps_up_and_is_promoted_and_stays_promoted() {
    let t0 = Timestamp::now();
    let v1 = spec("web:1", steps());
    let (r, h) = advance(&v1, v1.canary.as_ref().unwrap(), None, None, t0);
    assert_eq!((r.phase, h), (RolloutPhase::Stable, None), "the first version is stable at once");
    assert!(plan(&v1, Some(&r)).canary.is_none());

    // A new template: the canary, at the first step's weight; the stable track keeps v1.
    let v2 = spec("web:2", steps());
    let (r, h) = step(&v2, &r, None, t0);
    assert_eq!((r.phase, r.step, r.weight, h), (RolloutPhase::Progressing, 0, 10, Some(Happened::Started)));
    let p = plan(&v2, Some(&r));
    assert_eq!(image_of(p.stable), "web:1");
    let (canary, replicas, weight) = p.canary.unwrap();
    assert_eq!((image_of(canary).as_str(), replicas, weight), ("web:2", 1, 10));

    // Too few requests: wait, whatever the time.
    let few = evidence(track(10, 0, 1.0), track(90, 0, 1.0));
    let (r, h) = step(&v2, &r, few, t0 + SignedDuration::from_secs(40));
    assert_eq!((r.step, h), (0, None));
    assert!(r.message.contains("waiting for 50 requests"), "{}", r.message);
    // Healthy, but the pause is not over.
    let (r, h) = step(&v2, &r, healthy(), t0 + SignedDuration::from_secs(20));
    assert_eq!((r.step, h), (0, None));
    // Healthy and the pause is over: the next step.
    let (r, h) = step(&v2, &r, healthy(), t0 + SignedDuration::from_secs(31));
    assert_eq!((r.step, r.weight, h), (1, 50, Some(Happened::Stepped)));
    // The last step's pause starts at the step.
    let (r, h) = step(&v2, &r, healthy(), t0 + SignedDuration::from_secs(45));
    assert_eq!((r.step, h), (1, None));
    let (r, h) = step(&v2, &r, healthy(), t0 + SignedDuration::from_secs(62));
    assert!(matches!(h, Some(Happened::Promoted(_))), "{h:?}");
    assert_eq!((r.phase, r.weight, r.canary_revision.as_deref()), (RolloutPhase::Stable, 0, None));
    let p = plan(&v2, Some(&r));
    assert_eq!((image_of(p.stable).as_str(), p.canary.is_none()), ("web:2", true));
    // The next reconcile keeps it.
    let (again, h) = step(&v2, &r, None, t0 + SignedDuration::from_secs(70));
    assert_eq!((again, h), (r, None));
}

#[test]
fn a_failing_canary_is_rolled_back_and_not_tried_again_until_the_template_changes() {
    let t0 = Timestamp::now();
    let v1 = spec("web:1", steps());
    let (r, _) = advance(&v1, v1.canary.as_ref().unwrap(), None, None, t0);
    let v2 = spec("web:2", steps());
    let (r, _) = step(&v2, &r, None, t0);
    // 20% of the canary's requests fail, none of the stable track's.
    let bad = evidence(track(100, 20, 10.0), track(900, 0, 10.0));
    let (r, h) = step(&v2, &r, bad, t0 + SignedDuration::from_secs(5));
    let Some(Happened::RolledBack(why)) = h else { panic!("{h:?}") };
    assert!(why.contains("80.00%") && why.contains("100.00%"), "{why}");
    assert_eq!((r.phase, r.weight), (RolloutPhase::RolledBack, 0));
    let p = plan(&v2, Some(&r));
    assert_eq!((image_of(p.stable).as_str(), p.canary.is_none()), ("web:1", true), "no canary pods, stable on v1");
    let (again, h) = step(&v2, &r, healthy(), t0 + SignedDuration::from_secs(60));
    assert_eq!((again.phase, h), (RolloutPhase::RolledBack, None));
    // A fixed version starts a new rollout; reverting to v1 ends it.
    let v3 = spec("web:3", steps());
    let (r3, h) = step(&v3, &again, None, t0 + SignedDuration::from_secs(70));
    assert_eq!((r3.phase, h), (RolloutPhase::Progressing, Some(Happened::Started)));
    let (back, _) = step(&v1, &r3, None, t0 + SignedDuration::from_secs(75));
    assert_eq!((back.phase, plan(&v1, Some(&back)).canary.is_none()), (RolloutPhase::Stable, true));
}

#[test]
fn a_slower_canary_fails_on_its_p99_but_not_within_the_tolerance() {
    let a = fulcrum::api::Analysis { min_requests: 10, ..Default::default() };
    // Too few requests for a p99: only the success rates count.
    let early = Evidence { canary: track(50, 0, 40.0), stable: track(500, 0, 10.0), window_seconds: 30, proxies: 1 };
    assert_eq!(judge(&a, &early), Verdict::Pass);
    let slow = Evidence { canary: track(100, 0, 40.0), stable: track(900, 0, 10.0), window_seconds: 30, proxies: 1 };
    assert!(matches!(judge(&a, &slow), Verdict::Fail(why) if why.contains("p99 40.0 ms")));
    // 3 ms against 1 ms is 300%, but within the 5 ms tolerance.
    let fast = Evidence { canary: track(100, 0, 3.0), stable: track(100, 0, 1.0), window_seconds: 30, proxies: 1 };
    assert_eq!(judge(&a, &fast), Verdict::Pass);
    // A success rate one point below the stable track's is allowed (the default drop).
    let close = Evidence { canary: track(100, 1, 1.0), stable: track(100, 0, 1.0), window_seconds: 30, proxies: 1 };
    assert_eq!(judge(&a, &close), Verdict::Pass);
}

#[test]
fn pause_abort_and_promotion_by_hand() {
    let t0 = Timestamp::now();
    let v1 = spec("web:1", steps());
    let (r, _) = advance(&v1, v1.canary.as_ref().unwrap(), None, None, t0);
    let v2 = spec("web:2", steps());
    let (r, _) = step(&v2, &r, None, t0);
    // Paused: holds whatever the evidence; resumed: the step's pause starts again.
    let mut paused = v2.clone();
    paused.canary.as_mut().unwrap().paused = Some(true);
    let (p, _) = step(&paused, &r, healthy(), t0 + SignedDuration::from_secs(100));
    assert_eq!((p.phase, p.step), (RolloutPhase::Paused, 0));
    let (resumed, h) = step(&v2, &p, healthy(), t0 + SignedDuration::from_secs(200));
    assert_eq!((resumed.phase, resumed.step, h), (RolloutPhase::Progressing, 0, None), "the pause counts again");
    // Abort.
    let mut aborting = resumed.clone();
    aborting.abort = true;
    let (a, h) = step(&v2, &aborting, healthy(), t0 + SignedDuration::from_secs(201));
    assert!(matches!(h, Some(Happened::RolledBack(ref why)) if why.contains("aborted")), "{h:?}");
    assert_eq!((a.phase, a.abort), (RolloutPhase::RolledBack, false));
    // Promote now, skipping the steps.
    let mut promoting = resumed;
    promoting.promote_full = true;
    let (pr, h) = step(&v2, &promoting, None, t0 + SignedDuration::from_secs(202));
    assert!(matches!(h, Some(Happened::Promoted(_))), "{h:?}");
    assert_eq!(image_of(plan(&v2, Some(&pr)).stable), "web:2");
}

#[test]
fn a_manual_canary_runs_its_own_template_at_its_weight() {
    let s = spec(
        "web:1",
        json!({"replicas": 2, "weight": 15, "template": {"spec": {"containers": [{"name": "web", "image": "web:9"}]}}}),
    );
    let p = plan(&s, None);
    let (t, replicas, weight) = p.canary.unwrap();
    assert_eq!((image_of(p.stable).as_str(), image_of(t).as_str(), replicas, weight), ("web:1", "web:9", 2, 15));
}
