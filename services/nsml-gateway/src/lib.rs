//! The gateway: the platform's one public endpoint for the CLI, the SDK and other clients.
//!
//! It serves the services' own gRPC APIs (`/nsml.v1.SessionService/Run`, …) by proxying each call to the
//! owning service after: refusing internal-only methods, dropping any `x-nsml-*` metadata a client sent,
//! rate-limiting per caller (see `ratelimit`: by address until the caller is known to be a user),
//! resolving the bearer token to an identity through the auth service (kept for a moment: see `identities`),
//! and stamping the call with the deployment's internal secret and the address it came from. Services then
//! decide what the identity may do.

mod error;
mod identities;
mod ratelimit;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::response::IntoResponse;
use nsml_common::caller::{IDENTITY_KEY, INTERNAL_SECRET_KEY};
use nsml_common::clients::{Clients, ServiceAddrs, Transport, transport};
use nsml_common::service::Service;

use crate::error::Refusal;
use nsml_proto::v1::AuthenticateRequest;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::metadata::MetadataMap;
use tower::ServiceExt;

/// Metadata key under which the auth service reads the address a call came from (its `PEER_KEY`).
const PEER_KEY: &str = "x-nsml-peer";
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
    let local = addrs.local.as_ref();
    let mut routes = HashMap::new();
    for service in Service::ALL {
        routes.insert(
            service.grpc_name(),
            transport(service.name(), addrs.get(service), local)?,
        );
    }
    let inner = Arc::new(Inner {
        clients: Clients::new(addrs, secret, "gateway")?,
        routes,
        secret: http::HeaderValue::from_str(secret)
            .map_err(|_| GatewayError::Serve(std::io::Error::other("invalid internal secret")))?,
        limiter: ratelimit::Limiter::from_env(),
        identities: identities::Identities::default(),
    });
    let app = axum::Router::new()
        .route("/", axum::routing::get(index))
        .fallback(proxy)
        .with_state(inner);
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

async fn index() -> impl IntoResponse {
    (
        [(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "NSML gateway: use the `nsml` CLI or a gRPC client (package nsml.v1) on this address.\n",
    )
}

fn status_response(s: Status) -> axum::response::Response {
    let (parts, _) = s.into_http::<()>().into_parts();
    axum::response::Response::from_parts(parts, Body::empty())
}

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
        .auth
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
    let Some(chan) = gw.routes.get(service.as_str()).cloned() else {
        return Err(Refusal::NoSuchService(service));
    };
    if nsml_proto::v1::INTERNAL_METHODS.contains(&path) {
        return Err(Refusal::InternalMethod);
    }
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
    let req = req.map(tonic::body::Body::new);
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
