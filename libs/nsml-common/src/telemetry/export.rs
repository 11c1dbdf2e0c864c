//! The exporter: closed spans wait in a bounded queue and go out in batches over OTLP/gRPC, from a task of
//! their own, as the `OTEL_EXPORTER_OTLP_*` and `OTEL_BSP_*` variables say.
//!
//! A span's only cost on the path that made it is moving its recording into the queue; turning it into OTLP
//! and sending it happens here. A full queue drops spans (counted, reported at shutdown) rather than slow the
//! platform down or grow without bound.

use std::str::FromStr as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::spans::{Finished, Logged, Value};

/// Spans closed and not yet sent.
pub struct Queue {
    spans: Mutex<Vec<Finished>>,
    limit: usize,
    batch: usize,
    /// Woken when a batch is full.
    full: Notify,
    dropped: AtomicU64,
}

impl Queue {
    pub fn new(limit: usize, batch: usize) -> Self {
        Self {
            spans: Mutex::new(Vec::with_capacity(batch)),
            limit: limit.max(1),
            batch: batch.clamp(1, limit.max(1)),
            full: Notify::new(),
            dropped: AtomicU64::new(0),
        }
    }

    /// Queues a closed span, or counts it as dropped when the queue is full.
    pub fn push(&self, span: Finished) {
        let mut q = self.spans.lock();
        if q.len() >= self.limit {
            drop(q);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.push(span);
        let filled = q.len() == self.batch;
        drop(q);
        if filled {
            self.full.notify_one();
        }
    }

    /// Up to one batch of the oldest spans.
    pub fn take(&self) -> Vec<Finished> {
        let mut q = self.spans.lock();
        if q.len() <= self.batch {
            std::mem::replace(&mut *q, Vec::with_capacity(self.batch))
        } else {
            q.drain(..self.batch).collect()
        }
    }

    /// Spans dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

tokio::task_local! {
    /// Set while the exporter runs: the spans its own calls make are not recorded (they would be exported,
    /// and make more).
    static EXPORTING_TASK: ();
}

/// Whether this is the exporter's own task.
pub(super) fn suppressed() -> bool {
    EXPORTING_TASK.try_with(|_| ()).is_ok()
}

/// Where and how spans are sent.
pub struct Config {
    pub endpoint: String,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    /// The longest a span waits for its batch (`OTEL_BSP_SCHEDULE_DELAY`).
    pub delay: Duration,
    pub queue: usize,
    pub batch: usize,
    pub resource: Vec<(String, String)>,
    pub tls: Option<ClientTlsConfig>,
    pub scope: String,
}

impl Config {
    /// Reads the standard variables through `var`: `OTEL_EXPORTER_OTLP_[TRACES_]{ENDPOINT,HEADERS,TIMEOUT,
    /// CERTIFICATE,CLIENT_CERTIFICATE,CLIENT_KEY}`, `OTEL_BSP_{SCHEDULE_DELAY,MAX_QUEUE_SIZE,
    /// MAX_EXPORT_BATCH_SIZE}`, `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`. `service` names the
    /// service unless `OTEL_SERVICE_NAME` does.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>, service: &str) -> Result<Self, String> {
        let get = |k: &str| {
            var(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let traces = |k: &str| {
            get(&format!("OTEL_EXPORTER_OTLP_TRACES_{k}"))
                .or_else(|| get(&format!("OTEL_EXPORTER_OTLP_{k}")))
        };
        // A duration in milliseconds: `value` of the variable `k`, or `default`.
        let millis = |k: &str, value: Option<String>, default: u64| -> Result<Duration, String> {
            match value {
                None => Ok(Duration::from_millis(default)),
                Some(v) => v
                    .parse()
                    .map(Duration::from_millis)
                    .map_err(|_| format!("{k}=`{v}` is not a number of milliseconds")),
            }
        };
        let count = |k: &str, default: usize| -> Result<usize, String> {
            match get(k) {
                None => Ok(default),
                Some(v) => v
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("{k}=`{v}` is not a positive number")),
            }
        };
        let endpoint = traces("ENDPOINT").unwrap_or_else(|| "http://localhost:4317".to_string());
        let tls = if endpoint.starts_with("https://") {
            let ca = traces("CERTIFICATE").ok_or_else(|| {
                format!(
                    "the endpoint `{endpoint}` is https: set OTEL_EXPORTER_OTLP_CERTIFICATE to the PEM file of the \
                     collector's CA"
                )
            })?;
            let read =
                |path: &str| std::fs::read(path).map_err(|e| format!("cannot read `{path}`: {e}"));
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&ca)?));
            match (traces("CLIENT_CERTIFICATE"), traces("CLIENT_KEY")) {
                (Some(cert), Some(key)) => {
                    tls = tls.identity(Identity::from_pem(read(&cert)?, read(&key)?));
                }
                (None, None) => {}
                _ => {
                    return Err(
                        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY go together"
                            .to_string(),
                    );
                }
            }
            Some(tls)
        } else if endpoint.starts_with("http://") {
            None
        } else {
            return Err(format!(
                "the endpoint `{endpoint}` is neither http:// nor https:// (it is the collector's gRPC address, \
                 usually http://HOST:4317)"
            ));
        };
        let headers = traces("HEADERS")
            .map(|h| pairs(&h, "OTEL_EXPORTER_OTLP_HEADERS"))
            .transpose()?
            .unwrap_or_default();
        let mut resource = get("OTEL_RESOURCE_ATTRIBUTES")
            .map(|r| pairs(&r, "OTEL_RESOURCE_ATTRIBUTES"))
            .transpose()?
            .unwrap_or_default();
        let name = get("OTEL_SERVICE_NAME").unwrap_or_else(|| service.to_string());
        resource.retain(|(k, _)| k != "service.name");
        resource.insert(0, ("service.name".to_string(), name));
        resource.push(("telemetry.sdk.language".to_string(), "rust".to_string()));
        resource.push(("telemetry.sdk.name".to_string(), "nsml".to_string()));
        let queue = count("OTEL_BSP_MAX_QUEUE_SIZE", 2048)?;
        Ok(Self {
            endpoint,
            headers,
            timeout: millis("OTEL_EXPORTER_OTLP_TIMEOUT", traces("TIMEOUT"), 10_000)?,
            // Zero would be a busy loop: a millisecond is as soon as a batch can sensibly go.
            delay: millis(
                "OTEL_BSP_SCHEDULE_DELAY",
                get("OTEL_BSP_SCHEDULE_DELAY"),
                5000,
            )?
            .max(Duration::from_millis(1)),
            queue,
            batch: count("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)?.min(queue),
            resource,
            tls,
            scope: service.to_string(),
        })
    }
}

/// `k=v,k2=v2` with values percent-decoded, as the OpenTelemetry variables write them.
fn pairs(text: &str, var: &str) -> Result<Vec<(String, String)>, String> {
    text.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| format!("{var}: `{p}` is not key=value"))?;
            Ok((percent_decode(k.trim()), percent_decode(v.trim())))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The running exporter.
pub struct Exporter {
    pub queue: Arc<Queue>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    timeout: Duration,
}

impl Exporter {
    /// Starts sending batches to the configured endpoint (connecting when the first batch is sent). Call
    /// from within a Tokio runtime.
    pub fn start(config: Config) -> Result<Self, String> {
        let mut endpoint = Endpoint::from_str(&config.endpoint)
            .map_err(|e| format!("the endpoint `{}` is not valid: {e}", config.endpoint))?
            .timeout(config.timeout);
        if let Some(tls) = config.tls.clone() {
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| format!("TLS to `{}`: {e}", config.endpoint))?;
        }
        let mut metadata = MetadataMap::new();
        for (k, v) in &config.headers {
            let key = MetadataKey::from_str(&k.to_ascii_lowercase())
                .map_err(|_| format!("OTEL_EXPORTER_OTLP_HEADERS: `{k}` is not a header name"))?;
            let value = MetadataValue::from_str(v).map_err(|_| {
                format!("OTEL_EXPORTER_OTLP_HEADERS: the value of `{k}` is not a header value")
            })?;
            metadata.insert(key, value);
        }
        let queue = Arc::new(Queue::new(config.queue, config.batch));
        let stop = CancellationToken::new();
        let sender = Sender {
            client: TraceServiceClient::new(endpoint.connect_lazy()),
            metadata,
            resource: Resource {
                attributes: config
                    .resource
                    .iter()
                    .map(|(k, v)| key_value(k, Value::Str(v.clone())))
                    .collect(),
                ..Default::default()
            },
            scope: InstrumentationScope {
                name: config.scope.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                ..Default::default()
            },
            timeout: config.timeout,
            failures: 0,
            warned: None,
        };
        let task = tokio::spawn(
            EXPORTING_TASK.scope((), sender.run(queue.clone(), config.delay, stop.clone())),
        );
        Ok(Self {
            queue,
            stop,
            task,
            timeout: config.timeout,
        })
    }

    /// Stops without sending anything (an exporter whose layer was never installed).
    pub fn abandon(self) {
        self.stop.cancel();
    }

    /// Sends what is queued and stops; spans closed after this are dropped.
    pub async fn shutdown(self) {
        self.stop.cancel();
        // Every batch still queued gets its own timeout.
        let batches = self.queue.spans.lock().len() / self.queue.batch + 1;
        let bound = self.timeout * u32::try_from(batches).unwrap_or(u32::MAX).min(10);
        if tokio::time::timeout(bound, self.task).await.is_err() {
            eprintln!("gave up exporting the last spans after {bound:?}");
        }
        let dropped = self.queue.dropped();
        if dropped > 0 {
            eprintln!(
                "{dropped} spans were dropped because the export queue was full (OTEL_BSP_MAX_QUEUE_SIZE)"
            );
        }
    }
}

struct Sender {
    client: TraceServiceClient<Channel>,
    metadata: MetadataMap,
    resource: Resource,
    scope: InstrumentationScope,
    timeout: Duration,
    failures: u64,
    warned: Option<Instant>,
}

impl Sender {
    async fn run(mut self, queue: Arc<Queue>, delay: Duration, stop: CancellationToken) {
        loop {
            let stopping = tokio::select! {
                _ = stop.cancelled() => true,
                _ = queue.full.notified() => false,
                _ = tokio::time::sleep(delay) => false,
            };
            // Send until what is left is less than a batch (or nothing, when stopping).
            loop {
                let batch = queue.take();
                let whole = batch.len() == queue.batch;
                if !batch.is_empty() {
                    self.send(batch).await;
                }
                if !whole {
                    break;
                }
            }
            if stopping {
                return;
            }
        }
    }

    async fn send(&mut self, batch: Vec<Finished>) {
        let n = batch.len();
        let body = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(self.scope.clone()),
                    spans: batch.into_iter().map(to_otlp).collect(),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        let mut req = tonic::Request::new(body);
        *req.metadata_mut() = self.metadata.clone();
        let sent = tokio::time::timeout(self.timeout, self.client.export(req)).await;
        let err = match sent {
            Ok(Ok(_)) => return,
            Ok(Err(status)) => status.to_string(),
            Err(_) => format!("no answer within {:?}", self.timeout),
        };
        self.failures += 1;
        // One line a minute at most: a collector that is down must not flood the logs.
        if self
            .warned
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(60))
        {
            self.warned = Some(Instant::now());
            tracing::warn!(
                spans = n,
                failures = self.failures,
                "cannot export spans: {err}"
            );
        }
    }
}

fn any(value: Value) -> AnyValue {
    AnyValue {
        value: Some(match value {
            Value::Str(s) => any_value::Value::StringValue(s),
            Value::Int(i) => any_value::Value::IntValue(i),
            Value::Float(f) => any_value::Value::DoubleValue(f),
            Value::Bool(b) => any_value::Value::BoolValue(b),
        }),
    }
}

fn key_value(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(any(value)),
    }
}

/// OTLP's flags: the sampled bit, and whether the parent is in another process.
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

/// A closed span as OTLP sends it.
pub fn to_otlp(f: Finished) -> Span {
    let r = *f.recording;
    Span {
        trace_id: f.cx.trace_id.to_be_bytes().to_vec(),
        span_id: f.cx.span_id.to_be_bytes().to_vec(),
        parent_span_id: if f.parent == 0 {
            Vec::new()
        } else {
            f.parent.to_be_bytes().to_vec()
        },
        flags: u32::from(f.cx.sampled)
            | HAS_IS_REMOTE
            | if f.remote_parent { IS_REMOTE } else { 0 },
        name: r.name.to_string(),
        kind: r.kind,
        start_time_unix_nano: r.start,
        end_time_unix_nano: f.end.max(r.start),
        attributes: r
            .attributes
            .into_iter()
            .map(|(k, v)| key_value(k, v))
            .collect(),
        events: r.events.into_iter().map(event).collect(),
        dropped_events_count: r.dropped_events,
        status: r.error.map(|message| Status {
            message,
            code: 2, // STATUS_CODE_ERROR
        }),
        ..Default::default()
    }
}

fn event(e: Logged) -> span::Event {
    let mut attributes: Vec<KeyValue> = e
        .attributes
        .into_iter()
        .map(|(k, v)| key_value(k, v))
        .collect();
    attributes.push(key_value("level", Value::Str(e.level.to_string())));
    span::Event {
        time_unix_nano: e.at,
        name: e.message,
        attributes,
        dropped_attributes_count: 0,
    }
}
