//! The operator's `/healthz` and `/readyz`.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Serves the health endpoints until the task is dropped.
pub async fn serve(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let svc = service_fn(|req: Request<Incoming>| async move {
                let (status, body) = match req.uri().path() {
                    "/healthz" | "/readyz" => (StatusCode::OK, "ok\n"),
                    _ => (StatusCode::NOT_FOUND, "try /healthz or /readyz\n"),
                };
                let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                *resp.status_mut() = status;
                Ok::<_, Infallible>(resp)
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
