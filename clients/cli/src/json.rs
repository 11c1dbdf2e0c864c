//! The `-j/--json` output: API messages as JSON objects with snake_case fields named as in the protos, enums as
//! lowercase words, times as milliseconds since the epoch (`*_ms`), summaries as JSON objects.

use nsml_proto::v1 as pb;
use serde_json::{Value, json};

use crate::output::{direction_name, kind_name, session_status, status_name};

/// Parses a JSON text the server passed through (a summary); text that is not JSON stays a string, empty is null.
fn embedded(text: &str) -> Value {
    if text.trim().is_empty() {
        return Value::Null;
    }
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

fn resources(r: Option<&pb::Resources>) -> Value {
    let r = r.cloned().unwrap_or_default();
    json!({
        "gpus": r.gpus,
        "cpus": r.cpus,
        "memory_bytes": r.memory_bytes,
        "shm_bytes": r.shm_bytes,
    })
}

pub fn session(s: &pb::Session) -> Value {
    json!({
        "name": s.name,
        "team": s.team,
        "dataset": s.dataset,
        "competition": s.competition,
        "number": s.number,
        "kind": kind_name(s.kind()),
        "status": status_name(s.status()).to_ascii_lowercase(),
        "status_label": session_status(s),
        "exit_code": s.exit_code,
        "reason": s.reason,
        "entry": s.entry,
        "args": s.args,
        "memo": s.memo,
        "resources": resources(s.resources.as_ref()),
        "gpu_ids": s.gpu_ids,
        "code_snapshot": s.code_snapshot,
        "created_at_ms": s.created_at_ms,
        "started_at_ms": s.started_at_ms,
        "ended_at_ms": s.ended_at_ms,
        "summary": embedded(&s.summary_json),
        "source_session": s.source_session,
        "source_checkpoint": s.source_checkpoint,
        "submission_id": s.submission_id,
        "checkpoint_count": s.checkpoint_count,
        "checkpoint_bytes": s.checkpoint_bytes,
        "interactive": s.interactive,
    })
}

pub fn checkpoint(c: &pb::Checkpoint) -> Value {
    json!({
        "session": c.session,
        "name": c.name,
        "size_bytes": c.size_bytes,
        "saved_at_ms": c.saved_at_ms,
        "elapsed_secs": c.elapsed_secs,
        "summary": embedded(&c.summary_json),
    })
}

pub fn dataset(d: &pb::Dataset) -> Value {
    let meta = d.meta.clone().unwrap_or_default();
    json!({
        "name": meta.name,
        "competition": meta.competition,
        "description": meta.description,
        "metric": meta.metric,
        "direction": direction_name(meta.direction()),
        "tag": meta.tag,
        "size_bytes": d.size_bytes,
        "updated_at_ms": d.updated_at_ms,
        "author": d.author,
        "has_trial": d.has_trial,
        "test_items": d.test_items,
    })
}

pub fn board(b: &pb::BoardResponse) -> Value {
    json!({
        "dataset": b.dataset,
        "competition": b.competition,
        "metric": b.metric,
        "direction": direction_name(b.direction()),
        "private": b.private,
        "rows": b.rows.iter().map(|r| json!({
            "rank": r.rank,
            "team": r.team,
            "score": r.score,
            "model": r.model,
            "count": r.count,
            "last_submit_ms": r.last_submit_ms,
            "best_at_ms": r.best_at_ms,
        })).collect::<Vec<_>>(),
    })
}

pub fn overall(o: &pb::OverallResponse) -> Value {
    json!({
        "competition": o.competition,
        "datasets": o.datasets,
        "private": o.private,
        "rows": o.rows.iter().map(|r| json!({
            "rank": r.rank,
            "team": r.team,
            "mean_rank": r.mean_rank,
            "ranks": r.ranks,
        })).collect::<Vec<_>>(),
    })
}

pub fn history_entry(e: &pb::HistoryEntry) -> Value {
    json!({
        "submission_id": e.submission_id,
        "team": e.team,
        "dataset": e.dataset,
        "model": e.model,
        "score": e.score,
        "private_score": e.private_score,
        "at_ms": e.at_ms,
    })
}

pub fn identity(i: &pb::Identity) -> Value {
    json!({
        "username": i.username,
        "admin": i.admin,
        "memberships": i.memberships.iter().map(|m| json!({
            "team": m.team,
            "competition": m.competition,
        })).collect::<Vec<_>>(),
        "hosts": i.hosts,
    })
}

pub fn competition(c: &pb::Competition) -> Value {
    let policy = c.policy.unwrap_or_default();
    json!({
        "id": c.id,
        "title": c.title,
        "datasets": c.datasets.iter().map(|d| json!({
            "name": d.name,
            "metric": d.metric,
            "direction": direction_name(d.direction()),
        })).collect::<Vec<_>>(),
        "policy": {
            "team_gpus": policy.team_gpus,
            "team_cpus": policy.team_cpus,
            "team_memory_bytes": policy.team_memory_bytes,
            "team_sessions": policy.team_sessions,
            "team_storage_bytes": policy.team_storage_bytes,
            "submit_interval_secs": policy.submit_interval_secs,
            "submit_time_limit_secs": policy.submit_time_limit_secs,
            "submit_max_cpus": policy.submit_max_cpus,
        },
        "teams": c.teams.iter().map(|t| json!({"name": t.name, "members": t.members})).collect::<Vec<_>>(),
        "hosts": c.hosts,
        "private_revealed": c.private_revealed,
        "policy_version": c.policy_version,
    })
}

/// Prints a JSON value, pretty, followed by a newline.
pub fn print(value: &Value) {
    // Serializing a `Value` cannot fail: its map keys are strings.
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_carry_status_kind_and_summary_as_json() {
        let s = pb::Session {
            name: "demo/t1-cls/3".into(),
            kind: pb::SessionKind::TrialSubmit as i32,
            status: pb::SessionStatus::Failed as i32,
            exit_code: 137,
            reason: "Killed (out of memory: limit 24G)".into(),
            summary_json: r#"{"acc":0.5}"#.into(),
            ..Default::default()
        };
        let v = session(&s);
        assert_eq!(v["kind"], "trial");
        assert_eq!(v["status"], "failed");
        assert_eq!(v["status_label"], "Failed (exit 137)");
        assert_eq!(v["reason"], "Killed (out of memory: limit 24G)");
        assert_eq!(v["summary"]["acc"], 0.5);
        assert_eq!(session(&pb::Session::default())["summary"], Value::Null);
    }
}
