//! TCP mode.

use std::time::Duration;

use fulcrum::discovery::Snapshot;
use fulcrum::proxy::ProxyHandle;
use fulcrum::proxy::config::ProxyConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An echo server on 127.0.0.`host` that prefixes its name, and answers
/// "bye" after the client half-closes.
async fn echo_server(name: &'static str, host: u8) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind(std::net::SocketAddr::from(([127, 0, 0, host], 0))).await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { continue };
            tokio::spawn(async move {
                let mut buf = vec![0; 65536];
                s.write_all(name.as_bytes()).await.ok();
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                // The client finished sending; this direction still works.
                s.write_all(b"|bye").await.ok();
                s.shutdown().await.ok();
            });
        }
    });
    (addr, task)
}

async fn tcp_proxy(extra: &str, addrs: &[std::net::SocketAddr]) -> ProxyHandle {
    let mut yaml = format!("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nprotocol: TCP\n{extra}endpoints:\n");
    for a in addrs {
        yaml.push_str(&format!("  - {{address: \"{a}\"}}\n"));
    }
    ProxyHandle::start(Snapshot::standalone(ProxyConfig::parse(&yaml).unwrap())).await.unwrap()
}

async fn exchange(proxy: std::net::SocketAddr, payload: &[u8]) -> String {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(payload).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.unwrap().unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_mode_echoes_through_and_passes_on_a_half_close() {
    let (a, _ta) = echo_server("A", 2).await;
    let (b, _tb) = echo_server("B", 3).await;
    // One worker: its round robin sees every connection.
    let p = tcp_proxy("workers: 1\n", &[a, b]).await;
    let mut seen = Vec::new();
    for i in 0..4 {
        let reply = exchange(p.addr, format!("hello{i}").as_bytes()).await;
        assert!(reply.ends_with(&format!("hello{i}|bye")), "{reply}");
        seen.push(reply.chars().next().unwrap());
    }
    seen.sort_unstable();
    assert_eq!(seen, ['A', 'A', 'B', 'B'], "connections are balanced round robin");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_mode_copies_bulk_data_intact() {
    let (a, _ta) = echo_server("A", 2).await;
    let p = tcp_proxy("", &[a]).await;
    let payload: Vec<u8> = (0..2_000_000u32).map(|i| (i % 253) as u8).collect();
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut out = Vec::new();
    let recv = r.read_to_end(&mut out);
    let ((), got) = tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(send, recv) }).await.unwrap();
    got.unwrap();
    assert_eq!(&out[..1], b"A");
    assert!(out[1..out.len() - 4] == payload[..]);
    let m = crate::support::admin(&p, "/metrics").await.body;
    assert!(
        m.contains(&format!("fulcrum_proxy_upstream_connections_total{{endpoint=\"{a}\",result=\"connected\"}} 1")),
        "{m}"
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_mode_retries_a_refused_connect_on_another_endpoint() {
    let (a, _ta) = echo_server("A", 2).await;
    let dead = {
        let l = TcpListener::bind(("127.0.0.3", 0)).await.unwrap();
        l.local_addr().unwrap()
    };
    let p = tcp_proxy("healthCheck: {passive: {consecutiveFailures: 0}}\n", &[a, dead]).await;
    for _ in 0..6 {
        assert!(exchange(p.addr, b"x").await.starts_with('A'));
    }
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tcp_connection_is_closed_after_the_idle_timeout() {
    let (a, _ta) = echo_server("A", 2).await;
    let p = tcp_proxy("timeouts: {idle: 300ms}\n", &[a]).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let mut buf = [0u8; 16];
    // Traffic within the timeout keeps it open: 600 ms in all, never 300 ms silent.
    let mut last_write = std::time::Instant::now();
    for _ in 0..4 {
        s.write_all(b"x").await.unwrap();
        last_write = std::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let n = s.read(&mut buf).await.unwrap();
    assert!(n >= 1);
    // Silence closes it, about 300 ms after the last byte moved.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await.unwrap().ok();
    let silent = last_write.elapsed();
    assert!(silent >= Duration::from_millis(280) && silent < Duration::from_secs(2), "{silent:?}");
    p.shutdown().await;
}
