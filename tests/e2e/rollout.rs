//! Progressive delivery end to end: the operator steps a new version's
//! weight on the evidence its proxies report, and promotes it with no failed
//! request; a version that fails a fifth of its requests is rolled back on
//! its own within one analysis; a user aborts a third. Then healing from
//! traffic evidence: a pod that passes its probes but fails every request is
//! replaced once the proxies have kept it out long enough.

use std::time::Duration;

use fulcrum::api::{LoadBalancedApp, RolloutPhase};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::time::Instant;

use crate::apiserver::ApiServer;
use crate::kubelet::{Node, NodeSettings};
use crate::traffic::{Traffic, shares};
use crate::{TempDir, app_container, install_operator, pod_ip, until};

/// An app behind two dedicated proxies (the traffic's entry stays while the
/// app's pods roll), rolled out in two short steps.
fn shop() -> LoadBalancedApp {
    serde_json::from_value(json!({
        "apiVersion": "fulcrum.dev/v1alpha1",
        "kind": "LoadBalancedApp",
        "metadata": {"name": "shop", "namespace": "default"},
        "spec": {
            "replicas": 3,
            "port": "http",
            "proxy": {"mode": "Dedicated", "replicas": 2},
            "template": {"metadata": {"labels": {"app": "shop"}}, "spec": {"containers": [app_container("2.53")]}},
            "canary": {
                "replicas": 1,
                "steps": [{"weight": 20, "pause": "2s"}, {"weight": 50, "pause": "2s"}],
                // Latency is compared loosely: on a loaded two-core machine
                // running every pod, p99s swing by tens of milliseconds.
                "analysis": {"minRequests": 20, "maxLatencyPercent": 400, "latencyToleranceMs": 200},
            },
        },
    }))
    .expect("LoadBalancedApp")
}

fn image(version: &str) -> serde_json::Value {
    json!({"spec": {"template": {"spec": {"containers": [app_container(version)]}}}})
}

async fn rollout(apps: &Api<LoadBalancedApp>) -> fulcrum::api::Rollout {
    apps.get("shop").await.ok().and_then(|a| a.status?.rollout).unwrap_or_default()
}

async fn stable_image(deployments: &Api<Deployment>) -> String {
    let d = deployments.get("shop").await.expect("stable Deployment");
    let t = d.spec.and_then(|s| s.template.spec).expect("template");
    t.containers.iter().find(|c| c.name == "app").and_then(|c| c.image.clone()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_is_promoted_on_good_evidence_rolled_back_on_bad_and_aborted_by_hand() {
    let dir = TempDir::new("rollout");
    let server = ApiServer::start().await;
    let client = server.client();
    let node = Node::start(server.issuer(), NodeSettings::new(84, 8_000, dir.0.join("node")));
    install_operator(&server, &node).await;
    let apps: Api<LoadBalancedApp> = Api::namespaced(client.clone(), "default");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    apps.create(&PostParams::default(), &shop()).await.expect("create the app");
    until("the app Available with its first version stable", Duration::from_secs(60), &node, || async {
        let s = apps.get("shop").await.ok().and_then(|a| a.status).unwrap_or_default();
        s.ready_replicas == 3
            && s.conditions.iter().any(|c| c.type_ == "Available" && c.status == "True")
            && s.rollout.is_some_and(|r| r.phase == RolloutPhase::Stable)
    })
    .await;
    let proxy_pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), "default");
    let listed = proxy_pods
        .list(&kube::api::ListParams::default().labels("fulcrum.dev/app=shop,fulcrum.dev/component=proxy"))
        .await
        .expect("proxy pods");
    let entry = listed.items.iter().find_map(pod_ip).expect("a proxy pod with an address");
    until("the proxy serving the three pods", Duration::from_secs(20), &node, || async {
        crate::serving_addresses(format!("{entry}:15090").parse().expect("admin")).await.len() == 3
    })
    .await;
    let traffic = Traffic::start(format!("{entry}:15080").parse().expect("proxy"), 4, Duration::from_millis(5));

    // 1. A healthy new version: stepped up, promoted, rolled into the stable
    //    Deployment, and not one request fails on the way.
    let started = Instant::now();
    apps.patch("shop", &PatchParams::default(), &Patch::Merge(image("2.54"))).await.expect("new version");
    until("the canary taking traffic", Duration::from_secs(30), &node, || async {
        rollout(&apps).await.phase == RolloutPhase::Progressing
            && shares(&traffic.since(started)).keys().any(|p| p.starts_with("shop-canary-"))
    })
    .await;
    until("the new version promoted and the stable pods rolled to it", Duration::from_secs(90), &node, || async {
        let r = rollout(&apps).await;
        r.phase == RolloutPhase::Stable
            && r.canary_revision.is_none()
            && stable_image(&deployments).await.ends_with(":2.54")
            && deployments.get_opt("shop-canary").await.ok().flatten().is_none()
    })
    .await;
    let promoted_in = started.elapsed();
    let r = rollout(&apps).await;
    assert!(r.message.contains("promoted after 2 steps"), "{}", r.message);
    let last = r.evidence.expect("the evidence of the last step");
    assert!(last.canary.requests >= 20 && last.proxies >= 1, "{last:?}");
    until("the new stable pods serving", Duration::from_secs(60), &node, || async {
        crate::serving_addresses(format!("{entry}:15090").parse().expect("admin")).await.len() == 3
    })
    .await;
    let failed = traffic.failures();
    assert!(
        failed.is_empty(),
        "{} requests failed during the rollout: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    eprintln!("healthy canary promoted {promoted_in:?} after the change (two steps of 2 s)");

    // 2. A version that fails one request in five: rolled back on its own,
    //    within one analysis, its weight at 0 and its pods gone.
    node.set_failing("shop-canary-", 5);
    let changed = Instant::now();
    apps.patch("shop", &PatchParams::default(), &Patch::Merge(image("2.55"))).await.expect("faulty version");
    until("the faulty canary rolled back", Duration::from_secs(60), &node, || async {
        rollout(&apps).await.phase == RolloutPhase::RolledBack
    })
    .await;
    let rolled_back_at = Instant::now();
    let r = rollout(&apps).await;
    assert_eq!(r.weight, 0);
    assert!(r.message.contains("success rate"), "{}", r.message);
    let app = apps.get("shop").await.expect("app");
    let degraded =
        app.status.unwrap_or_default().conditions.into_iter().find(|c| c.type_ == "Degraded").expect("Degraded");
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "RolledBack"));
    until("the canary's pods gone, the stable version untouched", Duration::from_secs(30), &node, || async {
        deployments.get_opt("shop-canary").await.ok().flatten().is_none()
            && stable_image(&deployments).await.ends_with(":2.54")
    })
    .await;
    let first_bad = traffic.since(changed).into_iter().find(|s| s.result.is_err()).map(|s| s.at);
    let since_first_bad = first_bad.map(|t| rolled_back_at.duration_since(t));
    eprintln!(
        "faulty canary rolled back {:?} after the change, {since_first_bad:?} after its first failed request",
        changed.elapsed()
    );
    let after = Instant::now() + Duration::from_secs(1);
    let sent = traffic.wait_for(after, 200).await;
    assert!(sent.iter().all(|s| s.result.is_ok()), "requests fail after the rollback");
    node.set_failing("shop-canary-", 0);

    // 3. A user aborts a rollout in progress.
    apps.patch("shop", &PatchParams::default(), &Patch::Merge(image("2.56"))).await.expect("third version");
    until("the third version progressing", Duration::from_secs(30), &node, || async {
        rollout(&apps).await.phase == RolloutPhase::Progressing
    })
    .await;
    let abort = json!({"status": {"rollout": {"abort": true}}});
    apps.patch_status("shop", &PatchParams::default(), &Patch::Merge(&abort)).await.expect("abort");
    until("the aborted canary rolled back", Duration::from_secs(30), &node, || async {
        let r = rollout(&apps).await;
        r.phase == RolloutPhase::RolledBack && r.message.contains("aborted")
    })
    .await;
    assert!(stable_image(&deployments).await.ends_with(":2.54"));

    // 4. Healing from traffic evidence (opt-in): a Ready pod whose every
    //    request fails is ejected by the proxy, and replaced after 10 s of it.
    let heal = json!({"spec": {"healing": {"ejectedTimeout": "10s"}}});
    apps.patch("shop", &PatchParams::default(), &Patch::Merge(&heal)).await.expect("opt in");
    let stable = crate::pods_of(&client, "shop", "stable").await;
    let bad = stable[0].metadata.name.clone().expect("pod name");
    node.set_failing(&bad, 1);
    let broke = Instant::now();
    until("the failing pod replaced", Duration::from_secs(60), &node, || async {
        let now = crate::pods_of(&client, "shop", "stable").await;
        now.len() == 3 && !now.iter().any(|p| p.metadata.name.as_deref() == Some(bad.as_str()))
    })
    .await;
    let replaced_after = broke.elapsed();
    assert!(replaced_after >= Duration::from_secs(10), "replaced after {replaced_after:?}");
    // The status is written after the deletion, in the same reconcile.
    until("the healing recorded", Duration::from_secs(10), &node, || async {
        let s = apps.get("shop").await.ok().and_then(|a| a.status).unwrap_or_default();
        s.last_healing.is_some_and(|h| h.pod == bad && h.reason == "EjectedByProxies")
    })
    .await;
    eprintln!("a pod failing every request replaced {replaced_after:?} after it broke (ejectedTimeout 10s)");
    node.set_failing(&bad, 0);
}
