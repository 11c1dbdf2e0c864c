//! The hosts' overrides: what a request for one must say, which competition it falls under, which submit's
//! slot can be re-opened, and the grant recorded in the team's ledger.

use std::collections::BTreeSet;

use nsml_eventstore::StoredEvent;
use nsml_proto::v1::{EventPayload, Override, OverrideKind, OverrideRequest, Policy, SubmitEnded};

use super::format::fmt_time;
use super::ledger::{LedgerEvent, ReopenRefused};

/// Why an override request is refused before any ledger is read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OverrideRefused {
    #[error("an override needs a team")]
    NoTeam,
    #[error("an override needs a reason: it is recorded in the team's ledger")]
    NoReason,
    #[error("an extra submit needs a dataset")]
    ExtraNeedsDataset,
    #[error(
        "re-opening a submit's slot needs the submission id: `nsml admin audit export --team {team}` lists the team's submits"
    )]
    ReopenNeedsSubmission { team: String },
    #[error("a quota raise needs at least one new limit (GPUs, CPUs, memory or sessions)")]
    RaiseNeedsLimit,
    #[error("a quota raise needs an end in the future, not {}", fmt_time(*.until_ms))]
    RaiseEndsInPast { until_ms: i64 },
    #[error("an extended deadline must be in the future, not {}", fmt_time(*.until_ms))]
    DeadlineInPast { until_ms: i64 },
    #[error(
        "an override is an extra submit, a quota raise, a re-opened submit or an extended deadline"
    )]
    NoKind,
    #[error("dataset `{dataset}` not found")]
    DatasetNotFound { dataset: String },
    #[error("team `{team}` is in no competition")]
    NoCompetition { team: String },
    #[error(
        "team `{team}` is in several competitions ({competitions}): name one with --competition"
    )]
    SeveralCompetitions { team: String, competitions: String },
    #[error("team `{team}` is not in competition `{competition}`")]
    TeamNotIn { team: String, competition: String },
    #[error(
        "submission {submission} is a submit on dataset `{dataset}`, which is not in competition `{competition}`: leave out the competition to use the dataset's"
    )]
    ReopenedDatasetNotIn {
        submission: String,
        dataset: String,
        competition: String,
    },
    #[error("dataset `{dataset}` is not in competition `{competition}`")]
    DatasetNotIn {
        dataset: String,
        competition: String,
    },
    #[error(
        "only an extended deadline names a round (`--round {round}`); leave it out of this override"
    )]
    RoundNotDeadline { round: String },
    #[error("competition `{competition}` has no round `{round}`; its rounds are {rounds}")]
    RoundNotFound {
        round: String,
        competition: String,
        rounds: String,
    },
}

/// Checks what an override request must say for its kind at `now_ms`: a team, a reason, and an extra
/// submit's dataset, a re-opened slot's submission, or a raise's new limits and future end.
pub fn check_request(r: &OverrideRequest, now_ms: i64) -> Result<(), OverrideRefused> {
    if r.team.is_empty() {
        return Err(OverrideRefused::NoTeam);
    }
    if r.reason.trim().is_empty() {
        return Err(OverrideRefused::NoReason);
    }
    match r.kind() {
        OverrideKind::ExtraSubmit if r.dataset.is_empty() => {
            Err(OverrideRefused::ExtraNeedsDataset)
        }
        OverrideKind::ReopenSubmit if r.submission_id.trim().is_empty() => {
            Err(OverrideRefused::ReopenNeedsSubmission {
                team: r.team.clone(),
            })
        }
        OverrideKind::RaiseQuota => {
            let raise = r.raise.unwrap_or_default();
            if raise.gpus == 0 && raise.cpus == 0 && raise.memory_bytes == 0 && raise.sessions == 0
            {
                Err(OverrideRefused::RaiseNeedsLimit)
            } else if r.until_ms <= now_ms {
                Err(OverrideRefused::RaiseEndsInPast {
                    until_ms: r.until_ms,
                })
            } else {
                Ok(())
            }
        }
        OverrideKind::ExtendDeadline if r.until_ms <= now_ms => {
            Err(OverrideRefused::DeadlineInPast {
                until_ms: r.until_ms,
            })
        }
        OverrideKind::Unspecified => Err(OverrideRefused::NoKind),
        OverrideKind::ExtraSubmit | OverrideKind::ReopenSubmit | OverrideKind::ExtendDeadline => {
            Ok(())
        }
    }
}

/// Checks the round an override names against the competition's policy: only an extended deadline names one,
/// and it must be a round the policy has.
pub fn check_round(
    kind: OverrideKind,
    round: &str,
    competition: &str,
    policy: Option<&Policy>,
) -> Result<(), OverrideRefused> {
    if round.is_empty() {
        return Ok(());
    }
    if kind != OverrideKind::ExtendDeadline {
        return Err(OverrideRefused::RoundNotDeadline {
            round: round.to_string(),
        });
    }
    if policy.is_some_and(|p| p.round(round).is_some()) {
        return Ok(());
    }
    let names: Vec<String> = policy
        .into_iter()
        .flat_map(|p| p.rounds.iter().map(|r| format!("`{}`", r.name)))
        .collect();
    Err(OverrideRefused::RoundNotFound {
        round: round.to_string(),
        competition: competition.to_string(),
        rounds: if names.is_empty() {
            "none (leave out --round to extend the competition's deadline)".into()
        } else {
            names.join(", ")
        },
    })
}

/// Whether an override of `kind` applies to one dataset (an extra submit, a re-opened slot) rather than to
/// the team's limits in a competition.
pub fn per_dataset(kind: OverrideKind) -> bool {
    !matches!(
        kind,
        OverrideKind::RaiseQuota | OverrideKind::ExtendDeadline
    )
}

/// What the catalog knows that places an override in a competition.
#[derive(Debug, Clone, Default)]
pub struct Placement<'a> {
    /// The competition the host named, or empty.
    pub requested: &'a str,
    /// The competition the override's dataset belongs to, if the catalog knows the dataset.
    pub dataset_competition: Option<&'a str>,
    /// The competitions the team entered.
    pub entered: Option<&'a BTreeSet<String>>,
}

/// The competition an override falls under: the one the host named; else, for a per-dataset override, its
/// dataset's; else the one competition the team entered.
pub fn override_competition(
    kind: OverrideKind,
    team: &str,
    dataset: &str,
    at: Placement<'_>,
) -> Result<String, OverrideRefused> {
    if !at.requested.is_empty() {
        return Ok(at.requested.to_string());
    }
    if per_dataset(kind) {
        return at.dataset_competition.map(str::to_string).ok_or_else(|| {
            OverrideRefused::DatasetNotFound {
                dataset: dataset.to_string(),
            }
        });
    }
    let entered: Vec<&String> = at.entered.into_iter().flatten().collect();
    match entered.as_slice() {
        [one] => Ok(one.to_string()),
        [] => Err(OverrideRefused::NoCompetition {
            team: team.to_string(),
        }),
        several => Err(OverrideRefused::SeveralCompetitions {
            team: team.to_string(),
            competitions: several
                .iter()
                .map(|c| c.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// Checks that the team is in the override's competition (`team_in`) and, for a per-dataset override, that
/// its dataset is too (`dataset_in`).
pub fn check_placement(
    kind: OverrideKind,
    team: &str,
    submission: &str,
    dataset: &str,
    competition: &str,
    (team_in, dataset_in): (bool, bool),
) -> Result<(), OverrideRefused> {
    match (team_in, dataset_in || !per_dataset(kind)) {
        (false, _) => Err(OverrideRefused::TeamNotIn {
            team: team.to_string(),
            competition: competition.to_string(),
        }),
        (_, false) if kind == OverrideKind::ReopenSubmit => {
            Err(OverrideRefused::ReopenedDatasetNotIn {
                submission: submission.to_string(),
                dataset: dataset.to_string(),
                competition: competition.to_string(),
            })
        }
        (_, false) => Err(OverrideRefused::DatasetNotIn {
            dataset: dataset.to_string(),
            competition: competition.to_string(),
        }),
        _ => Ok(()),
    }
}

/// The dataset of a submit whose slot a host asks to re-open, given what the ledger knows of it (`known`) and,
/// when the ledger does not know it, the dataset of the submit of that id that ended without success
/// (`failed`); `dataset`, when given, must be the submit's. Else why its slot cannot be re-opened.
pub fn reopen_dataset(
    known: Result<&str, ReopenRefused>,
    failed: Option<String>,
    submission: &str,
    dataset: &str,
) -> Result<String, ReopenRefused> {
    let found = match (known, failed) {
        (Ok(found), _) => found,
        (Err(ReopenRefused::Unknown { .. }), Some(failed)) => {
            return Err(ReopenRefused::Failed {
                submission: submission.to_string(),
                dataset: failed,
            });
        }
        (Err(e), _) => return Err(e),
    };
    if !dataset.is_empty() && dataset != found {
        return Err(ReopenRefused::OtherDataset {
            submission: submission.to_string(),
            found: found.to_string(),
            dataset: dataset.to_string(),
        });
    }
    Ok(found.to_string())
}

/// The dataset of the real submit `submission` if the ledger's events record that it ended without success.
pub fn failed_submit(events: &[StoredEvent], submission: &str) -> Option<String> {
    events
        .iter()
        .filter(|ev| ev.event_type == SubmitEnded::TYPE)
        .filter_map(|ev| match LedgerEvent::decode(ev) {
            Some(LedgerEvent::Ended(e)) => Some(e),
            _ => None,
        })
        .find(|e| e.submission_id == submission)
        .map(|e| e.dataset)
}

/// Who grants an override, when, and under which ids.
#[derive(Debug, Clone)]
pub struct Granting {
    pub id: String,
    pub command_id: String,
    pub granted_by: String,
    pub granted_at_ms: i64,
}

/// The override to record for a checked request: a per-dataset one names its dataset (and a re-opened slot
/// its submission), a raise its new limits and end; the rest is left out of the log.
pub fn new_override(
    r: &OverrideRequest,
    competition: String,
    dataset: &str,
    submission: &str,
    by: Granting,
) -> Override {
    let kind = r.kind();
    let raise = kind == OverrideKind::RaiseQuota;
    Override {
        id: by.id,
        competition,
        team: r.team.clone(),
        kind: kind as i32,
        dataset: if per_dataset(kind) {
            dataset.to_string()
        } else {
            String::new()
        },
        submission_id: submission.to_string(),
        raise: if raise { r.raise } else { None },
        until_ms: if raise || kind == OverrideKind::ExtendDeadline {
            r.until_ms
        } else {
            0
        },
        reason: r.reason.trim().to_string(),
        round: if kind == OverrideKind::ExtendDeadline {
            r.round.trim().to_string()
        } else {
            String::new()
        },
        granted_by: by.granted_by,
        granted_at_ms: by.granted_at_ms,
        command_id: by.command_id,
        used_by: String::new(),
        // Worded when shown, so the log keeps only the facts.
        description: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use nsml_proto::v1::{QuotaRaise, SessionKind};

    use super::*;
    use crate::domain::tests::{failed, given, granted, reopen, req, success};

    const NOW: i64 = 1_000_000;

    fn request(kind: OverrideKind) -> OverrideRequest {
        OverrideRequest {
            team: "demo".into(),
            kind: kind as i32,
            dataset: "t1-cls".into(),
            submission_id: "sub-1".into(),
            reason: "scorer outage".into(),
            raise: Some(QuotaRaise {
                gpus: 4,
                ..Default::default()
            }),
            until_ms: NOW + 1,
            ..Default::default()
        }
    }

    #[test]
    fn an_override_request_says_what_its_kind_needs() {
        // Given complete requests of each kind, when checked, then they pass.
        for kind in [
            OverrideKind::ExtraSubmit,
            OverrideKind::RaiseQuota,
            OverrideKind::ReopenSubmit,
        ] {
            assert_eq!(check_request(&request(kind), NOW), Ok(()), "{kind:?}");
        }
        // Given requests that leave out what their kind needs, when checked, then each is refused so.
        let refused = |f: fn(&mut OverrideRequest), kind| {
            let mut r = request(kind);
            f(&mut r);
            check_request(&r, NOW).unwrap_err()
        };
        assert_eq!(
            refused(|r| r.team.clear(), OverrideKind::ExtraSubmit),
            OverrideRefused::NoTeam
        );
        assert_eq!(
            refused(|r| r.reason = "  ".into(), OverrideKind::ExtraSubmit),
            OverrideRefused::NoReason
        );
        assert_eq!(
            refused(|r| r.dataset.clear(), OverrideKind::ExtraSubmit),
            OverrideRefused::ExtraNeedsDataset
        );
        assert_eq!(
            refused(|r| r.submission_id = " ".into(), OverrideKind::ReopenSubmit).to_string(),
            "re-opening a submit's slot needs the submission id: `nsml admin audit export --team demo` lists the team's submits"
        );
        assert_eq!(
            refused(|r| r.raise = None, OverrideKind::RaiseQuota),
            OverrideRefused::RaiseNeedsLimit
        );
        assert_eq!(
            refused(|r| r.until_ms = NOW, OverrideKind::RaiseQuota),
            OverrideRefused::RaiseEndsInPast { until_ms: NOW }
        );
        assert_eq!(
            refused(|_| {}, OverrideKind::Unspecified),
            OverrideRefused::NoKind
        );
    }

    #[test]
    fn an_override_falls_under_the_named_competition_its_datasets_or_the_teams_only_one() {
        let one: BTreeSet<String> = ["demo".to_string()].into();
        let two: BTreeSet<String> = ["demo".to_string(), "other".to_string()].into();
        let place = |kind, requested, dataset_competition, entered| {
            override_competition(
                kind,
                "demo",
                "t1-cls",
                Placement {
                    requested,
                    dataset_competition,
                    entered,
                },
            )
        };
        // Given a competition named by the host, then that one.
        assert_eq!(
            place(OverrideKind::RaiseQuota, "named", None, Some(&two)),
            Ok("named".into())
        );
        // Given a per-dataset override, then its dataset's, or not found without one.
        assert_eq!(
            place(OverrideKind::ExtraSubmit, "", Some("demo"), None),
            Ok("demo".into())
        );
        assert_eq!(
            place(OverrideKind::ReopenSubmit, "", None, Some(&one)),
            Err(OverrideRefused::DatasetNotFound {
                dataset: "t1-cls".into()
            })
        );
        // Given a raise, then the one competition the team entered; none or several are refused.
        assert_eq!(
            place(OverrideKind::RaiseQuota, "", None, Some(&one)),
            Ok("demo".into())
        );
        assert_eq!(
            place(OverrideKind::RaiseQuota, "", None, None)
                .unwrap_err()
                .to_string(),
            "team `demo` is in no competition"
        );
        assert_eq!(
            place(OverrideKind::RaiseQuota, "", None, Some(&two))
                .unwrap_err()
                .to_string(),
            "team `demo` is in several competitions (demo, other): name one with --competition"
        );
    }

    #[test]
    fn an_override_needs_its_team_and_dataset_in_its_competition() {
        let check = |kind, placed| check_placement(kind, "demo", "sub-1", "t1-cls", "comp", placed);
        // Given both in the competition, then it is placed.
        assert_eq!(check(OverrideKind::ExtraSubmit, (true, true)), Ok(()));
        // Given a raise, then its dataset does not matter.
        assert_eq!(check(OverrideKind::RaiseQuota, (true, false)), Ok(()));
        // Given a team outside it, then refused first.
        assert!(matches!(
            check(OverrideKind::ExtraSubmit, (false, false)),
            Err(OverrideRefused::TeamNotIn { .. })
        ));
        // Given a dataset outside it, then refused, a re-opened submit's with a hint.
        assert!(matches!(
            check(OverrideKind::ExtraSubmit, (true, false)),
            Err(OverrideRefused::DatasetNotIn { .. })
        ));
        assert!(
            check(OverrideKind::ReopenSubmit, (true, false))
                .unwrap_err()
                .to_string()
                .ends_with("leave out the competition to use the dataset's")
        );
    }

    #[test]
    fn a_slot_is_reopened_only_for_a_submit_the_ledger_has_in_flight_or_succeeded() {
        // Given a submit in flight, one succeeded and one re-opened already,
        let mut events = success(1, "sub-ok", 0).to_vec();
        events.push(granted(
            req(SessionKind::Submit, "demo/t1-cls/2", 0, 4, "sub-run"),
            1,
        ));
        let l = given(&events);
        let mut again = events.clone();
        again.push(reopen("ovr-1", "sub-run"));
        let reopened = given(&again);
        // when a host asks to re-open each, then the in flight and the succeeded have a slot on their dataset,
        assert_eq!(
            reopen_dataset(l.reopenable("demo", "sub-run"), None, "sub-run", ""),
            Ok("t1-cls".into())
        );
        assert_eq!(
            reopen_dataset(l.reopenable("demo", "sub-ok"), None, "sub-ok", "t1-cls"),
            Ok("t1-cls".into())
        );
        // a dataset other than the submit's is refused,
        assert!(matches!(
            reopen_dataset(l.reopenable("demo", "sub-ok"), None, "sub-ok", "t2-reg"),
            Err(ReopenRefused::OtherDataset { .. })
        ));
        // one re-opened already is refused,
        assert!(matches!(
            reopen_dataset(reopened.reopenable("demo", "sub-run"), None, "sub-run", ""),
            Err(ReopenRefused::AlreadyReopened { .. })
        ));
        // an unknown one that the log shows failed is refused as failed, else as unknown.
        assert!(matches!(
            reopen_dataset(
                l.reopenable("demo", "sub-x"),
                Some("t1-cls".into()),
                "sub-x",
                ""
            ),
            Err(ReopenRefused::Failed { .. })
        ));
        assert!(matches!(
            reopen_dataset(l.reopenable("demo", "sub-x"), None, "sub-x", ""),
            Err(ReopenRefused::Unknown { .. })
        ));
    }

    #[test]
    fn the_log_tells_a_failed_submit_apart_from_an_unknown_one() {
        // Given a ledger whose events record sub-1 failing,
        let events = [
            granted(req(SessionKind::Submit, "demo/t1-cls/1", 0, 4, "sub-1"), 0),
            failed("sub-1", 5),
        ];
        // when a host asks about it, then its dataset; about another, nothing.
        assert_eq!(failed_submit(&events, "sub-1"), Some("t1-cls".into()));
        assert_eq!(failed_submit(&events, "sub-2"), None);
    }

    #[test]
    fn a_grant_keeps_only_the_facts_of_its_kind() {
        let by = || Granting {
            id: "ovr-1".into(),
            command_id: "cmd-1".into(),
            granted_by: "user:host".into(),
            granted_at_ms: NOW,
        };
        // Given a raise, then no dataset, and its limits and end;
        let raise = new_override(
            &request(OverrideKind::RaiseQuota),
            "demo".into(),
            "t1-cls",
            "",
            by(),
        );
        assert_eq!(
            (
                raise.dataset.as_str(),
                raise.until_ms,
                raise.raise.map(|r| r.gpus)
            ),
            ("", NOW + 1, Some(4))
        );
        // given an extra submit, then its dataset and no raise.
        let extra = new_override(
            &request(OverrideKind::ExtraSubmit),
            "demo".into(),
            "t1-cls",
            "",
            by(),
        );
        assert_eq!(
            (extra.dataset.as_str(), extra.until_ms, extra.raise),
            ("t1-cls", 0, None)
        );
        assert_eq!(
            (
                extra.id.as_str(),
                extra.command_id.as_str(),
                extra.reason.as_str(),
                extra.description.as_str()
            ),
            ("ovr-1", "cmd-1", "scorer outage", "")
        );
    }
}
