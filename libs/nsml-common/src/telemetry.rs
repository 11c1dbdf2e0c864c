//! Tracing set-up: logs, OTLP export of spans, and W3C trace context carried across gRPC metadata, bus headers
//! and the events of the log.
//!
//! Export follows the OpenTelemetry SDK's standard variables and is off unless they ask for it:
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or `OTEL_TRACES_EXPORTER=otlp` for
//! the default `http://localhost:4317`) turns it on; `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`
//! keep it off. Spans go over OTLP/gRPC; `OTEL_EXPORTER_OTLP_PROTOCOL` may say `grpc`, any other protocol is
//! refused with a warning. `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` (with
//! `OTEL_TRACES_SAMPLER_ARG`), `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT` and the `OTEL_BSP_*`
//! batching variables are read by the SDK as documented there.
//!
//! Read models and reactors open a span per event they apply, in the trace that appended it, when that trace
//! is sampled; `NSML_TRACE_EVENTS=off` leaves those spans out (they are most of a trace's spans).
//!
//! With export off and JSON logs, spans still get trace ids (log lines carry them, calls and events pass them
//! on) but none is sampled, so nothing is recorded. With export off and text logs, which show no trace ids,
//! no OpenTelemetry layer is installed at all: a trace context a caller sends still reaches the service the
//! gateway forwards to, and nothing else is spent on traces. `NSML_TRACING=off` installs no OpenTelemetry
//! layer whatever else is set (the baseline the tracing-cost bench compares with).

use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use nsml_eventstore::StoredEvent;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt as _, TraceFlags, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Subscriber;
use tracing::dispatcher::{Dispatch, WeakDispatch};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::{Format, Json, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// Whether consumers of the log open a span per applied event: only when this process exports spans (and
/// `NSML_TRACE_EVENTS=off` does not say otherwise).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// What the environment asks of span export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Export {
    /// No OpenTelemetry layer at all (`NSML_TRACING=off`).
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

/// The installed tracing: call [`Telemetry::shutdown`] before the process exits, or the spans still batched
/// are lost.
#[must_use = "spans batched for export are lost unless `shutdown` is called before exit"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still batched and stops the exporter. The export runs on a blocking thread while
    /// this runtime drives the gRPC connection it uses.
    pub async fn shutdown(mut self) {
        let Some(provider) = self.provider.take() else {
            return;
        };
        EXPORTING.store(false, Ordering::Relaxed);
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(err)) => eprintln!("cannot export the last spans: {err}"),
            Err(err) => eprintln!("cannot export the last spans: {err}"),
        }
    }
}

/// Installs the global subscriber: human-readable (or JSON lines with `NSML_LOG_FORMAT=json`) logs on stderr
/// filtered by `NSML_LOG` (default `info`), coloured only when stderr is a terminal, and OpenTelemetry spans
/// exported as the `OTEL_*` variables say (see the module's documentation). `service` is the service name
/// spans are exported under unless `OTEL_SERVICE_NAME` names one. Call from within a Tokio runtime: the
/// exporter's connection lives on it.
pub fn init(service: &str) -> Telemetry {
    let (level, filter) = log_filter(std::env::var("NSML_LOG").ok().as_deref());
    let export = Export::from_vars(|k| std::env::var(k).ok());
    let json = std::env::var("NSML_LOG_FORMAT").is_ok_and(|v| v == "json");
    let (provider, note) = match &export {
        Export::NoTracing => (None, None),
        // Trace ids only for the log lines that show them.
        Export::Off(note) => (json.then(unsampled), note.clone()),
        Export::Otlp => match exporting(service) {
            Ok(p) => (Some(p), None),
            Err(err) => (
                Some(unsampled()),
                Some(format!("cannot export spans: {err}")),
            ),
        },
    };
    let exported = matches!(export, Export::Otlp) && note.is_none();
    let otel = provider.as_ref().map(|p| {
        // Busy/idle timings, thread attributes and source locations would cost a clock read on every poll of
        // every instrumented future and an allocation per span; activating each span's context in
        // OpenTelemetry's own thread-local on every entry is not needed either, as trace context is read
        // from the span (see `current_traceparent`).
        tracing_opentelemetry::layer()
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
            .with_context_activation(false)
            .with_tracer(p.tracer(service.to_string()))
    });
    let ansi = std::io::stderr().is_terminal();
    let result = tracing_subscriber::registry()
        .with(level)
        .with(filter)
        .with(otel)
        .with(log_layer(json, std::io::stderr, ansi))
        .try_init();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    if result.is_err() {
        // A second init in one process (tests) keeps the first subscriber and its exporter.
        return Telemetry { provider: None };
    }
    if let Some(note) = note {
        tracing::warn!("{note}");
    }
    // Consumers of the log open a span per event they apply: most of the spans of a trace, since every read
    // model and reactor of a process applies every event. `NSML_TRACE_EVENTS=off` leaves them out.
    let events = !std::env::var("NSML_TRACE_EVENTS").is_ok_and(|v| v.eq_ignore_ascii_case("off"));
    EXPORTING.store(exported && events, Ordering::Relaxed);
    Telemetry {
        provider: provider.filter(|_| exported),
    }
}

/// A provider that makes trace ids and records nothing.
fn unsampled() -> SdkTracerProvider {
    SdkTracerProvider::builder()
        .with_sampler(Sampler::AlwaysOff)
        .build()
}

/// A provider that batches spans to the OTLP/gRPC endpoint the environment names.
fn exporting(service: &str) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_string());
    }
    Ok(SdkTracerProvider::builder()
        .with_resource(resource.build())
        .with_batch_exporter(exporter)
        .build())
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
        let dispatch = Arc::new(OnceLock::new());
        Box::new(
            KeepDispatch(dispatch.clone()).and_then(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .fmt_fields(JsonFields::new())
                    .event_format(TracedJson {
                        format: tracing_subscriber::fmt::format().json(),
                        dispatch,
                    })
                    .with_writer(writer),
            ),
        )
    } else {
        Box::new(
            tracing_subscriber::fmt::layer()
                .with_ansi(ansi)
                .with_writer(writer),
        )
    }
}

/// Keeps the dispatcher the layers are registered with: while an event is formatted, the thread's current
/// dispatcher is not reachable (tracing guards against re-entry), and the span's OpenTelemetry context is read
/// through it.
struct KeepDispatch(Arc<OnceLock<WeakDispatch>>);

impl<S: Subscriber> tracing_subscriber::Layer<S> for KeepDispatch {
    fn on_register_dispatch(&self, dispatch: &Dispatch) {
        let _ = self.0.set(dispatch.downgrade());
    }
}

/// The JSON line format of `tracing_subscriber`, with the trace and span ids of the event's span added.
struct TracedJson {
    format: Format<Json>,
    dispatch: Arc<OnceLock<WeakDispatch>>,
}

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
        self.format
            .format_event(ctx, Writer::new(&mut line), event)?;
        let ids = ctx.parent_span().and_then(|span| {
            let dispatch = self.dispatch.get()?.upgrade()?;
            let cx =
                tracing_opentelemetry::get_otel_context(&mut span.extensions_mut(), &dispatch)?;
            let span = cx.span();
            let sc = span.span_context();
            sc.is_valid().then(|| (sc.trace_id(), sc.span_id()))
        });
        match (ids, line.strip_suffix("}\n")) {
            (Some((trace_id, span_id)), Some(head)) => writeln!(
                writer,
                "{head},\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"}}"
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

struct HeaderCarrier<'a>(&'a http::HeaderMap);

impl Extractor for HeaderCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// A lone `traceparent` value, as events carry it.
struct TraceparentCarrier<'a>(&'a str);

impl Extractor for TraceparentCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// The current span's W3C `traceparent`, or empty when there is none. Every event and every call between
/// services takes one, so it is written directly rather than through [`TraceContextPropagator`], which also
/// builds the `tracestate` header and a map to carry both (this function took about 3% of `nsmld up`'s CPU under
/// the admissions bench that way).
pub fn current_traceparent() -> String {
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let span = span.span_context();
    if !span.is_valid() {
        return String::new();
    }
    let flags = span.trace_flags() & TraceFlags::SAMPLED;
    format!(
        "00-{}-{}-{:02x}",
        span.trace_id(),
        span.span_id(),
        flags.to_u8()
    )
}

/// Makes `span` a child of the trace context carried in `headers`, if any.
pub fn set_parent_from_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    if headers.contains_key("traceparent") {
        let cx = TraceContextPropagator::new().extract(&HeaderCarrier(headers));
        let _ = span.set_parent(cx);
    }
}

/// Makes `span` a child of a W3C `traceparent` value (a session's, an event's), if it holds one.
pub fn set_parent_from_traceparent(span: &tracing::Span, traceparent: &str) {
    if !traceparent.is_empty() {
        let cx = TraceContextPropagator::new().extract(&TraceparentCarrier(traceparent));
        let _ = span.set_parent(cx);
    }
}

/// Whether a `traceparent` says its trace is sampled (`…-01`).
fn sampled(traceparent: &str) -> bool {
    traceparent.len() == 55
        && traceparent
            .get(53..)
            .and_then(|flags| u8::from_str_radix(flags, 16).ok())
            .is_some_and(|flags| flags & 1 == 1)
}

/// A span for a consumer of the log (`consumer`: a projection's or reactor's name) applying `event`, parented
/// to the trace the event was appended in; `None` unless this process exports spans and that trace is
/// sampled, so that following the log costs nothing more otherwise.
pub fn event_span(consumer: &'static str, event: &StoredEvent) -> Option<tracing::Span> {
    if !EXPORTING.load(Ordering::Relaxed) || !sampled(&event.metadata.traceparent) {
        return None;
    }
    let span = tracing::info_span!(
        parent: None,
        "apply",
        consumer,
        event = %event.event_type,
        position = event.position
    );
    set_parent_from_traceparent(&span, &event.metadata.traceparent);
    Some(span)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use opentelemetry::propagation::{Injector, TextMapPropagator};
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::layer::SubscriberExt;

    use super::{Export, current_traceparent, log_layer, sampled, set_parent_from_headers};

    struct MapCarrier<'a>(&'a mut HashMap<String, String>);

    impl Injector for MapCarrier<'_> {
        fn set(&mut self, key: &str, value: String) {
            self.0.insert(key.to_string(), value);
        }
    }

    /// What the propagator writes for the current span.
    fn propagated() -> String {
        let cx = tracing::Span::current().context();
        let mut map = HashMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut MapCarrier(&mut map));
        map.remove("traceparent").unwrap_or_default()
    }

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
    fn sampled_reads_the_flags() {
        assert!(sampled(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!sampled(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
        ));
        assert!(!sampled(""));
        assert!(!sampled("00-4bf9-01"));
    }

    #[test]
    fn traceparent_is_what_the_propagator_writes() {
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            assert_eq!(current_traceparent(), "", "no span, no trace");
            let mut headers = http::HeaderMap::new();
            let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
            headers.insert("traceparent", incoming.parse().expect("header"));
            let span = tracing::info_span!("call");
            set_parent_from_headers(&span, &headers);
            let _entered = span.enter();
            let ours = current_traceparent();
            assert_eq!(ours, propagated());
            assert!(
                ours.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && ours.ends_with("-01"),
                "the span continues the incoming trace: {ours}"
            );
            let child = tracing::info_span!("child");
            let _child = child.enter();
            assert_eq!(current_traceparent(), propagated());
            assert_ne!(
                current_traceparent(),
                ours,
                "a child span has an id of its own"
            );
        });
    }

    #[test]
    fn json_lines_carry_the_trace_and_span_ids_of_the_current_span() {
        let out = Captured::default();
        let provider = super::unsampled();
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_opentelemetry::layer()
                    .with_context_activation(false)
                    .with_tracer(provider.tracer("test")),
            )
            .with(log_layer(true, out.clone(), false));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside any span");
            let mut headers = http::HeaderMap::new();
            let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
            headers.insert("traceparent", incoming.parse().expect("header"));
            let span = tracing::info_span!("call", path = "/x");
            set_parent_from_headers(&span, &headers);
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
