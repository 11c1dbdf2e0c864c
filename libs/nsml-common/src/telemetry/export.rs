//! The exporter: closed spans wait in a bounded queue and go out in batches over OTLP/gRPC, from a task of
//! their own, as the `OTEL_EXPORTER_OTLP_*` and `OTEL_BSP_*` variables say.
//!
//! A span is encoded as OTLP when it closes, on the thread that closed it, into the batch being filled: what
//! it held is freed where it was made, and a queued span is its bytes alone. Wrapping a batch into a request
//! and sending it happens here. A full queue drops spans (counted, reported at shutdown) rather than slow the
//! platform down or grow without bound.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::str::FromStr as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf as _, BufMut as _};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use parking_lot::Mutex;
use prost::Message as _;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::spans::{Body, Finished, Logged, Recording, Value};

/// Closed spans not yet sent, already in the form they are sent in: each span is encoded as it is queued,
/// on the thread that closed it, so that what it held is freed where it was made and the exporter only moves
/// bytes.
pub struct Queue {
    pending: Mutex<Pending>,
    /// Buffers of batches the exporter has sent, kept for later batches to fill (so that a busy exporter
    /// allocates no buffer per batch).
    spare: Mutex<Vec<Vec<u8>>>,
    limit: usize,
    batch: usize,
    /// Woken when a batch is full.
    full: Notify,
    dropped: AtomicU64,
}

/// Encoded spans: full batches, oldest first, and the batch being filled.
struct Pending {
    full: VecDeque<Batch>,
    open: Batch,
    /// Spans in all of them.
    queued: usize,
}

/// Spans encoded one after another as the `spans` field of OTLP's `ScopeSpans` ([`Encoding::request`] wraps
/// them into a request).
#[derive(Debug, Default)]
pub struct Batch {
    pub bytes: Vec<u8>,
    pub spans: usize,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.spans == 0
    }
}

thread_local! {
    /// A span's encoding, and a nested message's inside it, reused by every span this thread closes.
    static SCRATCH: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Runs `f` with the thread's scratch buffers emptied (new ones while the thread's are in use or gone).
fn with_scratch(f: impl FnOnce(&mut Vec<u8>, &mut Vec<u8>)) {
    let mut f = Some(f);
    let _ = SCRATCH.try_with(|scratch| {
        if let Ok(mut scratch) = scratch.try_borrow_mut()
            && let Some(f) = f.take()
        {
            let (encoded, nested) = &mut *scratch;
            encoded.clear();
            f(encoded, nested);
        }
    });
    if let Some(f) = f {
        f(&mut Vec::new(), &mut Vec::new());
    }
}

impl Queue {
    pub fn new(limit: usize, batch: usize) -> Self {
        Self {
            pending: Mutex::new(Pending {
                full: VecDeque::new(),
                open: Batch::default(),
                queued: 0,
            }),
            spare: Mutex::new(Vec::new()),
            limit: limit.max(1),
            batch: batch.clamp(1, limit.max(1)),
            full: Notify::new(),
            dropped: AtomicU64::new(0),
        }
    }

    /// Queues a closed span, encoded, or counts it as dropped when the queue is full.
    pub fn push(&self, span: Finished) {
        with_scratch(|encoded, nested| {
            encode_span(encoded, nested, &span);
            // What the span held is freed here, on the thread that made it, before the lock is taken.
            drop(span);
            let mut p = self.pending.lock();
            if p.queued >= self.limit {
                drop(p);
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            p.queued += 1;
            bytes_field(&mut p.open.bytes, 2, encoded);
            p.open.spans += 1;
            if p.open.spans < self.batch {
                return;
            }
            let next = self.fresh();
            let filled = std::mem::replace(&mut p.open, next);
            p.full.push_back(filled);
            drop(p);
            self.full.notify_one();
        });
    }

    /// An empty batch, in a sent batch's buffer when there is one.
    fn fresh(&self) -> Batch {
        Batch {
            bytes: self.spare.lock().pop().unwrap_or_default(),
            spans: 0,
        }
    }

    /// The oldest batch: a full one, or else what the open one holds.
    pub fn take(&self) -> Batch {
        let mut p = self.pending.lock();
        let batch = match p.full.pop_front() {
            Some(full) => full,
            None if p.open.is_empty() => return Batch::default(),
            None => {
                let next = self.fresh();
                std::mem::replace(&mut p.open, next)
            }
        };
        p.queued -= batch.spans;
        batch
    }

    /// Gives back a batch's buffer once it is sent, for a later batch.
    pub fn recycle(&self, mut buffer: Vec<u8>) {
        buffer.clear();
        let mut spare = self.spare.lock();
        // As many as the queue holds batches at most; a buffer never filled is not worth keeping.
        if buffer.capacity() > 0 && spare.len() <= self.limit / self.batch {
            spare.push(buffer);
        }
    }

    /// Spans queued and not yet taken.
    pub fn len(&self) -> usize {
        self.pending.lock().queued
    }

    /// Whether no span waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
        let resource = Resource {
            attributes: config
                .resource
                .iter()
                .map(|(k, v)| KeyValue {
                    key: k.clone(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::StringValue(v.clone())),
                    }),
                })
                .collect(),
            ..Default::default()
        };
        let scope = InstrumentationScope {
            name: config.scope.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        };
        let sender = Sender {
            client: tonic::client::Grpc::new(endpoint.connect_lazy()),
            metadata,
            encoder: Encoding::new(&resource, &scope),
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
        let batches = self.queue.len() / self.queue.batch + 1;
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
    client: tonic::client::Grpc<Channel>,
    metadata: MetadataMap,
    encoder: Encoding,
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
                let whole = batch.spans == queue.batch;
                if !batch.is_empty() {
                    queue.recycle(self.send(batch).await);
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

    /// Sends `batch`, and gives back its buffer.
    async fn send(&mut self, batch: Batch) -> Vec<u8> {
        let n = batch.spans;
        let body = self.encoder.request(&batch);
        let err = match tokio::time::timeout(self.timeout, self.export(body)).await {
            Ok(Ok(())) => return batch.bytes,
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
        batch.bytes
    }

    /// `TraceService.Export` of an encoded `ExportTraceServiceRequest`.
    async fn export(&mut self, body: Vec<u8>) -> Result<(), tonic::Status> {
        self.client.ready().await.map_err(|e| {
            tonic::Status::unavailable(format!("the collector is not reachable: {e}"))
        })?;
        let mut req = tonic::Request::new(body);
        *req.metadata_mut() = self.metadata.clone();
        let path = http::uri::PathAndQuery::from_static(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        );
        let answer = self.client.unary(req, path, Encoded).await?.into_inner();
        match answer.partial_success {
            Some(p) if p.rejected_spans > 0 => Err(tonic::Status::invalid_argument(format!(
                "the collector rejected {} spans: {}",
                p.rejected_spans, p.error_message
            ))),
            _ => Ok(()),
        }
    }
}

/// The codec of an export: the request goes as the bytes [`Encoding::request`] made, the answer is decoded.
#[derive(Clone, Copy)]
struct Encoded;

impl Codec for Encoded {
    type Encode = Vec<u8>;
    type Decode = ExportTraceServiceResponse;
    type Encoder = Self;
    type Decoder = Self;

    fn encoder(&mut self) -> Self {
        Self
    }

    fn decoder(&mut self) -> Self {
        Self
    }
}

impl Encoder for Encoded {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Encoded {
    type Item = ExportTraceServiceResponse;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        let answer = ExportTraceServiceResponse::decode(&mut *src)
            .map_err(|e| tonic::Status::internal(format!("the collector's answer: {e}")))?;
        src.advance(src.remaining());
        Ok(Some(answer))
    }
}

/// Writes OTLP's `ExportTraceServiceRequest` around a batch of spans, which [`Queue::push`] wrote straight
/// from the closed spans, field by field, with no message structs built in between. The resource and the
/// scope, the same in every request, are encoded once.
pub struct Encoding {
    resource: Vec<u8>,
    scope: Vec<u8>,
}

// Protobuf wire types.
const VARINT: u32 = 0;
const I64: u32 = 1;
const LEN: u32 = 2;
const I32: u32 = 5;

/// OTLP's flags: the sampled bit, and whether the parent is in another process.
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

fn key(out: &mut Vec<u8>, field: u32, wire: u32) {
    varint(out, u64::from((field << 3) | wire));
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    key(out, field, LEN);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn fixed64(out: &mut Vec<u8>, field: u32, v: u64) {
    key(out, field, I64);
    out.extend_from_slice(&v.to_le_bytes());
}

/// An attribute's value, borrowed.
#[derive(Clone, Copy)]
enum Attr<'a> {
    Str(&'a str),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl<'a> From<&'a Value> for Attr<'a> {
    fn from(value: &'a Value) -> Self {
        match value {
            Value::Str(s) => Self::Str(s),
            Value::Int(i) => Self::Int(*i),
            Value::Float(f) => Self::Float(*f),
            Value::Bool(b) => Self::Bool(*b),
        }
    }
}

/// A `KeyValue` (field `field` of its message) of `name` and `value`.
fn attribute(out: &mut Vec<u8>, field: u32, name: &str, value: Attr<'_>) {
    // AnyValue { string_value = 1; bool_value = 2; int_value = 3; double_value = 4 }
    let any_len = match value {
        Attr::Str(s) => 1 + varint_len(s.len() as u64) + s.len(),
        Attr::Int(i) => 1 + varint_len(i as u64),
        Attr::Float(_) => 9,
        Attr::Bool(_) => 2,
    };
    // KeyValue { key = 1; value = 2 }
    let kv_len =
        1 + varint_len(name.len() as u64) + name.len() + 1 + varint_len(any_len as u64) + any_len;
    key(out, field, LEN);
    varint(out, kv_len as u64);
    bytes_field(out, 1, name.as_bytes());
    key(out, 2, LEN);
    varint(out, any_len as u64);
    match value {
        Attr::Str(s) => bytes_field(out, 1, s.as_bytes()),
        Attr::Bool(b) => {
            key(out, 2, VARINT);
            out.push(u8::from(b));
        }
        Attr::Int(i) => {
            key(out, 3, VARINT);
            // int64 is written as its two's complement, as a 64-bit varint.
            varint(out, i as u64);
        }
        Attr::Float(f) => fixed64(out, 4, f.to_bits()),
    }
}

fn varint_len(v: u64) -> usize {
    // One byte per started 7 bits, at least one.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

impl Encoding {
    /// An encoding of requests from `resource` and `scope`.
    pub fn new(resource: &Resource, scope: &InstrumentationScope) -> Self {
        Self {
            resource: resource.encode_to_vec(),
            scope: scope.encode_to_vec(),
        }
    }

    /// The `ExportTraceServiceRequest` of `batch`: one resource, one scope.
    pub fn request(&self, batch: &Batch) -> Vec<u8> {
        let body = &batch.bytes;
        // ScopeSpans { scope = 1; spans = 2 }, inside ResourceSpans { resource = 1; scope_spans = 2 }, inside
        // the request's resource_spans = 1.
        let scope_spans = 1 + varint_len(self.scope.len() as u64) + self.scope.len() + body.len();
        let resource_spans = 1
            + varint_len(self.resource.len() as u64)
            + self.resource.len()
            + 1
            + varint_len(scope_spans as u64)
            + scope_spans;
        let mut out = Vec::with_capacity(resource_spans + 16);
        key(&mut out, 1, LEN);
        varint(&mut out, resource_spans as u64);
        bytes_field(&mut out, 1, &self.resource);
        key(&mut out, 2, LEN);
        varint(&mut out, scope_spans as u64);
        bytes_field(&mut out, 1, &self.scope);
        out.extend_from_slice(body);
        out
    }
}

/// One `Span` into `out`, with `nested` for the messages inside it.
fn encode_span(out: &mut Vec<u8>, nested: &mut Vec<u8>, f: &Finished) {
    bytes_field(out, 1, &f.cx.trace_id.to_be_bytes());
    bytes_field(out, 2, &f.cx.span_id.to_be_bytes());
    if f.parent != 0 {
        bytes_field(out, 4, &f.parent.to_be_bytes());
    }
    bytes_field(out, 5, f.name().as_bytes());
    let start = f.start();
    fixed64(out, 7, start);
    fixed64(out, 8, f.end.max(start));
    match &f.body {
        Body::Recorded(r) => {
            key(out, 6, VARINT);
            varint(out, r.kind as u64);
            recorded(out, nested, r);
        }
        Body::Applied {
            consumer, event, ..
        } => {
            key(out, 6, VARINT);
            varint(out, 1);
            attribute(out, 9, "consumer", Attr::Str(consumer));
            attribute(out, 9, "event", Attr::Str(&event.event_type));
            let position = i64::try_from(event.position).unwrap_or(i64::MAX);
            attribute(out, 9, "position", Attr::Int(position));
        }
    }
    key(out, 16, I32);
    let flags =
        u32::from(f.cx.sampled) | HAS_IS_REMOTE | if f.remote_parent { IS_REMOTE } else { 0 };
    out.extend_from_slice(&flags.to_le_bytes());
}

fn recorded(out: &mut Vec<u8>, nested: &mut Vec<u8>, r: &Recording) {
    for (k, v) in &r.attributes {
        attribute(out, 9, k, v.into());
    }
    for e in &r.events {
        nested.clear();
        event(nested, e);
        bytes_field(out, 11, nested);
    }
    if r.dropped_events > 0 {
        key(out, 12, VARINT);
        varint(out, u64::from(r.dropped_events));
    }
    if let Some(message) = &r.error {
        // Status { message = 2; code = 3 (STATUS_CODE_ERROR = 2) }
        let len = 1 + varint_len(message.len() as u64) + message.len() + 2;
        key(out, 15, LEN);
        varint(out, len as u64);
        bytes_field(out, 2, message.as_bytes());
        key(out, 3, VARINT);
        varint(out, 2);
    }
}

/// A log event as a span `Event`: its message is the name, its level an attribute.
fn event(out: &mut Vec<u8>, e: &Logged) {
    fixed64(out, 1, e.at);
    bytes_field(out, 2, e.message.as_bytes());
    for (k, v) in &e.attributes {
        attribute(out, 3, k, v.into());
    }
    attribute(out, 3, "level", Attr::Str(e.level.as_str()));
}
