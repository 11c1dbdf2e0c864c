//! Traces: with the standard `OTEL_*` variables pointing at a collector (here the collector's own OTLP/gRPC
//! trace service, served by the test), one `nsml run` and one `nsml submit` each arrive as one trace across the
//! seven processes of the distributed deployment and the session's runner, every span's parent received in
//! the same trace, the CLI's span the one root.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use nsml_integration_tests::otlp::{ReceivedSpan, Receiver, orphans};
use nsml_integration_tests::{Deployment, FreshDb, drop_stream, eventually, repo_root, scenario};

/// Exporters batch, runners end with their sessions: spans may take a while to come in.
const WAIT: Duration = Duration::from_secs(180);

/// What one action's trace must hold.
struct Expect {
    /// The CLI's root span.
    root: &'static str,
    /// Services (`service.name`) with at least one span in the trace.
    services: &'static [&'static str],
    /// Span names that must appear, with the service that sends them.
    spans: &'static [(&'static str, &'static str)],
}

/// The trace whose root is the CLI's span named `root`, the last one sent.
fn trace_of(receiver: &Receiver, root: &str) -> anyhow::Result<String> {
    receiver
        .spans()
        .iter()
        .rev()
        .find(|s| s.service == "nsml-cli" && s.name == root && s.parent_span_id.is_empty())
        .map(|s| s.trace_id.clone())
        .with_context(|| format!("the CLI sent no `{root}` span"))
}

/// Why `spans` are not yet the whole trace `expect` describes, or `None` when they are.
fn missing(spans: &[ReceivedSpan], expect: &Expect) -> Option<String> {
    let services: BTreeSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    let absent: Vec<&&str> = expect
        .services
        .iter()
        .filter(|s| !services.contains(**s))
        .collect();
    if !absent.is_empty() {
        return Some(format!(
            "no spans from {absent:?} (spans from {services:?})"
        ));
    }
    for (name, service) in expect.spans {
        if !spans
            .iter()
            .any(|s| s.name == *name && s.service == *service)
        {
            return Some(format!("no `{name}` span from {service}"));
        }
    }
    let orphans = orphans(spans);
    if orphans.len() != 1 || orphans[0].name != expect.root || !orphans[0].parent_span_id.is_empty()
    {
        let shown: Vec<String> = orphans
            .iter()
            .map(|s| format!("{} `{}` (parent {})", s.service, s.name, s.parent_span_id))
            .collect();
        return Some(format!("spans whose parent is not in the trace: {shown:?}"));
    }
    None
}

/// Waits until the trace rooted at the CLI's `expect.root` span is whole; returns its spans.
fn whole_trace(receiver: &Receiver, expect: &Expect) -> anyhow::Result<Vec<ReceivedSpan>> {
    let id = trace_of(receiver, expect.root)?;
    let mut why = String::new();
    let found = eventually(WAIT, || {
        let spans = receiver.trace(&id);
        match missing(&spans, expect) {
            None => Ok(Some(spans)),
            Some(w) => {
                why = w;
                Ok(None)
            }
        }
    });
    let spans = found.with_context(|| format!("trace {id} of `{}`: {why}", expect.root))?;
    let mut seen: Vec<String> = spans
        .iter()
        .map(|s| format!("{}:{}", s.service, s.name))
        .collect();
    seen.sort();
    seen.dedup();
    eprintln!(
        "`{}`: trace {id}, {} spans: {}",
        expect.root,
        spans.len(),
        seen.join(" ")
    );
    Ok(spans)
}

#[test]
fn a_run_and_a_submit_each_arrive_as_one_trace() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let receiver = rt.block_on(Receiver::start(true))?;
    let db = rt.block_on(FreshDb::create())?;
    let stream = format!("NSML_IT_{}", uuid::Uuid::new_v4().simple());
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str()),
        ("OTEL_TRACES_SAMPLER", "always_on"),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ];
    let result = (|| {
        let dep = Deployment::distributed_env(&db.url, &stream, &env)?;
        let host = dep.host()?;
        host.nsml(&["admin", "competition", "apply", "examples/competition.toml"])?
            .ok()?;
        let alice = scenario::login(&dep, "alice", "alice-pass")?;
        let work = tempfile::tempdir()?;
        scenario::baseline_copy(work.path())?;

        let args = [
            &["run", "-d", "t1-cls", "-e", "main.py"][..],
            &scenario::SMALL_RUN,
            &["-a", "--epochs 1"],
        ]
        .concat();
        let out = alice.nsml_env(work.path(), &args, "", &env)?.ok()?;
        let session = scenario::started(&out)?;
        let ended = scenario::wait_ended(&alice, &session)?;
        ensure!(ended["status"] == "exited", "the session ended as {ended}");
        let run = whole_trace(
            &receiver,
            &Expect {
                root: "nsml run",
                services: &[
                    "nsml-cli",
                    "nsml-gateway",
                    "nsml-session",
                    "nsml-quota",
                    "nsml-storage",
                    "nsml-runner",
                ],
                spans: &[
                    ("gateway", "nsml-gateway"),
                    ("session", "nsml-runner"),
                    ("sandbox_start", "nsml-runner"),
                    ("sdk_request", "nsml-runner"),
                    ("apply", "nsml-session"),
                ],
            },
        )?;
        let ops: BTreeSet<&str> = run
            .iter()
            .filter(|s| s.name == "sdk_request")
            .filter_map(|s| s.attributes.get("op").map(String::as_str))
            .collect();
        ensure!(
            ops.contains("report") && ops.contains("save"),
            "the SDK's reports and saves are spans of the run's trace: {ops:?}"
        );

        let out = alice
            .nsml_env(&repo_root(), &["submit", &session, "0"], "", &env)?
            .ok()?;
        scenario::score_of(&out.stdout)?;
        let submit = whole_trace(
            &receiver,
            &Expect {
                root: "nsml submit",
                services: &[
                    "nsml-cli",
                    "nsml-gateway",
                    "nsml-submission",
                    "nsml-session",
                    "nsml-quota",
                    "nsml-runner",
                ],
                spans: &[
                    ("score", "nsml-submission"),
                    ("session", "nsml-runner"),
                    ("sdk_request", "nsml-runner"),
                    ("apply", "nsml-leaderboard"),
                ],
            },
        )?;
        ensure!(
            submit.iter().any(|s| s.name == "sdk_request"
                && s.attributes.get("op").map(String::as_str) == Some("predictions")),
            "the predictions the SDK hands over are a span of the submit's trace"
        );
        let run_id = &run[0].trace_id;
        ensure!(
            submit.iter().all(|s| &s.trace_id != run_id),
            "two actions, two traces"
        );
        Ok::<_, anyhow::Error>(())
    })();
    rt.block_on(drop_stream(&stream));
    rt.block_on(db.drop_db());
    result
}
