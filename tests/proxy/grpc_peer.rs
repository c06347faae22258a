//! gRPC peers from the ecosystem: tonic servers (with tonic-health) and
//! tonic clients, over a hand-written service (prost messages, no protoc).
//!
//! `test.Echo` has the four kinds of call: `Unary` (answers with the
//! server's name, echoes the payload, can sleep or fail with a status),
//! `Stream` (server streaming: `count` answers), `Sum` (client streaming:
//! the total payload size) and `Chat` (bidirectional: one answer per message).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use http::uri::PathAndQuery;
use tonic::codegen::{BoxFuture, Service};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// The one message of `test.Echo`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Msg {
    /// The answering server's name.
    #[prost(string, tag = "1")]
    pub server: String,
    #[prost(bytes = "vec", tag = "2")]
    pub payload: Vec<u8>,
    /// `Stream`: how many answers; `Sum`: the total received.
    #[prost(uint64, tag = "3")]
    pub count: u64,
    /// Sleep before answering (each answer, for `Stream`).
    #[prost(uint32, tag = "4")]
    pub delay_ms: u32,
    /// Fail with this gRPC status instead of answering.
    #[prost(int32, tag = "5")]
    pub fail: i32,
}

type MsgStream = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;

#[derive(Clone)]
struct Echo {
    name: Arc<str>,
    calls: Arc<AtomicU64>,
}

impl Echo {
    fn answer(&self, m: &Msg) -> Result<Msg, Status> {
        if m.fail != 0 {
            return Err(Status::new(Code::from(m.fail), format!("{} failed on purpose", self.name)));
        }
        Ok(Msg { server: self.name.to_string(), payload: m.payload.clone(), ..Msg::default() })
    }
}

struct Unary(Echo);
impl tonic::server::UnaryService<Msg> for Unary {
    type Response = Msg;
    type Future = BoxFuture<Response<Msg>, Status>;
    fn call(&mut self, req: Request<Msg>) -> Self::Future {
        let echo = self.0.clone();
        Box::pin(async move {
            let m = req.into_inner();
            tokio::time::sleep(Duration::from_millis(m.delay_ms.into())).await;
            echo.answer(&m).map(Response::new)
        })
    }
}

struct ServerStream(Echo);
impl tonic::server::ServerStreamingService<Msg> for ServerStream {
    type Response = Msg;
    type ResponseStream = MsgStream;
    type Future = BoxFuture<Response<MsgStream>, Status>;
    fn call(&mut self, req: Request<Msg>) -> Self::Future {
        let echo = self.0.clone();
        Box::pin(async move {
            let m = req.into_inner();
            let delay = Duration::from_millis(m.delay_ms.into());
            let answer = echo.answer(&m)?;
            let s = futures::stream::iter(0..m.count).then(move |i| {
                let mut a = answer.clone();
                async move {
                    tokio::time::sleep(delay).await;
                    a.count = i;
                    Ok(a)
                }
            });
            Ok(Response::new(Box::pin(s) as MsgStream))
        })
    }
}

struct ClientStream(Echo);
impl tonic::server::ClientStreamingService<Msg> for ClientStream {
    type Response = Msg;
    type Future = BoxFuture<Response<Msg>, Status>;
    fn call(&mut self, req: Request<Streaming<Msg>>) -> Self::Future {
        let echo = self.0.clone();
        Box::pin(async move {
            let mut s = req.into_inner();
            let mut total = 0;
            while let Some(m) = s.message().await? {
                total += m.payload.len() as u64;
            }
            Ok(Response::new(Msg { server: echo.name.to_string(), count: total, ..Msg::default() }))
        })
    }
}

struct Bidi(Echo);
impl tonic::server::StreamingService<Msg> for Bidi {
    type Response = Msg;
    type ResponseStream = MsgStream;
    type Future = BoxFuture<Response<MsgStream>, Status>;
    fn call(&mut self, req: Request<Streaming<Msg>>) -> Self::Future {
        let echo = self.0.clone();
        Box::pin(async move {
            let s = req.into_inner().map(move |m| m.and_then(|m| echo.answer(&m)));
            Ok(Response::new(Box::pin(s) as MsgStream))
        })
    }
}

/// `test.Echo` and `grpc.health.v1.Health` on one server.
#[derive(Clone)]
struct Routes<H> {
    echo: Echo,
    health: H,
}

type HttpResponse = http::Response<tonic::body::Body>;

impl<H> Service<http::Request<tonic::body::Body>> for Routes<H>
where
    H: Service<
            http::Request<tonic::body::Body>,
            Response = HttpResponse,
            Error = std::convert::Infallible,
            Future = BoxFuture<HttpResponse, std::convert::Infallible>,
        >,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let path = req.uri().path().to_owned();
        if path.starts_with("/grpc.health.v1.Health/") {
            return self.health.call(req);
        }
        let echo = self.echo.clone();
        echo.calls.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<Msg, Msg>::default());
            Ok(match path.as_str() {
                "/test.Echo/Unary" => grpc.unary(Unary(echo), req).await,
                "/test.Echo/Stream" => grpc.server_streaming(ServerStream(echo), req).await,
                "/test.Echo/Sum" => grpc.client_streaming(ClientStream(echo), req).await,
                "/test.Echo/Chat" => grpc.streaming(Bidi(echo), req).await,
                _ => Status::unimplemented(path).into_http(),
            })
        })
    }
}

/// A tonic server on its own loopback address, in its own runtime, so that
/// [`GrpcBackend::kill`] drops every connection at once like a crashed process.
pub struct GrpcBackend {
    pub addr: SocketAddr,
    calls: Arc<AtomicU64>,
    health: HealthReporter,
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Completes when the server has stopped (after a graceful shutdown, once its calls end).
    served: Option<tokio::task::JoinHandle<()>>,
}

impl GrpcBackend {
    /// Starts `name` on 127.0.0.`host`; `max_streams` sets its `SETTINGS_MAX_CONCURRENT_STREAMS`.
    pub async fn start(name: &str, host: u8, max_streams: Option<u32>) -> GrpcBackend {
        Self::start_on(name, SocketAddr::from(([127, 0, 0, host], 0)), max_streams).await
    }

    /// Starts `name` on `addr`.
    pub async fn start_on(name: &str, addr: SocketAddr, max_streams: Option<u32>) -> GrpcBackend {
        let listener = std::net::TcpListener::bind(addr).expect("bind gRPC backend");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let addr = listener.local_addr().expect("gRPC backend address");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("gRPC backend runtime");
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_service_status("", ServingStatus::Serving).await;
        let calls = Arc::new(AtomicU64::new(0));
        let routes = Routes { echo: Echo { name: name.into(), calls: calls.clone() }, health: health_service };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("register listener");
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .max_concurrent_streams(max_streams)
                .serve_with_incoming_shutdown(routes, incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        GrpcBackend { addr, calls, health, runtime: Some(runtime), stop: Some(stop), served: Some(served) }
    }

    /// Calls received (health checks excluded).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Sets what the standard health service answers for the whole server.
    pub async fn set_serving(&self, serving: bool) {
        let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
        self.health.set_service_status("", status).await;
    }

    /// Graceful shutdown: `GOAWAY`, calls in flight finish, the listener closes.
    pub fn shut_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stops like a process on SIGTERM: a graceful shutdown, then a kill if
    /// calls are still running after `grace`.
    pub async fn terminate(mut self, grace: std::time::Duration) {
        self.shut_down();
        if let Some(served) = self.served.take() {
            let _ = tokio::time::timeout(grace, served).await;
        }
        self.kill();
    }

    /// Drops the server and all its connections at once.
    pub fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for GrpcBackend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `n` gRPC backends named g1..gn on 127.0.0.`first_host`.. .
pub async fn grpc_backends(n: u8, first_host: u8, max_streams: Option<u32>) -> Vec<GrpcBackend> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(GrpcBackend::start(&format!("g{}", i + 1), first_host + i, max_streams).await);
    }
    v
}

/// Whether the standard health service at `addr` answers `SERVING` within `limit`.
pub async fn health_check(addr: SocketAddr, limit: Duration) -> bool {
    use tonic_health::pb::health_check_response::ServingStatus as Status;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let check = async {
        let channel = Endpoint::from_shared(format!("http://{addr}")).ok()?.connect().await.ok()?;
        let resp = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.ok()?;
        Some(resp.into_inner().status == Status::Serving as i32)
    };
    tokio::time::timeout(limit, check).await.ok().flatten().unwrap_or(false)
}

/// One tonic client channel (one HTTP/2 connection) to `addr`.
pub async fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint URI")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("gRPC channel connects")
}

/// A `test.Echo` client on a channel.
#[derive(Clone)]
pub struct EchoClient(tonic::client::Grpc<Channel>);

fn codec() -> tonic_prost::ProstCodec<Msg, Msg> {
    tonic_prost::ProstCodec::default()
}

impl EchoClient {
    pub fn new(channel: Channel) -> Self {
        EchoClient(tonic::client::Grpc::new(channel))
    }

    async fn ready(&mut self) -> Result<(), Status> {
        self.0.ready().await.map_err(|e| Status::unknown(format!("channel not ready: {e}")))
    }

    pub async fn unary(&mut self, req: Request<Msg>) -> Result<Msg, Status> {
        self.ready().await?;
        let path = PathAndQuery::from_static("/test.Echo/Unary");
        self.0.unary(req, path, codec()).await.map(Response::into_inner)
    }

    pub async fn stream(&mut self, req: Request<Msg>) -> Result<Streaming<Msg>, Status> {
        self.ready().await?;
        let path = PathAndQuery::from_static("/test.Echo/Stream");
        self.0.server_streaming(req, path, codec()).await.map(Response::into_inner)
    }

    pub async fn sum(&mut self, msgs: Vec<Msg>) -> Result<Msg, Status> {
        self.ready().await?;
        let path = PathAndQuery::from_static("/test.Echo/Sum");
        self.0
            .client_streaming(Request::new(futures::stream::iter(msgs)), path, codec())
            .await
            .map(Response::into_inner)
    }

    pub async fn chat(&mut self, outgoing: impl Stream<Item = Msg> + Send + 'static) -> Result<Streaming<Msg>, Status> {
        self.ready().await?;
        let path = PathAndQuery::from_static("/test.Echo/Chat");
        self.0.streaming(Request::new(outgoing), path, codec()).await.map(Response::into_inner)
    }
}

/// A unary request with a payload of `size` bytes.
pub fn msg(size: usize) -> Msg {
    Msg { payload: vec![0x5a; size], ..Msg::default() }
}
