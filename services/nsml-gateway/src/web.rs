//! The web UI's side of the gateway: the UI's files at `/`, signing a browser in and out, and the cookie that
//! carries a browser's token.
//!
//! A browser never holds its token where a script could read it: `POST /web/login` answers with an
//! `HttpOnly; SameSite=Strict` cookie, and the gateway reads the token from that cookie only on gRPC-Web calls
//! (which carry `x-grpc-web`, a header a page of another site cannot send here without a CORS preflight that
//! the gateway refuses unless its origin is configured). Every file is served with a Content-Security-Policy that
//! allows only this origin's scripts, styles and connections. `docs/adr/2026-12-04-the-web-ui.md` has the why.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use nsml_common::caller::IDENTITY_KEY;
use nsml_proto::internal::v1::AuthenticateRequest;
use nsml_proto::v1::{Empty, LoginRequest};
use tonic::Code;

use crate::{Inner, PEER_KEY, ratelimit};

include!(concat!(env!("OUT_DIR"), "/web_assets.rs"));

/// The cookie that holds a browser's token.
pub const COOKIE: &str = "nsml_token";
/// The header every gRPC-Web call carries: the only calls a cookie may authenticate.
const GRPC_WEB_HEADER: &str = "x-grpc-web";
/// What a page of the UI may load and connect to: this origin only, no inline scripts or styles, no framing.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                       connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// Answers a `GET` of one of the UI's files (`/` is `index.html`), gzipped when the browser accepts it.
pub fn asset(path: &str, headers: &HeaderMap) -> Response {
    let path = if path == "/" { "/index.html" } else { path };
    let Some((_, ty, bytes, gzipped)) = WEB_ASSETS.iter().find(|(p, ..)| *p == path) else {
        return with_security_headers(
            (StatusCode::NOT_FOUND, "no such page: the web UI is at /\n").into_response(),
        );
    };
    let gzip = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|e| e.trim().starts_with("gzip")));
    // Vite names the files it emits under `assets/` by their content's hash: they never change.
    let cache = if path.starts_with("/assets/") {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    let mut resp = Response::new(Body::from(if gzip { *gzipped } else { *bytes }));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ty));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    if gzip {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    with_security_headers(resp)
}

fn with_security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// The token of a gRPC-Web call's cookie, when it sent one and no `Authorization` header.
pub fn cookie_token(headers: &HeaderMap) -> Option<String> {
    if !headers.contains_key(GRPC_WEB_HEADER) || headers.contains_key(header::AUTHORIZATION) {
        return None;
    }
    token_of(headers)
}

/// The token in a request's `nsml_token` cookie.
fn token_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim().to_string())
        .filter(|t| !t.is_empty())
}

#[derive(serde::Deserialize)]
struct SignIn {
    username: String,
    password: String,
}

/// A JSON answer of the sign-in endpoints.
fn json(status: StatusCode, body: serde_json::Value) -> Response {
    with_security_headers((status, axum::Json(body)).into_response())
}

fn refused(status: &tonic::Status) -> Response {
    let code = match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => StatusCode::UNAUTHORIZED,
        Code::InvalidArgument => StatusCode::BAD_REQUEST,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    json(code, serde_json::json!({ "error": status.message() }))
}

/// Whether a browser request comes from a page of this origin: a JSON body (which a form of another site
/// cannot send without a preflight), and an `Origin`, when sent, naming this host.
fn same_origin(headers: &HeaderMap) -> bool {
    let json_body = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin_ok = match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(origin) => host.is_some_and(|h| {
            origin
                .split_once("://")
                .is_some_and(|(_, rest)| rest.trim_end_matches('/') == h)
        }),
    };
    json_body && origin_ok
}

/// `POST /web/login` with `{"username", "password"}`: signs the browser in with a cookie and answers who it is.
pub async fn login(
    State(gw): State<Arc<Inner>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !same_origin(&headers) {
        return json(
            StatusCode::FORBIDDEN,
            serde_json::json!({ "error": "sign in from the platform's own web page (a JSON request from this origin)" }),
        );
    }
    let address = ratelimit::Key::address(peer.ip());
    if let Err(retry_ms) = gw.limiter.check(&address) {
        return json(
            StatusCode::TOO_MANY_REQUESTS,
            serde_json::json!({ "error": format!("too many requests from {address}: retry in {retry_ms} ms") }),
        );
    }
    let Ok(sign_in) = serde_json::from_slice::<SignIn>(&body) else {
        return json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({ "error": "send {\"username\": \"…\", \"password\": \"…\"} as JSON" }),
        );
    };
    let mut req = tonic::Request::new(LoginRequest {
        username: sign_in.username,
        password: sign_in.password,
    });
    if let Ok(v) = peer.ip().to_string().parse() {
        req.metadata_mut().insert(PEER_KEY, v);
    }
    let mut auth = gw.clients.auth.clone();
    let signed_in = match auth.login(req).await {
        Ok(r) => r.into_inner(),
        Err(status) => return refused(&status),
    };
    let identity = match gw
        .clients
        .auth_internal
        .clone()
        .authenticate(AuthenticateRequest {
            token: signed_in.token.clone(),
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => return refused(&status),
    };
    let max_age = (signed_in.expires_at_ms - nsml_common::now_ms()).max(0) / 1000;
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}",
        signed_in.token
    );
    let mut resp = json(
        StatusCode::OK,
        serde_json::json!({
            "username": identity.username,
            "team": identity.memberships.first().map(|m| m.team.clone()).unwrap_or_default(),
            "host": identity.admin || !identity.hosts.is_empty(),
        }),
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// `POST /web/logout`: revokes the cookie's token and clears the cookie.
pub async fn logout(State(gw): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    if let Some(token) = token_of(&headers) {
        match crate::resolve(&gw, token.clone()).await {
            Ok(id) => {
                let mut req = tonic::Request::new(Empty {});
                if let Ok(v) = format!("Bearer {token}").parse() {
                    req.metadata_mut().insert("authorization", v);
                }
                req.metadata_mut()
                    .insert_bin(IDENTITY_KEY, id.metadata.clone());
                gw.identities.forget_all();
                if let Err(status) = gw.clients.auth.clone().logout(req).await {
                    return refused(&status);
                }
                gw.identities.forget_all();
            }
            // An expired or revoked token: there is nothing to revoke, only the cookie to clear.
            Err(status) => tracing::debug!(%status, "signing out a browser whose token is gone"),
        }
    }
    let mut resp = with_security_headers(StatusCode::NO_CONTENT.into_response());
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("nsml_token=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn a_cookie_authenticates_only_grpc_web_calls_without_a_bearer() {
        let cookie = ("cookie", "theme=dark; nsml_token=abc ; other=1");
        assert_eq!(
            cookie_token(&headers(&[cookie, ("x-grpc-web", "1")])).as_deref(),
            Some("abc")
        );
        assert_eq!(cookie_token(&headers(&[cookie])), None);
        assert_eq!(
            cookie_token(&headers(&[
                cookie,
                ("x-grpc-web", "1"),
                ("authorization", "Bearer xyz")
            ])),
            None
        );
        assert_eq!(
            cookie_token(&headers(&[("cookie", "nsml_token="), ("x-grpc-web", "1")])),
            None
        );
    }

    #[test]
    fn sign_in_must_come_as_json_from_this_origin() {
        let json = ("content-type", "application/json");
        let host = ("host", "127.0.0.1:7100");
        assert!(same_origin(&headers(&[json, host])));
        assert!(same_origin(&headers(&[
            json,
            host,
            ("origin", "http://127.0.0.1:7100")
        ])));
        assert!(!same_origin(&headers(&[
            json,
            host,
            ("origin", "https://evil.example")
        ])));
        assert!(!same_origin(&headers(&[
            ("content-type", "application/x-www-form-urlencoded"),
            host
        ])));
    }

    #[test]
    fn every_file_is_served_with_the_policy_and_unknown_paths_are_not_found() {
        let resp = asset("/", &HeaderMap::new());
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers()[header::CONTENT_SECURITY_POLICY],
            HeaderValue::from_static(CSP)
        );
        assert!(
            resp.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/html")
        );
        let gz = asset("/", &headers(&[("accept-encoding", "br, gzip")]));
        assert_eq!(gz.headers()[header::CONTENT_ENCODING], "gzip");
        assert_eq!(
            asset("/no/such/file", &HeaderMap::new()).status(),
            StatusCode::NOT_FOUND
        );
    }
}
