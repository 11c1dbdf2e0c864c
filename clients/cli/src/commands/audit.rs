//! `admin override submit|quota|reopen-submit` and `admin audit replay|explain|verify|export`: hosts' overrides, recorded in
//! the team's ledger, and the audit that settles disputes from the log.

use anyhow::Result;
use chrono::{DateTime, Utc};
use nsml_manifest::format_size;
use nsml_proto::json::to_value;
use nsml_proto::v1 as pb;
use pb::OverrideKind;
use serde_json::{Value, json};

use super::Context;
use crate::Exit;
use crate::json;
use crate::output::{emit, kind_name};

/// A time as RFC 3339 UTC (`2026-12-01T00:00:00Z`): the audit's times are unambiguous, whatever the local zone.
fn utc(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| format!("{ms} ms after the epoch"))
}

fn time_json(ms: i64) -> Value {
    if ms <= 0 {
        Value::Null
    } else {
        Value::String(utc(ms))
    }
}

fn describe_resources(r: Option<&pb::Resources>) -> String {
    let r = r.copied().unwrap_or_default();
    format!(
        "{} GPUs, {} CPUs, {} memory + {} shared memory",
        r.gpus,
        r.cpus,
        format_size(r.memory_bytes),
        format_size(r.shm_bytes)
    )
}

/// An override in one line, as the quota service words it: what it grants, who granted it, when and why.
pub fn describe_override(o: &pb::Override) -> String {
    o.description.clone()
}

/// An override as JSON.
pub fn override_json(o: &pb::Override) -> Value {
    to_value(o)
}

async fn grant(ctx: &Context, request: pb::OverrideRequest, as_json: bool) -> Result<()> {
    let o = ctx
        .api()?
        .quota()
        .grant_override(request)
        .await?
        .into_inner();
    if as_json {
        json::print(&override_json(&o));
    } else {
        println!("Recorded in the ledger of team {}:", o.team);
        println!("  {}", describe_override(&o));
    }
    Ok(())
}

pub async fn extra_submit(
    ctx: &Context,
    team: String,
    dataset: String,
    reason: String,
    submission: Option<String>,
    competition: Option<String>,
) -> Result<()> {
    grant(
        ctx,
        pb::OverrideRequest {
            competition: competition.unwrap_or_default(),
            team,
            kind: OverrideKind::ExtraSubmit as i32,
            dataset,
            submission_id: submission.unwrap_or_default(),
            reason,
            command_id: uuid_like(),
            ..Default::default()
        },
        false,
    )
    .await
}

pub async fn reopen_submit(
    ctx: &Context,
    team: String,
    submission: String,
    reason: String,
    competition: Option<String>,
    as_json: bool,
) -> Result<()> {
    grant(
        ctx,
        pb::OverrideRequest {
            competition: competition.unwrap_or_default(),
            team,
            kind: OverrideKind::ReopenSubmit as i32,
            submission_id: submission,
            reason,
            command_id: uuid_like(),
            ..Default::default()
        },
        as_json,
    )
    .await
}

pub async fn raise_quota(
    ctx: &Context,
    team: String,
    raise: pb::QuotaRaise,
    until_ms: i64,
    reason: String,
    competition: Option<String>,
) -> Result<()> {
    let request = until(
        OverrideKind::RaiseQuota,
        team,
        until_ms,
        reason,
        competition,
    );
    grant(
        ctx,
        pb::OverrideRequest {
            raise: Some(raise),
            ..request
        },
        false,
    )
    .await
}

/// Extends the team's deadline: for `round` when named, else the competition's.
pub async fn extend_deadline(
    ctx: &Context,
    team: String,
    until_ms: i64,
    reason: String,
    round: Option<String>,
    competition: Option<String>,
) -> Result<()> {
    let request = until(
        OverrideKind::ExtendDeadline,
        team,
        until_ms,
        reason,
        competition,
    );
    grant(
        ctx,
        pb::OverrideRequest {
            round: round.unwrap_or_default(),
            ..request
        },
        false,
    )
    .await
}

/// An override of the team's that holds until a time (a raise, an extended deadline).
fn until(
    kind: OverrideKind,
    team: String,
    until_ms: i64,
    reason: String,
    competition: Option<String>,
) -> pb::OverrideRequest {
    pb::OverrideRequest {
        competition: competition.unwrap_or_default(),
        team,
        kind: kind as i32,
        until_ms,
        reason,
        command_id: uuid_like(),
        ..Default::default()
    }
}

/// A command id for one invocation: the time and the process, unique enough to make a retry of the same call
/// idempotent on the server without a UUID dependency.
fn uuid_like() -> String {
    let now = Utc::now();
    format!(
        "cli-{}-{}-{}",
        now.timestamp_millis(),
        now.timestamp_subsec_nanos(),
        std::process::id()
    )
}

fn decision_line(d: &pb::Decision) -> String {
    if d.granted {
        "granted".into()
    } else {
        format!("refused by `{}`", d.rule)
    }
}

pub async fn replay(
    ctx: &Context,
    competition: Option<String>,
    team: Option<String>,
    until: Option<i64>,
    as_json: bool,
) -> Result<()> {
    let report = ctx
        .api()?
        .quota()
        .replay(pb::ReplayRequest {
            competition: competition.unwrap_or_default(),
            team: team.unwrap_or_default(),
            until_ms: until.unwrap_or(0),
        })
        .await?
        .into_inner();
    if as_json {
        json::print(&replay_json(&report));
    } else {
        emit(&render_replay(&report));
    }
    if report.mismatches.is_empty() {
        Ok(())
    } else {
        Err(Exit(1).into())
    }
}

/// A replay report as JSON, fields named as in the API.
fn replay_json(report: &pb::ReplayReport) -> Value {
    json!({
        "ledgers": report.ledgers,
        "events": report.events,
        "decisions": report.decisions,
        "matched": report.matched,
        "elapsed_micros": report.elapsed_micros,
        "mismatches": report.mismatches.iter().map(|m| json!({
            "team": m.team,
            "position": m.position,
            "version": m.version,
            "decision_id": m.decision_id,
            "session": m.session,
            "submission_id": m.submission_id,
            "differences": m.differences,
        })).collect::<Vec<_>>(),
    })
}

/// Renders a replay report: the totals, then each mismatch with its differences.
fn render_replay(report: &pb::ReplayReport) -> String {
    let secs = report.elapsed_micros as f64 / 1e6;
    let mut out = format!(
        "Replayed {} ledger{}: {} events, {} decisions re-derived in {:.3}s ({:.0} events/s)\n",
        report.ledgers,
        if report.ledgers == 1 { "" } else { "s" },
        report.events,
        report.decisions,
        secs,
        if secs > 0.0 {
            report.events as f64 / secs
        } else {
            0.0
        }
    );
    out.push_str(&format!(
        "{} matched, {} mismatches\n",
        report.matched,
        report.mismatches.len()
    ));
    for m in &report.mismatches {
        out.push_str(&render_mismatch(m));
    }
    out
}

/// One decision the replay re-derived differently, with what differs.
fn render_mismatch(m: &pb::ReplayMismatch) -> String {
    let recorded = m.recorded.clone().unwrap_or_default();
    let replayed = m.replayed.clone().unwrap_or_default();
    let mut out = format!(
        "\nMismatch: decision {} for {}{} in quota-{} at position {} (version {}): recorded {}, replayed {}\n",
        m.decision_id,
        m.session,
        if m.submission_id.is_empty() {
            String::new()
        } else {
            format!(" (submission {})", m.submission_id)
        },
        m.team,
        m.position,
        m.version,
        decision_line(&recorded),
        decision_line(&replayed),
    );
    for d in &m.differences {
        out.push_str(&format!("  {d}\n"));
    }
    out
}

fn event_ref_json(r: &pb::EventRef) -> Value {
    let mut v = to_value(r);
    if let Some(map) = v.as_object_mut() {
        map.remove("event_type");
    }
    v["type"] = r
        .event_type
        .strip_prefix("nsml.v1.")
        .unwrap_or(&r.event_type)
        .into();
    v
}

/// A decision as JSON, with its times also as UTC text.
fn decision_json(d: &pb::Decision) -> Value {
    let mut v = to_value(d);
    v["retry_after"] = time_json(d.retry_after_ms);
    v["decided_at"] = time_json(d.decided_at_ms);
    v
}

fn explanation_json(x: &pb::Explanation) -> Value {
    let r = x.request.clone().unwrap_or_default();
    let p = x.policy.clone().unwrap_or_default();
    json!({
        "team": x.team,
        "request": {
            "competition": r.competition,
            "kind": kind_name(r.kind()),
            "session": r.session,
            "dataset": r.dataset,
            "submission_id": r.submission_id,
            "resources": {
                "gpus": r.resources.unwrap_or_default().gpus,
                "cpus": r.resources.unwrap_or_default().cpus,
                "memory_bytes": r.resources.unwrap_or_default().memory_bytes,
                "shm_bytes": r.resources.unwrap_or_default().shm_bytes,
            },
        },
        "decision": x.decision.as_ref().map(decision_json),
        "event": x.event.as_ref().map(event_ref_json),
        "rule": x.rule,
        "policy_version": x.policy_version,
        "policy": {
            "team_gpus": p.team_gpus,
            "team_cpus": p.team_cpus,
            "team_memory_bytes": p.team_memory_bytes,
            "team_sessions": p.team_sessions,
            "submit_interval_secs": p.submit_interval_secs,
            "submit_max_cpus": p.submit_max_cpus,
        },
        "held": x.held.iter().map(|h| json!({
            "session": h.session,
            "kind": kind_name(h.kind()),
            "submission_id": h.submission_id,
            "gpus": h.resources.unwrap_or_default().gpus,
            "cpus": h.resources.unwrap_or_default().cpus,
            "memory_bytes": h.resources.unwrap_or_default().memory_bytes,
            "shm_bytes": h.resources.unwrap_or_default().shm_bytes,
            "granted_by": h.granted_by.as_ref().map(event_ref_json),
        })).collect::<Vec<_>>(),
        "last_success_ms": x.last_success_ms,
        "last_success_at": time_json(x.last_success_ms),
        "last_success_submission_id": x.last_success_submission_id,
        "in_flight_submissions": x.in_flight_submissions,
        "overrides": x.overrides.iter().map(override_json).collect::<Vec<_>>(),
        "replayed": x.replayed.as_ref().map(decision_json),
        "replay_matches": x.replay_matches,
        "differences": x.differences,
        "rests_on": x.rests_on.iter().map(event_ref_json).collect::<Vec<_>>(),
        "other_decisions": x.other_decisions,
    })
}

/// Renders an explanation: the decision, the state it saw, the events it rests on, and the replay verdict.
pub fn render_explanation(x: &pb::Explanation) -> String {
    let mut out = explained_decision(x);
    out.push_str("\nThe state it saw:\n");
    out.push_str(&explained_policy(x));
    out.push_str(&explained_holdings(x));
    out.push_str(&explained_submits(x));
    out.push_str(&explained_overrides(x));
    out.push_str(&format!("\nRule: {}\n", x.rule));
    out.push_str(&explained_events(x));
    out.push_str(&explained_replay(x));
    out
}

/// The decision itself: its verdict, the request, where and when it was taken, and why.
fn explained_decision(x: &pb::Explanation) -> String {
    let r = x.request.clone().unwrap_or_default();
    let d = x.decision.clone().unwrap_or_default();
    let ev = x.event.clone().unwrap_or_default();
    let mut out = format!(
        "Decision {}: {}\n",
        d.id,
        if d.granted {
            "granted".to_string()
        } else {
            format!("refused by rule `{}`", d.rule)
        }
    );
    out.push_str(&format!(
        "  Request: {} session {}{} on {} for {}: {}\n",
        kind_name(r.kind()),
        r.session,
        if r.submission_id.is_empty() {
            String::new()
        } else {
            format!(" (submission {})", r.submission_id)
        },
        r.dataset,
        x.team,
        describe_resources(r.resources.as_ref())
    ));
    out.push_str(&format!(
        "  Decided at {}, in ledger quota-{} at version {} (position {}), on the state at version {}, under policy version {}\n",
        utc(d.decided_at_ms),
        x.team,
        ev.version,
        ev.position,
        d.ledger_version,
        d.policy_version
    ));
    if !d.reason.is_empty() {
        out.push_str(&format!("  Reason: {}\n", crate::output::clean(&d.reason)));
    }
    if d.retry_after_ms > 0 {
        out.push_str(&format!("  Retry after: {}\n", utc(d.retry_after_ms)));
    }
    out
}

/// The policy the ledger had adopted when it decided.
fn explained_policy(x: &pb::Explanation) -> String {
    match &x.policy {
        Some(p) => format!(
            "  Policy version {}: {} GPUs, {} CPUs, {} memory, {} sessions per team; a real submit every {}s per dataset, on at most {} CPUs\n",
            x.policy_version,
            p.team_gpus,
            p.team_cpus,
            format_size(p.team_memory_bytes),
            p.team_sessions,
            p.submit_interval_secs,
            p.submit_max_cpus
        ),
        None => "  No policy adopted by the ledger\n".to_string(),
    }
}

/// What the team held in all, and session by session.
fn explained_holdings(x: &pb::Explanation) -> String {
    let mut out = format!(
        "  Held by the team: {}\n",
        describe_resources(x.held_total.as_ref())
    );
    for h in &x.held {
        out.push_str(&format!(
            "    {} ({}): {}\n",
            h.session,
            kind_name(h.kind()),
            describe_resources(h.resources.as_ref())
        ));
    }
    out
}

/// The dataset's last successful submit and the submits in flight on it.
fn explained_submits(x: &pb::Explanation) -> String {
    let dataset = x
        .request
        .as_ref()
        .map(|r| r.dataset.as_str())
        .unwrap_or_default();
    let mut out = if x.last_success_ms > 0 {
        format!(
            "  Last successful submit on {}: submission {}, submitted at {}\n",
            dataset,
            x.last_success_submission_id,
            utc(x.last_success_ms)
        )
    } else {
        format!("  Last successful submit on {}: none\n", dataset)
    };
    out.push_str(&format!(
        "  Submits in flight on {}: {}\n",
        dataset,
        if x.in_flight_submissions.is_empty() {
            "none".to_string()
        } else {
            x.in_flight_submissions.join(", ")
        }
    ));
    out
}

/// The overrides in force when it decided.
fn explained_overrides(x: &pb::Explanation) -> String {
    if x.overrides.is_empty() {
        return "  Overrides in force: none\n".to_string();
    }
    let mut out = "  Overrides in force:\n".to_string();
    for o in &x.overrides {
        out.push_str(&format!("    {}\n", describe_override(o)));
    }
    out
}

/// The ledger events the decision rests on.
fn explained_events(x: &pb::Explanation) -> String {
    let mut out = "\nIt rests on these ledger events:\n".to_string();
    for e in &x.rests_on {
        out.push_str(&format!(
            "  position {} (version {}) {} at {}: {}\n",
            e.position,
            e.version,
            e.event_type
                .strip_prefix("nsml.v1.")
                .unwrap_or(&e.event_type),
            utc(e.recorded_at_ms),
            e.note
        ));
    }
    out
}

/// Whether replaying the events gives the same decision, and the other decisions for the same work.
fn explained_replay(x: &pb::Explanation) -> String {
    let mut out = if x.replay_matches {
        "\nReplay: re-derived from these events, the decision is the same\n".to_string()
    } else {
        let mut out = "\nReplay: re-derived from these events, the decision DIFFERS:\n".to_string();
        for d in &x.differences {
            out.push_str(&format!("  {d}\n"));
        }
        out
    };
    if !x.other_decisions.is_empty() {
        out.push_str("\nOther decisions for the same session or submission:\n");
        for o in &x.other_decisions {
            out.push_str(&format!("  {o}\n"));
        }
    }
    out
}

pub async fn explain(ctx: &Context, id: &str, as_json: bool) -> Result<()> {
    let x = ctx
        .api()?
        .quota()
        .explain(pb::ExplainRequest { id: id.to_string() })
        .await?
        .into_inner();
    if as_json {
        json::print(&explanation_json(&x));
    } else {
        emit(&render_explanation(&x));
    }
    Ok(())
}

pub async fn verify(ctx: &Context, as_json: bool) -> Result<()> {
    let v = ctx
        .api()?
        .quota()
        .verify(pb::VerifyRequest {})
        .await?
        .into_inner();
    if as_json {
        json::print(&json!({
            "intact": v.intact,
            "events": v.events,
            "position": v.position,
            "stream": v.stream,
            "version": v.version,
            "event_id": v.event_id,
            "kind": v.kind,
            "message": v.message,
        }));
    } else if v.intact {
        println!(
            "Log intact: {} events, every hash links to the one before",
            v.events
        );
    } else {
        println!("Log tampered ({} events): {}", v.events, v.message);
    }
    if v.intact {
        Ok(())
    } else {
        Err(Exit(1).into())
    }
}

pub async fn export(ctx: &Context, team: &str) -> Result<()> {
    let lines = ctx
        .api()?
        .quota()
        .export(pb::ExportRequest {
            team: team.to_string(),
        })
        .await?
        .into_inner()
        .lines;
    let mut out = String::new();
    for l in lines {
        out.push_str(&l);
        out.push('\n');
    }
    emit(&out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explanation_names_the_success_the_retry_time_and_the_events() {
        let x = pb::Explanation {
            team: "demo".into(),
            request: Some(pb::AdmitRequest {
                kind: pb::SessionKind::Submit as i32,
                session: "demo/t1-cls/4".into(),
                dataset: "t1-cls".into(),
                submission_id: "s2".into(),
                ..Default::default()
            }),
            decision: Some(pb::Decision {
                id: "d2".into(),
                rule: "submit_interval".into(),
                reason: "submit limit: …".into(),
                retry_after_ms: 1_796_086_800_000,
                ..Default::default()
            }),
            last_success_ms: 1_796_083_200_000,
            last_success_submission_id: "s1".into(),
            rule: "submit_interval".into(),
            replay_matches: true,
            rests_on: vec![pb::EventRef {
                position: 40,
                version: 6,
                event_type: "nsml.v1.SubmitSucceeded".into(),
                recorded_at_ms: 1_796_083_260_000,
                note: "submission s1 on `t1-cls` succeeded".into(),
            }],
            ..Default::default()
        };
        let text = render_explanation(&x);
        assert!(
            text.contains("Decision d2: refused by rule `submit_interval`"),
            "{text}"
        );
        assert!(text.contains("Retry after: 2026-12-01T01:00:00Z"), "{text}");
        assert!(
            text.contains(
                "Last successful submit on t1-cls: submission s1, submitted at 2026-12-01T00:00:00Z"
            ),
            "{text}"
        );
        assert!(
            text.contains("position 40 (version 6) SubmitSucceeded at 2026-12-01T00:01:00Z"),
            "{text}"
        );
        assert!(text.contains("the decision is the same"), "{text}");
    }
}
