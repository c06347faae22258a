//! `docs/crd.md`, the field reference of the LoadBalancedApp, generated from
//! the CRD's schema (the types' doc comments), with a drift test.
//! `make docs` rewrites it.

use fulcrum::api::LoadBalancedApp;
use kube::CustomResourceExt;
use serde_json::Value;

const PAGE: &str = "docs/crd.md";

/// One line of a description, for a table cell.
fn cell(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ").replace('|', "\\|")
}

fn type_of(schema: &Value) -> String {
    if schema["x-kubernetes-int-or-string"] == true {
        return "integer or string".into();
    }
    let mut t = schema["type"].as_str().unwrap_or("object").to_owned();
    if t == "array" {
        t = format!("[]{}", schema["items"]["type"].as_str().unwrap_or("object"));
    }
    if let Some(values) = schema["enum"].as_array() {
        let names: Vec<String> = values.iter().filter_map(Value::as_str).map(|v| format!("`{v}`")).collect();
        t = format!("{t}: {}", names.join(", "));
    }
    if let (Some(min), Some(max)) = (schema["minimum"].as_f64(), schema["maximum"].as_f64()) {
        t = format!("{t} ({min}–{max})");
    } else if let Some(min) = schema["minimum"].as_f64() {
        t = format!("{t} (≥ {min})");
    }
    t
}

fn rows(path: &str, schema: &Value, out: &mut Vec<String>) {
    let Some(props) = schema["properties"].as_object() else { return };
    let required: Vec<&str> = schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    for (name, s) in props {
        let field = format!("{path}.{name}");
        let default = match &s["default"] {
            Value::Null if required.contains(&name.as_str()) => "required".to_owned(),
            Value::Null => String::new(),
            v => format!("`{v}`"),
        };
        let description = cell(s["description"].as_str().unwrap_or_default());
        out.push(format!("| `{field}` | {} | {default} | {description} |", cell(&type_of(s))));
        // A pod template is Kubernetes' own type: its fields are documented there.
        if s["x-kubernetes-preserve-unknown-fields"] != true && !name.ends_with("template") {
            rows(&field, s, out);
            if s["type"] == "array" {
                rows(&format!("{field}[]"), &s["items"], out);
            }
        }
    }
}

/// The page, from the CRD.
fn page() -> String {
    let crd = serde_json::to_value(LoadBalancedApp::crd()).expect("CRD as JSON");
    let version = &crd["spec"]["versions"][0];
    let schema = &version["schema"]["openAPIV3Schema"];
    let mut out = vec![
        "# The LoadBalancedApp resource".to_owned(),
        String::new(),
        format!(
            "`{}/{}`, kind `LoadBalancedApp`, namespaced, short names `lba`, `lbapp`. Generated from the CRD's schema \
             (the doc comments of `src/api/`) by `make docs`; a test fails when it drifts. The same text is what \
             `kubectl explain lba.spec` shows. Cross-field rules are CEL rules of the schema, listed last.",
            crd["spec"]["group"].as_str().unwrap_or_default(),
            version["name"].as_str().unwrap_or_default(),
        ),
        String::new(),
    ];
    for (section, title) in [("spec", "Spec"), ("status", "Status")] {
        out.push(format!("## {title}"));
        out.push(String::new());
        out.push("| field | type | default | meaning |".to_owned());
        out.push("| --- | --- | --- | --- |".to_owned());
        rows(section, &schema["properties"][section], &mut out);
        out.push(String::new());
    }
    out.push("## Rules".to_owned());
    out.push(String::new());
    out.push("| field | rule | message |".to_owned());
    out.push("| --- | --- | --- |".to_owned());
    fn rules(path: &str, schema: &Value, out: &mut Vec<String>) {
        for r in schema["x-kubernetes-validations"].as_array().into_iter().flatten() {
            let field = match r["fieldPath"].as_str() {
                Some(p) => format!("{path}{p}"),
                None => path.to_owned(),
            };
            out.push(format!(
                "| `{field}` | `{}` | {} |",
                cell(r["rule"].as_str().unwrap_or_default()),
                cell(r["message"].as_str().unwrap_or_default())
            ));
        }
        for (name, s) in schema["properties"].as_object().into_iter().flatten() {
            rules(&format!("{path}.{name}"), s, out);
        }
    }
    rules("spec", &schema["properties"]["spec"], &mut out);
    out.join("\n") + "\n"
}

#[test]
fn the_crd_reference_in_docs_matches_the_schema() {
    let wanted = page();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(PAGE);
    if std::env::var_os("FULCRUM_WRITE_DOCS").is_some() {
        std::fs::write(&path, &wanted).expect("write docs/crd.md");
        return;
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(current == wanted, "{PAGE} is stale: run `make docs` and commit the result");
}
