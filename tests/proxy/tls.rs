//! TLS through the proxy, with clients and servers that are not Fulcrum's:
//! curl (OpenSSL) and rustls clients at the listener, a tonic client over
//! TLS, and rustls backends that require client certificates. Every
//! certificate is made at test time (rcgen), none is checked in.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

use fulcrum::proxy::ProxyHandle;

use crate::support::*;

/// A certificate authority and the files made with it, in a temporary directory.
struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM.
struct Issued {
    cert: String,
    key: String,
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("fulcrum-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("{tag} test CA"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
        let pki = Pki { dir, ca };
        pki.write("ca.pem", &pki.ca.pem());
        pki
    }

    /// A certificate for `names` (DNS names or IP addresses) with common name `cn`.
    fn issue(&self, names: &[&str], cn: &str, expired: bool) -> Issued {
        let key = KeyPair::generate().expect("key");
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.ca).expect("sign");
        Issued { cert: cert.pem(), key: key.serialize_pem() }
    }

    /// Writes `file` as the kubelet updates a Secret volume: the new content
    /// appears at once, whole (written aside, then renamed over).
    fn write(&self, file: &str, text: &str) -> PathBuf {
        let path = self.dir.join(file);
        let aside = self.dir.join(format!(".{file}.new"));
        std::fs::write(&aside, text).expect("write");
        std::fs::rename(&aside, &path).expect("rename");
        path
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What a TLS client saw.
#[derive(Debug)]
struct Seen {
    alpn: Option<Vec<u8>>,
    leaf: Vec<u8>,
    status: u16,
    body: String,
}

/// A rustls client trusting `roots`, offering `alpn`, with an optional client certificate.
fn client_config(roots: &[CertificateDer<'static>], alpn: &[&[u8]], identity: Option<&Issued>) -> Arc<ClientConfig> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(store);
    let mut config = match identity {
        Some(id) => {
            let chain = CertificateDer::pem_slice_iter(id.cert.as_bytes()).collect::<Result<Vec<_>, _>>().expect("pem");
            let key = PrivateKeyDer::from_pem_slice(id.key.as_bytes()).expect("key");
            builder.with_client_auth_cert(chain, key).expect("client cert")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(config)
}

/// One GET of `path` over a new TLS connection to `addr` with SNI `sni`,
/// over HTTP/2 when the server chose `h2`, else HTTP/1.1.
async fn get(addr: std::net::SocketAddr, sni: &str, config: Arc<ClientConfig>, path: &str) -> Result<Seen, String> {
    let exchange = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from(sni.to_owned()).map_err(|e| e.to_string())?;
        let tls =
            tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map_err(|e| format!("handshake: {e}"))?;
        let (_, session) = tls.get_ref();
        let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
        let leaf = session.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default();
        let req =
            http::Request::get(path).header("host", sni).body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
        let resp = if alpn.as_deref() == Some(b"h2") {
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .map_err(|e| format!("h2: {e}"))?;
            tokio::spawn(conn);
            let mut req = req;
            *req.uri_mut() = format!("https://{sni}{path}").parse().map_err(|e| format!("{e}"))?;
            send.send_request(req).await.map_err(|e| format!("request: {e:?}"))?
        } else {
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| format!("h1: {e}"))?;
            tokio::spawn(conn);
            send.send_request(req).await.map_err(|e| format!("request: {e:?}"))?
        };
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
        Ok(Seen { alpn, leaf, status, body: String::from_utf8_lossy(&body).into_owned() })
    };
    tokio::time::timeout(Duration::from_secs(10), exchange).await.map_err(|_| "timed out".to_owned())?
}

/// How the proxy refuses a client: a TLS 1.3 server checks the client's
/// certificate after the client has finished its handshake, so the refusal
/// (an alert) is what the client reads next. Returns that error.
async fn refusal(addr: std::net::SocketAddr, config: Arc<ClientConfig>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from("a.example").map_err(|e| e.to_string())?;
        let mut tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map_err(|e| e.to_string())?;
        // The request may or may not be written before the alert arrives.
        let _ = tls.write_all(b"GET / HTTP/1.1\r\nhost: a.example\r\n\r\n").await;
        let mut buf = [0u8; 512];
        match tls.read(&mut buf).await {
            Ok(0) => Err("closed without an alert".to_owned()),
            Ok(n) => Ok(format!("answered: {}", String::from_utf8_lossy(&buf[..n]))),
            Err(e) => Err(e.to_string()),
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Ok(Err(e)) => e,
        Ok(Ok(answer)) => panic!("not refused: {answer}"),
        Err(_) => panic!("timed out"),
    }
}

/// Waits (up to 5 s) for the proxy's metrics to show `line`: the proxy
/// counts a failed handshake once its side of it has ended, which may be
/// just after the client has seen the alert.
async fn counted(p: &ProxyHandle, line: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = admin(p, "/metrics").await.body;
        if m.lines().any(|l| l == line) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "no {line:?} in\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn der_of(pem: &str) -> Vec<u8> {
    CertificateDer::pem_slice_iter(pem.as_bytes()).next().expect("a certificate").expect("pem").to_vec()
}

/// A proxy terminating TLS with `a.example` (default) and `b.example`.
async fn two_names(pki: &Pki, extra: &str, backends: &[Backend]) -> (ProxyHandle, Issued, Issued) {
    let a = pki.issue(&["a.example", "127.0.0.1"], "a.example", false);
    let b = pki.issue(&["b.example", "*.b.example"], "b.example", false);
    for (name, id) in [("a", &a), ("b", &b)] {
        pki.write(&format!("{name}.crt"), &id.cert);
        pki.write(&format!("{name}.key"), &id.key);
    }
    let yaml = format!(
        "tls:\n  certificates:\n    - {{certFile: {}, keyFile: {}}}\n    - {{certFile: {}, keyFile: {}}}\n{extra}{}",
        pki.path("a.crt").display(),
        pki.path("a.key").display(),
        pki.path("b.crt").display(),
        pki.path("b.key").display(),
        endpoints_yaml(backends)
    );
    (proxy1(&yaml).await, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_chooses_the_certificate_by_sni_and_negotiates_h2_or_http1() {
    let pki = Pki::new("sni");
    let bs = backends(2).await;
    let (p, a, b) = two_names(&pki, "", &bs).await;
    let roots = [pki.ca_der()];
    // SNI picks the certificate; a wildcard name too; no match: the default.
    for (sni, want) in [("b.example", &b), ("api.b.example", &b), ("a.example", &a), ("other.example", &a)] {
        let config = client_config(&roots, &[b"http/1.1"], None);
        let seen = get(p.addr, sni, config, "/").await;
        if sni == "other.example" {
            // The default certificate is not for that name: the client refuses it.
            assert!(seen.is_err(), "{seen:?}");
            continue;
        }
        let seen = seen.unwrap_or_else(|e| panic!("{sni}: {e}"));
        assert_eq!(seen.leaf, der_of(&want.cert), "{sni} got the wrong certificate");
        assert_eq!((seen.status, seen.alpn.as_deref()), (200, Some(&b"http/1.1"[..])));
    }
    // ALPN: h2 when offered (a gRPC client's choice), http/1.1 otherwise.
    let seen = get(p.addr, "a.example", client_config(&roots, &[b"h2", b"http/1.1"], None), "/headers").await.unwrap();
    assert_eq!(seen.alpn.as_deref(), Some(&b"h2"[..]));
    assert!(seen.body.contains("x-forwarded-proto: https"), "{}", seen.body);
    // A client that trusts another authority refuses the proxy's certificate.
    let other = Pki::new("other");
    let refused = get(p.addr, "a.example", client_config(&[other.ca_der()], &[b"h2"], None), "/").await;
    assert!(refused.is_err_and(|e| e.contains("UnknownIssuer")), "refused with UnknownIssuer");
    let m = admin(&p, "/metrics").await.body;
    counted(&p, "fulcrum_proxy_tls_handshakes_total{result=\"ok\"} 4").await;
    assert!(m.contains("fulcrum_proxy_tls_connections_total{version=\"TLSv1.3\",alpn=\"h2\"} 1"), "{m}");
    counted(&p, "fulcrum_proxy_tls_handshakes_total{result=\"alert_received\"} 2").await;
    let expiry = m
        .lines()
        .find_map(|l| l.strip_prefix("fulcrum_proxy_tls_certificate_expiry_seconds "))
        .map(|v| v.parse::<i64>());
    assert!(matches!(expiry, Some(Ok(s)) if s > 86_400 * 300), "{expiry:?}");
    let doc: serde_json::Value = serde_json::from_str(&admin(&p, "/endpoints").await.body).expect("JSON");
    assert_eq!((doc["tls"]["terminates"].as_bool(), doc["tls"]["endpoints"].as_bool()), (Some(true), Some(false)));
    assert!(doc["tls"]["certificateExpirySeconds"].as_i64().is_some_and(|s| s > 86_400 * 300), "{doc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_and_an_old_tls_version_are_refused() {
    let pki = Pki::new("versions");
    let bs = backends(1).await;
    let expired = pki.issue(&["a.example"], "a.example", true);
    pki.write("x.crt", &expired.cert);
    pki.write("x.key", &expired.key);
    let current = pki.issue(&["a.example"], "a.example", false);
    pki.write("c.crt", &current.cert);
    pki.write("c.key", &current.key);
    let files = |name: &str| {
        format!(
            "{{certFile: {}, keyFile: {}}}",
            pki.path(&format!("{name}.crt")).display(),
            pki.path(&format!("{name}.key")).display()
        )
    };
    let p = proxy1(&format!("tls: {{certificates: [{}]}}\n{}", files("x"), endpoints_yaml(&bs))).await;
    // Known from the first scrape, before the files are read again.
    let m = admin(&p, "/metrics").await.body;
    let roots = [pki.ca_der()];
    let seen = get(p.addr, "a.example", client_config(&roots, &[b"http/1.1"], None), "/").await;
    assert!(seen.as_ref().is_err_and(|e| e.contains("certificate expired")), "{seen:?}");
    counted(&p, "fulcrum_proxy_tls_handshakes_total{result=\"alert_received\"} 1").await;
    let expiry = m
        .lines()
        .find_map(|l| l.strip_prefix("fulcrum_proxy_tls_certificate_expiry_seconds "))
        .map(|v| v.parse::<i64>());
    assert!(matches!(expiry, Some(Ok(s)) if s < 0), "an expired certificate counts down below zero: {expiry:?}");
    // minVersion 1.3: a client that speaks only TLS 1.2 is refused with protocol_version.
    let p =
        proxy1(&format!("tls: {{certificates: [{}], minVersion: \"1.3\"}}\n{}", files("c"), endpoints_yaml(&bs))).await;
    let mut store = RootCertStore::empty();
    store.add(pki.ca_der()).expect("root");
    let tls12 = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .expect("versions")
        .with_root_certificates(store)
        .with_no_client_auth();
    let old = get(p.addr, "a.example", Arc::new(tls12), "/").await;
    assert!(old.as_ref().is_err_and(|e| e.contains("ProtocolVersion")), "{old:?}");
    assert!(get(p.addr, "a.example", client_config(&roots, &[b"h2"], None), "/").await.is_ok_and(|s| s.status == 200));
    counted(&p, "fulcrum_proxy_tls_handshakes_total{result=\"incompatible\"} 1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_speaks_https_and_http2_through_the_proxy() {
    let pki = Pki::new("curl");
    let bs = backends(1).await;
    let (p, _, _) = two_names(&pki, "", &bs).await;
    let port = p.addr.port();
    for (flag, want) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "10", flag, "--cacert"])
            .arg(pki.path("ca.pem"))
            .args(["--resolve", &format!("b.example:{port}:127.0.0.1")])
            .args(["-w", "\n%{http_version} %{http_code}", &format!("https://b.example:{port}/headers")])
            .output()
            .await
            .expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "curl {flag}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(text.ends_with(&format!("{want} 200")), "curl {flag}: {text}");
        assert!(text.contains("x-forwarded-proto: https"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_verified_and_forwarded_never_forged() {
    let pki = Pki::new("mtls");
    let bs = backends(2).await;
    let extra = format!("  clientAuth: {{caFile: {}}}\n", pki.path("ca.pem").display());
    let (p, _, _) = two_names(&pki, &extra, &bs).await;
    let roots = [pki.ca_der()];
    let alice = pki.issue(&["alice.clients.example"], "alice", false);
    let seen = get(p.addr, "a.example", client_config(&roots, &[b"http/1.1"], Some(&alice)), "/headers").await.unwrap();
    let xfcc = seen.body.lines().find(|l| l.starts_with("x-forwarded-client-cert: ")).expect("XFCC set");
    assert!(xfcc.contains("Subject=\"CN=alice\"") && xfcc.contains("DNS=alice.clients.example"), "{xfcc}");
    assert!(xfcc.contains("Hash=") && xfcc.len() > 64, "{xfcc}");
    // No certificate: refused (TLS 1.3 reports it on the first read).
    let none = refusal(p.addr, client_config(&roots, &[b"http/1.1"], None)).await;
    assert!(none.contains("CertificateRequired"), "{none}");
    // An expired certificate, and one from another authority: refused.
    let expired = pki.issue(&["old.clients.example"], "old", true);
    let old = refusal(p.addr, client_config(&roots, &[b"http/1.1"], Some(&expired))).await;
    assert!(old.contains("CertificateExpired"), "{old}");
    let other = Pki::new("mtls-other").issue(&["mallory.example"], "mallory", false);
    let forged = refusal(p.addr, client_config(&roots, &[b"http/1.1"], Some(&other))).await;
    assert!(forged.contains("UnknownCA"), "{forged}");
    counted(&p, "fulcrum_proxy_tls_handshakes_total{result=\"no_client_certificate\"} 1").await;
    counted(&p, "fulcrum_proxy_tls_handshakes_total{result=\"bad_client_certificate\"} 2").await;
    // curl with a client certificate, sending its own XFCC: replaced by the verified one.
    pki.write("alice.crt", &alice.cert);
    pki.write("alice.key", &alice.key);
    let port = p.addr.port();
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(pki.path("ca.pem"))
        .arg("--cert")
        .arg(pki.path("alice.crt"))
        .arg("--key")
        .arg(pki.path("alice.key"))
        .args(["-H", "x-forwarded-client-cert: Subject=\"CN=admin\""])
        .args(["--resolve", &format!("a.example:{port}:127.0.0.1"), &format!("https://a.example:{port}/headers")])
        .output()
        .await
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("Subject=\"CN=alice\"") && !text.contains("CN=admin"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_certificate_subject_is_a_consistent_hash_key() {
    let pki = Pki::new("hash");
    let bs = backends(4).await;
    let extra = format!(
        "  clientAuth: {{caFile: {}}}\nloadBalancing: {{algorithm: ConsistentHash, hashOn: {{clientCertificate: true}}}}\n",
        pki.path("ca.pem").display()
    );
    let (p, _, _) = two_names(&pki, &extra, &bs).await;
    let roots = [pki.ca_der()];
    for user in ["u1", "u2", "u3", "u4", "u5", "u6"] {
        let id = pki.issue(&[&format!("{user}.example")], user, false);
        let config = client_config(&roots, &[b"http/1.1"], Some(&id));
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..4 {
            // A new connection each time: the key is the subject, not the connection.
            let body = get(p.addr, "a.example", config.clone(), "/headers").await.expect("request").body;
            seen.insert(body.lines().find(|l| l.starts_with("x-forwarded-client-cert")).map(str::to_owned));
        }
        assert_eq!(seen.len(), 1, "{user}: one certificate");
    }
    assert!(bs.iter().filter(|b| b.hits() > 0).count() >= 2, "subjects spread over endpoints");
    assert!(
        bs.iter().all(|b| b.hits() % 4 == 0),
        "each subject stays on one endpoint: {:?}",
        bs.iter().map(Backend::hits).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificates_apply_without_a_failed_request_and_a_bad_set_is_refused() {
    let pki = Pki::new("rotate");
    let bs = backends(2).await;
    let (p, a, _) = two_names(&pki, "", &bs).await;
    let roots = [pki.ca_der()];
    let config = client_config(&roots, &[b"http/1.1"], None);
    // Continuous traffic, a new connection (a new handshake) per request.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (stop, config, addr) = (stop.clone(), config.clone(), p.addr);
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            for _ in 0..5000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                match get(addr, "a.example", config.clone(), "/").await {
                    Ok(s) if s.status == 200 => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed)
        })
    };
    let leaf = || async {
        get(p.addr, "a.example", client_config(&[pki.ca_der()], &[b"h2"], None), "/").await.map(|s| s.leaf)
    };
    assert_eq!(leaf().await.expect("first"), der_of(&a.cert));
    // The Secret is updated: the new certificate serves new handshakes.
    let renewed = pki.issue(&["a.example"], "a.example renewed", false);
    pki.write("a.key", &renewed.key);
    pki.write("a.crt", &renewed.cert);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while leaf().await.ok() != Some(der_of(&renewed.cert)) {
        assert!(tokio::time::Instant::now() < deadline, "the renewed certificate never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A key that does not fit the certificate: refused, the renewed set stays.
    let stray = pki.issue(&["a.example"], "stray", false);
    pki.write("a.key", &stray.key);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !admin(&p, "/metrics").await.body.contains("fulcrum_proxy_tls_reloads_total{result=\"refused\"} 1") {
        assert!(tokio::time::Instant::now() < deadline, "the bad key was not refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(leaf().await.expect("still serving"), der_of(&renewed.cert));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = traffic.await.expect("traffic");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during rotation: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(ok > 10, "{ok} requests");
    let m = admin(&p, "/metrics").await.body;
    assert!(m.contains("fulcrum_proxy_tls_reloads_total{result=\"applied\"}"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_starts_its_handshake_is_let_go_after_the_header_timeout() {
    use tokio::io::AsyncReadExt;
    let pki = Pki::new("silent");
    let bs = backends(1).await;
    let (p, _, _) = two_names(&pki, "timeouts: {header: 300ms}\n", &bs).await;
    let mut silent = TcpStream::connect(p.addr).await.expect("connect");
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await.expect("closed in time");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    counted(&p, "fulcrum_proxy_tls_handshakes_total{result=\"timeout\"} 1").await;
}

#[test]
fn an_unusable_certificate_file_exits_2_naming_the_field() {
    let pki = Pki::new("check");
    let a = pki.issue(&["a.example"], "a", false);
    let b = pki.issue(&["a.example"], "b", false);
    pki.write("a.crt", &a.cert);
    pki.write("b.key", &b.key);
    let config = pki.write(
        "proxy.yaml",
        &format!(
            "listen: 127.0.0.1:0\ntls:\n  certificates:\n    - {{certFile: {}, keyFile: {}}}\nendpoints: [{{address: \"127.0.0.2:80\"}}]\n",
            pki.path("a.crt").display(),
            pki.path("b.key").display()
        ),
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["proxy", "--check", "--config"])
        .arg(&config)
        .output()
        .expect("run fulcrum");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("tls.certificates[0].keyFile") && err.lines().count() == 1, "{err}");
}

/// A backend serving HTTPS (rustls) that requires a client certificate from
/// `client_ca`, and answers with its name and whether one was presented.
async fn tls_backend(
    pki: &Pki,
    host: u8,
    client_ca: Option<&Pki>,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let id = pki.issue(&[&format!("127.0.0.{host}"), "backend.internal"], "backend", false);
    let chain = CertificateDer::pem_slice_iter(id.cert.as_bytes()).collect::<Result<Vec<_>, _>>().expect("pem");
    let key = PrivateKeyDer::from_pem_slice(id.key.as_bytes()).expect("key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = match client_ca {
        Some(ca) => {
            let mut store = RootCertStore::empty();
            store.add(ca.ca_der()).expect("root");
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider)
                .build()
                .expect("verifier");
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).expect("server config");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::new(127, 0, 0, host), 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let with_cert = tls.get_ref().1.peer_certificates().is_some();
                let svc = hyper::service::service_fn(move |_req| async move {
                    let body = format!("tls-backend client-cert={with_cert}");
                    Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(Bytes::from(body))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

async fn plain_get(p: &ProxyHandle) -> Reply {
    let req = http::Request::get(format!("http://{}/", p.addr)).body(Default::default()).expect("request");
    send(&client(), req).await.expect("response")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_over_tls_are_verified_and_get_a_client_certificate() {
    let server_pki = Pki::new("upstream");
    let client_pki = Pki::new("upstream-clients");
    let (addr, _task) = tls_backend(&server_pki, 40, Some(&client_pki)).await;
    let me = client_pki.issue(&["proxy.internal"], "fulcrum-proxy", false);
    let cert = client_pki.write("proxy.crt", &me.cert);
    let key = client_pki.write("proxy.key", &me.key);
    let ca = server_pki.path("ca.pem");
    let endpoint = format!(
        "endpoints: [{{address: \"{addr}\"}}]\nhealthCheck: {{active: {{http: {{path: /healthz}}, interval: 1s}}}}\n"
    );
    let yaml = |tls: String| format!("endpointTls: {tls}\n{endpoint}");
    // Verified by IP SAN, with the client certificate: answered, the health check passing over TLS.
    let p = proxy1(&yaml(format!(
        "{{caFile: {}, certFile: {}, keyFile: {}}}",
        ca.display(),
        cert.display(),
        key.display()
    )))
    .await;
    let r = plain_get(&p).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "tls-backend client-cert=true"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(plain_get(&p).await.status.as_u16(), 200, "the active check passes over TLS");
    // By name (SNI and verification).
    let p = proxy1(&yaml(format!(
        "{{caFile: {}, serverName: backend.internal, certFile: {}, keyFile: {}}}",
        ca.display(),
        cert.display(),
        key.display()
    )))
    .await;
    assert_eq!(plain_get(&p).await.status.as_u16(), 200);
    // Without the client certificate the endpoint refuses the proxy: 502
    // (or 503 once the failing health check has taken it out).
    let refused = |status: u16| status == 502 || status == 503;
    let p = proxy1(&yaml(format!("{{caFile: {}}}", ca.display()))).await;
    assert!(refused(plain_get(&p).await.status.as_u16()));
    // Trusting another authority: the endpoint's certificate is refused (502);
    // with verification off it is accepted.
    let other = Pki::new("upstream-other");
    let p = proxy1(&yaml(format!(
        "{{caFile: {}, certFile: {}, keyFile: {}}}",
        other.path("ca.pem").display(),
        cert.display(),
        key.display()
    )))
    .await;
    assert!(refused(plain_get(&p).await.status.as_u16()));
    let p = proxy1(&yaml(format!(
        "{{insecureSkipVerify: true, certFile: {}, keyFile: {}}}",
        cert.display(),
        key.display()
    )))
    .await;
    assert_eq!(plain_get(&p).await.status.as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_end_to_end() {
    use crate::grpc_peer::{EchoClient, grpc_backends, msg};
    let pki = Pki::new("grpc");
    let gs = grpc_backends(2, 44, None).await;
    let mut endpoints = String::from("appProtocol: GRPC\nendpoints:\n");
    for g in &gs {
        endpoints.push_str(&format!("  - {{address: \"{}\"}}\n", g.addr));
    }
    let id = pki.issue(&["grpc.example"], "grpc.example", false);
    pki.write("g.crt", &id.cert);
    pki.write("g.key", &id.key);
    let yaml = format!(
        "tls:\n  certificates: [{{certFile: {}, keyFile: {}}}]\nloadBalancing: {{algorithm: RoundRobin}}\n{endpoints}",
        pki.path("g.crt").display(),
        pki.path("g.key").display()
    );
    let p = proxy1(&yaml).await;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(pki.ca.pem()))
        .domain_name("grpc.example");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", p.addr))
        .expect("uri")
        .tls_config(tls)
        .expect("tls config")
        .connect()
        .await
        .expect("connect over TLS");
    let mut c = EchoClient::new(channel);
    let mut servers = std::collections::BTreeMap::new();
    for _ in 0..10 {
        let answer = c.unary(tonic::Request::new(msg(32))).await.expect("call over TLS");
        *servers.entry(answer.server).or_insert(0) += 1;
    }
    assert_eq!(servers, std::collections::BTreeMap::from([("g1".to_owned(), 5), ("g2".to_owned(), 5)]));
    let m = admin(&p, "/metrics").await.body;
    assert!(m.contains("fulcrum_proxy_tls_connections_total{version=\"TLSv1.3\",alpn=\"h2\"} 1"), "{m}");
}
