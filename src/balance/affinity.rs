//! Session affinity tokens.
//!
//! A token is an opaque 64-bit name for an endpoint, derived from its address
//! with a fixed hash so that every proxy replica derives the same one: a
//! client pinned by one replica stays pinned through another. It reveals
//! nothing about the address. The proxy carries it in a cookie; the balancer
//! maps it back to the endpoint and falls back to the algorithm when the
//! endpoint is gone or unavailable.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::endpoint::addr_bytes;

const TOKEN_SEED: u64 = 0x6675_6c63_7275_6d31; // "fulcrum1"

/// Names the endpoint a client is pinned to. Printed and parsed as 16 hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AffinityToken(u64);

impl AffinityToken {
    /// The token of the endpoint at `addr`.
    pub fn of(addr: SocketAddr) -> Self {
        let (buf, n) = addr_bytes(addr);
        AffinityToken(xxh3_64_with_seed(&buf[..n], TOKEN_SEED))
    }
}

impl fmt::Display for AffinityToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A cookie value that is not a token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("an affinity token is 16 hexadecimal digits")]
pub struct BadToken;

impl FromStr for AffinityToken {
    type Err = BadToken;

    fn from_str(s: &str) -> Result<Self, BadToken> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BadToken);
        }
        u64::from_str_radix(s, 16).map(AffinityToken).map_err(|_| BadToken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_through_text() {
        let t = AffinityToken::of("127.0.0.2:8080".parse().unwrap());
        assert_eq!(t.to_string().len(), 16);
        assert_eq!(t.to_string().parse::<AffinityToken>(), Ok(t));
    }

    #[test]
    fn tokens_differ_by_address_and_port() {
        let a = AffinityToken::of("127.0.0.2:8080".parse().unwrap());
        let b = AffinityToken::of("127.0.0.3:8080".parse().unwrap());
        let c = AffinityToken::of("127.0.0.2:8081".parse().unwrap());
        assert_ne!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn garbage_is_not_a_token() {
        for bad in ["", "xyz", "0123456789abcdeg", "+123456789abcdef", "0123456789abcdef0"] {
            assert_eq!(bad.parse::<AffinityToken>(), Err(BadToken), "{bad:?}");
        }
    }
}
