//! Updates applied to a running proxy.

use std::time::Duration;

use fulcrum::discovery::Snapshot;
use fulcrum::proxy::config::ProxyConfig;

use crate::support::*;

fn config(yaml: &str, proxy: &fulcrum::proxy::ProxyHandle) -> ProxyConfig {
    let admin = proxy.admin.unwrap();
    ProxyConfig::parse(&format!("listen: \"{}\"\nadmin: \"{admin}\"\n{yaml}", proxy.addr)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_applies_without_dropping_in_flight_requests_or_connections() {
    let bs = backends(3).await;
    bs[0].set_delay(Duration::from_millis(800));
    let p = proxy(&format!("loadBalancing: {{algorithm: RoundRobin}}\n{}", endpoints_yaml(&bs[..2]))).await;
    let c = client();
    // One client connection held open across the update.
    let stream = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let (mut held, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let on_held = |held: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>| {
        let req = http::Request::get("/").header("host", "front").body(Default::default()).unwrap();
        held.send_request(req)
    };
    assert_eq!(on_held(&mut held).await.unwrap().status(), 200);
    // A slow request in flight to b1 while the update lands.
    let slow = {
        let (c2, addr) = (client(), p.addr);
        tokio::spawn(async move {
            let mut answers = Vec::new();
            for _ in 0..2 {
                let req = http::Request::get(format!("http://{addr}/")).body(Default::default()).unwrap();
                answers.push(send(&c2, req).await.unwrap());
            }
            answers
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Replace b1 by b3 and switch algorithm while b1 still serves the slow request.
    p.update(Snapshot::standalone(config(
        &format!("loadBalancing: {{algorithm: LeastRequest}}\n{}", endpoints_yaml(&bs[1..])),
        &p,
    )));
    assert!(
        eventually(Duration::from_secs(2), || async { admin(&p, "/endpoints").await.body.contains("LeastRequest") })
            .await
    );
    let answers = slow.await.unwrap();
    assert!(answers.iter().all(|r| r.status == 200), "{answers:?}");
    assert!(answers.iter().any(|r| r.backend() == "b1"), "the in-flight request to the removed endpoint finished");
    let counts = spread(&c, &p, 40).await;
    assert!(!counts.contains_key("b1") && counts.contains_key("b3"), "{counts:?}");
    let after = on_held(&mut held).await.expect("the connection opened before the update still works");
    assert_eq!(after.status(), 200);
    assert_ne!(after.headers()["x-backend"], "b1");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_that_stay_keep_their_statistics_across_updates() {
    let bs = backends(2).await;
    let p = proxy(&endpoints_yaml(&bs[..1])).await;
    let c = client();
    spread(&c, &p, 5).await;
    p.update(Snapshot::standalone(config(&endpoints_yaml(&bs), &p)));
    assert!(
        eventually(Duration::from_secs(2), || async {
            admin(&p, "/endpoints").await.body.contains(&bs[1].addr.to_string())
        })
        .await
    );
    let doc: serde_json::Value = serde_json::from_str(&admin(&p, "/endpoints").await.body).unwrap();
    let kept =
        doc["endpoints"].as_array().unwrap().iter().find(|e| e["address"] == bs[0].addr.to_string()).unwrap().clone();
    assert_eq!(kept["requests"], 5, "{kept}");
    assert_eq!(kept["responses"]["2xx"], 5, "{kept}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_endpoint_gets_no_new_requests() {
    use fulcrum::discovery::Target;
    let bs = backends(2).await;
    let p = proxy(&endpoints_yaml(&bs)).await;
    let mut snap = Snapshot::standalone(config(&endpoints_yaml(&bs), &p));
    let t: &mut Target = snap.targets.iter_mut().find(|t| t.spec.addr == bs[0].addr).unwrap();
    t.draining = true;
    p.update(snap);
    assert!(
        eventually(Duration::from_secs(2), || async { admin(&p, "/endpoints").await.body.contains("draining\"") })
            .await
    );
    let counts = spread(&client(), &p, 10).await;
    assert_eq!(counts.get("b2"), Some(&10), "{counts:?}");
    p.shutdown().await;
}
