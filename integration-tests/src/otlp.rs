//! A span receiver: the OpenTelemetry collector's OTLP/gRPC trace service, served on a local port, keeping
//! every span it is sent (or only counting them), for the trace tests and the tracing-cost bench.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// One span as received.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// Hex, as `traceparent` writes it.
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// The `service.name` of the process that sent it.
    pub service: String,
    /// The span's string attributes.
    pub attributes: HashMap<String, String>,
}

#[derive(Default)]
struct Inbox {
    keep: bool,
    spans: Mutex<Vec<ReceivedSpan>>,
    count: AtomicU64,
}

/// The service over the shared inbox.
struct Collector(Arc<Inbox>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        let mut n = 0;
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| text(kv.value.as_ref()?.value.as_ref()?))
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                n += 1;
                if !self.0.keep {
                    continue;
                }
                got.push(ReceivedSpan {
                    trace_id: hex::encode(&span.trace_id),
                    span_id: hex::encode(&span.span_id),
                    parent_span_id: hex::encode(&span.parent_span_id),
                    name: span.name,
                    service: service.clone(),
                    attributes: span
                        .attributes
                        .iter()
                        .filter_map(|kv| {
                            Some((kv.key.clone(), text(kv.value.as_ref()?.value.as_ref()?)?))
                        })
                        .collect(),
                });
            }
        }
        self.0.count.fetch_add(n, Ordering::Relaxed);
        if let Ok(mut spans) = self.0.spans.lock() {
            spans.extend(got);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        Value::BoolValue(b) => Some(b.to_string()),
        Value::DoubleValue(d) => Some(d.to_string()),
        _ => None,
    }
}

/// A running receiver; it stops when dropped.
pub struct Receiver {
    /// What `OTEL_EXPORTER_OTLP_ENDPOINT` is set to for processes to export here.
    pub endpoint: String,
    inbox: Arc<Inbox>,
    stop: CancellationToken,
}

impl Receiver {
    /// Serves on a free local port from the current Tokio runtime, keeping every span (`keep`) or only
    /// counting them.
    pub async fn start(keep: bool) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let inbox = Arc::new(Inbox {
            keep,
            ..Inbox::default()
        });
        let stop = CancellationToken::new();
        let server = tonic::transport::Server::builder()
            .add_service(
                TraceServiceServer::new(Collector(inbox.clone()))
                    .max_decoding_message_size(64 << 20),
            )
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            );
        tokio::spawn(async move {
            if let Err(e) = server.await {
                eprintln!("the span receiver stopped: {e}");
            }
        });
        Ok(Self {
            endpoint,
            inbox,
            stop,
        })
    }

    /// How many spans were received.
    pub fn count(&self) -> u64 {
        self.inbox.count.load(Ordering::Relaxed)
    }

    /// Every span kept so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.inbox
            .spans
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// The spans of one trace.
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The spans of `spans` whose parent is not among them (the root, and any whose parent was lost).
pub fn orphans(spans: &[ReceivedSpan]) -> Vec<&ReceivedSpan> {
    let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    spans
        .iter()
        .filter(|s| !ids.contains(s.parent_span_id.as_str()))
        .collect()
}
