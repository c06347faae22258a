//! HTTP/1.1 `Upgrade` (WebSocket and the like): the upgrade request is
//! balanced like any other (algorithm, hash key, affinity) and forwarded with
//! its `Upgrade` and `Connection: upgrade`; when the endpoint answers `101`,
//! the client's and the endpoint's connections are joined and bytes copied
//! both ways until either side closes or no byte has moved for
//! `timeouts.tunnelIdle`. The endpoint counts the tunnel as in flight for
//! its whole life, so LeastConnections and LeastRequest see long-lived
//! sockets. Any other answer is passed to the client as an ordinary
//! response. `Upgrade: h2c` is never tunnelled: the proxy speaks h2c itself.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, Version};
use http_body_util::{Either, Full};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::http::{ProxyBody, strip_hop_by_hop};
use super::metrics::EndpointTunnel;
use super::state::{Runtime, Shared};
use super::tcp::copy_until_idle;
use super::upstream::Lease;
use crate::balance::{Outcome, Pick};

/// The protocol an HTTP/1.1 request asks to upgrade to, if it asks.
pub(crate) fn requested<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let protocol = req.headers().get(header::UPGRADE)?;
    let asks = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let h2c = protocol.to_str().is_ok_and(|p| p.split(',').any(|p| p.trim().eq_ignore_ascii_case("h2c")));
    (asks && !h2c).then(|| protocol.clone())
}

/// Answers `101` to the client and joins both connections in a task of their own.
pub(crate) fn tunnel<B>(
    shared: &Shared,
    rt: &Runtime,
    client: OnUpgrade,
    mut resp: Response<B>,
    requested: &HeaderValue,
    pick: Pick,
    lease: Lease,
) -> Response<ProxyBody> {
    let endpoint = hyper::upgrade::on(&mut resp);
    let protocol = resp.headers().get(header::UPGRADE).cloned().unwrap_or_else(|| requested.clone());
    let (mut parts, _) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    parts.headers.insert(header::UPGRADE, protocol);
    let idle = rt.config.timeouts.tunnel_idle.0;
    let metrics = shared.metrics.tunnels.clone();
    shared.metrics.upgrade("tunnelled");
    let addr = pick.addr();
    tokio::spawn(async move {
        let _open = metrics.open();
        let _on_endpoint = EndpointTunnel::open(&lease.upstream().stats);
        let outcome = match tokio::try_join!(client, endpoint) {
            Ok((client, endpoint)) => {
                let (mut client, mut endpoint) = (TokioIo::new(client), TokioIo::new(endpoint));
                match copy_until_idle(&mut client, &mut endpoint, idle).await {
                    Some(Ok((to_endpoint, to_client))) => {
                        lease.upstream().stats.count_bytes(to_endpoint, to_client);
                        Outcome::Success
                    }
                    Some(Err(_)) => Outcome::Cancelled,
                    None => {
                        tracing::debug!(endpoint = %addr, "tunnel idle past timeouts.tunnelIdle; closed");
                        Outcome::Cancelled
                    }
                }
            }
            Err(e) => {
                tracing::debug!(endpoint = %addr, error = %e, "upgrade did not complete");
                Outcome::Cancelled
            }
        };
        drop(_on_endpoint);
        pick.complete(outcome);
        lease.detach();
    });
    Response::from_parts(parts, Either::Right(Full::new(Bytes::new())))
}
