//! The HTTP/1.1 fast path next to hyper's: both share the endpoints'
//! connection caps, and a connection moves from one to the other mid-way.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// Sends `raw` on a new connection and reads until `want` responses have
/// arrived (or 5 s pass): the status codes in order.
async fn statuses(proxy: std::net::SocketAddr, raw: &[u8], want: usize) -> Vec<u16> {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = String::from_utf8_lossy(&got);
        let codes: Vec<u16> =
            text.match_indices("HTTP/1.1 ").filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok()).collect();
        if codes.len() >= want {
            return codes;
        }
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => return codes,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_moves_to_hyper_at_its_first_unusual_request_and_keeps_its_order() {
    let b = Backend::start("b1", 2).await;
    let p = proxy(&format!("endpoints: [{{address: \"{}\"}}]\n", b.addr)).await;
    // Plain, then chunked (hyper's), then plain again: three answers in order.
    let raw = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
GET /c HTTP/1.1\r\nHost: x\r\n\r\n";
    assert_eq!(statuses(p.addr, raw, 3).await, [200, 200, 200]);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_paths_share_max_connections_and_take_idle_slots_from_each_other() {
    let b = Backend::start("b1", 3).await;
    let yaml = format!(
        "timeouts: {{request: 3s}}\ncircuitBreakers: {{maxConnections: 1}}\nendpoints: [{{address: \"{}\"}}]\n",
        b.addr
    );
    let p = proxy1(&yaml).await;
    // hyper's path (a chunked upload) leaves its endpoint connection idle in
    // its pool; the fast path needs the one slot; and back again.
    let chunked = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    let plain = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    for raw in [&chunked[..], plain, chunked, plain] {
        let started = std::time::Instant::now();
        assert_eq!(statuses(p.addr, raw, 1).await, [200]);
        assert!(started.elapsed() < Duration::from_secs(2), "waited {:?} for a slot", started.elapsed());
    }
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_closes_connections_that_sent_nothing_and_those_idle_between_requests() {
    let b = Backend::start("b1", 2).await;
    // A long header budget: a drain that waited for it would be plain.
    let p = proxy(&format!("timeouts: {{header: 60s}}\nendpoints: [{{address: \"{}\"}}]\n", b.addr)).await;
    // A client's preconnect, or a pooled connection it never used: nothing sent.
    let mut silent = TcpStream::connect(p.addr).await.unwrap();
    // A kept-alive connection between requests.
    let mut idle = TcpStream::connect(p.addr).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf)).await.unwrap().unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    tokio::time::sleep(Duration::from_millis(50)).await;
    tokio::time::timeout(Duration::from_secs(5), p.shutdown())
        .await
        .expect("the drain does not wait for idle connections");
    for (what, s) in [("silent", &mut silent), ("idle", &mut idle)] {
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect(what);
        assert!(matches!(read, Ok(0) | Err(_)), "{what}: the proxy closed it: {read:?}");
    }
}
