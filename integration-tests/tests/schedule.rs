//! A competition's schedule: runs and submits refused before it opens, submits refused after it closes with the
//! boards frozen, a host's extension of one team's deadline, and every such decision in the ledger, replayed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, ensure};
use nsml_integration_tests::Deployment;
use nsml_integration_tests::grpc::example_with_interval;
use nsml_integration_tests::scenario::{baseline_copy, login, run, score_of, wait_ended};

/// A copy of the example competition with `lines` added to its policy.
fn with_policy(dir: &Path, name: &str, lines: &str) -> anyhow::Result<PathBuf> {
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub)?;
    let path = example_with_interval(&sub, "1h")?;
    let text = std::fs::read_to_string(&path)?;
    let anchor = "submit_max_cpus = 4\n";
    ensure!(
        text.contains(anchor),
        "the example manifest's policy changed"
    );
    std::fs::write(
        &path,
        text.replacen(anchor, &format!("{anchor}{lines}\n"), 1),
    )?;
    Ok(path)
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

#[test]
fn a_closed_competition_refuses_submits_until_a_host_extends_a_teams_deadline() -> anyhow::Result<()>
{
    let dep = Deployment::embedded()?;
    let host = dep.host()?;
    let alice = login(&dep, "alice", "alice-pass")?;
    let work = tempfile::tempdir()?;
    let code = work.path().join("code");
    baseline_copy(&code)?;
    let session = run(&alice, &code, "t1-cls", &["-a", "--epochs 1"])?;
    wait_ended(&alice, &session)?;
    let board_before = alice
        .nsml(&["dataset", "board", "t1-cls", "-j"])?
        .ok()?
        .stdout;

    // The host closes the competition a minute ago.
    let closed = with_policy(
        work.path(),
        "closed",
        &format!(
            "closes = \"{}\"",
            rfc3339(SystemTime::now() - Duration::from_secs(60))
        ),
    )?;
    host.nsml(&[
        "admin",
        "competition",
        "apply",
        &closed.display().to_string(),
    ])?
    .ok()?;
    let refused = alice.nsml(&["submit", &session, "0"])?.failed()?;
    ensure!(
        refused.stderr.contains("competition `demo` closed at")
            && refused.stderr.contains("final ranking"),
        "a submit after the deadline: {}",
        refused.all()
    );
    let trial = alice.nsml(&["submit", "-t", &session, "0"])?.failed()?;
    ensure!(
        trial.stderr.contains("closed at"),
        "a trial submit after the deadline: {}",
        trial.all()
    );
    ensure!(
        alice
            .nsml(&["dataset", "board", "t1-cls", "-j"])?
            .ok()?
            .stdout
            == board_before,
        "the board is as it was at the deadline"
    );
    let quota = alice.nsml(&["quota"])?.ok()?;
    ensure!(
        quota
            .stdout
            .contains("A submit admitted before the deadline is scored after it and counts"),
        "the rules say what counts: {}",
        quota.all()
    );

    // A host extends the team's deadline by an hour: its submit is admitted and counts.
    let until = rfc3339(SystemTime::now() + Duration::from_secs(3600));
    let granted = host
        .nsml(&[
            "admin",
            "override",
            "deadline",
            "--team",
            "demo",
            "--until",
            &until,
            "--reason",
            "their machine failed in the last hour",
        ])?
        .ok()?;
    ensure!(
        granted.stdout.contains("the team's deadline extended to"),
        "{}",
        granted.all()
    );
    let submitted = alice.nsml(&["submit", &session, "0"])?.ok()?;
    score_of(&submitted.stdout)?;
    let board = alice
        .nsml(&["dataset", "board", "t1-cls", "-j"])?
        .ok()?
        .json()?;
    let rows = board["rows"].as_array().context("rows")?;
    ensure!(
        rows.iter().any(|r| r["team"] == "demo"),
        "the extended team's submit is on the board: {board}"
    );

    // Every one of these decisions is in the ledger and replays: `audit replay` exits 1 on any mismatch.
    host.nsml(&["admin", "audit", "replay"])?.ok()?;

    // Before it opens, even training is refused, with the opening time.
    let later = with_policy(
        work.path(),
        "later",
        &format!(
            "opens = \"{}\"",
            rfc3339(SystemTime::now() + Duration::from_secs(3600))
        ),
    )?;
    host.nsml(&[
        "admin",
        "competition",
        "apply",
        &later.display().to_string(),
    ])?
    .ok()?;
    let early = alice
        .nsml_in(
            &code,
            &[
                "run", "-d", "t1-cls", "-g", "0", "-c", "1", "--memory", "1G",
            ],
            "",
        )?
        .failed()?;
    ensure!(
        early.stderr.contains("competition `demo` opens at"),
        "a run before the opening: {}",
        early.all()
    );
    Ok(())
}
