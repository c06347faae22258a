//! Fulcrum keeps an application up and spreads its load well: a Kubernetes
//! operator for the `LoadBalancedApp` resource and the Rust proxy it deploys,
//! which also runs standalone in front of a list of servers.
//!
//! Modules:
//! - [`balance`]: the sans-IO balancing core (algorithms, load, affinity).

pub mod api;
pub mod balance;
pub mod demo;
pub mod discovery;
pub mod operator;
pub mod proxy;
pub mod small_http;
