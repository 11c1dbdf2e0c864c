//! Tracing set-up and W3C trace context carried across gRPC metadata and bus headers.

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt as _, TraceFlags, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the global subscriber: human-readable (or JSON with `NSML_LOG_FORMAT=json`) logs filtered by
/// `NSML_LOG` (default `info`), with OpenTelemetry span contexts so trace ids cross process boundaries.
pub fn init(service: &str) {
    let (level, filter) = log_filter(std::env::var("NSML_LOG").ok().as_deref());
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let tracer = provider.tracer(service.to_string());
    opentelemetry::global::set_tracer_provider(provider);
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // Busy/idle timings and thread attributes would cost a clock read on every poll of every instrumented future
    // and an allocation per span; trace ids and parentage are what the platform carries across processes.
    let otel = tracing_opentelemetry::layer()
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_tracer(tracer);
    let json = std::env::var("NSML_LOG_FORMAT").is_ok_and(|v| v == "json");
    let registry = tracing_subscriber::registry()
        .with(level)
        .with(filter)
        .with(otel);
    let result = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init()
    };
    // A second init in one process (tests, embedded mode) keeps the first subscriber.
    let _ = result;
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
        span.set_parent(cx);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use opentelemetry::propagation::{Injector, TextMapPropagator};
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::layer::SubscriberExt;

    use super::{current_traceparent, set_parent_from_headers};

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
}
