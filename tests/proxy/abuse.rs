//! Clients and endpoints that hold on to the proxy: each is let go after
//! its timeout, and a well-behaved client running alongside sees no failure.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// Whether the proxy closes `s` within `limit` (a read sees the end or an error).
async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // A 408 or a GOAWAY may come first; the close follows.
            Ok(Ok(_)) => {}
        }
    }
}

/// A client sending a request every 10 ms until stopped; its failures.
fn good_client(
    p: &fulcrum::proxy::ProxyHandle,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<Vec<String>>) {
    let (stop, mut stopped) = tokio::sync::oneshot::channel();
    let url = format!("http://{}/", p.addr);
    let task = tokio::spawn(async move {
        let c = client();
        let mut failures = Vec::new();
        for _ in 0..2000 {
            if stopped.try_recv().is_ok() {
                break;
            }
            let req = http::Request::get(&url).body(Default::default()).unwrap();
            match send(&c, req).await {
                Ok(r) if r.status == 200 => {}
                Ok(r) => failures.push(format!("status {}", r.status)),
                Err(e) => failures.push(e),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        failures
    });
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_slow_and_preface_only_connections_are_closed_after_their_timeouts() {
    let bs = backends(1).await;
    // Nothing, or half a head: `header`. The HTTP/2 preface and no stream: `idle`.
    let p = proxy(&format!("timeouts: {{header: 300ms, idle: 1s}}\n{}", endpoints_yaml(&bs))).await;
    let (stop, good) = good_client(&p);
    let mut abusers = Vec::new();
    for i in 0..150 {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        match i % 3 {
            0 => {}                                                                    // nothing at all
            1 => s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap(),      // the h2 preface only
            _ => s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap(), // half a head
        }
        abusers.push(s);
    }
    let started = Instant::now();
    for (i, s) in abusers.iter_mut().enumerate() {
        assert!(closed_within(s, Duration::from_secs(3)).await, "connection {i} (kind {}) still open", i % 3);
    }
    eprintln!("150 abusive connections closed within {:?}", started.elapsed());
    let _ = stop.send(());
    assert_eq!(good.await.unwrap(), Vec::<String>::new());
    let m = admin(&p, "/metrics").await.body;
    assert!(m.contains("fulcrum_proxy_client_timeouts_total{timeout=\"header\"}"), "{m}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_head_is_cut_at_the_header_timeout_even_while_bytes_trickle() {
    let bs = backends(1).await;
    let p = proxy(&format!("timeouts: {{header: 400ms, idle: 5s}}\n{}", endpoints_yaml(&bs))).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let started = Instant::now();
    let mut closed = false;
    for _ in 0..40 {
        if s.write_all(b"X-A: b\r\n").await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut buf = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
            closed = true;
            break;
        }
    }
    assert!(closed, "the trickling head was never cut");
    assert!(started.elapsed() < Duration::from_millis(1500), "{:?}", started.elapsed());
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_without_streams_is_closed_after_idle() {
    let bs = backends(1).await;
    let p = proxy(&format!("timeouts: {{idle: 400ms}}\n{}", endpoints_yaml(&bs))).await;
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(100))
        .keep_alive_while_idle(true)
        .handshake::<_, http_body_util::Full<bytes::Bytes>>(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/", p.addr)).body(Default::default()).unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), 200);
    // The client PINGs every 100 ms; PINGs are not requests.
    let started = Instant::now();
    assert!(tokio::time::timeout(Duration::from_secs(3), conn).await.is_ok(), "the idle connection stayed open");
    assert!(started.elapsed() >= Duration::from_millis(300), "{:?}", started.elapsed());
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_stalls_its_body_is_let_go_after_body_idle() {
    // Headers, ten bytes of a hundred, then nothing.
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stall = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789").await;
            held.push(s);
        }
    });
    let p = proxy(&format!("timeouts: {{bodyIdle: 500ms}}\nendpoints: [{{address: \"{addr}\"}}]\n")).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let started = Instant::now();
    assert!(closed_within(&mut s, Duration::from_secs(3)).await, "the client connection stayed open");
    assert!(started.elapsed() >= Duration::from_millis(400), "{:?}", started.elapsed());
    // The endpoint is no longer counted busy.
    assert!(
        eventually(Duration::from_secs(2), || async { admin(&p, "/endpoints").await.body.contains("\"inFlight\": 0") })
            .await
    );
    let m = admin(&p, "/metrics").await.body;
    assert!(m.contains("fulcrum_proxy_client_timeouts_total{timeout=\"bodyIdle\"} 1"), "{m}");
    stall.abort();
    p.shutdown().await;
}

/// An endpoint whose `/stall` answer sends ten bytes and then nothing, for
/// an hour; any other path is answered at once.
async fn half_stalling_endpoint(host: u8) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use http_body_util::{Either, Full, StreamBody};
    let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::new(127, 0, 0, host), 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((s, _)) = listener.accept().await {
            conns.spawn(async move {
                let svc = hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    if req.uri().path() != "/stall" {
                        return Ok::<_, std::convert::Infallible>(http::Response::new(Either::Left(Full::new(
                            bytes::Bytes::from_static(b"ok"),
                        ))));
                    }
                    let (tx, rx) =
                        tokio::sync::mpsc::channel::<Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>>(1);
                    let _ = tx.send(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(b"0123456789")))).await;
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        drop(tx);
                    });
                    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
                    Ok(http::Response::new(Either::Right(body)))
                });
                let io = hyper_util::rt::TokioIo::new(s);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stalled_http2_stream_is_ended_while_the_others_keep_its_connection_busy() {
    use http_body_util::BodyExt;
    let (addr, endpoint) = half_stalling_endpoint(21).await;
    let p = proxy(&format!("timeouts: {{bodyIdle: 600ms}}\nendpoints: [{{address: \"{addr}\"}}]\n")).await;
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .handshake::<_, http_body_util::Full<bytes::Bytes>>(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let url = format!("http://{}/", p.addr);
    let mut stalled = sender
        .clone()
        .send_request(http::Request::get(format!("{url}stall")).body(Default::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(stalled.status(), 200);
    let first = stalled.body_mut().frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "0123456789");
    // Another stream every 50 ms keeps the connection busy while the first is silent.
    let busy = {
        let sender = sender.clone();
        let url = url.clone();
        tokio::spawn(async move {
            let mut failures = 0;
            for _ in 0..80 {
                let req = http::Request::get(&url).body(Default::default()).unwrap();
                match sender.clone().send_request(req).await {
                    Ok(r) if r.status() == 200 => {}
                    _ => failures += 1,
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            failures
        })
    };
    let started = Instant::now();
    let rest = tokio::time::timeout(Duration::from_secs(5), stalled.body_mut().frame()).await;
    let ended = match rest {
        Ok(Some(Err(_))) | Ok(None) => true,
        Ok(Some(Ok(_))) | Err(_) => false,
    };
    assert!(ended, "the stalled stream was not ended: {rest:?}");
    assert!(started.elapsed() >= Duration::from_millis(450), "{:?}", started.elapsed());
    assert!(!busy.is_finished(), "ended on its own, while the connection was still busy");
    assert_eq!(busy.await.unwrap(), 0, "the other streams on the connection all succeed");
    assert!(!conn.is_finished(), "the connection stays open");
    assert!(
        eventually(Duration::from_secs(2), || async { admin(&p, "/endpoints").await.body.contains("\"inFlight\": 0") })
            .await
    );
    let m = admin(&p, "/metrics").await.body;
    assert!(m.contains("fulcrum_proxy_client_timeouts_total{timeout=\"bodyIdle\"} 1"), "{m}");
    endpoint.abort();
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_a_large_response_is_let_go_after_body_idle() {
    // An endpoint with a 1 GiB answer, written as fast as the proxy takes it.
    let listener = tokio::net::TcpListener::bind("127.0.0.3:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (gone_tx, gone) = tokio::sync::oneshot::channel::<Duration>();
    let endpoint = tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else { return };
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1073741824\r\n\r\n").await;
        let chunk = vec![b'x'; 1 << 16];
        let mut stalled_since = None;
        for _ in 0..16384 {
            match tokio::time::timeout(Duration::from_millis(100), s.write_all(&chunk)).await {
                Ok(Ok(())) => stalled_since = None,
                Ok(Err(_)) => break,
                Err(_) => {
                    stalled_since.get_or_insert_with(Instant::now);
                }
            }
        }
        // The proxy closed the endpoint's connection: how long after the stall began.
        let _ = gone_tx.send(stalled_since.map_or(Duration::ZERO, |t| t.elapsed()));
    });
    let p = proxy(&format!("timeouts: {{bodyIdle: 500ms}}\nendpoints: [{{address: \"{addr}\"}}]\n")).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    // Never read: the answer backs up, the proxy lets both connections go.
    let after_stall =
        tokio::time::timeout(Duration::from_secs(10), gone).await.expect("the endpoint was let go").unwrap();
    assert!(after_stall < Duration::from_secs(3), "{after_stall:?}");
    assert!(
        eventually(Duration::from_secs(3), || async { admin(&p, "/endpoints").await.body.contains("\"inFlight\": 0") })
            .await,
        "the endpoint is released"
    );
    let m = admin(&p, "/metrics").await.body;
    assert!(m.contains("fulcrum_proxy_client_timeouts_total{timeout=\"bodyIdle\"} 1"), "{m}");
    endpoint.abort();
    drop(s);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_cuts_slow_heads_and_keeps_answering_probes() {
    let p = proxy("endpoints: []\n").await;
    let admin_addr = p.admin.expect("admin listener");
    let mut slow = Vec::new();
    for _ in 0..100 {
        let mut s = TcpStream::connect(admin_addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
        slow.push(s);
    }
    // Probes still answer while the slow heads are held.
    assert_eq!(admin(&p, "/healthz").await.status, 200);
    let limit = fulcrum::small_http::HEADER_TIMEOUT + Duration::from_secs(3);
    for s in &mut slow {
        assert!(closed_within(s, limit).await, "a half head held the admin listener past its header timeout");
    }
    // Read-only: anything but GET is refused.
    let req = http::Request::post(format!("http://{admin_addr}/endpoints")).body(Default::default()).unwrap();
    assert_eq!(send(&client(), req).await.unwrap().status, 405);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_heads_get_431_and_leave_the_proxy_serving() {
    let bs = backends(1).await;
    let p = proxy(&format!("limits: {{maxRequestHeaderBytes: 16384, maxRequestHeaders: 50}}\n{}", endpoints_yaml(&bs)))
        .await;
    let big = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(64 * 1024));
    let many =
        format!("GET / HTTP/1.1\r\nHost: x\r\n{}\r\n", (0..200).map(|i| format!("X-H{i}: v\r\n")).collect::<String>());
    for (what, req) in [("a 64 KiB header", big), ("200 headers", many)] {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        let _ = s.write_all(req.as_bytes()).await;
        let mut buf = vec![0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap_or(0);
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 431"), "{what}: {head}");
    }
    assert_eq!(bs[0].hits(), 0);
    assert_eq!(get(&client(), &p, "/").await.status, 200);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_new_clients_wait_until_one_closes() {
    let bs = backends(1).await;
    let p = proxy1(&format!("limits: {{maxConnections: 4}}\n{}", endpoints_yaml(&bs))).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 512];
        assert!(s.read(&mut buf).await.unwrap() > 0);
        held.push(s);
    }
    // The fifth connects (the kernel's backlog) but is not served while four are open.
    let url = format!("http://{}/", p.addr);
    let fifth = tokio::spawn(async move {
        let started = Instant::now();
        let r = send(&client(), http::Request::get(url).body(Default::default()).unwrap()).await.unwrap();
        (r.status, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!fifth.is_finished(), "a fifth connection was served past maxConnections");
    held.pop();
    let (status, waited) = fifth.await.unwrap();
    assert_eq!(status, 200);
    assert!(waited >= Duration::from_millis(450), "{waited:?}");
    let m = admin(&p, "/metrics").await.body;
    assert!(m.contains("fulcrum_proxy_connection_cap_seconds_total"), "{m}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_at_its_request_cap_turns_requests_away_fast() {
    let bs = backends(1).await;
    bs[0].set_delay(Duration::from_millis(800));
    let p =
        proxy(&format!("circuitBreakers: {{maxRequests: 2}}\nretries: {{attempts: 0}}\n{}", endpoints_yaml(&bs))).await;
    let c = client();
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let c = c.clone();
            let url = format!("http://{}/", p.addr);
            tokio::spawn(async move { send(&c, http::Request::get(url).body(Default::default()).unwrap()).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let r = get(&c, &p, "/").await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (503, "endpoints at their request limit\n"));
    assert!(started.elapsed() < Duration::from_millis(300), "{:?}", started.elapsed());
    for s in slow {
        assert_eq!(s.await.unwrap().unwrap().status, 200);
    }
    let m = admin(&p, "/metrics").await.body;
    assert!(m.contains("fulcrum_proxy_circuit_breaker_overflows_total{limit=\"maxRequests\"} 1"), "{m}");
    p.shutdown().await;
}

/// `n` requests to `path` at once; their statuses (or errors) and bodies.
async fn burst(p: &fulcrum::proxy::ProxyHandle, n: usize) -> Vec<(u16, String)> {
    let c = client();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (c, url) = (c.clone(), format!("http://{}/", p.addr));
        set.spawn(async move {
            match send(&c, http::Request::get(url).body(Default::default()).unwrap()).await {
                Ok(r) => (r.status.as_u16(), r.body),
                Err(e) => (0, e),
            }
        });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.unwrap());
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_max_connections_wait_for_a_connection_and_reuse_it() {
    let bs = backends(1).await;
    bs[0].set_delay(Duration::from_millis(300));
    let p = proxy(&format!(
        "circuitBreakers: {{maxConnections: 2, maxPendingRequests: 100}}\nretries: {{attempts: 0}}\n{}",
        endpoints_yaml(&bs)
    ))
    .await;
    // Six slow requests at once, on both workers: two go out, four wait and
    // take the connections as they come back, whichever worker pooled them.
    let started = Instant::now();
    let replies = burst(&p, 6).await;
    assert!(replies.iter().all(|(s, _)| *s == 200), "{replies:?}");
    assert_eq!(
        bs[0].behaviour.accepted.load(std::sync::atomic::Ordering::Relaxed),
        2,
        "never more than two connections"
    );
    assert!(started.elapsed() >= Duration::from_millis(850), "three rounds of two: {:?}", started.elapsed());
    let doc = admin(&p, "/endpoints").await.body;
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(
        (doc["endpoints"][0]["connections"].as_u64(), doc["endpoints"][0]["pendingRequests"].as_u64()),
        (Some(2), Some(0))
    );
    let m = admin(&p, "/metrics").await.body;
    assert!(m.contains(&format!("fulcrum_proxy_endpoint_connections{{endpoint=\"{}\"}} 2", bs[0].addr)), "{m}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_of_pending_requests_turns_more_away_fast_or_to_another_endpoint() {
    let bs = backends(1).await;
    bs[0].set_delay(Duration::from_millis(600));
    let p = proxy(&format!(
        "circuitBreakers: {{maxConnections: 1, maxPendingRequests: 1}}\nretries: {{attempts: 0}}\n{}",
        endpoints_yaml(&bs)
    ))
    .await;
    // One in flight, one waiting; the other two are refused at once.
    let started = Instant::now();
    let replies = burst(&p, 4).await;
    let statuses: Vec<u16> = replies.iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses, [200, 200, 503, 503], "{replies:?}");
    assert!(replies.iter().filter(|(s, _)| *s == 503).all(|(_, b)| b == "endpoints at their request limit\n"));
    // Bounded: two answers of 600 ms one after the other, the refusals at once.
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    let m = admin(&p, "/metrics").await.body;
    assert!(m.contains("fulcrum_proxy_circuit_breaker_overflows_total{limit=\"maxPendingRequests\"} 2"), "{m}");
    p.shutdown().await;

    // With two endpoints and a retry, an overflow on one goes to the other, for free.
    let bs = backends(2).await;
    for b in &bs {
        b.set_delay(Duration::from_millis(400));
    }
    let p = proxy1(&format!(
        "loadBalancing: {{algorithm: RoundRobin}}\ncircuitBreakers: {{maxConnections: 1, maxPendingRequests: 0}}\n\
         retries: {{attempts: 1}}\n{}",
        endpoints_yaml(&bs)
    ))
    .await;
    let replies = burst(&p, 2).await;
    assert!(replies.iter().all(|(s, _)| *s == 200), "{replies:?}");
    assert!(bs.iter().all(|b| b.hits() == 1), "one on each endpoint");
    p.shutdown().await;
}
