//! A node for the test API server: the controllers and the kubelet a cluster
//! runs, with each container of each pod a real local process.
//!
//! - Deployment controller: pods for every Deployment (owned by it, labelled
//!   with a `pod-template-hash`; a changed template rolls them), and the
//!   Deployment's status and `Available` condition.
//! - Scheduler: one node, or one node per zone (`node-<zone>`, labelled
//!   `topology.kubernetes.io/zone`), each with `cpu` millicores; a pod goes
//!   to the node with the fewest pods of its ReplicaSet, then the fewest
//!   pods (the default scheduler's spreading); binding copies the node's
//!   zone label onto the pod (Kubernetes 1.33+); a pod whose requests fit no
//!   node stays Pending, `PodScheduled=False`, reason `Unschedulable`.
//! - Kubelet: each pod gets its own address 127.0.`net`.x. Its init
//!   containers run in order (native sidecars, `restartPolicy: Always`, keep
//!   running and must start before the next), then its containers. An image
//!   of the Fulcrum project runs the real `fulcrum` binary with the
//!   container's arguments and environment (downward API filled in) and,
//!   when the container mounts a ServiceAccount token (automounted, or a
//!   projected token at the standard path), a kubeconfig for that account;
//!   `agnhost netexec` runs a test backend answering `/hostname` and
//!   `/healthz`; any other image fails to pull (`ErrImagePull`, then
//!   `ImagePullBackOff`). Readiness and liveness probes (httpGet, tcpSocket)
//!   run as declared; a container that exits is restarted with the kubelet's
//!   back-off (10 s doubling, `CrashLoopBackOff` while waiting); the pod's
//!   phase, IP, conditions and container states are written as a kubelet
//!   writes them. A pod deleted from the API has its processes stopped
//!   (SIGTERM, app containers before sidecars).
//! - EndpointSlice controller: a slice per Service with a selector, named
//!   target ports resolved from the pods' container ports, endpoint
//!   conditions from pod readiness and deletion, each endpoint's `nodeName`
//!   and its node's `zone`.
//!
//! - Secret and ConfigMap volumes: a pod's containers start once every one
//!   exists (until then they wait in `ContainerCreating`, as on a node whose
//!   mount fails); a Fulcrum container's mounts of them are written at their
//!   `mountPath` in the kubelet's layout (files linked through a `..data`
//!   symlink swapped atomically), and rewritten when the object changes.
//!   Processes share one filesystem, so two pods may mount at the same path
//!   only the same object: anything else fails the test loudly.
//!
//! The one liberty taken: processes share the machine's network namespace,
//! so a wildcard listen address in a container's arguments (`0.0.0.0:PORT`)
//! is bound to the pod's own address, as the pod's network namespace would
//! scope it. Whatever else a pod asks for that is not modelled (a `command`,
//! an unknown probe kind, env from Secrets) fails the test loudly.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::apiserver::Issuer;
use crate::grpc_peer::{GrpcBackend, health_check};
use crate::support::Backend;

/// What a test can change on the node while it runs.
#[derive(Default)]
pub struct Control {
    /// Pods (by name) whose app containers fail their readiness probe.
    pub unready: BTreeSet<String>,
    /// Containers to kill at once (namespace, pod, container), as a crash would.
    pub kill: Vec<(String, String, String)>,
    /// Pods whose name starts with the prefix answer 500 to every n-th request
    /// (`agnhost netexec` only), as a faulty version would.
    pub failing: Vec<(String, u64)>,
}

/// The node's settings.
pub struct NodeSettings {
    /// Pods get 127.0.`net`.30 and up (the next 200 in 127.0.`net + 1`, …).
    pub net: u8,
    /// Allocatable CPU of each node, in millicores.
    pub cpu_millis: u64,
    /// Where container logs and credentials go.
    pub dir: PathBuf,
    /// One node per zone named here; none: one node without a zone.
    pub zones: Vec<String>,
}

impl NodeSettings {
    /// One node of `cpu_millis` without a zone; pods on 127.0.`net`.x.
    pub fn new(net: u8, cpu_millis: u64, dir: PathBuf) -> Self {
        NodeSettings { net, cpu_millis, dir, zones: Vec::new() }
    }

    /// One node per zone.
    pub fn zones(mut self, zones: &[&str]) -> Self {
        self.zones = zones.iter().map(|z| (*z).to_owned()).collect();
        self
    }

    /// The nodes: name and zone.
    fn nodes(&self) -> Vec<(String, Option<String>)> {
        if self.zones.is_empty() {
            return vec![(NODE_NAME.to_owned(), None)];
        }
        self.zones.iter().map(|z| (format!("node-{z}"), Some(z.clone()))).collect()
    }
}

/// The running node. Dropping it stops every process.
pub struct Node {
    pub control: Arc<Mutex<Control>>,
    pub dir: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Node {
    pub fn start(issuer: Issuer, settings: NodeSettings) -> Node {
        let control = Arc::new(Mutex::new(Control::default()));
        let dir = settings.dir.clone();
        std::fs::create_dir_all(&dir).expect("node directory");
        let mut kubelet = Kubelet {
            client: issuer.admin_client(),
            issuer,
            settings,
            pods: BTreeMap::new(),
            next_host: 10,
            next_pod: 0,
            slices: BTreeMap::new(),
            deployment_status: BTreeMap::new(),
            terminating: Arc::default(),
        };
        let c = control.clone();
        let task = tokio::spawn(async move {
            loop {
                if let Err(e) = kubelet.step(&c).await {
                    eprintln!("node: {e}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Node { control, dir, task }
    }

    /// Makes the app containers of pods named `prefix…` (those running now
    /// and those started later) answer 500 to every `every`-th request; 0 heals them.
    pub fn set_failing(&self, prefix: &str, every: u64) {
        let mut c = self.control.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        c.failing.retain(|(p, _)| p != prefix);
        if every > 0 {
            c.failing.push((prefix.to_owned(), every));
        }
    }

    pub fn set_unready(&self, pod: &str, unready: bool) {
        let mut c = self.control.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if unready {
            c.unready.insert(pod.to_owned());
        } else {
            c.unready.remove(pod);
        }
    }

    /// Kills container `container` of pod `ns/pod` with SIGKILL, as a crash
    /// would; the kubelet restarts it.
    pub fn kill_container(&self, ns: &str, pod: &str, container: &str) {
        let mut c = self.control.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        c.kill.push((ns.to_owned(), pod.to_owned(), container.to_owned()));
    }

    /// The log of container `container` of pod `ns/pod`.
    pub fn log(&self, ns: &str, pod: &str, container: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{ns}_{pod}_{container}.log"))).unwrap_or_default()
    }

    /// Every container log, for a failing test's report.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return out };
        let mut names: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        names.sort();
        for p in names.into_iter().filter(|p| p.extension().is_some_and(|e| e == "log")) {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out.push_str(&format!("--- {} ---\n", p.display()));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

/// What a container runs.
enum Proc {
    Binary(tokio::process::Child),
    Backend(Backend),
    Grpc(GrpcBackend),
}

/// A probe's running state.
#[derive(Default)]
struct ProbeState {
    next: Option<Instant>,
    successes: u32,
    failures: u32,
}

struct ContainerRun {
    spec: Value,
    init: bool,
    sidecar: bool,
    proc: Option<Proc>,
    restarts: u32,
    /// Failed pulls of its image.
    pulls: u32,
    /// Why it is not running: `ErrImagePull`, `ImagePullBackOff`, `CrashLoopBackOff`…
    waiting: Option<String>,
    /// Exit code of a finished regular init container.
    completed: Option<i32>,
    last_exit: Option<i32>,
    backoff_until: Option<Instant>,
    started_at: Option<Timestamp>,
    ready: bool,
    readiness: ProbeState,
    liveness: ProbeState,
    log: PathBuf,
}

impl ContainerRun {
    fn name(&self) -> &str {
        self.spec["name"].as_str().unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        match &mut self.proc {
            Some(Proc::Binary(child)) => matches!(child.try_wait(), Ok(None)),
            Some(Proc::Backend(_) | Proc::Grpc(_)) => true,
            None => false,
        }
    }
}

struct PodRun {
    ns: String,
    name: String,
    ip: String,
    spec: Value,
    /// The pod's labels, for the downward API.
    labels: Value,
    scheduled: bool,
    /// The node it is bound to, once scheduled.
    node: String,
    containers: Vec<ContainerRun>,
    /// Condition type → (status, lastTransitionTime).
    conditions: BTreeMap<&'static str, (bool, String)>,
    last_status: Value,
    /// The files of its Secret and ConfigMap volumes, by volume; `None`
    /// while one of them does not exist.
    volumes: Option<BTreeMap<String, Files>>,
    /// The paths it has files written at.
    mounted: BTreeSet<PathBuf>,
}

/// A volume's files: name → content.
type Files = BTreeMap<String, Vec<u8>>;

/// A path written for Secret and ConfigMap mounts: the source object
/// (`namespace/kind/name`), the pods using it, the version last written, and
/// the lock that keeps other test processes off the path.
type Mount = (String, BTreeSet<String>, u64, std::fs::File);

/// Locks `path` for this process (other test binaries run at the same time
/// and share the filesystem), or fails the test naming the path.
fn lock_path(path: &std::path::Path) -> std::fs::File {
    let parent = path.parent().unwrap_or(std::path::Path::new("/"));
    std::fs::create_dir_all(parent).unwrap_or_else(|e| panic!("cannot create {}: {e}", parent.display()));
    let lock = parent.join(format!(".{}.lock", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", lock.display()));
    file.try_lock().unwrap_or_else(|e| {
        panic!("{} is written by another test process ({e}): two tests mount volumes at one path", path.display())
    });
    file
}

/// The paths written, over every node of the process.
static MOUNTS: std::sync::LazyLock<Mutex<BTreeMap<PathBuf, Mount>>> = std::sync::LazyLock::new(Mutex::default);

fn files_hash(files: &Files) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    files.hash(&mut h);
    h.finish()
}

/// Writes `files` at `dir` as the kubelet does: `dir/..data_N/KEY`, the
/// `dir/..data` symlink swapped to it in one rename, and `dir/KEY` →
/// `..data/KEY`.
fn write_volume(dir: &std::path::Path, files: &Files, version: u64) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let data = format!("..data_{version:016x}");
    let target = dir.join(&data);
    std::fs::create_dir_all(&target)?;
    for (key, content) in files {
        std::fs::write(target.join(key), content)?;
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&data, &tmp)?;
    std::fs::rename(&tmp, dir.join("..data"))?;
    for key in files.keys() {
        let link = dir.join(key);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{key}"), &link)?;
        }
    }
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("..data_") && name != data && name != "..data_tmp" {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}

impl PodRun {
    fn owner(&self) -> String {
        format!("{}/{}", self.ns, self.name)
    }

    /// Writes the files of the Fulcrum containers' Secret and ConfigMap mounts.
    fn sync_mounts(&mut self) {
        let Some(volumes) = &self.volumes else { return };
        let mut table = MOUNTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for c in self.containers.iter().filter(|c| matches!(image_of(&c.spec), Some(Image::Fulcrum))) {
            for m in c.spec["volumeMounts"].as_array().into_iter().flatten() {
                let name = m["name"].as_str().unwrap_or_default();
                let Some(files) = volumes.get(name) else { continue };
                assert!(m.get("subPath").is_none(), "{}: subPath mounts are not modelled", self.name);
                let volume = self.spec["volumes"].as_array().into_iter().flatten().find(|v| v["name"] == name);
                let source = volume.map(|v| source_of(&self.ns, v)).unwrap_or_default();
                let path = PathBuf::from(m["mountPath"].as_str().unwrap_or_default());
                let version = files_hash(files);
                let entry =
                    table.entry(path.clone()).or_insert_with(|| (source.clone(), BTreeSet::new(), 0, lock_path(&path)));
                assert_eq!(
                    entry.0,
                    source,
                    "{}: {} is already written for another pod from {}: the process kubelet shares one filesystem",
                    self.name,
                    path.display(),
                    entry.0
                );
                entry.1.insert(self.owner());
                if entry.2 != version {
                    write_volume(&path, files, version).unwrap_or_else(|e| {
                        panic!("{}: cannot write the volume at {}: {e}", self.name, path.display())
                    });
                    entry.2 = version;
                }
                self.mounted.insert(path);
            }
        }
    }

    /// Gives up the paths it wrote; the last pod using a path removes it.
    fn release_mounts(&mut self) {
        let owner = self.owner();
        let mut table = MOUNTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for path in std::mem::take(&mut self.mounted) {
            if let Some(entry) = table.get_mut(&path) {
                entry.1.remove(&owner);
                if entry.1.is_empty() {
                    table.remove(&path);
                    let _ = std::fs::remove_dir_all(&path);
                    if let (Some(parent), Some(name)) = (path.parent(), path.file_name()) {
                        let _ = std::fs::remove_file(parent.join(format!(".{}.lock", name.to_string_lossy())));
                    }
                    // And the directories made for it, once empty.
                    let mut parent = path.parent();
                    while let Some(p) = parent.filter(|p| std::fs::remove_dir(p).is_ok()) {
                        parent = p.parent();
                    }
                }
            }
        }
    }
}

impl Drop for PodRun {
    fn drop(&mut self) {
        self.release_mounts();
    }
}

/// `namespace/Secret/name` or `namespace/ConfigMap/name`.
fn source_of(ns: &str, volume: &Value) -> String {
    match (volume["secret"]["secretName"].as_str(), volume["configMap"]["name"].as_str()) {
        (Some(s), _) => format!("{ns}/Secret/{s}"),
        (None, Some(c)) => format!("{ns}/ConfigMap/{c}"),
        _ => String::new(),
    }
}

struct Kubelet {
    client: Client,
    issuer: Issuer,
    settings: NodeSettings,
    pods: BTreeMap<(String, String), PodRun>,
    next_host: u16,
    next_pod: u64,
    slices: BTreeMap<(String, String), Value>,
    deployment_status: BTreeMap<(String, String), Value>,
    /// Pods (by uid) whose containers are being stopped after a graceful delete.
    terminating: Arc<Mutex<BTreeSet<String>>>,
}

const TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The node's name when it is the only one.
const NODE_NAME: &str = "node-1";
/// The label binding copies from the node onto the pod, and the
/// EndpointSlice controller reads for an endpoint's zone.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector.as_object().is_some_and(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

fn cpu_millis(q: &Value) -> u64 {
    let s = match q {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return 0,
    };
    if let Some(m) = s.strip_suffix('m') {
        m.parse().unwrap_or(0)
    } else {
        s.parse::<f64>().map(|c| (c * 1000.0) as u64).unwrap_or(0)
    }
}

fn pod_cpu(spec: &Value) -> u64 {
    let sum = |key: &str| -> u64 {
        spec[key].as_array().into_iter().flatten().map(|c| cpu_millis(&c["resources"]["requests"]["cpu"])).sum()
    };
    sum("containers") + sum("initContainers")
}

fn template_hash(template: &Value) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    template.to_string().hash(&mut h);
    format!("{:x}", h.finish() & 0xff_ffff_ffff)
}

/// The image's program, or None when the image cannot be pulled.
enum Image {
    Fulcrum,
    Netexec {
        port: u16,
    },
    /// `agnhost grpc-health-checking`: a gRPC server with the standard
    /// health service (and, here, the tests' `test.Echo`).
    GrpcHealth {
        port: u16,
    },
}

fn image_of(c: &Value) -> Option<Image> {
    let image = c["image"].as_str().unwrap_or_default();
    let repo = image.split('@').next().unwrap_or_default();
    let repo = repo.rsplit_once(':').map_or(repo, |(r, tag)| if tag.contains('/') { repo } else { r });
    if repo == "fulcrum" || repo.ends_with("/fulcrum") {
        return Some(Image::Fulcrum);
    }
    if repo.ends_with("/agnhost") {
        let args: Vec<&str> = c["args"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        let flag = |name: &str, default: u16| {
            args.iter().find_map(|a| a.strip_prefix(name)).map_or(default, |p| p.parse().expect("port"))
        };
        return Some(match args.first() {
            Some(&"netexec") => Image::Netexec { port: flag("--http-port=", 8080) },
            Some(&"grpc-health-checking") => Image::GrpcHealth { port: flag("--port=", 5000) },
            _ => panic!("agnhost: only netexec and grpc-health-checking are modelled: {args:?}"),
        });
    }
    None
}

impl Kubelet {
    async fn step(&mut self, control: &Mutex<Control>) -> Result<(), kube::Error> {
        self.deployments().await?;
        let listed = list_all(&self.pods_api(None)).await?;
        let present: BTreeSet<(String, String)> = listed
            .iter()
            .map(|p| {
                (
                    p["metadata"]["namespace"].as_str().unwrap_or_default().into(),
                    p["metadata"]["name"].as_str().unwrap_or_default().into(),
                )
            })
            .collect();
        let gone: Vec<(String, String)> = self.pods.keys().filter(|k| !present.contains(*k)).cloned().collect();
        for key in gone {
            if let Some(run) = self.pods.remove(&key) {
                tokio::spawn(stop_pod(run));
            }
        }
        let (unready, kills, failing) = {
            let mut c = control.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            (c.unready.clone(), std::mem::take(&mut c.kill), c.failing.clone())
        };
        for (ns, pod, container) in kills {
            let Some(run) = self.pods.get_mut(&(ns, pod)) else { continue };
            for c in run.containers.iter_mut().filter(|c| c.name() == container) {
                if let Some(Proc::Binary(child)) = &mut c.proc {
                    let _ = child.start_kill();
                }
            }
        }
        let terminating_now = self.terminating.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        for p in &listed {
            let key = (
                p["metadata"]["namespace"].as_str().unwrap_or_default().to_owned(),
                p["metadata"]["name"].as_str().unwrap_or_default().to_owned(),
            );
            let uid = p["metadata"]["uid"].as_str().unwrap_or_default().to_owned();
            if terminating_now.contains(&uid) {
                continue;
            }
            if p["metadata"].get("deletionTimestamp").is_some() {
                // Deleted gracefully: stop the containers, then delete it for good.
                self.terminating.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(uid.clone());
                let run = self.pods.remove(&key);
                let (api, name, done) = (self.pods_api(Some(&key.0)), key.1.clone(), self.terminating.clone());
                tokio::spawn(async move {
                    if let Some(run) = run {
                        stop_pod(run).await;
                    }
                    let dp = DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() };
                    let _ = api.delete(&name, &dp).await;
                    done.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&uid);
                });
                continue;
            }
            if !self.pods.contains_key(&key) {
                let run = self.admit(p);
                self.pods.insert(key.clone(), run);
            }
            let volumes = self.volume_files(&key).await?;
            let placement = self.place(&key);
            let nodes = self.settings.nodes().len();
            let issuer = self.issuer.clone();
            let Some(run) = self.pods.get_mut(&key) else { continue };
            if let Some((node, zone)) = placement {
                // Bound to the node, as the scheduler's binding does; the
                // binding copies the node's zone label onto the pod.
                let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &run.ns, &pod_resource());
                let mut bind = json!({"spec": {"nodeName": node}});
                if let Some(zone) = &zone {
                    bind["metadata"] = json!({"labels": {ZONE_LABEL: zone}});
                    run.labels[ZONE_LABEL] = json!(zone);
                }
                match api.patch(&run.name, &PatchParams::default(), &Patch::Merge(&bind)).await {
                    Ok(_) => (run.scheduled, run.node) = (true, node),
                    Err(kube::Error::Api(e)) if e.code == 404 => continue,
                    Err(e) => return Err(e),
                }
            }
            if run.scheduled && volumes.is_some() {
                run.volumes = volumes;
                run.sync_mounts();
            }
            if run.scheduled && run.volumes.is_some() {
                let fail_every = failing.iter().find(|(p, _)| run.name.starts_with(p.as_str())).map_or(0, |(_, n)| *n);
                run.advance(&issuer, unready.contains(&run.name), fail_every).await;
            }
            let status = run.status(nodes);
            if status != run.last_status {
                let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &run.ns, &pod_resource());
                match api
                    .patch_status(&run.name, &PatchParams::default(), &Patch::Merge(&json!({"status": status})))
                    .await
                {
                    Ok(_) => run.last_status = status,
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e),
                }
            }
        }
        self.endpoint_slices().await
    }

    /// The scheduler: the node (and its zone) for the pod `key` if it is not
    /// bound yet and fits somewhere: of the nodes with room for its CPU
    /// requests, the one with the fewest pods of the same ReplicaSet, then the
    /// fewest pods, then the first by name.
    fn place(&self, key: &(String, String)) -> Option<(String, Option<String>)> {
        let run = self.pods.get(key).filter(|r| !r.scheduled)?;
        let set = &run.labels["pod-template-hash"];
        let bound = || self.pods.values().filter(|r| r.scheduled);
        self.settings
            .nodes()
            .into_iter()
            .filter(|(n, _)| {
                let used: u64 = bound().filter(|r| r.node == *n).map(|r| pod_cpu(&r.spec)).sum();
                used + pod_cpu(&run.spec) <= self.settings.cpu_millis
            })
            .min_by_key(|(n, _)| {
                let on = || bound().filter(|r| r.node == *n);
                let same = on().filter(|r| r.ns == run.ns && !set.is_null() && r.labels["pod-template-hash"] == *set);
                (same.count(), on().count())
            })
    }

    /// The zone of the node named `node`.
    fn zone_of(&self, node: &str) -> Option<String> {
        self.settings.nodes().into_iter().find(|(n, _)| n == node).and_then(|(_, z)| z)
    }

    fn pods_api(&self, ns: Option<&str>) -> Api<DynamicObject> {
        match ns {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &pod_resource()),
            None => Api::all_with(self.client.clone(), &pod_resource()),
        }
    }

    /// A new pod: its address and containers, nothing started yet.
    fn admit(&mut self, p: &Value) -> PodRun {
        let spec = p["spec"].clone();
        assert!(spec.get("hostNetwork").is_none_or(|h| h == false), "hostNetwork is not modelled");
        let ns = p["metadata"]["namespace"].as_str().unwrap_or_default().to_owned();
        let name = p["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        let host = self.next_host;
        self.next_host += 1;
        let ip = format!("127.0.{}.{}", u16::from(self.settings.net) + host / 200, 20 + host % 200);
        let mut containers = Vec::new();
        for (list, init) in [("initContainers", true), ("containers", false)] {
            for c in spec[list].as_array().into_iter().flatten() {
                assert!(c.get("command").is_none(), "{name}: a container command is not modelled");
                let sidecar = init && c["restartPolicy"] == "Always";
                let log = self.settings.dir.join(format!("{ns}_{name}_{}.log", c["name"].as_str().unwrap_or_default()));
                containers.push(ContainerRun {
                    spec: c.clone(),
                    init,
                    sidecar,
                    proc: None,
                    restarts: 0,
                    pulls: 0,
                    waiting: Some("ContainerCreating".into()),
                    completed: None,
                    last_exit: None,
                    backoff_until: None,
                    started_at: None,
                    ready: false,
                    readiness: ProbeState::default(),
                    liveness: ProbeState::default(),
                    log,
                });
            }
        }
        PodRun {
            ns,
            name,
            ip,
            spec,
            labels: p["metadata"]["labels"].clone(),
            scheduled: false,
            node: String::new(),
            containers,
            conditions: BTreeMap::new(),
            last_status: Value::Null,
            volumes: None,
            mounted: BTreeSet::new(),
        }
    }

    /// The files of every Secret and ConfigMap volume of the pod `key`, or
    /// `None` while one does not exist (`optional: true` ones may be absent).
    async fn volume_files(&self, key: &(String, String)) -> Result<Option<BTreeMap<String, Files>>, kube::Error> {
        let Some(run) = self.pods.get(key) else { return Ok(None) };
        let mut out = BTreeMap::new();
        for v in run.spec["volumes"].as_array().into_iter().flatten() {
            let name = v["name"].as_str().unwrap_or_default().to_owned();
            let files: Option<Files> = if let Some(secret) = v["secret"]["secretName"].as_str() {
                let api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(self.client.clone(), &run.ns);
                api.get_opt(secret)
                    .await?
                    .map(|s| s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect())
            } else if let Some(cm) = v["configMap"]["name"].as_str() {
                let api: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(self.client.clone(), &run.ns);
                api.get_opt(cm)
                    .await?
                    .map(|c| c.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.into_bytes())).collect())
            } else {
                continue;
            };
            let optional = v["secret"]["optional"] == true || v["configMap"]["optional"] == true;
            match files {
                Some(f) => {
                    out.insert(name, f);
                }
                None if optional => {
                    out.insert(name, Files::new());
                }
                None => return Ok(None),
            }
        }
        Ok(Some(out))
    }

    /// The Deployment and ReplicaSet controllers: a ReplicaSet per template
    /// of each Deployment (owned by it), pods owned by the ReplicaSet (as in a
    /// real cluster: pod → ReplicaSet → Deployment), and the status.
    async fn deployments(&mut self) -> Result<(), kube::Error> {
        let deployments: Api<DynamicObject> = Api::all_with(self.client.clone(), &deployment_resource());
        let all_pods = list_all(&self.pods_api(None)).await?;
        let replica_sets: Api<DynamicObject> = Api::all_with(self.client.clone(), &replica_set_resource());
        let all_sets = list_all(&replica_sets).await?;
        for d in list_all(&deployments).await? {
            let ns = d["metadata"]["namespace"].as_str().unwrap_or_default().to_owned();
            let name = d["metadata"]["name"].as_str().unwrap_or_default().to_owned();
            let uid = d["metadata"]["uid"].as_str().unwrap_or_default().to_owned();
            if d["metadata"].get("deletionTimestamp").is_some() {
                continue;
            }
            let want = d["spec"]["replicas"].as_u64().unwrap_or(1) as usize;
            let template = &d["spec"]["template"];
            let hash = template_hash(template);
            let owned_by = |o: &Value, owner: &str| {
                o["metadata"]["ownerReferences"].as_array().into_iter().flatten().any(|r| r["uid"] == owner)
            };
            let sets: Vec<&Value> = all_sets.iter().filter(|s| owned_by(s, &uid)).collect();
            let set_name = format!("{name}-{hash:.10}");
            let set_uid = match sets.iter().find(|s| s["metadata"]["name"] == set_name.as_str()) {
                Some(s) => s["metadata"]["uid"].as_str().unwrap_or_default().to_owned(),
                None => {
                    let mut labels = template["metadata"]["labels"].clone();
                    labels["pod-template-hash"] = json!(hash);
                    let rs = json!({
                        "apiVersion": "apps/v1", "kind": "ReplicaSet",
                        "metadata": {
                            "name": set_name, "namespace": ns, "labels": labels,
                            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": name, "uid": uid, "controller": true}],
                        },
                        "spec": {"replicas": want, "selector": d["spec"]["selector"], "template": template},
                    });
                    let rs: DynamicObject = serde_json::from_value(rs).map_err(kube::Error::SerdeError)?;
                    let api: Api<DynamicObject> =
                        Api::namespaced_with(self.client.clone(), &ns, &replica_set_resource());
                    let created = api.create(&PostParams::default(), &rs).await?;
                    created.metadata.uid.unwrap_or_default()
                }
            };
            let set_uids: Vec<&str> = sets.iter().filter_map(|s| s["metadata"]["uid"].as_str()).collect();
            let owned: Vec<&Value> = all_pods
                .iter()
                .filter(|p| set_uids.iter().any(|s| owned_by(p, s)) || owned_by(p, &set_uid))
                .filter(|p| p["metadata"].get("deletionTimestamp").is_none())
                .collect();
            let current: Vec<&&Value> =
                owned.iter().filter(|p| p["metadata"]["labels"]["pod-template-hash"] == hash.as_str()).collect();
            let ready = |p: &Value| {
                p["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            };
            let api = self.pods_api(Some(&ns));
            for _ in current.len()..want {
                self.next_pod += 1;
                let mut labels = template["metadata"]["labels"].clone();
                labels["pod-template-hash"] = json!(hash);
                let mut meta = template["metadata"].clone();
                meta["name"] = json!(format!("{name}-{hash:.8}-{:05x}", self.next_pod));
                meta["labels"] = labels;
                meta["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": set_name, "uid": set_uid, "controller": true}]);
                let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template["spec"]});
                let pod: DynamicObject = serde_json::from_value(pod).map_err(kube::Error::SerdeError)?;
                api.create(&PostParams::default(), &pod).await?;
            }
            // Extra pods of the current template go, unready ones first.
            let mut extra: Vec<&&Value> = current.clone();
            extra.sort_by_key(|p| ready(p));
            for p in extra.iter().take(current.len().saturating_sub(want)) {
                let _ = api.delete(p["metadata"]["name"].as_str().unwrap_or_default(), &DeleteParams::default()).await;
            }
            // A changed template: old pods go once the new ones are all ready.
            let new_ready = current.iter().filter(|p| ready(p)).count();
            if new_ready >= want {
                for p in owned.iter().filter(|p| p["metadata"]["labels"]["pod-template-hash"] != hash.as_str()) {
                    let _ =
                        api.delete(p["metadata"]["name"].as_str().unwrap_or_default(), &DeleteParams::default()).await;
                }
            }
            let total = owned.len();
            let ready_n = owned.iter().filter(|p| ready(p)).count();
            let available = ready_n >= want;
            let status = json!({
                "observedGeneration": d["metadata"]["generation"],
                "replicas": total,
                "updatedReplicas": current.len(),
                "readyReplicas": ready_n,
                "availableReplicas": ready_n,
                "unavailableReplicas": total.saturating_sub(ready_n),
                "conditions": [
                    {"type": "Available", "status": if available { "True" } else { "False" },
                     "reason": if available { "MinimumReplicasAvailable" } else { "MinimumReplicasUnavailable" },
                     "message": format!("{ready_n} of {want} replicas ready")},
                    {"type": "Progressing", "status": "True", "reason": if new_ready >= want { "NewReplicaSetAvailable" } else { "ReplicaSetUpdated" }, "message": "rolling"},
                ],
            });
            let key = (ns.clone(), name.clone());
            if self.deployment_status.get(&key) != Some(&status) {
                let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &ns, &deployment_resource());
                api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&json!({"status": status}))).await?;
                self.deployment_status.insert(key, status);
            }
        }
        Ok(())
    }

    /// The EndpointSlice controller.
    async fn endpoint_slices(&mut self) -> Result<(), kube::Error> {
        let services: Api<DynamicObject> = Api::all_with(self.client.clone(), &service_resource());
        let pods = list_all(&self.pods_api(None)).await?;
        let mut wanted = BTreeSet::new();
        for svc in list_all(&services).await? {
            let selector = &svc["spec"]["selector"];
            if !selector.is_object() || selector.as_object().is_some_and(serde_json::Map::is_empty) {
                continue;
            }
            let ns = svc["metadata"]["namespace"].as_str().unwrap_or_default().to_owned();
            let name = svc["metadata"]["name"].as_str().unwrap_or_default().to_owned();
            let members: Vec<&Value> = pods
                .iter()
                .filter(|p| {
                    p["metadata"]["namespace"] == ns.as_str() && labels_match(selector, &p["metadata"]["labels"])
                })
                .filter(|p| p["status"]["podIP"].is_string())
                .collect();
            let ports: Vec<Value> = svc["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|sp| {
                    let target = sp.get("targetPort").unwrap_or(&sp["port"]);
                    let port = match target {
                        Value::Number(n) => n.as_u64(),
                        Value::String(named) => members.iter().find_map(|p| {
                            p["spec"]["containers"].as_array().into_iter().chain(p["spec"]["initContainers"].as_array()).flatten()
                                .flat_map(|c| c["ports"].as_array().into_iter().flatten())
                                .find(|cp| cp["name"] == named.as_str())
                                .and_then(|cp| cp["containerPort"].as_u64())
                        }),
                        _ => None,
                    }?;
                    Some(json!({"name": sp["name"].as_str().unwrap_or(""), "port": port, "protocol": sp["protocol"].as_str().unwrap_or("TCP")}))
                })
                .collect();
            let endpoints: Vec<Value> = members
                .iter()
                .map(|p| {
                    let ready = p["status"]["conditions"].as_array().into_iter().flatten().any(|c| c["type"] == "Ready" && c["status"] == "True");
                    let terminating = p["metadata"].get("deletionTimestamp").is_some();
                    let node = p["spec"]["nodeName"].as_str().unwrap_or_default();
                    let mut e = json!({
                        "addresses": [p["status"]["podIP"]],
                        "conditions": {"ready": ready && !terminating, "serving": ready, "terminating": terminating},
                        "targetRef": {"kind": "Pod", "name": p["metadata"]["name"], "namespace": ns, "uid": p["metadata"]["uid"]},
                        "nodeName": node,
                    });
                    if let Some(zone) = self.zone_of(node) {
                        e["zone"] = json!(zone);
                    }
                    e
                })
                .collect();
            let slice_name = format!("{name}-node");
            let slice = json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {
                    "name": slice_name, "namespace": ns,
                    "labels": {"kubernetes.io/service-name": name, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                    "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": name, "uid": svc["metadata"]["uid"], "controller": true}],
                },
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": ports,
            });
            let key = (ns.clone(), slice_name.clone());
            wanted.insert(key.clone());
            if self.slices.get(&key) == Some(&slice) {
                continue;
            }
            let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &ns, &slice_resource());
            let pp = PatchParams::apply("endpointslice-controller.k8s.io").force();
            api.patch(&slice_name, &pp, &Patch::Apply(&slice)).await?;
            self.slices.insert(key, slice);
        }
        self.slices.retain(|k, _| wanted.contains(k));
        Ok(())
    }
}

/// Every object of `api`, as JSON.
async fn list_all(api: &Api<DynamicObject>) -> Result<Vec<Value>, kube::Error> {
    let items = api.list(&ListParams::default()).await?.items;
    Ok(items.into_iter().map(|o| serde_json::to_value(o).unwrap_or_default()).collect())
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> kube::api::ApiResource {
    kube::api::ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: if group.is_empty() { version.into() } else { format!("{group}/{version}") },
        kind: kind.into(),
        plural: plural.into(),
    }
}

fn pod_resource() -> kube::api::ApiResource {
    resource("", "v1", "Pod", "pods")
}

fn deployment_resource() -> kube::api::ApiResource {
    resource("apps", "v1", "Deployment", "deployments")
}

fn replica_set_resource() -> kube::api::ApiResource {
    resource("apps", "v1", "ReplicaSet", "replicasets")
}

fn service_resource() -> kube::api::ApiResource {
    resource("", "v1", "Service", "services")
}

fn slice_resource() -> kube::api::ApiResource {
    resource("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices")
}

/// An HTTP GET as a probe sends it: the status, or None.
async fn http_get(addr: &str, path: &str, timeout: Duration) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.33\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = vec![0u8; 64];
        let n = s.read(&mut buf).await.ok()?;
        let head = String::from_utf8_lossy(&buf[..n]).into_owned();
        head.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(timeout, attempt).await.ok().flatten()
}

impl PodRun {
    /// A container port by number or name.
    fn port(&self, c: &Value, port: &Value) -> Option<u64> {
        match port {
            Value::Number(n) => n.as_u64(),
            Value::String(name) => c["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == name.as_str())
                .and_then(|p| p["containerPort"].as_u64()),
            _ => None,
        }
    }

    /// Runs one probe of container `i` if it is due: Some(passed) when it ran.
    async fn probe(&mut self, i: usize, kind: &str) -> Option<bool> {
        let spec = self.containers[i].spec[kind].clone();
        if spec.is_null() {
            return None;
        }
        let now = Instant::now();
        let state =
            if kind == "readinessProbe" { &mut self.containers[i].readiness } else { &mut self.containers[i].liveness };
        let period = Duration::from_secs(spec["periodSeconds"].as_u64().unwrap_or(10));
        match state.next {
            None => {
                state.next = Some(now + Duration::from_secs(spec["initialDelaySeconds"].as_u64().unwrap_or(0)));
                return None;
            }
            Some(t) if t > now => return None,
            Some(_) => state.next = Some(now + period),
        }
        let timeout = Duration::from_secs(spec["timeoutSeconds"].as_u64().unwrap_or(1));
        let c = self.containers[i].spec.clone();
        let passed = if let Some(get) = spec.get("httpGet") {
            let port = self.port(&c, &get["port"]).expect("probe port");
            let path = get["path"].as_str().unwrap_or("/");
            http_get(&format!("{}:{port}", self.ip), path, timeout).await.is_some_and(|s| (200..400).contains(&s))
        } else if let Some(grpc) = spec.get("grpc") {
            let port = grpc["port"].as_u64().expect("gRPC probe port");
            health_check(format!("{}:{port}", self.ip).parse().expect("pod address"), timeout).await
        } else if let Some(tcp) = spec.get("tcpSocket") {
            let port = self.port(&c, &tcp["port"]).expect("probe port");
            tokio::time::timeout(timeout, tokio::net::TcpStream::connect(format!("{}:{port}", self.ip)))
                .await
                .is_ok_and(|r| r.is_ok())
        } else {
            panic!("{}: probe {spec} is not modelled", self.name);
        };
        let state =
            if kind == "readinessProbe" { &mut self.containers[i].readiness } else { &mut self.containers[i].liveness };
        if passed {
            state.successes += 1;
            state.failures = 0;
        } else {
            state.failures += 1;
            state.successes = 0;
        }
        Some(passed)
    }

    /// Starts, probes and restarts the pod's containers.
    async fn advance(&mut self, issuer: &Issuer, app_unready: bool, fail_every: u64) {
        let now = Instant::now();
        // Init containers in order: a regular one must complete, a sidecar must start.
        let mut may_start = true;
        for i in 0..self.containers.len() {
            let init = self.containers[i].init;
            if !may_start {
                break;
            }
            let running = self.containers[i].running();
            let c = &mut self.containers[i];
            if !running && c.proc.is_some() {
                // It exited.
                let code = match c.proc.take() {
                    Some(Proc::Binary(mut child)) => {
                        child.try_wait().ok().flatten().and_then(|s| s.code()).unwrap_or(137)
                    }
                    _ => 137,
                };
                c.ready = false;
                c.readiness = ProbeState::default();
                c.liveness = ProbeState::default();
                if init && !c.sidecar && code == 0 {
                    c.completed = Some(0);
                } else {
                    c.last_exit = Some(code);
                    let backoff =
                        Duration::from_secs(10u64.saturating_mul(1 << c.restarts.min(5))).min(Duration::from_secs(300));
                    c.backoff_until = Some(now + backoff);
                    c.waiting = Some("CrashLoopBackOff".into());
                    c.restarts += 1;
                }
            }
            if c.completed.is_some() {
                continue;
            }
            if c.proc.is_none() && c.backoff_until.is_none_or(|t| t <= now) {
                self.start_container(i, issuer).await;
            }
            let c = &self.containers[i];
            if init && (!c.sidecar || c.proc.is_none()) {
                may_start = false;
            }
        }
        // Probes of running containers.
        for i in 0..self.containers.len() {
            if !self.containers[i].running() {
                continue;
            }
            match &self.containers[i].proc {
                Some(Proc::Backend(b)) => {
                    b.set_healthy(!app_unready);
                    b.set_fail_every(fail_every);
                }
                Some(Proc::Grpc(g)) => g.set_serving(!app_unready).await,
                _ => {}
            }
            let has_readiness = !self.containers[i].spec["readinessProbe"].is_null();
            if let Some(_passed) = self.probe(i, "readinessProbe").await {
                let c = &mut self.containers[i];
                let threshold = c.spec["readinessProbe"]["failureThreshold"].as_u64().unwrap_or(3) as u32;
                if c.readiness.successes >= 1 {
                    c.ready = true;
                } else if c.readiness.failures >= threshold {
                    c.ready = false;
                }
            } else if !has_readiness {
                self.containers[i].ready = true;
            }
            if self.probe(i, "livenessProbe").await == Some(false) {
                let c = &mut self.containers[i];
                let threshold = c.spec["livenessProbe"]["failureThreshold"].as_u64().unwrap_or(3) as u32;
                if c.liveness.failures >= threshold
                    && let Some(Proc::Binary(child)) = &mut c.proc
                {
                    let _ = child.start_kill();
                }
            }
        }
    }

    async fn start_container(&mut self, i: usize, issuer: &Issuer) {
        let c = self.containers[i].spec.clone();
        let Some(image) = image_of(&c) else {
            let cr = &mut self.containers[i];
            cr.waiting = Some(if cr.pulls.is_multiple_of(2) { "ErrImagePull" } else { "ImagePullBackOff" }.into());
            cr.pulls += 1;
            cr.backoff_until = Some(Instant::now() + Duration::from_secs(1));
            return;
        };
        let proc = match image {
            Image::Netexec { port } => {
                let addr = format!("{}:{port}", self.ip).parse().expect("pod address");
                Proc::Backend(Backend::start_on(&self.name, addr).await)
            }
            Image::GrpcHealth { port } => {
                let addr = format!("{}:{port}", self.ip).parse().expect("pod address");
                Proc::Grpc(GrpcBackend::start_on(&self.name, addr, None).await)
            }
            Image::Fulcrum => {
                let args: Vec<String> = c["args"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| a.as_str().expect("string argument").replace("0.0.0.0:", &format!("{}:", self.ip)))
                    .collect();
                let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_fulcrum"));
                cmd.args(&args).env_clear();
                for e in c["env"].as_array().into_iter().flatten() {
                    let key = e["name"].as_str().expect("env name");
                    let value = match (&e["value"], e["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
                        (Value::String(v), _) => v.clone(),
                        (_, Some("metadata.name")) => self.name.clone(),
                        (_, Some("metadata.namespace")) => self.ns.clone(),
                        (_, Some("status.podIP")) => self.ip.clone(),
                        (_, Some("spec.serviceAccountName")) => self.service_account(),
                        (_, Some("spec.nodeName")) => self.node.clone(),
                        // A missing label reads as empty, as the kubelet gives it.
                        (_, Some(p)) if p.starts_with("metadata.labels['") => {
                            let label = p.trim_start_matches("metadata.labels['").trim_end_matches("']");
                            self.labels[label].as_str().unwrap_or_default().to_owned()
                        }
                        other => panic!("{}: env {key} from {other:?} is not modelled", self.name),
                    };
                    cmd.env(key, value);
                }
                if self.mounts_token(&c) {
                    let token = issuer.token_for(&self.ns, &self.service_account());
                    let dir = self.containers[i].log.with_extension("creds");
                    std::fs::create_dir_all(&dir).expect("credentials directory");
                    cmd.env("KUBECONFIG", issuer.write_kubeconfig(&dir, &token, &self.ns));
                }
                let log =
                    std::fs::OpenOptions::new().create(true).append(true).open(&self.containers[i].log).expect("log");
                cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).kill_on_drop(true);
                Proc::Binary(cmd.spawn().expect("start the fulcrum binary"))
            }
        };
        let cr = &mut self.containers[i];
        cr.proc = Some(proc);
        cr.waiting = None;
        cr.backoff_until = None;
        cr.started_at = Some(Timestamp::now());
    }

    fn service_account(&self) -> String {
        self.spec["serviceAccountName"].as_str().unwrap_or("default").to_owned()
    }

    /// Whether the container sees a token at the standard path: automounted
    /// (unless the pod turns it off), or mounted from a projected token volume.
    fn mounts_token(&self, c: &Value) -> bool {
        let mounted_here = c["volumeMounts"].as_array().into_iter().flatten().find(|m| m["mountPath"] == TOKEN_PATH);
        if let Some(m) = mounted_here {
            let volume = self.spec["volumes"].as_array().into_iter().flatten().find(|v| v["name"] == m["name"]);
            return volume.is_some_and(|v| {
                v["projected"]["sources"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|s| s.get("serviceAccountToken").is_some())
            });
        }
        self.spec["automountServiceAccountToken"] != false
    }

    fn condition(&mut self, kind: &'static str, ok: bool) -> Value {
        let now = Timestamp::now().to_string();
        let entry = self.conditions.entry(kind).or_insert((ok, now.clone()));
        if entry.0 != ok {
            *entry = (ok, now);
        }
        json!({"type": kind, "status": if ok { "True" } else { "False" }, "lastTransitionTime": entry.1})
    }

    /// The status a kubelet would write now.
    fn status(&mut self, nodes: usize) -> Value {
        if !self.scheduled {
            let mut scheduled = self.condition("PodScheduled", false);
            scheduled["reason"] = json!("Unschedulable");
            scheduled["message"] = json!(format!("0/{nodes} nodes are available: {nodes} Insufficient cpu."));
            return json!({"phase": "Pending", "conditions": [scheduled]});
        }
        let mut init_statuses = Vec::new();
        let mut statuses = Vec::new();
        let mut all_started = true;
        let mut initialized = true;
        let mut all_ready = true;
        for c in &mut self.containers {
            let running = c.running();
            let state = if running {
                json!({"running": {"startedAt": c.started_at.map(|t| t.to_string())}})
            } else if let Some(code) = c.completed {
                json!({"terminated": {"exitCode": code, "reason": "Completed"}})
            } else {
                json!({"waiting": {"reason": c.waiting.clone().unwrap_or_else(|| "ContainerCreating".into())}})
            };
            let mut s = json!({
                "name": c.name(), "image": c.spec["image"], "imageID": "", "ready": running && c.ready,
                "restartCount": c.restarts, "started": running, "state": state,
            });
            if let Some(code) = c.last_exit {
                s["lastState"] = json!({"terminated": {"exitCode": code, "reason": "Error"}});
            }
            if c.init {
                if !c.sidecar && c.completed.is_none() || c.sidecar && !running {
                    initialized = false;
                }
                if c.sidecar && !(running && c.ready) {
                    all_ready = false;
                }
                init_statuses.push(s);
            } else {
                all_started &= running;
                all_ready &= running && c.ready;
                statuses.push(s);
            }
        }
        // Running once every container has started, whether or not it is
        // running right now (a restarting container keeps the pod Running).
        let ever_started = self.containers.iter().filter(|c| !c.init).all(|c| c.started_at.is_some());
        let phase = if initialized && (all_started || ever_started) { "Running" } else { "Pending" };
        let conditions = vec![
            self.condition("PodScheduled", true),
            self.condition("Initialized", initialized),
            self.condition("ContainersReady", initialized && all_ready),
            self.condition("Ready", initialized && all_ready),
        ];
        json!({
            "phase": phase,
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "hostIP": "127.0.0.1",
            "conditions": conditions,
            "initContainerStatuses": init_statuses,
            "containerStatuses": statuses,
        })
    }
}

/// Stops a deleted pod's processes: SIGTERM to the app's containers, then to
/// the sidecars once those have exited, SIGKILL after the grace period.
async fn stop_pod(mut run: PodRun) {
    let grace = Duration::from_secs(run.spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30).min(10));
    for sidecars in [false, true] {
        let mut children = Vec::new();
        for c in run.containers.iter_mut().filter(|c| c.sidecar == sidecars) {
            match c.proc.take() {
                Some(Proc::Binary(child)) => children.push(child),
                Some(Proc::Backend(mut b)) => b.kill().await,
                Some(Proc::Grpc(g)) => g.terminate(grace).await,
                None => {}
            }
        }
        for child in &children {
            if let Some(pid) = child.id() {
                let _ = tokio::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
            }
        }
        for mut child in children {
            if tokio::time::timeout(grace, child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
    }
}
