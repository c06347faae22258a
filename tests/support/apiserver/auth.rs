//! Authentication, RBAC authorization and the audit log, as a real API server
//! does them: bearer tokens name an identity (the harness's admin, or a
//! ServiceAccount that must exist); every request is authorized from the
//! Role, ClusterRole, RoleBinding and ClusterRoleBinding objects stored in
//! the server; writes of roles and bindings are refused when they would grant
//! more than the writer holds (escalation prevention); every request is
//! recorded with its outcome.
//!
//! Modelled: API groups, resources and subresources, verbs (with `list` and
//! `watch` on a collection, and `metadata.name` field selectors naming the
//! object as the real request resolver does), `resourceNames`, cluster and
//! namespace scope, `system:masters`, the ServiceAccount groups, `escalate`
//! and `bind`. Not modelled: aggregated ClusterRoles (a ClusterRole with an
//! `aggregationRule` is refused when stored) and non-resource URLs (refused
//! in rules), so a test cannot pass by relying on either.

use std::sync::Mutex;

use serde_json::Value;

use super::registry::Resource;
use super::status::ApiError;
use super::store::Store;

/// The token of the harness's administrator (`system:masters`).
pub const ADMIN_TOKEN: &str = "fulcrum-test-admin-token";

/// Who a request comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub groups: Vec<String>,
}

impl Identity {
    fn admin() -> Identity {
        Identity {
            user: "kubernetes-admin".into(),
            groups: vec!["system:masters".into(), "system:authenticated".into()],
        }
    }

    /// The identity a ServiceAccount's token stands for.
    pub fn service_account(ns: &str, name: &str) -> Identity {
        Identity {
            user: format!("system:serviceaccount:{ns}:{name}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
                "system:authenticated".into(),
            ],
        }
    }

    /// The ServiceAccount behind this identity, if it is one.
    pub fn as_service_account(&self) -> Option<(&str, &str)> {
        let rest = self.user.strip_prefix("system:serviceaccount:")?;
        rest.split_once(':')
    }
}

/// What a request asks to do, in RBAC's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl Attributes {
    /// `resource` or `resource/subresource`, as rules name it.
    pub fn resource_path(&self) -> String {
        match &self.subresource {
            Some(s) => format!("{}/{s}", self.resource),
            None => self.resource.clone(),
        }
    }
}

/// One request, as the audit log records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEvent {
    pub user: String,
    pub verb: String,
    pub group: String,
    /// `resource` or `resource/subresource`.
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// Authorized (whatever the request's outcome after that).
    pub allowed: bool,
    /// The request's label selector, for lists and watches.
    pub label_selector: Option<String>,
}

/// Tokens and the audit log.
#[derive(Default)]
pub struct Auth {
    tokens: Mutex<Vec<(String, TokenOwner)>>,
    audit: Mutex<Vec<AuditEvent>>,
}

#[derive(Clone, Debug)]
enum TokenOwner {
    Admin,
    ServiceAccount { ns: String, name: String },
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Auth {
    pub fn new() -> Auth {
        let auth = Auth::default();
        lock(&auth.tokens).push((ADMIN_TOKEN.to_owned(), TokenOwner::Admin));
        auth
    }

    /// A token for the ServiceAccount `ns/name` (it authenticates only while the account exists).
    pub fn token_for(&self, ns: &str, name: &str) -> String {
        let token = format!("sa-{ns}-{name}-{:016x}", digest(&(ns, name, "fulcrum-test")));
        let mut tokens = lock(&self.tokens);
        if !tokens.iter().any(|(t, _)| *t == token) {
            tokens.push((token.clone(), TokenOwner::ServiceAccount { ns: ns.into(), name: name.into() }));
        }
        token
    }

    /// Who presents `authorization` (the header's value), or the real 401.
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
        store: &Store,
        accounts: &Resource,
    ) -> Result<Identity, ApiError> {
        let unauthorized = || ApiError::new(401, "Unauthorized", "Unauthorized");
        let token = authorization.and_then(|h| h.strip_prefix("Bearer ")).ok_or_else(unauthorized)?;
        let owner = lock(&self.tokens).iter().find(|(t, _)| t == token).map(|(_, o)| o.clone());
        match owner.ok_or_else(unauthorized)? {
            TokenOwner::Admin => Ok(Identity::admin()),
            TokenOwner::ServiceAccount { ns, name } => {
                // A token outlives nothing: its account must still exist.
                store.get(accounts, &ns, &name).map_err(|_| unauthorized())?;
                Ok(Identity::service_account(&ns, &name))
            }
        }
    }

    pub fn record(&self, id: &Identity, a: &Attributes, allowed: bool, label_selector: Option<String>) {
        lock(&self.audit).push(AuditEvent {
            user: id.user.clone(),
            verb: a.verb.clone(),
            group: a.group.clone(),
            resource: a.resource_path(),
            namespace: a.namespace.clone(),
            name: a.name.clone(),
            allowed,
            label_selector,
        });
    }

    /// Every request so far.
    pub fn audit(&self) -> Vec<AuditEvent> {
        lock(&self.audit).clone()
    }
}

/// A stable digest (tokens only need to be unguessable by accident; file names unique).
pub fn digest(value: &impl std::hash::Hash) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

/// The stored RBAC objects, looked up by kind.
pub struct Rbac<'a> {
    pub store: &'a Store,
    pub roles: &'a Resource,
    pub cluster_roles: &'a Resource,
    pub role_bindings: &'a Resource,
    pub cluster_role_bindings: &'a Resource,
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

fn subject_matches(subject: &Value, id: &Identity, binding_ns: Option<&str>) -> bool {
    let name = subject["name"].as_str().unwrap_or_default();
    match subject["kind"].as_str() {
        Some("ServiceAccount") => {
            let ns = subject["namespace"].as_str().or(binding_ns).unwrap_or_default();
            id.as_service_account() == Some((ns, name))
        }
        Some("User") => id.user == name,
        Some("Group") => id.groups.iter().any(|g| g == name),
        _ => false,
    }
}

/// Whether one rule allows the request.
pub fn rule_allows(rule: &Value, a: &Attributes) -> bool {
    let any_or = |list: Vec<&str>, want: &str| list.iter().any(|x| *x == "*" || *x == want);
    let resources = strings(&rule["resources"]);
    let resource_ok = match &a.subresource {
        None => resources.iter().any(|r| *r == "*" || *r == a.resource),
        Some(sub) => resources.iter().any(|r| {
            *r == "*"
                || *r == format!("{}/{sub}", a.resource)
                || *r == format!("*/{sub}")
                || *r == format!("{}/*", a.resource)
        }),
    };
    let names = strings(&rule["resourceNames"]);
    let name_ok = names.is_empty() || a.name.as_deref().is_some_and(|n| names.contains(&n));
    any_or(strings(&rule["verbs"]), &a.verb) && any_or(strings(&rule["apiGroups"]), &a.group) && resource_ok && name_ok
}

impl Rbac<'_> {
    fn rules_of(&self, role_ref: &Value, binding_ns: Option<&str>) -> Vec<Value> {
        let name = role_ref["name"].as_str().unwrap_or_default();
        let role = match (role_ref["kind"].as_str(), binding_ns) {
            (Some("ClusterRole"), _) => self.store.get(self.cluster_roles, "", name).ok(),
            (Some("Role"), Some(ns)) => self.store.get(self.roles, ns, name).ok(),
            _ => None,
        };
        role.map(|r| r["rules"].as_array().cloned().unwrap_or_default()).unwrap_or_default()
    }

    /// Every rule that applies to `id` for a request in `namespace` (None: cluster scope).
    pub fn rules_for(&self, id: &Identity, namespace: Option<&str>) -> Vec<Value> {
        let mut rules = Vec::new();
        let (crbs, _) = self.store.list(self.cluster_role_bindings, None, |_| true);
        for b in crbs {
            if b["subjects"].as_array().into_iter().flatten().any(|s| subject_matches(s, id, None)) {
                rules.extend(self.rules_of(&b["roleRef"], None));
            }
        }
        if let Some(ns) = namespace {
            let (rbs, _) = self.store.list(self.role_bindings, Some(ns), |_| true);
            for b in rbs {
                if b["subjects"].as_array().into_iter().flatten().any(|s| subject_matches(s, id, Some(ns))) {
                    rules.extend(self.rules_of(&b["roleRef"], Some(ns)));
                }
            }
        }
        rules
    }

    pub fn allows(&self, id: &Identity, a: &Attributes) -> bool {
        id.groups.iter().any(|g| g == "system:masters")
            || self.rules_for(id, a.namespace.as_deref()).iter().any(|r| rule_allows(r, a))
    }

    /// Escalation prevention: whether `id` holds every permission `rules` grant
    /// within `namespace` (None: cluster-wide), each rule's values taken literally
    /// (a `*` in a granted rule is covered only by a `*` the writer holds).
    pub fn covers(&self, id: &Identity, namespace: Option<&str>, rules: &[Value]) -> Result<(), String> {
        if id.groups.iter().any(|g| g == "system:masters") {
            return Ok(());
        }
        let held = self.rules_for(id, namespace);
        for rule in rules {
            if rule.get("nonResourceURLs").is_some_and(|v| !strings(v).is_empty()) {
                return Err("nonResourceURLs are not modelled by the test API server".into());
            }
            let names = strings(&rule["resourceNames"]);
            let names: Vec<Option<&str>> =
                if names.is_empty() { vec![None] } else { names.into_iter().map(Some).collect() };
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    let (resource, sub) = match resource.split_once('/') {
                        Some((r, s)) => (r, Some(s.to_owned())),
                        None => (resource, None),
                    };
                    for verb in strings(&rule["verbs"]) {
                        for name in &names {
                            let a = Attributes {
                                verb: verb.into(),
                                group: group.into(),
                                resource: resource.into(),
                                subresource: sub.clone(),
                                namespace: namespace.map(str::to_owned),
                                name: name.map(str::to_owned),
                            };
                            if !held.iter().any(|r| rule_allows(r, &a)) {
                                return Err(format!(
                                    "{{APIGroups:[{group:?}], Resources:[{:?}], Verbs:[{verb:?}]{}}}",
                                    a.resource_path(),
                                    name.map(|n| format!(", ResourceNames:[{n:?}]")).unwrap_or_default()
                                ));
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// The real 403: `<resource>[.<group>] ["<name>"] is forbidden: User "<user>"
/// cannot <verb> resource "<resource>[/<sub>]" in API group "<group>" in the
/// namespace "<ns>"` (or `at the cluster scope`).
pub fn forbidden(id: &Identity, a: &Attributes, extra: Option<&str>) -> ApiError {
    let qualified = if a.group.is_empty() { a.resource.clone() } else { format!("{}.{}", a.resource, a.group) };
    let object = match &a.name {
        Some(n) => format!("{qualified} \"{n}\""),
        None => qualified,
    };
    let scope = match &a.namespace {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_owned(),
    };
    let mut message = format!(
        "{object} is forbidden: User \"{}\" cannot {} resource \"{}\" in API group \"{}\" {scope}",
        id.user,
        a.verb,
        a.resource_path(),
        a.group
    );
    if let Some(extra) = extra {
        message = format!("{object} is forbidden: {extra}");
    }
    let mut e = ApiError::new(403, "Forbidden", message);
    e.details =
        Some(serde_json::json!({"name": a.name.clone().unwrap_or_default(), "group": a.group, "kind": a.resource}));
    e
}
