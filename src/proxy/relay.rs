//! HTTP/2 clients' requests to HTTP/2 endpoints without header maps.
//!
//! A request an HTTP/2 client sends (a gRPC call, most often) is decoded
//! by the codec into one buffer of names and values. On the map path its
//! fields become a header map, the proxy rewrites the map, and the
//! endpoint's HTTP/2 client encodes the map again: two hashes, an
//! allocation and a validation per field for a head that changes in three
//! fields. Here the head is written once into a buffer of the worker's pool
//! as the fields a client would have sent ([`bridge::h1_head`], the same
//! checks as the bridge to HTTP/1.1 endpoints: anything odd goes the map
//! way and is refused there), read for balancing and forwarding as the fast
//! path reads an HTTP/1.1 head ([`fast::look`]), and encoded for the
//! endpoint from that buffer with the forwarding fields the fast path
//! writes ([`h1::request_fields`]); the `:authority` goes on as the client
//! sent it. The response comes back the same way ([`super::h2c::RawFields`]).

use super::bridge;
use super::fast::Look;
use super::h1::{self, Kind, RequestHead};
use super::http::Peer;

/// An HTTP/2 client's request head on its way to HTTP/2 endpoints, as
/// read once and sent on every attempt.
pub(crate) struct Relay {
    /// The head's bytes (a buffer of the worker's pool), as
    /// [`bridge::h1_head`] wrote them.
    buf: Vec<u8>,
    head: RequestHead,
    look: Look,
    peer: Peer,
}

impl Relay {
    /// The head of a request ([`bridge::RawRequest`]) written towards
    /// HTTP/2, with what the proxy read of it for `peer`.
    pub(crate) fn new(buf: Vec<u8>, head: RequestHead, look: Look, peer: Peer) -> Self {
        Relay { buf, head, look, peer }
    }

    pub(crate) fn method(&self) -> &[u8] {
        &self.buf[self.head.method.clone()]
    }

    /// The request's `:path`.
    pub(crate) fn path(&self) -> &[u8] {
        &self.buf[self.head.target.clone()]
    }

    /// The request's `:authority` (the client's, which [`bridge::h1_head`]
    /// wrote as the `Host`).
    pub(crate) fn authority(&self) -> &[u8] {
        h1::value_of(&self.buf, &self.head.headers, "host").unwrap_or_default()
    }

    /// The regular fields for the endpoint: the client's less the
    /// hop-by-hop ones (but `te: trailers`) and the `Host`, then the
    /// forwarding fields.
    pub(crate) fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let fwd = self.look.forwarded(&self.peer);
        let buf = &self.buf[..];
        let client = self.head.headers.iter().filter(move |h| h.kind != Kind::Host && fwd.passes(h.kind));
        client.map(move |h| (&buf[h.name.clone()], &buf[h.value.clone()])).chain(fwd.fields(&self.head.headers))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let head = std::mem::take(&mut self.head);
        bridge::RawRequest::recycle(buf, head);
    }
}
