//! gRPC through the proxy (appProtocol GRPC), with tonic servers and clients
//! on both sides: every call is balanced on its own, whatever connection it
//! came on; streams flow both ways; statuses, deadlines and trailers pass;
//! the proxy's own answers are gRPC statuses; GOAWAY and dying endpoints
//! lose no call that had not reached them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tonic::{Code, Request};

use crate::grpc_peer::*;
use crate::support::*;

fn grpc_endpoints(bs: &[GrpcBackend]) -> String {
    let mut s = String::from("appProtocol: GRPC\nendpoints:\n");
    for b in bs {
        s.push_str(&format!("  - {{address: \"{}\"}}\n", b.addr));
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_on_one_channel_are_spread_call_by_call() {
    let bs = grpc_backends(3, 20, None).await;
    let p = proxy1(&format!("loadBalancing: {{algorithm: RoundRobin}}\n{}", grpc_endpoints(&bs))).await;
    let mut c = EchoClient::new(channel(p.addr).await);
    let mut shares: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        let answer = c.unary(Request::new(msg(16))).await.expect("call through the proxy");
        assert_eq!(answer.payload.len(), 16);
        *shares.entry(answer.server).or_default() += 1;
    }
    assert_eq!(shares, HashMap::from([("g1".into(), 10), ("g2".into(), 10), ("g3".into(), 10)]));
    let m = admin(&p, "/metrics").await.body;
    for b in &bs {
        let line =
            format!("fulcrum_proxy_upstream_grpc_responses_total{{endpoint=\"{}\",grpc_status=\"OK\"}} 10", b.addr);
        assert!(m.contains(&line), "missing {line} in\n{m}");
    }
    // Few connections per endpoint, not one per call.
    let doc: serde_json::Value = serde_json::from_str(&admin(&p, "/endpoints").await.body).unwrap();
    assert_eq!(doc["appProtocol"], "GRPC");
    for e in doc["endpoints"].as_array().unwrap() {
        assert_eq!(e["http2Connections"], 1, "{e}");
        assert_eq!(e["grpc"]["OK"], 10, "{e}");
    }
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_flow_both_ways_and_large_messages_pass() {
    let bs = grpc_backends(2, 24, None).await;
    let p = proxy1(&grpc_endpoints(&bs)).await;
    let mut c = EchoClient::new(channel(p.addr).await);
    // Server streaming.
    let mut s = c.stream(Request::new(Msg { count: 5, delay_ms: 10, ..msg(8) })).await.unwrap();
    let mut got = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        got.push(m.count);
    }
    assert_eq!(got, [0, 1, 2, 3, 4]);
    // Client streaming.
    let total = c.sum(vec![msg(1000), msg(2000), msg(3000)]).await.unwrap();
    assert_eq!(total.count, 6000);
    // Bidirectional: each answer arrives before the next message is sent.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut answers = c.chat(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap();
    for i in 0..5usize {
        tx.send(msg(i + 1)).await.unwrap();
        let a = tokio::time::timeout(Duration::from_secs(5), answers.message()).await.unwrap().unwrap().unwrap();
        assert_eq!(a.payload.len(), i + 1, "answer {i} came back while the request stream stayed open");
    }
    drop(tx);
    assert!(answers.message().await.unwrap().is_none(), "the stream ends with its trailers");
    // A 3 MiB message each way.
    let big = c.unary(Request::new(msg(3 << 20))).await.unwrap();
    assert_eq!(big.payload.len(), 3 << 20);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_calls_on_one_connection_finish_in_any_order() {
    let bs = grpc_backends(2, 46, None).await;
    let p = proxy1(&grpc_endpoints(&bs)).await;
    let ch = channel(p.addr).await;
    // 64 server-streaming calls at once on one connection, each answering
    // three times at its own pace: responses wait for their endpoints and
    // resume in an order other than the one they opened in.
    let calls = (0..64usize).map(|i| {
        let mut c = EchoClient::new(ch.clone());
        async move {
            let m = Msg { count: 3, delay_ms: (i % 8) as u32 * 3, ..msg(i + 1) };
            let mut s = c.stream(Request::new(m)).await.expect("call through the proxy");
            let mut got = Vec::new();
            while let Some(m) = s.message().await.expect("a whole stream") {
                assert_eq!(m.payload.len(), i + 1, "call {i} got another call's answer");
                got.push(m.count);
            }
            got
        }
    });
    let all = tokio::time::timeout(Duration::from_secs(20), futures::future::join_all(calls))
        .await
        .expect("every call finishes");
    assert!(all.iter().all(|got| got == &[0, 1, 2]), "{all:?}");
    // The connection goes on.
    let mut c = EchoClient::new(ch);
    assert_eq!(c.unary(Request::new(msg(5))).await.expect("a call after them").payload.len(), 5);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_statuses_pass_and_only_endpoint_failures_count_against_it() {
    let bs = grpc_backends(2, 26, None).await;
    let p = proxy1(&format!(
        "loadBalancing: {{algorithm: RoundRobin}}\nhealthCheck: {{passive: {{consecutiveFailures: 3}}}}\n{}",
        grpc_endpoints(&bs)
    ))
    .await;
    let mut c = EchoClient::new(channel(p.addr).await);
    for _ in 0..10 {
        let e = c.unary(Request::new(Msg { fail: Code::NotFound as i32, ..msg(1) })).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        assert!(e.message().ends_with("failed on purpose"), "{e:?}");
    }
    let doc: serde_json::Value = serde_json::from_str(&admin(&p, "/endpoints").await.body).unwrap();
    for e in doc["endpoints"].as_array().unwrap() {
        assert_eq!((e["healthy"].as_bool(), e["grpc"]["NOT_FOUND"].as_u64()), (Some(true), Some(5)), "{e}");
    }
    // UNAVAILABLE from an endpoint is its failure, as a 5xx is: three in a row eject it.
    for _ in 0..6 {
        let e = c.unary(Request::new(Msg { fail: Code::Unavailable as i32, ..msg(1) })).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable);
    }
    assert!(
        eventually(Duration::from_secs(2), || async {
            admin(&p, "/metrics").await.body.matches("fulcrum_proxy_endpoint_ejected{").count() == 2
                && admin(&p, "/endpoints").await.body.matches("\"ejected\"").count() >= 1
        })
        .await
    );
    // The track's evidence: NOT_FOUND is the application's answer, UNAVAILABLE a failure.
    let m = admin(&p, "/metrics").await.body;
    assert!(
        m.contains("fulcrum_proxy_track_grpc_responses_total{track=\"stable\",grpc_status=\"NOT_FOUND\"} 10"),
        "{m}"
    );
    assert!(m.contains("fulcrum_proxy_track_outcomes_total{track=\"stable\",outcome=\"success\"} 10"), "{m}");
    assert!(m.contains("fulcrum_proxy_track_outcomes_total{track=\"stable\",outcome=\"failure\"} 6"), "{m}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_own_answers_are_grpc_statuses() {
    // No endpoint at all.
    let p = proxy("appProtocol: GRPC\nendpoints: []\n").await;
    let mut c = EchoClient::new(channel(p.addr).await);
    let e = c.unary(Request::new(msg(1))).await.unwrap_err();
    assert_eq!((e.code(), e.message()), (Code::Unavailable, "no healthy endpoint"));
    let m = admin(&p, "/metrics").await.body;
    assert!(m.contains("fulcrum_proxy_local_grpc_responses_total{grpc_status=\"UNAVAILABLE\"} 1"), "{m}");
    p.shutdown().await;

    // An endpoint slower than the proxy's request timeout: DEADLINE_EXCEEDED, not an HTTP 504.
    let bs = grpc_backends(1, 28, None).await;
    let p = proxy(&format!("timeouts: {{request: 300ms}}\n{}", grpc_endpoints(&bs))).await;
    let mut c = EchoClient::new(channel(p.addr).await);
    let started = Instant::now();
    let e = c.unary(Request::new(Msg { delay_ms: 3000, ..msg(1) })).await.unwrap_err();
    assert_eq!((e.code(), e.message()), (Code::DeadlineExceeded, "endpoint timed out"));
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_bounds_the_whole_call_not_only_its_headers() {
    use http_body_util::BodyExt;
    use prost::Message;
    let bs = grpc_backends(1, 29, None).await;
    let p = proxy(&grpc_endpoints(&bs)).await;
    // A raw HTTP/2 client: tonic's own client would enforce the deadline itself.
    let stream = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let body = Msg { count: 50, delay_ms: 100, ..msg(1) }.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
    framed.extend_from_slice(&body);
    let req = http::Request::post(format!("http://{}/test.Echo/Stream", p.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "450m")
        .body(http_body_util::Full::new(bytes::Bytes::from(framed)))
        .unwrap();
    let started = Instant::now();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let (mut messages, mut trailers) = (0, None);
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("the stream ends cleanly, with trailers");
        match frame.into_data() {
            Ok(_) => messages += 1,
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    let trailers = trailers.expect("trailers");
    assert_eq!(trailers["grpc-status"], "4", "{trailers:?}");
    assert!((2..=5).contains(&messages), "{messages} messages before the deadline");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    conn.abort();
    p.shutdown().await;
}

/// Unary calls from `clients` channels, `per_client` each, `gap` apart; the
/// failures' codes.
async fn call_load(
    addr: std::net::SocketAddr,
    clients: usize,
    per_client: usize,
    delay_ms: u32,
    gap: Duration,
) -> Vec<Code> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let mut c = EchoClient::new(channel(addr).await);
        tasks.spawn(async move {
            let mut failed = Vec::new();
            for _ in 0..per_client {
                if let Err(e) = c.unary(Request::new(Msg { delay_ms, ..msg(64) })).await {
                    failed.push(e.code());
                }
                tokio::time::sleep(gap).await;
            }
            failed
        });
    }
    let mut failed = Vec::new();
    while let Some(r) = tasks.join_next().await {
        failed.extend(r.expect("client task"));
    }
    failed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_sends_goaway_loses_no_call() {
    let mut bs = grpc_backends(3, 30, None).await;
    let p = proxy(&format!("healthCheck: {{passive: {{consecutiveFailures: 0}}}}\n{}", grpc_endpoints(&bs))).await;
    let load = tokio::spawn(call_load(p.addr, 4, 40, 50, Duration::from_millis(5)));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before = bs[0].calls();
    assert!(before > 0);
    // SIGTERM: GOAWAY; calls in flight finish, new streams go elsewhere; then the process ends.
    let stopping = tokio::spawn(bs.remove(0).terminate(Duration::from_secs(5)));
    let failed = load.await.unwrap();
    stopping.await.unwrap();
    assert_eq!(failed, [], "no call fails when an endpoint goes away gracefully");
    assert!(bs[0].calls() > 0 && bs[1].calls() > 0);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_on_a_dying_endpoint_fail_unavailable_and_the_others_succeed() {
    let mut bs = grpc_backends(3, 33, None).await;
    let p = proxy1(&format!("loadBalancing: {{algorithm: RoundRobin}}\n{}", grpc_endpoints(&bs))).await;
    let c = EchoClient::new(channel(p.addr).await);
    // Six slow calls, two on each endpoint; the first endpoint dies with two in flight.
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let mut c = c.clone();
        calls.spawn(async move { c.unary(Request::new(Msg { delay_ms: 600, ..msg(8) })).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    bs[0].kill();
    let mut codes = Vec::new();
    while let Some(r) = calls.join_next().await {
        codes.push(r.unwrap().map(|_| Code::Ok).unwrap_or_else(|e| e.code()));
    }
    codes.sort_by_key(|c| *c as i32);
    assert_eq!(codes, [Code::Ok, Code::Ok, Code::Ok, Code::Ok, Code::Unavailable, Code::Unavailable]);
    // New calls avoid the dead endpoint (its connection refusals are retried elsewhere).
    let mut c = c.clone();
    for _ in 0..9 {
        let a = c.unary(Request::new(msg(1))).await.expect("calls after the crash succeed");
        assert_ne!(a.server, "g1");
    }
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoints_stream_limit_opens_more_connections() {
    let bs = grpc_backends(1, 36, Some(2)).await;
    let p = proxy1(&grpc_endpoints(&bs)).await;
    // A burst of six slow calls on a fresh proxy: each new connection learns the
    // endpoint's limit from its SETTINGS before streams are placed on it.
    let c = EchoClient::new(channel(p.addr).await);
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let mut c = c.clone();
        calls.spawn(async move { c.unary(Request::new(Msg { delay_ms: 500, ..msg(8) })).await });
    }
    let doc = |p: &fulcrum::proxy::ProxyHandle| {
        let p = p.admin;
        async move {
            let body = send(
                &client(),
                http::Request::get(format!("http://{}/endpoints", p.unwrap())).body(Default::default()).unwrap(),
            )
            .await
            .unwrap()
            .body;
            serde_json::from_str::<serde_json::Value>(&body).unwrap()
        }
    };
    // A call counts as in flight from its pick, before its connection is open: wait for both.
    let spread = eventually(Duration::from_secs(2), || async {
        let d = doc(&p).await;
        d["endpoints"][0]["inFlight"] == 6 && d["endpoints"][0]["http2Connections"] == 3
    })
    .await;
    assert!(spread, "SETTINGS_MAX_CONCURRENT_STREAMS 2: six streams on three connections: {}", doc(&p).await);
    let started = Instant::now();
    while let Some(r) = calls.join_next().await {
        r.unwrap().expect("every call succeeds");
    }
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "the calls ran side by side, not queued: {:?}",
        started.elapsed()
    );
    assert_eq!(doc(&p).await["endpoints"][0]["http2Connections"], 3, "no more connections than needed");
    // Ended streams free their slots: more calls than the three connections
    // ever had room for reuse them.
    let mut c = c.clone();
    for _ in 0..10 {
        c.unary(Request::new(msg(8))).await.expect("a call after the burst");
    }
    let after = doc(&p).await;
    assert_eq!(
        (after["endpoints"][0]["http2Connections"].as_u64(), after["endpoints"][0]["inFlight"].as_u64()),
        (Some(3), Some(0)),
        "{after}"
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_calls_wait_for_a_stream_of_the_open_connection() {
    let bs = grpc_backends(1, 39, Some(2)).await;
    let p = proxy(&format!("circuitBreakers: {{maxConnections: 1}}\n{}", grpc_endpoints(&bs))).await;
    let c = EchoClient::new(channel(p.addr).await);
    let mut calls = tokio::task::JoinSet::new();
    let started = Instant::now();
    for _ in 0..6 {
        let mut c = c.clone();
        calls.spawn(async move { c.unary(Request::new(Msg { delay_ms: 300, ..msg(8) })).await });
    }
    let endpoint = |p: &fulcrum::proxy::ProxyHandle| {
        let url = format!("http://{}/endpoints", p.admin.unwrap());
        async move {
            let body = send(&client(), http::Request::get(url).body(Default::default()).unwrap()).await.unwrap().body;
            serde_json::from_str::<serde_json::Value>(&body).unwrap()["endpoints"][0].clone()
        }
    };
    // Two streams on the one connection; the four other calls wait (on either worker).
    let queued = eventually(Duration::from_secs(2), || async {
        let e = endpoint(&p).await;
        e["pendingRequests"] == 4 && e["connections"] == 1
    })
    .await;
    assert!(queued, "{}", endpoint(&p).await);
    while let Some(r) = calls.join_next().await {
        r.unwrap().expect("every call succeeds");
    }
    assert!(started.elapsed() >= Duration::from_millis(850), "three rounds of two: {:?}", started.elapsed());
    assert_eq!(endpoint(&p).await["http2Connections"], 1);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_endpoint_behind_a_grpc_setting_fails_fast_and_is_not_a_hang() {
    let bs = backends(1).await;
    let p = proxy(&format!(
        "appProtocol: GRPC\nhealthCheck: {{passive: {{consecutiveFailures: 0}}}}\n{}",
        endpoints_yaml(&bs)
    ))
    .await;
    let mut c = EchoClient::new(channel(p.addr).await);
    for _ in 0..3 {
        let started = Instant::now();
        let e = c.unary(Request::new(msg(1))).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    let doc: serde_json::Value = serde_json::from_str(&admin(&p, "/endpoints").await.body).unwrap();
    assert!(doc["endpoints"][0]["failures"].as_u64().unwrap() >= 3, "{doc}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standard_grpc_health_check_takes_a_not_serving_endpoint_out() {
    let bs = grpc_backends(2, 37, None).await;
    let p = proxy1(&format!(
        "healthCheck: {{active: {{grpc: {{}}, interval: 50ms, healthyThreshold: 1, unhealthyThreshold: 1}}}}\n{}",
        grpc_endpoints(&bs)
    ))
    .await;
    bs[0].set_serving(false).await;
    assert!(!health_check(bs[0].addr, Duration::from_secs(2)).await, "tonic-health's client agrees");
    assert!(health_check(bs[1].addr, Duration::from_secs(2)).await);
    assert!(
        eventually(Duration::from_secs(3), || async {
            admin(&p, "/endpoints").await.body.contains("activeCheckFailed")
        })
        .await
    );
    let mut c = EchoClient::new(channel(p.addr).await);
    for _ in 0..6 {
        assert_eq!(c.unary(Request::new(msg(1))).await.unwrap().server, "g2");
    }
    bs[0].set_serving(true).await;
    assert!(
        eventually(Duration::from_secs(3), || async {
            !admin(&p, "/endpoints").await.body.contains("activeCheckFailed")
        })
        .await
    );
    p.shutdown().await;
}

/// A byte-scripted HTTP/2 endpoint that takes a request and then answers
/// nothing, not even PINGs. The proxy sends a PING every half
/// `timeouts.idle` and closes a connection whose PING is still unanswered
/// when the next is due, so a hung endpoint (or a path that silently dropped
/// the connection) holds a request for two PING intervals, not for
/// `timeouts.request`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_leaves_pings_unanswered_loses_its_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let endpoint = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        // Its SETTINGS (none) and the ACK of the client's, sent with its preface.
        s.write_all(&[h2_frame(4, 0, 0, &[]), h2_frame(4, 0x1, 0, &[])].concat()).await.expect("settings");
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
                Err(_) => panic!("the proxy kept the connection 10 s past an unanswered PING"),
            }
        }
        h2_frames(seen.get(H2_PREFACE.len()..).unwrap_or_default())
            .into_iter()
            .map(|(kind, _)| kind)
            .collect::<Vec<_>>()
    });
    let p = proxy1(&format!(
        "appProtocol: H2C\ntimeouts: {{idle: 2s, request: 30s}}\nendpoints:\n  - {{address: \"{addr}\"}}\n"
    ))
    .await;
    let started = Instant::now();
    let r = get(&client(), &p, "/").await;
    let held = started.elapsed();
    assert_eq!(r.status, 502, "{r:?}");
    assert!(held >= Duration::from_millis(1500) && held < Duration::from_secs(6), "answered after {held:?}");
    let frames = tokio::time::timeout(Duration::from_secs(15), endpoint).await.expect("endpoint").expect("ran");
    // SETTINGS (4), the request's HEADERS (1), then a PING (6).
    assert!(frames.starts_with(&[4]) && frames.contains(&1) && frames.contains(&6), "frames {frames:?}");
    p.shutdown().await;
}
