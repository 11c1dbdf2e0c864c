//! A dispute settled from the log, on the embedded deployment: a team trains and submits, its second real submit
//! is refused, and the host replays every decision (no mismatch), explains the refusal (the earlier successful
//! submit and the retry time), grants an extra submit, and then finds an event edited directly in the
//! database with `audit verify` (and the edited decision with `audit replay`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::time::Duration;

use anyhow::{Context, ensure};
use nsml_integration_tests::{Deployment, User, eventually, scenario};
use serde_json::Value;
use sqlx::Connection;

/// The team's submit state on a dataset, from `nsml quota -j`.
fn submit_state(u: &User, dataset: &str) -> anyhow::Result<Value> {
    let q = u.nsml(&["quota", "-j"])?.ok()?.json()?;
    q["submits"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["dataset"] == dataset).cloned())
        .with_context(|| format!("no `{dataset}` in quota: {q}"))
}

/// Every line of `admin audit export --team TEAM`, parsed.
fn export(host: &User, team: &str) -> anyhow::Result<Vec<Value>> {
    let out = host
        .nsml(&["admin", "audit", "export", "--team", team])?
        .ok()?;
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
        .collect()
}

/// The latest grant of a submit session in an exported ledger.
fn last_granted_submit(ledger: &[Value]) -> anyhow::Result<&Value> {
    ledger
        .iter()
        .rev()
        .find(|l| l["type"] == "ResourcesGranted" && l["data"]["request"]["kind"] == "submit")
        .context("no granted submit")
}

/// Replaces `from` with `to` (same length) inside the stored payload of the event at `position`, directly in
/// the SQLite file, as someone with access to the database might.
async fn edit_payload(
    db: &std::path::Path,
    position: i64,
    from: &str,
    to: &str,
) -> anyhow::Result<()> {
    ensure!(from.len() == to.len(), "an in-place edit keeps the length");
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db)
        .busy_timeout(Duration::from_secs(30));
    let mut c = sqlx::SqliteConnection::connect_with(&options).await?;
    let mut payload: Vec<u8> = sqlx::query_scalar("SELECT payload FROM events WHERE position = ?")
        .bind(position)
        .fetch_one(&mut c)
        .await?;
    let at = payload
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .with_context(|| format!("`{from}` not in the payload at position {position}"))?;
    payload[at..at + from.len()].copy_from_slice(to.as_bytes());
    sqlx::query("UPDATE events SET payload = ? WHERE position = ?")
        .bind(payload)
        .bind(position)
        .execute(&mut c)
        .await?;
    c.close().await?;
    Ok(())
}

#[test]
fn a_dispute_is_settled_from_the_log() -> anyhow::Result<()> {
    let dep = Deployment::embedded()?;
    let work = tempfile::tempdir()?;
    let alice = scenario::login(&dep, "alice", "alice-pass")?;
    let host = dep.host()?;
    let dir = work.path().join("alice");
    scenario::baseline_copy(&dir)?;

    // Sessions: a training run, and one refused for asking more memory than the team's quota.
    let s = scenario::run(&alice, &dir, "t1-cls", &["-a", "--epochs 2"])?;
    scenario::wait_ended(&alice, &s)?;
    let big = alice
        .nsml_in(
            &dir,
            &[
                "run", "-d", "t1-cls", "-g", "0", "-c", "1", "--memory", "200G",
            ],
            "",
        )?
        .failed()?;
    ensure!(
        big.stderr.contains("limit 170G"),
        "memory refusal: {}",
        big.all()
    );

    // Nothing submitted yet: the next real submit is allowed now, and `quota` says so.
    let before = submit_state(&alice, "t1-cls")?;
    ensure!(
        before["next_allowed_ms"] == 0 && before["why"].as_str().unwrap_or("").starts_with("now"),
        "before any submit: {before}"
    );

    // A real submit succeeds.
    let first = alice.nsml(&["submit", &s, "1"])?.ok()?;
    scenario::score_of(&first.stdout)?;
    let state = eventually(Duration::from_secs(60), || {
        let st = submit_state(&alice, "t1-cls")?;
        Ok((st["last_success_submission_id"] != "" && st["in_flight"] == false).then_some(st))
    })?;
    let succeeded = state["last_success_submission_id"]
        .as_str()
        .context("success id")?
        .to_string();
    let table = alice.nsml(&["quota"])?.ok()?;
    ensure!(
        table.stdout.contains("t1-cls")
            && table.stdout.contains(&succeeded)
            && table.stdout.contains("Storage"),
        "quota after a submit: {}",
        table.stdout
    );

    // The second real submit within the hour is refused, naming the rule and the retry time.
    let refused = alice.nsml(&["submit", &s, "0"])?.failed()?;
    let retry = refused
        .stderr
        .split("the next submit is allowed at ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .with_context(|| format!("no retry time in {}", refused.all()))?
        .to_string();

    // Replay: every decision re-derived, none differs.
    let replay = host.nsml(&["admin", "audit", "replay"])?.ok()?;
    ensure!(
        replay.stdout.contains(" 0 mismatches"),
        "replay: {}",
        replay.stdout
    );
    let report = host
        .nsml(&["admin", "audit", "replay", "--team", "demo", "-j"])?
        .ok()?
        .json()?;
    ensure!(
        report["decisions"].as_u64().unwrap_or(0) >= 4 && report["matched"] == report["decisions"],
        "replay report: {report}"
    );

    // The refusal in the ledger, then explained: the earlier successful submit and the retry time.
    let ledger = export(&host, "demo")?;
    ensure!(
        ledger.first().is_some_and(|l| l["type"] == "PolicyChanged"),
        "the ledger starts with the policy it adopted: {:?}",
        ledger.first()
    );
    let denial = ledger
        .iter()
        .rev()
        .find(|l| {
            l["type"] == "AdmissionDenied" && l["data"]["decision"]["rule"] == "submit_interval"
        })
        .context("no refused submit in the ledger")?
        .clone();
    let refused_session = denial["data"]["request"]["session"]
        .as_str()
        .context("session")?
        .to_string();
    let why = host
        .nsml(&["admin", "audit", "explain", &refused_session])?
        .ok()?;
    for needle in [
        "refused by rule `submit_interval`",
        &format!("submission {succeeded}"),
        &format!("Retry after: {retry}"),
        "SubmitSucceeded",
        "PolicyChanged",
        "the decision is the same",
    ] {
        ensure!(
            why.stdout.contains(needle),
            "explain lacks `{needle}`:\n{}",
            why.stdout
        );
    }
    // The same decision found by its submission id and by its decision id.
    for id in [
        denial["data"]["request"]["submission_id"]
            .as_str()
            .unwrap_or(""),
        denial["data"]["decision"]["id"].as_str().unwrap_or(""),
    ] {
        let x = host
            .nsml(&["admin", "audit", "explain", id, "-j"])?
            .ok()?
            .json()?;
        ensure!(
            x["decision"]["id"] == denial["data"]["decision"]["id"]
                && x["last_success_submission_id"] == succeeded.as_str()
                && x["decision"]["retry_after"] == retry.as_str(),
            "explain {id}: {x}"
        );
    }
    let participant = alice
        .nsml(&["admin", "audit", "explain", &refused_session])?
        .failed()?;
    ensure!(
        participant.stderr.contains("hosts"),
        "a participant cannot audit: {}",
        participant.all()
    );

    // The host settles the dispute with an extra submit: the next real submit is admitted once.
    host.nsml(&[
        "admin",
        "override",
        "submit",
        "--team",
        "demo",
        "--dataset",
        "t1-cls",
        "--reason",
        "scorer outage during the first submit",
    ])?
    .ok()?;
    let state = submit_state(&alice, "t1-cls")?;
    ensure!(
        state["extra_submits"] == 1,
        "quota with an extra submit: {state}"
    );
    let third = alice.nsml(&["submit", &s, "0"])?.ok()?;
    scenario::score_of(&third.stdout)?;
    let ledger = export(&host, "demo")?;
    let waived = last_granted_submit(&ledger)?;
    let waived_session = waived["data"]["request"]["session"].as_str().unwrap_or("");
    let why = host
        .nsml(&["admin", "audit", "explain", waived_session])?
        .ok()?;
    ensure!(
        why.stdout.contains("waived once by override")
            && why.stdout.contains("scorer outage during the first submit"),
        "explain of the waived submit:\n{}",
        why.stdout
    );
    // Both successes were scored during a platform fault: the host re-opens their slots, so no interval
    // applies and the team submits again at once; a failed or unknown submission has no slot to re-open.
    let third_id = waived["data"]["request"]["submission_id"]
        .as_str()
        .context("third submission")?
        .to_string();
    eventually(Duration::from_secs(60), || {
        let st = submit_state(&alice, "t1-cls")?;
        Ok((st["last_success_submission_id"] == third_id.as_str()).then_some(()))
    })?;
    for sub in [&succeeded, &third_id] {
        let o = host
            .nsml(&[
                "admin",
                "override",
                "reopen-submit",
                "--team",
                "demo",
                "--submission",
                sub,
                "--reason",
                "scored during a scorer fault",
                "-j",
            ])?
            .ok()?
            .json()?;
        ensure!(
            o["kind"] == "reopen_submit"
                && o["description"].as_str().is_some_and(|d| {
                    d.contains(&format!("re-opened the slot of submit {sub} on `t1-cls`"))
                }),
            "reopen-submit -j: {o}"
        );
    }
    let twice = host
        .nsml(&[
            "admin",
            "override",
            "reopen-submit",
            "--team",
            "demo",
            "--submission",
            &third_id,
            "--reason",
            "again",
        ])?
        .failed()?;
    ensure!(
        twice.stderr.contains("already re-opened"),
        "twice: {}",
        twice.all()
    );
    let unknown = host
        .nsml(&[
            "admin",
            "override",
            "reopen-submit",
            "--team",
            "demo",
            "--submission",
            "nope",
            "--reason",
            "typo",
        ])?
        .failed()?;
    ensure!(
        unknown
            .stderr
            .contains("nsml admin audit export --team demo"),
        "unknown: {}",
        unknown.all()
    );
    let state = submit_state(&alice, "t1-cls")?;
    ensure!(
        state["next_allowed_ms"] == 0
            && state["reopened_submission_ids"].as_array().map(Vec::len) == Some(2),
        "quota after re-opening: {state}"
    );
    let table = alice.nsml(&["quota"])?.ok()?;
    ensure!(
        table.stdout.contains("Re-opened by a host on t1-cls"),
        "quota table: {}",
        table.stdout
    );
    let fourth = alice.nsml(&["submit", &s, "0"])?.ok()?;
    scenario::score_of(&fourth.stdout)?;
    let ledger = export(&host, "demo")?;
    let reopened = last_granted_submit(&ledger)?;
    ensure!(
        reopened["data"]["decision"]["overrides"]
            .as_array()
            .map(Vec::len)
            == Some(2),
        "the submit names both re-opened slots: {reopened}"
    );
    let why = host
        .nsml(&[
            "admin",
            "audit",
            "explain",
            reopened["data"]["request"]["session"]
                .as_str()
                .unwrap_or(""),
        ])?
        .ok()?;
    ensure!(
        why.stdout.contains("its slot was re-opened by override")
            && why.stdout.contains("scored during a scorer fault")
            && why.stdout.contains("the decision is the same"),
        "explain of the submit under re-opened slots:\n{}",
        why.stdout
    );

    let replay = host.nsml(&["admin", "audit", "replay"])?.ok()?;
    ensure!(
        replay.stdout.contains(" 0 mismatches"),
        "replay after the override: {}",
        replay.stdout
    );

    // Untouched, the log verifies.
    let verify = host.nsml(&["admin", "audit", "verify"])?.ok()?;
    ensure!(
        verify.stdout.contains("Log intact"),
        "verify: {}",
        verify.stdout
    );

    // Someone moves the refusal's retry time an hour earlier, directly in the database.
    let position = denial["position"].as_i64().context("position")?;
    let hour: u32 = retry[11..13].parse()?;
    let earlier = format!("{}{:02}{}", &retry[..11], (hour + 23) % 24, &retry[13..]);
    tokio::runtime::Runtime::new()?.block_on(edit_payload(
        &dep.data_dir.join("nsml.db"),
        position,
        &retry,
        &earlier,
    ))?;
    let verify = host.nsml(&["admin", "audit", "verify"])?.failed()?;
    ensure!(
        verify
            .stdout
            .contains(&format!("event at position {position} "))
            && verify.stdout.contains("quota-demo")
            && verify.stdout.contains("was edited"),
        "verify after the edit: {}",
        verify.all()
    );
    let v = host
        .nsml(&["admin", "audit", "verify", "-j"])?
        .failed()?
        .json()?;
    ensure!(
        v["position"] == position && v["kind"] == "edited",
        "verify -j: {v}"
    );
    // Replay names the edited decision too: its recorded reason no longer follows from the ledger.
    let replay = host
        .nsml(&["admin", "audit", "replay", "-j"])?
        .failed()?
        .json()?;
    let mismatches = replay["mismatches"].as_array().context("mismatches")?;
    ensure!(
        mismatches.len() == 1
            && mismatches[0]["position"] == position
            && mismatches[0]["differences"][0]
                .as_str()
                .is_some_and(|d| d.starts_with("reason:")),
        "replay after the edit: {replay}"
    );
    Ok(())
}
