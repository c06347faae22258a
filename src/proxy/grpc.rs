//! gRPC's own vocabulary where the proxy needs it: the statuses it answers
//! with, the `grpc-timeout` header, which statuses mean an endpoint failed,
//! and the standard health check's two messages.
//!
//! gRPC runs over HTTP/2 with `content-type: application/grpc`, reports the
//! outcome of a call in a `grpc-status` trailer (after an HTTP 200), and
//! reads a bare HTTP error as status UNKNOWN. So when the proxy answers a
//! gRPC call itself it answers "trailers-only": HTTP 200 with `grpc-status`
//! and `grpc-message` in the headers and no body.

use std::time::Duration;

use http::HeaderMap;
use http::header::{CONTENT_TYPE, HeaderValue};

/// `grpc-status` codes the proxy uses or classifies.
pub(crate) mod code {
    pub(crate) const OK: u16 = 0;
    pub(crate) const UNKNOWN: u16 = 2;
    pub(crate) const DEADLINE_EXCEEDED: u16 = 4;
    pub(crate) const INTERNAL: u16 = 13;
    pub(crate) const UNAVAILABLE: u16 = 14;
    pub(crate) const DATA_LOSS: u16 = 15;
}

/// Names of the codes 0..=16, as gRPC spells them.
pub(crate) const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

pub(crate) static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
pub(crate) static GRPC_MESSAGE: http::HeaderName = http::HeaderName::from_static("grpc-message");
static GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// Whether a request or response is gRPC (`application/grpc`, `application/grpc+proto`, …).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|v| is_grpc_type(v.as_bytes()))
}

/// Whether a `Content-Type` value names gRPC (`application/grpc`, `+proto`, ...).
pub(crate) fn is_grpc_type(v: &[u8]) -> bool {
    v.len() >= 16 && v[..16].eq_ignore_ascii_case(b"application/grpc") && matches!(v.get(16), None | Some(b'+' | b';'))
}

/// The `grpc-status` in `headers` (a trailer block, or a trailers-only response).
pub(crate) fn status(headers: &HeaderMap) -> Option<u16> {
    headers.get(&GRPC_STATUS).and_then(|v| status_value(v.as_bytes()))
}

/// A `grpc-status` value's code.
pub(crate) fn status_value(v: &[u8]) -> Option<u16> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Whether a status says the endpoint failed, rather than the application
/// refusing the call: these count against the endpoint's passive health, as
/// 5xx do for HTTP (Envoy maps them to 5xx the same way).
pub(crate) fn is_endpoint_failure(code: u16) -> bool {
    matches!(code, code::UNKNOWN | code::DEADLINE_EXCEEDED | code::INTERNAL | code::UNAVAILABLE | code::DATA_LOSS)
}

/// The call's deadline from `grpc-timeout` (`<digits><unit>`, at most 8 digits;
/// units H, M, S, m, u, n). A malformed value is ignored, as gRPC servers do.
pub(crate) fn timeout(headers: &HeaderMap) -> Option<Duration> {
    timeout_value(headers.get(&GRPC_TIMEOUT)?.as_bytes())
}

/// A `grpc-timeout` value's duration.
pub(crate) fn timeout_value(v: &[u8]) -> Option<Duration> {
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Headers of a trailers-only answer with `code` and `message` (ASCII, no `%`).
pub(crate) fn status_headers(headers: &mut HeaderMap, code: u16, message: &'static str) {
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(GRPC_STATUS.clone(), HeaderValue::from(code));
    headers.insert(GRPC_MESSAGE.clone(), HeaderValue::from_static(message));
}

/// The request of `grpc.health.v1.Health/Check` for `service`, framed: a
/// `HealthCheckRequest { string service = 1; }` behind gRPC's five-byte prefix.
pub(crate) fn health_request(service: &str) -> Vec<u8> {
    let mut msg = Vec::with_capacity(service.len() + 6);
    if !service.is_empty() {
        msg.push(0x0a); // field 1, length-delimited
        let mut len = service.len();
        while len >= 0x80 {
            msg.push((len as u8 & 0x7f) | 0x80);
            len >>= 7;
        }
        msg.push(len as u8);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut framed = Vec::with_capacity(msg.len() + 5);
    framed.push(0); // not compressed
    framed.extend_from_slice(&u32::try_from(msg.len()).unwrap_or(u32::MAX).to_be_bytes());
    framed.extend_from_slice(&msg);
    framed
}

/// Whether a framed `HealthCheckResponse { ServingStatus status = 1; }` says
/// `SERVING` (1).
pub(crate) fn health_serving(framed: &[u8]) -> bool {
    let Some((head, msg)) = framed.split_at_checked(5) else { return false };
    if head[0] != 0 || u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize != msg.len() {
        return false;
    }
    // The only field is a small enum: tag 0x08 and a one-byte varint.
    let mut serving = false;
    let mut i = 0;
    while i < msg.len() {
        match (msg[i], msg.get(i + 1)) {
            (0x08, Some(&v)) if v < 0x80 => {
                serving = v == 1;
                i += 2;
            }
            _ => return false,
        }
    }
    serving
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (http::HeaderName::from_static(k), HeaderValue::from_static(v))).collect()
    }

    #[test]
    fn grpc_content_types_are_recognised() {
        assert!(is_grpc(&headers(&[("content-type", "application/grpc")])));
        assert!(is_grpc(&headers(&[("content-type", "application/grpc+proto")])));
        assert!(is_grpc(&headers(&[("content-type", "Application/GRPC;charset=x")])));
        assert!(!is_grpc(&headers(&[("content-type", "application/grpc-web")])));
        assert!(!is_grpc(&headers(&[("content-type", "application/json")])));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn grpc_timeout_units_parse_and_bad_values_are_ignored() {
        let t = |v: &'static str| timeout(&headers(&[("grpc-timeout", v)]));
        assert_eq!(t("100m"), Some(Duration::from_millis(100)));
        assert_eq!(t("2S"), Some(Duration::from_secs(2)));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("5u"), Some(Duration::from_micros(5)));
        assert_eq!(t("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "123456789m", "10x", "-1S", "1.5S"] {
            assert_eq!(t(bad), None, "{bad}");
        }
    }

    #[test]
    fn failures_of_the_endpoint_are_told_from_application_errors() {
        for c in [2, 4, 13, 14, 15] {
            assert!(is_endpoint_failure(c), "{}", CODE_NAMES[c as usize]);
        }
        for c in [0, 1, 3, 5, 6, 7, 8, 9, 10, 11, 12, 16] {
            assert!(!is_endpoint_failure(c), "{}", CODE_NAMES[c as usize]);
        }
    }

    #[test]
    fn health_messages_are_framed_like_protobuf() {
        assert_eq!(health_request(""), [0, 0, 0, 0, 0]);
        assert_eq!(health_request("ab"), [0, 0, 0, 0, 4, 0x0a, 2, b'a', b'b']);
        let long = "s".repeat(200);
        let framed = health_request(&long);
        assert_eq!(&framed[5..8], &[0x0a, 0xc8, 0x01]);
        assert!(health_serving(&[0, 0, 0, 0, 2, 0x08, 1]));
        assert!(!health_serving(&[0, 0, 0, 0, 2, 0x08, 2]));
        assert!(!health_serving(&[0, 0, 0, 0, 0]));
        assert!(!health_serving(&[0, 0, 0, 0, 3, 0x08, 1]));
        assert!(!health_serving(&[1, 0, 0, 0, 2, 0x08, 1]));
    }
}
