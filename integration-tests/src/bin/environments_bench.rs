//! `environments_bench`: what a session's Python environment costs its start, in one run of `nsmld up`.
//!
//! - the first build of a small environment (`six==1.16.0` from the package index pip is configured with):
//!   `Run` → the entry's first statement, and the install time the session's log reports;
//! - `Run` → the entry's first statement (p50, max) with that environment cached, against a session without
//!   requirements, alternated over the same runs.
//!
//! Usage: `cargo build --release --workspace --bins && target/release/environments_bench [--runs N]`.

use anyhow::Context;
use nsml_integration_tests::Deployment;
use nsml_integration_tests::figures::{exited, now_ms, pct};
use nsml_integration_tests::grpc::{Client, authed, small};
use nsml_proto::v1::session_service_client::SessionServiceClient;
use nsml_proto::v1::{GetSessionRequest, LogsRequest, RemoveRequest};
use tokio_stream::StreamExt;

/// The entry: its first statement stamps the time it runs (sandbox, environment and interpreter start-up
/// included).
const MAIN: &str = "import time\nprint('tick %.3f' % (time.time() * 1000), flush=True)\n";

/// One session of `snapshot`: `Run` → the entry's first statement in ms, and the install time its log reports.
async fn one(alice: &Client, snapshot: &str) -> anyhow::Result<(f64, Option<String>)> {
    let mut sessions = SessionServiceClient::new(alice.channel.clone());
    let t0 = now_ms();
    let s = alice.run("t1-cls", snapshot, "", small()).await?;
    let mut logs = sessions
        .logs(authed(
            LogsRequest {
                name: s.name.clone(),
                follow: true,
            },
            &alice.token,
        )?)
        .await?
        .into_inner();
    let (mut started, mut installed) = (None, None);
    while let Some(l) = logs.next().await {
        let l = l?;
        if let Some(v) = l.text.strip_prefix("tick ") {
            started.get_or_insert(v.trim().parse::<f64>()?);
        }
        if let Some(t) = l.text.strip_prefix("Installed requirements in ") {
            installed = Some(t.to_string());
        }
    }
    let done = sessions
        .get(authed(
            GetSessionRequest {
                name: s.name.clone(),
            },
            &alice.token,
        )?)
        .await?
        .into_inner();
    exited(&done)?;
    // An ended session is removed, so sequential runs never wait on the team's session quota.
    sessions
        .remove(authed(
            RemoveRequest {
                pattern: s.name.clone(),
                ..Default::default()
            },
            &alice.token,
        )?)
        .await?;
    Ok((
        started.context("the entry printed nothing")? - t0,
        installed,
    ))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(10usize);
    let dep = Deployment::embedded_env(&[], &[("NSML_RATE_LIMIT", "1000000")])?;
    let alice = Client::login(&dep.url, "alice", "alice-pass").await?;
    let plain = alice.upload("t1-cls", &[("main.py", MAIN)]).await?;
    let with_env = alice
        .upload(
            "t1-cls",
            &[("main.py", MAIN), ("requirements.txt", "six==1.16.0\n")],
        )
        .await?;

    let (first_ms, installed) = one(&alice, &with_env).await?;
    let (mut plain_ms, mut cached_ms) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        plain_ms.push(one(&alice, &plain).await?.0);
        cached_ms.push(one(&alice, &with_env).await?.0);
    }
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    println!("environments_bench (embedded, `nsmld up`, {runs} runs of each, alternated)");
    println!(
        "  first build of a small environment (six==1.16.0): run → entry started {first_ms:.0} ms (install: {})",
        installed.as_deref().unwrap_or("not reported")
    );
    let (p, c) = (pct(plain_ms.clone(), 0.5), pct(cached_ms.clone(), 0.5));
    println!(
        "  run → entry started, no requirements:       p50 {p:.0} ms, max {:.0} ms",
        max(&plain_ms)
    );
    println!(
        "  run → entry started, cached environment:    p50 {c:.0} ms, max {:.0} ms ({:+.0} ms at p50)",
        max(&cached_ms),
        c - p
    );
    Ok(())
}
