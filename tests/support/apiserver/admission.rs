//! Admission of custom resources, as the real API server does it for an
//! object whose CustomResourceDefinition is installed: unknown fields pruned
//! (or refused under `fieldValidation=Strict`, as kubectl asks), schema
//! defaults applied, the structural schema validated (types, formats,
//! `nullable`, enums, ranges, lengths, patterns, `required`, items, maps,
//! int-or-string) and the CEL rules evaluated, transition rules against the
//! stored object included (kube's CEL support, on the server side). A
//! refused object gets the real `422 Invalid` Status, field paths in its causes.

use regex::Regex;
use serde_json::{Value, json};

use super::status::ApiError;

/// The `openAPIV3Schema` of `version` in a stored CRD.
pub fn schema_of<'a>(crd: &'a Value, version: &str) -> Option<&'a Value> {
    crd["spec"]["versions"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == version && v["served"] != false)
        .map(|v| &v["schema"]["openAPIV3Schema"])
}

/// One field error, as the API server words them.
struct FieldError {
    field: String,
    reason: &'static str,
    message: String,
}

impl FieldError {
    fn invalid(field: &str, value: &Value, detail: String) -> FieldError {
        FieldError {
            field: field.to_owned(),
            reason: "FieldValueInvalid",
            message: format!("Invalid value: {}: {detail}", shown(value)),
        }
    }
}

/// A value as the API server quotes it in messages.
fn shown(v: &Value) -> String {
    match v {
        Value::Object(_) => "\"object\"".into(),
        Value::Array(_) => "\"array\"".into(),
        other => other.to_string(),
    }
}

/// Admits `obj` for the CRD: returns it pruned and defaulted, or the error.
/// `old` is the stored object on an update, for transition rules.
pub fn admit(crd: &Value, version: &str, obj: Value, old: Option<&Value>, strict: bool) -> Result<Value, ApiError> {
    let kind = crd["spec"]["names"]["kind"].as_str().unwrap_or_default();
    let group = crd["spec"]["group"].as_str().unwrap_or_default();
    let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    let schema = schema_of(crd, version)
        .ok_or_else(|| ApiError::new(404, "NotFound", format!("{kind} version {version} is not served")))?;
    let mut obj = obj;
    let mut unknown = Vec::new();
    prune(schema, &mut obj, "", true, &mut unknown);
    if strict && !unknown.is_empty() {
        let list: Vec<String> = unknown.iter().map(|f| format!("unknown field \"{f}\"")).collect();
        return Err(ApiError::bad_request(format!("strict decoding error: {}", list.join(", "))));
    }
    let obj = kube::core::cel::apply_defaults(schema, &obj);
    let mut errors = Vec::new();
    for key in ["spec", "status"] {
        if let (Some(s), Some(v)) = (schema["properties"].get(key), obj.get(key)) {
            validate(s, v, key, &mut errors);
        }
    }
    if let Some(required) = schema["required"].as_array() {
        for r in required.iter().filter_map(Value::as_str) {
            if obj.get(r).is_none_or(Value::is_null) {
                errors.push(FieldError {
                    field: r.to_owned(),
                    reason: "FieldValueRequired",
                    message: "Required value".into(),
                });
            }
        }
    }
    if errors.is_empty()
        && let Err(failed) = kube::core::cel::Validator::new().validate(schema, &obj, old)
    {
        for e in failed.into_vec() {
            let value = lookup(&obj, &e.field_path);
            errors.push(FieldError::invalid(&e.field_path, value.unwrap_or(&Value::Null), e.message));
        }
    }
    if errors.is_empty() {
        return Ok(obj);
    }
    let lines: Vec<String> = errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect();
    let all = if lines.len() == 1 { lines[0].clone() } else { format!("[{}]", lines.join(", ")) };
    let mut err = ApiError::invalid(format!("{kind}.{group} \"{name}\" is invalid: {all}"));
    let causes: Vec<Value> = errors
        .iter()
        .map(|e| json!({"reason": e.reason, "message": format!("{}: {}", e.field, e.message), "field": e.field}))
        .collect();
    err.details = Some(json!({"name": name, "group": group, "kind": kind, "causes": causes}));
    Err(err)
}

/// The value at a dotted path (`spec.canary`), if any.
fn lookup<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').filter(|p| !p.is_empty()).try_fold(obj, |v, k| v.get(k))
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") }
}

/// Drops fields the schema does not declare, collecting their paths. The
/// root's `apiVersion`, `kind` and `metadata` are the API's own.
fn prune(schema: &Value, value: &mut Value, path: &str, root: bool, unknown: &mut Vec<String>) {
    if schema["x-kubernetes-preserve-unknown-fields"] == true && schema.get("properties").is_none() {
        return;
    }
    match value {
        Value::Object(map) => {
            let props = schema["properties"].as_object();
            let additional = schema.get("additionalProperties");
            let preserve = schema["x-kubernetes-preserve-unknown-fields"] == true;
            let keys: Vec<String> = map.keys().cloned().collect();
            for k in keys {
                if root && ["apiVersion", "kind", "metadata"].contains(&k.as_str()) {
                    continue;
                }
                let child_path = join(path, &k);
                let child_schema = props.and_then(|p| p.get(&k)).or(additional.filter(|a| a.is_object()));
                match (child_schema, map.get_mut(&k)) {
                    (Some(s), Some(v)) => prune(s, v, &child_path, false, unknown),
                    (None, _) if preserve || additional == Some(&Value::Bool(true)) => {}
                    (None, _) => {
                        map.remove(&k);
                        unknown.push(child_path);
                    }
                    _ => {}
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, v) in items.iter_mut().enumerate() {
                    prune(item_schema, v, &format!("{path}[{i}]"), false, unknown);
                }
            }
        }
        _ => {}
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The structural checks of one value against its schema.
fn validate(schema: &Value, value: &Value, path: &str, errors: &mut Vec<FieldError>) {
    if value.is_null() {
        if schema["nullable"] != true && schema.get("type").is_some() {
            errors.push(FieldError::invalid(
                path,
                value,
                format!("{path} in body must be of type {}: \"null\"", schema["type"].as_str().unwrap_or("object")),
            ));
        }
        return;
    }
    if schema["x-kubernetes-int-or-string"] == true {
        if !matches!(type_name(value), "integer" | "string") {
            errors.push(FieldError::invalid(
                path,
                value,
                format!("{path} in body must be of type integer or string: \"{}\"", type_name(value)),
            ));
        }
    } else if let Some(want) = schema["type"].as_str() {
        let got = type_name(value);
        let ok = got == want || (want == "number" && got == "integer");
        if !ok {
            errors.push(FieldError::invalid(path, value, format!("{path} in body must be of type {want}: \"{got}\"")));
            return;
        }
    }
    if let Some(options) = schema["enum"].as_array()
        && !options.contains(value)
    {
        let supported: Vec<String> = options.iter().map(Value::to_string).collect();
        errors.push(FieldError {
            field: path.to_owned(),
            reason: "FieldValueNotSupported",
            message: format!("Unsupported value: {value}: supported values: {}", supported.join(", ")),
        });
    }
    if let Some(n) = value.as_f64() {
        if schema["format"] == "int32" && value.as_i64().is_some_and(|i| i32::try_from(i).is_err()) {
            errors.push(FieldError::invalid(path, value, format!("{path} in body must be of type int32")));
        }
        let exclusive_min = schema["exclusiveMinimum"] == true;
        if let Some(min) = schema["minimum"].as_f64()
            && (n < min || (exclusive_min && n == min))
        {
            let op = if exclusive_min { "greater than" } else { "greater than or equal to" };
            errors.push(FieldError::invalid(path, value, format!("{path} in body should be {op} {}", number(min))));
        }
        let exclusive_max = schema["exclusiveMaximum"] == true;
        if let Some(max) = schema["maximum"].as_f64()
            && (n > max || (exclusive_max && n == max))
        {
            let op = if exclusive_max { "less than" } else { "less than or equal to" };
            errors.push(FieldError::invalid(path, value, format!("{path} in body should be {op} {}", number(max))));
        }
    }
    if let Some(s) = value.as_str() {
        let chars = s.chars().count() as u64;
        if let Some(max) = schema["maxLength"].as_u64()
            && chars > max
        {
            errors.push(FieldError {
                field: path.to_owned(),
                reason: "FieldValueTooLong",
                message: format!("Too long: may not be more than {max} bytes"),
            });
        }
        if let Some(min) = schema["minLength"].as_u64()
            && chars < min
        {
            errors.push(FieldError::invalid(
                path,
                value,
                format!("{path} in body should be at least {min} chars long"),
            ));
        }
        if let Some(pattern) = schema["pattern"].as_str() {
            match Regex::new(pattern) {
                Ok(re) if !re.is_match(s) => {
                    errors.push(FieldError::invalid(path, value, format!("{path} in body should match '{pattern}'")));
                }
                Ok(_) => {}
                Err(e) => {
                    errors.push(FieldError::invalid(path, value, format!("the schema's pattern does not compile: {e}")))
                }
            }
        }
    }
    if let Some(items) = value.as_array() {
        if let Some(max) = schema["maxItems"].as_u64()
            && items.len() as u64 > max
        {
            errors.push(FieldError {
                field: path.to_owned(),
                reason: "FieldValueTooMany",
                message: format!("Too many: {}: must have at most {max} items", items.len()),
            });
        }
        if let Some(min) = schema["minItems"].as_u64()
            && (items.len() as u64) < min
        {
            errors.push(FieldError::invalid(path, value, format!("{path} in body should have at least {min} items")));
        }
        if let Some(item_schema) = schema.get("items") {
            for (i, v) in items.iter().enumerate() {
                validate(item_schema, v, &format!("{path}[{i}]"), errors);
            }
        }
    }
    if let Some(map) = value.as_object() {
        for r in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            if !map.contains_key(r) {
                errors.push(FieldError {
                    field: join(path, r),
                    reason: "FieldValueRequired",
                    message: "Required value".into(),
                });
            }
        }
        let props = schema["properties"].as_object();
        for (k, v) in map {
            let child = props.and_then(|p| p.get(k)).or(schema.get("additionalProperties").filter(|a| a.is_object()));
            if let Some(s) = child {
                validate(s, v, &join(path, k), errors);
            }
        }
    }
    for (junctor, want) in [("allOf", "all"), ("anyOf", "any"), ("oneOf", "one")] {
        let Some(branches) = schema[junctor].as_array() else { continue };
        let passing = branches
            .iter()
            .filter(|b| {
                let mut e = Vec::new();
                validate(b, value, path, &mut e);
                e.is_empty()
            })
            .count();
        let ok = match want {
            "all" => passing == branches.len(),
            "any" => passing > 0,
            _ => passing == 1,
        };
        if !ok {
            errors.push(FieldError::invalid(
                path,
                value,
                format!("{path} in body must validate {want} of the schemas ({junctor})"),
            ));
        }
    }
}

/// A bound as the API server prints it: no trailing `.0` for whole numbers.
fn number(n: f64) -> String {
    if n.fract() == 0.0 { format!("{}", n as i64) } else { n.to_string() }
}

/// A `meta.k8s.io/v1` Table of custom resources for `kubectl get`: the
/// `Name` column, then the CRD's `additionalPrinterColumns` of `version`
/// (dates rendered as ages, as the real table convertor does).
pub fn table(crd: &Value, version: &str, items: &[Value], resource_version: &str) -> Value {
    let columns = crd["spec"]["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == version)
        .and_then(|v| v["additionalPrinterColumns"].as_array().cloned())
        .unwrap_or_default();
    let mut definitions = vec![
        json!({"name": "Name", "type": "string", "format": "name", "description": "Name must be unique within a namespace.", "priority": 0}),
    ];
    for c in &columns {
        definitions.push(json!({
            "name": c["name"], "type": c["type"], "format": c["format"].as_str().unwrap_or(""),
            "description": c["description"].as_str().unwrap_or(""), "priority": c["priority"].as_i64().unwrap_or(0),
        }));
    }
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let mut cells = vec![o["metadata"]["name"].clone()];
            for c in &columns {
                let v = json_path(o, c["jsonPath"].as_str().unwrap_or_default());
                cells.push(match (c["type"].as_str(), v) {
                    (Some("date"), Some(Value::String(t))) => json!(age(&t)),
                    (_, Some(v)) => v,
                    (_, None) => Value::Null,
                });
            }
            json!({
                "cells": cells,
                "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]},
            })
        })
        .collect();
    json!({
        "kind": "Table", "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": definitions,
        "rows": rows,
    })
}

/// The JSONPath subset printer columns use: `.a.b`, `[N]` and
/// `[?(@.key=="value")]` filters; the first match.
fn json_path(obj: &Value, path: &str) -> Option<Value> {
    let filter = Regex::new(r#"^\[\?\(@\.([A-Za-z0-9_]+)\s*==\s*["']([^"']*)["']\)\]"#).expect("filter pattern");
    let index = Regex::new(r"^\[(\d+)\]").expect("index pattern");
    let key = Regex::new(r"^\.([A-Za-z0-9_-]+)").expect("key pattern");
    let mut rest = path.trim();
    let mut current = obj.clone();
    while !rest.is_empty() {
        if let Some(m) = key.captures(rest) {
            current = current.get(&m[1])?.clone();
            rest = &rest[m[0].len()..];
        } else if let Some(m) = index.captures(rest) {
            current = current.get(m[1].parse::<usize>().ok()?)?.clone();
            rest = &rest[m[0].len()..];
        } else if let Some(m) = filter.captures(rest) {
            let found = current.as_array()?.iter().find(|e| e[&m[1]].as_str() == Some(&m[2]))?.clone();
            current = found;
            rest = &rest[m[0].len()..];
        } else {
            return None;
        }
    }
    Some(current)
}

/// A timestamp's age as kubectl shows it: `45s`, `3m`, `2h`, `4d`.
fn age(timestamp: &str) -> String {
    let Ok(t) = timestamp.parse::<k8s_openapi::jiff::Timestamp>() else { return "<invalid>".into() };
    let secs = (k8s_openapi::jiff::Timestamp::now().as_second() - t.as_second()).max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}
