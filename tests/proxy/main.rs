//! Proxy integration tests over real sockets on loopback (tier 2): test
//! backends on 127.0.0.2.., the proxy in front, faults injected.

mod abuse;
mod algorithms;
mod config;
mod demo;
mod fast_path;
mod faults;
mod forwarding;
mod grpc;
mod grpc_peer;
mod h2_bridge;
mod h2_endpoints;
mod health;
mod http2;
mod process;
mod reload;
mod smuggling;
mod support;
mod tcp;
mod tls;
mod tracks;
mod websocket;
