//! The gateway's web path, as a browser and other clients use it: the UI's files with their security headers,
//! signing in with a cookie, gRPC-Web in binary and text mode (server streaming included) beside native gRPC,
//! CORS off unless configured, and reflection and health on the public port.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::time::Duration;

use base64::Engine;
use bytes::{Buf, Bytes};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use nsml_integration_tests::Deployment;
use nsml_proto::v1::{Identity, ListSessionsRequest, ListSessionsResponse};
use prost::Message;

type Http = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

const BOUND: Duration = Duration::from_secs(60);

fn http() -> Http {
    Client::builder(TokioExecutor::new()).build_http()
}

/// One gRPC-Web frame: a message (flag 0) or the trailers (flag 0x80).
fn frame(flag: u8, body: &[u8]) -> Vec<u8> {
    let mut f = vec![flag];
    f.extend_from_slice(&(body.len() as u32).to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// Splits a gRPC-Web answer into its messages and its trailers.
fn frames(mut body: &[u8]) -> (Vec<Vec<u8>>, String) {
    let (mut messages, mut trailers) = (Vec::new(), String::new());
    while body.len() >= 5 {
        let flag = body[0];
        let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
        let payload = body[5..5 + len].to_vec();
        body = &body[5 + len..];
        if flag & 0x80 != 0 {
            trailers.push_str(&String::from_utf8(payload).unwrap());
        } else {
            messages.push(payload);
        }
    }
    (messages, trailers)
}

fn grpc_web(
    url: &str,
    method: &str,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> http::Request<Full<Bytes>> {
    let mut req = http::Request::post(format!("{url}{method}"))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(Full::new(Bytes::from(body))).unwrap()
}

async fn send(client: &Http, req: http::Request<Full<Bytes>>) -> (http::response::Parts, Vec<u8>) {
    let resp = tokio::time::timeout(BOUND, client.request(req))
        .await
        .expect("the gateway answers in time")
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(BOUND, body.collect())
        .await
        .expect("the answer ends in time")
        .unwrap()
        .to_bytes()
        .to_vec();
    (parts, body)
}

fn grpc_status(parts: &http::response::Parts, trailers: &str) -> String {
    if let Some(s) = parts.headers.get("grpc-status") {
        return s.to_str().unwrap().to_string();
    }
    trailers
        .lines()
        .find_map(|l| l.strip_prefix("grpc-status:"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Signs alice in through the web endpoint; returns the `Cookie` header to send.
async fn sign_in(client: &Http, url: &str) -> String {
    let req = http::Request::post(format!("{url}/web/login"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"username":"alice","password":"alice-pass"}"#,
        )))
        .unwrap();
    let (parts, body) = send(client, req).await;
    assert_eq!(parts.status, 200, "{}", String::from_utf8_lossy(&body));
    let who: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(who["username"], "alice");
    assert_eq!(who["team"], "demo");
    assert_eq!(who["host"], false);
    let cookie = parts.headers["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    assert!(
        !body.windows(8).any(|w| w == b"nsml_tok"),
        "the token stays out of the page's reach"
    );
    cookie.split(';').next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_signs_in_and_calls_the_api_over_grpc_web() {
    let d = Deployment::embedded().unwrap();
    let url = d.url.clone();
    let client = http();

    // The UI is at `/`, with a policy that runs only this origin's scripts.
    let (parts, body) = send(
        &client,
        http::Request::get(format!("{url}/"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 200);
    assert!(
        parts.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let csp = parts.headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert!(String::from_utf8_lossy(&body).contains("<"), "an HTML page");

    // A wrong password is refused with the auth service's words, and sets no cookie.
    let (parts, body) = send(
        &client,
        http::Request::post(format!("{url}/web/login"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(
                br#"{"username":"alice","password":"wrong"}"#,
            )))
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 401, "{}", String::from_utf8_lossy(&body));
    assert!(!parts.headers.contains_key("set-cookie"));
    assert!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["error"].is_string());

    // A form post from another site is refused before any password is checked.
    let (parts, _) = send(
        &client,
        http::Request::post(format!("{url}/web/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("origin", "https://elsewhere.example")
            .body(Full::new(Bytes::from_static(
                b"username=alice&password=alice-pass",
            )))
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 403);

    let cookie = sign_in(&client, &url).await;

    // Binary gRPC-Web, authenticated by the cookie.
    let who_am_i = "/nsml.v1.AuthService/WhoAmI";
    let (parts, body) = send(
        &client,
        grpc_web(&url, who_am_i, frame(0, &[]), &[("cookie", &cookie)]),
    )
    .await;
    assert_eq!(parts.status, 200);
    assert!(
        parts.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/grpc-web")
    );
    let (messages, trailers) = frames(&body);
    assert_eq!(grpc_status(&parts, &trailers), "0", "{trailers}");
    assert_eq!(
        Identity::decode(messages[0].as_slice()).unwrap().username,
        "alice"
    );

    // Text mode (base64), as browsers without binary streams use it.
    let b64 = base64::engine::general_purpose::STANDARD;
    let req = http::Request::post(format!("{url}{who_am_i}"))
        .header("content-type", "application/grpc-web-text")
        .header("accept", "application/grpc-web-text")
        .header("x-grpc-web", "1")
        .header("cookie", &cookie)
        .body(Full::new(Bytes::from(b64.encode(frame(0, &[])))))
        .unwrap();
    let (parts, body) = send(&client, req).await;
    assert!(
        parts.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/grpc-web-text")
    );
    // Each frame is encoded on its own, so the answer is padded base64 pieces one after another.
    let mut decoded = Vec::new();
    let text = String::from_utf8(body).unwrap();
    let mut piece = String::new();
    let mut chars = text.chars().filter(|c| !c.is_ascii_whitespace()).peekable();
    while let Some(c) = chars.next() {
        piece.push(c);
        if (c == '=' && chars.peek() != Some(&'=')) || chars.peek().is_none() {
            decoded.extend(b64.decode(&piece).unwrap());
            piece.clear();
        }
    }
    let (messages, trailers) = frames(&decoded);
    assert_eq!(grpc_status(&parts, &trailers), "0", "{trailers}");
    assert_eq!(
        Identity::decode(messages[0].as_slice()).unwrap().username,
        "alice"
    );

    // Server streaming: a live view of the team's sessions sends its first answer at once and stays open.
    let watch = grpc_web(
        &url,
        "/nsml.v1.SessionService/Watch",
        frame(
            0,
            &ListSessionsRequest {
                all: true,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        &[("cookie", &cookie)],
    );
    let resp = tokio::time::timeout(BOUND, client.request(watch))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while got.len() < 5
        || got.len() < 5 + u32::from_be_bytes(got[1..5].try_into().unwrap()) as usize
    {
        let f = tokio::time::timeout(BOUND, body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Ok(mut data) = f.into_data() {
            while data.has_remaining() {
                let chunk = data.chunk().to_vec();
                data.advance(chunk.len());
                got.extend(chunk);
            }
        }
    }
    let (messages, _) = frames(&got);
    assert_eq!(got[0], 0, "a message, not the end of the stream");
    ListSessionsResponse::decode(messages[0].as_slice()).unwrap();
    drop(body);

    // The cookie authenticates gRPC-Web calls only: a native gRPC call carrying it is anonymous.
    let mut native = tonic::Request::new(nsml_proto::v1::Empty {});
    native
        .metadata_mut()
        .insert("cookie", cookie.parse().unwrap());
    let refused = nsml_proto::v1::auth_service_client::AuthServiceClient::connect(url.clone())
        .await
        .unwrap()
        .who_am_i(native)
        .await
        .expect_err("a cookie is not a credential of native gRPC");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");

    // The platform's internal calls stay internal over gRPC-Web too.
    for internal in nsml_proto::internal::v1::INTERNAL_METHODS {
        let (parts, body) = send(
            &client,
            grpc_web(&url, internal, frame(0, &[]), &[("cookie", &cookie)]),
        )
        .await;
        let (_, trailers) = frames(&body);
        assert_eq!(
            grpc_status(&parts, &trailers),
            "7",
            "PERMISSION_DENIED for {internal}: {trailers}"
        );
    }

    // CORS is off by default: a page of another origin gets no permission to read answers.
    let preflight = http::Request::options(format!("{url}{who_am_i}"))
        .header("origin", "https://elsewhere.example")
        .header("access-control-request-method", "POST")
        .body(Full::default())
        .unwrap();
    let (parts, _) = send(&client, preflight).await;
    assert!(!parts.headers.contains_key("access-control-allow-origin"));

    // Signing out revokes the token: the old cookie no longer authenticates anything.
    let (parts, _) = send(
        &client,
        http::Request::post(format!("{url}/web/logout"))
            .header("cookie", &cookie)
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, 204);
    assert!(
        parts.headers["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    let (parts, body) = send(
        &client,
        grpc_web(&url, who_am_i, frame(0, &[]), &[("cookie", &cookie)]),
    )
    .await;
    let (_, trailers) = frames(&body);
    assert_eq!(
        grpc_status(&parts, &trailers),
        "16",
        "UNAUTHENTICATED: {trailers}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_allows_only_the_configured_origins() {
    let d =
        Deployment::embedded_env(&[], &[("NSML_CORS_ORIGINS", "http://ui.example:8080")]).unwrap();
    let client = http();
    let preflight = |origin: &str| {
        http::Request::options(format!("{}/nsml.v1.AuthService/WhoAmI", d.url))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type,x-grpc-web,authorization",
            )
            .body(Full::default())
            .unwrap()
    };
    let (parts, _) = send(&client, preflight("http://ui.example:8080")).await;
    assert_eq!(
        parts.headers["access-control-allow-origin"],
        "http://ui.example:8080"
    );
    let allowed = parts.headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(
        allowed.contains("x-grpc-web") && allowed.contains("authorization"),
        "{allowed}"
    );
    let (parts, _) = send(&client, preflight("https://elsewhere.example")).await;
    assert!(!parts.headers.contains_key("access-control-allow-origin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_port_offers_reflection_and_health_of_public_services_only() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let d = Deployment::embedded().unwrap();
    let channel = tonic::transport::Endpoint::from_shared(d.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();

    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "nsml.v1.SessionService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);

    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::iter([ask]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a list of services: {answer:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for public in [
        "nsml.v1.AuthService",
        "nsml.v1.SessionService",
        "nsml.v1.StorageService",
        "nsml.v1.QuotaService",
        "nsml.v1.SubmissionService",
        "nsml.v1.LeaderboardService",
    ] {
        assert!(
            names.iter().any(|n| n == public),
            "{public} missing from {names:?}"
        );
    }
    assert!(
        names.iter().all(|n| !n.contains("internal")),
        "internal services are not listed: {names:?}"
    );
    // Nothing of the platform's internal calls is described to clients, not even their messages.
    for symbol in [
        "nsml.internal.v1.SessionInternal",
        "nsml.internal.v1.RunnerStartedRequest",
    ] {
        let ask = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(symbol.into())),
        };
        let mut answers = ServerReflectionClient::new(channel.clone())
            .server_reflection_info(tokio_stream::iter([ask]))
            .await
            .unwrap()
            .into_inner();
        match answers.message().await {
            Err(status) => assert_eq!(status.code(), tonic::Code::NotFound, "{symbol}: {status:?}"),
            Ok(answer) => assert!(
                matches!(
                    answer.as_ref().and_then(|a| a.message_response.as_ref()),
                    Some(MessageResponse::ErrorResponse(_))
                ),
                "{symbol} is described: {answer:?}"
            ),
        }
    }
}
