//! WebSocket through HTTP mode, with tokio-tungstenite servers and clients:
//! the upgrade is balanced like any request, the tunnel carries frames both
//! ways, counts as in flight on its endpoint for its whole life, and closes
//! after `timeouts.tunnelIdle` without a byte.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// A WebSocket echo server that prefixes each text answer with its name.
struct WsBackend {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl WsBackend {
    async fn start(name: &'static str, host: u8) -> WsBackend {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, host], 0))).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                conns.spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
                    while let Some(Ok(m)) = ws.next().await {
                        let reply = match m {
                            Message::Text(t) => Message::text(format!("{name}:{t}")),
                            Message::Binary(b) => Message::Binary(b),
                            Message::Close(_) => break,
                            _ => continue,
                        };
                        if ws.send(reply).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        WsBackend { addr, task }
    }
}

impl Drop for WsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn ws_endpoints(bs: &[WsBackend]) -> String {
    let mut s = String::from("endpoints:\n");
    for b in bs {
        s.push_str(&format!("  - {{address: \"{}\"}}\n", b.addr));
    }
    s
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(addr: SocketAddr) -> Ws {
    let (ws, resp) =
        tokio::time::timeout(Duration::from_secs(5), tokio_tungstenite::connect_async(format!("ws://{addr}/chat")))
            .await
            .expect("handshake in time")
            .expect("WebSocket handshake through the proxy");
    assert_eq!(resp.status(), 101);
    ws
}

async fn echo(ws: &mut Ws, text: &str) -> String {
    ws.send(Message::text(text)).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap() {
        Some(Ok(Message::Text(t))) => t.to_string(),
        other => panic!("expected a text answer, got {other:?}"),
    }
}

async fn endpoints_doc(p: &fulcrum::proxy::ProxyHandle) -> serde_json::Value {
    serde_json::from_str(&admin(p, "/endpoints").await.body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_works_through_http_mode_and_the_tunnel_is_counted() {
    let bs = [WsBackend::start("w1", 40).await];
    let p = proxy(&ws_endpoints(&bs)).await;
    let mut ws = connect(p.addr).await;
    for i in 0..10 {
        assert_eq!(echo(&mut ws, &format!("hello {i}")).await, format!("w1:hello {i}"));
    }
    let blob: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    match ws.next().await {
        Some(Ok(Message::Binary(b))) => assert!(b[..] == blob[..]),
        other => panic!("{other:?}"),
    }
    let doc = endpoints_doc(&p).await;
    let e = &doc["endpoints"][0];
    assert_eq!((e["tunnels"].as_u64(), e["inFlight"].as_u64()), (Some(1), Some(1)), "{e}");
    let m = admin(&p, "/metrics").await.body;
    assert!(m.contains("fulcrum_proxy_upgrades_total{result=\"tunnelled\"} 1"), "{m}");
    assert!(m.contains("fulcrum_proxy_tunnels_open 1"), "{m}");
    ws.close(None).await.unwrap();
    drop(ws);
    assert!(
        eventually(Duration::from_secs(3), || async {
            let doc = endpoints_doc(&p).await;
            doc["endpoints"][0]["tunnels"] == 0 && doc["endpoints"][0]["inFlight"] == 0
        })
        .await,
        "the tunnel ends with the WebSocket"
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_are_balanced_and_open_tunnels_weigh_on_least_connections() {
    let bs = [WsBackend::start("w1", 41).await, WsBackend::start("w2", 42).await];
    let p = proxy1(&format!("loadBalancing: {{algorithm: LeastConnections}}\n{}", ws_endpoints(&bs))).await;
    // Four long-lived sockets: two on each endpoint.
    let mut sockets = Vec::new();
    for _ in 0..4 {
        sockets.push(connect(p.addr).await);
    }
    let mut owners = Vec::new();
    for ws in &mut sockets {
        owners.push(echo(ws, "x").await);
    }
    let mut sorted = owners.clone();
    sorted.sort();
    assert_eq!(sorted, ["w1:x", "w1:x", "w2:x", "w2:x"]);
    // Close both sockets of w1: the next two go to w1, which now carries none.
    let mut keep = Vec::new();
    for (mut ws, owner) in sockets.into_iter().zip(owners) {
        if owner == "w1:x" {
            ws.close(None).await.unwrap();
        } else {
            keep.push(ws);
        }
    }
    assert!(
        eventually(Duration::from_secs(3), || async { endpoints_doc(&p).await["endpoints"][0]["tunnels"] == 0 }).await
    );
    for _ in 0..2 {
        let mut ws = connect(p.addr).await;
        assert_eq!(echo(&mut ws, "y").await, "w1:y");
        keep.push(ws);
    }
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnel_is_closed_after_tunnel_idle_and_keep_alive_idle_does_not_apply() {
    let bs = [WsBackend::start("w1", 43).await];
    let p = proxy(&format!("timeouts: {{idle: 200ms, tunnelIdle: 700ms}}\n{}", ws_endpoints(&bs))).await;
    let mut ws = connect(p.addr).await;
    // Quiet for longer than the keep-alive idle time, shorter than tunnelIdle: still open.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(echo(&mut ws, "still there").await, "w1:still there");
    let started = std::time::Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("the proxy closes the idle tunnel");
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(600) && waited < Duration::from_secs(3), "{waited:?}");
    assert!(
        eventually(Duration::from_secs(2), || async { endpoints_doc(&p).await["endpoints"][0]["tunnels"] == 0 }).await
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upgrade_is_an_ordinary_response_and_h2c_is_never_tunnelled() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A plain HTTP backend: it answers upgrade requests with 200.
    let bs = backends(1).await;
    let p = proxy(&endpoints_yaml(&bs)).await;
    for upgrade in ["websocket", "h2c"] {
        let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
        let req = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: {upgrade}\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = vec![0; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
        let head = String::from_utf8_lossy(&buf[..n]).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{upgrade}: {head}");
        assert!(!head.contains("upgrade:"), "{upgrade}: {head}");
    }
    let m = admin(&p, "/metrics").await.body;
    assert!(m.contains("fulcrum_proxy_upgrades_total{result=\"refused\"} 1"), "{m}");
    assert!(!m.contains("result=\"tunnelled\""), "{m}");
    p.shutdown().await;
}
