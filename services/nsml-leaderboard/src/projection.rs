//! The leaderboard's read model, folded from the log: competitions (their datasets, hosts and whether the private
//! board is revealed), datasets (metric, direction, competition) and every scored real submit.
//!
//! Applying is idempotent per submission id: a redelivered or repeated `SubmissionScored` replaces the submit it
//! names instead of counting twice. Trial submits never reach a board.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, OnceLock};

use nsml_common::event::decode;
use nsml_common::projection::ReadModel;
use nsml_eventstore::StoredEvent;
use nsml_proto::codec::Encoded;
use nsml_proto::v1::{
    CompetitionApplied, DatasetRegistered, Direction, EventPayload, OverrideGranted, OverrideKind,
    Policy, PrivateRevealed, SubmissionScored,
};

use crate::LeaderboardError;
use crate::domain::{self, Scored, Side, Standing};

/// A competition as the boards need it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CompetitionView {
    /// Datasets in the competition's own order (as applied).
    pub datasets: Vec<String>,
    pub hosts: Vec<String>,
    pub private_revealed: bool,
    /// The policy as last applied: when submits close and the boards freeze, the competition's and each
    /// round's for its datasets.
    pub policy: Policy,
    /// Team → round (empty: the competition's deadline) → the deadline a host extended the team's to.
    pub extended: HashMap<String, BTreeMap<String, i64>>,
}

impl CompetitionView {
    /// Whether a submit on `dataset` made at `submitted_at_ms` by `team` counts on the boards: made before the
    /// dataset's deadline (its round's, if it is in one that sets one, else the competition's), or the team's
    /// own when a host extended it. A submit admitted before the deadline and scored after it counts.
    pub fn counts(&self, team: &str, dataset: &str, submitted_at_ms: i64) -> bool {
        let rules = self.policy.rules_for(dataset);
        let closes = rules.closes_at_ms;
        if closes <= 0 {
            return true;
        }
        let deadline = self
            .extended
            .get(team)
            .into_iter()
            .flatten()
            .filter(|(round, _)| rules.extended_by(round))
            .fold(closes, |deadline, (_, until)| deadline.max(*until));
        submitted_at_ms < deadline
    }
}

/// A dataset as the boards need it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DatasetView {
    pub competition: String,
    /// The metric's name as the manifest has it (`accuracy`, `cer`, …).
    pub metric: String,
    pub direction: Direction,
}

impl DatasetView {
    /// The direction its board ranks in.
    pub fn ranking_direction(&self) -> Direction {
        domain::ranking_direction(self.direction, &self.metric)
    }
}

/// Where a scored submit is kept: its dataset and its id.
type SubmitKey = (Arc<str>, Arc<str>);

/// A board or an overall ranking computed once and shared by the answers that read it until an event changes
/// it, with the `Board` or `Overall` answer made of it once encoded: the same for every caller allowed to see
/// it, and forgotten with it.
#[derive(Debug)]
pub struct Shared<T> {
    rows: T,
    answer: OnceLock<Encoded>,
}

impl<T> Shared<T> {
    fn new(rows: T) -> Arc<Self> {
        Arc::new(Self {
            rows,
            answer: OnceLock::new(),
        })
    }

    /// The answer made of these rows, encoded by `encode` the first time it is asked for.
    pub fn answer(&self, encode: impl FnOnce(&T) -> Encoded) -> Encoded {
        self.answer.get_or_init(|| encode(&self.rows)).clone()
    }
}

impl<T> std::ops::Deref for Shared<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.rows
    }
}

/// A board computed once, shared by the answers that read it.
pub type SharedBoard = Arc<Shared<Vec<Standing>>>;

/// A board (by dataset) or an overall ranking (by competition) on one side.
pub type Ranking = (String, Side);

/// An overall ranking computed once, shared by the answers that read it.
pub type SharedOverall = Arc<Shared<Vec<domain::OverallStanding>>>;

/// The leaderboard's state.
#[derive(Debug, Default)]
pub struct LeaderboardState {
    pub competitions: BTreeMap<String, CompetitionView>,
    pub datasets: BTreeMap<String, DatasetView>,
    /// Datasets in the order the log first named them, to list a competition's datasets that its manifest does not.
    dataset_order: Vec<String>,
    /// dataset → submission id → the scored real submit.
    submits: HashMap<String, BTreeMap<Arc<str>, Scored>>,
    /// Team → its scored real submits, as (dataset, submission id): a team's history without reading every
    /// team's submits.
    by_team: HashMap<Arc<str>, Vec<SubmitKey>>,
    /// The teams, datasets and competitions named by submits, each kept once and shared by them.
    names: HashSet<Arc<str>>,
    /// Boards as last computed, by dataset and side, until an event changes what they show; computing one
    /// reads every submit on its dataset.
    boards: parking_lot::Mutex<HashMap<(String, Side), SharedBoard>>,
    /// Overall rankings as last computed, by competition and side, until any board changes.
    overalls: parking_lot::Mutex<HashMap<(String, Side), SharedOverall>>,
}

impl LeaderboardState {
    /// The dataset named `name`.
    pub fn dataset(&self, name: &str) -> Result<&DatasetView, LeaderboardError> {
        self.datasets
            .get(name)
            .ok_or_else(|| LeaderboardError::DatasetNotFound(name.to_string()))
    }

    /// The competition `id`.
    pub fn competition(&self, id: &str) -> Result<&CompetitionView, LeaderboardError> {
        self.competitions
            .get(id)
            .ok_or_else(|| LeaderboardError::CompetitionNotFound(id.to_string()))
    }

    /// A competition's hosts and whether its private board is revealed (none and no for an unknown one).
    pub fn privacy(&self, competition: &str) -> (&[String], bool) {
        match self.competitions.get(competition) {
            Some(c) => (&c.hosts, c.private_revealed),
            None => (&[], false),
        }
    }

    /// A competition's datasets: its manifest's, in order, then any other dataset registered for it.
    pub fn competition_datasets(&self, id: &str) -> Vec<String> {
        let mut out = self
            .competitions
            .get(id)
            .map(|c| c.datasets.clone())
            .unwrap_or_default();
        for name in &self.dataset_order {
            let theirs = self.datasets.get(name).is_some_and(|d| d.competition == id);
            if theirs && !out.contains(name) {
                out.push(name.clone());
            }
        }
        out
    }

    /// The scored real submits on `dataset`.
    pub fn submits_on(&self, dataset: &str) -> impl Iterator<Item = &Scored> {
        self.submits
            .get(dataset)
            .into_iter()
            .flat_map(|m| m.values())
    }

    /// Every scored real submit.
    pub fn all_submits(&self) -> impl Iterator<Item = &Scored> {
        self.submits.values().flat_map(|m| m.values())
    }

    /// The scored real submits of `team`, on every dataset.
    pub fn submits_of(&self, team: &str) -> impl Iterator<Item = &Scored> {
        self.by_team
            .get(team)
            .into_iter()
            .flatten()
            .filter_map(|(dataset, id)| self.submits.get(&**dataset)?.get(id))
    }

    /// The board of `dataset` on `side`, computed once and then shared until an event changes it.
    pub fn board_shared(&self, dataset: &str, side: Side) -> Result<SharedBoard, LeaderboardError> {
        let key = (dataset.to_string(), side);
        if let Some(board) = self.boards.lock().get(&key) {
            return Ok(board.clone());
        }
        let board = Shared::new(self.board(dataset, side)?);
        self.boards.lock().insert(key, board.clone());
        Ok(board)
    }

    /// The overall ranking of `competition` on `side` over its datasets' boards, computed once and then shared
    /// until an event changes any board.
    pub fn overall_shared(
        &self,
        competition: &str,
        side: Side,
    ) -> Result<SharedOverall, LeaderboardError> {
        let key = (competition.to_string(), side);
        if let Some(overall) = self.overalls.lock().get(&key) {
            return Ok(overall.clone());
        }
        let boards = self
            .competition_datasets(competition)
            .iter()
            .map(|d| self.board_shared(d, side))
            .collect::<Result<Vec<_>, _>>()?;
        let rows: Vec<&Vec<Standing>> = boards.iter().map(|b| &b.rows).collect();
        let overall = Shared::new(domain::overall(&rows));
        self.overalls.lock().insert(key, overall.clone());
        Ok(overall)
    }

    /// The boards and overall rankings participants see, to compute before they ask: every dataset's and
    /// competition's public one, and its private one once revealed. Until then only hosts see a private one, and
    /// it is computed when asked for.
    pub fn rankings(&self) -> (Vec<Ranking>, Vec<Ranking>) {
        let sides = |competition: &str| {
            let revealed = self.privacy(competition).1;
            [Some(Side::Public), revealed.then_some(Side::Private)]
                .into_iter()
                .flatten()
        };
        let boards = self
            .datasets
            .iter()
            .flat_map(|(name, d)| sides(&d.competition).map(|side| (name.clone(), side)))
            .collect();
        let overalls = self
            .competitions
            .keys()
            .flat_map(|id| sides(id).map(|side| (id.clone(), side)))
            .collect();
        (boards, overalls)
    }

    /// `name`, shared with the submits that already name it.
    fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(known) = self.names.get(name) {
            return known.clone();
        }
        let name: Arc<str> = name.into();
        self.names.insert(name.clone());
        name
    }

    /// The board of `dataset` on `side`.
    pub fn board(&self, dataset: &str, side: Side) -> Result<Vec<Standing>, LeaderboardError> {
        let d = self.dataset(dataset)?;
        // After the deadline the board shows what it showed then.
        let competition = self.competitions.get(&d.competition);
        Ok(domain::board(
            self.submits_on(dataset).filter(|s| {
                competition.is_none_or(|c| c.counts(&s.team, dataset, s.submitted_at_ms))
            }),
            d.ranking_direction(),
            side,
        ))
    }

    fn note_dataset(&mut self, name: &str) -> &mut DatasetView {
        if !self.datasets.contains_key(name) {
            self.dataset_order.push(name.to_string());
        }
        self.datasets.entry(name.to_string()).or_default()
    }

    fn apply_competition(&mut self, e: CompetitionApplied) {
        let Some(c) = e.competition else { return };
        for d in &c.datasets {
            let view = self.note_dataset(&d.name);
            view.competition = c.id.clone();
            if !d.metric.is_empty() {
                view.metric = d.metric.clone();
            }
            if d.direction() != Direction::Unspecified {
                view.direction = d.direction();
            }
        }
        let view = self.competitions.entry(c.id.clone()).or_default();
        view.datasets = c.datasets.iter().map(|d| d.name.clone()).collect();
        view.hosts = c.hosts;
        view.policy = c.policy.unwrap_or_default();
        // Revealing cannot be taken back; a later manifest apply keeps it revealed.
        view.private_revealed |= c.private_revealed;
    }

    fn apply_dataset(&mut self, e: DatasetRegistered) {
        let Some(meta) = e.dataset.and_then(|d| d.meta) else {
            return;
        };
        let view = self.note_dataset(&meta.name);
        if !meta.competition.is_empty() {
            view.competition = meta.competition.clone();
        }
        if !meta.metric.is_empty() {
            view.metric = meta.metric.clone();
        }
        if meta.direction() != Direction::Unspecified {
            view.direction = meta.direction();
        }
    }

    fn apply_scored(&mut self, e: SubmissionScored) {
        let Some(s) = e.submission else { return };
        if s.trial || s.id.is_empty() {
            return;
        }
        let view = self.note_dataset(&s.dataset);
        if view.competition.is_empty() {
            view.competition = s.competition.clone();
        }
        if view.metric.is_empty() {
            view.metric = s.metric.clone();
        }
        let competition = if s.competition.is_empty() {
            view.competition.clone()
        } else {
            s.competition.clone()
        };
        let id: Arc<str> = s.id.as_str().into();
        let team = self.intern(&s.team);
        let dataset = self.intern(&s.dataset);
        let scored = Scored {
            model: format!("{}/{}", s.source_session, s.checkpoint),
            id: id.clone(),
            team: team.clone(),
            dataset: dataset.clone(),
            competition: self.intern(&competition),
            score: s.score,
            private_score: s.private_score,
            submitted_at_ms: s.submitted_at_ms,
            finished_at_ms: s.finished_at_ms,
        };
        let on_dataset = self.submits.entry(s.dataset).or_default();
        let id = match on_dataset.get_key_value(&id) {
            // A repeat replaces the submit under the key it has.
            Some((known, _)) => known.clone(),
            None => {
                self.by_team
                    .entry(team)
                    .or_default()
                    .push((dataset.clone(), id.clone()));
                id
            }
        };
        on_dataset.insert(id, scored);
        self.boards.get_mut().retain(|(d, _), _| **d != *dataset);
        self.overalls.get_mut().clear();
    }
}

impl ReadModel for LeaderboardState {
    const TYPES: Option<&'static [&'static str]> = Some(&[
        SubmissionScored::TYPE,
        CompetitionApplied::TYPE,
        DatasetRegistered::TYPE,
        OverrideGranted::TYPE,
        PrivateRevealed::TYPE,
    ]);

    fn apply(&mut self, ev: &StoredEvent) {
        if let Some(e) = decode::<SubmissionScored>(ev) {
            // Forgets the boards of the submit's dataset only.
            self.apply_scored(e);
            return;
        }
        let boards_read_it = [
            CompetitionApplied::TYPE,
            DatasetRegistered::TYPE,
            OverrideGranted::TYPE,
            PrivateRevealed::TYPE,
        ]
        .contains(&ev.event_type.as_str());
        if !boards_read_it {
            return;
        }
        // Deadlines, extensions, metrics and reveals change what any board shows; a manifest applied again
        // as it was (at every start) changes nothing, and the boards stay computed.
        let before = (self.competitions.clone(), self.datasets.clone());
        if self.apply_other(ev) && (&self.competitions, &self.datasets) != (&before.0, &before.1) {
            self.boards.get_mut().clear();
            self.overalls.get_mut().clear();
        }
    }
}

impl LeaderboardState {
    /// Applies an event other than a scored submit; returns whether it was one the boards depend on.
    fn apply_other(&mut self, ev: &StoredEvent) -> bool {
        if let Some(e) = decode::<CompetitionApplied>(ev) {
            self.apply_competition(e);
        } else if let Some(e) = decode::<DatasetRegistered>(ev) {
            self.apply_dataset(e);
        } else if let Some(grant) = decode::<OverrideGranted>(ev).and_then(|e| e.grant)
            && grant.kind() == OverrideKind::ExtendDeadline
        {
            let until = self
                .competitions
                .entry(grant.competition)
                .or_default()
                .extended
                .entry(grant.team)
                .or_default()
                .entry(grant.round)
                .or_default();
            *until = (*until).max(grant.until_ms);
        } else if let Some(e) = decode::<PrivateRevealed>(ev) {
            self.competitions
                .entry(e.competition)
                .or_default()
                .private_revealed = true;
        } else {
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsml_eventstore::StoredEvent;
    use nsml_proto::v1::{Competition, Dataset, DatasetMeta, DatasetRef, EventPayload, Submission};

    fn stored<P: EventPayload>(position: u64, payload: &P) -> StoredEvent {
        nsml_common::event::stored("test", position, payload)
    }

    fn scored(id: &str, team: &str, dataset: &str, score: f64, trial: bool) -> SubmissionScored {
        SubmissionScored {
            submission: Some(Submission {
                id: id.into(),
                team: team.into(),
                dataset: dataset.into(),
                competition: "demo".into(),
                source_session: format!("{team}/{dataset}/3"),
                checkpoint: "best".into(),
                trial,
                score,
                private_score: Some(score / 2.0),
                submitted_at_ms: 1000,
                finished_at_ms: 2000,
                metric: "accuracy".into(),
                ..Default::default()
            }),
        }
    }

    fn competition(datasets: &[(&str, &str, Direction)]) -> CompetitionApplied {
        CompetitionApplied {
            competition: Some(Competition {
                id: "demo".into(),
                datasets: datasets
                    .iter()
                    .map(|(name, metric, direction)| DatasetRef {
                        name: name.to_string(),
                        metric: metric.to_string(),
                        direction: *direction as i32,
                    })
                    .collect(),
                hosts: vec!["hal".into()],
                ..Default::default()
            }),
        }
    }

    /// Warming a board or an overall ranking leaves its answer encoded: the first query finds it.
    #[test]
    fn warming_keeps_the_answers_encoded() {
        let mut s = LeaderboardState::default();
        s.apply(&stored(
            1,
            &competition(&[("cls", "accuracy", Direction::Descending)]),
        ));
        s.apply(&stored(2, &scored("s1", "ants", "cls", 0.9, false)));
        let (boards, overalls) = s.rankings();
        for (name, side) in boards {
            crate::grpc::board_answer(&s, &name, side).unwrap();
        }
        for (id, side) in overalls {
            crate::grpc::overall_answer(&s, &id, side).unwrap();
        }
        s.board_shared("cls", Side::Public)
            .unwrap()
            .answer(|_| panic!("the board was encoded again"));
        s.overall_shared("demo", Side::Public)
            .unwrap()
            .answer(|_| panic!("the overall ranking was encoded again"));
        assert!(crate::grpc::board_answer(&s, "gone", Side::Public).is_err());
    }

    #[test]
    fn given_a_deadline_then_the_boards_show_what_was_submitted_before_it() {
        let mut s = LeaderboardState::default();
        let mut c = competition(&[("cls", "accuracy", Direction::Descending)]);
        if let Some(comp) = c.competition.as_mut() {
            comp.policy = Some(nsml_proto::v1::Policy {
                closes_at_ms: 1500,
                ..Default::default()
            });
        }
        s.apply(&stored(1, &c));
        let at = |id: &str, team: &str, score: f64, submitted_at_ms: i64| {
            let mut e = scored(id, team, "cls", score, false);
            if let Some(sub) = e.submission.as_mut() {
                sub.submitted_at_ms = submitted_at_ms;
                sub.finished_at_ms = submitted_at_ms + 5000;
            }
            e
        };
        // Admitted before the deadline and scored after it: counts. Submitted after: does not.
        s.apply(&stored(2, &at("s1", "ants", 0.5, 1000)));
        s.apply(&stored(3, &at("s2", "ants", 0.9, 2000)));
        s.apply(&stored(4, &at("s3", "bees", 0.8, 2000)));
        let board = s.board("cls", Side::Public).unwrap();
        assert_eq!(board.len(), 1, "{board:?}");
        assert_eq!((board[0].team.as_str(), board[0].score), ("ants", 0.5));
        // A host extends bees' deadline: its submit before the new one counts.
        s.apply(&stored(
            5,
            &OverrideGranted {
                grant: Some(nsml_proto::v1::Override {
                    id: "o-1".into(),
                    competition: "demo".into(),
                    team: "bees".into(),
                    kind: OverrideKind::ExtendDeadline as i32,
                    until_ms: 3000,
                    ..Default::default()
                }),
            },
        ));
        let board = s.board("cls", Side::Public).unwrap();
        assert_eq!(
            board
                .iter()
                .map(|r| (r.team.as_str(), r.score))
                .collect::<Vec<_>>(),
            [("bees", 0.8), ("ants", 0.5)]
        );
    }

    #[test]
    fn given_rounds_then_each_rounds_boards_freeze_at_its_own_deadline() {
        use nsml_proto::v1::{Override, Policy, Round};
        // Given a competition closing at 10 s whose preliminary (`cls`) closes at 1.5 s and whose final (`reg`)
        // closes at 5 s,
        let mut s = LeaderboardState::default();
        let mut c = competition(&[
            ("cls", "accuracy", Direction::Descending),
            ("reg", "accuracy", Direction::Descending),
        ]);
        let round = |name: &str, dataset: &str, closes_at_ms: i64| Round {
            name: name.into(),
            datasets: vec![dataset.into()],
            closes_at_ms,
            ..Default::default()
        };
        if let Some(comp) = c.competition.as_mut() {
            comp.policy = Some(Policy {
                closes_at_ms: 10_000,
                rounds: vec![
                    round("preliminary", "cls", 1500),
                    round("final", "reg", 5000),
                ],
                ..Default::default()
            });
        }
        s.apply(&stored(1, &c));
        let at = |id: &str, team: &str, dataset: &str, score: f64, submitted_at_ms: i64| {
            let mut e = scored(id, team, dataset, score, false);
            if let Some(sub) = e.submission.as_mut() {
                sub.submitted_at_ms = submitted_at_ms;
                sub.finished_at_ms = submitted_at_ms + 5000;
            }
            e
        };
        // when ants submit on both before the preliminary's deadline (scored after it) and bees after it,
        s.apply(&stored(2, &at("s1", "ants", "cls", 0.5, 1000)));
        s.apply(&stored(3, &at("s2", "bees", "cls", 0.9, 2000)));
        s.apply(&stored(4, &at("s3", "bees", "reg", 0.7, 2000)));
        s.apply(&stored(5, &at("s4", "ants", "reg", 0.6, 6000)));
        let teams = |s: &LeaderboardState, dataset: &str| -> Vec<String> {
            s.board(dataset, Side::Public)
                .unwrap()
                .into_iter()
                .map(|r| r.team)
                .collect()
        };
        // then the preliminary's board is what it showed at its deadline, the final's at its own.
        assert_eq!(teams(&s, "cls"), ["ants"]);
        assert_eq!(teams(&s, "reg"), ["bees"]);
        // An extension for the final, or for the competition, does not move the preliminary's deadline;
        let extend = |position: u64, id: &str, round: &str, until_ms: i64| {
            stored(
                position,
                &OverrideGranted {
                    grant: Some(Override {
                        id: id.into(),
                        competition: "demo".into(),
                        team: "bees".into(),
                        kind: OverrideKind::ExtendDeadline as i32,
                        until_ms,
                        round: round.into(),
                        ..Default::default()
                    }),
                },
            )
        };
        s.apply(&extend(6, "o-1", "final", 9000));
        s.apply(&extend(7, "o-2", "", 9000));
        assert_eq!(teams(&s, "cls"), ["ants"]);
        // one for the preliminary lets bees' submit before it count there.
        s.apply(&extend(8, "o-3", "preliminary", 3000));
        assert_eq!(teams(&s, "cls"), ["bees", "ants"]);
        // The overall board ranks over the frozen boards.
        let boards = vec![
            s.board("cls", Side::Public).unwrap(),
            s.board("reg", Side::Public).unwrap(),
        ];
        let overall = domain::overall(&boards);
        assert_eq!(
            overall
                .iter()
                .map(|r| (r.team.as_str(), r.submitted.clone()))
                .collect::<Vec<_>>(),
            [("bees", vec![true, true]), ("ants", vec![true, false])]
        );
    }

    #[test]
    fn given_scored_submits_then_real_ones_are_kept_once_per_id() {
        let mut s = LeaderboardState::default();
        s.apply(&stored(1, &scored("s1", "ants", "cls", 0.5, false)));
        s.apply(&stored(2, &scored("s1", "ants", "cls", 0.5, false)));
        s.apply(&stored(3, &scored("t1", "ants", "cls", 0.9, true)));
        s.apply(&stored(4, &scored("s2", "bees", "cls", 0.7, false)));
        let rows = s.board("cls", Side::Public).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].team, "bees");
        assert_eq!(rows[1].count, 1, "a redelivered event counts once");
        assert_eq!(rows[1].model, "ants/cls/3/best");
        let d = s.dataset("cls").unwrap();
        assert_eq!(
            (d.competition.as_str(), d.metric.as_str()),
            ("demo", "accuracy")
        );
    }

    #[test]
    fn given_a_competition_and_registered_datasets_then_their_metrics_and_order_are_known() {
        let mut s = LeaderboardState::default();
        s.apply(&stored(
            1,
            &competition(&[
                ("t2", "cer", Direction::Ascending),
                ("t1", "accuracy", Direction::Unspecified),
            ]),
        ));
        s.apply(&stored(
            2,
            &DatasetRegistered {
                dataset: Some(Dataset {
                    meta: Some(DatasetMeta {
                        name: "t3".into(),
                        competition: "demo".into(),
                        metric: "mse".into(),
                        direction: Direction::Ascending as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                blob: String::new(),
            },
        ));
        assert_eq!(s.competition_datasets("demo"), ["t2", "t1", "t3"]);
        assert_eq!(
            s.dataset("t2").unwrap().ranking_direction(),
            Direction::Ascending
        );
        assert_eq!(
            s.dataset("t1").unwrap().ranking_direction(),
            Direction::Descending
        );
        assert_eq!(s.dataset("t3").unwrap().metric, "mse");
        assert!(matches!(
            s.dataset("nope"),
            Err(LeaderboardError::DatasetNotFound(_))
        ));
        assert_eq!(s.privacy("demo"), (&["hal".to_string()][..], false));
    }

    #[test]
    fn given_a_board_read_then_a_later_submit_or_extension_shows_on_it() {
        let mut s = LeaderboardState::default();
        let mut c = competition(&[("cls", "accuracy", Direction::Descending)]);
        if let Some(comp) = c.competition.as_mut() {
            comp.policy = Some(nsml_proto::v1::Policy {
                closes_at_ms: 1500,
                ..Default::default()
            });
        }
        s.apply(&stored(1, &c));
        s.apply(&stored(2, &scored("s1", "ants", "cls", 0.5, false)));
        let teams = |s: &LeaderboardState| -> Vec<(String, u32)> {
            s.board_shared("cls", Side::Public)
                .unwrap()
                .iter()
                .map(|r| (r.team.clone(), r.count))
                .collect()
        };
        assert_eq!(teams(&s), [("ants".to_string(), 1)]);
        // A new submit on the dataset shows at the next read;
        s.apply(&stored(3, &scored("s2", "ants", "cls", 0.7, false)));
        assert_eq!(teams(&s), [("ants".to_string(), 2)]);
        // one submitted after the deadline does not, until a host extends the team's deadline.
        let mut late = scored("s3", "bees", "cls", 0.9, false);
        if let Some(sub) = late.submission.as_mut() {
            sub.submitted_at_ms = 2000;
        }
        s.apply(&stored(4, &late));
        assert_eq!(teams(&s).len(), 1);
        s.apply(&stored(
            5,
            &OverrideGranted {
                grant: Some(nsml_proto::v1::Override {
                    id: "o-1".into(),
                    competition: "demo".into(),
                    team: "bees".into(),
                    kind: OverrideKind::ExtendDeadline as i32,
                    until_ms: 3000,
                    ..Default::default()
                }),
            },
        ));
        assert_eq!(
            teams(&s),
            [("bees".to_string(), 1), ("ants".to_string(), 2)]
        );
        assert_eq!(
            **s.board_shared("cls", Side::Public).unwrap(),
            s.board("cls", Side::Public).unwrap()
        );
        // The overall ranking follows its boards.
        let overall = |s: &LeaderboardState| -> Vec<String> {
            s.overall_shared("demo", Side::Public)
                .unwrap()
                .iter()
                .map(|r| r.team.clone())
                .collect()
        };
        assert_eq!(overall(&s), ["bees", "ants"]);
        s.apply(&stored(6, &scored("s4", "ants", "cls", 0.95, false)));
        assert_eq!(overall(&s), ["ants", "bees"]);
        // The manifest applied again as it was keeps the boards computed; a new deadline does not.
        let kept = s.board_shared("cls", Side::Public).unwrap();
        s.apply(&stored(7, &c));
        assert!(Arc::ptr_eq(
            &kept,
            &s.board_shared("cls", Side::Public).unwrap()
        ));
        let mut later = c.clone();
        if let Some(p) = later.competition.as_mut().and_then(|c| c.policy.as_mut()) {
            p.closes_at_ms = 1200;
        }
        s.apply(&stored(8, &later));
        assert!(!Arc::ptr_eq(
            &kept,
            &s.board_shared("cls", Side::Public).unwrap()
        ));
        // Every board and ranking participants see is warmed: the public ones, and the private ones once revealed.
        let public = (
            vec![("cls".to_string(), Side::Public)],
            vec![("demo".to_string(), Side::Public)],
        );
        assert_eq!(s.rankings(), public);
        s.apply(&stored(
            9,
            &PrivateRevealed {
                competition: "demo".into(),
            },
        ));
        let (boards, overalls) = s.rankings();
        assert_eq!(
            boards,
            [
                ("cls".to_string(), Side::Public),
                ("cls".to_string(), Side::Private)
            ]
        );
        assert_eq!(
            overalls,
            [
                ("demo".to_string(), Side::Public),
                ("demo".to_string(), Side::Private)
            ]
        );
    }

    #[test]
    fn given_submits_of_several_teams_then_a_teams_are_found_once_each() {
        let mut s = LeaderboardState::default();
        s.apply(&stored(1, &scored("s1", "ants", "cls", 0.5, false)));
        s.apply(&stored(2, &scored("s2", "bees", "cls", 0.6, false)));
        s.apply(&stored(3, &scored("s3", "ants", "reg", 0.7, false)));
        s.apply(&stored(4, &scored("s1", "ants", "cls", 0.5, false)));
        s.apply(&stored(5, &scored("t1", "ants", "cls", 0.9, true)));
        let mut ids: Vec<&str> = s.submits_of("ants").map(|x| &*x.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["s1", "s3"]);
        assert_eq!(s.submits_of("wasps").count(), 0);
        // The names are shared between a team's submits.
        let ants: Vec<&Scored> = s.submits_of("ants").collect();
        assert!(Arc::ptr_eq(&ants[0].team, &ants[1].team));
    }

    #[test]
    fn given_a_reveal_then_a_later_apply_keeps_it_revealed() {
        let mut s = LeaderboardState::default();
        s.apply(&stored(1, &competition(&[])));
        s.apply(&stored(
            2,
            &PrivateRevealed {
                competition: "demo".into(),
            },
        ));
        s.apply(&stored(3, &competition(&[])));
        assert!(s.competition("demo").unwrap().private_revealed);
    }
}
