//! The `fulcrum proxy` binary: bad configuration, file watch, SIGHUP, SIGTERM.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_fulcrum");

/// A child process killed on drop, so a failing test leaves nothing behind.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.0.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill {sig}");
    }

    /// Waits up to `limit` for the exit status.
    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(s) = self.0.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// A port free on 127.0.0.1 right now.
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fulcrum-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(path: &Path, text: &str) {
    // Write then rename, as editors and ConfigMap mounts do, so the watcher never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Starts the binary and waits until it serves.
fn start(config: &Path, listen: SocketAddr) -> Running {
    start_with(config, listen, &[])
}

/// Starts the binary with extra arguments and waits until it serves.
fn start_with(config: &Path, listen: SocketAddr, extra: &[&str]) -> Running {
    let child = Command::new(BIN)
        .args(["proxy", "--config"])
        .arg(config)
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut running = Running(child);
    let stderr = running.0.stderr.take().unwrap();
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in BufReader::new(stderr).lines() {});
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(listen).is_err() {
        assert!(Instant::now() < deadline, "proxy did not start listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    running
}

fn handle_for(listen: SocketAddr, admin: SocketAddr) -> ProxyAddrs {
    ProxyAddrs { listen, admin }
}

struct ProxyAddrs {
    listen: SocketAddr,
    admin: SocketAddr,
}

async fn get_at(addr: SocketAddr, path: &str) -> Result<Reply, String> {
    let req = http::Request::get(format!("http://{addr}{path}")).body(Default::default()).unwrap();
    send(&client(), req).await
}

#[test]
fn an_invalid_config_exits_2_with_one_line_naming_the_field() {
    let dir = temp_dir("invalid");
    for (text, field) in [
        ("listen: 127.0.0.1:1\nloadBalancing: {algoritm: RoundRobin}\n", "loadBalancing.algoritm"),
        ("listen: 127.0.0.1:1\nloadBalancing: {algorithm: Fastest}\n", "loadBalancing.algorithm"),
        ("listen: 127.0.0.1:1\ntimeouts: {connect: soon}\n", "timeouts.connect"),
        ("listen: 127.0.0.1:1\nloadBalancing: {algorithm: ConsistentHash}\n", "loadBalancing.hashOn"),
        ("listen: 127.0.0.1:1\nendpoints: [{address: 127.0.0.2:80, weight: -3}]\n", "endpoints[0].weight"),
        ("admin: 127.0.0.1:1\n", "listen"),
    ] {
        let path = dir.join("bad.yaml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(BIN).args(["proxy", "--config"]).arg(&path).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{text}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(field), "{field} not named in: {stderr}");
    }
    let out = Command::new(BIN).args(["proxy", "--config", "/nonexistent/fulcrum.yaml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watched_file_reloads_within_2s_ignores_invalid_changes_and_honours_sighup() {
    let bs = backends(2).await;
    let dir = temp_dir("reload");
    let path = dir.join("proxy.yaml");
    let p = handle_for(free_addr(), free_addr());
    let head = format!("listen: \"{}\"\nadmin: \"{}\"\n", p.listen, p.admin);
    write(&path, &format!("{head}endpoints: [{{address: \"{}\"}}]\n", bs[0].addr));
    let proc = start(&path, p.listen);
    assert_eq!(get_at(p.listen, "/").await.unwrap().backend(), "b1");

    // A valid change: b2 replaces b1.
    write(&path, &format!("{head}endpoints: [{{address: \"{}\"}}]\n", bs[1].addr));
    let t0 = Instant::now();
    assert!(
        eventually(Duration::from_secs(2), || async { get_at(p.listen, "/").await.unwrap().backend() == "b2" }).await
    );
    println!("file change applied in {:?}", t0.elapsed());

    // An invalid change is ignored: b2 keeps serving, the failure is counted.
    write(&path, &format!("{head}loadBalancing: {{algorithm: Nope}}\nendpoints: [{{address: \"{}\"}}]\n", bs[0].addr));
    let refused = eventually(Duration::from_secs(3), || async {
        get_at(p.admin, "/metrics")
            .await
            .unwrap()
            .body
            .contains("fulcrum_proxy_config_reloads_total{result=\"failure\"} 1")
    })
    .await;
    assert!(refused);
    for _ in 0..5 {
        assert_eq!(get_at(p.listen, "/").await.unwrap().backend(), "b2");
    }

    // SIGHUP reads the file at once: the fixed file applies.
    std::fs::write(&path, format!("{head}endpoints: [{{address: \"{}\"}}]\n", bs[0].addr)).unwrap();
    proc.signal("-HUP");
    assert!(
        eventually(Duration::from_secs(2), || async { get_at(p.listen, "/").await.unwrap().backend() == "b1" }).await
    );
    drop(proc);
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_finishes_in_flight_requests_and_exits_0() {
    let bs = backends(1).await;
    bs[0].set_delay(Duration::from_millis(700));
    let dir = temp_dir("drain");
    let path = dir.join("proxy.yaml");
    let p = handle_for(free_addr(), free_addr());
    write(
        &path,
        &format!(
            "listen: \"{}\"\nadmin: \"{}\"\ntimeouts: {{drain: 5s}}\nendpoints: [{{address: \"{}\"}}]\n",
            p.listen, p.admin, bs[0].addr
        ),
    );
    let mut proc = start(&path, p.listen);
    let listen = p.listen;
    let in_flight = tokio::spawn(async move { get_at(listen, "/").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    proc.signal("-TERM");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(tokio::net::TcpStream::connect(p.listen).await.is_err(), "no new connections once draining");
    let r = in_flight.await.unwrap().expect("the in-flight request completes");
    assert_eq!((r.status.as_u16(), r.backend()), (200, "b1"));
    let status = tokio::task::spawn_blocking(move || proc.wait_exit(Duration::from_secs(5))).await.unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_shutdown_delay_sigterm_first_fails_readiness_while_still_serving() {
    let bs = backends(1).await;
    let dir = temp_dir("delay");
    let path = dir.join("proxy.yaml");
    let p = handle_for(free_addr(), free_addr());
    write(
        &path,
        &format!("listen: \"{}\"\nadmin: \"{}\"\nendpoints: [{{address: \"{}\"}}]\n", p.listen, p.admin, bs[0].addr),
    );
    let mut proc = start_with(&path, p.listen, &["--shutdown-delay", "1500ms"]);
    assert_eq!(get_at(p.admin, "/readyz").await.expect("readyz").status.as_u16(), 200);
    proc.signal("-TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Within the delay: not ready, but new connections and requests are served.
    assert_eq!(get_at(p.admin, "/readyz").await.expect("readyz").status.as_u16(), 503);
    let r = get_at(p.listen, "/").await.expect("served during the delay");
    assert_eq!((r.status.as_u16(), r.backend()), (200, "b1"));
    // After it: the listener closes and the process exits 0.
    let status = tokio::task::spawn_blocking(move || proc.wait_exit(Duration::from_secs(10))).await.unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    assert!(tokio::net::TcpStream::connect(p.listen).await.is_err());
    std::fs::remove_dir_all(dir).ok();
}

/// Starts the binary with `yaml` plus a listener and an admin address of its own.
fn start_yaml(name: &str, yaml: &str) -> (Running, PathBuf, SocketAddr, SocketAddr) {
    let dir = temp_dir(name);
    let (listen, admin) = (free_addr(), free_addr());
    let config = dir.join("fulcrum.yaml");
    write(&config, &format!("listen: {listen}\nadmin: {admin}\n{yaml}"));
    (start(&config, listen), dir, listen, admin)
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The abuse suite against the binary: thousands of connections that send
/// nothing, dribble a head or open HTTP/2 and no stream, and an HTTP/2 client
/// resetting streams as fast as it can, all at once. The proxy's memory stays
/// bounded, every abusive connection is let go after its timeout, and a
/// well-behaved client running alongside sees no failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abusive_clients_cost_bounded_memory_and_no_failure_of_a_good_client() {
    use tokio::io::AsyncWriteExt;
    let bs = backends(2).await;
    let (proxy, dir, listen, admin) =
        start_yaml("abuse", &format!("workers: 2\ntimeouts: {{header: 2s, idle: 3s}}\n{}", endpoints_yaml(&bs)));
    let pid = proxy.0.id();
    let idle_rss = rss_kib(pid);

    // The good client.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let good = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 5000 {
                n += 1;
                match get_at(listen, "/").await {
                    Ok(r) if r.status == 200 => {}
                    Ok(r) => failures.push(format!("status {}", r.status)),
                    Err(e) => failures.push(e),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (n, failures)
        })
    };

    // 2 000 silent, 2 000 slowloris, 2 000 idle HTTP/2 connections.
    let mut abusers = Vec::new();
    for i in 0..6000 {
        let Ok(mut s) = tokio::net::TcpStream::connect(listen).await else { continue };
        let first: &[u8] = match i % 3 {
            0 => b"",
            1 => b"GET / HTTP/1.1\r\nHost: x\r\n",
            _ => b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
        };
        let _ = s.write_all(first).await;
        abusers.push(s);
    }
    // Slowloris: a header byte a second to a third of them.
    let drip = tokio::spawn(async move {
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            for (i, s) in abusers.iter_mut().enumerate() {
                if i % 3 == 1 {
                    let _ = s.write_all(b"X").await;
                }
            }
        }
        abusers
    });
    // Rapid reset: streams opened and cancelled at once, on one connection.
    let reset = tokio::spawn(async move {
        let Ok(stream) = tokio::net::TcpStream::connect(listen).await else { return 0 };
        let Ok((sender, conn)) = hyper::client::conn::http2::handshake::<_, _, http_body_util::Full<bytes::Bytes>>(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        else {
            return 0;
        };
        let conn = tokio::spawn(conn);
        let mut sent = 0;
        for _ in 0..5000 {
            let mut sender = sender.clone();
            let req = http::Request::get(format!("http://{listen}/")).body(Default::default()).unwrap();
            // Dropping the response future resets the stream.
            let _ = tokio::time::timeout(Duration::from_micros(1), sender.send_request(req)).await;
            sent += 1;
            if sender.is_closed() {
                break;
            }
        }
        conn.abort();
        sent
    });

    tokio::time::sleep(Duration::from_secs(2)).await;
    let peak = rss_kib(pid);
    let resets = reset.await.unwrap();
    let mut abusers = drip.await.unwrap();
    // Every abusive connection is closed by the proxy within its timeouts.
    let mut open = 0;
    for s in &mut abusers {
        let mut buf = [0u8; 256];
        let closed = loop {
            match tokio::time::timeout(Duration::from_secs(6), tokio::io::AsyncReadExt::read(s, &mut buf)).await {
                Err(_) => break false,
                Ok(Ok(0) | Err(_)) => break true,
                Ok(Ok(_)) => {}
            }
        };
        open += usize::from(!closed);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (requests, failures) = good.await.unwrap();
    eprintln!(
        "{} abusive connections, {resets} reset streams: RSS {idle_rss} KiB idle, {peak} KiB at peak; {requests} good requests",
        abusers.len()
    );
    assert_eq!(open, 0, "abusive connections still open past their timeouts");
    assert_eq!(failures, Vec::<String>::new(), "the good client failed");
    assert!(peak < 256 * 1024, "{peak} KiB resident with 6 000 abusive connections");
    let m = get_at(admin, "/metrics").await.unwrap().body;
    assert!(m.contains("fulcrum_proxy_client_timeouts_total{timeout=\"header\"}"), "{m}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// TCP mode: 5 000 idle client connections, each joined to an endpoint
/// connection, keep the proxy's memory bounded (the copy buffers wait for a
/// first byte), and are closed after `timeouts.idle`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tcp_connections_are_cheap_and_closed_after_idle() {
    let bs = backends(1).await;
    // All 5 000 on one endpoint: its circuit breaker (1 024 connections by default) raised.
    let yaml = format!(
        "protocol: TCP\ntimeouts: {{idle: 3s}}\ncircuitBreakers: {{maxRequests: 10000, maxConnections: 10000}}\n{}",
        endpoints_yaml(&bs)
    );
    let (proxy, dir, listen, _admin) = start_yaml("tcp-idle", &yaml);
    let pid = proxy.0.id();
    let before = rss_kib(pid);
    let mut idle = Vec::new();
    for _ in 0..5000 {
        if let Ok(s) = tokio::net::TcpStream::connect(listen).await {
            idle.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = rss_kib(pid);
    let per_connection = (during.saturating_sub(before)) as f64 / idle.len() as f64;
    eprintln!(
        "{} idle TCP connections: {before} KiB before, {during} KiB during, {per_connection:.1} KiB each",
        idle.len()
    );
    // A loose bound for a loaded machine; the figure itself is a benchmark's.
    assert!(during < 256 * 1024, "{during} KiB resident with 5 000 idle TCP connections");
    // The good client still gets through, and the idle ones are let go.
    assert_eq!(get_at(listen, "/").await.unwrap().status, 200);
    let mut open = 0;
    for s in &mut idle {
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(6), tokio::io::AsyncReadExt::read(s, &mut buf)).await;
        open += usize::from(r.is_err());
    }
    assert_eq!(open, 0, "idle TCP connections past timeouts.idle");
    let _ = std::fs::remove_dir_all(&dir);
}
