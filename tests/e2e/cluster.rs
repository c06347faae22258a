//! The parts of a cluster that the in-memory API server does not play: the
//! ReplicaSet controller (pods for each app Deployment), kubelet (a real
//! backend server per pod on its own 127.0.x.y address, and its readiness)
//! and the EndpointSlice controller (one slice per backends Service).
//!
//! As on a real node, a pod is Ready only when every container is: its app and
//! its sidecar proxy (the test's one proxy process stands for every pod's
//! sidecar, so its `/readyz` gates every pod).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use crate::support::{Backend, client, send};

const APP_LABEL: &str = "fulcrum.dev/app";
const TRACK_LABEL: &str = "fulcrum.dev/track";
const COMPONENT_LABEL: &str = "app.kubernetes.io/component";

/// What the test can change in the simulated cluster.
#[derive(Default)]
pub struct Control {
    /// Pods whose app fails its readiness probe.
    pub unready: BTreeSet<String>,
}

/// The simulated controllers and kubelet.
pub struct Cluster {
    pub control: Arc<Mutex<Control>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Cluster {
    /// Starts the loop; pods get addresses 127.0.`net`.10 and up, their app
    /// listens on `port`, and their sidecar proxy's admin listener is `sidecar_admin`.
    pub fn start(client: Client, net: u8, port: u16, sidecar_admin: SocketAddr) -> Cluster {
        let control = Arc::new(Mutex::new(Control::default()));
        let mut sim = Sim {
            client,
            net,
            port,
            sidecar_admin,
            next_host: 10,
            next_pod: 1,
            pods: BTreeMap::new(),
            slices: BTreeMap::new(),
        };
        let c = control.clone();
        let task = tokio::spawn(async move {
            loop {
                if let Err(e) = sim.step(&c).await {
                    eprintln!("cluster simulation: {e}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Cluster { control, task }
    }

    pub fn set_unready(&self, pod: &str, unready: bool) {
        let mut c = self.control.lock().unwrap_or_else(|p| p.into_inner());
        if unready {
            c.unready.insert(pod.to_owned());
        } else {
            c.unready.remove(pod);
        }
    }
}

/// A running pod: its backend and the readiness last written.
struct Running {
    ip: String,
    backend: Backend,
    ready: Option<bool>,
}

struct Sim {
    client: Client,
    net: u8,
    port: u16,
    sidecar_admin: SocketAddr,
    next_host: u8,
    next_pod: u32,
    pods: BTreeMap<String, Running>,
    /// Last slice written per Service.
    slices: BTreeMap<String, Value>,
}

impl Sim {
    /// The sidecar container's readiness probe: `GET /readyz` on its admin port.
    async fn sidecar_ready(&self) -> bool {
        let Ok(req) = http::Request::get(format!("http://{}/readyz", self.sidecar_admin)).body(Default::default())
        else {
            return false;
        };
        let probe = tokio::time::timeout(Duration::from_secs(1), send(&client(), req)).await;
        matches!(probe, Ok(Ok(r)) if r.status == 200)
    }

    async fn step(&mut self, control: &Mutex<Control>) -> Result<(), kube::Error> {
        let ns = "default";
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), ns);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let listed = pods.list(&ListParams::default().labels(APP_LABEL)).await?.items;

        // Kubelet: a pod deleted from the API loses its process.
        let present: BTreeSet<String> = listed.iter().map(ResourceExt::name_any).collect();
        let gone: Vec<String> = self.pods.keys().filter(|p| !present.contains(*p)).cloned().collect();
        for name in gone {
            if let Some(mut r) = self.pods.remove(&name) {
                r.backend.kill().await;
            }
        }

        // ReplicaSet controller: as many pods as each app Deployment asks for;
        // garbage collector: no pods for a Deployment that is gone.
        let mut tracks = BTreeSet::new();
        for d in deployments.list(&ListParams::default().labels(APP_LABEL)).await?.items {
            let Some(template) = d.spec.as_ref().and_then(|s| s.template.metadata.as_ref()) else { continue };
            let labels = template.labels.clone().unwrap_or_default();
            if !labels.contains_key(TRACK_LABEL) {
                continue; // the dedicated proxy Deployment: not an app
            }
            tracks.extend(labels.get(TRACK_LABEL).cloned());
            let want = usize::try_from(d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)).unwrap_or(0);
            let mine: Vec<&Pod> = listed
                .iter()
                .filter(|p| p.labels().get(TRACK_LABEL) == labels.get(TRACK_LABEL))
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .collect();
            for _ in mine.len()..want {
                let name = format!("{}-{}", d.name_any(), self.next_pod);
                self.next_pod += 1;
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": name, "labels": labels},
                    "spec": d.spec.as_ref().map(|s| &s.template.spec),
                }))
                .map_err(kube::Error::SerdeError)?;
                pods.create(&PostParams::default(), &pod).await?;
                let ip = format!("127.0.{}.{}", self.net, self.next_host);
                self.next_host += 1;
                let addr = format!("{ip}:{}", self.port).parse().expect("pod address");
                let backend = Backend::start_on(&name, addr).await;
                self.pods.insert(name, Running { ip, backend, ready: None });
            }
            for extra in mine.iter().skip(want) {
                pods.delete(&extra.name_any(), &DeleteParams::default()).await?;
            }
        }

        for p in &listed {
            if p.labels().get(TRACK_LABEL).is_some_and(|t| !tracks.contains(t)) {
                pods.delete(&p.name_any(), &DeleteParams::default()).await?;
            }
        }

        // Kubelet: the pod's IP, phase and readiness, from the readiness of
        // both containers (the app's and the sidecar proxy's probe).
        let unready = control.lock().unwrap_or_else(|p| p.into_inner()).unready.clone();
        let sidecar_ready = self.sidecar_ready().await;
        for (name, r) in &mut self.pods {
            let ready = sidecar_ready && !unready.contains(name);
            if r.ready == Some(ready) {
                continue;
            }
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let status = json!({"status": {
                "phase": "Running",
                "podIP": r.ip,
                "podIPs": [{"ip": r.ip}],
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }, "lastTransitionTime": now}],
            }});
            pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await?;
            r.ready = Some(ready);
        }

        // EndpointSlice controller: one slice per backends Service.
        let services: Api<Service> = Api::namespaced(self.client.clone(), ns);
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), ns);
        let listed = pods.list(&ListParams::default().labels(APP_LABEL)).await?.items;
        let mut wanted = BTreeSet::new();
        for svc in services.list(&ListParams::default().labels(&format!("{COMPONENT_LABEL}=backends"))).await?.items {
            let Some(selector) = svc.spec.as_ref().and_then(|s| s.selector.clone()) else { continue };
            let name = svc.name_any();
            let endpoints: Vec<Value> = listed
                .iter()
                .filter(|p| selector.iter().all(|(k, v)| p.labels().get(k) == Some(v)))
                .filter_map(|p| {
                    let ip = p.status.as_ref()?.pod_ip.clone()?;
                    let ready = p
                        .status
                        .as_ref()?
                        .conditions
                        .as_ref()?
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True");
                    let terminating = p.metadata.deletion_timestamp.is_some();
                    Some(json!({
                        "addresses": [ip],
                        "conditions": {"ready": ready && !terminating, "serving": ready, "terminating": terminating},
                        "targetRef": {"kind": "Pod", "name": p.name_any(), "namespace": ns},
                    }))
                })
                .collect();
            let slice = json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {"name": format!("{name}-x1"), "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": [{"name": "app", "port": self.port, "protocol": "TCP"}],
            });
            wanted.insert(name.clone());
            if self.slices.get(&name) == Some(&slice) {
                continue;
            }
            let pp = PatchParams::apply("endpointslice-controller.k8s.io").force();
            slices.patch(&format!("{name}-x1"), &pp, &Patch::Apply(&slice)).await?;
            self.slices.insert(name, slice);
        }
        let stale: Vec<String> = self.slices.keys().filter(|s| !wanted.contains(*s)).cloned().collect();
        for name in stale {
            let _ = slices.delete(&format!("{name}-x1"), &DeleteParams::default()).await;
            self.slices.remove(&name);
        }
        Ok(())
    }
}
