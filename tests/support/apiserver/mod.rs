//! An in-memory Kubernetes API server for tests: real HTTPS on 127.0.0.1, so
//! that a real `kube::Client`, kube-runtime's watcher, reflector and
//! Controller run against it unchanged.
//!
//! It is strict where tests could otherwise pass by accident: unknown
//! resources, verbs, patch types and selectors are refused with the status a
//! real server would send, never silently accepted. Every request must carry
//! a bearer token and is authorized with RBAC from the roles and bindings
//! stored in it, and recorded in an audit log ([`auth`]). Tests that play
//! kubelet or a controller reach the store directly through [`ApiServer::store`].

#![allow(dead_code)]

pub mod admission;
pub mod auth;
pub mod patch;
pub mod registry;
pub mod selector;
pub mod status;
pub mod store;
pub mod tls;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use auth::{ADMIN_TOKEN, Attributes, AuditEvent, Auth, Identity, Rbac};
use patch::{PatchType, parse_body};
use registry::Resource;
use selector::{FieldSelector, LabelSelector};
use status::ApiError;
use store::{Propagation, Store, list_body};

type Body = BoxBody<Bytes, Infallible>;

/// Injected faults.
#[derive(Default)]
struct Faults {
    /// plural → (requests left to fail, status code)
    fail: HashMap<String, (u32, u16)>,
}

struct State {
    resources: Vec<Resource>,
    store: Store,
    auth: Auth,
    faults: Mutex<Faults>,
    /// Bumped to end every open watch.
    close_watches: watch::Sender<u64>,
    /// While true, requests wait before being answered.
    paused: watch::Sender<bool>,
    /// Interval between BOOKMARK events on watches that allow them.
    bookmark_every: Duration,
}

/// A running test API server. Dropping it stops the listener.
pub struct ApiServer {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ApiServer {
    /// Starts a server on an ephemeral port of 127.0.0.1 with the built-in
    /// resources and Fulcrum's CRD installed (from `crds/`), as a cluster
    /// where Fulcrum is installed.
    pub async fn start() -> ApiServer {
        let server = Self::start_bare().await;
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/loadbalancedapps.fulcrum.dev.yaml");
        let text = std::fs::read_to_string(&path).expect("the checked-in CRD");
        let crd: Value = serde_saphyr::from_str(&text).expect("the CRD parses");
        let res = server.resource("apiextensions.k8s.io", "customresourcedefinitions");
        server.store().create(&res, "", crd).expect("install the CRD");
        server
    }

    /// Starts a server without any CustomResourceDefinition: custom resources
    /// are not served until one is applied (as `kubectl apply` of install.yaml does).
    pub async fn start_bare() -> ApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the test API server");
        let addr = listener.local_addr().expect("local address");
        let state = Arc::new(State {
            resources: registry::builtin(),
            store: Store::new(),
            auth: Auth::new(),
            faults: Mutex::new(Faults::default()),
            close_watches: watch::channel(0).0,
            paused: watch::channel(false).0,
            bookmark_every: Duration::from_secs(1),
        });
        let s = state.clone();
        let acceptor = tls::pki().acceptor.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (s, acceptor) = (s.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await
                    else {
                        return;
                    };
                    let svc = service_fn(move |req| handle(s.clone(), req));
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        ApiServer { addr, state, task }
    }

    /// A kube client for this server as its administrator (`system:masters`),
    /// default namespace `default`.
    pub fn client(&self) -> kube::Client {
        self.client_with_token(ADMIN_TOKEN)
    }

    /// A kube client authenticating with `token`, default namespace `default`.
    pub fn client_with_token(&self, token: &str) -> kube::Client {
        client_for(self.addr, token)
    }

    /// A handle that issues ServiceAccount tokens and kubeconfigs, for the
    /// parts of a cluster that hand out credentials (a kubelet mounting tokens).
    pub fn issuer(&self) -> Issuer {
        Issuer { state: self.state.clone(), addr: self.addr }
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Writes `ca.crt` and a kubeconfig authenticating with `token`, default
    /// namespace `namespace`, into `dir`, for processes (kubectl, the
    /// `fulcrum` binary); returns the kubeconfig's path.
    pub fn write_kubeconfig(&self, dir: &std::path::Path, token: &str, namespace: &str) -> std::path::PathBuf {
        write_kubeconfig(self.addr, dir, token, namespace)
    }

    /// The administrator's bearer token, for kubeconfigs and kubectl.
    pub fn admin_token(&self) -> &'static str {
        ADMIN_TOKEN
    }

    /// A bearer token of the ServiceAccount `ns/name` (valid while the account exists).
    pub fn token_for(&self, ns: &str, name: &str) -> String {
        self.state.auth.token_for(ns, name)
    }

    /// Every request so far: identity, verb, resource, namespace, name, allowed.
    pub fn audit(&self) -> Vec<AuditEvent> {
        self.state.auth.audit()
    }

    /// The store, to inspect or change objects directly (as kubelet or a controller would).
    pub fn store(&self) -> &Store {
        &self.state.store
    }

    /// The registration of `plural` in `group`.
    pub fn resource(&self, group: &str, plural: &str) -> Resource {
        builtin(&self.state, group, plural)
    }

    /// The next `n` requests for `plural` fail with `code` (500 InternalError, 503, 429...).
    pub fn fail_next(&self, plural: &str, n: u32, code: u16) {
        self.state.faults.lock().unwrap_or_else(|p| p.into_inner()).fail.insert(plural.to_owned(), (n, code));
    }

    /// Ends every open watch, as an API server restart or a load balancer timeout would.
    pub fn close_watches(&self) {
        self.state.close_watches.send_modify(|n| *n += 1);
    }

    /// Holds every response until [`resume`](Self::resume).
    pub fn pause(&self) {
        self.state.paused.send_replace(true);
    }

    pub fn resume(&self) {
        self.state.paused.send_replace(false);
    }
}

/// Issues ServiceAccount tokens and kubeconfigs for a running [`ApiServer`].
#[derive(Clone)]
pub struct Issuer {
    state: Arc<State>,
    addr: SocketAddr,
}

impl Issuer {
    /// A bearer token of the ServiceAccount `ns/name` (valid while the account exists).
    pub fn token_for(&self, ns: &str, name: &str) -> String {
        self.state.auth.token_for(ns, name)
    }

    /// A kube client as the administrator.
    pub fn admin_client(&self) -> kube::Client {
        client_for(self.addr, ADMIN_TOKEN)
    }

    /// Writes `ca.crt` and a kubeconfig (see [`ApiServer::write_kubeconfig`]).
    pub fn write_kubeconfig(&self, dir: &std::path::Path, token: &str, namespace: &str) -> std::path::PathBuf {
        write_kubeconfig(self.addr, dir, token, namespace)
    }
}

fn client_for(addr: SocketAddr, token: &str) -> kube::Client {
    let mut config = kube::Config::new(format!("https://{addr}").parse().expect("server URL"));
    config.root_cert = Some(vec![tls::pki().ca_der.clone()]);
    config.default_namespace = "default".into();
    config.read_timeout = Some(Duration::from_secs(30));
    let bearer = http::HeaderValue::from_str(&format!("Bearer {token}")).expect("token header");
    config.headers.push((http::header::AUTHORIZATION, bearer));
    kube::Client::try_from(config).expect("kube client for the test API server")
}

fn write_kubeconfig(addr: SocketAddr, dir: &std::path::Path, token: &str, namespace: &str) -> std::path::PathBuf {
    let ca = dir.join("ca.crt");
    std::fs::write(&ca, &tls::pki().ca_pem).expect("write ca.crt");
    let path = dir.join(format!("kubeconfig-{:016x}-{namespace}", auth::digest(&token)));
    let text = format!(
        "apiVersion: v1\nkind: Config\n\
         clusters: [{{name: test, cluster: {{server: \"https://{addr}\", certificate-authority: \"{}\"}}}}]\n\
         users: [{{name: test, user: {{token: \"{token}\"}}}}]\n\
         contexts: [{{name: test, context: {{cluster: test, user: test, namespace: {namespace}}}}}]\n\
         current-context: test\n",
        ca.display(),
    );
    std::fs::write(&path, text).expect("write kubeconfig");
    path
}

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).map_err(|never| match never {}).boxed());
    *r.status_mut() = code;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), &e.to_status())
}

/// Where a request points.
struct Target {
    res: Resource,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .map(|q| {
            q.split('&')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (!k.is_empty()).then(|| (percent_decode(k), percent_decode(v)))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn route(state: &State, path: &str) -> Result<Target, ApiError> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!("the server could not find the requested resource ({path})"),
            ));
        }
    };
    // `/namespaces/{ns}/{plural}/...` is namespaced; `/namespaces/{name}` is the Namespace object itself.
    let (namespace, plural, more): (Option<String>, &str, &[&str]) = match rest {
        ["namespaces", ns, plural, more @ ..] => (Some((*ns).to_owned()), plural, more),
        [plural, more @ ..] => (None, plural, more),
        [] => return Err(ApiError::new(404, "NotFound", format!("no resource in {path}"))),
    };
    let res = state
        .resources
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
        .cloned()
        .ok_or_else(|| {
            ApiError::new(
                404,
                "NotFound",
                format!(
                    "the server could not find the requested resource: {group}/{version} {plural} is not registered"
                ),
            )
        })?;
    if res.namespaced && namespace.is_none() && !more.is_empty() {
        return Err(ApiError::new(
            404,
            "NotFound",
            format!("{plural} is namespaced: a named request needs /namespaces/{{ns}}/"),
        ));
    }
    if !res.namespaced && namespace.is_some() {
        return Err(ApiError::new(404, "NotFound", format!("{plural} is cluster-scoped")));
    }
    let name = more.first().map(|s| (*s).to_owned());
    let sub = more.get(1).map(|s| (*s).to_owned());
    if let Some(sub) = &sub {
        // A custom resource has the subresources its CRD declares, no others.
        let known = match (sub.as_str(), res.custom) {
            ("status", false) => res.status,
            ("scale", false) => res.scale,
            ("status" | "scale", true) => crd_subresource(state, &res, sub).is_some(),
            _ => false,
        };
        if !known {
            return Err(ApiError::new(404, "NotFound", format!("{plural} has no subresource {sub:?}")));
        }
    }
    if more.len() > 2 {
        return Err(ApiError::new(404, "NotFound", format!("unexpected path {path}")));
    }
    Ok(Target { res, namespace, name, sub })
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let mut paused = state.paused.subscribe();
    let _ = tokio::time::timeout(Duration::from_secs(60), paused.wait_for(|p| !*p)).await;
    let path = req.uri().path().to_owned();
    let resp = match path.as_str() {
        "/version" => json_response(
            StatusCode::OK,
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "linux/amd64"}),
        ),
        "/api" => json_response(StatusCode::OK, &registry::core_versions()),
        "/apis" => json_response(StatusCode::OK, &registry::groups(&served(&state))),
        "/openapi/v3" => json_response(StatusCode::OK, &registry::openapi_v3_root(&served(&state))),
        p if p.starts_with("/openapi/v3/") => {
            match registry::openapi_v3_doc(&served(&state), &p["/openapi/v3/".len()..]) {
                Some(doc) => json_response(StatusCode::OK, &doc),
                None => error_response(&ApiError::new(404, "NotFound", format!("{p} is not served"))),
            }
        }
        _ => {
            let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
            let discovery = match segs.as_slice() {
                ["api", v] => Some(registry::resource_list(&served(&state), "", v)),
                ["apis", g, v] => {
                    Some(registry::resource_list(&served(&state), g, v).map(|l| with_crd_names(&state, l)))
                }
                _ => None,
            };
            match discovery {
                Some(Some(list)) => json_response(StatusCode::OK, &list),
                Some(None) => error_response(&ApiError::new(404, "NotFound", format!("{path} is not served"))),
                None => match resource_request(&state, req, &path).await {
                    Ok(r) => r,
                    Err(e) => error_response(&e),
                },
            }
        }
    };
    Ok(resp)
}

/// The stored CustomResourceDefinition of a custom resource.
fn crd_of(state: &State, res: &Resource) -> Option<Value> {
    let crds = builtin(state, "apiextensions.k8s.io", "customresourcedefinitions");
    let (found, _) = state
        .store
        .list(&crds, None, |c| c["spec"]["group"] == res.group && c["spec"]["names"]["plural"] == res.plural);
    found.into_iter().next()
}

/// What a custom resource's CRD declares for subresource `sub` (`status`,
/// `scale`) in the resource's version, if it declares it.
fn crd_subresource(state: &State, res: &Resource, sub: &str) -> Option<Value> {
    let crd = crd_of(state, res)?;
    let version = crd["spec"]["versions"].as_array()?.iter().find(|v| v["name"] == res.version)?.clone();
    version["subresources"].get(sub).filter(|s| s.is_object()).cloned()
}

/// A discovery list with each custom resource's short names and categories
/// from its CRD, and the subresources the CRD declares.
fn with_crd_names(state: &State, mut list: Value) -> Value {
    let mut subresources = Vec::new();
    let entries = list["resources"].as_array_mut();
    for entry in entries.into_iter().flatten() {
        let Some(name) = entry["name"].as_str().map(str::to_owned) else { continue };
        let (plural, sub) = name.split_once('/').map_or((name.as_str(), None), |(p, s)| (p, Some(s)));
        let Some(res) = state.resources.iter().find(|r| r.custom && r.plural == plural) else { continue };
        match sub {
            None => {
                if let Some(crd) = crd_of(state, res) {
                    for key in ["shortNames", "categories"] {
                        if let Some(v) = crd["spec"]["names"].get(key) {
                            entry[key] = v.clone();
                        }
                    }
                }
                if crd_subresource(state, res, "scale").is_some() {
                    subresources.push(json!({"name": format!("{plural}/scale"), "singularName": "", "namespaced": res.namespaced, "group": "autoscaling", "version": "v1", "kind": "Scale", "verbs": ["get", "patch", "update"]}));
                }
            }
            // Listed from the registry; kept only if the CRD declares it.
            Some(sub) if crd_subresource(state, res, sub).is_none() => entry["name"] = Value::Null,
            Some(_) => {}
        }
    }
    if let Some(entries) = list["resources"].as_array_mut() {
        entries.retain(|e| !e["name"].is_null());
        entries.extend(subresources);
    }
    list
}

/// The resources served now: the built-in ones, and custom ones whose CRD is stored.
fn served(state: &State) -> Vec<Resource> {
    state.resources.iter().filter(|r| !r.custom || crd_of(state, r).is_some()).cloned().collect()
}

fn injected_fault(state: &State, plural: &str) -> Option<ApiError> {
    let mut faults = state.faults.lock().unwrap_or_else(|p| p.into_inner());
    let (left, code) = faults.fail.get_mut(plural)?;
    if *left == 0 {
        return None;
    }
    *left -= 1;
    let code = *code;
    let reason = match code {
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    };
    Some(ApiError::new(code, reason, format!("injected fault for {plural}")))
}

async fn resource_request(state: &Arc<State>, req: Request<Incoming>, path: &str) -> Result<Response<Body>, ApiError> {
    let t = route(state, path)?;
    if t.res.custom && crd_of(state, &t.res).is_none() {
        return Err(ApiError::new(404, "NotFound", "the server could not find the requested resource"));
    }
    let q = query(&req);
    let method = req.method().clone();
    let authorization = req.headers().get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let id = state.auth.authenticate(authorization, &state.store, &builtin(state, "", "serviceaccounts"))?;
    let attrs = attributes(&t, &method, &q);
    let allowed = rbac(state).allows(&id, &attrs);
    state.auth.record(&id, &attrs, allowed, q.get("labelSelector").cloned());
    if !allowed {
        return Err(auth::forbidden(&id, &attrs, None));
    }
    if let Some(e) = injected_fault(state, t.res.plural) {
        return Err(e);
    }
    // `kubectl get` asks for a server-side Table; custom resources get one from their CRD's printer columns.
    let table_crd = req
        .headers()
        .get(http::header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .filter(|a| a.contains("as=Table"))
        .and_then(|_| t.res.custom.then(|| crd_of(state, &t.res)).flatten());
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_owned();
    let body = req.into_body().collect().await.map_err(|e| ApiError::bad_request(e.to_string()))?.to_bytes();
    let ns = t.namespace.clone().unwrap_or_default();
    let store = &state.store;
    let res = &t.res;
    if t.sub.as_deref() == Some("scale") {
        return scale(state, &id, &t, &method, &body, &content_type, &q);
    }
    let status_sub = t.sub.as_deref() == Some("status");
    match (method, t.name.as_deref()) {
        (Method::GET, None) => {
            let labels = LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))?;
            let fields = FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str))?;
            if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
                return watch(state.clone(), res.clone(), t.namespace.clone(), labels, fields, &q);
            }
            let (items, rv) = store.list(res, t.namespace.as_deref(), |o| labels.matches(o) && fields.matches(o));
            // Pages: `limit` items from the position a `continue` token names.
            let start: usize = match q.get("continue").filter(|c| !c.is_empty()) {
                Some(c) => c.parse().map_err(|_| ApiError::bad_request(format!("invalid continue token {c:?}")))?,
                None => 0,
            };
            let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
            let total = items.len();
            let page: Vec<Value> = items.into_iter().skip(start).take(limit).collect();
            if let Some(crd) = &table_crd {
                return Ok(json_response(StatusCode::OK, &admission::table(crd, res.version, &page, &rv.to_string())));
            }
            let mut body = list_body(res, page, rv);
            if start.saturating_add(limit) < total {
                body["metadata"]["continue"] = json!((start + limit).to_string());
                body["metadata"]["remainingItemCount"] = json!(total - start - limit);
            }
            Ok(json_response(StatusCode::OK, &body))
        }
        (Method::GET, Some(name)) => {
            let obj = store.get(res, &ns, name)?;
            match &table_crd {
                Some(crd) => {
                    let rv = obj["metadata"]["resourceVersion"].as_str().unwrap_or_default().to_owned();
                    Ok(json_response(StatusCode::OK, &admission::table(crd, res.version, &[obj], &rv)))
                }
                None => Ok(json_response(StatusCode::OK, &obj)),
            }
        }
        (Method::POST, None) => {
            let obj: Value =
                serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))?;
            check_kind(res, &obj)?;
            let obj = admit(state, &id, res, &ns, obj, None, &q)?;
            Ok(json_response(StatusCode::CREATED, &store.create(res, &ns, obj)?))
        }
        (Method::PUT, Some(name)) => {
            let obj: Value =
                serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))?;
            check_kind(res, &obj)?;
            let old = store.get(res, &ns, name).ok();
            let obj = admit(state, &id, res, &ns, obj, old.as_ref(), &q)?;
            Ok(json_response(StatusCode::OK, &store.update(res, &ns, name, obj, status_sub)?))
        }
        (Method::PATCH, Some(name)) => {
            let ty = PatchType::from_content_type(&content_type)?;
            let patch = parse_body(&body, ty)?;
            if ty == PatchType::Apply {
                let manager = q.get("fieldManager").filter(|m| !m.is_empty()).ok_or_else(|| {
                    ApiError::invalid("PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch")
                })?;
                let force = q.get("force").is_some_and(|f| f == "true");
                check_kind(res, &patch)?;
                return match store.get(res, &ns, name) {
                    Ok(current) => {
                        let mut next = patch::server_side_apply(&current, &patch, manager, force)?;
                        if let Some(m) = next["metadata"].as_object_mut() {
                            // Apply is not conditional on the stored version.
                            m.remove("resourceVersion");
                        }
                        let next = admit(state, &id, res, &ns, next, Some(&current), &q)?;
                        Ok(json_response(StatusCode::OK, &store.update(res, &ns, name, next, status_sub)?))
                    }
                    Err(e) if e.code == 404 && !status_sub => {
                        // An apply that creates is authorized as a create too, as the real patch handler does.
                        let create = Attributes { verb: "create".into(), ..attrs.clone() };
                        let allowed = rbac(state).allows(&id, &create);
                        state.auth.record(&id, &create, allowed, None);
                        if !allowed {
                            return Err(auth::forbidden(&id, &create, None));
                        }
                        let mut fresh = patch::server_side_apply(&json!({"metadata": {}}), &patch, manager, force)?;
                        fresh["metadata"]["name"] = json!(name);
                        let fresh = admit(state, &id, res, &ns, fresh, None, &q)?;
                        Ok(json_response(StatusCode::CREATED, &store.create(res, &ns, fresh)?))
                    }
                    Err(e) => Err(e),
                };
            }
            let current = store.get(res, &ns, name)?;
            let mut next = patch::apply_patch(&current, ty, &patch)?;
            patch::release_changed_fields(&current, &mut next);
            // A patch is applied to the stored version; it is conditional only if it sets one.
            if patch["metadata"].get("resourceVersion").is_none()
                && let Some(m) = next["metadata"].as_object_mut()
            {
                m.remove("resourceVersion");
            }
            let next = admit(state, &id, res, &ns, next, Some(&current), &q)?;
            Ok(json_response(StatusCode::OK, &store.update(res, &ns, name, next, status_sub)?))
        }
        (Method::DELETE, Some(name)) => {
            let opts: Value =
                if body.is_empty() { json!({}) } else { serde_json::from_slice(&body).unwrap_or(json!({})) };
            let policy = q
                .get("propagationPolicy")
                .cloned()
                .or_else(|| opts["propagationPolicy"].as_str().map(str::to_owned))
                .unwrap_or_else(|| "Background".into());
            let propagation = match policy.as_str() {
                "Background" => Propagation::Background,
                "Foreground" => Propagation::Foreground,
                "Orphan" => Propagation::Orphan,
                other => {
                    return Err(ApiError::invalid(format!(
                        "propagationPolicy {other:?} is not one of Background, Foreground, Orphan"
                    )));
                }
            };
            // A pod bound to a node is deleted gracefully, as the real server
            // does: it stays, terminating, until its kubelet has stopped its
            // containers and deletes it with no grace.
            if res.group.is_empty() && res.plural == "pods" {
                let pod = store.get(res, &ns, name)?;
                let grace = q
                    .get("gracePeriodSeconds")
                    .and_then(|g| g.parse::<i64>().ok())
                    .or_else(|| opts["gracePeriodSeconds"].as_i64())
                    .or_else(|| pod["spec"]["terminationGracePeriodSeconds"].as_i64())
                    .unwrap_or(30);
                let bound = pod["spec"]["nodeName"].as_str().is_some_and(|n| !n.is_empty());
                let finished = matches!(pod["status"]["phase"].as_str(), Some("Succeeded" | "Failed"));
                if bound && !finished && grace > 0 {
                    return Ok(json_response(StatusCode::OK, &store.begin_graceful_delete(res, &ns, name, grace)?));
                }
            }
            let (obj, gone) = store.delete(res, &ns, name, propagation)?;
            if gone { Ok(json_response(StatusCode::OK, &obj)) } else { Ok(json_response(StatusCode::ACCEPTED, &obj)) }
        }
        (method, name) => Err(ApiError::unsupported(format!(
            "{method} on {path} ({}) is not supported by the test API server",
            if name.is_some() { "an object" } else { "a collection" }
        ))),
    }
}

/// A registered resource by group and plural.
fn builtin(state: &State, group: &str, plural: &str) -> Resource {
    state
        .resources
        .iter()
        .find(|r| r.group == group && r.plural == plural)
        .cloned()
        .unwrap_or_else(|| panic!("{group}/{plural} is not registered"))
}

fn rbac(state: &State) -> Rbac<'_> {
    let find = |plural: &str| {
        state
            .resources
            .iter()
            .find(|r| r.group == "rbac.authorization.k8s.io" && r.plural == plural)
            .unwrap_or_else(|| panic!("rbac.authorization.k8s.io/{plural} is not registered"))
    };
    Rbac {
        store: &state.store,
        roles: find("roles"),
        cluster_roles: find("clusterroles"),
        role_bindings: find("rolebindings"),
        cluster_role_bindings: find("clusterrolebindings"),
    }
}

/// The request in RBAC's terms. As the real request resolver does, a list or
/// watch with a `metadata.name` field selector names its object, so that
/// rules limited by `resourceNames` can allow it.
fn attributes(t: &Target, method: &Method, q: &HashMap<String, String>) -> Attributes {
    let watching = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    let verb = match (method, t.name.is_some()) {
        (&Method::GET, false) if watching => "watch",
        (&Method::GET, false) => "list",
        (&Method::GET, true) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, true) => "delete",
        (&Method::DELETE, false) => "deletecollection",
        (m, _) => m.as_str(),
    };
    let by_field = || {
        let fields = q.get("fieldSelector")?;
        fields.split(',').find_map(|f| f.trim().strip_prefix("metadata.name=")).map(str::to_owned)
    };
    let name = match verb {
        "list" | "watch" => by_field(),
        _ => t.name.clone(),
    };
    Attributes {
        verb: verb.to_owned(),
        group: t.res.group.to_owned(),
        resource: t.res.plural.to_owned(),
        subresource: t.sub.clone(),
        namespace: t.namespace.clone(),
        name,
    }
}

/// Admission of a write: a custom resource's schema, defaults and CEL rules;
/// RBAC's escalation prevention for roles and bindings. Returns the object as stored.
fn admit(
    state: &State,
    id: &Identity,
    res: &Resource,
    ns: &str,
    obj: Value,
    old: Option<&Value>,
    q: &HashMap<String, String>,
) -> Result<Value, ApiError> {
    if res.custom {
        let crd = crd_of(state, res)
            .ok_or_else(|| ApiError::new(404, "NotFound", "the server could not find the requested resource"))?;
        let strict = q.get("fieldValidation").is_some_and(|v| v == "Strict");
        return admission::admit(&crd, res.version, obj, old, strict);
    }
    escalation_check(state, id, res, ns, &obj)?;
    secret_check(res, &obj)?;
    Ok(obj)
}

/// The API server's validation of Secrets: data values are base64, and a
/// `kubernetes.io/tls` Secret has `tls.crt` and `tls.key`.
fn secret_check(res: &Resource, obj: &Value) -> Result<(), ApiError> {
    use base64::Engine as _;
    if res.kind != "Secret" {
        return Ok(());
    }
    for (key, value) in obj["data"].as_object().into_iter().flatten() {
        let decoded = value.as_str().map(|v| base64::engine::general_purpose::STANDARD.decode(v));
        if !matches!(decoded, Some(Ok(_))) {
            return Err(ApiError::invalid(format!("data[{key}]: Invalid value: illegal base64 data")));
        }
    }
    if obj["type"] == "kubernetes.io/tls" {
        for key in ["tls.crt", "tls.key"] {
            if obj["data"].get(key).is_none() {
                return Err(ApiError::invalid(format!("data[{key}]: Required value")));
            }
        }
    }
    Ok(())
}

/// RBAC's escalation prevention: a Role or binding may grant only what its writer holds.
fn escalation_check(state: &State, id: &Identity, res: &Resource, ns: &str, obj: &Value) -> Result<(), ApiError> {
    if res.group != "rbac.authorization.k8s.io" {
        return Ok(());
    }
    let rbac = rbac(state);
    let scope = (!ns.is_empty()).then_some(ns);
    let name = obj["metadata"]["name"].as_str().map(str::to_owned);
    let holds = |verb: &str, plural: &str, target: Option<String>| {
        let a = Attributes {
            verb: verb.into(),
            group: res.group.into(),
            resource: plural.into(),
            subresource: None,
            namespace: scope.map(str::to_owned),
            name: target,
        };
        rbac.allows(id, &a)
    };
    let attempt = |what: &str| {
        let a = Attributes {
            verb: "create".into(),
            group: res.group.into(),
            resource: res.plural.into(),
            subresource: None,
            namespace: scope.map(str::to_owned),
            name: name.clone(),
        };
        auth::forbidden(
            id,
            &a,
            Some(&format!(
                "user {:?} (groups={:?}) is attempting to grant RBAC permissions not currently held:\n{what}",
                id.user, id.groups
            )),
        )
    };
    match res.plural {
        "roles" | "clusterroles" => {
            if obj.get("aggregationRule").is_some_and(|a| !a.is_null()) {
                return Err(ApiError::invalid("aggregated ClusterRoles are not modelled by the test API server"));
            }
            if holds("escalate", res.plural, name.clone()) {
                return Ok(());
            }
            let rules = obj["rules"].as_array().cloned().unwrap_or_default();
            rbac.covers(id, scope, &rules).map_err(|missing| attempt(&missing))
        }
        "rolebindings" | "clusterrolebindings" => {
            let role_ref = &obj["roleRef"];
            let plural = match role_ref["kind"].as_str() {
                Some("ClusterRole") => "clusterroles",
                Some("Role") if scope.is_some() => "roles",
                other => return Err(ApiError::invalid(format!("roleRef.kind: Unsupported value: {other:?}"))),
            };
            let role_name = role_ref["name"].as_str().unwrap_or_default().to_owned();
            if holds("bind", plural, Some(role_name.clone())) {
                return Ok(());
            }
            let role = if plural == "roles" {
                state.store.get(rbac.roles, ns, &role_name)
            } else {
                state.store.get(rbac.cluster_roles, "", &role_name)
            };
            // As in a real cluster, a binding to a role that does not exist
            // (yet) needs `bind`: its rules cannot be checked.
            let role = role.map_err(|e| ApiError::bad_request(e.message))?;
            let rules = role["rules"].as_array().cloned().unwrap_or_default();
            rbac.covers(id, scope, &rules).map_err(|missing| attempt(&missing))
        }
        _ => Ok(()),
    }
}

fn check_kind(res: &Resource, obj: &Value) -> Result<(), ApiError> {
    if let Some(kind) = obj["kind"].as_str()
        && kind != res.kind
    {
        return Err(ApiError::bad_request(format!(
            "the body's kind {kind:?} does not match the URL's resource ({})",
            res.kind
        )));
    }
    Ok(())
}

/// Where a resource keeps what its `/scale` shows, as field paths.
struct ScalePaths {
    spec_replicas: Vec<String>,
    status_replicas: Vec<String>,
    /// A label selector in string form (custom resources), or `None` for a
    /// built-in workload, whose `spec.selector` is turned into one.
    selector: Option<Vec<String>>,
}

fn path_of(json_path: &str) -> Vec<String> {
    json_path.trim_start_matches('.').split('.').map(str::to_owned).collect()
}

fn scale_paths(state: &State, res: &Resource) -> Option<ScalePaths> {
    if !res.custom {
        return res.scale.then(|| ScalePaths {
            spec_replicas: path_of(".spec.replicas"),
            status_replicas: path_of(".status.replicas"),
            selector: None,
        });
    }
    let s = crd_subresource(state, res, "scale")?;
    Some(ScalePaths {
        spec_replicas: path_of(s["specReplicasPath"].as_str()?),
        status_replicas: path_of(s["statusReplicasPath"].as_str()?),
        selector: s["labelSelectorPath"].as_str().map(path_of),
    })
}

fn at<'v>(v: &'v Value, path: &[String]) -> &'v Value {
    path.iter().fold(v, |v, k| &v[k.as_str()])
}

/// `matchLabels` in the string form of a label selector.
fn selector_string(selector: &Value) -> Option<String> {
    let labels = selector["matchLabels"].as_object()?;
    Some(labels.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())).collect::<Vec<_>>().join(","))
}

/// `/scale`: GET, PUT and PATCH (merge, JSON or strategic, as `kubectl scale`
/// and autoscalers send them). The replica count is written to the object's
/// spec and admitted like any other write of it (a custom resource's schema
/// and CEL rules apply); a `resourceVersion` in the Scale is a precondition.
fn scale(
    state: &State,
    id: &Identity,
    t: &Target,
    method: &Method,
    body: &[u8],
    content_type: &str,
    q: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let ns = t.namespace.clone().unwrap_or_default();
    let name = t.name.as_deref().unwrap_or_default();
    let paths = scale_paths(state, &t.res)
        .ok_or_else(|| ApiError::new(404, "NotFound", format!("{} has no subresource \"scale\"", t.res.plural)))?;
    let obj = state.store.get(&t.res, &ns, name)?;
    let to_scale = |o: &Value| {
        let selector = match &paths.selector {
            Some(p) => at(o, p).as_str().map(str::to_owned),
            None => selector_string(&o["spec"]["selector"]),
        };
        let mut status = json!({"replicas": at(o, &paths.status_replicas).as_i64().unwrap_or(0)});
        if let Some(s) = selector {
            status["selector"] = json!(s);
        }
        json!({
            "kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {
                "name": name, "namespace": ns, "uid": o["metadata"]["uid"],
                "resourceVersion": o["metadata"]["resourceVersion"],
                "creationTimestamp": o["metadata"]["creationTimestamp"],
            },
            "spec": {"replicas": at(o, &paths.spec_replicas).as_i64().unwrap_or(0)},
            "status": status,
        })
    };
    let wanted: Value = match *method {
        Method::GET => return Ok(json_response(StatusCode::OK, &to_scale(&obj))),
        Method::PUT => serde_json::from_slice(body).map_err(|e| ApiError::bad_request(e.to_string()))?,
        Method::PATCH => {
            let ty = PatchType::from_content_type(content_type)?;
            if ty == PatchType::Apply {
                return Err(ApiError::unsupported("the test API server does not apply to /scale"));
            }
            patch::apply_patch(&to_scale(&obj), ty, &parse_body(body, ty)?)?
        }
        _ => return Err(ApiError::new(405, "MethodNotAllowed", format!("{method} is not supported on /scale"))),
    };
    if wanted["kind"] != "Scale" {
        return Err(ApiError::bad_request(format!("the body's kind {:?} is not Scale", wanted["kind"])));
    }
    let replicas = wanted["spec"]["replicas"].as_i64().unwrap_or(0);
    if replicas < 0 {
        return Err(ApiError::invalid(format!(
            "Scale.autoscaling \"{name}\" is invalid: spec.replicas: Invalid value: {replicas}: must be greater than or equal to 0"
        )));
    }
    let mut next = obj.clone();
    let (last, parents) =
        paths.spec_replicas.split_last().ok_or_else(|| ApiError::invalid("empty specReplicasPath"))?;
    let mut slot = &mut next;
    for k in parents {
        slot = &mut slot[k.as_str()];
    }
    slot[last.as_str()] = json!(replicas);
    // A PUT's resourceVersion is a precondition; a PATCH's is the current one.
    next["metadata"]["resourceVersion"] = match *method {
        Method::PUT => wanted["metadata"]["resourceVersion"].clone(),
        _ => obj["metadata"]["resourceVersion"].clone(),
    };
    if next["metadata"]["resourceVersion"].is_null()
        && let Some(m) = next["metadata"].as_object_mut()
    {
        m.remove("resourceVersion");
    }
    let next = admit(state, id, &t.res, &ns, next, Some(&obj), q)?;
    let updated = state.store.update(&t.res, &ns, name, next, false)?;
    Ok(json_response(StatusCode::OK, &to_scale(&updated)))
}

/// A watch: history after `resourceVersion`, then live events, BOOKMARKs when
/// allowed, until `timeoutSeconds`, a closed watch, or the client leaving.
fn watch(
    state: Arc<State>,
    res: Resource,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    q: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let initial = q.get("sendInitialEvents").is_some_and(|b| b == "true");
    let timeout =
        q.get("timeoutSeconds").and_then(|t| t.parse().ok()).map_or(Duration::from_secs(1800), Duration::from_secs);
    let from: u64 = match q.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => state.store.resource_version(),
        Some(rv) => rv.parse().map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?,
    };
    let keep = {
        let (labels, fields, namespace) = (labels.clone(), fields.clone(), namespace.clone());
        move |o: &Value| {
            namespace.as_deref().is_none_or(|ns| o["metadata"]["namespace"].as_str() == Some(ns))
                && labels.matches(o)
                && fields.matches(o)
        }
    };
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(256);
    let line = |kind: &str, object: &Value| {
        Ok(Frame::data(Bytes::from(format!("{}\n", json!({"type": kind, "object": object})))))
    };
    let subscription = if initial {
        let (items, rv) = state.store.list(&res, namespace.as_deref(), &keep);
        state.store.watch_from(&res, rv).map(|(past, live)| (Some((items, rv)), past, live))
    } else {
        state.store.watch_from(&res, from).map(|(past, live)| (None, past, live))
    };
    let (initial_items, past, mut live) = match subscription {
        Ok(s) => s,
        Err(gone) => {
            // As the real server does for a watch from a compacted version: one ERROR event.
            let status = gone.to_status();
            tokio::spawn(async move {
                let _ = tx.send(line("ERROR", &status)).await;
            });
            return Ok(streaming(rx));
        }
    };
    let mut closed = state.close_watches.subscribe();
    let key = (res.group.to_owned(), res.plural.to_owned());
    tokio::spawn(async move {
        let bookmark = |rv: u64, initial_end: bool| {
            let mut meta = json!({"resourceVersion": rv.to_string()});
            if initial_end {
                meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            }
            json!({"kind": res.kind, "apiVersion": res.api_version(), "metadata": meta})
        };
        if let Some((items, rv)) = initial_items {
            for o in items {
                if tx.send(line("ADDED", &o)).await.is_err() {
                    return;
                }
            }
            let _ = tx.send(line("BOOKMARK", &bookmark(rv, true))).await;
        }
        let mut last = from;
        for e in past {
            last = e.rv;
            if keep(&e.object) && tx.send(line(e.kind, &e.object)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + state.bookmark_every, state.bookmark_every);
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => return,
                _ = closed.changed() => return,
                _ = tick.tick(), if bookmarks => {
                    let rv = last.max(from);
                    if tx.send(line("BOOKMARK", &bookmark(rv, false))).await.is_err() {
                        return;
                    }
                }
                event = live.recv() => match event {
                    Ok(e) if e.rv > last => {
                        last = e.rv;
                        if e.res == key && keep(&e.object) && tx.send(line(e.kind, &e.object)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // Fell behind the broadcast buffer: end the watch; the client resumes from `last`.
                    Err(_) => return,
                },
            }
        }
    });
    Ok(streaming(rx))
}

fn streaming(rx: mpsc::Receiver<Result<Frame<Bytes>, Infallible>>) -> Response<Body> {
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    let mut r = Response::new(StreamBody::new(stream).boxed());
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}
