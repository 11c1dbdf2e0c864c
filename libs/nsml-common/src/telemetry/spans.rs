//! The layer that gives every span its place in a W3C trace (the ids that log lines show and that calls and
//! events pass on) and records the sampled ones for export.
//!
//! A span's context is a trace id, a span id and the sampled flag, kept in the span's extensions. A sampled
//! span, when this process exports, also keeps its name, fields, start time and the log events inside it,
//! until it closes and goes to the exporter's queue. Nothing else is done per span: no per-poll timings, no
//! thread or source attributes, no context kept beside the span. A span that is not sampled costs an id and
//! an extension.

use std::cell::Cell;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rand::Rng as _;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use nsml_eventstore::StoredEvent;

use super::export::Queue;

/// The most log events kept per span; later ones are counted as dropped.
const MAX_EVENTS: usize = 64;
/// The most attributes kept per span.
const MAX_ATTRIBUTES: usize = 32;

/// A span's place in a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
}

impl TraceContext {
    /// Reads a W3C `traceparent` (`00-<trace id>-<span id>-<flags>`); `None` for anything malformed, an
    /// all-zero id, or version `ff`.
    pub fn parse(traceparent: &str) -> Option<Self> {
        // Read on every event every consumer of the log handles: bytes, no allocation, no second pass.
        let tp = traceparent.trim().as_bytes();
        let version = hex(tp.get(..2)?)?;
        // Version 00 is exactly 55 characters; a later version may append fields after a dash.
        let fits = match version {
            0 => tp.len() == 55,
            0xff => false,
            _ => tp.len() == 55 || tp.get(55) == Some(&b'-'),
        };
        if !fits || tp[2] != b'-' || tp[35] != b'-' || tp[52] != b'-' {
            return None;
        }
        let trace_id = (u128::from(hex(&tp[3..19])?) << 64) | u128::from(hex(&tp[19..35])?);
        let span_id = hex(&tp[36..52])?;
        let flags = hex(&tp[53..55])?;
        (trace_id != 0 && span_id != 0).then_some(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The W3C `traceparent` of this context.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }
}

/// Each byte's value as a hex digit, or `INVALID`.
const HEX: [u8; 256] = {
    let mut table = [INVALID; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        table[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};
const INVALID: u8 = 0x80;

/// The value of at most 16 hex digits: a table lookup per digit, one check at the end (every consumer of the
/// log reads the context of the events it uses).
fn hex(digits: &[u8]) -> Option<u64> {
    let mut value = 0u64;
    let mut seen = 0u8;
    for &d in digits {
        let v = HEX[usize::from(d)];
        seen |= v;
        value = (value << 4) | u64::from(v & 0x0f);
    }
    (seen & INVALID == 0).then_some(value)
}

/// A new trace id: random and never zero.
fn new_trace_id() -> u128 {
    rand::thread_rng().gen_range(1..=u128::MAX)
}

/// A new span id: random and never zero.
pub(super) fn new_span_id() -> u64 {
    rand::thread_rng().gen_range(1..=u64::MAX)
}

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// How a trace without a parent is sampled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Root {
    On,
    Off,
    /// A fraction of the traces, chosen by trace id so that every process agrees.
    Ratio(f64),
}

/// Which spans are sampled, as `OTEL_TRACES_SAMPLER` names it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    /// Whether a span with a parent follows the parent's decision (the `parentbased_*` samplers).
    pub parent_based: bool,
    pub root: Root,
}

impl Sampler {
    /// Whether a span of `trace_id` whose parent (if any) was `parent_sampled` is sampled.
    pub fn decide(&self, parent_sampled: Option<bool>, trace_id: u128) -> bool {
        match (self.parent_based, parent_sampled) {
            (true, Some(parent)) => parent,
            _ => match self.root {
                Root::On => true,
                Root::Off => false,
                Root::Ratio(r) if r >= 1.0 => true,
                Root::Ratio(r) if r > 0.0 => {
                    // The trace id's low 63 bits against the ratio of 2^63, as the OpenTelemetry SDKs do.
                    let low = (trace_id as u64) >> 1;
                    (low as f64) < r * (1u64 << 63) as f64
                }
                Root::Ratio(_) => false,
            },
        }
    }

    /// The context of a span made as a child of `parent` (an event's, a call's): a new sampled span of the
    /// parent's trace when this sampler samples it, else the parent's context, passed on unsampled.
    pub fn child_of(&self, parent: TraceContext) -> TraceContext {
        if self.decide(Some(parent.sampled), parent.trace_id) {
            TraceContext {
                span_id: new_span_id(),
                sampled: true,
                ..parent
            }
        } else {
            TraceContext {
                sampled: false,
                ..parent
            }
        }
    }

    /// Reads `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` (the default is `parentbased_always_on`); an
    /// unknown sampler or a bad ratio falls back to the default with a note saying so.
    pub fn from_vars(sampler: Option<&str>, arg: Option<&str>) -> (Self, Option<String>) {
        const DEFAULT: Sampler = Sampler {
            parent_based: true,
            root: Root::On,
        };
        let name = sampler.map(|s| s.trim().to_ascii_lowercase());
        let ratio = || {
            match arg.map(str::trim).filter(|a| !a.is_empty()) {
            None => Ok(1.0),
            Some(a) => a
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| {
                    format!(
                        "OTEL_TRACES_SAMPLER_ARG=`{a}` is not a ratio between 0 and 1; sampling every trace"
                    )
                }),
        }
        };
        let (parent_based, root) = match name.as_deref() {
            None | Some("") | Some("parentbased_always_on") => (true, Root::On),
            Some("always_on") => (false, Root::On),
            Some("always_off") => (false, Root::Off),
            Some("parentbased_always_off") => (true, Root::Off),
            Some(s @ ("traceidratio" | "parentbased_traceidratio")) => match ratio() {
                Ok(r) => (s.starts_with("parentbased"), Root::Ratio(r)),
                Err(note) => return (DEFAULT, Some(note)),
            },
            Some(other) => {
                return (
                    DEFAULT,
                    Some(format!(
                        "OTEL_TRACES_SAMPLER=`{other}` is not supported (always_on, always_off, traceidratio and \
                         their parentbased_ forms are); using parentbased_always_on"
                    )),
                );
            }
        };
        (Self { parent_based, root }, None)
    }
}

/// An attribute's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

/// A log event inside a recorded span.
#[derive(Debug, Clone)]
pub struct Logged {
    pub at: u64,
    pub message: String,
    pub level: Level,
    pub attributes: Vec<(&'static str, Value)>,
}

/// What is exported of a span: kept while it is open, queued when it closes.
#[derive(Debug)]
pub struct Recording {
    pub name: &'static str,
    /// OTLP's span kind: 1 internal, 2 server, 3 client (`otel.kind` among the span's fields sets it).
    pub kind: i32,
    pub start: u64,
    pub attributes: Vec<(&'static str, Value)>,
    pub events: Vec<Logged>,
    pub dropped_events: u32,
    /// The message of the first error logged inside the span: its status.
    pub error: Option<String>,
}

impl Recording {
    pub fn new(name: &'static str, start: u64) -> Self {
        Self::with_room(name, start, 0)
    }

    /// A recording with room for `fields` attributes, so that recording them allocates once.
    pub fn with_room(name: &'static str, start: u64, fields: usize) -> Self {
        Self {
            name,
            kind: 1,
            start,
            attributes: Vec::with_capacity(fields.min(MAX_ATTRIBUTES)),
            events: Vec::new(),
            dropped_events: 0,
            error: None,
        }
    }

    pub fn set(&mut self, key: &'static str, value: Value) {
        if key == "otel.kind" {
            if let Value::Str(kind) = &value {
                let is = |k: &str| kind.eq_ignore_ascii_case(k);
                self.kind = if is("server") {
                    2
                } else if is("client") {
                    3
                } else if is("producer") {
                    4
                } else if is("consumer") {
                    5
                } else {
                    1
                };
            }
            return;
        }
        set_attribute(&mut self.attributes, key, value);
    }
}

fn set_attribute(attrs: &mut Vec<(&'static str, Value)>, key: &'static str, value: Value) {
    if let Some(slot) = attrs.iter_mut().find(|(k, _)| *k == key) {
        slot.1 = value;
    } else if attrs.len() < MAX_ATTRIBUTES {
        attrs.push((key, value));
    }
}

/// A closed span, as the exporter's queue takes it (and encodes it at once).
#[derive(Debug)]
pub struct Finished {
    pub cx: TraceContext,
    /// The parent's span id, 0 for a root.
    pub parent: u64,
    pub remote_parent: bool,
    pub end: u64,
    pub body: Body,
}

/// What a closed span holds besides its place in the trace.
#[derive(Debug)]
pub enum Body {
    /// A `tracing` span the layer recorded.
    Recorded(Recording),
    /// A consumer of the log (a read model, a reactor) applying one event, recorded without a `tracing` span:
    /// its attributes (the consumer, the event's type and position) are read off the event when it is encoded.
    Applied {
        consumer: &'static str,
        event: Arc<StoredEvent>,
        start: u64,
    },
}

impl Finished {
    /// The span's name.
    pub fn name(&self) -> &'static str {
        match &self.body {
            Body::Recorded(r) => r.name,
            Body::Applied { .. } => "apply",
        }
    }

    /// When the span started (ns since the Unix epoch).
    pub fn start(&self) -> u64 {
        match &self.body {
            Body::Recorded(r) => r.start,
            Body::Applied { start, .. } => *start,
        }
    }

    /// The recording of a `tracing` span.
    pub fn recording(&self) -> Option<&Recording> {
        match &self.body {
            Body::Recorded(r) => Some(r),
            Body::Applied { .. } => None,
        }
    }
}

/// What a span keeps in its extensions.
pub(super) struct SpanState {
    pub(super) cx: TraceContext,
    parent: u64,
    remote_parent: bool,
    pub(super) recording: Option<Recording>,
}

thread_local! {
    /// A context from another process that the next span made on this thread continues (see
    /// [`super::span_in`]).
    static REMOTE_PARENT: Cell<Option<TraceContext>> = const { Cell::new(None) };
}

/// Makes the span `make` returns a child of `remote`, when that is a context.
pub(super) fn with_remote_parent(
    remote: Option<TraceContext>,
    make: impl FnOnce() -> tracing::Span,
) -> tracing::Span {
    if remote.is_none() {
        return make();
    }
    REMOTE_PARENT.with(|r| r.set(remote));
    let span = make();
    // A span the filters turned away never took it.
    REMOTE_PARENT.with(|r| r.set(None));
    span
}

/// Makes every span's context and records the sampled ones for `queue` (none: ids only, nothing recorded).
pub struct TraceLayer {
    sampler: Sampler,
    queue: Option<Arc<Queue>>,
}

impl TraceLayer {
    /// Trace ids for log lines and for passing on, nothing recorded: a parent's sampled flag is passed on
    /// as it came, so a process that does not export does not cut a trace that others export.
    pub fn ids_only() -> Self {
        Self {
            sampler: Sampler {
                parent_based: true,
                root: Root::Off,
            },
            queue: None,
        }
    }

    /// Records the spans `sampler` samples into `queue`.
    pub fn recording(sampler: Sampler, queue: Arc<Queue>) -> Self {
        Self {
            sampler,
            queue: Some(queue),
        }
    }
}

impl<S> tracing_subscriber::Layer<S> for TraceLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let (parent, remote_parent) = match REMOTE_PARENT.with(Cell::take) {
            Some(remote) => (Some(remote), true),
            None => (
                span.parent()
                    .and_then(|p| p.extensions().get::<SpanState>().map(|s| s.cx)),
                false,
            ),
        };
        let trace_id = parent.map_or_else(new_trace_id, |p| p.trace_id);
        let sampled = self.sampler.decide(parent.map(|p| p.sampled), trace_id);
        let recording =
            (sampled && self.queue.is_some() && !super::export::suppressed()).then(|| {
                let fields = attrs.metadata().fields();
                let mut r = Recording::with_room(attrs.metadata().name(), now_ns(), fields.len());
                attrs.record(&mut Fields(&mut r));
                r
            });
        span.extensions_mut().insert(SpanState {
            cx: TraceContext {
                trace_id,
                span_id: new_span_id(),
                sampled,
            },
            parent: parent.map_or(0, |p| p.span_id),
            remote_parent,
            recording,
        });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut ext = span.extensions_mut();
        if let Some(r) = ext
            .get_mut::<SpanState>()
            .and_then(|s| s.recording.as_mut())
        {
            values.record(&mut Fields(r));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if self.queue.is_none() {
            return;
        }
        let Some(span) = ctx.event_span(event) else {
            return;
        };
        let mut ext = span.extensions_mut();
        let Some(r) = ext
            .get_mut::<SpanState>()
            .and_then(|s| s.recording.as_mut())
        else {
            return;
        };
        let level = *event.metadata().level();
        if r.events.len() >= MAX_EVENTS {
            r.dropped_events += 1;
            return;
        }
        let mut logged = Logged {
            at: now_ns(),
            message: String::new(),
            level,
            attributes: Vec::new(),
        };
        event.record(&mut EventFields(&mut logged));
        if level == Level::ERROR && r.error.is_none() {
            r.error = Some(logged.message.clone());
        }
        r.events.push(logged);
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(queue) = &self.queue else {
            return;
        };
        let Some(span) = ctx.span(&id) else {
            return;
        };
        let Some(state) = span.extensions_mut().remove::<SpanState>() else {
            return;
        };
        if let Some(recording) = state.recording {
            queue.push(Finished {
                cx: state.cx,
                parent: state.parent,
                remote_parent: state.remote_parent,
                end: now_ns(),
                body: Body::Recorded(recording),
            });
        }
    }
}

/// A span's fields into its recording.
struct Fields<'a>(&'a mut Recording);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.set(field.name(), Value::Str(value.to_string()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.set(field.name(), Value::Int(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.set(field.name(), int_or_text(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.set(field.name(), Value::Float(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.set(field.name(), Value::Bool(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.set(field.name(), Value::Str(format!("{value:?}")));
    }
}

/// A log event's fields: its message, and the rest as attributes.
struct EventFields<'a>(&'a mut Logged);

impl EventFields<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        if field.name() == "message" {
            self.0.message = match value {
                Value::Str(s) => s,
                other => format!("{other:?}"),
            };
        } else {
            set_attribute(&mut self.0.attributes, field.name(), value);
        }
    }
}

impl Visit for EventFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::Str(value.to_string()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::Int(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, int_or_text(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::Float(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, Value::Str(format!("{value:?}")));
    }
}

fn int_or_text(value: u64) -> Value {
    i64::try_from(value).map_or_else(|_| Value::Str(value.to_string()), Value::Int)
}

/// The context of the span the thread is in.
pub(super) fn current() -> Option<TraceContext> {
    tracing::dispatcher::get_default(|dispatch| {
        let current = dispatch.current_span();
        let id = current.id()?;
        let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
        let span = registry.span(id)?;
        let ext = span.extensions();
        ext.get::<SpanState>().map(|s| s.cx)
    })
}
