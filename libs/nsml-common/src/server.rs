//! Serving gRPC: the internal-secret guard every service sits behind, health, reflection and graceful
//! shutdown.

use crate::error::ErrorCode;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tower::{Layer, Service};
use tracing::Instrument;

use crate::caller::INTERNAL_SECRET_KEY;
use crate::telemetry;
use crate::tls::Tls;

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
        let span = telemetry::span_from_headers(
            req.headers(),
            || tracing::info_span!("grpc", path = %path),
        );
        let fut = self.inner.call(req);
        Box::pin(fut.instrument(span))
    }
}

/// Serves `routes` (plus health and reflection) on `listener` until `cancel`, behind the internal guard: a
/// service that has started already, reported SERVING at once.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    service_names: &[&str],
    secret: Arc<str>,
    cancel: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (port, serving) = Port::open(listener, secret, cancel).await;
    port.started(routes, service_names, Vec::new()).await;
    serving.await
}

/// Metadata on the refusal of a call that a port received before its service had started: nothing was done,
/// so the caller may send any call again ([`crate::clients::retry`]).
pub const NOT_STARTED_KEY: &str = "x-nsml-not-started";

/// A service's port, served from the moment it is bound. Until the service has started
/// ([`Port::started`]), `grpc.health.v1` answers NOT_SERVING and every other call is refused with UNAVAILABLE
/// and [`NOT_STARTED_KEY`]; health turns SERVING once the service's read models have caught up with the log.
/// An orchestrator (or a test) can so tell a process that is up from one that is ready.
#[derive(Clone)]
pub struct Port {
    health: tonic_health::server::HealthReporter,
    routes: Arc<OnceLock<Routes>>,
}

impl Port {
    /// Starts serving `listener` (behind the internal guard) until `cancel`; the returned future is the server.
    pub async fn open(
        listener: TcpListener,
        secret: Arc<str>,
        cancel: CancellationToken,
    ) -> (
        Port,
        BoxFuture<'static, Result<(), tonic::transport::Error>>,
    ) {
        Self::open_tls(listener, secret, None, cancel).await
    }

    /// As [`Port::open`], serving TLS only when `tls` is given (and then requiring a client certificate
    /// issued by its CA, if it says mutual TLS).
    pub async fn open_tls(
        listener: TcpListener,
        secret: Arc<str>,
        tls: Option<&Tls>,
        cancel: CancellationToken,
    ) -> (
        Port,
        BoxFuture<'static, Result<(), tonic::transport::Error>>,
    ) {
        let port = Port::new().await;
        let mut routes =
            Routes::from(axum::Router::new().fallback_service(Late(port.routes.clone())))
                .add_service(port.health_service());
        match tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(nsml_proto::v1::FILE_DESCRIPTOR_SET)
            .build_v1()
        {
            Ok(r) => routes = routes.add_service(r),
            Err(err) => tracing::error!(%err, "cannot serve gRPC reflection"),
        }
        let mut server = tonic::transport::Server::builder().tcp_nodelay(true);
        if let Some(tls) = tls {
            server = match server.tls_config(tls.server_config()) {
                Ok(server) => server,
                Err(err) => return (port, Box::pin(async move { Err(err) })),
            };
        }
        let mut builder = server.layer(InternalGuardLayer::new(secret));
        let router = builder.add_routes(routes);
        // A custom incoming stream bypasses the builder's TCP_NODELAY: set it per connection, or Nagle's
        // algorithm adds ~40 ms to every small gRPC round trip.
        let incoming = tokio_stream::StreamExt::map(TcpListenerStream::new(listener), |s| {
            if let Ok(tcp) = &s {
                let _ = tcp.set_nodelay(true);
            }
            s
        });
        let serving =
            Box::pin(router.serve_with_incoming_shutdown(incoming, cancel.cancelled_owned()));
        (port, serving)
    }

    /// A port's state with nothing served yet: every service, and the server as a whole, NOT_SERVING.
    pub async fn new() -> Port {
        let (health, _) = tonic_health::server::health_reporter();
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        Port {
            health,
            routes: Arc::new(OnceLock::new()),
        }
    }

    /// `grpc.health.v1` as this port reports it.
    pub fn health_service(
        &self,
    ) -> tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService> {
        tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(self.health.clone()),
        )
    }

    /// The service has started: calls reach `routes` from now on, and `names` (with the server as a whole)
    /// turn SERVING once every read model in `ready` has caught up with the log. A second call is ignored.
    pub async fn started(&self, routes: Routes, names: &[&str], ready: Vec<watch::Receiver<bool>>) {
        if self.routes.set(routes.prepare()).is_err() {
            tracing::warn!("a port's service was started twice; the first routes stay");
            return;
        }
        let health = self.health.clone();
        for name in names {
            health
                .set_service_status(*name, tonic_health::ServingStatus::NotServing)
                .await;
        }
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        tokio::spawn(async move {
            for mut r in ready {
                // A sender dropped before it was ready is a projection that stopped: never serving.
                if r.wait_for(|ready| *ready).await.is_err() {
                    return;
                }
            }
            for name in names.iter().map(String::as_str).chain([""]) {
                health
                    .set_service_status(name, tonic_health::ServingStatus::Serving)
                    .await;
            }
        });
    }
}

/// The routes of a port's service once it has started; a refusal that says so before then.
#[derive(Clone)]
struct Late(Arc<OnceLock<Routes>>);

impl<B> Service<http::Request<B>> for Late
where
    Routes: Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        >,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = futures::future::Either<
        <Routes as Service<http::Request<B>>>::Future,
        std::future::Ready<Result<Self::Response, Self::Error>>,
    >;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match self.0.get() {
            // A router is always ready (axum's `Router::poll_ready` returns at once).
            Some(routes) => futures::future::Either::Left(routes.clone().call(req)),
            None => {
                let mut resp = ErrorCode::Unavailable
                    .status("this service is starting; retry shortly")
                    .into_http();
                resp.headers_mut()
                    .insert(NOT_STARTED_KEY, http::HeaderValue::from_static("true"));
                futures::future::Either::Right(std::future::ready(Ok(resp)))
            }
        }
    }
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
    /// The service's read models, each ready once it has caught up with the log ([`crate::projection::Projection::readiness`]).
    pub ready: Vec<watch::Receiver<bool>>,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tower::ServiceExt as _;

    use super::*;

    async fn status(port: &Port, service: &str) -> ServingStatus {
        let answer = HealthClient::new(port.health_service())
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .expect("health answers")
            .into_inner();
        answer.status()
    }

    /// A `grpc.health.v1.Health/Check` request for the whole server, as a client frames it.
    fn check_request() -> http::Request<tonic::body::Body> {
        // A gRPC message frame: not compressed, length 0 (an empty `HealthCheckRequest`).
        let frame = bytes::Bytes::from_static(&[0, 0, 0, 0, 0]);
        http::Request::builder()
            .method("POST")
            .uri("/grpc.health.v1.Health/Check")
            .header("content-type", "application/grpc")
            .body(tonic::body::Body::new(http_body_util::Full::new(frame)))
            .expect("request")
    }

    #[tokio::test]
    async fn a_port_refuses_calls_until_started_and_serves_once_its_read_models_caught_up() {
        let port = Port::new().await;
        assert_eq!(status(&port, "").await, ServingStatus::NotServing);

        // Before the service started: refused as not started, which a caller may send again.
        let late = Late(port.routes.clone());
        let refused = late.clone().oneshot(check_request()).await.expect("answer");
        assert_eq!(
            refused.headers().get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"14"[..]),
            "UNAVAILABLE"
        );
        assert!(refused.headers().contains_key(NOT_STARTED_KEY));

        // Started with a read model still catching up: calls reach the service, health still says wait.
        let (caught_up, ready) = watch::channel(false);
        let routes = Routes::new(port.health_service());
        port.started(routes, &["nsml.v1.TestService"], vec![ready])
            .await;
        let served = late.oneshot(check_request()).await.expect("answer");
        assert!(!served.headers().contains_key(NOT_STARTED_KEY));
        assert_eq!(served.status(), http::StatusCode::OK);
        assert_eq!(
            status(&port, "nsml.v1.TestService").await,
            ServingStatus::NotServing
        );
        assert_eq!(status(&port, "").await, ServingStatus::NotServing);

        caught_up.send_replace(true);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while status(&port, "").await != ServingStatus::Serving {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the port never reported SERVING"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            status(&port, "nsml.v1.TestService").await,
            ServingStatus::Serving
        );
    }
}
