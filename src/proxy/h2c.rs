//! HTTP/2 towards endpoints with the `h2` crate directly, in the request's
//! own task.
//!
//! hyper's HTTP/2 client hands every request over a channel to the
//! connection's task, spawns a task for each response future and another to
//! pipe each request body: three tasks and as many wake-ups per gRPC call.
//! Here the request's task opens the stream itself, sends the body while it
//! waits for the response head (a unary call's body is complete by then, so
//! nothing is spawned), and reads the response body through [`H2Body`],
//! releasing flow-control capacity as the client takes the data. Only a body
//! still streaming when the response head arrives (client or bidirectional
//! streaming) moves to a task of its own ([`Pump`]), as it must: the response
//! may be read while the request is still being sent.
//!
//! The connection itself runs in a task ([`drive`]) that publishes the
//! endpoint's stream limit and sends a PING every interval, closing the
//! connection when the previous one is still unanswered: an endpoint that
//! hangs (or a network path that silently drops the connection) does not
//! keep requests waiting on it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, header};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};

use super::http::UpstreamBody;

/// The settings hyper's client used (and the proxy kept): windows large
/// enough for bulk transfers on a fast network, a 1 MiB send buffer, no
/// server push.
pub(crate) fn builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_max_send_streams(super::upstream::DEFAULT_MAX_STREAMS)
        .initial_window_size(2 * 1024 * 1024)
        .initial_connection_window_size(5 * 1024 * 1024)
        .max_frame_size(16 * 1024)
        .max_header_list_size(16 * 1024)
        .max_send_buffer_size(1024 * 1024)
        .enable_push(false);
    b
}

/// Drives an endpoint connection until it closes (the endpoint closed it,
/// it failed, a PONG was overdue, or no request holds it any more), calling
/// `limit` with the endpoint's `SETTINGS_MAX_CONCURRENT_STREAMS` whenever it
/// changes, and sending a PING every `ping`; a PING not answered within
/// `ping` closes the connection.
pub(crate) async fn drive<T>(conn: h2::client::Connection<T, Bytes>, ping: Duration, mut limit: impl FnMut(usize))
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = std::pin::pin!(conn);
    let mut pings = conn.ping_pong();
    let mut timer = Box::pin(tokio::time::sleep(ping));
    let mut awaiting = false;
    // h2's own value until the endpoint's SETTINGS arrive.
    let mut last = super::upstream::DEFAULT_MAX_STREAMS;
    std::future::poll_fn(|cx| {
        if conn.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let now = conn.max_concurrent_send_streams();
        if now != last {
            last = now;
            limit(now);
        }
        let Some(pp) = &mut pings else { return Poll::Pending };
        loop {
            if awaiting {
                match pp.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        awaiting = false;
                        timer.as_mut().reset(tokio::time::Instant::now() + ping);
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Pending => {}
                }
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if awaiting {
                tracing::debug!("an endpoint left a PING unanswered; closing the connection");
                return Poll::Ready(());
            }
            if pp.send_ping(h2::Ping::opaque()).is_err() {
                return Poll::Ready(());
            }
            awaiting = true;
            timer.as_mut().reset(tokio::time::Instant::now() + ping);
        }
    })
    .await;
}

/// Opens a stream on `sender` (ready for one) with `head`; the future it
/// returns waits for the response head while it sends `body`.
///
/// The stream opens here, before the future: the head is handed to `h2`
/// at once, and the future does not carry room for it while it waits.
pub(crate) fn exchange(
    sender: &mut h2::client::SendRequest<Bytes>,
    head: Request<()>,
    body: UpstreamBody,
) -> Result<impl Future<Output = Result<Response<H2Body>, h2::Error>> + use<>, h2::Error> {
    let eos = body.is_end_stream();
    let (response, stream) = sender.send_request(head, eos)?;
    let pump = (!eos).then(|| Pump::new(body, stream));
    Ok(respond(response, pump))
}

/// The response head of an opened stream, while `pump` sends the request body.
async fn respond(
    mut response: h2::client::ResponseFuture,
    mut pump: Option<Pump>,
) -> Result<Response<H2Body>, h2::Error> {
    let resp = std::future::poll_fn(|cx| {
        if let Some(p) = &mut pump
            && Pin::new(&mut *p).poll(cx).is_ready()
        {
            pump = None;
        }
        Pin::new(&mut response).poll(cx)
    })
    .await?;
    if let Some(p) = pump {
        // The request body is still streaming: it goes on beside the response.
        tokio::spawn(p);
    }
    let (parts, recv) = resp.into_parts();
    let body = H2Body::new(recv, &parts.headers);
    Ok(Response::from_parts(parts, body))
}

/// Whether an HTTP/2 failure proves the endpoint never processed the stream:
/// it reset it with `REFUSED_STREAM`, or it was above the endpoint's `GOAWAY`
/// (RFC 9113 §8.7). Streams below the `GOAWAY` id that end because the
/// connection closes fail with an I/O error instead, and are not retried.
pub(crate) fn refused(e: &h2::Error) -> bool {
    e.is_remote() && (e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM))
}

/// A body on its way into an HTTP/2 stream (a request's towards an
/// endpoint, a response's towards a client), with the stream's flow control
/// as back-pressure (hyper's pipe; a request's runs in the caller's task
/// until the response head arrives). A byte of window is claimed before
/// each frame is taken from the body, and given back while the body has
/// nothing to send: a claim held by an idle body pins connection window the
/// other streams may need, and stalls them against a peer that opens its
/// window only once all of it is used (hyper#4003). A body that fails
/// resets the stream (`CANCEL`).
pub(crate) struct Pump {
    body: UpstreamBody,
    stream: h2::SendStream<Bytes>,
    done: bool,
}

impl Pump {
    pub(crate) fn new(body: UpstreamBody, stream: h2::SendStream<Bytes>) -> Self {
        Pump { body, stream, done: false }
    }
}

impl Future for Pump {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        while !this.done {
            // Room for at least a byte before the next frame is taken from the
            // client (h2 splits a chunk over the window as it opens).
            this.stream.reserve_capacity(1);
            if this.stream.capacity() == 0 {
                loop {
                    match ready!(this.stream.poll_capacity(cx)) {
                        Some(Ok(0)) => {}
                        Some(Ok(_)) => break,
                        Some(Err(_)) | None => return Poll::Ready(()),
                    }
                }
            } else if this.stream.poll_reset(cx).is_ready() {
                // The peer reset the stream (an endpoint may have answered already).
                return Poll::Ready(());
            }
            let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) else {
                this.stream.reserve_capacity(0);
                return Poll::Pending;
            };
            let sent = match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        this.done = this.body.is_end_stream();
                        this.stream.send_data(data, this.done)
                    }
                    Err(frame) => {
                        this.done = true;
                        this.stream.reserve_capacity(0);
                        match frame.into_trailers() {
                            Ok(trailers) => this.stream.send_trailers(trailers),
                            Err(_) => this.stream.send_data(Bytes::new(), true),
                        }
                    }
                },
                None => {
                    this.done = true;
                    this.stream.reserve_capacity(0);
                    this.stream.send_data(Bytes::new(), true)
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "a body failed on its way into an HTTP/2 stream; the stream is reset");
                    this.stream.send_reset(h2::Reason::CANCEL);
                    return Poll::Ready(());
                }
            };
            if sent.is_err() {
                return Poll::Ready(());
            }
        }
        Poll::Ready(())
    }
}

/// A body received on an HTTP/2 stream (an endpoint's response, a client's
/// request): its data, with the flow-control window given back as each
/// chunk is taken, then its trailers.
pub(crate) struct H2Body {
    recv: h2::RecvStream,
    /// What is left of the sender's `Content-Length` (h2 holds the data to it).
    length: Option<u64>,
    data_done: bool,
    ended: bool,
}

impl H2Body {
    /// The body of the message whose head carried `headers`.
    pub(crate) fn new(recv: h2::RecvStream, headers: &http::HeaderMap) -> Self {
        let length = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok());
        H2Body { recv, length, data_done: false, ended: false }
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Only fails once the stream is gone, which the next poll reports.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    if let Some(left) = &mut this.length {
                        *left = left.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(e)));
                }
                None => this.data_done = true,
            }
        }
        let trailers = ready!(this.recv.poll_trailers(cx));
        this.ended = true;
        match trailers {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(n) => SizeHint::with_exact(n),
            None if self.ended => SizeHint::with_exact(0),
            None => SizeHint::default(),
        }
    }
}
