//! The operator's pure parts: desired objects per mode and option, and the
//! proxy configuration rendered from a spec.

#[path = "../support/apiserver/mod.rs"]
mod apiserver;
mod desired;
mod healing;
#[path = "../support/install.rs"]
mod install;
mod leader;
mod rbac;
mod reconcile;
mod rollout;
