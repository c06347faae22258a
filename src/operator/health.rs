//! The operator's `/healthz`, `/readyz` and `/metrics`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::metrics::OperatorMetrics;

/// Serves the endpoints until the task is dropped. A standby is ready too:
/// it is a healthy replica waiting for the lease.
pub async fn serve(listener: TcpListener, metrics: Arc<OperatorMetrics>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let metrics = metrics.clone();
                async move {
                    let (status, body) = match req.uri().path() {
                        "/healthz" | "/readyz" => (StatusCode::OK, Bytes::from_static(b"ok\n")),
                        "/metrics" => (StatusCode::OK, Bytes::from(metrics.encode())),
                        _ => (StatusCode::NOT_FOUND, Bytes::from_static(b"try /healthz, /readyz or /metrics\n")),
                    };
                    let mut resp = Response::new(Full::new(body));
                    *resp.status_mut() = status;
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
