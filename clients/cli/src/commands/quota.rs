//! `quota [COMPETITION] [--team TEAM] [-j]`: the team's usage against every limit, the sessions holding
//! resources, checkpoint storage, and per dataset when the next real submit is allowed and why.

use std::collections::BTreeSet;

use anyhow::{Result, bail};
use nsml_manifest::format_size;
use nsml_proto::json::to_value;
use nsml_proto::v1 as pb;
use serde_json::{Value, json};

use super::Context;
use crate::UsageError;
use crate::api::Api;
use crate::json;
use crate::output::{Table, datetime, emit, kind_name};

pub async fn quota(
    ctx: &Context,
    competition: Option<String>,
    team: Option<String>,
    as_json: bool,
) -> Result<()> {
    let api = ctx.api()?;
    let competition = match competition {
        Some(c) => c,
        None => only_competition(&api).await?,
    };
    let usage = api
        .quota()
        .usage(pb::QuotaUsageRequest {
            team: team.unwrap_or_default(),
            competition,
        })
        .await?
        .into_inner();
    if as_json {
        json::print(&usage_json(&usage));
    } else {
        emit(&render(&usage));
    }
    Ok(())
}

/// The caller's only competition (as participant or host); a usage error listing them when there are several.
async fn only_competition(api: &Api) -> Result<String> {
    let identity = api.auth().who_am_i(pb::Empty {}).await?.into_inner();
    let mine: BTreeSet<String> = identity
        .memberships
        .iter()
        .map(|m| m.competition.clone())
        .chain(identity.hosts.iter().cloned())
        .collect();
    if mine.len() == 1 {
        return Ok(mine.into_iter().next().unwrap_or_default());
    }
    if !mine.is_empty() {
        eprintln!(
            "Competitions: {}",
            mine.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    bail!(UsageError(
        "name the competition: nsml quota COMPETITION".into()
    ))
}

/// Says a duration to come the way a person would: `in 59m 30s`, `in 2h 5m`.
fn in_time(at_ms: i64, now_ms: i64) -> String {
    let secs = ((at_ms - now_ms).max(0) + 999) / 1000;
    match secs {
        0..60 => format!("in {secs}s"),
        60..3600 => format!("in {}m {}s", secs / 60, secs % 60),
        _ => format!("in {}h {}m", secs / 3600, (secs % 3600) / 60),
    }
}

fn interval(secs: u64) -> String {
    match secs {
        s if s > 0 && s % 3600 == 0 => {
            format!("{} hour{}", s / 3600, if s == 3600 { "" } else { "s" })
        }
        s if s > 0 && s % 60 == 0 => format!("{} minutes", s / 60),
        s => format!("{s} seconds"),
    }
}

/// Renders the usage as tables.
pub fn render(u: &pb::QuotaUsage) -> String {
    let mut out = format!(
        "Quota of team {} in competition {} (policy version {})\n\n",
        u.team, u.competition, u.policy_version
    );
    out.push_str(&limits_table(u));
    out.push('\n');
    out.push_str(&holdings_table(u));
    out.push('\n');
    out.push_str(&submits_section(u));
    out.push_str(&overrides_section(u));
    out
}

/// The note on a limit a host raised above the policy's.
fn raised(limit: u64, base: u64) -> String {
    if limit > base {
        format!("raised from {base}")
    } else {
        String::new()
    }
}

/// What the team holds against each limit, and where a limit was raised.
fn limits_table(u: &pb::QuotaUsage) -> String {
    let held = u.held.unwrap_or_default();
    let policy = u.policy.clone().unwrap_or_default();
    let mut t = Table::new(&["Resource", "Held", "Limit", "Note"]);
    t.row(vec![
        "GPUs".into(),
        held.gpus.to_string(),
        u.limit_gpus.to_string(),
        raised(u.limit_gpus.into(), policy.team_gpus.into()),
    ]);
    t.row(vec![
        "CPUs".into(),
        held.cpus.to_string(),
        u.limit_cpus.to_string(),
        raised(u.limit_cpus.into(), policy.team_cpus.into()),
    ]);
    t.row(vec![
        "Memory".into(),
        format_size(held.memory_bytes + held.shm_bytes),
        format_size(u.limit_memory_bytes),
        if u.limit_memory_bytes > policy.team_memory_bytes {
            format!(
                "shared memory included; raised from {}",
                format_size(policy.team_memory_bytes)
            )
        } else {
            "shared memory included".into()
        },
    ]);
    t.row(vec![
        "Sessions".into(),
        u.sessions.to_string(),
        u.limit_sessions.to_string(),
        if u.limit_sessions > policy.team_sessions {
            format!(
                "training and submit sessions; raised from {}",
                policy.team_sessions
            )
        } else {
            "training and submit sessions".into()
        },
    ]);
    t.row(vec![
        "Storage".into(),
        if u.storage_known {
            format_size(u.storage_used_bytes)
        } else {
            "unknown".into()
        },
        format_size(u.limit_storage_bytes),
        "checkpoints".into(),
    ]);
    t.render()
}

/// Which session holds what, or a line saying none does.
fn holdings_table(u: &pb::QuotaUsage) -> String {
    if u.holdings.is_empty() {
        return "No session holds resources.\n".into();
    }
    let mut t = Table::new(&["Session", "Type", "GPUs", "CPUs", "Memory", "Shm"]);
    for h in &u.holdings {
        let r = h.resources.unwrap_or_default();
        t.row(vec![
            h.session.clone(),
            kind_name(h.kind()).to_string(),
            r.gpus.to_string(),
            r.cpus.to_string(),
            format_size(r.memory_bytes),
            format_size(r.shm_bytes),
        ]);
    }
    t.render()
}

/// When the next real submit of a dataset may start.
fn next_submit(s: &pb::DatasetSubmitState, now_ms: i64) -> String {
    if s.closed {
        "never: closed".to_string()
    } else if s.not_open {
        format!(
            "{} ({}), when it opens",
            datetime(s.next_allowed_ms),
            in_time(s.next_allowed_ms, now_ms)
        )
    } else if s.in_flight {
        "after the submit in flight".to_string()
    } else if s.next_allowed_ms > now_ms && s.extra_submits == 0 {
        format!(
            "{} ({})",
            datetime(s.next_allowed_ms),
            in_time(s.next_allowed_ms, now_ms)
        )
    } else {
        "now".into()
    }
}

/// The competition's schedule, in the rules' words: when it opens, when submits close, and what counts.
fn schedule_rules(u: &pb::QuotaUsage) -> String {
    let policy = u.policy.clone().unwrap_or_default();
    let mut out = String::new();
    if policy.opens_at_ms > 0 && u.now_ms < policy.opens_at_ms {
        out.push_str(&format!(
            "The competition opens at {} ({}): runs and submits are refused until then.\n",
            datetime(policy.opens_at_ms),
            in_time(policy.opens_at_ms, u.now_ms)
        ));
    }
    if policy.closes_at_ms > 0 {
        out.push_str(&format!(
            "Deadline: submits close at {}; the boards then freeze, and the final ranking is what they show at the \
             deadline. A submit admitted before the deadline is scored after it and counts; a host can extend one \
             team's deadline (listed under the overrides in force).\n",
            datetime(policy.closes_at_ms)
        ));
    }
    out
}

/// Where a round stands at `now_ms`: upcoming, open or closed, with when that changes, and the team's
/// extension of its deadline if a host granted one.
fn round_state(
    round: &pb::Round,
    policy: &pb::Policy,
    u: &pb::QuotaUsage,
) -> (&'static str, String) {
    let now = u.now_ms;
    let rules = policy.rules_for(round.datasets.first().map_or("", String::as_str));
    let (opens, closes) = (rules.opens_at_ms, rules.closes_at_ms);
    let extended = u
        .overrides
        .iter()
        .filter(|o| o.kind() == pb::OverrideKind::ExtendDeadline && rules.extended_by(&o.round))
        .map(|o| o.until_ms)
        .max()
        .filter(|until| *until > closes);
    if opens > 0 && now < opens {
        return (
            "upcoming",
            format!("upcoming (opens {})", in_time(opens, now)),
        );
    }
    match extended {
        Some(until) if closes > 0 && now >= closes && now < until => (
            "extended",
            format!(
                "closed; open to the team until {} by a host's extension",
                datetime(until)
            ),
        ),
        _ if closes > 0 && now >= closes => ("closed", "closed".into()),
        _ if closes > 0 => ("open", format!("open (closes {})", in_time(closes, now))),
        _ => ("open", "open".into()),
    }
}

/// The submit rules a round's datasets follow, the round's where it sets them.
fn round_rules(round: &pb::Round, policy: &pb::Policy) -> String {
    let rules = policy.rules_for(round.datasets.first().map_or("", String::as_str));
    format!(
        "one per {}, at most {} CPUs, within {}",
        interval(rules.submit_interval_secs),
        rules.submit_max_cpus,
        interval(rules.submit_time_limit_secs)
    )
}

/// The competition's rounds, each with its datasets, dates, state and submit rules, and what counts at a
/// round's deadline.
fn rounds_section(u: &pb::QuotaUsage) -> String {
    let policy = u.policy.clone().unwrap_or_default();
    if policy.rounds.is_empty() {
        return String::new();
    }
    let mut t = Table::new(&[
        "Round",
        "Datasets",
        "Opens",
        "Closes",
        "State",
        "Submit Rules",
    ]);
    for r in &policy.rounds {
        let rules = policy.rules_for(r.datasets.first().map_or("", String::as_str));
        t.row(vec![
            r.name.clone(),
            r.datasets.join(", "),
            datetime(rules.opens_at_ms),
            datetime(rules.closes_at_ms),
            round_state(r, &policy, u).1,
            round_rules(r, &policy),
        ]);
    }
    format!(
        "Rounds: a dataset in a round follows the round's dates and submit rules; the others follow the \
         competition's. Before a round opens, runs and submits on its datasets are refused; at its deadline \
         submits on them close and their boards freeze. A submit admitted before the round's deadline is scored \
         after it and counts; a host can extend one team's deadline for a round (listed under the overrides in \
         force).\n{}",
        t.render()
    )
}

/// The submit rules, each dataset's submit timing, and submissions a host re-opened.
fn submits_section(u: &pb::QuotaUsage) -> String {
    let mut out = format!(
        "Real submits: one per {} per dataset, counted from the last successful one; a submit runs on the \
         training session's GPUs and at most {} CPUs, and must finish within {}.\n",
        interval(u.submit_interval_secs),
        u.submit_max_cpus,
        interval(u.submit_time_limit_secs)
    );
    out.push_str(&schedule_rules(u));
    out.push_str(&rounds_section(u));
    let mut t = Table::new(&["Dataset", "Last Success", "Next Submit", "Why"]);
    for s in &u.submits {
        t.row(vec![
            s.dataset.clone(),
            datetime(s.last_success_ms),
            next_submit(s, u.now_ms),
            s.why.clone(),
        ]);
    }
    out.push_str(&t.render());
    for s in u
        .submits
        .iter()
        .filter(|s| !s.reopened_submission_ids.is_empty())
    {
        out.push_str(&format!(
            "Re-opened by a host on {} (counted neither as in flight nor for the interval): {}\n",
            s.dataset,
            s.reopened_submission_ids.join(", ")
        ));
    }
    out
}

/// The overrides in force, if any.
fn overrides_section(u: &pb::QuotaUsage) -> String {
    if u.overrides.is_empty() {
        return String::new();
    }
    let mut out = "\nOverrides in force:\n".to_string();
    for o in &u.overrides {
        out.push_str(&format!("  {}\n", super::audit::describe_override(o)));
    }
    out
}

fn resources_json(r: Option<&pb::Resources>) -> Value {
    to_value(&r.copied().unwrap_or_default())
}

/// The usage as JSON, fields named as in the API.
pub fn usage_json(u: &pb::QuotaUsage) -> Value {
    let p = u.policy.clone().unwrap_or_default();
    json!({
        "team": u.team,
        "competition": u.competition,
        "policy_version": u.policy_version,
        "now_ms": u.now_ms,
        "held": resources_json(u.held.as_ref()),
        "sessions": u.sessions,
        "limits": {
            "gpus": u.limit_gpus,
            "cpus": u.limit_cpus,
            "memory_bytes": u.limit_memory_bytes,
            "sessions": u.limit_sessions,
            "storage_bytes": u.limit_storage_bytes,
        },
        "policy": {
            "team_gpus": p.team_gpus,
            "team_cpus": p.team_cpus,
            "team_memory_bytes": p.team_memory_bytes,
            "team_sessions": p.team_sessions,
            "team_storage_bytes": p.team_storage_bytes,
            "submit_interval_secs": p.submit_interval_secs,
            "submit_time_limit_secs": p.submit_time_limit_secs,
            "submit_max_cpus": p.submit_max_cpus,
        },
        "storage_used_bytes": if u.storage_known { json!(u.storage_used_bytes) } else { Value::Null },
        "submit_interval_secs": u.submit_interval_secs,
        "submit_max_cpus": u.submit_max_cpus,
        "submit_time_limit_secs": u.submit_time_limit_secs,
        "holdings": u.holdings.iter().map(|h| json!({
            "session": h.session,
            "kind": kind_name(h.kind()),
            "resources": resources_json(h.resources.as_ref()),
        })).collect::<Vec<_>>(),
        "submits": u.submits.iter().map(|s| json!({
            "dataset": s.dataset,
            "last_success_ms": s.last_success_ms,
            "last_success_submission_id": s.last_success_submission_id,
            "next_allowed_ms": s.next_allowed_ms,
            "in_flight": s.in_flight,
            "in_flight_submission_id": s.in_flight_submission_id,
            "extra_submits": s.extra_submits,
            "reopened_submission_ids": s.reopened_submission_ids,
            "why": s.why,
        })).collect::<Vec<_>>(),
        "overrides": u.overrides.iter().map(super::audit::override_json).collect::<Vec<_>>(),
        "opens_at_ms": p.opens_at_ms,
        "closes_at_ms": p.closes_at_ms,
        "rounds": p.rounds.iter().map(|r| {
            let rules = p.rules_for(r.datasets.first().map_or("", String::as_str));
            json!({
                "name": r.name,
                "datasets": r.datasets,
                "opens_at_ms": rules.opens_at_ms,
                "closes_at_ms": rules.closes_at_ms,
                "state": round_state(r, &p, u).0,
                "submit_interval_secs": rules.submit_interval_secs,
                "submit_time_limit_secs": rules.submit_time_limit_secs,
                "submit_max_cpus": rules.submit_max_cpus,
            })
        }).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dataset_not_open_yet_or_closed_says_so_whatever_the_extra_submits() {
        let not_open = pb::DatasetSubmitState {
            not_open: true,
            next_allowed_ms: 7_200_000,
            extra_submits: 1,
            ..Default::default()
        };
        assert!(next_submit(&not_open, 3_600_000).ends_with("(in 1h 0m), when it opens"));
        let closed = pb::DatasetSubmitState {
            closed: true,
            extra_submits: 1,
            ..Default::default()
        };
        assert_eq!(next_submit(&closed, 3_600_000), "never: closed");
    }

    #[test]
    fn usage_shows_every_limit_the_holders_and_the_next_submit() {
        let g = 1u64 << 30;
        let u = pb::QuotaUsage {
            team: "demo".into(),
            competition: "demo".into(),
            held: Some(pb::Resources {
                gpus: 1,
                cpus: 8,
                memory_bytes: 75 * g,
                shm_bytes: 10 * g,
            }),
            sessions: 1,
            holdings: vec![pb::Holding {
                session: "demo/t1-cls/1".into(),
                resources: Some(pb::Resources {
                    gpus: 1,
                    cpus: 8,
                    memory_bytes: 75 * g,
                    shm_bytes: 10 * g,
                }),
                kind: pb::SessionKind::Train as i32,
            }],
            submits: vec![pb::DatasetSubmitState {
                dataset: "t1-cls".into(),
                last_success_ms: 1_000_000,
                next_allowed_ms: 1_000_000 + 3_600_000,
                why: "at …: one real submit per 1 hour".into(),
                ..Default::default()
            }],
            policy_version: 1,
            limit_gpus: 4,
            limit_cpus: 16,
            limit_memory_bytes: 170 * g,
            limit_sessions: 2,
            submit_interval_secs: 3600,
            limit_storage_bytes: 450 * g,
            storage_used_bytes: 1234,
            storage_known: true,
            submit_max_cpus: 4,
            submit_time_limit_secs: 3600,
            now_ms: 1_000_000 + 60_000,
            policy: Some(pb::Policy {
                team_gpus: 2,
                team_cpus: 16,
                team_memory_bytes: 170 * g,
                team_sessions: 2,
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = render(&u);
        let row = |first: &str| -> Vec<&str> {
            text.lines()
                .find(|l| l.starts_with(first))
                .map(|l| l.split_whitespace().collect())
                .unwrap_or_default()
        };
        assert_eq!(
            row("GPUs"),
            ["GPUs", "1", "4", "raised", "from", "2"],
            "{text}"
        );
        assert_eq!(
            row("Memory")[..5],
            ["Memory", "85", "GB", "170", "GB"],
            "{text}"
        );
        assert_eq!(
            row("Storage")[..5],
            ["Storage", "1.21", "KB", "450", "GB"],
            "{text}"
        );
        assert_eq!(
            row("demo/t1-cls/1")[..4],
            ["demo/t1-cls/1", "train", "1", "8"],
            "{text}"
        );
        assert!(text.contains("(in 59m 0s)"), "{text}");
        assert!(!text.contains("Re-opened"), "{text}");
        assert!(
            !text.contains("Deadline"),
            "no schedule, no deadline: {text}"
        );
        let scheduled = pb::QuotaUsage {
            policy: Some(pb::Policy {
                opens_at_ms: u.now_ms + 120_000,
                closes_at_ms: u.now_ms + 3_600_000,
                ..u.policy.clone().unwrap_or_default()
            }),
            ..u.clone()
        };
        let text = render(&scheduled);
        assert!(
            text.contains("The competition opens at") && text.contains("(in 2m 0s)"),
            "{text}"
        );
        assert!(
            text.contains("A submit admitted before the deadline is scored after it and counts"),
            "{text}"
        );
        let v = usage_json(&u);
        assert_eq!(v["limits"]["gpus"], 4);
        assert_eq!(v["policy"]["team_gpus"], 2);
        assert_eq!(v["storage_used_bytes"], 1234);
        assert_eq!(v["submits"][0]["next_allowed_ms"], 4_600_000);
    }

    #[test]
    fn usage_shows_each_round_its_state_and_rules_and_what_counts_at_its_deadline() {
        let now = 10 * 3_600_000;
        let round = |name: &str, dataset: &str, opens: i64, closes: i64| pb::Round {
            name: name.into(),
            datasets: vec![dataset.into()],
            opens_at_ms: now + opens,
            closes_at_ms: now + closes,
            ..Default::default()
        };
        let u = pb::QuotaUsage {
            team: "demo".into(),
            competition: "demo".into(),
            now_ms: now,
            policy: Some(pb::Policy {
                submit_interval_secs: 3600,
                submit_time_limit_secs: 3600,
                submit_max_cpus: 4,
                rounds: vec![
                    pb::Round {
                        submit_interval_secs: Some(600),
                        ..round("preliminary", "t1-cls", -7_200_000, -3_600_000)
                    },
                    round("final", "t2-reg", 3_600_000, 7_200_000),
                    round("warmup", "t3", -7_200_000, 60_000),
                ],
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = render(&u);
        let row = |first: &str| -> String {
            text.lines()
                .find(|l| l.starts_with(first))
                .unwrap_or_default()
                .to_string()
        };
        assert!(
            row("preliminary").contains("t1-cls")
                && row("preliminary").contains(" closed ")
                && row("preliminary").contains("one per 10 minutes, at most 4 CPUs, within 1 hour"),
            "{text}"
        );
        assert!(
            row("final").contains("upcoming (opens in 1h 0m)")
                && row("final").contains("one per 1 hour"),
            "{text}"
        );
        assert!(row("warmup").contains("open (closes in 1m 0s)"), "{text}");
        assert!(
            text.contains(
                "A submit admitted before the round's deadline is scored after it and counts"
            ),
            "{text}"
        );
        // A host's extension of the team's preliminary deadline shows on the round.
        let extended = pb::QuotaUsage {
            overrides: vec![pb::Override {
                kind: pb::OverrideKind::ExtendDeadline as i32,
                round: "preliminary".into(),
                until_ms: now + 600_000,
                ..Default::default()
            }],
            ..u.clone()
        };
        let text = render(&extended);
        assert!(text.contains("closed; open to the team until"), "{text}");
        let v = usage_json(&extended);
        let states: Vec<&str> = v["rounds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["state"].as_str().unwrap())
            .collect();
        assert_eq!(states, ["extended", "upcoming", "open"]);
        assert_eq!(v["rounds"][0]["submit_interval_secs"], 600);
        assert_eq!(v["rounds"][1]["datasets"][0], "t2-reg");
        // Without rounds, no section.
        assert!(!render(&pb::QuotaUsage::default()).contains("Rounds:"));
    }

    #[test]
    fn usage_shows_the_reopened_submits_and_their_override() {
        let u = pb::QuotaUsage {
            team: "demo".into(),
            competition: "demo".into(),
            submits: vec![pb::DatasetSubmitState {
                dataset: "t1-cls".into(),
                why: "now: no successful real submit counts".into(),
                reopened_submission_ids: vec!["sub-1".into()],
                ..Default::default()
            }],
            overrides: vec![pb::Override {
                id: "o9".into(),
                kind: pb::OverrideKind::ReopenSubmit as i32,
                dataset: "t1-cls".into(),
                submission_id: "sub-1".into(),
                description: "override o9: re-opened the slot of submit sub-1 on `t1-cls`, granted by user:host at 2026-12-01T00:00:00Z (scorer fault)".into(),
                ..Default::default()
            }],
            now_ms: 1,
            ..Default::default()
        };
        let text = render(&u);
        assert!(
            text.contains(
                "Re-opened by a host on t1-cls (counted neither as in flight nor for the interval): sub-1"
            ),
            "{text}"
        );
        assert!(
            text.contains("  override o9: re-opened the slot of submit sub-1 on `t1-cls`"),
            "{text}"
        );
        let v = usage_json(&u);
        assert_eq!(v["submits"][0]["reopened_submission_ids"][0], "sub-1");
        assert_eq!(v["overrides"][0]["kind"], "reopen_submit");
    }
}
