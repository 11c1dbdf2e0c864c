//! Tracing set-up: logs, OTLP export of spans, and W3C trace context carried across gRPC metadata, bus headers
//! and the events of the log.
//!
//! Export follows the OpenTelemetry SDK's standard variables and is off unless they ask for it:
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or `OTEL_TRACES_EXPORTER=otlp` for
//! the default `http://localhost:4317`) turns it on; `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`
//! keep it off. Spans go over OTLP/gRPC; `OTEL_EXPORTER_OTLP_PROTOCOL` may say `grpc`, any other protocol is
//! refused with a warning. `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` (with
//! `OTEL_TRACES_SAMPLER_ARG`), `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`,
//! `OTEL_EXPORTER_OTLP_CERTIFICATE` (with the client certificate and key, for an `https` endpoint) and the
//! `OTEL_BSP_*` batching variables mean what the specification says.
//!
//! The platform's own layer ([`TraceLayer`]) makes the spans' contexts and records the sampled ones; the
//! exporter ([`export`]) batches them off the request path. Read models and reactors record a span for each
//! event they use (decode), in the trace that appended it, when that trace is sampled; `NSML_TRACE_EVENTS=off`
//! leaves those spans out.
//!
//! With export off and JSON logs, spans still get trace ids (log lines carry them, calls and events pass them
//! on) but nothing is recorded. With export off and text logs, which show no trace ids, no tracing layer is
//! installed at all: a trace context a caller sends still reaches the service the gateway forwards to, and
//! nothing else is spent on traces. `NSML_TRACING=off` installs no tracing layer whatever else is set (the
//! baseline the tracing-cost bench compares with).

use std::cell::Cell;
use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use nsml_eventstore::StoredEvent;
use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::{Format, Json, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

pub mod export;
pub mod spans;

use export::{Config, Exporter, Queue};
use spans::{Body, Finished, SpanState};
pub use spans::{Sampler, TraceContext, TraceLayer};

/// Whether consumers of the log open a span per applied event: only when this process exports spans (and
/// `NSML_TRACE_EVENTS=off` does not say otherwise).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// The sampler and queue of an exporting process, for the spans recorded without a `tracing` span (a read
/// model applying an event).
static RECORDER: OnceLock<(Sampler, Arc<Queue>)> = OnceLock::new();

/// What the environment asks of span export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Export {
    /// No tracing layer at all (`NSML_TRACING=off`).
    NoTracing,
    /// Trace ids are made and passed on, nothing is recorded; the reason is for the start-up log.
    Off(Option<String>),
    /// Spans are sampled as `OTEL_TRACES_SAMPLER` says and sent over OTLP/gRPC.
    Otlp,
}

impl Export {
    /// Reads the standard `OTEL_*` variables (and `NSML_TRACING`) through `var`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let get = |k: &str| {
            var(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        if get("NSML_TRACING").is_some_and(|v| v.eq_ignore_ascii_case("off")) {
            return Self::NoTracing;
        }
        if get("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Self::Off(None);
        }
        let exporter = get("OTEL_TRACES_EXPORTER").map(|v| v.to_ascii_lowercase());
        let asked = match exporter.as_deref() {
            None => {
                get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
                    || get("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
            }
            Some("otlp") => true,
            Some("none") => false,
            Some(other) => {
                return Self::Off(Some(format!(
                    "OTEL_TRACES_EXPORTER=`{other}` is not supported (only `otlp` and `none`); not exporting spans"
                )));
            }
        };
        if !asked {
            return Self::Off(None);
        }
        let protocol = get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| get("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .map(|v| v.to_ascii_lowercase());
        match protocol.as_deref() {
            None | Some("grpc") => Self::Otlp,
            Some(other) => Self::Off(Some(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL=`{other}` is not supported: spans are exported over OTLP/gRPC only \
                 (set `grpc` and point OTEL_EXPORTER_OTLP_ENDPOINT at the collector's gRPC port, usually 4317); \
                 not exporting spans"
            ))),
        }
    }
}

/// The installed tracing: call [`Telemetry::shutdown`] before the process exits, or the spans still queued
/// are lost.
#[must_use = "spans queued for export are lost unless `shutdown` is called before exit"]
pub struct Telemetry {
    exporter: Option<Exporter>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.exporter.is_some()
    }

    /// Sends the spans still queued and stops the exporter.
    pub async fn shutdown(mut self) {
        let Some(exporter) = self.exporter.take() else {
            return;
        };
        EXPORTING.store(false, Ordering::Relaxed);
        exporter.shutdown().await;
    }
}

/// Installs the global subscriber: human-readable (or JSON lines with `NSML_LOG_FORMAT=json`) logs on stderr
/// filtered by `NSML_LOG` (default `info`), coloured only when stderr is a terminal, and spans exported as the
/// `OTEL_*` variables say (see the module's documentation). `service` is the service name spans are exported
/// under unless `OTEL_SERVICE_NAME` names one. Call from within a Tokio runtime: the exporter runs on it.
pub fn init(service: &str) -> Telemetry {
    let (level, filter) = log_filter(std::env::var("NSML_LOG").ok().as_deref());
    let var = |k: &str| std::env::var(k).ok();
    let export = Export::from_vars(var);
    let json = std::env::var("NSML_LOG_FORMAT").is_ok_and(|v| v == "json");
    let mut notes = Vec::new();
    let (layer, exporter) = match &export {
        Export::NoTracing => (None, None),
        // Trace ids only for the log lines that show them.
        Export::Off(note) => {
            notes.extend(note.clone());
            (json.then(TraceLayer::ids_only), None)
        }
        Export::Otlp => {
            let (sampler, note) = Sampler::from_vars(
                var("OTEL_TRACES_SAMPLER").as_deref(),
                var("OTEL_TRACES_SAMPLER_ARG").as_deref(),
            );
            notes.extend(note);
            match Config::from_vars(var, service).and_then(Exporter::start) {
                Ok(exporter) => (
                    Some(TraceLayer::recording(sampler, exporter.queue.clone())),
                    Some((exporter, sampler)),
                ),
                Err(err) => {
                    notes.push(format!("cannot export spans: {err}"));
                    (Some(TraceLayer::ids_only()), None)
                }
            }
        }
    };
    let ansi = std::io::stderr().is_terminal();
    let result = tracing_subscriber::registry()
        .with(level)
        .with(filter)
        .with(layer)
        .with(log_layer(json, std::io::stderr, ansi))
        .try_init();
    if result.is_err() {
        // A second init in one process (tests) keeps the first subscriber and its exporter.
        if let Some((exporter, _)) = exporter {
            exporter.abandon();
        }
        return Telemetry { exporter: None };
    }
    for note in notes {
        tracing::warn!("{note}");
    }
    let Some((exporter, sampler)) = exporter else {
        return Telemetry { exporter: None };
    };
    // Consumers of the log record a span per event they use: `NSML_TRACE_EVENTS=off` leaves them out.
    let events = !std::env::var("NSML_TRACE_EVENTS").is_ok_and(|v| v.eq_ignore_ascii_case("off"));
    let _ = RECORDER.set((sampler, exporter.queue.clone()));
    EXPORTING.store(events, Ordering::Relaxed);
    Telemetry {
        exporter: Some(exporter),
    }
}

/// The log lines' layer: JSON lines (with the current span's `trace_id` and `span_id`) or text, ANSI colours
/// only when `ansi`.
fn log_layer<S, W>(
    json: bool,
    writer: W,
    ansi: bool,
) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    if json {
        Box::new(
            tracing_subscriber::fmt::layer()
                .with_ansi(ansi)
                .fmt_fields(JsonFields::new())
                .event_format(TracedJson(tracing_subscriber::fmt::format().json()))
                .with_writer(writer),
        )
    } else {
        Box::new(
            tracing_subscriber::fmt::layer()
                .with_ansi(ansi)
                .with_writer(writer),
        )
    }
}

/// The JSON line format of `tracing_subscriber`, with the trace and span ids of the event's span added.
struct TracedJson(Format<Json>);

impl<S, N> FormatEvent<S, N> for TracedJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        let cx = ctx
            .parent_span()
            .and_then(|span| span.extensions().get::<SpanState>().map(|s| s.cx));
        match (cx, line.strip_suffix("}\n")) {
            (Some(cx), Some(head)) => writeln!(
                writer,
                "{head},\"trace_id\":\"{:032x}\",\"span_id\":\"{:016x}\"}}",
                cx.trace_id, cx.span_id
            ),
            _ => writer.write_str(&line),
        }
    }
}

/// The filter `NSML_LOG` asks for: a plain level (`info`, `debug`, …, the default `info`) as a [`LevelFilter`],
/// anything else (`info,nsml_session=debug`) as an [`EnvFilter`]. A level filter decides once per call site; an
/// `EnvFilter` also takes a lock on every entry to and exit from a span, which every call between services and
/// every wait inside one makes.
fn log_filter(spec: Option<&str>) -> (Option<LevelFilter>, Option<EnvFilter>) {
    let spec = spec
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or("info");
    if let Ok(level) = spec.parse::<LevelFilter>() {
        return (Some(level), None);
    }
    match EnvFilter::try_new(spec) {
        Ok(filter) => (None, Some(filter)),
        Err(err) => {
            eprintln!("NSML_LOG=`{spec}` is not a valid filter ({err}); logging at `info`");
            (Some(LevelFilter::INFO), None)
        }
    }
}

/// The current span's W3C `traceparent` (or, outside any span, that of the reactor handling an event; see
/// [`handling`]), or empty when there is none. Every event and every call between services takes one.
pub fn current_traceparent() -> String {
    spans::current()
        .or_else(|| HANDLING.try_with(Handling::handed_on).ok().flatten())
        .map_or_else(String::new, |cx| cx.traceparent())
}

/// The span `make` returns, as a child of the W3C `traceparent` value (a call's, a session's, an event's)
/// when it holds one, rather than of the current span.
pub fn span_in(traceparent: &str, make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    spans::with_remote_parent(TraceContext::parse(traceparent), make)
}

/// The span `make` returns, as a child of the trace context carried in `headers`, if any.
pub fn span_from_headers(
    headers: &http::HeaderMap,
    make: impl FnOnce() -> tracing::Span,
) -> tracing::Span {
    let tp = headers.get("traceparent").and_then(|v| v.to_str().ok());
    spans::with_remote_parent(tp.and_then(TraceContext::parse), make)
}

thread_local! {
    /// Set when an event is decoded on this thread: a consumer of the log that decoded the event it was
    /// handed used it.
    static DECODED: Cell<bool> = const { Cell::new(false) };
}

/// Notes that an event was decoded (see [`crate::event::decode`]).
pub(crate) fn note_decoded() {
    DECODED.with(|d| d.set(true));
}

tokio::task_local! {
    /// The span a reactor's handling of an event stands for, while the handler runs: what it appends and
    /// calls continues the trace through it.
    static HANDLING: Handling;
}

/// A reactor's handling of one event. The event's trace context is read only when the handler hands it on or
/// used the event: most events a reactor is given, it skips.
struct Handling {
    event: Arc<StoredEvent>,
    sampler: Sampler,
    /// The event's context and the handling span's, once read: `Some(None)` when the event carries none.
    read: Cell<Option<Option<(TraceContext, TraceContext)>>>,
    /// Whether the handler handed the context on (an append, a call): the span is then recorded, as their
    /// parent.
    handed_on: Cell<bool>,
}

impl Handling {
    /// The event's context, and the handling span's: a new span of the event's trace when the sampler samples
    /// it, the event's own context (passed on as it came) when not.
    fn contexts(&self) -> Option<(TraceContext, TraceContext)> {
        if let Some(read) = self.read.get() {
            return read;
        }
        let read = TraceContext::parse(&self.event.metadata.traceparent)
            .map(|parent| (parent, self.sampler.child_of(parent)));
        self.read.set(Some(read));
        read
    }

    /// The context the handler hands on.
    fn handed_on(&self) -> Option<TraceContext> {
        self.handed_on.set(true);
        self.contexts().map(|(_, own)| own)
    }
}

/// Runs `fut`, and says whether it decoded an event along the way.
async fn noting_use<F: Future>(fut: F) -> (F::Output, bool) {
    let mut fut = std::pin::pin!(fut);
    let mut used = false;
    let out = std::future::poll_fn(|cx| {
        let before = DECODED.with(|d| d.replace(false));
        let polled = fut.as_mut().poll(cx);
        used |= DECODED.with(|d| d.replace(before));
        polled
    })
    .await;
    (out, used)
}

/// Runs a reactor's (`consumer`) handling of `event` as an `apply` span of the trace the event was appended
/// in, when this process exports spans and that trace is sampled: what the handler appends and calls is its
/// child. The span is recorded only when the handler decoded the event or handed the span on; no `tracing`
/// span is made, so an event the reactor skips costs nothing more.
pub async fn handling<F: Future>(
    consumer: &'static str,
    event: &Arc<StoredEvent>,
    fut: F,
) -> F::Output {
    let recorder = RECORDER.get().filter(|_| EXPORTING.load(Ordering::Relaxed));
    handling_for(recorder, consumer, event, fut).await
}

async fn handling_for<F: Future>(
    recorder: Option<&(Sampler, Arc<Queue>)>,
    consumer: &'static str,
    event: &Arc<StoredEvent>,
    fut: F,
) -> F::Output {
    let Some((sampler, queue)) = recorder.filter(|_| !event.metadata.traceparent.is_empty()) else {
        return fut.await;
    };
    let start = spans::now_ns();
    let handling = Handling {
        event: event.clone(),
        sampler: *sampler,
        read: Cell::new(None),
        handed_on: Cell::new(false),
    };
    let (out, recorded) = HANDLING
        .scope(handling, async {
            let (out, used) = noting_use(fut).await;
            let recorded = HANDLING.with(|h| {
                (used || h.handed_on.get())
                    .then(|| h.contexts())
                    .flatten()
                    .filter(|(_, own)| own.sampled)
            });
            (out, recorded)
        })
        .await;
    if let Some((parent, own)) = recorded {
        queue.push(apply_span(consumer, event, parent, own, start));
    }
    out
}

/// The `apply` span of `consumer` for `event`, a child of the event's context `parent`, as `cx`, from `start`
/// to now.
pub fn apply_span(
    consumer: &'static str,
    event: &Arc<StoredEvent>,
    parent: TraceContext,
    cx: TraceContext,
    start: u64,
) -> Finished {
    Finished {
        cx,
        parent: parent.span_id,
        remote_parent: true,
        end: spans::now_ns(),
        body: Body::Applied {
            consumer,
            event: event.clone(),
            start,
        },
    }
}

/// A read model (`consumer`) applying events: each one it decoded is recorded as an `apply` span of the
/// event's trace, without a `tracing` span. Only an exporting process with the event's trace sampled records
/// one; whether it is, is read only for the events a read model used (most it skips). The span of an event
/// starts where the last one recorded (or the batch) ended, so that the clock is read only for events used.
pub struct Applying {
    consumer: &'static str,
    /// When the last recorded span ended, or the batch started.
    since: u64,
}

impl Applying {
    /// Starts a batch of events, when this process records spans of events.
    pub fn start(consumer: &'static str) -> Option<Self> {
        if !EXPORTING.load(Ordering::Relaxed) {
            return None;
        }
        Some(Self {
            consumer,
            since: spans::now_ns(),
        })
    }

    /// Applies one `event` with `apply`, and queues its span when `apply` decoded the event and the event's
    /// trace is sampled.
    pub fn one<R>(&mut self, event: &Arc<StoredEvent>, apply: impl FnOnce() -> R) -> R {
        let before = DECODED.with(|d| d.replace(false));
        let out = apply();
        let used = DECODED.with(|d| d.replace(before));
        let Some((sampler, queue)) = RECORDER.get().filter(|_| used) else {
            return out;
        };
        let Some((parent, cx)) = TraceContext::parse(&event.metadata.traceparent)
            .map(|parent| (parent, sampler.child_of(parent)))
            .filter(|(_, cx)| cx.sampled)
        else {
            return out;
        };
        let span = apply_span(self.consumer, event, parent, cx, self.since);
        self.since = span.end;
        queue.push(span);
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{
        AnyValue, InstrumentationScope, KeyValue, any_value,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::Span;
    use prost::Message as _;
    use tracing_subscriber::layer::SubscriberExt;

    use super::export::{Batch, Config, Encoding, Queue};
    use super::spans::{Body, Finished, Recording, Root, Value};
    use super::{
        Export, Sampler, TraceContext, TraceLayer, current_traceparent, log_layer,
        span_from_headers, span_in,
    };

    const INCOMING: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    /// Log output kept in memory.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    fn headers(traceparent: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", traceparent.parse().expect("header"));
        headers
    }

    /// Runs `f` under a layer recording what `sampler` samples; returns the spans closed, in order, as the
    /// exporter sends them.
    fn recorded(sampler: Sampler, f: impl FnOnce()) -> Vec<Span> {
        let queue = Arc::new(Queue::new(1000, 1000));
        let subscriber =
            tracing_subscriber::registry().with(TraceLayer::recording(sampler, queue.clone()));
        tracing::subscriber::with_default(subscriber, f);
        spans_of(&request_of(&queue.take()))
    }

    /// The request the exporter sends for `batch`, decoded with OTLP's message types.
    fn request_of(batch: &Batch) -> ExportTraceServiceRequest {
        let resource = Resource {
            attributes: vec![KeyValue {
                key: "service.name".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue("svc".into())),
                }),
            }],
            ..Default::default()
        };
        let scope = InstrumentationScope {
            name: "svc".into(),
            ..Default::default()
        };
        let bytes = Encoding::new(&resource, &scope).request(batch);
        ExportTraceServiceRequest::decode(&bytes[..]).expect("a valid ExportTraceServiceRequest")
    }

    /// The spans of a request with one resource and one scope.
    fn spans_of(request: &ExportTraceServiceRequest) -> Vec<Span> {
        match &request.resource_spans[..] {
            [] => Vec::new(),
            [rs] => rs.scope_spans[0].spans.clone(),
            more => panic!("one resource: {more:?}"),
        }
    }

    /// `spans` as the exporter sends them, decoded.
    fn exported(spans: Vec<Finished>) -> ExportTraceServiceRequest {
        let queue = Queue::new(1000, 1000);
        for span in spans {
            queue.push(span);
        }
        request_of(&queue.take())
    }

    /// A decoded span's attributes.
    fn attributes(attrs: &[KeyValue]) -> Vec<(&str, any_value::Value)> {
        attrs
            .iter()
            .map(|kv| {
                (
                    kv.key.as_str(),
                    kv.value.clone().and_then(|v| v.value).expect("a value"),
                )
            })
            .collect()
    }

    /// The `traceparent` of a decoded span.
    fn traceparent_of(span: &Span) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex::encode(&span.trace_id),
            hex::encode(&span.span_id),
            span.flags & 0xff
        )
    }

    const ALWAYS_ON: Sampler = Sampler {
        parent_based: true,
        root: Root::On,
    };

    #[test]
    fn a_plain_level_needs_no_env_filter() {
        use super::log_filter;
        use tracing_subscriber::filter::LevelFilter;
        assert_eq!(log_filter(None).0, Some(LevelFilter::INFO));
        assert_eq!(log_filter(Some(" ")).0, Some(LevelFilter::INFO));
        assert_eq!(log_filter(Some("debug")).0, Some(LevelFilter::DEBUG));
        assert_eq!(log_filter(Some("off")).0, Some(LevelFilter::OFF));
        let (level, filter) = log_filter(Some("info,nsml_session=debug"));
        assert!(level.is_none());
        assert!(filter.is_some(), "per-target directives keep the EnvFilter");
        let (level, filter) = log_filter(Some("nsml_session=notalevel"));
        assert_eq!(
            level,
            Some(LevelFilter::INFO),
            "an invalid filter falls back to info"
        );
        assert!(filter.is_none());
    }

    #[test]
    fn export_is_off_unless_the_standard_variables_ask_for_it() {
        let with = |pairs: &[(&str, &str)]| {
            let vars: HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Export::from_vars(|k| vars.get(k).cloned())
        };
        assert_eq!(with(&[]), Export::Off(None));
        assert_eq!(with(&[("OTEL_SERVICE_NAME", "x")]), Export::Off(None));
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317");
        assert_eq!(with(&[endpoint]), Export::Otlp);
        assert_eq!(
            with(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4317")]),
            Export::Otlp
        );
        assert_eq!(with(&[("OTEL_TRACES_EXPORTER", "otlp")]), Export::Otlp);
        assert_eq!(
            with(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]),
            Export::Otlp
        );
        assert_eq!(
            with(&[endpoint, ("OTEL_SDK_DISABLED", "true")]),
            Export::Off(None)
        );
        assert_eq!(
            with(&[endpoint, ("OTEL_TRACES_EXPORTER", "none")]),
            Export::Off(None)
        );
        assert_eq!(
            with(&[endpoint, ("NSML_TRACING", "off")]),
            Export::NoTracing
        );
        let Export::Off(Some(why)) =
            with(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")])
        else {
            panic!("http/protobuf is refused");
        };
        assert!(why.contains("gRPC only"), "{why}");
        assert!(matches!(
            with(&[("OTEL_TRACES_EXPORTER", "zipkin")]),
            Export::Off(Some(_))
        ));
    }

    #[test]
    fn the_exporter_reads_the_standard_variables() {
        let with = |pairs: &[(&str, &str)]| {
            let vars: HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Config::from_vars(|k| vars.get(k).cloned(), "nsml-quota")
        };
        let c = with(&[]).expect("the defaults");
        assert_eq!(c.endpoint, "http://localhost:4317");
        assert_eq!((c.queue, c.batch), (2048, 512));
        assert_eq!(c.delay, std::time::Duration::from_secs(5));
        assert_eq!(c.resource[0], ("service.name".into(), "nsml-quota".into()));
        let c = with(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://b:4317"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "api-key=s%3Dcret, x-team = t1",
            ),
            ("OTEL_SERVICE_NAME", "quota-eu"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "service.name=ignored,deployment.environment=prod",
            ),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "500"),
        ])
        .expect("a full configuration");
        assert_eq!(c.endpoint, "http://b:4317", "the traces endpoint wins");
        assert_eq!(
            c.headers,
            vec![
                ("api-key".into(), "s=cret".into()),
                ("x-team".into(), "t1".into())
            ]
        );
        assert_eq!(c.resource[0], ("service.name".into(), "quota-eu".into()));
        assert!(
            c.resource
                .contains(&("deployment.environment".into(), "prod".into()))
        );
        assert_eq!(
            c.resource
                .iter()
                .filter(|(k, _)| k == "service.name")
                .count(),
            1
        );
        assert_eq!(
            (c.queue, c.batch),
            (100, 100),
            "a batch is at most the queue"
        );
        assert_eq!(c.delay, std::time::Duration::from_millis(200));
        for (bad, says) in [
            (
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4317"),
                "OTEL_EXPORTER_OTLP_CERTIFICATE",
            ),
            (("OTEL_EXPORTER_OTLP_ENDPOINT", "c:4317"), "neither http"),
            (("OTEL_BSP_MAX_QUEUE_SIZE", "0"), "OTEL_BSP_MAX_QUEUE_SIZE"),
            (("OTEL_BSP_SCHEDULE_DELAY", "soon"), "milliseconds"),
            (("OTEL_EXPORTER_OTLP_HEADERS", "novalue"), "key=value"),
        ] {
            let err = with(&[bad])
                .err()
                .unwrap_or_else(|| panic!("{bad:?} is refused"));
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn traceparent_round_trips_and_malformed_ones_are_ignored() {
        let cx = TraceContext::parse(INCOMING).expect("a valid traceparent");
        assert_eq!(cx.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(cx.span_id, 0x00f067aa0ba902b7);
        assert!(cx.sampled);
        assert_eq!(cx.traceparent(), INCOMING);
        let unsampled = INCOMING.replace("-01", "-00");
        assert!(!TraceContext::parse(&unsampled).expect("valid").sampled);
        for bad in [
            "",
            "00-4bf9-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad}");
        }
        assert!(
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later")
                .is_some(),
            "a later version's extra fields are skipped"
        );
    }

    #[test]
    fn samplers_are_read_as_the_specification_names_them() {
        let read = |s: Option<&str>, a: Option<&str>| Sampler::from_vars(s, a);
        assert_eq!(read(None, None), (ALWAYS_ON, None));
        let (s, note) = read(Some("traceidratio"), Some("0.25"));
        assert_eq!(
            (s.parent_based, s.root, note),
            (false, Root::Ratio(0.25), None)
        );
        let (s, _) = read(Some("parentbased_always_off"), None);
        assert!(s.parent_based && s.root == Root::Off);
        let (s, note) = read(Some("parentbased_traceidratio"), Some("2"));
        assert_eq!(s, ALWAYS_ON, "a bad ratio falls back to the default");
        assert!(note.is_some_and(|n| n.contains("OTEL_TRACES_SAMPLER_ARG")));
        let (s, note) = read(Some("jaeger_remote"), None);
        assert_eq!(s, ALWAYS_ON);
        assert!(note.is_some_and(|n| n.contains("jaeger_remote")));
        // Decisions: a parent-based sampler follows the parent; a ratio samples about its share of traces.
        let ratio = Sampler {
            parent_based: true,
            root: Root::Ratio(0.1),
        };
        assert!(ratio.decide(Some(true), 7));
        assert!(!ratio.decide(Some(false), 7));
        let hits = (0..10_000u128)
            .filter(|i| {
                ratio.decide(
                    None,
                    i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835),
                )
            })
            .count();
        assert!(
            (700..1300).contains(&hits),
            "{hits} of 10,000 sampled at 0.1"
        );
        let always = Sampler {
            parent_based: false,
            root: Root::On,
        };
        assert!(
            always.decide(Some(false), 7),
            "always_on ignores the parent"
        );
    }

    #[test]
    fn spans_continue_the_callers_trace_and_record_what_is_exported() {
        let mut seen = String::new();
        let spans = recorded(ALWAYS_ON, || {
            assert_eq!(current_traceparent(), "", "no span, no trace");
            let call = span_from_headers(&headers(INCOMING), || {
                tracing::info_span!(
                    "call",
                    otel.kind = "server",
                    path = "/x",
                    op = tracing::field::Empty
                )
            });
            let _call = call.enter();
            seen = current_traceparent();
            call.record("op", "save");
            let child = tracing::info_span!("child", n = 3u64);
            let _child = child.enter();
            tracing::error!(code = 7, "it broke");
        });
        assert!(
            seen.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && seen.ends_with("-01"),
            "the span continues the incoming trace: {seen}"
        );
        // As OTLP sends them, read back with the protocol's own message types.
        let [child, call] = &spans[..] else {
            panic!("two spans: {spans:?}");
        };
        assert_eq!(traceparent_of(call), seen);
        assert_eq!(
            child.trace_id,
            0x4bf92f3577b34da6a3ce929d0e0e4736u128.to_be_bytes()
        );
        assert_eq!(child.trace_id, call.trace_id);
        assert_ne!(child.span_id, call.span_id);
        assert_eq!(child.parent_span_id, call.span_id);
        assert_eq!(
            call.parent_span_id,
            0x00f067aa0ba902b7u64.to_be_bytes(),
            "the caller's span is the parent"
        );
        assert_eq!(child.flags, 0x101, "sampled, parent in this process");
        assert_eq!(call.flags, 0x301, "sampled, parent in another process");
        assert_eq!(child.name, "child");
        assert_eq!(
            (call.name.as_str(), call.kind, child.kind),
            ("call", 2, 1),
            "otel.kind sets a server span"
        );
        assert!(child.start_time_unix_nano > 0);
        assert!(child.end_time_unix_nano >= child.start_time_unix_nano);
        assert!(call.start_time_unix_nano <= child.start_time_unix_nano);
        assert!(call.end_time_unix_nano >= child.end_time_unix_nano);
        assert_eq!(
            attributes(&child.attributes),
            [("n", any_value::Value::IntValue(3))]
        );
        assert_eq!(
            attributes(&call.attributes),
            [
                ("path", any_value::Value::StringValue("/x".into())),
                ("op", any_value::Value::StringValue("save".into())),
            ],
            "a field recorded after the span was made is kept"
        );
        let attribute = |attrs: &[KeyValue], key: &str| {
            attrs
                .iter()
                .find(|kv| kv.key == key)
                .and_then(|kv| kv.value.clone())
                .and_then(|v| v.value)
        };
        assert_eq!(
            child.status.as_ref().map(|s| (s.code, s.message.as_str())),
            Some((2, "it broke"))
        );
        assert!(call.status.is_none());
        let [event] = &child.events[..] else {
            panic!("one event: {child:?}");
        };
        assert_eq!(event.name, "it broke");
        assert_eq!(
            attribute(&event.attributes, "code"),
            Some(any_value::Value::IntValue(7))
        );
        assert_eq!(
            attribute(&event.attributes, "level"),
            Some(any_value::Value::StringValue("ERROR".into()))
        );
    }

    #[test]
    fn every_kind_of_attribute_value_is_encoded_as_otlp_reads_it() {
        let mut recording = Recording::new("s", 5);
        let values = [
            Value::Str("é and 128 more: ".to_string() + &"x".repeat(128)),
            Value::Str(String::new()),
            Value::Int(0),
            Value::Int(-1),
            Value::Int(i64::MAX),
            Value::Int(i64::MIN),
            Value::Float(-2.5),
            Value::Bool(true),
            Value::Bool(false),
        ];
        const KEYS: [&str; 9] = ["s", "empty", "zero", "minus", "max", "min", "f", "t", "no"];
        for (k, v) in KEYS.iter().zip(&values) {
            recording.set(k, v.clone());
        }
        recording.dropped_events = 300;
        let span = Finished {
            cx: TraceContext {
                trace_id: u128::MAX,
                span_id: u64::MAX,
                sampled: true,
            },
            parent: 0,
            remote_parent: false,
            end: 3,
            body: Body::Recorded(recording),
        };
        let request = exported(vec![span]);
        let [resource_spans] = &request.resource_spans[..] else {
            panic!("one resource: {request:?}");
        };
        assert_eq!(
            attributes(
                &resource_spans
                    .resource
                    .as_ref()
                    .expect("resource")
                    .attributes
            ),
            [("service.name", any_value::Value::StringValue("svc".into()))]
        );
        let scope_spans = &resource_spans.scope_spans[0];
        assert_eq!(
            scope_spans.scope.as_ref().map(|s| s.name.as_str()),
            Some("svc")
        );
        let got = &scope_spans.spans[0];
        assert!(got.parent_span_id.is_empty(), "a root has no parent");
        assert_eq!(got.trace_id, [0xff; 16]);
        assert_eq!(got.dropped_events_count, 300);
        assert_eq!(
            (got.start_time_unix_nano, got.end_time_unix_nano),
            (5, 5),
            "an end before the start is the start"
        );
        let want: Vec<any_value::Value> = values
            .iter()
            .map(|v| match v {
                Value::Str(s) => any_value::Value::StringValue(s.clone()),
                Value::Int(i) => any_value::Value::IntValue(*i),
                Value::Float(f) => any_value::Value::DoubleValue(*f),
                Value::Bool(b) => any_value::Value::BoolValue(*b),
            })
            .collect();
        let got: Vec<(&str, any_value::Value)> = got
            .attributes
            .iter()
            .map(|kv| {
                (
                    kv.key.as_str(),
                    kv.value.clone().and_then(|v| v.value).expect("a value"),
                )
            })
            .collect();
        assert_eq!(got, KEYS.into_iter().zip(want).collect::<Vec<_>>());
    }

    #[test]
    fn what_is_not_sampled_is_passed_on_and_not_recorded() {
        let unsampled = INCOMING.replace("-01", "-00");
        let mut seen = String::new();
        let spans = recorded(ALWAYS_ON, || {
            let span = span_in(&unsampled, || tracing::info_span!("call"));
            let _in = span.enter();
            seen = current_traceparent();
        });
        assert!(spans.is_empty(), "{spans:?}");
        assert!(seen.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && seen.ends_with("-00"));
        let spans = recorded(
            Sampler {
                parent_based: true,
                root: Root::Off,
            },
            || {
                let _root = tracing::info_span!("root").entered();
                assert!(
                    current_traceparent().ends_with("-00"),
                    "a new trace, not sampled"
                );
            },
        );
        assert!(spans.is_empty());
        // Ids only: the flag of the caller is passed on, nothing is recorded.
        let subscriber = tracing_subscriber::registry().with(TraceLayer::ids_only());
        tracing::subscriber::with_default(subscriber, || {
            let span = span_in(INCOMING, || tracing::info_span!("call"));
            let _in = span.enter();
            assert!(current_traceparent().ends_with("-01"));
        });
    }

    #[test]
    fn a_reactor_records_a_span_only_for_an_event_it_uses_or_passes_on() {
        use nsml_eventstore::StoredEvent;
        use nsml_proto::v1::{SessionExited, SessionFailed};
        let queue = Arc::new(Queue::new(100, 100));
        let recorder = (ALWAYS_ON, queue.clone());
        let mut ev = crate::event::stored("session-t", 1, &SessionExited::default());
        ev.metadata.traceparent = INCOMING.to_string();
        let ev = Arc::new(ev);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        let handle = |consumer, f: fn(&StoredEvent) -> String| {
            rt.block_on(super::handling_for(Some(&recorder), consumer, &ev, async {
                tokio::task::yield_now().await;
                f(&ev)
            }))
        };
        handle("skips", |ev| {
            assert!(crate::event::decode::<SessionFailed>(ev).is_none());
            String::new()
        });
        handle("decodes", |ev| {
            assert!(crate::event::decode::<SessionExited>(ev).is_some());
            String::new()
        });
        let passed = handle("appends", |_| current_traceparent());
        let spans = spans_of(&request_of(&queue.take()));
        let consumers: Vec<any_value::Value> = spans
            .iter()
            .map(|s| {
                assert_eq!(s.name, "apply");
                attributes(&s.attributes)[0].1.clone()
            })
            .collect();
        assert_eq!(
            consumers,
            [
                any_value::Value::StringValue("decodes".into()),
                any_value::Value::StringValue("appends".into())
            ]
        );
        for s in &spans {
            assert_eq!(
                s.trace_id,
                0x4bf92f3577b34da6a3ce929d0e0e4736u128.to_be_bytes()
            );
            assert_eq!(
                s.parent_span_id,
                0x00f067aa0ba902b7u64.to_be_bytes(),
                "the event's span is the parent"
            );
            assert_eq!(s.flags, 0x301, "sampled, parent in another process");
        }
        assert_eq!(
            passed,
            traceparent_of(&spans[1]),
            "what the handler appends names its span as parent"
        );
        assert_eq!(
            attributes(&spans[0].attributes),
            [
                ("consumer", any_value::Value::StringValue("decodes".into())),
                (
                    "event",
                    any_value::Value::StringValue(ev.event_type.clone())
                ),
                ("position", any_value::Value::IntValue(1)),
            ]
        );
        // An unsampled trace is passed on as it came, and nothing is recorded.
        let mut unsampled = (*ev).clone();
        unsampled.metadata.traceparent = INCOMING.replace("-01", "-00");
        let unsampled = Arc::new(unsampled);
        let passed = rt.block_on(super::handling_for(
            Some(&recorder),
            "appends",
            &unsampled,
            async { current_traceparent() },
        ));
        assert_eq!(passed, unsampled.metadata.traceparent);
        assert!(queue.take().is_empty());
        // Without a recorder (export off) the handler runs and nothing is made.
        let out = rt.block_on(super::handling_for(None, "off", &ev, async {
            current_traceparent()
        }));
        assert_eq!(out, "");
    }

    #[test]
    fn a_full_queue_drops_spans_and_counts_them() {
        let queue = Queue::new(3, 2);
        let span = |n: u64| Finished {
            cx: TraceContext {
                trace_id: 1,
                span_id: n,
                sampled: true,
            },
            parent: 0,
            remote_parent: false,
            end: n,
            body: Body::Recorded(Recording::new("s", 0)),
        };
        for n in 1..=5 {
            queue.push(span(n));
        }
        assert_eq!(queue.dropped(), 2);
        assert_eq!(queue.len(), 3);
        let ids = |batch: &Batch| {
            spans_of(&request_of(batch))
                .iter()
                .map(|s| u64::from_be_bytes(s.span_id[..].try_into().expect("8 bytes")))
                .collect::<Vec<_>>()
        };
        let first = queue.take();
        assert_eq!(first.spans, 2);
        assert_eq!(ids(&first), [1, 2], "a batch at a time, oldest first");
        // A sent batch's buffer comes back empty and is filled again.
        queue.recycle(first.bytes);
        let rest = queue.take();
        assert_eq!(ids(&rest), [3]);
        queue.recycle(rest.bytes);
        assert!(queue.take().is_empty());
        assert!(queue.is_empty());
        for n in 6..=9 {
            queue.push(span(n));
        }
        assert_eq!(ids(&queue.take()), [6, 7]);
        assert_eq!(ids(&queue.take()), [8]);
        assert_eq!(queue.dropped(), 3);
        assert!(queue.take().is_empty());
    }

    #[test]
    fn json_lines_carry_the_trace_and_span_ids_of_the_current_span() {
        let out = Captured::default();
        let subscriber = tracing_subscriber::registry()
            .with(TraceLayer::ids_only())
            .with(log_layer(true, out.clone(), false));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside any span");
            let span = span_from_headers(&headers(INCOMING), || {
                tracing::info_span!("call", path = "/x")
            });
            let _entered = span.enter();
            tracing::info!(answer = 42, "inside a span");
        });
        let text = out.text();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].get("trace_id").is_none(),
            "no span, no trace: {}",
            lines[0]
        );
        let inside = &lines[1];
        assert_eq!(inside["fields"]["message"], "inside a span");
        assert_eq!(inside["fields"]["answer"], 42);
        assert_eq!(inside["span"]["path"], "/x");
        assert_eq!(inside["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        let span_id = inside["span_id"].as_str().expect("a span id");
        assert_eq!(span_id.len(), 16);
        assert_ne!(
            span_id, "00f067aa0ba902b7",
            "the span's own id, not its parent's"
        );
        assert!(!text.contains('\u{1b}'), "no ANSI codes: {text}");
    }

    #[test]
    fn ansi_codes_only_for_a_terminal() {
        let file = tempfile::tempfile().expect("a file");
        assert!(
            !std::io::IsTerminal::is_terminal(&file),
            "a file is not a terminal"
        );
        for json in [false, true] {
            let plain = Captured::default();
            let subscriber =
                tracing_subscriber::registry().with(log_layer(json, plain.clone(), false));
            tracing::subscriber::with_default(subscriber, || tracing::warn!(n = 1, "to a file"));
            assert!(plain.text().contains("to a file"));
            assert!(!plain.text().contains('\u{1b}'), "{}", plain.text());
        }
        // The same line to a terminal is coloured, so the check above can fail.
        let coloured = Captured::default();
        let subscriber =
            tracing_subscriber::registry().with(log_layer(false, coloured.clone(), true));
        tracing::subscriber::with_default(subscriber, || tracing::warn!(n = 1, "to a terminal"));
        assert!(coloured.text().contains('\u{1b}'), "{}", coloured.text());
    }
}
