//! A competition's schedule: runs and submits refused before it opens, submits refused after it closes with the
//! boards frozen, a host's extension of one team's deadline, and every such decision in the ledger, replayed;
//! and its rounds, each with its own datasets, dates, rules and extensions.
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

/// A copy of the example competition with `rounds` (`[[rounds]]` tables) appended.
fn with_rounds(dir: &Path, name: &str, rounds: &str) -> anyhow::Result<PathBuf> {
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub)?;
    let path = example_with_interval(&sub, "1h")?;
    let text = std::fs::read_to_string(&path)?;
    std::fs::write(&path, format!("{text}\n{rounds}\n"))?;
    Ok(path)
}

#[test]
fn a_rounds_dates_and_extensions_decide_its_datasets_runs_submits_and_board() -> anyhow::Result<()>
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

    // The host splits the competition into a preliminary on t1-cls that closed a minute ago and a final on
    // t2-reg that opens in an hour.
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let rounds = format!(
        "[[rounds]]\nname = \"preliminary\"\ndatasets = [\"t1-cls\"]\nopens = \"{}\"\ncloses = \"{}\"\n\
         submit_interval = \"10m\"\n\n\
         [[rounds]]\nname = \"final\"\ndatasets = [\"t2-reg\"]\nopens = \"{}\"\ncloses = \"{}\"\n",
        rfc3339(now - hour),
        rfc3339(now - Duration::from_secs(60)),
        rfc3339(now + hour),
        rfc3339(now + 2 * hour),
    );
    let manifest = with_rounds(work.path(), "rounds", &rounds)?;
    host.nsml(&[
        "admin",
        "competition",
        "apply",
        &manifest.display().to_string(),
    ])?
    .ok()?;

    // A run on the final's dataset is refused, naming the round and when it opens.
    let early = alice
        .nsml_in(
            &code,
            &[
                "run", "-d", "t2-reg", "-g", "0", "-c", "1", "--memory", "1G",
            ],
            "",
        )?
        .failed()?;
    ensure!(
        early
            .stderr
            .contains("round `final` of competition `demo` opens at"),
        "a run before the final opens: {}",
        early.all()
    );
    // A submit on the closed preliminary's dataset is refused, naming the round; its board is as it was.
    let refused = alice.nsml(&["submit", &session, "0"])?.failed()?;
    ensure!(
        refused
            .stderr
            .contains("round `preliminary` of competition `demo` closed at"),
        "a submit after the preliminary closed: {}",
        refused.all()
    );
    ensure!(
        alice
            .nsml(&["dataset", "board", "t1-cls", "-j"])?
            .ok()?
            .stdout
            == board_before,
        "the preliminary's board is as it was at its deadline"
    );
    // `nsml quota` lists each round, where it stands, its rules and what counts at its deadline.
    let quota = alice.nsml(&["quota"])?.ok()?;
    let line = |first: &str| {
        quota
            .stdout
            .lines()
            .find(|l| l.starts_with(first))
            .unwrap_or_default()
            .to_string()
    };
    ensure!(
        line("preliminary").contains("closed")
            && line("preliminary").contains("one per 10 minutes")
            && line("final").contains("upcoming")
            && quota.stdout.contains(
                "A submit admitted before the round's deadline is scored after it and counts"
            ),
        "the rounds in `nsml quota`: {}",
        quota.all()
    );
    let usage = alice.nsml(&["quota", "-j"])?.ok()?.json()?;
    ensure!(
        usage["rounds"][0]["state"] == "closed" && usage["rounds"][1]["state"] == "upcoming",
        "the rounds in `nsml quota -j`: {usage}"
    );

    // An extension names a round the competition has.
    let until = rfc3339(SystemTime::now() + hour);
    let extend = |round: &str| {
        host.nsml(&[
            "admin",
            "override",
            "deadline",
            "--team",
            "demo",
            "--until",
            &until,
            "--round",
            round,
            "--reason",
            "their machine failed in the last hour of the preliminary",
        ])
    };
    let unknown = extend("semi")?.failed()?;
    ensure!(
        unknown
            .stderr
            .contains("competition `demo` has no round `semi`")
            && unknown.stderr.contains("`preliminary`, `final`"),
        "{}",
        unknown.all()
    );
    // A host extends the team's preliminary deadline: its submit is admitted and counts on the board.
    let granted = extend("preliminary")?.ok()?;
    ensure!(
        granted
            .stdout
            .contains("the team's deadline for round `preliminary` extended to"),
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
        "the extended team's submit is on the preliminary's board: {board}"
    );
    // The overall board still ranks across the datasets, the team on the preliminary's only.
    let overall = alice.nsml(&["board", "demo", "-j"])?.ok()?.json()?;
    let row = overall["rows"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["team"] == "demo"))
        .context("the team on the overall board")?;
    ensure!(
        row["submitted"] == serde_json::json!([true, false]),
        "the overall board: {overall}"
    );

    // Every one of these decisions is in the ledger and replays: `audit replay` exits 1 on any mismatch.
    host.nsml(&["admin", "audit", "replay"])?.ok()?;
    Ok(())
}
