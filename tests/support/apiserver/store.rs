//! The object store: every object of every registered resource as JSON, one
//! resourceVersion counter, a bounded event history for watch resumption, and
//! the semantics of the real server's writes (optimistic concurrency,
//! generation, status subresource, finalizers, owner-reference garbage
//! collection).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Mutex;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::registry::Resource;
use super::status::ApiError;

/// Events kept for watches that resume from an older resourceVersion.
pub const HISTORY: usize = 2000;

/// (group, plural)
pub type ResKey = (String, String);

fn res_key(r: &Resource) -> ResKey {
    (r.group.to_owned(), r.plural.to_owned())
}

/// A change, as a watch reports it.
#[derive(Clone, Debug)]
pub struct Event {
    pub rv: u64,
    pub kind: &'static str,
    pub res: ResKey,
    pub object: Value,
}

/// How a delete treats dependents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Propagation {
    Background,
    Foreground,
    Orphan,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    /// (group, plural, namespace, name) → object
    objects: BTreeMap<(String, String, String, String), Value>,
    history: VecDeque<Event>,
    /// Events at or below this resourceVersion can no longer be replayed.
    compacted: u64,
    next_uid: u64,
}

/// The store. Every method takes the one lock for its whole operation, and
/// events are broadcast under it, so watchers see them in order.
pub struct Store {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Event>,
}

fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn meta(obj: &Value, key: &str) -> Option<String> {
    obj["metadata"][key].as_str().map(str::to_owned)
}

/// The parts of an object that make up its spec: everything but metadata and status.
fn spec_part(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
        m.remove("apiVersion");
        m.remove("kind");
    }
    v
}

impl Store {
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(4096);
        Store { inner: Mutex::new(Inner { rv: 1, ..Inner::default() }), events }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Subscribes to events after `from`, with the history since then:
    /// `Err` (410) when `from` is older than the history reaches.
    pub fn watch_from(&self, res: &Resource, from: u64) -> Result<(Vec<Event>, broadcast::Receiver<Event>), ApiError> {
        let inner = self.lock();
        if from < inner.compacted {
            return Err(ApiError::expired(format!("too old resource version: {from} ({})", inner.compacted + 1)));
        }
        let key = res_key(res);
        let past = inner.history.iter().filter(|e| e.rv > from && e.res == key).cloned().collect();
        Ok((past, self.events.subscribe()))
    }

    /// Drops history so that watches from before `rv` get 410 Gone (for tests).
    pub fn compact(&self, rv: u64) {
        let mut inner = self.lock();
        inner.history.retain(|e| e.rv > rv);
        inner.compacted = inner.compacted.max(rv);
    }

    fn record(&self, inner: &mut Inner, kind: &'static str, res: ResKey, object: Value) {
        let rv = inner.rv;
        let event = Event { rv, kind, res, object };
        inner.history.push_back(event.clone());
        while inner.history.len() > HISTORY {
            if let Some(old) = inner.history.pop_front() {
                inner.compacted = old.rv;
            }
        }
        let _ = self.events.send(event);
    }

    fn bump(inner: &mut Inner) -> u64 {
        inner.rv += 1;
        inner.rv
    }

    pub fn get(&self, res: &Resource, ns: &str, name: &str) -> Result<Value, ApiError> {
        let inner = self.lock();
        inner
            .objects
            .get(&(res.group.to_owned(), res.plural.to_owned(), ns.to_owned(), name.to_owned()))
            .cloned()
            .ok_or_else(|| ApiError::not_found(res.kind, res.plural, name))
    }

    /// Objects in `ns` (all namespaces when `None`), sorted by namespace and name, with the list's resourceVersion.
    pub fn list(&self, res: &Resource, ns: Option<&str>, keep: impl Fn(&Value) -> bool) -> (Vec<Value>, u64) {
        let inner = self.lock();
        let items = inner
            .objects
            .iter()
            .filter(|((g, p, n, _), _)| g == res.group && p == res.plural && ns.is_none_or(|ns| ns == n))
            .map(|(_, v)| v)
            .filter(|v| keep(v))
            .cloned()
            .collect();
        (items, inner.rv)
    }

    /// Creates an object; fills the server-set metadata.
    pub fn create(&self, res: &Resource, ns: &str, mut obj: Value) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        let name = match meta(&obj, "name").filter(|n| !n.is_empty()) {
            Some(n) => n,
            None => match meta(&obj, "generateName") {
                Some(prefix) => {
                    inner.next_uid += 1;
                    format!("{prefix}{:05x}", (inner.next_uid * 7919) % 0xfffff)
                }
                None => return Err(ApiError::invalid(format!("{} in body: metadata.name: Required value", res.kind))),
            },
        };
        if let Some(body_ns) = meta(&obj, "namespace")
            && res.namespaced
            && body_ns != ns
        {
            return Err(ApiError::bad_request(format!(
                "the namespace of the provided object ({body_ns}) does not match the namespace sent on the request ({ns})"
            )));
        }
        let key = (res.group.to_owned(), res.plural.to_owned(), ns.to_owned(), name.clone());
        if inner.objects.contains_key(&key) {
            return Err(ApiError::already_exists(res.plural, &name));
        }
        inner.next_uid += 1;
        let uid = format!("00000000-0000-4000-8000-{:012x}", inner.next_uid);
        let rv = Self::bump(&mut inner);
        obj["apiVersion"] = json!(res.api_version());
        obj["kind"] = json!(res.kind);
        let m = obj["metadata"].as_object_mut().ok_or_else(|| ApiError::bad_request("metadata must be an object"))?;
        m.insert("name".into(), json!(name));
        if res.namespaced {
            m.insert("namespace".into(), json!(ns));
        } else {
            m.remove("namespace");
        }
        m.insert("uid".into(), json!(uid));
        m.insert("resourceVersion".into(), json!(rv.to_string()));
        m.insert("generation".into(), json!(1));
        m.insert("creationTimestamp".into(), json!(now_rfc3339()));
        m.remove("deletionTimestamp");
        inner.objects.insert(key, obj.clone());
        self.record(&mut inner, "ADDED", res_key(res), obj.clone());
        // The garbage collector also finds objects created for an owner that is already gone.
        self.collect_garbage(&mut inner);
        Ok(obj)
    }

    /// Replaces an object (`status = true`: its status subresource).
    ///
    /// A stale `metadata.resourceVersion` is a 409 Conflict; none means
    /// "unconditional". With a status subresource, a write of the main
    /// resource keeps the stored status and a status write keeps everything
    /// else. A change of the spec bumps `metadata.generation`.
    pub fn update(&self, res: &Resource, ns: &str, name: &str, new: Value, status: bool) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        self.update_locked(&mut inner, res, ns, name, new, status)
    }

    fn update_locked(
        &self,
        inner: &mut Inner,
        res: &Resource,
        ns: &str,
        name: &str,
        mut new: Value,
        status: bool,
    ) -> Result<Value, ApiError> {
        let key = (res.group.to_owned(), res.plural.to_owned(), ns.to_owned(), name.to_owned());
        let Some(old) = inner.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(res.kind, res.plural, name));
        };
        if !new.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        if let Some(body_name) = meta(&new, "name")
            && body_name != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        if let Some(rv) = meta(&new, "resourceVersion").filter(|r| !r.is_empty())
            && Some(&rv) != meta(&old, "resourceVersion").as_ref()
        {
            return Err(ApiError::conflict(
                res.plural,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        let mut merged = if status {
            // Only the status changes.
            let mut o = old.clone();
            match new.get("status") {
                Some(s) => o["status"] = s.clone(),
                None => {
                    if let Some(m) = o.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            o
        } else {
            if res.status {
                match old.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        if let Some(m) = new.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
            }
            new
        };
        // Server-owned metadata never changes through a write.
        let rv = Self::bump(inner);
        let changed = spec_part(&old) != spec_part(&merged);
        {
            let old_meta = old["metadata"].as_object().cloned().unwrap_or_default();
            merged["apiVersion"] = json!(res.api_version());
            merged["kind"] = json!(res.kind);
            if !merged["metadata"].is_object() {
                merged["metadata"] = json!({});
            }
            let m = merged["metadata"].as_object_mut().ok_or_else(|| ApiError::bad_request("metadata"))?;
            for k in ["name", "namespace", "uid", "creationTimestamp", "deletionTimestamp", "generateName"] {
                match old_meta.get(k) {
                    Some(v) => m.insert(k.into(), v.clone()),
                    None => m.remove(k),
                };
            }
            if status {
                // A status write leaves metadata alone.
                *m = old_meta.clone();
            }
            let generation = old_meta.get("generation").and_then(Value::as_i64).unwrap_or(1);
            m.insert("generation".into(), json!(if changed && !status { generation + 1 } else { generation }));
            m.insert("resourceVersion".into(), json!(rv.to_string()));
        }
        // A write that changes nothing is a no-op: same resourceVersion, no event.
        let unchanged = {
            let strip = |o: &Value| {
                let mut o = o.clone();
                if let Some(m) = o["metadata"].as_object_mut() {
                    m.remove("resourceVersion");
                }
                o
            };
            strip(&old) == strip(&merged)
        };
        if unchanged {
            inner.rv -= 1;
            return Ok(old);
        }
        // An object being deleted goes once its last finalizer is removed.
        let deleting = merged["metadata"].get("deletionTimestamp").is_some();
        let finalizers_left = merged["metadata"]["finalizers"].as_array().is_some_and(|f| !f.is_empty());
        if deleting && !finalizers_left {
            inner.objects.remove(&key);
            self.record(inner, "DELETED", res_key(res), merged.clone());
            self.collect_garbage(inner);
            return Ok(merged);
        }
        inner.objects.insert(key, merged.clone());
        self.record(inner, "MODIFIED", res_key(res), merged.clone());
        self.collect_garbage(inner);
        Ok(merged)
    }

    /// Starts a graceful deletion: the object stays, with a `deletionTimestamp`
    /// `grace` from now and `deletionGracePeriodSeconds`, until whoever runs it
    /// (the kubelet, for a pod) deletes it again with no grace.
    pub fn begin_graceful_delete(&self, res: &Resource, ns: &str, name: &str, grace: i64) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let key = (res.group.to_owned(), res.plural.to_owned(), ns.to_owned(), name.to_owned());
        let Some(mut obj) = inner.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(res.kind, res.plural, name));
        };
        if obj["metadata"].get("deletionTimestamp").is_some() {
            return Ok(obj);
        }
        let rv = Self::bump(&mut inner);
        let at = k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_secs(grace);
        obj["metadata"]["deletionTimestamp"] = json!(at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string());
        obj["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        inner.objects.insert(key, obj.clone());
        self.record(&mut inner, "MODIFIED", res_key(res), obj.clone());
        Ok(obj)
    }

    /// Deletes an object, honouring finalizers and propagating to dependents.
    /// Returns the object as it was at deletion (or as it is now, being deleted).
    pub fn delete(
        &self,
        res: &Resource,
        ns: &str,
        name: &str,
        propagation: Propagation,
    ) -> Result<(Value, bool), ApiError> {
        let mut inner = self.lock();
        let key = (res.group.to_owned(), res.plural.to_owned(), ns.to_owned(), name.to_owned());
        let Some(mut obj) = inner.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(res.kind, res.plural, name));
        };
        let uid = meta(&obj, "uid").unwrap_or_default();
        if propagation == Propagation::Orphan {
            self.orphan_dependents(&mut inner, &uid);
        }
        let mut finalizers: Vec<Value> = obj["metadata"]["finalizers"].as_array().cloned().unwrap_or_default();
        if propagation == Propagation::Foreground
            && self.has_dependents(&inner, &uid)
            && !finalizers.iter().any(|f| f == "foregroundDeletion")
        {
            finalizers.push(json!("foregroundDeletion"));
        }
        if !finalizers.is_empty() {
            if obj["metadata"].get("deletionTimestamp").is_none() {
                let rv = Self::bump(&mut inner);
                obj["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
                obj["metadata"]["finalizers"] = json!(finalizers);
                obj["metadata"]["resourceVersion"] = json!(rv.to_string());
                inner.objects.insert(key, obj.clone());
                self.record(&mut inner, "MODIFIED", res_key(res), obj.clone());
            }
            if propagation == Propagation::Foreground {
                self.delete_dependents(&mut inner, &uid);
                self.collect_garbage(&mut inner);
                let gone = !inner.objects.contains_key(&(
                    res.group.to_owned(),
                    res.plural.to_owned(),
                    ns.to_owned(),
                    name.to_owned(),
                ));
                return Ok((obj, gone));
            }
            return Ok((obj, false));
        }
        let rv = Self::bump(&mut inner);
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        inner.objects.remove(&key);
        self.record(&mut inner, "DELETED", res_key(res), obj.clone());
        self.collect_garbage(&mut inner);
        Ok((obj, true))
    }

    fn has_dependents(&self, inner: &Inner, uid: &str) -> bool {
        inner.objects.values().any(|o| owner_uids(o).iter().any(|u| u == uid))
    }

    /// Keys of the objects that `uid` owns.
    fn dependents(inner: &Inner, uid: &str) -> Vec<(String, String, String, String)> {
        inner.objects.iter().filter(|(_, o)| owner_uids(o).iter().any(|u| u == uid)).map(|(k, _)| k.clone()).collect()
    }

    fn orphan_dependents(&self, inner: &mut Inner, uid: &str) {
        for k in Self::dependents(inner, uid) {
            let rv = Self::bump(inner);
            let Some(o) = inner.objects.get_mut(&k) else { continue };
            if let Some(refs) = o["metadata"]["ownerReferences"].as_array_mut() {
                refs.retain(|r| r["uid"].as_str() != Some(uid));
            }
            o["metadata"]["resourceVersion"] = json!(rv.to_string());
            let o = o.clone();
            self.record(inner, "MODIFIED", (k.0.clone(), k.1.clone()), o);
        }
    }

    /// Starts deleting the dependents of `uid` (foreground deletion of their owner).
    fn delete_dependents(&self, inner: &mut Inner, uid: &str) {
        for k in Self::dependents(inner, uid) {
            self.remove_or_mark(inner, &k);
        }
    }

    /// Deletes the object at `k`, or marks it deleted if it has finalizers.
    fn remove_or_mark(&self, inner: &mut Inner, k: &(String, String, String, String)) {
        let Some(mut o) = inner.objects.get(k).cloned() else { return };
        let rv = Self::bump(inner);
        o["metadata"]["resourceVersion"] = json!(rv.to_string());
        let has_finalizers = o["metadata"]["finalizers"].as_array().is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if o["metadata"].get("deletionTimestamp").is_none() {
                o["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
                inner.objects.insert(k.clone(), o.clone());
                self.record(inner, "MODIFIED", (k.0.clone(), k.1.clone()), o);
            }
        } else {
            inner.objects.remove(k);
            self.record(inner, "DELETED", (k.0.clone(), k.1.clone()), o);
        }
    }

    /// The garbage collector, run after every deletion until nothing changes:
    /// an object all of whose owners are gone is deleted; an owner waiting in
    /// foreground deletion goes once its dependents are gone.
    fn collect_garbage(&self, inner: &mut Inner) {
        for _ in 0..1000 {
            let uids: HashSet<String> = inner.objects.values().filter_map(|o| meta(o, "uid")).collect();
            let orphaned: Vec<_> = inner
                .objects
                .iter()
                .filter(|(_, o)| {
                    let owners = owner_uids(o);
                    !owners.is_empty()
                        && owners.iter().all(|u| !uids.contains(u))
                        && o["metadata"].get("deletionTimestamp").is_none()
                })
                .map(|(k, _)| k.clone())
                .collect();
            let waiting: Vec<_> = inner
                .objects
                .iter()
                .filter(|(_, o)| {
                    o["metadata"]["finalizers"].as_array().is_some_and(|f| f.iter().any(|x| x == "foregroundDeletion"))
                        && !inner.objects.values().any(|d| owner_uids(d).contains(&meta(o, "uid").unwrap_or_default()))
                })
                .map(|(k, _)| k.clone())
                .collect();
            if orphaned.is_empty() && waiting.is_empty() {
                return;
            }
            for k in orphaned {
                self.remove_or_mark(inner, &k);
            }
            for k in waiting {
                let Some(mut o) = inner.objects.get(&k).cloned() else { continue };
                if let Some(f) = o["metadata"]["finalizers"].as_array_mut() {
                    f.retain(|x| x != "foregroundDeletion");
                }
                let rv = Self::bump(inner);
                o["metadata"]["resourceVersion"] = json!(rv.to_string());
                if o["metadata"]["finalizers"].as_array().is_some_and(|f| !f.is_empty()) {
                    inner.objects.insert(k.clone(), o.clone());
                    self.record(inner, "MODIFIED", (k.0.clone(), k.1.clone()), o);
                } else {
                    inner.objects.remove(&k);
                    self.record(inner, "DELETED", (k.0.clone(), k.1.clone()), o);
                }
            }
        }
    }

    /// Every object, for inspection by tests.
    pub fn dump(&self) -> Vec<Value> {
        self.lock().objects.values().cloned().collect()
    }
}

fn owner_uids(o: &Value) -> Vec<String> {
    o["metadata"]["ownerReferences"]
        .as_array()
        .map(|refs| refs.iter().filter_map(|r| r["uid"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// A list response.
pub fn list_body(res: &Resource, items: Vec<Value>, rv: u64) -> Value {
    json!({
        "kind": res.list_kind(),
        "apiVersion": res.api_version(),
        "metadata": {"resourceVersion": rv.to_string()},
        "items": items,
    })
}
