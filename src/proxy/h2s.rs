//! HTTP/2 client connections, served with the `h2` crate directly: the
//! connection's own task runs every stream.
//!
//! hyper's HTTP/2 server spawns a task for each stream: the request is taken
//! off the connection in its task, served in the stream's, and the response
//! handed back through `h2`'s shared state, which wakes the connection's
//! task again to write it. Here the connection's task keeps its streams in a
//! [`FuturesUnordered`] and polls the ones that were woken before it polls
//! the connection, so what they queue (a request to an endpoint, a response)
//! goes out with the same pass that read the frames that made them ready:
//! one task per client connection, no allocation per stream but its own, and
//! one turn of the event loop for a response from an HTTP/1.1 endpoint, which
//! the stream reads itself (an HTTP/2 endpoint's comes through the endpoint
//! connection's task). A stream that waits (for an endpoint, for window)
//! costs nothing until it is woken.
//!
//! The rest is what hyper's server did with the same settings: 1 MiB
//! windows, 16 KiB frames, a 400 KiB send buffer, the stream and header
//! limits of `limits`, the rapid-reset bounds (CVE-2023-44487), a PING every
//! interval with the connection closed when one goes unanswered, the graceful
//! close (GOAWAY, then the streams in flight finish), and a stream the client
//! resets stops being served at once. The connection's watchdog is the one
//! HTTP/1 connections have ([`conn::Watchdog`]); besides, the proxy sends a
//! PING every half of `timeouts.idle` (at most every 30 s) and closes the
//! connection when one is not answered by the next (as it does towards
//! endpoints, [`super::h2c::drive`]): a client that vanished without a word
//! does not hold a stream's endpoint until `timeouts.request` ends it.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use ::http::{Request, Response};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use http_body_util::Either;
use hyper::body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::config::Limits;
use super::conn::{self, InFlight, StreamClock};
use super::h2c::{H2Body, Pump};
use super::http::{self, Peer, RequestBody};
use super::state::Shared;

/// The connection settings: hyper's server defaults, with `limits`.
pub(crate) fn builder(limits: &Limits) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(1024 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .max_frame_size(16 * 1024)
        .max_send_buffer_size(400 * 1024)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_request_header_bytes)
        // Rapid reset (CVE-2023-44487) and its variants: streams a client
        // resets before they are served, or that make the proxy reset them,
        // end the connection past these counts.
        .max_pending_accept_reset_streams(32)
        .max_local_error_reset_streams(Some(256));
    b
}

/// Serves one HTTP/2 client connection (its preface is in `io`'s replayed
/// prefix) until it closes, its watchdog ends it or the drain has finished it.
pub(crate) async fn serve<S>(
    shared: &Arc<Shared>,
    io: conn::ClientIo<S>,
    client: &Peer,
    activity: &Arc<conn::Activity>,
    limits: conn::Limits,
    graceful: &CancellationToken,
    builder: &h2::server::Builder,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = client.addr;
    let mut conn = match tokio::time::timeout(limits.header, builder.handshake::<_, Bytes>(io)).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            shared.metrics.timed_out("header");
            return;
        }
    };
    let ping_every = (limits.idle / 2).min(Duration::from_secs(30));
    let mut pings = conn.ping_pong();
    let mut awaiting_pong = false;
    let mut next_ping = Instant::now() + ping_every;
    let mut watchdog = conn::Watchdog::default();
    // Made with the first stream and dropped with the last: the set holds a
    // stub of a stream's size (3–4 KiB), which an idle connection does not
    // need.
    let mut streams: Option<FuturesUnordered<_>> = None;
    // Fires at once: the first look at the deadlines sets it.
    let mut timer = pin!(tokio::time::sleep(Duration::ZERO));
    let mut drain = pin!(graceful.cancelled());
    std::future::poll_fn(|cx| {
        loop {
            // The streams first: what they queue goes out with this poll of
            // the connection, which also reads what the client sent.
            if let Some(set) = &mut streams {
                while let Poll::Ready(Some(())) = set.poll_next_unpin(cx) {}
                if set.is_empty() {
                    streams = None;
                }
            }
            match conn.poll_accept(cx) {
                Poll::Ready(Some(Ok((req, respond)))) => {
                    let served = stream(shared.clone(), client.clone(), req, respond, activity.request());
                    streams.get_or_insert_with(FuturesUnordered::new).push(served);
                    continue;
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(%peer, error = %e, "HTTP/2 client connection failed");
                    return Poll::Ready(());
                }
                Poll::Ready(None) => return Poll::Ready(()),
                Poll::Pending => {}
            }
            if !watchdog.draining() && drain.as_mut().poll(cx).is_ready() {
                watchdog.drain_started();
                conn.graceful_shutdown();
                continue;
            }
            if awaiting_pong && let Some(pp) = &mut pings {
                match pp.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        awaiting_pong = false;
                        next_ping = Instant::now() + ping_every;
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Pending => {}
                }
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let wake = match watchdog.check(activity, &limits, shared, peer) {
                conn::Watch::Wait(at) => at,
                conn::Watch::Drain(at) => {
                    conn.graceful_shutdown();
                    at
                }
                conn::Watch::Stop => return Poll::Ready(()),
            };
            let now = Instant::now();
            if now >= next_ping {
                if awaiting_pong {
                    tracing::debug!(%peer, "a client left a PING unanswered; closing the connection");
                    return Poll::Ready(());
                }
                // Fails only while a PING is already out, which cannot be.
                if let Some(pp) = &mut pings
                    && pp.send_ping(h2::Ping::opaque()).is_ok()
                {
                    awaiting_pong = true;
                }
                next_ping = now + ping_every;
            }
            timer.as_mut().reset(wake.min(next_ping).into());
        }
    })
    .await;
    // The connection's end reaches its streams (h2 fails them as it drops),
    // and each is polled once more to see it, as a stream task of its own
    // would be: a request still reading its body answers `400` and is
    // counted; one waiting for its endpoint is dropped, and its endpoint
    // released.
    drop(conn);
    if let Some(mut set) = streams {
        std::future::poll_fn(|cx| {
            while let Poll::Ready(Some(())) = set.poll_next_unpin(cx) {}
            Poll::Ready(())
        })
        .await;
    }
}

/// One stream: the request served, then its response sent, the body at the
/// pace of the stream's flow control. A client that resets the stream stops
/// it wherever it is (the request to the endpoint is dropped with it).
async fn stream(
    shared: Arc<Shared>,
    client: Peer,
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    in_flight: InFlight,
) {
    let (parts, recv) = req.into_parts();
    let body: RequestBody = Either::Right(H2Body::new(recv, &parts.headers));
    let mut served = pin!(http::serve(shared, client, Request::from_parts(parts, body), Some(StreamClock::new())));
    let answered = std::future::poll_fn(|cx| {
        if let Poll::Ready(Ok(resp)) = served.as_mut().poll(cx) {
            return Poll::Ready(Some(resp));
        }
        respond.poll_reset(cx).map(|_| None)
    })
    .await;
    let Some(resp) = answered else { return };
    let (parts, body) = resp.into_parts();
    let end = body.is_end_stream();
    match respond.send_response(Response::from_parts(parts, ()), end) {
        Ok(send) if !end => Pump::new(body, send, h2::Reason::INTERNAL_ERROR).await,
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "a response could not be sent on its HTTP/2 stream"),
    }
    drop(in_flight);
}
