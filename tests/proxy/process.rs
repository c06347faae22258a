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
