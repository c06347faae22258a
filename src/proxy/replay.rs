//! Request bodies that can be sent again.
//!
//! A request is retried on another endpoint only when nothing it sent can be
//! lost: the endpoint refused it before processing it (a connection that
//! never opened, an HTTP/2 stream refused or above a `GOAWAY`), or the method
//! is idempotent. Its body is streamed, never buffered whole, so it can be
//! sent again only if it is still complete: [`Replayable`] keeps the frames
//! it has passed on, up to [`REPLAY_LIMIT`] bytes; past the limit it forgets
//! them and the request can no longer be replayed. A gRPC unary call, a form
//! or a JSON document fits; an upload does not, and fails instead of being
//! sent half.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use smallvec::SmallVec;

/// Most request-body bytes held for a replay.
pub(crate) const REPLAY_LIMIT: usize = 64 * 1024;

/// A request body that keeps what it has sent, so it can be sent again.
pub(crate) struct Replayable<B = Incoming> {
    shared: Arc<Mutex<Held<B>>>,
    /// Which sending this reader is; a reader of an earlier one stops.
    generation: u32,
    /// Next held chunk to give out.
    next: usize,
    trailers_sent: bool,
}

struct Held<B> {
    source: B,
    hint: SizeHint,
    /// What went by; most bodies held (a call's message, a form) come in one.
    chunks: SmallVec<[Bytes; 1]>,
    bytes: usize,
    trailers: Option<HeaderMap>,
    ended: bool,
    /// More than [`REPLAY_LIMIT`] went by: nothing is held any more.
    overflowed: bool,
    generation: u32,
}

/// Why a replayable body stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReplayError {
    /// The body was handed to another attempt.
    #[error("request body moved to another attempt")]
    Superseded,
    /// Reading the client's body failed.
    #[error("client body: {0}")]
    Client(Box<dyn std::error::Error + Send + Sync>),
}

impl<B: Body> Replayable<B> {
    pub(crate) fn new(source: B) -> Self {
        let hint = source.size_hint();
        let held = Held {
            source,
            hint,
            chunks: SmallVec::new(),
            bytes: 0,
            trailers: None,
            ended: false,
            overflowed: false,
            generation: 0,
        };
        Replayable { shared: Arc::new(Mutex::new(held)), generation: 0, next: 0, trailers_sent: false }
    }

    fn held(&self) -> MutexGuard<'_, Held<B>> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A reader from the start of the body for another attempt, if the body
    /// is still whole; earlier readers stop.
    pub(crate) fn replay(&self) -> Option<Replayable<B>> {
        let mut held = self.held();
        if held.overflowed {
            return None;
        }
        held.generation = held.generation.wrapping_add(1);
        let generation = held.generation;
        drop(held);
        Some(Replayable { shared: self.shared.clone(), generation, next: 0, trailers_sent: false })
    }
}

impl<B> Body for Replayable<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = ReplayError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ReplayError>>> {
        let this = self.get_mut();
        let mut guard = this.shared.lock().unwrap_or_else(|p| p.into_inner());
        let held = &mut *guard;
        if held.generation != this.generation {
            return Poll::Ready(Some(Err(ReplayError::Superseded)));
        }
        if !held.overflowed && this.next < held.chunks.len() {
            this.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(held.chunks[this.next - 1].clone()))));
        }
        if held.ended {
            if !this.trailers_sent
                && let Some(t) = &held.trailers
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t.clone()))));
            }
            return Poll::Ready(None);
        }
        match Pin::new(&mut held.source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                held.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(ReplayError::Client(e.into())))),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !held.overflowed {
                        if held.bytes + data.len() <= REPLAY_LIMIT {
                            held.bytes += data.len();
                            held.chunks.push(data.clone());
                            this.next += 1;
                        } else {
                            held.overflowed = true;
                            held.chunks = SmallVec::new();
                        }
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    held.trailers = Some(t.clone());
                    this.trailers_sent = true;
                }
                if held.source.is_end_stream() {
                    held.ended = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let held = self.held();
        held.ended
            && held.generation == self.generation
            && (held.overflowed || self.next >= held.chunks.len())
            && (self.trailers_sent || held.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        self.held().hint
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    type Chunks = StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>>;

    fn body(chunks: &[usize], trailers: bool) -> Replayable<Chunks> {
        let mut frames: Vec<Result<Frame<Bytes>, std::io::Error>> =
            chunks.iter().map(|n| Ok(Frame::data(Bytes::from(vec![7u8; *n])))).collect();
        if trailers {
            let mut t = HeaderMap::new();
            t.insert("grpc-status", http::HeaderValue::from_static("0"));
            frames.push(Ok(Frame::trailers(t)));
        }
        Replayable::new(StreamBody::new(futures::stream::iter(frames)))
    }

    async fn read(b: Replayable<Chunks>) -> Result<(usize, bool), ReplayError> {
        let collected = b.collect().await?;
        let trailers = collected.trailers().is_some();
        Ok((collected.to_bytes().len(), trailers))
    }

    #[tokio::test]
    async fn a_small_body_is_sent_again_whole_with_its_trailers() {
        let held = body(&[10, 20, 30], true);
        let first = held.replay().unwrap();
        assert_eq!(read(first).await.unwrap(), (60, true));
        assert_eq!(read(held.replay().unwrap()).await.unwrap(), (60, true));
        assert_eq!(read(held.replay().unwrap()).await.unwrap(), (60, true));
    }

    #[tokio::test]
    async fn a_body_cut_short_is_completed_from_the_client_on_replay() {
        let held = body(&[10, 20, 30], false);
        let mut first = held.replay().unwrap();
        // The first attempt took one chunk, then its endpoint refused the stream.
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap().len(), 10);
        let second = held.replay().unwrap();
        assert!(matches!(first.frame().await, Some(Err(ReplayError::Superseded))), "the old attempt stops");
        assert_eq!(read(second).await.unwrap(), (60, false));
    }

    #[tokio::test]
    async fn past_the_limit_a_body_cannot_be_replayed() {
        let held = body(&[REPLAY_LIMIT / 2, REPLAY_LIMIT / 2, 1], false);
        assert_eq!(read(held.replay().unwrap()).await.unwrap(), (REPLAY_LIMIT + 1, false));
        assert!(held.replay().is_none());
        // An unread body can always be sent again, whatever its size.
        let unread = body(&[REPLAY_LIMIT * 2], false);
        let _never_polled = unread.replay().unwrap();
        assert_eq!(read(unread.replay().unwrap()).await.unwrap(), (REPLAY_LIMIT * 2, false));
    }
}
