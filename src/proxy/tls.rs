//! TLS with rustls (the `ring` provider, which builds statically for the musl
//! image): termination at the listener, with certificates chosen by SNI,
//! ALPN `h2`/`http/1.1` and optional client-certificate verification; and TLS
//! to the endpoints, verified against a CA bundle, with an optional client
//! certificate.
//!
//! The material (every certificate, key and CA file) is loaded as one set.
//! `watch` reads the files again every [`POLL`] and swaps in a changed set
//! for new handshakes, while open connections keep theirs: that is how a
//! Kubernetes Secret volume update (the kubelet swaps a `..data` symlink)
//! reaches the proxy. A set that does not load (a key that does not match
//! its certificate, a truncated file) is refused with a log line and a
//! failure count, and the last good set stays.

use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::net::TcpStream;

use super::config::{ClientAuth, EndpointTls, ProxyConfig, Tls, TlsVersion};

/// How often the files are read again to see a rotation.
pub const POLL: Duration = Duration::from_secs(1);

/// TLS material that cannot be used, naming the setting.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct TlsError {
    field: String,
    message: String,
}

fn error(field: impl Into<String>, message: impl std::fmt::Display) -> TlsError {
    TlsError { field: field.into(), message: message.to_string() }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What connecting to an endpoint over TLS needs.
#[derive(Debug)]
pub(crate) struct EndpointConnector {
    config: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

impl EndpointConnector {
    /// A TLS session over `tcp` to the endpoint at `ip`.
    pub(crate) async fn connect(
        &self,
        ip: IpAddr,
        tcp: TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = self.server_name.clone().unwrap_or(ServerName::IpAddress(ip.into()));
        tokio_rustls::TlsConnector::from(self.config.clone()).connect(name, tcp).await
    }
}

/// One loaded set of material.
struct Material {
    fingerprint: u64,
    server: Option<Arc<ServerConfig>>,
    endpoint: Option<Arc<EndpointConnector>>,
    /// The earliest `notAfter` of the certificates the proxy presents (Unix seconds).
    not_after: Option<i64>,
}

/// The TLS state of one proxy: the set in use, swapped on rotation.
#[derive(Default)]
pub(crate) struct TlsState {
    server: ArcSwapOption<ServerConfig>,
    endpoint: ArcSwapOption<EndpointConnector>,
    /// The fingerprint of the set in use, and of the last refused one (logged once).
    loaded: Mutex<(u64, u64)>,
    not_after: AtomicI64,
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsState").field("terminates", &self.server.load().is_some()).finish_non_exhaustive()
    }
}

/// What a reload did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reload {
    /// Nothing changed.
    Same,
    /// A new set is in use.
    Applied,
    /// The new set was refused (and already reported); the old one stays.
    Refused,
}

impl TlsState {
    /// The state for `config`, or why its material cannot be used.
    pub(crate) fn load(config: &ProxyConfig) -> Result<Self, TlsError> {
        let state = TlsState::default();
        state.install(Material::load(config)?);
        Ok(state)
    }

    /// Loads `config`'s material now (new settings), or refuses them.
    pub(crate) fn replace(&self, config: &ProxyConfig) -> Result<(), TlsError> {
        self.install(Material::load(config)?);
        Ok(())
    }

    fn install(&self, m: Material) {
        self.server.store(m.server);
        self.endpoint.store(m.endpoint);
        self.not_after.store(m.not_after.unwrap_or(i64::MAX), Ordering::Relaxed);
        self.loaded.lock().unwrap_or_else(std::sync::PoisonError::into_inner).0 = m.fingerprint;
    }

    /// Loads `config`'s material if it differs from the set in use. A set
    /// that fails is logged once (until it changes again) and refused.
    pub(crate) fn reload(&self, config: &ProxyConfig) -> Reload {
        let fingerprint = match fingerprint(config) {
            Ok(f) => f,
            Err(e) => return self.refuse(0, &e),
        };
        let (in_use, refused) = *self.loaded.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if fingerprint == in_use || fingerprint == refused {
            return Reload::Same;
        }
        match Material::load(config) {
            Ok(m) => {
                tracing::info!("TLS certificates, keys or CAs changed: new handshakes use the new set");
                self.install(m);
                Reload::Applied
            }
            Err(e) => self.refuse(fingerprint, &e),
        }
    }

    fn refuse(&self, fingerprint: u64, e: &TlsError) -> Reload {
        let mut loaded = self.loaded.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if fingerprint != 0 && loaded.1 == fingerprint {
            return Reload::Same;
        }
        loaded.1 = fingerprint;
        tracing::error!(error = %e, "new TLS material refused; the last good set stays in use");
        Reload::Refused
    }

    /// The listener's configuration, when it terminates TLS.
    pub(crate) fn server(&self) -> Option<Arc<ServerConfig>> {
        self.server.load_full()
    }

    /// The endpoints' connector, when they are reached over TLS.
    pub(crate) fn endpoint(&self) -> Option<Arc<EndpointConnector>> {
        self.endpoint.load_full()
    }

    /// Seconds until the earliest presented certificate expires (negative
    /// once expired), if the proxy presents any.
    pub(crate) fn seconds_to_expiry(&self) -> Option<i64> {
        let not_after = self.not_after.load(Ordering::Relaxed);
        (not_after != i64::MAX).then(|| not_after - unix_now())
    }
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Every file of the TLS settings, with the setting that names it.
fn files(config: &ProxyConfig) -> Vec<(String, &Path)> {
    let mut out = Vec::new();
    if let Some(t) = &config.tls {
        for (i, c) in t.certificates.iter().enumerate() {
            out.push((format!("tls.certificates[{i}].certFile"), c.cert_file.as_path()));
            out.push((format!("tls.certificates[{i}].keyFile"), c.key_file.as_path()));
        }
        if let Some(ca) = &t.client_auth {
            out.push(("tls.clientAuth.caFile".to_owned(), ca.ca_file.as_path()));
        }
    }
    if let Some(e) = &config.endpoint_tls {
        for (field, path) in [("caFile", &e.ca_file), ("certFile", &e.cert_file), ("keyFile", &e.key_file)] {
            if let Some(p) = path {
                out.push((format!("endpointTls.{field}"), p.as_path()));
            }
        }
    }
    out
}

fn read(field: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| error(field, format_args!("cannot read {}: {e}", path.display())))
}

/// A hash of the settings and of every file's content.
fn fingerprint(config: &ProxyConfig) -> Result<u64, TlsError> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(format!("{:?}{:?}", config.tls, config.endpoint_tls).as_bytes());
    for (field, path) in files(config) {
        h.update(&read(&field, path)?);
    }
    Ok(h.digest() | 1)
}

impl Material {
    fn load(config: &ProxyConfig) -> Result<Material, TlsError> {
        let fingerprint = fingerprint(config)?;
        let provider = provider();
        let (server, not_after) = match &config.tls {
            Some(tls) => {
                let (server, not_after) = server_config(tls, &provider)?;
                (Some(Arc::new(server)), Some(not_after))
            }
            None => (None, None),
        };
        let endpoint = match &config.endpoint_tls {
            Some(e) => Some(Arc::new(endpoint_connector(e, config.app_protocol.is_http2(), &provider)?)),
            None => None,
        };
        Ok(Material { fingerprint, server, endpoint, not_after })
    }
}

fn certificates(field: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(field, path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| error(field, format_args!("{}: not PEM certificates: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(error(field, format_args!("{}: no certificate in the file", path.display())));
    }
    Ok(certs)
}

fn private_key(field: &str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(field, path)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| error(field, format_args!("{}: no PEM private key: {e}", path.display())))
}

fn roots(field: &str, path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certificates(field, path)? {
        store.add(cert).map_err(|e| error(field, format_args!("{}: {e}", path.display())))?;
    }
    Ok(Arc::new(store))
}

/// The DNS names a certificate is for (its SANs) and when it expires.
fn names_and_expiry(field: &str, der: &CertificateDer<'_>) -> Result<(Vec<String>, i64), TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| error(field, format_args!("the certificate does not parse: {e}")))?;
    let names = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok((names, cert.validity().not_after.timestamp()))
}

fn server_config(tls: &Tls, provider: &Arc<CryptoProvider>) -> Result<(ServerConfig, i64), TlsError> {
    let mut keys = Vec::new();
    let mut earliest = i64::MAX;
    for (i, c) in tls.certificates.iter().enumerate() {
        let cert_field = format!("tls.certificates[{i}].certFile");
        let key_field = format!("tls.certificates[{i}].keyFile");
        let chain = certificates(&cert_field, &c.cert_file)?;
        let (names, not_after) = names_and_expiry(&cert_field, &chain[0])?;
        earliest = earliest.min(not_after);
        let key = private_key(&key_field, &c.key_file)?;
        let certified = CertifiedKey::from_der(chain, key, provider)
            .map_err(|e| error(&key_field, format_args!("does not fit the certificate of certFile: {e}")))?;
        keys.push((names, Arc::new(certified)));
    }
    let versions: &[&'static rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| error("tls.minVersion", e))?;
    let builder = match &tls.client_auth {
        Some(ClientAuth { ca_file, required }) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(roots("tls.clientAuth.caFile", ca_file)?, provider.clone());
            let verifier = if *required { verifier } else { verifier.allow_unauthenticated() };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| error("tls.clientAuth.caFile", e))?)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(BySni { keys }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((config, earliest))
}

/// Chooses the certificate whose DNS names match the client's SNI; the first
/// one otherwise (no SNI, an IP address, or no match).
#[derive(Debug)]
struct BySni {
    keys: Vec<(Vec<String>, Arc<CertifiedKey>)>,
}

fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        // A wildcard covers exactly one label.
        Some(suffix) => name.split_once('.').is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => pattern == name,
    }
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = hello.server_name().and_then(|sni| {
            let sni = sni.to_ascii_lowercase();
            self.keys.iter().find(|(names, _)| names.iter().any(|p| name_matches(p, &sni)))
        });
        chosen.or(self.keys.first()).map(|(_, k)| k.clone())
    }
}

fn endpoint_connector(
    e: &EndpointTls,
    http2: bool,
    provider: &Arc<CryptoProvider>,
) -> Result<EndpointConnector, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|err| error("endpointTls", err))?;
    let builder = match (&e.ca_file, e.insecure_skip_verify) {
        (_, true) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate { provider: provider.clone() })),
        (Some(ca), false) => builder.with_root_certificates(roots("endpointTls.caFile", ca)?),
        (None, false) => return Err(error("endpointTls.caFile", "is required unless insecureSkipVerify is set")),
    };
    let mut config = match (&e.cert_file, &e.key_file) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(
                certificates("endpointTls.certFile", cert)?,
                private_key("endpointTls.keyFile", key)?,
            )
            .map_err(|err| error("endpointTls.keyFile", format_args!("does not fit certFile: {err}")))?,
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![if http2 { b"h2".to_vec() } else { b"http/1.1".to_vec() }];
    let server_name = match &e.server_name {
        Some(n) => Some(
            ServerName::try_from(n.clone())
                .map_err(|_| error("endpointTls.serverName", format_args!("{n:?} is not a DNS name or IP address")))?,
        ),
        None => None,
    };
    Ok(EndpointConnector { config: Arc::new(config), server_name })
}

/// `insecureSkipVerify`: any certificate is accepted; the handshake's
/// signatures are still checked (the session is encrypted, not authenticated).
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A terminated client connection's verified certificate, as the request
/// path uses it.
#[derive(Debug)]
pub(crate) struct ClientCert {
    /// `X-Forwarded-Client-Cert` (Envoy's format): `Hash=…;Subject="…"`, and
    /// `URI=`/`DNS=` for the certificate's SANs.
    pub(crate) xfcc: HeaderValue,
    /// The consistent-hashing key of its subject.
    pub(crate) subject_hash: u64,
}

impl ClientCert {
    /// From the leaf certificate the client presented (already verified).
    pub(crate) fn from_der(der: &[u8]) -> Option<ClientCert> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let subject = cert.subject().to_string();
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut xfcc = String::from("Hash=");
        for b in digest.as_ref() {
            xfcc.push_str(&format!("{b:02x}"));
        }
        xfcc.push_str(";Subject=\"");
        xfcc.push_str(&subject.replace('\\', "\\\\").replace('"', "\\\""));
        xfcc.push('"');
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    x509_parser::extensions::GeneralName::URI(u) => xfcc.push_str(&format!(";URI={u}")),
                    x509_parser::extensions::GeneralName::DNSName(d) => xfcc.push_str(&format!(";DNS={d}")),
                    _ => {}
                }
            }
        }
        Some(ClientCert {
            xfcc: HeaderValue::from_str(&xfcc).ok()?,
            subject_hash: crate::balance::hash_key(subject.as_bytes()),
        })
    }
}

/// Loads every TLS file of `config` as the proxy would, or says which
/// setting is wrong (`fulcrum proxy --check`, and before binding).
pub fn check(config: &ProxyConfig) -> Result<(), TlsError> {
    Material::load(config).map(|_| ())
}

/// Why a handshake failed, as the metric's `result` label.
pub(crate) fn failure_reason(e: &std::io::Error) -> &'static str {
    let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) else {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => "closed",
            _ => "error",
        };
    };
    match tls {
        rustls::Error::NoCertificatesPresented => "no_client_certificate",
        rustls::Error::InvalidCertificate(_) => "bad_client_certificate",
        rustls::Error::PeerIncompatible(_) => "incompatible",
        rustls::Error::AlertReceived(_) => "alert_received",
        rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. }
        | rustls::Error::InvalidMessage(_) => "protocol_error",
        _ => "error",
    }
}

/// Reads the files again every [`POLL`] for as long as the proxy runs,
/// applying a changed set and counting the outcome.
pub(crate) async fn watch(shared: Arc<super::Shared>) {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let config = shared.runtime().config.clone();
        if config.tls.is_none() && config.endpoint_tls.is_none() {
            continue;
        }
        let state = shared.tls.clone();
        let outcome = tokio::task::spawn_blocking(move || state.reload(&config)).await;
        match outcome {
            Ok(Reload::Applied) => shared.metrics.tls_reload(true),
            Ok(Reload::Refused) => shared.metrics.tls_reload(false),
            Ok(Reload::Same) | Err(_) => {}
        }
        shared.metrics.tls_expiry(shared.tls.seconds_to_expiry());
    }
}

#[cfg(test)]
mod tests {
    use super::name_matches;

    #[test]
    fn wildcards_cover_one_label() {
        assert!(name_matches("api.example.com", "api.example.com"));
        assert!(name_matches("*.example.com", "api.example.com"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(!name_matches("*.example.com", "a.b.example.com"));
        assert!(!name_matches("*.example.com", ".example.com"));
    }
}
