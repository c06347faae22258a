//! Peers for `make bench-proxy`'s gRPC and WebSocket sections, built from the
//! ecosystem's crates (tonic, tokio-tungstenite):
//!
//! - `bench_peer grpc-server ADDR NAME`: a tonic server with `test.Echo`
//!   (the proxy tests' service) until killed;
//! - `bench_peer ws-server ADDR`: a WebSocket echo server until killed;
//! - `bench_peer ws-load URL CONNECTIONS SECONDS`: WebSocket clients, each
//!   sending a 64-byte message and awaiting its echo in a loop; prints one
//!   JSON line: messages per second, p50 and p99 round trip in microseconds,
//!   errors.

#[allow(dead_code)]
#[path = "../tests/proxy/grpc_peer.rs"]
mod grpc_peer;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Ok(rt) = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() else {
        return ExitCode::FAILURE;
    };
    let addr = |i: usize| args.get(i).and_then(|a| a.parse::<SocketAddr>().ok());
    match args.first().map(String::as_str) {
        Some("grpc-server") => {
            let (Some(addr), Some(name)) = (addr(1), args.get(2)) else { return usage() };
            rt.block_on(async {
                let _server = grpc_peer::GrpcBackend::start_on(name, addr, None).await;
                let _ = tokio::signal::ctrl_c().await;
            });
            ExitCode::SUCCESS
        }
        Some("ws-server") => {
            let Some(addr) = addr(1) else { return usage() };
            rt.block_on(ws_server(addr))
        }
        Some("ws-load") => {
            let (Some(url), Some(conns), Some(secs)) = (
                args.get(1),
                args.get(2).and_then(|c| c.parse::<usize>().ok()),
                args.get(3).and_then(|s| s.parse::<u64>().ok()),
            ) else {
                return usage();
            };
            rt.block_on(ws_load(url.clone(), conns, Duration::from_secs(secs)))
        }
        _ => usage(),
    }
}

fn usage() -> ExitCode {
    eprintln!("usage: bench_peer grpc-server ADDR NAME | ws-server ADDR | ws-load URL CONNECTIONS SECONDS");
    ExitCode::from(2)
}

async fn ws_server(addr: SocketAddr) -> ExitCode {
    let Ok(listener) = tokio::net::TcpListener::bind(addr).await else { return ExitCode::FAILURE };
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
            while let Some(Ok(m)) = ws.next().await {
                if m.is_close() {
                    break;
                }
                if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn ws_load(url: String, conns: usize, length: Duration) -> ExitCode {
    let deadline = Instant::now() + length;
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..conns {
        let url = url.clone();
        clients.spawn(async move {
            let mut rtts = Vec::new();
            let mut errors = 0u64;
            let Ok((mut ws, _)) = tokio_tungstenite::connect_async(url).await else { return (rtts, 1) };
            let payload = vec![0x61u8; 64];
            while Instant::now() < deadline {
                let t = Instant::now();
                if ws.send(Message::binary(payload.clone())).await.is_err() {
                    errors += 1;
                    break;
                }
                match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                    Ok(Some(Ok(Message::Binary(_)))) => rtts.push(t.elapsed().as_micros() as u64),
                    _ => {
                        errors += 1;
                        break;
                    }
                }
            }
            let _ = ws.close(None).await;
            (rtts, errors)
        });
    }
    let (mut rtts, mut errors) = (Vec::new(), 0);
    while let Some(Ok((r, e))) = clients.join_next().await {
        rtts.extend(r);
        errors += e;
    }
    rtts.sort_unstable();
    let pct =
        |q: f64| rtts.get(((rtts.len() as f64 * q) as usize).min(rtts.len().saturating_sub(1))).copied().unwrap_or(0);
    println!(
        "{{\"messages_per_s\": {:.1}, \"p50_us\": {}, \"p99_us\": {}, \"errors\": {errors}}}",
        rtts.len() as f64 / length.as_secs_f64(),
        pct(0.50),
        pct(0.99)
    );
    ExitCode::SUCCESS
}
