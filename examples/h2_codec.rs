//! Two HTTP/2 servers that answer every request `200` with a 13-byte body,
//! on one thread each, for comparing the cost of the HTTP/2 layer alone
//! (`bench/proxy/codec.py` loads them with h2load and reads their CPU time):
//!
//! - `h2_codec own ADDR`: the proxy's own codec ([`Conn`]): bytes read
//!   go through `recv`, responses are written into its output, the output
//!   is written in one call;
//! - `h2_codec h2 ADDR`: the `h2` crate's server with the settings the
//!   proxy gives it, answering each request as it is accepted, in the
//!   connection's task (the least the crate allows).

use std::net::SocketAddr;
use std::process::ExitCode;

use bytes::Bytes;
use fulcrum::proxy::h2conn::{Config, Conn, Handler, Head};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BODY: &[u8] = b"hello, world\n";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(kind), Some(addr)) = (args.first(), args.get(1).and_then(|a| a.parse::<SocketAddr>().ok())) else {
        eprintln!("usage: h2_codec own|h2 ADDR");
        return ExitCode::from(2);
    };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        return ExitCode::FAILURE;
    };
    let own = kind == "own";
    rt.block_on(async move {
        let Ok(listener) = TcpListener::bind(addr).await else { return ExitCode::FAILURE };
        while let Ok((s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            if own {
                tokio::spawn(serve_own(s));
            } else {
                tokio::spawn(serve_h2(s));
            }
        }
        ExitCode::SUCCESS
    })
}

#[derive(Default)]
struct Answer {
    ended: Vec<u32>,
    consumed: Vec<(u32, usize)>,
}

impl Handler for Answer {
    fn request(&mut self, stream: u32, _: &Head, end_stream: bool) {
        if end_stream {
            self.ended.push(stream);
        }
    }
    fn data(&mut self, stream: u32, data: &[u8], end_stream: bool) {
        self.consumed.push((stream, data.len()));
        if end_stream {
            self.ended.push(stream);
        }
    }
    fn trailers(&mut self, stream: u32, _: &Head) {
        self.ended.push(stream);
    }
    fn reset(&mut self, _: u32, _: u32) {}
    fn writable(&mut self, _: u32) {}
}

async fn serve_own(mut s: TcpStream) {
    let mut conn = Conn::server(Config::default());
    let mut app = Answer::default();
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut out = Vec::with_capacity(64 * 1024);
    loop {
        std::mem::swap(&mut out, conn.output());
        if s.write_all(&out).await.is_err() || conn.is_done() {
            return;
        }
        out.clear();
        match s.read_buf(&mut buf).await {
            Ok(n) if n > 0 => {}
            _ => return,
        }
        let Ok(taken) = conn.recv(&buf, &mut app) else { continue };
        buf.drain(..taken);
        for (stream, n) in app.consumed.drain(..) {
            conn.release(stream, n);
        }
        let length = BODY.len().to_string();
        for stream in app.ended.drain(..) {
            let fields = [(&b"content-type"[..], &b"text/plain"[..]), (b"content-length", length.as_bytes())];
            if conn.send_response(stream, 200, fields, false).is_ok() {
                let _ = conn.send_data(stream, BODY, true);
            }
        }
    }
}

async fn serve_h2(s: TcpStream) {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(1024 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .max_frame_size(16 * 1024)
        .max_send_buffer_size(400 * 1024)
        .max_concurrent_streams(128);
    let Ok(mut conn) = b.handshake::<_, Bytes>(s).await else { return };
    while let Some(Ok((req, mut respond))) = conn.accept().await {
        drop(req);
        let resp = http::Response::builder()
            .header("content-type", "text/plain")
            .header("content-length", BODY.len())
            .body(())
            .unwrap_or_default();
        if let Ok(mut send) = respond.send_response(resp, false) {
            let _ = send.send_data(Bytes::from_static(BODY), true);
        }
    }
}
