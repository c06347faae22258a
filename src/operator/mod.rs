//! The control plane: pure functions that compute what a `LoadBalancedApp`
//! owns (`desired`) and the proxy configuration it asks for (`render`). The
//! reconciler that applies them is built on these.

pub mod controller;
pub mod desired;
pub mod healing;
pub mod health;
pub mod leader;
pub mod metrics;
pub mod render;
pub mod rollout;
