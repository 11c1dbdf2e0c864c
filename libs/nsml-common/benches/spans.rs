//! What tracing costs one admission's worth of spans in this process, with no network and no other process
//! on the cores: `cargo bench -p nsml-common --bench spans`.
//!
//! One "admission" here is what an admission refused by the quota does to spans in the embedded deployment:
//! the gateway's span, the session service's and the quota service's (each made from the caller's
//! `traceparent`, as the call's metadata carries it), two `traceparent`s taken for the events appended, and
//! four `apply` spans of read models decoding those events. Each setting runs the same loop: no tracing
//! layer; the layer making ids only (export off, JSON logs); the layer recording every span, encoded as it
//! closes, with the exporter's request made of each batch (the sending is not included). Rounds alternate the settings; the
//! medians of ns per admission are printed, and the difference from no layer.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use nsml_common::telemetry::export::{Encoding, Queue};
use nsml_common::telemetry::spans::{Root, now_ns};
use nsml_common::telemetry::{
    Sampler, TraceContext, TraceLayer, apply_span, current_traceparent, span_in,
};
use nsml_eventstore::{Metadata, StoredEvent};
use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::resource::v1::Resource;
use tracing_subscriber::layer::SubscriberExt;

const ADMISSIONS: usize = 20_000;
const ROUNDS: usize = 9;
const BATCH: usize = 512;
const ALWAYS: Sampler = Sampler {
    parent_based: true,
    root: Root::On,
};

fn event() -> Arc<StoredEvent> {
    Arc::new(StoredEvent {
        stream: "quota-ledger-demo-team".into(),
        version: 7,
        position: 1234,
        event_type: "nsml.v1.AdmissionDenied".into(),
        payload: vec![0; 120],
        metadata: Metadata {
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            ..Default::default()
        },
        hash: "0".repeat(64),
    })
}

/// One admission's spans; `queue` takes the apply spans when recording.
fn admission(incoming: &str, ev: &Arc<StoredEvent>, queue: Option<&Queue>) {
    let path = "/nsml.v1.SessionService/Run";
    let gateway = span_in(incoming, || tracing::info_span!("gateway", path = %path));
    let _g = gateway.enter();
    let to_session = current_traceparent();
    let session = span_in(&to_session, || tracing::info_span!("grpc", path = %path));
    let _s = session.enter();
    let to_quota = current_traceparent();
    let quota = span_in(&to_quota, || {
        tracing::info_span!("grpc", path = "/nsml.internal.v1.QuotaInternal/Admit")
    });
    let _q = quota.enter();
    black_box(current_traceparent());
    black_box(current_traceparent());
    let Some(queue) = queue else {
        return;
    };
    for consumer in ["quota", "session", "leaderboard", "submission"] {
        let start = now_ns();
        let Some(parent) = TraceContext::parse(&ev.metadata.traceparent) else {
            continue;
        };
        queue.push(apply_span(
            consumer,
            ev,
            parent,
            ALWAYS.child_of(parent),
            start,
        ));
    }
}

fn main() {
    let ev = event();
    let incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let encoding = Encoding::new(&Resource::default(), &InstrumentationScope::default());
    let names = ["no layer", "ids only", "100% recorded + encoded"];
    let mut figures: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut bytes = 0usize;
    for round in 0..ROUNDS {
        for k in 0..names.len() {
            let i = (round + k) % names.len();
            let queue = Arc::new(Queue::new(1 << 20, BATCH));
            let t = Instant::now();
            match i {
                0 => tracing::subscriber::with_default(tracing_subscriber::registry(), || {
                    for _ in 0..ADMISSIONS {
                        admission(incoming, &ev, None);
                    }
                }),
                1 => tracing::subscriber::with_default(
                    tracing_subscriber::registry().with(TraceLayer::ids_only()),
                    || {
                        for _ in 0..ADMISSIONS {
                            admission(incoming, &ev, None);
                        }
                    },
                ),
                _ => tracing::subscriber::with_default(
                    tracing_subscriber::registry()
                        .with(TraceLayer::recording(ALWAYS, queue.clone())),
                    || {
                        for n in 0..ADMISSIONS {
                            admission(incoming, &ev, Some(&queue));
                            if n % 64 == 63 {
                                let batch = queue.take();
                                bytes += encoding.request(&batch).len();
                                queue.recycle(batch.bytes);
                            }
                        }
                    },
                ),
            }
            figures[i].push(t.elapsed().as_nanos() as f64 / ADMISSIONS as f64);
        }
    }
    let median = |v: &Vec<f64>| {
        let mut v = v.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let base = median(&figures[0]);
    println!("spans bench: {ADMISSIONS} admissions x {ROUNDS} rounds, one thread, medians");
    for (name, f) in names.iter().zip(&figures) {
        let m = median(f);
        println!(
            "{name:<28} {m:>8.0} ns/admission  (+{:.0} ns over no layer)",
            m - base
        );
    }
    black_box(bytes);
}
