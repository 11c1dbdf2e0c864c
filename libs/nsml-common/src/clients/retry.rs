//! Retrying calls through a restart of the service called: one backoff policy and the rule for what may be
//! sent again, applied to every call between services by [`Retrying`], a layer over each client's transport.
//!
//! A call is sent again, after an exponentially growing wait with jitter, for up to [`Backoff::budget`]
//! (40 s: a 30 s restart of the callee and its start-up), when
//! - it never reached the service (the connection was refused, or the service refused it as not started yet:
//!   nothing can have happened), whatever the call;
//! - the service answered `UNAVAILABLE`, or the connection broke after sending, and the call is idempotent:
//!   a read, a state transition that a repeat leaves alone (`RunnerStarted`, `RunnerFinished`, `Stop`), or a
//!   command carrying an idempotency key that the service honours (`Admit`'s `command_id`).
//!
//! Other calls (`Submit`, `Run`, `RunnerReport`, …) are not sent twice once sent: their caller decides.
//! The gateway, a proxy, retries only the first case's refusals ([`Retrying::until_started`]); its clients
//! decide the rest.
//! Client-streaming calls (uploads, log shipping) pass through unretried, as their body cannot be replayed
//! here; their callers send the whole stream again (the runner's checkpoint upload does).
//!
//! The mechanism is ours rather than the `backon` crate's: retrying has to sit in a tower service at the
//! transport, where it needs only a sequence of waits, and which calls may be repeated is gRPC-specific.

use std::error::Error as StdError;
use std::future::Future;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::BodyExt;
use rand::Rng;
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use super::{Transport, TransportError};
use crate::server::NOT_STARTED_KEY;

/// How long to keep trying and how long to wait between tries.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The wait after the first failure.
    pub first: Duration,
    /// The longest wait: short, so that a service back from a restart is found within a couple of seconds.
    pub max: Duration,
    /// How long after the first try no more tries start.
    pub budget: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::THROUGH_RESTART
    }
}

impl Backoff {
    /// Rides out a restart of the service called lasting up to 30 s, with room for its start-up.
    pub const THROUGH_RESTART: Backoff = Backoff {
        first: Duration::from_millis(100),
        max: Duration::from_secs(2),
        budget: Duration::from_secs(40),
    };

    /// This policy with another budget.
    pub const fn with_budget(self, budget: Duration) -> Self {
        Backoff { budget, ..self }
    }

    /// The waits before the second, third, … tries: doubling from `first` up to `max`, each drawn at random
    /// from its upper half so that callers failed together do not come back together.
    pub fn waits(self) -> impl Iterator<Item = Duration> {
        let mut next = self.first;
        std::iter::from_fn(move || {
            let wait = next;
            next = (next * 2).min(self.max);
            let half = wait / 2;
            Some(half + rand::thread_rng().gen_range(Duration::ZERO..=half))
        })
    }

    /// Runs `call` until it succeeds, fails for a reason `transient` does not accept, or the budget is spent;
    /// logs each retry (once as a warning, then quietly) as `what`.
    pub async fn retry<T, E, F, Fut>(
        self,
        what: &str,
        mut call: F,
        transient: impl Fn(&E) -> bool,
    ) -> Result<T, E>
    where
        E: std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let deadline = Instant::now() + self.budget;
        let mut waits = self.waits();
        let mut attempt = 1u32;
        loop {
            match call().await {
                Ok(v) => return Ok(v),
                Err(e) if transient(&e) && Instant::now() < deadline => {
                    if attempt == 1 {
                        tracing::warn!(call = what, error = %e, "service unavailable, retrying");
                    } else {
                        tracing::debug!(call = what, attempt, error = %e, "still unavailable, retrying");
                    }
                    let wait = waits.next().unwrap_or(self.max);
                    tokio::time::sleep_until((Instant::now() + wait).min(deadline)).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Whether a status says the service could not be reached or is restarting: `UNAVAILABLE`, or a transport
/// failure that tonic reports with its cause attached.
pub fn is_unavailable(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable
        || (status.code() == tonic::Code::Unknown && StdError::source(status).is_some())
}

/// Runs a gRPC call with [`Backoff::THROUGH_RESTART`], retrying while [`is_unavailable`]. For calls the
/// transport does not repeat by itself: client streams sent again whole, and calls whose caller knows a
/// repeat is harmless.
pub async fn retry_unavailable<T, F, Fut>(what: &str, call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    Backoff::THROUGH_RESTART
        .retry(what, call, is_unavailable)
        .await
}

/// How a method may be retried by the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repeat {
    /// A repeat is harmless: retried on `UNAVAILABLE` and on any transport failure.
    Idempotent,
    /// Sent at most once: retried only when the connection was refused, i.e. it was never sent.
    Once,
    /// A client stream, which cannot be replayed here: never retried by the transport.
    Stream,
}

/// How the method at gRPC path `/package.Service/Method` may be retried.
pub fn repeat_of(path: &str) -> Repeat {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let service = parts.next().unwrap_or("");
    let method = parts.next().unwrap_or("");
    let service = service.rsplit('.').next().unwrap_or(service);
    match (service, method) {
        (_, "RegisterDataset" | "UploadCode" | "SaveCheckpoint" | "RunnerLogs") => Repeat::Stream,
        // Live views only read.
        (_, m) if m.starts_with("Watch") => Repeat::Idempotent,
        (
            "AuthService",
            "WhoAmI" | "ListCompetitions" | "GetCompetition" | "Logout",
        )
        | ("AuthInternal", "Authenticate")
        | ("LeaderboardService", _)
        // `Admit` carries a command id: a repeat answers the first decision.
        | ("QuotaInternal", "Admit")
        | ("QuotaService", "Usage" | "Explain" | "Verify" | "Export")
        | (
            "SessionService",
            "List" | "Get" | "Logs" | "Metrics" | "Stop" | "Memo",
        )
        // The runner transitions are skipped when the session already made them.
        | ("SessionInternal", "RunnerStarted" | "RunnerHeartbeat" | "RunnerFinished")
        | (
            "StorageService",
            "ListDatasets" | "GetDataset" | "DownloadCode" | "ListCheckpoints" | "PullCheckpoint"
            | "Usage",
        )
        | ("StorageInternal", "FetchDatasetPart")
        | ("SubmissionService", "Get" | "List")
        | ("grpc.health.v1.Health", _)
        | ("Health", _) => Repeat::Idempotent,
        _ => Repeat::Once,
    }
}

/// Whether a transport failure happened before anything was sent: the connection was refused or not made.
pub fn never_sent(err: &(dyn StdError + 'static)) -> bool {
    let mut cause = Some(err);
    while let Some(e) = cause {
        if e.downcast_ref::<tonic::ConnectError>().is_some() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::AddrNotAvailable
            )
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// The gRPC status code a response carries in its headers (a trailers-only answer, as every error before
/// the first message is).
fn header_code(response: &http::Response<tonic::body::Body>) -> Option<tonic::Code> {
    let value = response.headers().get("grpc-status")?.to_str().ok()?;
    value.parse::<i32>().ok().map(tonic::Code::from_i32)
}

/// The most a unary call's body holds: one message of the largest size a service takes, and its 5-byte frame
/// header.
const MAX_UNARY_BODY_BYTES: usize = super::MAX_MESSAGE_BYTES + 5;

/// A transport that sends a call again, as the module describes, while the service called is away.
#[derive(Clone)]
pub struct Retrying {
    inner: Transport,
    backoff: Backoff,
    /// Only calls the service refused as not started yet are sent again.
    until_started: bool,
}

impl Retrying {
    /// Retries calls over `inner` with `backoff`.
    pub fn new(inner: Transport, backoff: Backoff) -> Self {
        Self {
            inner,
            backoff,
            until_started: false,
        }
    }

    /// Sends a unary call over `inner` again only while the service refuses it as not started yet (a process
    /// that is up and still catching up with the log), with `backoff`; every other answer or failure goes back
    /// to the caller at once. For a proxy, whose own callers decide what else to retry.
    pub fn until_started(inner: Transport, backoff: Backoff) -> Self {
        Self {
            inner,
            backoff,
            until_started: true,
        }
    }
}

impl Service<http::Request<tonic::body::Body>> for Retrying {
    type Response = http::Response<tonic::body::Body>;
    type Error = TransportError;
    type Future = BoxFuture<'static, Result<Self::Response, TransportError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        // Each try readies a clone of the inner transport itself.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let inner = self.inner.clone();
        let backoff = self.backoff;
        let until_started = self.until_started;
        let repeat = repeat_of(req.uri().path());
        if repeat == Repeat::Stream {
            return Box::pin(inner.oneshot(req));
        }
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            // A unary request's body is one message, kept to be sent again: no more than a call may carry
            // (a proxy's callers are not trusted to stop there).
            let body: Bytes = match http_body_util::Limited::new(body, MAX_UNARY_BODY_BYTES)
                .collect()
                .await
            {
                Ok(collected) => collected.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    return Ok(nsml_proto::error::ErrorCode::TooLarge
                        .status(format!(
                            "the request is larger than the {MAX_UNARY_BODY_BYTES} bytes a call may carry"
                        ))
                        .into_http());
                }
                Err(e) => return Err(TransportError(e)),
            };
            let deadline = Instant::now() + backoff.budget;
            let mut waits = backoff.waits();
            let mut attempt = 1u32;
            loop {
                let mut again = http::Request::new(tonic::body::Body::new(
                    http_body_util::Full::new(body.clone()).map_err(|never| match never {}),
                ));
                *again.method_mut() = parts.method.clone();
                *again.uri_mut() = parts.uri.clone();
                *again.version_mut() = parts.version;
                *again.headers_mut() = parts.headers.clone();
                if let Some(method) = parts.extensions.get::<tonic::GrpcMethod<'static>>() {
                    again.extensions_mut().insert(method.clone());
                }
                let result = inner.clone().oneshot(again).await;
                let retry = match &result {
                    // Refused before the service started: nothing was done, whatever the call.
                    Ok(response) if response.headers().contains_key(NOT_STARTED_KEY) => true,
                    _ if until_started => false,
                    Ok(response) => {
                        repeat == Repeat::Idempotent
                            && header_code(response) == Some(tonic::Code::Unavailable)
                    }
                    Err(e) => repeat == Repeat::Idempotent || never_sent(e),
                };
                if !retry || Instant::now() >= deadline {
                    return result;
                }
                let path = parts.uri.path();
                if attempt == 1 {
                    tracing::warn!(call = path, "service unavailable, retrying");
                } else {
                    tracing::debug!(call = path, attempt, "still unavailable, retrying");
                }
                let wait = waits.next().unwrap_or(backoff.max);
                tokio::time::sleep_until((Instant::now() + wait).min(deadline)).await;
                attempt += 1;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_to_the_cap_with_jitter() {
        let waits: Vec<Duration> = Backoff::THROUGH_RESTART.waits().take(8).collect();
        assert!(waits[0] >= Duration::from_millis(50) && waits[0] <= Duration::from_millis(100));
        assert!(waits[1] >= Duration::from_millis(100) && waits[1] <= Duration::from_millis(200));
        for w in &waits[5..] {
            assert!(
                *w >= Duration::from_secs(1) && *w <= Duration::from_secs(2),
                "{w:?}"
            );
        }
    }

    #[test]
    fn only_harmless_repeats_are_idempotent() {
        assert_eq!(
            repeat_of("/nsml.v1.SubmissionService/Get"),
            Repeat::Idempotent
        );
        assert_eq!(
            repeat_of("/nsml.internal.v1.QuotaInternal/Admit"),
            Repeat::Idempotent
        );
        assert_eq!(repeat_of("/nsml.v1.SubmissionService/Submit"), Repeat::Once);
        assert_eq!(repeat_of("/nsml.v1.SessionService/Run"), Repeat::Once);
        assert_eq!(
            repeat_of("/nsml.internal.v1.SessionInternal/RunnerReport"),
            Repeat::Once
        );
        assert_eq!(
            repeat_of("/nsml.internal.v1.StorageInternal/SaveCheckpoint"),
            Repeat::Stream
        );
        assert_eq!(
            repeat_of("/nsml.internal.v1.SessionInternal/RunnerLogs"),
            Repeat::Stream
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_through_the_budget_then_gives_up() {
        let mut calls = 0u32;
        let got: Result<(), tonic::Status> = Backoff::THROUGH_RESTART
            .retry(
                "Get",
                || {
                    calls += 1;
                    async { Err(tonic::Status::unavailable("down")) }
                },
                is_unavailable,
            )
            .await;
        assert_eq!(got.unwrap_err().code(), tonic::Code::Unavailable);
        // 40 s of waits of at most 2 s each.
        assert!(calls > 20, "{calls} calls");
    }

    /// A transport answering every call with `answer`, counting the calls.
    fn answering(
        calls: std::sync::Arc<std::sync::atomic::AtomicU32>,
        answer: fn() -> Result<http::Response<tonic::body::Body>, TransportError>,
    ) -> Retrying {
        answering_with(Retrying::new, calls, answer)
    }

    /// As [`answering`], retrying as `retrying` builds it.
    fn answering_with(
        retrying: fn(Transport, Backoff) -> Retrying,
        calls: std::sync::Arc<std::sync::atomic::AtomicU32>,
        answer: fn() -> Result<http::Response<tonic::body::Body>, TransportError>,
    ) -> Retrying {
        let inner = tower::service_fn(move |_req: http::Request<tonic::body::Body>| {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { answer() }
        });
        retrying(
            tower::util::BoxCloneSyncService::new(inner),
            Backoff::THROUGH_RESTART,
        )
    }

    fn not_started() -> Result<http::Response<tonic::body::Body>, TransportError> {
        let mut resp = tonic::Status::unavailable("starting").into_http();
        resp.headers_mut()
            .insert(NOT_STARTED_KEY, http::HeaderValue::from_static("true"));
        Ok(resp)
    }

    fn unavailable() -> Result<http::Response<tonic::body::Body>, TransportError> {
        Ok(tonic::Status::unavailable("restarting").into_http())
    }

    fn refused() -> Result<http::Response<tonic::body::Body>, TransportError> {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        Err(TransportError(Box::new(tonic::ConnectError(Box::new(io)))))
    }

    fn reset() -> Result<http::Response<tonic::body::Body>, TransportError> {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        Err(TransportError(Box::new(io)))
    }

    async fn send(transport: Retrying, path: &str) -> u16 {
        let req = http::Request::builder()
            .uri(format!("http://service{path}"))
            .body(tonic::body::Body::new(http_body_util::Full::new(
                Bytes::from_static(b"\0\0\0\0\0"),
            )))
            .expect("a request");
        match transport.oneshot(req).await {
            Ok(response) => response.status().as_u16(),
            Err(_) => 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_transport_repeats_idempotent_calls_only() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU32, Ordering};
        let count = |answer, path: &'static str| async move {
            let calls = Arc::new(AtomicU32::new(0));
            send(answering(calls.clone(), answer), path).await;
            calls.load(Ordering::SeqCst)
        };
        let get = "/nsml.v1.SubmissionService/Get";
        let submit = "/nsml.v1.SubmissionService/Submit";
        assert!(count(unavailable, get).await > 20);
        assert!(count(reset, get).await > 20);
        assert_eq!(
            count(unavailable, submit).await,
            1,
            "a sent submit is never repeated"
        );
        assert_eq!(
            count(reset, submit).await,
            1,
            "a sent submit is never repeated"
        );
        assert!(
            count(refused, submit).await > 20,
            "a submit never sent is sent again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_proxy_repeats_only_what_a_starting_service_refused() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU32, Ordering};
        let count = |answer, path: &'static str| async move {
            let calls = Arc::new(AtomicU32::new(0));
            send(
                answering_with(Retrying::until_started, calls.clone(), answer),
                path,
            )
            .await;
            calls.load(Ordering::SeqCst)
        };
        let get = "/nsml.v1.SubmissionService/Get";
        let submit = "/nsml.v1.SubmissionService/Submit";
        assert!(count(not_started, get).await > 20);
        assert!(
            count(not_started, submit).await > 20,
            "a submit refused before the service started is sent again"
        );
        for answer in [unavailable, reset, refused] {
            assert_eq!(count(answer, get).await, 1, "left to the proxy's caller");
        }
    }

    #[tokio::test]
    async fn a_request_larger_than_a_call_may_carry_is_refused_unsent() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU32, Ordering};
        let calls = Arc::new(AtomicU32::new(0));
        let transport = answering_with(Retrying::until_started, calls.clone(), not_started);
        let req = http::Request::builder()
            .uri("http://service/nsml.v1.SessionService/List")
            .body(tonic::body::Body::new(http_body_util::Full::new(
                Bytes::from(vec![0u8; MAX_UNARY_BODY_BYTES + 1]),
            )))
            .expect("a request");
        let response = transport.oneshot(req).await.expect("an answer");
        assert_eq!(header_code(&response), Some(tonic::Code::InvalidArgument));
        let status = tonic::Status::from_header_map(response.headers()).expect("a status");
        assert_eq!(
            nsml_proto::error::ErrorCode::of(&status),
            Some(nsml_proto::error::ErrorCode::TooLarge),
            "{status:?}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 0, "never sent");
    }

    #[tokio::test(start_paused = true)]
    async fn does_not_retry_refusals() {
        let mut calls = 0u32;
        let got: Result<(), tonic::Status> = retry_unavailable("Submit", || {
            calls += 1;
            async { Err(tonic::Status::failed_precondition("too soon")) }
        })
        .await;
        assert_eq!(got.unwrap_err().code(), tonic::Code::FailedPrecondition);
        assert_eq!(calls, 1);
    }
}
