//! Client sockets that join the event loop only when they must wait
//! (HAProxy calls it speculative I/O).
//!
//! Registering a socket with epoll costs two system calls (an add, and a
//! delete when it closes) and the event loop's bookkeeping for each. Many
//! client connections never need it: a client that sends its request with
//! the connection and closes it after the answer (`Connection: close`,
//! health checkers, scripts, most HTTP/1.0) has its bytes waiting when the
//! connection is accepted, and the answer fits the socket's send buffer. A
//! [`ClientSocket`] reads and writes the socket directly until a read or a
//! write would wait; only then does it register, once, and from there on it
//! is an ordinary tokio `TcpStream`. A connection that goes idle between
//! requests registers when it first waits.

use std::io::{self, IoSlice, Write};
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::pin::Pin;
use std::task::{Context, Poll};

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// An accepted client connection; see the module's documentation.
pub(crate) struct ClientSocket(State);

enum State {
    /// Not registered with the event loop: every read and write is tried directly.
    Direct(std::net::TcpStream),
    /// Registered: waits like any tokio socket.
    Polled(TcpStream),
    /// Registration failed; the socket is closed.
    Gone,
}

impl ClientSocket {
    /// Wraps a connected, non-blocking socket.
    pub(crate) fn new(stream: std::net::TcpStream) -> ClientSocket {
        ClientSocket(State::Direct(stream))
    }

    /// Whether the socket has registered with the event loop.
    #[cfg(test)]
    fn registered(&self) -> bool {
        matches!(self.0, State::Polled(_))
    }

    /// The registered socket, registering it now if it was not.
    fn polled(&mut self) -> io::Result<&mut TcpStream> {
        if matches!(self.0, State::Direct(_)) {
            self.0 = match std::mem::replace(&mut self.0, State::Gone) {
                State::Direct(stream) => State::Polled(TcpStream::from_std(stream)?),
                other => other,
            };
        }
        match &mut self.0 {
            State::Polled(stream) => Ok(stream),
            _ => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// A write: tried directly while the socket is unregistered, through
    /// the registered socket once that would wait.
    fn poll_write_with(
        &mut self,
        cx: &mut Context<'_>,
        direct_write: impl FnOnce(&std::net::TcpStream) -> io::Result<usize>,
        polled_write: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        if let State::Direct(stream) = &self.0
            && let Some(done) = direct(direct_write(stream))
        {
            return Poll::Ready(done);
        }
        match self.polled() {
            Ok(stream) => polled_write(Pin::new(stream), cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    /// Completes when the socket may have bytes to read (or has ended).
    pub(crate) async fn readable(&mut self) -> io::Result<()> {
        if let State::Direct(stream) = &self.0 {
            let mut byte = [MaybeUninit::uninit()];
            match SockRef::from(stream).peek(&mut byte) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // A byte, the end of the stream or an error: the next read tells which.
                _ => return Ok(()),
            }
        }
        self.polled()?.readable().await
    }
}

/// What a direct attempt gives: done, or wait through the event loop.
fn direct<T>(attempt: io::Result<T>) -> Option<io::Result<T>> {
    match attempt {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        done => Some(done),
    }
}

impl AsyncRead for ClientSocket {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let State::Direct(stream) = &self.0 {
            // SAFETY: recv only writes bytes into the unfilled part, and the
            // count it returns is how many it initialized.
            match direct(SockRef::from(stream).recv(unsafe { buf.unfilled_mut() })) {
                Some(Ok(n)) => {
                    // SAFETY: recv initialized the first `n` bytes of the unfilled part.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None => {}
            }
        }
        match self.polled() {
            Ok(stream) => Pin::new(stream).poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for ClientSocket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(cx, |s| (&*s).write(data), |s, cx| s.poll_write(cx, data))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(cx, |s| (&*s).write_vectored(bufs), |s, cx| s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.0 {
            State::Direct(stream) => Poll::Ready(stream.shutdown(Shutdown::Write)),
            State::Polled(stream) => Pin::new(stream).poll_shutdown(cx),
            State::Gone => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// An accepted socket, non-blocking as the proxy's listener hands them
    /// out, and its client.
    async fn accepted() -> (ClientSocket, TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, _) = listener.accept().unwrap();
        stream.set_nonblocking(true).unwrap();
        (ClientSocket::new(stream), client)
    }

    #[tokio::test]
    async fn a_request_waiting_at_accept_is_read_and_answered_without_registering() {
        let (mut socket, mut client) = accepted().await;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        socket.readable().await.unwrap();
        let mut buf = Vec::with_capacity(64);
        let n = socket.read_buf(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\n\r\n");
        let head = IoSlice::new(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n");
        let n = socket.write_vectored(&[head, IoSlice::new(b"ok")]).await.unwrap();
        assert_eq!(n, 40);
        socket.shutdown().await.unwrap();
        assert!(!socket.registered(), "nothing had to wait");
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK") && answer.ends_with("ok"), "{answer}");
    }

    #[tokio::test]
    async fn a_read_that_would_wait_registers_and_wakes_when_bytes_come() {
        let (mut socket, mut client) = accepted().await;
        let sent = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            client.write_all(b"late").await.unwrap();
            client
        };
        let mut buf = [0; 16];
        let (read, _client) =
            tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(socket.read(&mut buf), sent) })
                .await
                .unwrap();
        assert_eq!(&buf[..read.unwrap()], b"late");
        assert!(socket.registered());
    }

    #[tokio::test]
    async fn readable_waits_for_bytes_or_the_end_of_the_stream() {
        let (mut socket, client) = accepted().await;
        let waited = tokio::time::timeout(Duration::from_millis(50), socket.readable()).await;
        assert!(waited.is_err(), "nothing sent: still waiting");
        drop(client);
        tokio::time::timeout(Duration::from_secs(5), socket.readable()).await.unwrap().unwrap();
        let mut buf = [0; 4];
        assert_eq!(socket.read(&mut buf).await.unwrap(), 0, "the end of the stream");
    }

    #[tokio::test]
    async fn a_write_larger_than_the_send_buffer_registers_and_completes() {
        let (mut socket, mut client) = accepted().await;
        let data: Vec<u8> = (0..8_000_000u32).map(|i| (i % 251) as u8).collect();
        let reader = async {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        };
        let writer = async {
            socket.write_all(&data).await.unwrap();
            socket.shutdown().await.unwrap();
        };
        let ((), got) =
            tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(writer, reader) }).await.unwrap();
        assert!(got == data);
        assert!(socket.registered(), "the client could not take 8 MB at once");
    }
}
