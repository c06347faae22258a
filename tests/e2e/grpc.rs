//! A gRPC app end to end: the operator renders `appProtocol: GRPC`, each
//! pod's sidecar balances the calls of one client channel call by call over
//! the pods, an unready pod leaves the rotation within a second, and a pod
//! deleted while calls run (its server sends GOAWAY) fails none of them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fulcrum::api::LoadBalancedApp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use tokio::time::Instant;
use tonic::Request;

use crate::apiserver::ApiServer;
use crate::grpc_peer::{EchoClient, Msg, channel, msg};
use crate::kubelet::{Node, NodeSettings};
use crate::{TempDir, install_operator, pod_ip, pods_of, ready_in_slices_of, serving_addresses, sidecars_ready, until};

const GRPC_PORT: u16 = 15000;

fn grpc_app() -> LoadBalancedApp {
    serde_json::from_value(json!({
        "apiVersion": "fulcrum.dev/v1alpha1",
        "kind": "LoadBalancedApp",
        "metadata": {"name": "rpc", "namespace": "default"},
        "spec": {
            "replicas": 3,
            "port": "grpc",
            "appProtocol": "GRPC",
            "loadBalancing": {"algorithm": "RoundRobin"},
            "healing": {"unreadyTimeout": "1m"},
            "template": {"metadata": {"labels": {"app": "rpc"}}, "spec": {"containers": [{
                "name": "app",
                "image": "registry.k8s.io/e2e-test-images/agnhost:2.53",
                "args": ["grpc-health-checking", format!("--port={GRPC_PORT}")],
                "ports": [{"name": "grpc", "containerPort": GRPC_PORT}],
                "readinessProbe": {"grpc": {"port": GRPC_PORT}, "periodSeconds": 1, "failureThreshold": 1},
            }]}},
        },
    }))
    .expect("LoadBalancedApp")
}

/// One call: when it was made, and the pod that answered it or the error.
type Call = (Instant, Result<String, String>);

/// Unary calls on one channel in a loop.
struct Calls {
    log: Arc<Mutex<Vec<Call>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Calls {
    fn start(mut client: EchoClient) -> Calls {
        let log = Arc::new(Mutex::new(Vec::new()));
        let out = log.clone();
        let task = tokio::spawn(async move {
            loop {
                let at = Instant::now();
                let r = client.unary(Request::new(Msg { delay_ms: 20, ..msg(32) })).await;
                let r = r.map(|m| m.server).map_err(|e| format!("{:?}: {}", e.code(), e.message()));
                out.lock().unwrap_or_else(|p| p.into_inner()).push((at, r));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Calls { log, task }
    }

    fn since(&self, from: Instant) -> Vec<Result<String, String>> {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.iter().filter(|(at, _)| *at >= from).map(|(_, r)| r.clone()).collect()
    }
}

impl Drop for Calls {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_app_balances_each_call_of_one_channel_over_its_pods() {
    let dir = TempDir::new("grpc");
    let server = ApiServer::start().await;
    let client = server.client();
    let node = Node::start(server.issuer(), NodeSettings::new(82, 8_000, dir.0.join("node")));
    install_operator(&server, &node).await;
    let apps: Api<LoadBalancedApp> = Api::namespaced(client.clone(), "default");
    apps.create(&PostParams::default(), &grpc_app()).await.expect("kubectl apply");

    until("three ready gRPC pods, each sidecar balancing over all three", Duration::from_secs(40), &node, || async {
        sidecars_ready(&client, "rpc", 3).await
    })
    .await;
    let pods = pods_of(&client, "rpc", "stable").await;
    let entry_ip = pod_ip(&pods[0]).expect("pod IP");
    let proxy: SocketAddr = format!("{entry_ip}:15080").parse().expect("proxy address");
    let admin: SocketAddr = format!("{entry_ip}:15090").parse().expect("admin address");
    let doc = crate::proxy_endpoints(admin).await;
    assert_eq!(doc["appProtocol"], "GRPC", "{doc}");

    // 1. One channel, 30 calls, round robin: 10 on each pod (kube-proxy would
    //    send all 30 to the one pod the connection landed on).
    let mut c = EchoClient::new(channel(proxy).await);
    let mut shares: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..30 {
        *shares.entry(c.unary(Request::new(msg(8))).await.expect("call").server).or_default() += 1;
    }
    eprintln!("30 calls on one channel: {shares:?}");
    assert_eq!(shares.values().copied().collect::<Vec<_>>(), [10, 10, 10], "{shares:?}");

    // 2. A pod turns unready: out of the rotation within a second of its slice
    //    saying so, and no call fails.
    let calls = Calls::start(EchoClient::new(channel(proxy).await));
    let victim = pods[1].name_any();
    let victim_ip = pod_ip(&pods[1]).expect("pod IP");
    node.set_unready(&victim, true);
    until("the slice to list the pod as not ready", Duration::from_secs(10), &node, || async {
        !ready_in_slices_of(&client, "rpc", &victim_ip).await
    })
    .await;
    let flipped = Instant::now();
    until("the unready pod to leave the sidecar", Duration::from_secs(1), &node, || async {
        !serving_addresses(admin).await.contains(&format!("{victim_ip}:{GRPC_PORT}"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after: Vec<_> = calls.since(flipped + Duration::from_secs(1));
    assert!(!after.is_empty());
    assert!(!after.iter().any(|r| r.as_deref() == Ok(victim.as_str())), "{victim} still gets calls");

    // 3. The third pod is deleted while calls run: its server goes away with
    //    GOAWAY; calls that had not reached it go elsewhere, none fails.
    let doomed = pods[2].name_any();
    let pods_api: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), "default");
    pods_api.delete(&doomed, &DeleteParams::default()).await.expect("delete a pod");
    until("a replacement serving in the sidecar", Duration::from_secs(30), &node, || async {
        let serving = serving_addresses(admin).await;
        serving.len() == 2
            && !serving.iter().any(|a| a.starts_with(&format!("{}:", pod_ip(&pods[2]).unwrap_or_default())))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = calls.since(flipped - Duration::from_secs(60));
    let failed: Vec<_> = all.iter().filter(|r| r.is_err()).collect();
    eprintln!("{} calls during the faults, {} failed", all.len(), failed.len());
    assert!(all.len() > 50, "{}", all.len());
    assert!(failed.is_empty(), "failed calls: {failed:?}\n{}", node.logs());
    drop(calls);
    drop(node);
}
