//! The trace of one command. When the standard OpenTelemetry variables ask for span export (as they do for the
//! platform's processes: `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or
//! `OTEL_TRACES_EXPORTER=otlp`; not with `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`), the command
//! is the root span of a trace, every call to the gateway carries its W3C `traceparent`, and the gateway, the
//! services, the runner and the scorer add their spans to that trace. The span is exported over OTLP/gRPC as
//! service `nsml-cli` (or `OTEL_SERVICE_NAME`) when the command ends.
//!
//! With export off the command sends no trace context: a platform that samples by its parent would otherwise
//! drop the spans of every call a command made without recording its own.

use std::sync::OnceLock;

use opentelemetry::trace::{Span as _, SpanKind, Status, Tracer as _, TracerProvider as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::metadata::{Ascii, MetadataValue};

/// The running command's `traceparent`, for every call it makes.
static TRACEPARENT: OnceLock<MetadataValue<Ascii>> = OnceLock::new();

/// The `traceparent` calls carry, when the command is traced.
pub fn traceparent() -> Option<&'static MetadataValue<Ascii>> {
    TRACEPARENT.get()
}

/// Whether the environment asks for span export over OTLP/gRPC; a protocol other than gRPC is refused with a
/// warning.
fn export_asked(var: impl Fn(&str) -> Option<String>) -> bool {
    let get = |k: &str| {
        var(k)
            .map(|v| v.trim().to_ascii_lowercase())
            .filter(|v| !v.is_empty())
    };
    if get("OTEL_SDK_DISABLED").as_deref() == Some("true") {
        return false;
    }
    let asked = match get("OTEL_TRACES_EXPORTER").as_deref() {
        None => {
            get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
                || get("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        }
        Some("otlp") => true,
        Some(_) => false,
    };
    if !asked {
        return false;
    }
    match get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| get("OTEL_EXPORTER_OTLP_PROTOCOL")) {
        None => true,
        Some(p) if p == "grpc" => true,
        Some(p) => {
            eprintln!(
                "Warning: OTEL_EXPORTER_OTLP_PROTOCOL=`{p}` is not supported: nsml exports spans over OTLP/gRPC only; \
                 not tracing this command"
            );
            false
        }
    }
}

/// The root span of a traced command.
pub struct CommandTrace {
    provider: SdkTracerProvider,
    span: opentelemetry_sdk::trace::Span,
}

/// Starts the command's trace if the environment asks for export; call within the runtime the command runs
/// on (the exporter's connection lives there).
pub fn start(command: &str) -> Option<CommandTrace> {
    if !export_asked(|k| std::env::var(k).ok()) {
        return None;
    }
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
    {
        Ok(exporter) => exporter,
        Err(e) => {
            eprintln!("Warning: cannot export spans: {e}");
            return None;
        }
    };
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("nsml-cli");
    }
    let provider = SdkTracerProvider::builder()
        .with_resource(resource.build())
        .with_batch_exporter(exporter)
        .build();
    let tracer = provider.tracer("nsml");
    let span = tracer
        .span_builder(format!("nsml {command}"))
        .with_kind(SpanKind::Client)
        .start(&tracer);
    let sc = span.span_context();
    let value = format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8() & 1
    );
    if let Ok(value) = value.parse() {
        let _ = TRACEPARENT.set(value);
    }
    Some(CommandTrace { provider, span })
}

impl CommandTrace {
    /// Ends the command's span (an error when the command failed) and exports it before the process exits.
    pub async fn finish(mut self, failed: Option<String>) {
        if let Some(why) = failed {
            self.span.set_status(Status::error(why));
        }
        self.span.end();
        let provider = self.provider;
        // The export blocks its thread while this runtime drives the connection.
        match tokio::task::spawn_blocking(move || provider.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("Warning: cannot export the command's spans: {e}"),
            Err(e) => eprintln!("Warning: cannot export the command's spans: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::export_asked;

    #[test]
    fn a_command_is_traced_only_when_export_is_asked_for() {
        let with = |pairs: &[(&str, &str)]| {
            let vars: HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            export_asked(|k| vars.get(k).cloned())
        };
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317");
        assert!(!with(&[]));
        assert!(with(&[endpoint]));
        assert!(with(&[("OTEL_TRACES_EXPORTER", "otlp")]));
        assert!(!with(&[endpoint, ("OTEL_SDK_DISABLED", "true")]));
        assert!(!with(&[endpoint, ("OTEL_TRACES_EXPORTER", "none")]));
        assert!(!with(&[
            endpoint,
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        ]));
        assert!(with(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]));
    }
}
