//! What the gateway measures of every call it answers: `nsml_gateway_requests_total` by method and gRPC status
//! code, and `nsml_gateway_request_duration_seconds` by method, from the call's arrival to its end (its status:
//! at once for a refusal, with the last message's trailers for an answer, when the client left for a call it
//! abandoned). Methods are labelled only when the public API declares them, so no caller can grow the label set.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use nsml_common::bulk::Meter;
use tonic::Code;

/// `/package.Service/Method` of every method the public API declares.
static PUBLIC_METHODS: LazyLock<HashSet<String>> = LazyLock::new(|| {
    use prost::Message as _;
    let Ok(fds) =
        prost_types::FileDescriptorSet::decode(nsml_proto::v1::PUBLIC_FILE_DESCRIPTOR_SET)
    else {
        return HashSet::new();
    };
    fds.file
        .iter()
        .flat_map(|f| {
            let package = f.package().to_string();
            f.service.iter().flat_map(move |s| {
                let service = format!("{package}.{}", s.name());
                s.method
                    .iter()
                    .map(move |m| format!("/{service}/{}", m.name()))
            })
        })
        .collect()
});

/// The label a call's path gets: the path itself for a declared method, `other` for anything else.
fn method_label(path: &str) -> &'static str {
    PUBLIC_METHODS
        .get(path)
        .map_or("other", |known| known.as_str())
}

/// A call being answered.
pub(crate) struct Call {
    method: &'static str,
    started: Instant,
}

impl Call {
    /// A call to `path` that arrived now.
    pub(crate) fn start(path: &str) -> Self {
        Call {
            method: method_label(path),
            started: Instant::now(),
        }
    }

    /// Counts the call as ended with `code`.
    fn end(self, code: Code) {
        metrics::counter!(
            "nsml_gateway_requests_total",
            "method" => self.method,
            "code" => code_name(code)
        )
        .increment(1);
        metrics::histogram!("nsml_gateway_request_duration_seconds", "method" => self.method)
            .record(self.started.elapsed().as_secs_f64());
    }

    /// Ends the call with the answer's status when its headers carry one (a refusal), or else when its body's
    /// trailers come.
    pub(crate) fn answered(self, resp: axum::response::Response) -> axum::response::Response {
        if let Some(code) = grpc_code(resp.headers()) {
            self.end(code);
            return resp;
        }
        resp.map(|inner| {
            Body::new(Observed {
                inner,
                call: Some(self),
                meter: Meter::default(),
            })
        })
    }
}

/// A request's body as the gateway passes it on, its bytes counted so that an upload announces itself as a bulk
/// transfer (`nsml_common::bulk`) in the gateway's process, as the service's own process does.
pub(crate) fn metered(body: Body) -> Body {
    Body::new(Observed {
        inner: body,
        call: None,
        meter: Meter::default(),
    })
}

fn grpc_code(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    value.parse::<i32>().ok().map(Code::from_i32)
}

/// The code's name as gRPC spells it (`OK`, `NOT_FOUND`, …).
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A body passing through the gateway: an answer's ends its call when the trailers pass, or when it is dropped
/// unfinished (the client left: CANCELLED). Its bytes are counted, so that a checkpoint or a dataset streamed
/// through announces itself as a bulk transfer (`nsml_common::bulk`), as it does where it is stored or read.
struct Observed {
    inner: Body,
    call: Option<Call>,
    meter: Meter,
}

impl http_body::Body for Observed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.meter.moved(data.len());
                }
                frame
                    .trailers_ref()
                    .map(|t| grpc_code(t).unwrap_or(Code::Unknown))
            }
            Poll::Ready(Some(Err(_))) => Some(Code::Unknown),
            // A body that ends without trailers ended without a status.
            Poll::Ready(None) => Some(Code::Unknown),
            Poll::Pending => None,
        };
        if let Some(code) = ended
            && let Some(call) = this.call.take()
        {
            call.end(code);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            call.end(Code::Cancelled);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt as _;

    use super::method_label;

    #[test]
    fn only_declared_methods_are_labels() {
        assert_eq!(
            method_label("/nsml.v1.SessionService/Run"),
            "/nsml.v1.SessionService/Run"
        );
        assert_eq!(method_label("/nsml.v1.SessionService/Nope"), "other");
        assert_eq!(
            method_label("/nsml.internal.v1.QuotaInternal/Admit"),
            "other"
        );
    }

    #[test]
    fn trailers_end_the_call() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let body = http_body_util::Full::new(bytes::Bytes::from_static(b"x"))
            .map_err(|never| match never {})
            .with_trailers(async move { Some(Ok::<_, std::convert::Infallible>(trailers)) });
        let resp = http::Response::new(axum::body::Body::new(body));
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let collected = metrics::with_local_recorder(&recorder, || {
            let resp = super::Call::start("/nsml.v1.SessionService/Run").answered(resp);
            futures::executor::block_on(resp.into_body().collect()).expect("body")
        });
        assert!(collected.trailers().is_some(), "the trailers pass through");
        let text = handle.render();
        assert!(
            text.contains(
                "nsml_gateway_requests_total{method=\"/nsml.v1.SessionService/Run\",code=\"OK\"} 1"
            ),
            "the call is counted once, when its trailers pass: {text}"
        );
    }
    static STARTED: AtomicUsize = AtomicUsize::new(0);
    static ENDED: AtomicUsize = AtomicUsize::new(0);

    fn told(active: bool) {
        let counter = if active { &STARTED } else { &ENDED };
        counter.fetch_add(1, Ordering::SeqCst);
    }

    #[test]
    fn a_body_past_the_bulk_size_is_a_transfer_until_it_is_gone() {
        nsml_common::bulk::on_transfers(told);
        let mib = usize::try_from(nsml_common::bulk::BULK_BYTES >> 20).expect("MiB");
        let chunks = (0..mib + 2).map(|_| {
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(bytes::Bytes::from(vec![
                0u8;
                1 << 20
            ])))
        });
        let mut body = super::metered(axum::body::Body::new(http_body_util::StreamBody::new(
            futures::stream::iter(chunks),
        )));
        let heard = || (STARTED.load(Ordering::SeqCst), ENDED.load(Ordering::SeqCst));
        futures::executor::block_on(async {
            for _ in 0..mib - 1 {
                body.frame().await.expect("a frame").expect("data");
            }
            assert_eq!(heard(), (0, 0), "short of the bulk size, nothing is told");
            body.frame().await.expect("a frame").expect("data");
            assert_eq!(heard(), (1, 0), "at the bulk size, the transfer starts");
            body.frame().await.expect("a frame").expect("data");
        });
        assert_eq!(heard(), (1, 0), "it lasts while the body is read");
        drop(body);
        assert_eq!(heard(), (1, 1), "a body dropped unfinished ends it");
    }
}
