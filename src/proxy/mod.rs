//! The data plane: listeners, forwarding, health, metrics and the admin API,
//! on tokio and hyper, driving the balancing core.
//!
//! Layout: [`config`] is the file format; `state` holds the runtime swapped
//! on each update and the per-thread balancers; `http` and `tcp` are the two
//! request paths, and `fast` with [`h1`] the HTTP/1.1 fast path in front of
//! `http`; `h2s` serves HTTP/2 client connections with the proxy's own codec
//! ([`hpack`], [`h2frame`], [`h2conn`]) and `h2c` speaks HTTP/2 to endpoints
//! with the `h2` crate; `socket` reads and writes client sockets directly until they must
//! wait; `bridge` takes HTTP/2 clients'
//! bodiless requests to HTTP/1.1 endpoints over the fast path's sockets;
//! `health` runs active probes and the passive sweep; `admin` serves the
//! admin API; [`server`] binds, serves and drains.

mod admin;
mod bridge;
pub mod config;
mod conn;
mod fast;
mod forwarding;
mod grpc;
pub mod h1;
mod h2c;
pub mod h2conn;
pub mod h2frame;
mod h2s;
mod health;
pub mod hpack;
mod http;
pub mod metrics;
mod relay;
mod replay;
mod retry;
pub mod server;
mod socket;
mod state;
mod tcp;
pub mod tls;
pub mod tracks;
mod upgrade;
mod upstream;

pub use retry::RetryBudget;
pub use server::{Proxy, ProxyHandle, StartError, serve_admin_until};
pub use state::{ApplyError, Runtime, Shared};
