//! The leaderboard's rules as pure functions: ranking one dataset's board, ranking a competition overall, and
//! who may see what. No IO: the projection hands in the scored submits and the grpc layer the caller.
//!
//! Ranking, as NSML users knew it:
//! - a board has one row per team, its best score by the metric's direction (descending: higher is better;
//!   ascending: lower is better); worse submits only add to the team's count;
//! - of two equal scores the earlier submit ranks higher (it got there first), within a team and between teams;
//!   ranks are distinct, 1..n, even for equal scores;
//! - the private board chooses and ranks by the private score alone.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use nsml_common::caller::Caller;
use nsml_proto::v1::Direction;

use crate::LeaderboardError;

/// One scored real submit, as the boards see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// The ids, teams, datasets and competitions of a board's submits are shared with the read model's
    /// indexes (and the names among all of a team's submits), not copied into each.
    pub id: Arc<str>,
    pub team: Arc<str>,
    pub dataset: Arc<str>,
    pub competition: Arc<str>,
    /// `TEAM/DATASET/N/CHECKPOINT`.
    pub model: String,
    /// Score on the public part of the test set.
    pub score: f64,
    /// Score on the private part, when the dataset has one.
    pub private_score: Option<f64>,
    pub submitted_at_ms: i64,
    pub finished_at_ms: i64,
}

/// Which part of the test set a board ranks by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    Public,
    Private,
}

impl Side {
    /// The side a request asks for.
    pub fn of(private: bool) -> Self {
        if private { Side::Private } else { Side::Public }
    }

    /// The score a submit has on this side, if it is one that can be ranked (finite).
    fn score_of(self, s: &Scored) -> Option<f64> {
        match self {
            Side::Public => Some(s.score),
            Side::Private => s.private_score,
        }
        .filter(|v| v.is_finite())
    }
}

/// One row of a dataset's board.
#[derive(Debug, Clone, PartialEq)]
pub struct Standing {
    pub rank: u32,
    pub team: String,
    pub score: f64,
    pub model: String,
    /// The submission behind the best score.
    pub submission_id: String,
    /// Scored real submits of the team on the dataset (better or not).
    pub count: u32,
    /// When the team last submitted.
    pub last_submit_ms: i64,
    /// When the best score was recorded.
    pub best_at_ms: i64,
}

/// The direction a board ranks in: the dataset's, or for a dataset registered without one, inferred from the
/// metric's name (error and loss metrics ascending, everything else descending).
pub fn ranking_direction(direction: Direction, metric: &str) -> Direction {
    match direction {
        Direction::Descending | Direction::Ascending => direction,
        Direction::Unspecified => {
            let m = metric.to_ascii_lowercase();
            let error_like = ["mse", "rmse", "mae", "cer", "wer", "loss", "error"]
                .iter()
                .any(|e| m == *e || m.ends_with(&format!("_{e}")));
            if error_like {
                Direction::Ascending
            } else {
                Direction::Descending
            }
        }
    }
}

/// Orders two submits' scores: `Less` means `a` ranks above `b`. Equal scores go to the earlier submit, then to
/// the smaller submission id so that the order is total.
fn compare(a: (f64, &Scored), b: (f64, &Scored), direction: Direction) -> Ordering {
    let by_score = match direction {
        Direction::Ascending => a.0.total_cmp(&b.0),
        Direction::Descending | Direction::Unspecified => b.0.total_cmp(&a.0),
    };
    by_score
        .then(a.1.submitted_at_ms.cmp(&b.1.submitted_at_ms))
        .then_with(|| a.1.id.cmp(&b.1.id))
}

/// Ranks one dataset's scored real submits: each team's best, ordered, ranked 1..n.
///
/// `direction` must be resolved (see [`ranking_direction`]); `Unspecified` ranks descending. A team whose
/// submits have no score on `side` (no private part, or a non-finite score) has no row.
pub fn board<'a>(
    submits: impl IntoIterator<Item = &'a Scored>,
    direction: Direction,
    side: Side,
) -> Vec<Standing> {
    struct Team<'a> {
        best: Option<(f64, &'a Scored)>,
        count: u32,
        last_submit_ms: i64,
    }
    // Ranks follow `compare`, a total order: the order teams are gathered in does not matter.
    let mut teams: HashMap<&str, Team<'a>> = HashMap::new();
    for s in submits {
        let t = teams.entry(&*s.team).or_insert(Team {
            best: None,
            count: 0,
            last_submit_ms: i64::MIN,
        });
        t.count += 1;
        t.last_submit_ms = t.last_submit_ms.max(s.submitted_at_ms);
        if let Some(v) = side.score_of(s) {
            let better = match t.best {
                None => true,
                Some(best) => compare((v, s), best, direction) == Ordering::Less,
            };
            if better {
                t.best = Some((v, s));
            }
        }
    }
    let mut rows: Vec<(f64, &Scored, u32, i64)> = teams
        .into_values()
        .filter_map(|t| t.best.map(|(v, s)| (v, s, t.count, t.last_submit_ms)))
        .collect();
    rows.sort_by(|a, b| compare((a.0, a.1), (b.0, b.1), direction));
    rows.into_iter()
        .enumerate()
        .map(|(i, (score, s, count, last_submit_ms))| Standing {
            rank: i as u32 + 1,
            team: s.team.to_string(),
            score,
            model: s.model.clone(),
            submission_id: s.id.to_string(),
            count,
            last_submit_ms,
            best_at_ms: if s.finished_at_ms > 0 {
                s.finished_at_ms
            } else {
                s.submitted_at_ms
            },
        })
        .collect()
}

/// One row of a competition's overall ranking.
#[derive(Debug, Clone, PartialEq)]
pub struct OverallStanding {
    pub rank: u32,
    pub team: String,
    pub mean_rank: f64,
    /// The team's rank on each dataset, in the order of the boards given.
    pub ranks: Vec<u32>,
    /// Whether the team is on each board; where it is not, its rank there is the last.
    pub submitted: Vec<bool>,
}

/// Ranks a competition overall from its datasets' boards (in the competition's dataset order).
///
/// Every team on at least one board takes part. A team missing from a board ranks last there, at the number of
/// taking-part teams (all teams missing from it share that rank). Teams are ordered by mean rank; equal means
/// go to the team with the better best rank, then the better second-best and so on (its ranks sorted), and
/// as a last resort to the team name in alphabetical order. Overall ranks are distinct, 1..n.
pub fn overall<B: Borrow<Vec<Standing>>>(boards: &[B]) -> Vec<OverallStanding> {
    if boards.is_empty() {
        return Vec::new();
    }
    let teams: BTreeSet<&str> = boards
        .iter()
        .flat_map(|b| b.borrow())
        .map(|row| row.team.as_str())
        .collect();
    let last = teams.len() as u32;
    // Each board's rank by team, looked up once per team and board rather than searched for.
    let ranks_on: Vec<HashMap<&str, u32>> = boards
        .iter()
        .map(|b| {
            let b = b.borrow();
            let mut ranks = HashMap::with_capacity(b.len());
            for row in b {
                ranks.entry(row.team.as_str()).or_insert(row.rank);
            }
            ranks
        })
        .collect();
    let mut rows: Vec<(u64, Vec<u32>, OverallStanding)> = teams
        .into_iter()
        .map(|team| {
            let found: Vec<Option<u32>> = ranks_on.iter().map(|b| b.get(team).copied()).collect();
            let ranks: Vec<u32> = found.iter().map(|r| r.unwrap_or(last)).collect();
            let submitted = found.iter().map(Option::is_some).collect();
            let sum: u64 = ranks.iter().map(|r| u64::from(*r)).sum();
            let mut sorted = ranks.clone();
            sorted.sort_unstable();
            let row = OverallStanding {
                rank: 0,
                team: team.to_string(),
                mean_rank: sum as f64 / boards.len() as f64,
                ranks,
                submitted,
            };
            (sum, sorted, row)
        })
        .collect();
    // The sum orders exactly as the mean does (same divisor) without floating-point ties.
    rows.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| a.1.cmp(&b.1))
            .then_with(|| a.2.team.cmp(&b.2.team))
    });
    rows.into_iter()
        .enumerate()
        .map(|(i, (_, _, mut row))| {
            row.rank = i as u32 + 1;
            row
        })
        .collect()
}

/// Whether `caller` may see the private side of `competition`: its hosts (and administrators and services)
/// always, any signed-in user once the host revealed it. `hosts` are the competition's hosts as the log has
/// them, in case the caller's identity predates the appointment.
pub fn may_see_private(
    caller: &Caller,
    competition: &str,
    hosts: &[String],
    revealed: bool,
) -> bool {
    match caller {
        Caller::Anonymous => false,
        Caller::Service(_) => true,
        Caller::User(id) => {
            revealed || caller.is_host_of(competition) || hosts.contains(&id.username)
        }
    }
}

/// Requires that `caller` may see the private side of `competition`.
pub fn check_private(
    caller: &Caller,
    competition: &str,
    hosts: &[String],
    revealed: bool,
) -> Result<(), LeaderboardError> {
    if may_see_private(caller, competition, hosts, revealed) {
        Ok(())
    } else {
        Err(LeaderboardError::PrivateHidden(competition.to_string()))
    }
}

/// Whose submits a caller's history shows in one competition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryScope {
    /// Every team's: hosts, administrators and services.
    AllTeams,
    /// One team's: a participant's own team.
    Team(String),
    /// Nothing: the caller is not in the competition.
    Nothing,
}

/// Whose submits `caller` sees in the history of `competition`.
pub fn history_scope(caller: &Caller, competition: &str, hosts: &[String]) -> HistoryScope {
    let hosts_it = match caller {
        Caller::User(id) => hosts.contains(&id.username),
        _ => false,
    };
    if hosts_it || caller.is_host_of(competition) {
        HistoryScope::AllTeams
    } else if let Some(team) = caller.team_in(competition) {
        HistoryScope::Team(team.to_string())
    } else {
        HistoryScope::Nothing
    }
}

/// The teams whose submits `caller`'s history can show, when that is only its own teams' (a participant who
/// hosts none of the competitions, by appointment or as `hosts` of each competition name them); `None` when it
/// may see every team's somewhere.
pub fn teams_seen<'a>(
    caller: &Caller,
    mut hosts: impl Iterator<Item = &'a [String]>,
) -> Option<BTreeSet<String>> {
    match caller {
        Caller::Anonymous => Some(BTreeSet::new()),
        Caller::Service(_) => None,
        Caller::User(id) => {
            let hosting =
                id.admin || !id.hosts.is_empty() || hosts.any(|h| h.contains(&id.username));
            (!hosting).then(|| id.memberships.iter().map(|m| m.team.clone()).collect())
        }
    }
}

/// The competitions a caller takes part in or hosts, for choosing the competition of a request that names none.
/// `None` for administrators and services, who are in every competition.
pub fn competitions_of(caller: &Caller) -> Option<BTreeSet<String>> {
    match caller {
        Caller::User(id) if !id.admin => Some(
            id.memberships
                .iter()
                .map(|m| m.competition.clone())
                .chain(id.hosts.iter().cloned())
                .collect(),
        ),
        Caller::Anonymous => Some(BTreeSet::new()),
        _ => None,
    }
}

/// Chooses the competition of a request that names none: the caller's only one (of `known` competitions when
/// the caller is in every competition), else an error listing them.
pub fn resolve_competition(
    caller: &Caller,
    known: impl IntoIterator<Item = String>,
) -> Result<String, LeaderboardError> {
    let candidates: Vec<String> = match competitions_of(caller) {
        Some(mine) if !mine.is_empty() => mine.into_iter().collect(),
        _ => known.into_iter().collect(),
    };
    match candidates.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(LeaderboardError::NoCompetition),
        many => Err(LeaderboardError::AmbiguousCompetition(
            many.iter()
                .map(|c| format!("`{c}`"))
                .collect::<Vec<_>>()
                .join(", "),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsml_proto::v1::{Identity, Membership};

    fn submit(id: &str, team: &str, score: f64, at: i64) -> Scored {
        Scored {
            id: id.into(),
            team: team.into(),
            dataset: "cls".into(),
            competition: "demo".into(),
            model: format!("{team}/cls/1/{id}"),
            score,
            private_score: None,
            submitted_at_ms: at,
            finished_at_ms: at + 5,
        }
    }

    fn private(mut s: Scored, p: f64) -> Scored {
        s.private_score = Some(p);
        s
    }

    fn summary(rows: &[Standing]) -> Vec<(u32, &str, f64, u32)> {
        rows.iter()
            .map(|r| (r.rank, r.team.as_str(), r.score, r.count))
            .collect()
    }

    fn user(name: &str, memberships: &[(&str, &str)], hosts: &[&str], admin: bool) -> Caller {
        Caller::User(Identity {
            username: name.into(),
            admin,
            memberships: memberships
                .iter()
                .map(|(team, competition)| Membership {
                    team: team.to_string(),
                    competition: competition.to_string(),
                })
                .collect(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        })
    }

    #[test]
    fn given_several_submits_per_team_when_ranked_descending_then_each_team_shows_its_best_and_count()
     {
        let submits = [
            submit("1", "ants", 0.70, 100),
            submit("2", "bees", 0.80, 110),
            submit("3", "ants", 0.90, 120),
            submit("4", "ants", 0.60, 130),
        ];
        let rows = board(&submits, Direction::Descending, Side::Public);
        assert_eq!(summary(&rows), [(1, "ants", 0.90, 3), (2, "bees", 0.80, 1)]);
        assert_eq!(rows[0].model, "ants/cls/1/3");
        assert_eq!(rows[0].submission_id, "3");
        assert_eq!(
            rows[0].last_submit_ms, 130,
            "the worse, later submit still counts as the last one"
        );
        assert_eq!(
            rows[0].best_at_ms, 125,
            "recorded when the best submit was scored"
        );
    }

    #[test]
    fn given_an_error_metric_when_ranked_ascending_then_lower_is_better() {
        let submits = [
            submit("1", "ants", 0.30, 100),
            submit("2", "bees", 0.10, 110),
            submit("3", "ants", 0.20, 120),
        ];
        let rows = board(&submits, Direction::Ascending, Side::Public);
        assert_eq!(summary(&rows), [(1, "bees", 0.10, 1), (2, "ants", 0.20, 2)]);
    }

    #[test]
    fn given_equal_scores_between_teams_then_the_earlier_submit_ranks_higher() {
        let submits = [
            submit("1", "late", 0.5, 200),
            submit("2", "early", 0.5, 100),
            submit("3", "later", 0.5, 300),
        ];
        let rows = board(&submits, Direction::Descending, Side::Public);
        assert_eq!(
            summary(&rows),
            [
                (1, "early", 0.5, 1),
                (2, "late", 0.5, 1),
                (3, "later", 0.5, 1)
            ]
        );
    }

    #[test]
    fn given_a_team_repeating_its_best_score_then_the_first_submit_of_it_stays_the_best() {
        let submits = [submit("1", "ants", 0.5, 100), submit("2", "ants", 0.5, 200)];
        let rows = board(&submits, Direction::Ascending, Side::Public);
        assert_eq!(rows[0].submission_id, "1");
        assert_eq!(rows[0].count, 2);
        assert_eq!(rows[0].last_submit_ms, 200);
    }

    #[test]
    fn given_private_scores_then_the_private_board_chooses_and_ranks_by_them() {
        let submits = [
            private(submit("1", "ants", 0.9, 100), 0.60),
            private(submit("2", "ants", 0.7, 110), 0.80),
            private(submit("3", "bees", 0.8, 120), 0.75),
        ];
        let public = board(&submits, Direction::Descending, Side::Public);
        assert_eq!(summary(&public), [(1, "ants", 0.9, 2), (2, "bees", 0.8, 1)]);
        let private = board(&submits, Direction::Descending, Side::Private);
        assert_eq!(
            summary(&private),
            [(1, "ants", 0.80, 2), (2, "bees", 0.75, 1)]
        );
        assert_eq!(private[0].submission_id, "2");
    }

    #[test]
    fn given_submits_without_a_ranked_score_then_they_count_but_make_no_row() {
        let submits = [
            submit("1", "ants", 0.9, 100),
            private(submit("2", "bees", 0.8, 110), 0.8),
            submit("3", "bees", f64::NAN, 120),
        ];
        let private = board(&submits, Direction::Descending, Side::Private);
        assert_eq!(summary(&private), [(1, "bees", 0.8, 2)]);
        let public = board(&submits, Direction::Descending, Side::Public);
        assert_eq!(summary(&public), [(1, "ants", 0.9, 1), (2, "bees", 0.8, 2)]);
    }

    #[test]
    fn given_no_submits_then_the_board_is_empty() {
        assert!(board(&[], Direction::Descending, Side::Public).is_empty());
    }

    #[test]
    fn unspecified_direction_is_inferred_from_the_metric() {
        assert_eq!(
            ranking_direction(Direction::Unspecified, "mse"),
            Direction::Ascending
        );
        assert_eq!(
            ranking_direction(Direction::Unspecified, "CER"),
            Direction::Ascending
        );
        assert_eq!(
            ranking_direction(Direction::Unspecified, "val_loss"),
            Direction::Ascending
        );
        assert_eq!(
            ranking_direction(Direction::Unspecified, "accuracy"),
            Direction::Descending
        );
        assert_eq!(
            ranking_direction(Direction::Unspecified, ""),
            Direction::Descending
        );
        assert_eq!(
            ranking_direction(Direction::Descending, "mse"),
            Direction::Descending
        );
    }

    fn standing(rank: u32, team: &str) -> Standing {
        Standing {
            rank,
            team: team.into(),
            score: 0.0,
            model: String::new(),
            submission_id: String::new(),
            count: 1,
            last_submit_ms: 0,
            best_at_ms: 0,
        }
    }

    fn overall_summary(rows: &[OverallStanding]) -> Vec<(u32, &str, f64, Vec<u32>)> {
        rows.iter()
            .map(|r| (r.rank, r.team.as_str(), r.mean_rank, r.ranks.clone()))
            .collect()
    }

    #[test]
    fn given_a_team_missing_a_dataset_then_it_ranks_last_there() {
        // Three teams; `cats` never submitted on the second dataset, so it ranks 3rd (the team count) there.
        let boards = vec![
            vec![
                standing(1, "cats"),
                standing(2, "ants"),
                standing(3, "bees"),
            ],
            vec![standing(1, "ants"), standing(2, "bees")],
        ];
        let rows = overall(&boards);
        assert_eq!(
            overall_summary(&rows),
            [
                (1, "ants", 1.5, vec![2, 1]),
                (2, "cats", 2.0, vec![1, 3]),
                (3, "bees", 2.5, vec![3, 2]),
            ]
        );
        assert_eq!(
            rows[1].submitted,
            [true, false],
            "cats has no score on the second"
        );
        assert_eq!(rows[0].submitted, [true, true]);
    }

    #[test]
    fn given_one_team_then_a_dataset_it_never_submitted_to_says_so() {
        let rows = overall(&[vec![standing(1, "demo")], vec![]]);
        assert_eq!(overall_summary(&rows), [(1, "demo", 1.0, vec![1, 1])]);
        assert_eq!(rows[0].submitted, [true, false]);
    }

    #[test]
    fn given_equal_mean_ranks_then_the_better_best_rank_wins_then_the_name() {
        let boards = vec![
            vec![
                standing(1, "zeta"),
                standing(2, "beta"),
                standing(3, "alfa"),
            ],
            vec![
                standing(1, "alfa"),
                standing(2, "beta"),
                standing(3, "zeta"),
            ],
            vec![
                standing(1, "beta"),
                standing(2, "zeta"),
                standing(3, "alfa"),
            ],
        ];
        // Means: zeta (1+3+2)/3 = 2, beta (2+2+1)/3 = 5/3, alfa (3+1+3)/3 = 7/3.
        let rows = overall(&boards);
        assert_eq!(
            rows.iter().map(|r| r.team.as_str()).collect::<Vec<_>>(),
            ["beta", "zeta", "alfa"]
        );
        // Equal sums and equal sorted ranks: by name.
        let boards = vec![
            vec![standing(1, "yak"), standing(2, "emu")],
            vec![standing(1, "emu"), standing(2, "yak")],
        ];
        assert_eq!(
            overall_summary(&overall(&boards)),
            [(1, "emu", 1.5, vec![2, 1]), (2, "yak", 1.5, vec![1, 2])]
        );
        // Equal sums, different best ranks: (1, 3) beats (2, 2).
        let boards = vec![
            vec![standing(1, "one"), standing(2, "two"), standing(3, "six")],
            vec![standing(1, "six"), standing(2, "two"), standing(3, "one")],
        ];
        let rows = overall(&boards);
        assert_eq!(rows[0].mean_rank, rows[2].mean_rank);
        assert_eq!(
            rows.iter().map(|r| r.team.as_str()).collect::<Vec<_>>(),
            ["one", "six", "two"]
        );
    }

    #[test]
    fn a_participants_history_is_of_its_teams_unless_it_hosts() {
        let user = |admin: bool, hosts: Vec<String>| {
            Caller::User(Identity {
                username: "alice".into(),
                admin,
                hosts,
                memberships: vec![Membership {
                    competition: "demo".into(),
                    team: "ants".into(),
                }],
            })
        };
        let none: [&[String]; 1] = [&[]];
        assert_eq!(
            teams_seen(&user(false, vec![]), none.into_iter()),
            Some(BTreeSet::from(["ants".to_string()]))
        );
        assert_eq!(teams_seen(&user(true, vec![]), none.into_iter()), None);
        assert_eq!(
            teams_seen(&user(false, vec!["demo".into()]), none.into_iter()),
            None
        );
        let named = ["alice".to_string()];
        let hosts: [&[String]; 2] = [&[], &named];
        assert_eq!(teams_seen(&user(false, vec![]), hosts.into_iter()), None);
        assert_eq!(
            teams_seen(&Caller::Anonymous, none.into_iter()),
            Some(BTreeSet::new())
        );
    }

    #[test]
    fn a_team_listed_on_many_boards_gets_each_boards_rank() {
        let boards: Vec<Vec<Standing>> = (0..3)
            .map(|b| {
                let teams = ["a", "b", "c", "d"];
                board(
                    &teams
                        .iter()
                        .enumerate()
                        .map(|(i, t)| submit(&format!("{t}{b}"), t, ((i + b) % 4) as f64, 1))
                        .collect::<Vec<_>>(),
                    Direction::Descending,
                    Side::Public,
                )
            })
            .collect();
        let rows = overall(&boards);
        let d = rows.iter().find(|r| r.team == "d").unwrap();
        assert_eq!(d.ranks, [1, 4, 3]);
        assert_eq!(d.submitted, [true, true, true]);
    }

    #[test]
    fn given_no_datasets_then_the_overall_ranking_is_empty() {
        assert!(overall::<Vec<Standing>>(&[]).is_empty());
        assert!(overall(&[vec![], vec![]]).is_empty());
    }

    #[test]
    fn private_side_is_for_hosts_until_revealed() {
        let participant = user("ann", &[("ants", "demo")], &[], false);
        let host = user("hal", &[], &["demo"], false);
        let other_host = user("oli", &[], &["other"], false);
        let admin = user("root", &[], &[], true);
        let service = Caller::Service("gateway".into());
        let no_hosts: Vec<String> = vec![];

        assert!(!may_see_private(&participant, "demo", &no_hosts, false));
        assert!(!may_see_private(&other_host, "demo", &no_hosts, false));
        assert!(may_see_private(&host, "demo", &no_hosts, false));
        assert!(may_see_private(&admin, "demo", &no_hosts, false));
        assert!(may_see_private(&service, "demo", &no_hosts, false));
        assert!(!may_see_private(
            &Caller::Anonymous,
            "demo",
            &no_hosts,
            true
        ));
        // A host appointed in the log after the caller's identity was resolved.
        assert!(may_see_private(
            &participant,
            "demo",
            &["ann".to_string()],
            false
        ));
        // Revealed: every signed-in user.
        assert!(may_see_private(&participant, "demo", &no_hosts, true));
        assert!(may_see_private(&other_host, "demo", &no_hosts, true));

        let err = check_private(&participant, "demo", &no_hosts, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the private leaderboard of `demo` is hidden until the host reveals it"
        );
    }

    #[test]
    fn history_shows_own_team_or_every_team_to_hosts() {
        let participant = user("ann", &[("ants", "demo"), ("ants2", "other")], &[], false);
        let host = user("hal", &[], &["demo"], false);
        let admin = user("root", &[], &[], true);
        let no_hosts: Vec<String> = vec![];
        assert_eq!(
            history_scope(&participant, "demo", &no_hosts),
            HistoryScope::Team("ants".into())
        );
        assert_eq!(
            history_scope(&participant, "other", &no_hosts),
            HistoryScope::Team("ants2".into())
        );
        assert_eq!(
            history_scope(&participant, "third", &no_hosts),
            HistoryScope::Nothing
        );
        assert_eq!(
            history_scope(&host, "demo", &no_hosts),
            HistoryScope::AllTeams
        );
        assert_eq!(
            history_scope(&host, "other", &no_hosts),
            HistoryScope::Nothing
        );
        assert_eq!(
            history_scope(&admin, "any", &no_hosts),
            HistoryScope::AllTeams
        );
        assert_eq!(
            history_scope(&Caller::Service("gateway".into()), "any", &no_hosts),
            HistoryScope::AllTeams
        );
    }

    #[test]
    fn a_request_without_a_competition_uses_the_callers_only_one() {
        let known = || vec!["demo".to_string(), "other".to_string()];
        let one = user("ann", &[("ants", "demo")], &[], false);
        assert_eq!(resolve_competition(&one, known()).unwrap(), "demo");
        let hosted = user("hal", &[], &["other"], false);
        assert_eq!(resolve_competition(&hosted, known()).unwrap(), "other");
        let two = user("bob", &[("bees", "demo"), ("bees", "other")], &[], false);
        assert_eq!(
            resolve_competition(&two, known()).unwrap_err().to_string(),
            "name the competition: you are in `demo`, `other`"
        );
        // Administrators (and users in no competition) choose among every competition.
        let admin = user("root", &[], &[], true);
        assert!(matches!(
            resolve_competition(&admin, known()),
            Err(LeaderboardError::AmbiguousCompetition(_))
        ));
        assert_eq!(
            resolve_competition(&admin, vec!["solo".into()]).unwrap(),
            "solo"
        );
        assert!(matches!(
            resolve_competition(&admin, Vec::new()),
            Err(LeaderboardError::NoCompetition)
        ));
    }
}
