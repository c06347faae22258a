//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902), strategic
//! merge patch where it means the same as a merge patch, and server-side apply
//! with field ownership recorded in `managedFields`.
//!
//! Simplification, stated rather than hidden: apply tracks ownership down to
//! leaves and treats every list as atomic (owned and replaced whole), where
//! the real server merges lists that have merge keys (containers by name).
//! With one manager per list, as Fulcrum's operator uses it, the results agree.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

use super::status::ApiError;

/// A patch's type, from its content type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Merge,
    Json,
    Strategic,
    Apply,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> Result<Self, ApiError> {
        match ct.split(';').next().unwrap_or("").trim() {
            "application/merge-patch+json" => Ok(PatchType::Merge),
            "application/json-patch+json" => Ok(PatchType::Json),
            "application/strategic-merge-patch+json" => Ok(PatchType::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Ok(PatchType::Apply),
            other => Err(ApiError::unsupported_media(format!(
                "the body of the request was in an unknown format - accepted media types include: \
                 application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, \
                 application/strategic-merge-patch+json (got {other:?})"
            ))),
        }
    }
}

/// Parses a body as JSON, or YAML for apply.
pub fn parse_body(body: &[u8], ty: PatchType) -> Result<Value, ApiError> {
    match serde_json::from_slice(body) {
        Ok(v) => Ok(v),
        Err(e) if ty == PatchType::Apply => {
            let text = std::str::from_utf8(body).map_err(|_| ApiError::bad_request("body is not UTF-8"))?;
            serde_saphyr::from_str(text)
                .map_err(|y| ApiError::bad_request(format!("invalid apply body: {e}; as YAML: {y}")))
        }
        Err(e) => Err(ApiError::bad_request(format!("invalid patch body: {e}"))),
    }
}

/// Applies a merge, JSON or strategic merge patch to `current`.
pub fn apply_patch(current: &Value, ty: PatchType, patch: &Value) -> Result<Value, ApiError> {
    let mut doc = current.clone();
    match ty {
        PatchType::Merge => json_patch::merge(&mut doc, patch),
        PatchType::Json => {
            let p: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(&mut doc, &p).map_err(|e| ApiError::invalid(format!("JSON patch failed: {e}")))?;
        }
        PatchType::Strategic => {
            check_strategic(patch, "")?;
            json_patch::merge(&mut doc, patch);
        }
        PatchType::Apply => unreachable!("apply goes through `server_side_apply`"),
    }
    Ok(doc)
}

/// A strategic merge patch means the same as a merge patch only without
/// directives and without lists of objects (which the real server merges by key).
fn check_strategic(patch: &Value, path: &str) -> Result<(), ApiError> {
    match patch {
        Value::Object(m) => {
            for (k, v) in m {
                if k.starts_with('$') {
                    return Err(ApiError::invalid(format!(
                        "strategic merge patch directive {k:?} at {path:?} is not supported by the test API server; use apply or a JSON merge patch"
                    )));
                }
                check_strategic(v, &format!("{path}.{k}"))?;
            }
            Ok(())
        }
        Value::Array(items) if items.iter().any(Value::is_object) => Err(ApiError::invalid(format!(
            "strategic merge of the list of objects at {path:?} is not supported by the test API server (it merges by key); use apply or a JSON merge patch"
        ))),
        _ => Ok(()),
    }
}

/// Leaf paths of an applied configuration; lists and scalars are leaves.
fn leaves(v: &Value, prefix: &mut Vec<String>, out: &mut BTreeSet<Vec<String>>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                prefix.push(k.clone());
                leaves(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {
            out.insert(prefix.clone());
        }
    }
}

/// Fields of an apply configuration that count for ownership: not the
/// identity (apiVersion, kind, name, namespace) nor server-set metadata.
fn owned_fields(config: &Value) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    leaves(config, &mut Vec::new(), &mut out);
    out.retain(|p| {
        let s: Vec<&str> = p.iter().map(String::as_str).collect();
        !matches!(
            s.as_slice(),
            ["apiVersion"]
                | ["kind"]
                | ["metadata", "name"]
                | ["metadata", "namespace"]
                | ["metadata", "resourceVersion"]
                | ["metadata", "managedFields", ..]
                | ["metadata", "uid"]
                | ["metadata", "creationTimestamp"]
                | ["metadata", "generation"]
        )
    });
    out
}

fn get_path<'v>(v: &'v Value, path: &[String]) -> Option<&'v Value> {
    path.iter().try_fold(v, |cur, k| cur.get(k))
}

fn remove_path(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else { return };
    let mut cur = v;
    for k in parents {
        match cur.get_mut(k) {
            Some(next) => cur = next,
            None => return,
        }
    }
    if let Some(m) = cur.as_object_mut() {
        m.remove(last);
    }
}

/// Merges maps recursively; lists and scalars in `config` replace.
fn deep_merge(base: &mut Value, config: &Value) {
    match (base, config) {
        (Value::Object(b), Value::Object(c)) => {
            for (k, v) in c {
                match b.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => deep_merge(existing, v),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, c) => *b = c.clone(),
    }
}

/// `fieldsV1` of a set of paths: `{"f:spec": {"f:replicas": {}}}`.
fn fields_v1(paths: &BTreeSet<Vec<String>>) -> Value {
    let mut root = Map::new();
    for p in paths {
        let mut cur = &mut root;
        for k in p {
            let entry = cur.entry(format!("f:{k}")).or_insert_with(|| json!({}));
            cur = match entry.as_object_mut() {
                Some(m) => m,
                None => break,
            };
        }
    }
    Value::Object(root)
}

fn paths_of_fields_v1(v: &Value, prefix: &mut Vec<String>, out: &mut BTreeSet<Vec<String>>) {
    let Some(m) = v.as_object() else { return };
    if m.is_empty() && !prefix.is_empty() {
        out.insert(prefix.clone());
        return;
    }
    for (k, child) in m {
        if let Some(name) = k.strip_prefix("f:") {
            prefix.push(name.to_owned());
            paths_of_fields_v1(child, prefix, out);
            prefix.pop();
        }
    }
}

/// Who owns what, from `metadata.managedFields` (apply entries only).
fn ownership(obj: &Value) -> BTreeMap<String, BTreeSet<Vec<String>>> {
    let mut out = BTreeMap::new();
    for entry in obj["metadata"]["managedFields"].as_array().into_iter().flatten() {
        if entry["operation"] != "Apply" {
            continue;
        }
        let Some(manager) = entry["manager"].as_str() else { continue };
        let mut paths = BTreeSet::new();
        paths_of_fields_v1(&entry["fieldsV1"], &mut Vec::new(), &mut paths);
        out.insert(manager.to_owned(), paths);
    }
    out
}

fn managed_fields(api_version: &str, owners: &BTreeMap<String, BTreeSet<Vec<String>>>) -> Value {
    let entries: Vec<Value> = owners
        .iter()
        .filter(|(_, p)| !p.is_empty())
        .map(|(manager, paths)| {
            json!({
                "manager": manager,
                "operation": "Apply",
                "apiVersion": api_version,
                "fieldsType": "FieldsV1",
                "fieldsV1": fields_v1(paths),
            })
        })
        .collect();
    json!(entries)
}

/// After a write that is not an apply (update, merge, JSON or strategic
/// patch): the writer takes the fields it changed, so appliers no longer own
/// them, as the real server does. This is how one manager can clear fields
/// another applied (a lease released by a standby).
pub fn release_changed_fields(before: &Value, after: &mut Value) {
    let mut owners = ownership(before);
    if owners.is_empty() {
        return;
    }
    for paths in owners.values_mut() {
        paths.retain(|p| get_path(before, p) == get_path(after, p));
    }
    let api_version = before["apiVersion"].as_str().unwrap_or("v1").to_owned();
    after["metadata"]["managedFields"] = managed_fields(&api_version, &owners);
}

/// Server-side apply of `config` by `manager` over `current` (an empty object
/// when creating). Conflicts with other managers' fields are a 409 unless `force`.
pub fn server_side_apply(current: &Value, config: &Value, manager: &str, force: bool) -> Result<Value, ApiError> {
    if !config.is_object() {
        return Err(ApiError::bad_request("an apply configuration must be an object"));
    }
    let mut owners = ownership(current);
    let applied = owned_fields(config);
    let mut conflicts = Vec::new();
    for (other, paths) in owners.iter_mut().filter(|(m, _)| m.as_str() != manager) {
        let taken: Vec<Vec<String>> = paths
            .iter()
            .filter(|p| applied.contains(*p) && get_path(current, p) != get_path(config, p))
            .cloned()
            .collect();
        if !taken.is_empty() && !force {
            conflicts.extend(taken.iter().map(|p| format!("conflict with {other:?}: .{}", p.join("."))));
        } else {
            for p in taken {
                paths.remove(&p);
            }
        }
    }
    if !conflicts.is_empty() {
        let mut e = ApiError::new(
            409,
            "Conflict",
            format!("Apply failed with {} conflicts: {}", conflicts.len(), conflicts.join("; ")),
        );
        e.details = Some(
            json!({"causes": conflicts.iter().map(|c| json!({"reason": "FieldManagerConflict", "message": c})).collect::<Vec<_>>()}),
        );
        return Err(e);
    }
    let mut result = current.clone();
    // Fields this manager applied before and leaves out now are removed,
    // unless another manager also owns them.
    let previous = owners.get(manager).cloned().unwrap_or_default();
    for p in previous.difference(&applied) {
        let shared = owners.iter().any(|(m, paths)| m != manager && paths.contains(p));
        if !shared {
            remove_path(&mut result, p);
        }
    }
    let mut config = config.clone();
    if let Some(m) = config.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("managedFields");
        m.remove("resourceVersion");
    }
    deep_merge(&mut result, &config);
    owners.insert(manager.to_owned(), applied);
    let api_version = config["apiVersion"].as_str().unwrap_or("v1").to_owned();
    result["metadata"]["managedFields"] = managed_fields(&api_version, &owners);
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_removes_what_the_manager_stopped_applying_and_keeps_others_fields() {
        let a1 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "labels": {"x": "1", "y": "1"}}, "data": {"a": "1"}});
        let obj = server_side_apply(&json!({"metadata": {}}), &a1, "op", false).unwrap();
        let obj = server_side_apply(&obj, &json!({"metadata": {"labels": {"z": "1"}}}), "other", false).unwrap();
        let a2 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "labels": {"x": "1"}}, "data": {"a": "2"}});
        let obj = server_side_apply(&obj, &a2, "op", false).unwrap();
        assert_eq!(obj["metadata"]["labels"], json!({"x": "1", "z": "1"}));
        assert_eq!(obj["data"], json!({"a": "2"}));
        let managers: Vec<&str> = obj["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["manager"].as_str().unwrap())
            .collect();
        assert_eq!(managers, ["op", "other"]);
    }

    #[test]
    fn a_conflicting_field_needs_force() {
        let obj = server_side_apply(&json!({"metadata": {}}), &json!({"spec": {"replicas": 3}}), "a", false).unwrap();
        let err = server_side_apply(&obj, &json!({"spec": {"replicas": 5}}), "b", false).unwrap_err();
        assert_eq!((err.code, err.reason), (409, "Conflict"));
        // The same value is shared ownership, not a conflict.
        assert!(server_side_apply(&obj, &json!({"spec": {"replicas": 3}}), "b", false).is_ok());
        let forced = server_side_apply(&obj, &json!({"spec": {"replicas": 5}}), "b", true).unwrap();
        assert_eq!(forced["spec"]["replicas"], 5);
        assert_eq!(ownership(&forced)["b"].len(), 1);
        assert!(!ownership(&forced).contains_key("a"), "a lost its only field");
    }

    #[test]
    fn a_plain_update_takes_the_fields_it_changes_from_appliers() {
        let obj =
            server_side_apply(&json!({"metadata": {}}), &json!({"spec": {"holder": "a", "duration": 2}}), "a", false)
                .unwrap();
        let mut cleared = apply_patch(&obj, PatchType::Merge, &json!({"spec": {"holder": null}})).unwrap();
        release_changed_fields(&obj, &mut cleared);
        assert_eq!(ownership(&cleared)["a"].len(), 1, "a keeps only spec.duration");
        // Now another manager applies the field without a conflict.
        assert!(server_side_apply(&cleared, &json!({"spec": {"holder": "b"}}), "b", false).is_ok());
    }

    #[test]
    fn strategic_directives_and_object_lists_are_refused() {
        assert_eq!(apply_patch(&json!({}), PatchType::Strategic, &json!({"$patch": "delete"})).unwrap_err().code, 422);
        let p = json!({"spec": {"containers": [{"name": "a"}]}});
        assert_eq!(apply_patch(&json!({}), PatchType::Strategic, &p).unwrap_err().code, 422);
        let ok = apply_patch(&json!({"a": 1}), PatchType::Strategic, &json!({"b": [1, 2]})).unwrap();
        assert_eq!(ok, json!({"a": 1, "b": [1, 2]}));
    }
}
