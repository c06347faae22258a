//! The healing policy: every rule on its own, then invariants over random pod sets.

use std::time::{Duration, SystemTime};

use fulcrum::operator::healing::{EjectionStreaks, Held, Phase, PodView, Policy, Reason, heal_plan};
use proptest::prelude::*;

const T0: Duration = Duration::from_secs(1_000_000);

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(secs)
}

fn ready(name: &str) -> PodView {
    PodView {
        name: name.into(),
        phase: Phase::Running,
        ready: true,
        unready_since: None,
        crash_looping: false,
        terminating: false,
        waiting_reason: None,
        ejected_for: None,
    }
}

fn unready(name: &str, since: u64) -> PodView {
    PodView { ready: false, unready_since: Some(at(since)), ..ready(name) }
}

fn policy(timeout: u64, max: usize, min: usize) -> Policy {
    Policy {
        unready_timeout: Duration::from_secs(timeout),
        max_concurrent: max,
        min_available: min,
        ejected_timeout: None,
    }
}

fn ejected(name: &str, secs: u64) -> PodView {
    PodView { ejected_for: Some(Duration::from_secs(secs)), ..ready(name) }
}

#[test]
fn a_ready_pod_the_proxies_keep_ejecting_is_replaced_only_when_opted_in_and_within_the_limits() {
    let pods = [ready("a"), ejected("b", 130), ready("c"), ejected("d", 20)];
    // Not opted in: a ready pod is never deleted.
    assert!(heal_plan(&pods, &policy(60, 5, 1), at(0)).delete.is_empty());
    let opted = Policy { ejected_timeout: Some(Duration::from_secs(120)), ..policy(60, 5, 1) };
    let plan = heal_plan(&pods, &opted, at(0));
    assert_eq!(plan.delete, [("b".to_string(), Reason::EjectedByProxies)]);
    assert_eq!(plan.next_check, Some(Duration::from_secs(100)), "d would be due in 100 s");
    // minAvailable counts it as the ready pod it is.
    let tight = Policy { ejected_timeout: Some(Duration::from_secs(120)), ..policy(60, 5, 4) };
    assert_eq!(heal_plan(&pods, &tight, at(0)).held, [("b".to_string(), Held::MinAvailable)]);
    // An unready pod goes first when only one may.
    let pods = [ejected("a", 500), unready("b", 0), ready("c"), ready("d")];
    let one = Policy { ejected_timeout: Some(Duration::from_secs(120)), ..policy(60, 1, 1) };
    let plan = heal_plan(&pods, &one, at(100));
    assert_eq!(plan.delete, [("b".to_string(), Reason::UnreadyTooLong)]);
    assert_eq!(plan.held, [("a".to_string(), Held::MaxConcurrent)]);
}

#[test]
fn an_ejection_streak_survives_readmissions_and_a_brief_failure_does_not_last() {
    let grace = Duration::from_secs(60);
    let live = ["p1".to_string(), "p2".to_string()];
    let mut s = EjectionStreaks::default();
    // p1 fails for good: ejected, let back in after 30 s, ejected again.
    s.observe(&["p1".into()], &live, at(0), grace);
    s.observe(&[], &live, at(35), grace);
    s.observe(&["p1".into()], &live, at(40), grace);
    assert_eq!(s.ejected_for("p1", at(100)), Some(Duration::from_secs(100)));
    // p2 fails briefly: its streak ends once the proxies have let it be for longer than the grace.
    s.observe(&["p2".into()], &live, at(100), grace);
    s.observe(&[], &live, at(150), grace);
    assert!(s.ejected_for("p2", at(150)).is_some());
    s.observe(&[], &live, at(170), grace);
    assert_eq!(s.ejected_for("p2", at(170)), None);
    // A pod that is gone is forgotten.
    s.observe(&[], &["p2".to_string()], at(171), grace);
    assert_eq!(s.ejected_for("p1", at(171)), None);
    assert!(!s.any());
}

#[test]
fn a_pod_unready_past_the_timeout_is_replaced_and_one_within_it_waits() {
    let pods = [ready("a"), unready("b", 0), unready("c", 50)];
    let plan = heal_plan(&pods, &policy(60, 5, 1), at(70));
    assert_eq!(plan.delete, [("b".to_string(), Reason::UnreadyTooLong)]);
    assert_eq!(plan.next_check, Some(Duration::from_secs(40)), "c becomes eligible at 110");
}

#[test]
fn a_failed_pod_is_replaced_at_once_and_first() {
    let mut failed = unready("z", 69);
    failed.phase = Phase::Failed;
    let pods = [ready("a"), unready("b", 0), failed];
    let plan = heal_plan(&pods, &policy(60, 1, 0), at(70));
    assert_eq!(plan.delete, [("z".to_string(), Reason::Failed)]);
    assert_eq!(plan.held, [("b".to_string(), Held::MaxConcurrent)]);
}

#[test]
fn a_crash_looping_pod_is_reported_not_deleted() {
    let mut looping = unready("b", 0);
    looping.crash_looping = true;
    let plan = heal_plan(&[ready("a"), looping], &policy(60, 5, 0), at(1000));
    assert!(plan.delete.is_empty());
    assert_eq!(plan.crash_looping, ["b"]);
}

#[test]
fn terminating_pods_count_against_max_concurrent() {
    let mut going = unready("t", 0);
    going.terminating = true;
    let pods = [going, unready("b", 0), unready("c", 10)];
    let plan = heal_plan(&pods, &policy(60, 2, 0), at(100));
    assert_eq!(plan.delete, [("b".to_string(), Reason::UnreadyTooLong)], "the longest unready goes first");
    assert_eq!(plan.held, [("c".to_string(), Held::MaxConcurrent)]);
}

#[test]
fn ready_pods_are_never_deleted_and_succeeded_ones_are_left_alone() {
    let mut done = unready("s", 0);
    done.phase = Phase::Succeeded;
    let plan = heal_plan(&[ready("a"), ready("b"), done], &policy(1, 10, 0), at(1000));
    assert_eq!(plan, Default::default());
}

#[test]
fn a_pod_reported_failed_but_still_ready_respects_min_available() {
    // Phase and conditions are updated separately; a stale Ready must not break the budget.
    let mut stale = ready("f");
    stale.phase = Phase::Failed;
    let plan = heal_plan(&[ready("a"), stale.clone()], &policy(60, 5, 2), at(0));
    assert_eq!(plan.held, [("f".to_string(), Held::MinAvailable)]);
    let plan = heal_plan(&[ready("a"), stale], &policy(60, 5, 1), at(0));
    assert_eq!(plan.delete, [("f".to_string(), Reason::Failed)]);
}

#[test]
fn a_pod_without_an_unready_time_is_not_judged_by_the_timeout() {
    let mut unknown = unready("u", 0);
    unknown.unready_since = None;
    let plan = heal_plan(&[unknown], &policy(1, 5, 0), at(1000));
    assert!(plan.delete.is_empty() && plan.next_check.is_none());
}

fn pending(name: &str, since: u64, reason: Option<&str>) -> PodView {
    PodView { phase: Phase::Pending, waiting_reason: reason.map(str::to_owned), ..unready(name, since) }
}

#[test]
fn a_pod_that_never_started_is_reported_with_its_reason_and_never_deleted() {
    let pods = [
        ready("a"),
        pending("b", 0, Some("ImagePullBackOff")),
        pending("c", 0, Some("Unschedulable")),
        pending("d", 0, None),
        pending("e", 90, Some("ContainerCreating")),
    ];
    let plan = heal_plan(&pods, &policy(60, 5, 0), at(100));
    assert!(plan.delete.is_empty(), "{plan:?}");
    assert!(plan.held.is_empty(), "{plan:?}");
    assert_eq!(
        plan.not_started,
        [("b".into(), "ImagePullBackOff".into()), ("c".into(), "Unschedulable".into()), ("d".into(), "Pending".into())]
    );
    assert_eq!(plan.next_check, Some(Duration::from_secs(50)), "e is reported once it has waited 60 s");
}

#[test]
fn ties_are_broken_by_name_so_the_plan_is_deterministic() {
    let pods = [unready("c", 0), unready("a", 0), unready("b", 0)];
    let plan = heal_plan(&pods, &policy(10, 2, 0), at(100));
    let names: Vec<&str> = plan.delete.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
}

fn pod_strategy() -> impl Strategy<Value = PodView> {
    (
        (0..5u8, any::<bool>(), proptest::option::of(0..200u64), any::<bool>()),
        (prop::bool::weighted(0.1), "[a-z]{1,3}", proptest::option::of(0..300u64)),
    )
        .prop_map(|((phase, ready, since, crash), (terminating, name, ejected))| {
            let phase =
                [Phase::Pending, Phase::Running, Phase::Succeeded, Phase::Failed, Phase::Unknown][phase as usize];
            let waiting_reason = (phase == Phase::Pending).then(|| "ImagePullBackOff".to_owned());
            PodView {
                name,
                phase,
                ready,
                unready_since: since.map(at),
                crash_looping: crash,
                terminating,
                waiting_reason,
                ejected_for: ejected.map(Duration::from_secs),
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn the_plan_keeps_every_invariant(
        pods in prop::collection::vec(pod_strategy(), 0..12),
        timeout in 1..100u64,
        max in 0..4usize,
        min in 0..6usize,
        now in 0..300u64,
        ejected_timeout in proptest::option::of(10..200u64),
    ) {
        let p = Policy { ejected_timeout: ejected_timeout.map(Duration::from_secs), ..policy(timeout, max, min) };
        let plan = heal_plan(&pods, &p, at(now));
        let by_name = |n: &str| pods.iter().filter(|x| x.name == n).collect::<Vec<_>>();
        let terminating = pods.iter().filter(|x| x.terminating).count();
        // Never more replacements under way than maxConcurrent.
        prop_assert!(plan.delete.len() + terminating <= max.max(terminating));
        prop_assert!(plan.delete.len() <= max.saturating_sub(terminating));
        let ready_before = pods.iter().filter(|x| x.ready && !x.terminating).count();
        let mut ready_deleted = 0;
        for (name, reason) in &plan.delete {
            let candidates = by_name(name);
            // A deleted pod is never terminating already, never crash-looping unless Failed, never Succeeded,
            // never Pending (it never started: a new one would wait for the same thing).
            prop_assert!(candidates.iter().any(|c| !c.terminating && c.phase != Phase::Succeeded
                && c.phase != Phase::Pending
                && (c.phase == Phase::Failed || (!c.ready && !c.crash_looping)
                    || (c.ready && *reason == Reason::EjectedByProxies))));
            // A ready pod goes only when opted in and the proxies kept it out for the timeout.
            if *reason == Reason::EjectedByProxies {
                prop_assert!(candidates.iter().any(|c| c.ready && p.ejected_timeout.is_some_and(|t| c.ejected_for.is_some_and(|e| e >= t))));
            }
            if *reason == Reason::UnreadyTooLong {
                prop_assert!(candidates.iter().any(|c| c.unready_since.is_some_and(|s| at(now).duration_since(s).unwrap_or_default() >= p.unready_timeout)));
            }
            ready_deleted += usize::from(candidates.iter().all(|c| c.ready));
        }
        // Ready pods never drop below minAvailable through healing (unless they were already below).
        prop_assert!(ready_before - ready_deleted >= min.min(ready_before));
        // Liveness: an eligible pod is only left out for a stated reason.
        for x in pods.iter().filter(|x| !x.terminating && !x.crash_looping && !x.ready
            && x.phase != Phase::Succeeded && x.phase != Phase::Pending) {
            let eligible = x.phase == Phase::Failed
                || x.unready_since.is_some_and(|s| at(now).duration_since(s).unwrap_or_default() >= p.unready_timeout);
            if eligible {
                prop_assert!(plan.delete.iter().any(|(n, _)| *n == x.name) || plan.held.iter().any(|(n, _)| *n == x.name));
            }
        }
        // A pod that never started is reported once it has waited past the timeout, and only then.
        for x in pods.iter().filter(|x| !x.terminating && !x.ready && x.phase == Phase::Pending) {
            if pods.iter().filter(|y| y.name == x.name).count() > 1 {
                continue; // names are not unique in these sets
            }
            let waited = x.unready_since.is_some_and(|s| at(now).duration_since(s).unwrap_or_default() >= p.unready_timeout);
            prop_assert_eq!(waited, plan.not_started.iter().any(|(n, _)| *n == x.name));
        }
    }
}
