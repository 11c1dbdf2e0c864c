//! The gateway: the platform's one public endpoint for the CLI, the SDK, the web UI and other clients.
//!
//! It serves the services' own gRPC APIs (`/nsml.v1.SessionService/Run`, …), natively and as gRPC-Web, by
//! proxying each call to the owning service after: refusing the platform's internal calls
//! (`nsml.internal.v1`), dropping any `x-nsml-*` metadata a client sent, rate-limiting per caller (see
//! `ratelimit`: by address until the caller is known to be a user), resolving the bearer token (or a browser's
//! cookie, see `web`) to an identity through the auth service (kept for a moment: see `identities`), and
//! stamping the call with the deployment's internal secret and the address it came from. Services then decide
//! what the identity may do. A call that a service in another process refuses because it is still starting
//! (catching up with the log after a restart) is held and sent again once it has started, for up to 40 s.
//! The same port serves the web UI's files at `/`, gRPC reflection and health.

mod calls;
mod error;
mod health;
mod identities;
mod ratelimit;
mod web;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use nsml_common::caller::{IDENTITY_KEY, INTERNAL_SECRET_KEY};
use nsml_common::clients::retry::{Backoff, Retrying};
use nsml_common::clients::{Clients, ServiceAddrs, Transport};
use nsml_common::service::Service;

use crate::error::Refusal;
use nsml_proto::internal::v1::AuthenticateRequest;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::metadata::MetadataMap;
use tower::ServiceExt;
use tracing::Instrument;

/// Metadata key under which the auth service reads the address a call came from (its `PEER_KEY`).
pub(crate) const PEER_KEY: &str = "x-nsml-peer";
/// The longest bearer token asked of the auth service; the platform's are 64 characters.
const MAX_TOKEN_BYTES: usize = nsml_common::bounds::MAX_TOKEN_BYTES;

/// Methods that need no login.
const ANONYMOUS_METHODS: &[&str] = &["/nsml.v1.AuthService/Login"];

/// The auth service's methods that change no one's identity; every other one makes the gateway forget the
/// identities it keeps.
const AUTH_READS: &[&str] = &[
    "/nsml.v1.AuthService/Login",
    "/nsml.v1.AuthService/WhoAmI",
    "/nsml.v1.AuthService/ListCompetitions",
    "/nsml.v1.AuthService/GetCompetition",
];

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("service clients: {0}")]
    Clients(#[from] nsml_common::clients::ClientsError),
    #[error("serving: {0}")]
    Serve(#[from] std::io::Error),
}

struct Inner {
    clients: Clients,
    routes: HashMap<&'static str, Transport>,
    secret: http::HeaderValue,
    limiter: ratelimit::Limiter,
    identities: identities::Identities,
}

/// Serves the public API on `listener` until `cancel`.
pub async fn serve(
    listener: TcpListener,
    addrs: &ServiceAddrs,
    secret: &str,
    cancel: CancellationToken,
) -> Result<(), GatewayError> {
    let mut upstream = Vec::new();
    let mut routes = HashMap::new();
    for service in Service::ALL {
        let transport = addrs.transport(service)?;
        // A call reaching a service in another process that is still starting (catching up with the log after
        // a restart) is held until it has started, rather than refused: the service did nothing with it. What
        // else to retry is the client's to decide. Health is asked without it, so that it tells a starting
        // service as it is. In this process (the embedded deployment) every service has started before the
        // gateway serves.
        let forward = match addrs.local {
            Some(_) => transport.clone(),
            None => Transport::new(Retrying::until_started(
                transport.clone(),
                Backoff::THROUGH_RESTART,
            )),
        };
        routes.insert(service.grpc_name(), forward);
        upstream.push((service, transport));
    }
    let inner = Arc::new(Inner {
        clients: Clients::new(addrs, secret, "gateway")?,
        routes,
        secret: http::HeaderValue::from_str(secret)
            .map_err(|_| GatewayError::Serve(std::io::Error::other("invalid internal secret")))?,
        limiter: ratelimit::Limiter::from_env(),
        identities: identities::Identities::default(),
    });
    let routes = axum::Router::new()
        .route("/web/login", axum::routing::post(web::login))
        .route("/web/logout", axum::routing::post(web::logout))
        .fallback(entry)
        .with_state(inner)
        .merge(public_meta_services(upstream, cancel.clone()).await);
    // gRPC-Web (binary and text) beside native gRPC: a gRPC-Web call becomes a gRPC one before routing and its
    // answer becomes gRPC-Web again; every other request is routed as it came.
    let grpc_web = tower::util::BoxCloneSyncService::new(
        tower::ServiceBuilder::new()
            .layer(tonic_web::GrpcWebLayer::new())
            .map_request(|req: http::Request<tonic::body::Body>| req.map(Body::new))
            .map_response(|resp: axum::response::Response| resp.map(tonic::body::Body::new))
            .service(routes.clone()),
    );
    let app = routes.layer(axum::middleware::from_fn_with_state(
        grpc_web,
        grpc_web_first,
    ));
    let app = match cors_from_env() {
        Some(cors) => app.layer(cors),
        None => app,
    };
    // gRPC calls are small writes: without TCP_NODELAY, Nagle's algorithm adds ~40 ms per round trip.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::warn!(%err, "cannot set TCP_NODELAY on a gateway connection");
        }
    });
    // Callers not yet known to be a user are rate-limited by the address they connect from.
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(cancel.cancelled_owned())
    .await?;
    Ok(())
}

type GrpcWeb = tower::util::BoxCloneSyncService<
    http::Request<Body>,
    http::Response<tonic::body::Body>,
    std::convert::Infallible,
>;

/// Sends gRPC-Web calls through the translation to gRPC, and everything else on as it came.
async fn grpc_web_first(
    State(grpc_web): State<GrpcWeb>,
    req: http::Request<Body>,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let is_grpc_web = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc-web"));
    if !is_grpc_web {
        return next.run(req).await;
    }
    match grpc_web.oneshot(req).await {
        Ok(resp) => resp.map(Body::new),
        Err(never) => match never {},
    }
}

/// Cross-origin calls, allowed only from the origins `NSML_CORS_ORIGINS` lists (comma-separated); none by
/// default, as the web UI is served from the gateway's own origin.
fn cors_from_env() -> Option<tower_http::cors::CorsLayer> {
    let origins: Vec<http::HeaderValue> = std::env::var("NSML_CORS_ORIGINS")
        .ok()?
        .split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .filter_map(|o| match http::HeaderValue::from_str(o) {
            Ok(v) => Some(v),
            Err(_) => {
                tracing::warn!(
                    origin = o,
                    "NSML_CORS_ORIGINS names an origin that is not a valid header value; ignored"
                );
                None
            }
        })
        .collect();
    if origins.is_empty() {
        return None;
    }
    use http::header::{AUTHORIZATION, CONTENT_TYPE};
    let name = http::HeaderName::from_static;
    Some(
        tower_http::cors::CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([http::Method::POST, http::Method::GET, http::Method::OPTIONS])
            .allow_headers([
                CONTENT_TYPE,
                AUTHORIZATION,
                name("x-grpc-web"),
                name("x-user-agent"),
                name("grpc-timeout"),
            ])
            .expose_headers([
                name("grpc-status"),
                name("grpc-message"),
                name("grpc-status-details-bin"),
            ])
            .max_age(std::time::Duration::from_secs(24 * 3600)),
    )
}

/// gRPC reflection (v1 and v1alpha) and `grpc.health.v1` on the public port, listing the public services only;
/// health follows the services' own (`health`).
async fn public_meta_services(
    upstream: Vec<(Service, Transport)>,
    cancel: CancellationToken,
) -> axum::Router {
    let (health, health_svc) = tonic_health::server::health_reporter();
    health::not_serving(&health).await;
    tokio::spawn(health::mirror(health, upstream, cancel));
    let mut routes = tonic::service::Routes::new(health_svc);
    match tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(nsml_proto::v1::PUBLIC_FILE_DESCRIPTOR_SET)
        .build_v1()
    {
        Ok(v1) => routes = routes.add_service(v1),
        Err(err) => tracing::error!(%err, "cannot serve gRPC reflection (v1)"),
    }
    match tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(nsml_proto::v1::PUBLIC_FILE_DESCRIPTOR_SET)
        .build_v1alpha()
    {
        Ok(v1alpha) => routes = routes.add_service(v1alpha),
        Err(err) => tracing::error!(%err, "cannot serve gRPC reflection (v1alpha)"),
    }
    let mut router = axum::Router::new();
    for service in [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        router = router.route_service(&format!("/{service}/{{*method}}"), routes.clone());
    }
    router
}

/// Everything the named routes do not take: the web UI's files for `GET`, client calls otherwise.
async fn entry(
    state: State<Arc<Inner>>,
    peer: ConnectInfo<SocketAddr>,
    req: http::Request<Body>,
) -> axum::response::Response {
    if req.method() == http::Method::GET || req.method() == http::Method::HEAD {
        return web::asset(req.uri().path(), req.headers());
    }
    // A span per call, in the client's trace when it sent one; the services' spans are its children.
    let span = nsml_common::telemetry::span_from_headers(
        req.headers(),
        || tracing::info_span!("gateway", path = %req.uri().path()),
    );
    let call = calls::Call::start(req.uri().path());
    call.answered(proxy(state, peer, req).instrument(span).await)
}

fn status_response(s: Status) -> axum::response::Response {
    let (parts, _) = s.into_http::<()>().into_parts();
    axum::response::Response::from_parts(parts, Body::empty())
}

/// The caller's token, from `Authorization: Bearer` (where `proxy` put a browser's cookie token too).
fn bearer(headers: &http::HeaderMap) -> Option<String> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    v.strip_prefix("Bearer ")
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// The caller a bearer token names: kept from a moment ago, or asked of the auth service.
async fn resolve(gw: &Inner, token: String) -> Result<Arc<identities::Resolved>, Status> {
    if let Some(id) = gw.identities.get(&token, Instant::now()) {
        return Ok(id);
    }
    let asked = gw.identities.asking();
    let id = gw
        .clients
        .auth_internal
        .clone()
        .authenticate(AuthenticateRequest {
            token: token.clone(),
        })
        .await?
        .into_inner();
    let id = Arc::new(identities::Resolved::new(&id));
    gw.identities
        .keep(&token, id.clone(), asked, Instant::now());
    Ok(id)
}

fn too_many(key: &ratelimit::Key, retry_ms: u64) -> axum::response::Response {
    status_response(
        Refusal::TooMany {
            key: key.clone(),
            retry_ms,
        }
        .into(),
    )
}

/// Serves one client call: find its service, refuse what clients may not call, identify and rate-limit the
/// caller, then forward it stamped as coming through the gateway.
async fn proxy(
    State(gw): State<Arc<Inner>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: http::Request<Body>,
) -> axum::response::Response {
    let path = req.uri().path().to_string();
    let (service, chan) = match route(&gw, &path) {
        Ok(found) => found,
        Err(refusal) => return status_response(refusal.into()),
    };
    drop_spoofed_metadata(req.headers_mut());
    // A browser's token travels on as a bearer, as the CLI's does; its cookies go no further.
    if let Some(token) = web::cookie_token(req.headers())
        && let Ok(v) = http::HeaderValue::from_str(&format!("Bearer {token}"))
    {
        req.headers_mut().insert(http::header::AUTHORIZATION, v);
    }
    req.headers_mut().remove(http::header::COOKIE);
    if let Err(refused) = identify(&gw, peer, &path, &mut req).await {
        return refused;
    }
    if let Ok(v) = http::HeaderValue::from_str(&peer.ip().to_string()) {
        req.headers_mut().insert(PEER_KEY, v);
    }
    req.headers_mut()
        .insert(INTERNAL_SECRET_KEY, gw.secret.clone());
    forward(&gw, service, &path, chan, req).await
}

/// The service a call's path names and how to reach it, unless clients may not call it.
fn route(gw: &Inner, path: &str) -> Result<(String, Transport), Refusal> {
    let Some(service) = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .map(|(s, _)| s.to_string())
    else {
        return Err(Refusal::NoSuchMethod(path.to_string()));
    };
    // The platform's own calls (`nsml.internal.v1`) are served only on the services' internal ports.
    if service.starts_with("nsml.internal.") {
        return Err(Refusal::InternalMethod);
    }
    let Some(chan) = gw.routes.get(service.as_str()).cloned() else {
        return Err(Refusal::NoSuchService(service));
    };
    Ok((service, chan))
}

/// Clients never vouch for themselves: drops whatever internal metadata they sent.
fn drop_spoofed_metadata(headers: &mut http::HeaderMap) {
    let spoofed: Vec<http::HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-nsml-"))
        .cloned()
        .collect();
    for k in spoofed {
        headers.remove(k);
    }
}

/// Charges the call to its caller and stamps it with the caller's identity, or answers it with a refusal.
async fn identify(
    gw: &Inner,
    peer: SocketAddr,
    path: &str,
    req: &mut http::Request<Body>,
) -> Result<(), axum::response::Response> {
    let address = ratelimit::Key::address(peer.ip());
    let token = bearer(req.headers());
    let known = token
        .as_deref()
        .and_then(|t| gw.identities.get(t, Instant::now()));
    // A caller not known to be a user is charged to its address before the auth service is asked anything:
    // a wrong login or a forged token costs its sender, not the auth service or the other callers.
    if known.is_none()
        && let Err(retry_ms) = gw.limiter.check(&address)
    {
        return Err(too_many(&address, retry_ms));
    }
    let Some(token) = token else {
        return Ok(());
    };
    let resolved = match known {
        Some(id) => Ok(id),
        None if token.len() > MAX_TOKEN_BYTES => Err(Refusal::ForeignToken.into()),
        None => resolve(gw, token).await,
    };
    match resolved {
        Ok(id) => {
            let caller = ratelimit::Key::User(id.username.clone());
            if let Err(retry_ms) = gw.limiter.check(&caller) {
                return Err(too_many(&caller, retry_ms));
            }
            let mut md = MetadataMap::from_headers(std::mem::take(req.headers_mut()));
            md.insert_bin(IDENTITY_KEY, id.metadata.clone());
            *req.headers_mut() = md.into_headers();
            Ok(())
        }
        Err(s) if ANONYMOUS_METHODS.contains(&path) => {
            tracing::debug!(%s, "ignoring a stale token on login");
            Ok(())
        }
        Err(s) => Err(status_response(s)),
    }
}

/// Sends the call to its service; a call that may change who someone is makes the gateway forget the
/// identities it keeps, before and after.
async fn forward(
    gw: &Inner,
    service: String,
    path: &str,
    chan: Transport,
    req: http::Request<Body>,
) -> axum::response::Response {
    let changes_identities = service == "nsml.v1.AuthService" && !AUTH_READS.contains(&path);
    if changes_identities {
        gw.identities.forget_all();
    }
    let mut req = req.map(|body| tonic::body::Body::new(calls::metered(body)));
    // The service continues the gateway's span, not the client's.
    let traceparent = nsml_common::telemetry::current_traceparent();
    if let Ok(v) = http::HeaderValue::from_str(&traceparent)
        && !traceparent.is_empty()
    {
        req.headers_mut().insert("traceparent", v);
    }
    let answer = chan.oneshot(req).await;
    if changes_identities {
        // The change is made by the time its answer comes; what was resolved meanwhile may predate it.
        gw.identities.forget_all();
    }
    match answer {
        Ok(resp) => resp.map(Body::new),
        Err(err) => {
            tracing::error!(%err, %service, "cannot reach a service");
            status_response(Refusal::Unreachable(service).into())
        }
    }
}
