//! The operator's `/healthz`, `/readyz` and `/metrics`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;

use super::metrics::OperatorMetrics;

/// Serves the endpoints until the task is dropped. A standby is ready too:
/// it is a healthy replica waiting for the lease.
pub async fn serve(listener: TcpListener, metrics: Arc<OperatorMetrics>) {
    let gate = crate::small_http::Gate::default();
    loop {
        let (stream, permit) = gate.accept(&listener).await;
        let metrics = metrics.clone();
        crate::small_http::serve(stream, permit, move |req: Request<Incoming>| {
            let metrics = metrics.clone();
            async move {
                let (status, body) = match (req.method().as_str(), req.uri().path()) {
                    ("GET", "/healthz" | "/readyz") => (StatusCode::OK, Bytes::from_static(b"ok\n")),
                    ("GET", "/metrics") => (StatusCode::OK, Bytes::from(metrics.encode())),
                    ("GET", _) => (StatusCode::NOT_FOUND, Bytes::from_static(b"try /healthz, /readyz or /metrics\n")),
                    _ => (StatusCode::METHOD_NOT_ALLOWED, Bytes::from_static(b"only GET\n")),
                };
                let mut resp = Response::new(Full::new(body));
                *resp.status_mut() = status;
                Ok::<_, Infallible>(resp)
            }
        });
    }
}
