//! Serving gRPC: the internal-secret guard every service sits behind, health, reflection and graceful
//! shutdown.

use crate::error::ErrorCode;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tower::{Layer, Service};
use tracing::Instrument;

use crate::caller::INTERNAL_SECRET_KEY;
use crate::telemetry;

/// Refuses calls that lack the deployment's internal secret (health checks excepted), and opens a span per
/// call, parented to the caller's trace.
#[derive(Clone)]
pub struct InternalGuardLayer {
    secret: Arc<str>,
}

impl InternalGuardLayer {
    /// Guards with `secret`.
    pub fn new(secret: Arc<str>) -> Self {
        Self { secret }
    }
}

impl<S> Layer<S> for InternalGuardLayer {
    type Service = InternalGuard<S>;
    fn layer(&self, inner: S) -> Self::Service {
        InternalGuard {
            inner,
            secret: self.secret.clone(),
        }
    }
}

/// See [`InternalGuardLayer`].
#[derive(Clone)]
pub struct InternalGuard<S> {
    inner: S,
    secret: Arc<str>,
}

impl<S> InternalGuard<S> {
    /// Guards `inner` with `secret`.
    pub fn new(inner: S, secret: Arc<str>) -> Self {
        Self { inner, secret }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl<S, B> Service<http::Request<B>> for InternalGuard<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_string();
        let open = path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.");
        let ok = open
            || req
                .headers()
                .get(INTERNAL_SECRET_KEY)
                .is_some_and(|v| constant_time_eq(v.as_bytes(), self.secret.as_bytes()));
        if !ok {
            tracing::warn!(%path, "refused a call without the internal secret");
            let resp = ErrorCode::Unauthenticated
                .status(
                    "this service accepts calls only from the gateway and other platform services",
                )
                .into_http();
            return Box::pin(async move { Ok(resp) });
        }
        let span = tracing::info_span!("grpc", path = %path);
        telemetry::set_parent_from_headers(&span, req.headers());
        let fut = self.inner.call(req);
        Box::pin(fut.instrument(span))
    }
}

/// Serves `routes` (plus health and reflection) on `listener` until `cancel`, behind the internal guard.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    service_names: &[&str],
    secret: Arc<str>,
    cancel: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (health, health_svc) = tonic_health::server::health_reporter();
    for name in service_names {
        health
            .set_service_status(*name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(nsml_proto::v1::FILE_DESCRIPTOR_SET)
        .build_v1();
    let mut builder = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .layer(InternalGuardLayer::new(secret));
    let mut router = builder.add_routes(routes).add_service(health_svc);
    if let Ok(r) = reflection {
        router = router.add_service(r);
    }
    // A custom incoming stream bypasses the builder's TCP_NODELAY: set it per connection, or Nagle's
    // algorithm adds ~40 ms to every small gRPC round trip.
    let incoming = tokio_stream::StreamExt::map(TcpListenerStream::new(listener), |s| {
        if let Ok(tcp) = &s {
            let _ = tcp.set_nodelay(true);
        }
        s
    });
    router
        .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
        .await
}

/// A random secret for a deployment that lives in one process.
pub fn random_secret() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// A service that is built and ready to be served: its routes, its gRPC service names (for health) and its
/// background tasks (projections, reactors), which end when the context's cancellation token fires.
pub struct Started {
    /// Adds the service to a set of routes (several services share one server in the embedded deployment).
    pub routes: Box<dyn FnOnce(Routes) -> Routes + Send>,
    pub names: Vec<&'static str>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}
