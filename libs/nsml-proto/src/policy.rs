//! What a competition's policy says for one dataset: the round it belongs to, when runs and submits on it open
//! and close, and its submit rules. The quota service decides by it, the submission service sizes submit
//! sessions by it and the leaderboard freezes boards by it, so all three read a round the same way.

use crate::v1::{Policy, Round};

/// The schedule and submit rules one dataset follows: its round's where the round sets them, else the
/// competition's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatasetRules<'a> {
    /// The round the dataset belongs to; `None`: it follows the competition's schedule.
    pub round: Option<&'a Round>,
    /// Before this, runs and submits on the dataset are refused (0: open from the start).
    pub opens_at_ms: i64,
    /// From this, submits on the dataset are refused and its board is frozen (0: never).
    pub closes_at_ms: i64,
    pub submit_interval_secs: u64,
    pub submit_time_limit_secs: u64,
    pub submit_max_cpus: u32,
}

impl DatasetRules<'_> {
    /// Whether a host's extension of a team's deadline for `round` (empty: the competition's) moves this
    /// dataset's deadline: one naming the dataset's round does; one for the competition does where the
    /// dataset closes with the competition (it is in no round, or its round sets no closing time of its own).
    pub fn extended_by(&self, round: &str) -> bool {
        match self.round {
            Some(r) if r.name == round => true,
            Some(r) => round.is_empty() && r.closes_at_ms <= 0,
            None => round.is_empty(),
        }
    }
}

impl Policy {
    /// The round `dataset` belongs to, if any.
    pub fn round_of(&self, dataset: &str) -> Option<&Round> {
        self.rounds
            .iter()
            .find(|r| r.datasets.iter().any(|d| d == dataset))
    }

    /// The round named `name`, if the policy has one.
    pub fn round(&self, name: &str) -> Option<&Round> {
        self.rounds.iter().find(|r| r.name == name)
    }

    /// The schedule and submit rules `dataset` follows.
    pub fn rules_for(&self, dataset: &str) -> DatasetRules<'_> {
        let round = self.round_of(dataset);
        let or = |own: i64, competition: i64| if own > 0 { own } else { competition };
        DatasetRules {
            round,
            opens_at_ms: round.map_or(self.opens_at_ms, |r| or(r.opens_at_ms, self.opens_at_ms)),
            closes_at_ms: round
                .map_or(self.closes_at_ms, |r| or(r.closes_at_ms, self.closes_at_ms)),
            submit_interval_secs: round
                .and_then(|r| r.submit_interval_secs)
                .unwrap_or(self.submit_interval_secs),
            submit_time_limit_secs: round
                .and_then(|r| r.submit_time_limit_secs)
                .unwrap_or(self.submit_time_limit_secs),
            submit_max_cpus: round
                .and_then(|r| r.submit_max_cpus)
                .unwrap_or(self.submit_max_cpus),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            opens_at_ms: 1_000,
            closes_at_ms: 9_000,
            submit_interval_secs: 3600,
            submit_time_limit_secs: 3600,
            submit_max_cpus: 4,
            rounds: vec![
                Round {
                    name: "preliminary".into(),
                    datasets: vec!["a".into()],
                    opens_at_ms: 2_000,
                    closes_at_ms: 5_000,
                    submit_interval_secs: Some(600),
                    ..Default::default()
                },
                Round {
                    name: "final".into(),
                    datasets: vec!["b".into()],
                    opens_at_ms: 6_000,
                    submit_max_cpus: Some(2),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn a_dataset_in_a_round_follows_the_rounds_schedule_and_the_rules_it_sets() {
        let p = policy();
        let a = p.rules_for("a");
        assert_eq!(a.round.map(|r| r.name.as_str()), Some("preliminary"));
        assert_eq!((a.opens_at_ms, a.closes_at_ms), (2_000, 5_000));
        assert_eq!(
            (
                a.submit_interval_secs,
                a.submit_time_limit_secs,
                a.submit_max_cpus
            ),
            (600, 3600, 4)
        );
        assert!(a.extended_by("preliminary") && !a.extended_by("") && !a.extended_by("final"));
        // A round that leaves its close unset closes with the competition, whose extensions then apply.
        let b = p.rules_for("b");
        assert_eq!((b.opens_at_ms, b.closes_at_ms), (6_000, 9_000));
        assert_eq!((b.submit_interval_secs, b.submit_max_cpus), (3600, 2));
        assert!(b.extended_by("final") && b.extended_by("") && !b.extended_by("preliminary"));
    }

    #[test]
    fn a_dataset_in_no_round_follows_the_competition() {
        let p = policy();
        let c = p.rules_for("c");
        assert!(c.round.is_none());
        assert_eq!((c.opens_at_ms, c.closes_at_ms), (1_000, 9_000));
        assert_eq!(c.submit_interval_secs, 3600);
        assert!(c.extended_by("") && !c.extended_by("preliminary"));
    }
}
