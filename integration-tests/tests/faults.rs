//! Fault injection in both deployments: each component killed (SIGKILL) and started again while a training
//! session saves checkpoints and a real submit is inferring; in the distributed deployment also NATS restarted,
//! NATS restarted on an empty store, and Postgres restarted, on servers of the test's own. After each fault:
//! no acknowledged event lost, no session or submission stuck, quota released as the rules say, `audit replay`
//! without mismatches and `audit verify` intact. The table of outcomes and of the time until the platform was
//! at full speed again is printed to stderr (`cargo test --test faults -- --nocapture`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::time::Instant;

use anyhow::{Context, bail};
use nsml_integration_tests::faults::{
    DOWN_FOR, NatsServer, Outcome, PgServer, Workload, check_audit, check_log,
    check_no_session_dirs, log_snapshot, print_table,
};
use nsml_integration_tests::grpc::example_with_interval;
use nsml_integration_tests::{Deployment, User, services};

/// What a fault does to the deployment; returns when the failed component is back.
type Inject<'a> = Box<dyn FnMut(&mut Deployment) -> anyhow::Result<()> + 'a>;

/// Runs one fault: work in flight, the fault, the recovery, the checks.
fn round(
    rt: &tokio::runtime::Runtime,
    dep: &mut Deployment,
    host: &User,
    work: &Workload,
    inject: &mut Inject<'_>,
) -> anyhow::Result<Outcome> {
    let flight = rt.block_on(work.start_flight())?;
    let before = rt.block_on(log_snapshot(dep.store_url()))?;
    inject(dep)?;
    let back = Instant::now();
    let recovered_in = rt.block_on(work.recover(back))?;
    let (session, submission) = rt.block_on(work.settle(&flight))?;
    let after = rt.block_on(log_snapshot(dep.store_url()))?;
    check_log(&before, &after)?;
    check_audit(host)?;
    check_no_session_dirs(&dep.data_dir)?;
    Ok(Outcome {
        session,
        submission,
        recovered_in,
        events_before: before.len(),
        events_after: after.len(),
    })
}

/// Runs every fault in turn, each on the state the one before left, and fails naming every fault whose
/// checks failed.
fn run_faults(
    deployment: &str,
    rt: &tokio::runtime::Runtime,
    dep: &mut Deployment,
    faults: Vec<(String, Inject<'_>)>,
) -> anyhow::Result<()> {
    // `NSML_FAULTS=nats,postgres` runs only the faults whose names contain one of the words.
    let only: Vec<String> = std::env::var("NSML_FAULTS")
        .map(|v| v.split(',').map(|w| w.trim().to_lowercase()).collect())
        .unwrap_or_default();
    let faults: Vec<(String, Inject<'_>)> = faults
        .into_iter()
        .filter(|(name, _)| {
            only.is_empty()
                || only
                    .iter()
                    .any(|w| name.to_lowercase().contains(w.as_str()))
        })
        .collect();
    let host = dep.host()?;
    let work = rt.block_on(Workload::prepare(&dep.url))?;
    eprintln!("probe before any fault: {:?}", work.baseline);
    let mut rows = Vec::new();
    for (name, mut inject) in faults {
        let r = round(rt, dep, &host, &work, &mut inject);
        let failed = r.is_err();
        rows.push((name, r));
        if failed {
            // The state a failed check leaves behind would only confuse the faults after it.
            break;
        }
    }
    print_table(deployment, &rows);
    let failed: Vec<String> = rows
        .iter()
        .filter_map(|(f, r)| r.as_ref().err().map(|e| format!("{f}: {e:#}")))
        .collect();
    if !failed.is_empty() {
        bail!("faults that broke a promise:\n{}", failed.join("\n"));
    }
    Ok(())
}

#[test]
fn embedded_platform_killed_mid_session_and_mid_submit_loses_nothing() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let manifest = example_with_interval(tmp.path(), "1s")?;
    let mut dep = Deployment::embedded_with(&[manifest])?;
    let rt = tokio::runtime::Runtime::new()?;
    let faults: Vec<(String, Inject<'_>)> = vec![(
        "nsmld killed".into(),
        Box::new(|d: &mut Deployment| d.kill_and_restart_after(DOWN_FOR)),
    )];
    run_faults("embedded", &rt, &mut dep, faults)
}

#[test]
fn distributed_services_nats_and_postgres_killed_lose_nothing() -> anyhow::Result<()> {
    let pg = PgServer::start().context("starting the test's own Postgres")?;
    let nats =
        std::cell::RefCell::new(NatsServer::start().context("starting the test's own NATS")?);
    let tmp = tempfile::tempdir()?;
    let manifest = example_with_interval(tmp.path(), "1s")?;
    let mut dep = Deployment::distributed_on(&pg.url(), &nats.borrow().url(), "NSML_FAULTS", &[])?;
    dep.apply_competition(&manifest)?;
    let rt = tokio::runtime::Runtime::new()?;
    let mut faults: Vec<(String, Inject<'_>)> = Vec::new();
    for svc in services() {
        faults.push((
            format!("{svc} killed"),
            Box::new(move |d: &mut Deployment| d.restart_service_after(svc, DOWN_FOR)),
        ));
    }
    let nats = &nats;
    faults.push((
        "NATS killed".into(),
        Box::new(move |_: &mut Deployment| nats.borrow_mut().restart(DOWN_FOR, false)),
    ));
    faults.push((
        "NATS killed, back empty".into(),
        Box::new(move |_: &mut Deployment| nats.borrow_mut().restart(DOWN_FOR, true)),
    ));
    let pg = &pg;
    faults.push((
        "Postgres crashed".into(),
        Box::new(move |_: &mut Deployment| pg.restart(DOWN_FOR)),
    ));
    run_faults("distributed", &rt, &mut dep, faults)
}
