//! The forwarding headers: `X-Forwarded-For` and `X-Forwarded-Proto`
//! (`https` on a connection whose TLS the proxy terminated).
//!
//! A backend trusts these headers to learn who the client is and whether
//! the request was encrypted, so the proxy never passes on what an arbitrary
//! client claims: it replaces both with what it saw. Only a connection from
//! an address in `forwarding.trustedProxies` (a load balancer in front that
//! terminated TLS, say) keeps them: its `X-Forwarded-Proto` stands, its
//! `X-Forwarded-For` chain is extended with the peer, and the client is the
//! right-most address of the chain outside the trusted ranges (Envoy's
//! trusted-CIDR rule; NGINX's `real_ip_recursive`).

use std::net::IpAddr;

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

use super::config::Cidr;
use super::http::Peer;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Sets the forwarding headers of a request from `peer`; returns the client's
/// address (the peer, or for a trusted peer the first untrusted hop).
pub(crate) fn apply(headers: &mut HeaderMap, peer: &Peer, trusted: &[Cidr]) -> IpAddr {
    let peer_ip = peer.addr.ip();
    if trusted.is_empty() || !trusted.iter().any(|c| c.contains(peer_ip)) {
        headers.insert(X_FORWARDED_FOR.clone(), peer.ip_header.clone());
        headers.insert(X_FORWARDED_PROTO.clone(), proto(peer));
        return peer_ip;
    }
    let mut chain = Vec::new();
    for v in headers.get_all(&X_FORWARDED_FOR) {
        if !chain.is_empty() {
            chain.extend_from_slice(b", ");
        }
        chain.extend_from_slice(v.as_bytes());
    }
    let client = client_of(&chain, peer_ip, trusted);
    if !chain.is_empty() {
        chain.extend_from_slice(b", ");
    }
    chain.extend_from_slice(peer.ip_header.as_bytes());
    let value = HeaderValue::from_bytes(&chain).unwrap_or_else(|_| peer.ip_header.clone());
    headers.insert(X_FORWARDED_FOR.clone(), value);
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO.clone(), proto(peer));
    }
    client
}

fn proto(peer: &Peer) -> HeaderValue {
    HeaderValue::from_static(if peer.https { "https" } else { "http" })
}

/// The right-most address of `chain` outside `trusted`, walking left from a
/// trusted peer; a malformed entry stops the walk at the last good address.
pub(crate) fn client_of(chain: &[u8], peer: IpAddr, trusted: &[Cidr]) -> IpAddr {
    let text = String::from_utf8_lossy(chain);
    let mut client = peer;
    for hop in text.rsplit(',').map(str::trim).filter(|h| !h.is_empty()) {
        let Ok(ip) = hop.parse::<IpAddr>() else { break };
        client = ip;
        if !trusted.iter().any(|c| c.contains(ip)) {
            break;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        trusted: &[&str],
        peer: &str,
        xff: Option<&'static str>,
        proto: Option<&'static str>,
    ) -> (HeaderMap, IpAddr) {
        let trusted: Vec<Cidr> = trusted.iter().map(|c| c.parse().unwrap()).collect();
        let mut h = HeaderMap::new();
        if let Some(v) = xff {
            h.insert("x-forwarded-for", HeaderValue::from_static(v));
        }
        if let Some(v) = proto {
            h.insert("x-forwarded-proto", HeaderValue::from_static(v));
        }
        let ip = apply(&mut h, &Peer::new(format!("{peer}:4000").parse().unwrap()), &trusted);
        (h, ip)
    }

    #[test]
    fn an_untrusted_client_cannot_claim_https_or_another_address() {
        let (h, ip) = run(&[], "192.0.2.9", Some("203.0.113.7"), Some("https"));
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-for"], "192.0.2.9");
        assert_eq!(ip, "192.0.2.9".parse::<IpAddr>().unwrap());
        let (h, _) = run(&["10.0.0.0/8"], "192.0.2.9", Some("203.0.113.7"), Some("https"));
        assert_eq!(
            (h["x-forwarded-proto"].as_bytes(), h["x-forwarded-for"].as_bytes()),
            (&b"http"[..], &b"192.0.2.9"[..])
        );
    }

    #[test]
    fn a_trusted_proxy_keeps_the_chain_and_names_the_client() {
        let (h, ip) = run(&["10.0.0.0/8"], "10.1.2.3", Some("203.0.113.7, 10.9.9.9"), Some("https"));
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 10.9.9.9, 10.1.2.3");
        assert_eq!(ip, "203.0.113.7".parse::<IpAddr>().unwrap());
        // Without a claim, what the proxy saw.
        let (h, ip) = run(&["10.0.0.0/8"], "10.1.2.3", None, None);
        assert_eq!(
            (h["x-forwarded-proto"].as_bytes(), h["x-forwarded-for"].as_bytes()),
            (&b"http"[..], &b"10.1.2.3"[..])
        );
        assert_eq!(ip, "10.1.2.3".parse::<IpAddr>().unwrap());
        // A spoofed left part of the chain does not win over the last untrusted hop.
        let (_, ip) = run(&["10.0.0.0/8"], "10.1.2.3", Some("1.1.1.1, 198.51.100.4"), None);
        assert_eq!(ip, "198.51.100.4".parse::<IpAddr>().unwrap());
        let (_, ip) = run(&["10.0.0.0/8"], "10.1.2.3", Some("garbage, 10.2.2.2"), None);
        assert_eq!(ip, "10.2.2.2".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn ranges_match_by_prefix_and_ipv4_mapped_addresses() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.255.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        let one: Cidr = "192.0.2.1".parse().unwrap();
        assert!(one.contains("192.0.2.1".parse().unwrap()) && !one.contains("192.0.2.2".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()) && !v6.contains("fe80::1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "x/8", "fd00::/129", "10.0.0.0/"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }
}
