//! Errors as the real API server sends them: `Status` objects with a code
//! and a reason, so that `kube::Error::Api` carries what it would in a cluster.

use serde_json::{Value, json};

/// An error response.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError { code, reason, message: message.into(), details: None }
    }

    pub fn not_found(kind: &str, plural: &str, name: &str) -> Self {
        let mut e = Self::new(404, "NotFound", format!("{plural} \"{name}\" not found"));
        e.details = Some(json!({"name": name, "kind": plural, "group": group_of(kind)}));
        e
    }

    pub fn already_exists(plural: &str, name: &str) -> Self {
        let mut e = Self::new(409, "AlreadyExists", format!("{plural} \"{name}\" already exists"));
        e.details = Some(json!({"name": name, "kind": plural}));
        e
    }

    pub fn conflict(plural: &str, name: &str, why: &str) -> Self {
        let mut e = Self::new(409, "Conflict", format!("Operation cannot be fulfilled on {plural} \"{name}\": {why}"));
        e.details = Some(json!({"name": name, "kind": plural}));
        e
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }

    pub fn unsupported_media(message: impl Into<String>) -> Self {
        Self::new(415, "UnsupportedMediaType", message)
    }

    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    /// The `Status` object.
    pub fn to_status(&self) -> Value {
        let mut v = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            v["details"] = d.clone();
        }
        v
    }
}

fn group_of(_kind: &str) -> &'static str {
    ""
}

/// The `Status` a successful delete returns when the object is gone at once.
pub fn success(kind: &str, name: &str, uid: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {"name": name, "kind": kind, "uid": uid},
    })
}
