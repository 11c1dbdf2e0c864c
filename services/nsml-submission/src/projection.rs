//! The submission read model: submissions by id and by submit session, and who may see private scores.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use nsml_common::event::{decode, decode_part};
use nsml_common::projection::ReadModel;
use nsml_eventstore::StoredEvent;
use nsml_proto::v1::{
    CompetitionApplied, EventPayload, Policy, PrivateRevealed, SessionRequested, Submission,
    SubmissionAdmitted, SubmissionFailed, SubmissionPredictionsTaken, SubmissionRejected,
    SubmissionRequested, SubmissionScored, SubmissionStatus, SubmissionTimedOut,
};
use prost::Message;

/// What the read model reads of a `SessionRequested` (most of a busy log's are training runs): the session's
/// name and the submission it runs, under `Session`'s tags; the rest of the session is skipped.
#[derive(Clone, PartialEq, prost::Message)]
struct SessionRequestedPart {
    #[prost(message, optional, tag = "1")]
    session: Option<SessionPart>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SessionPart {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "20")]
    submission_id: String,
}

/// An ended submission as the read model keeps it.
#[derive(Debug)]
struct Kept {
    team: Arc<str>,
    competition: Arc<str>,
    dataset: Arc<str>,
    /// The submission, protobuf-encoded, without its id, team, competition and dataset (kept once, beside).
    encoded: Box<[u8]>,
}

impl Kept {
    fn decode(&self, id: &str) -> Option<Submission> {
        let mut s = Submission::decode(&*self.encoded).ok()?;
        s.id = id.to_owned();
        s.team = self.team.to_string();
        s.competition = self.competition.to_string();
        s.dataset = self.dataset.to_string();
        Some(s)
    }
}

impl Submissions {
    /// The submission `id` as last recorded.
    pub fn get(&self, id: &str) -> Option<Submission> {
        match self.open.get(id) {
            Some(s) => Some(s.clone()),
            None => self.ended.get(id)?.decode(id),
        }
    }

    /// The submission `id` if it has not ended yet.
    pub fn open_one(&self, id: &str) -> Option<&Submission> {
        self.open.get(id)
    }

    /// The submissions not ended yet (Running or Scoring).
    pub fn open(&self) -> impl Iterator<Item = &Submission> {
        self.open.values()
    }

    /// The submissions of the teams `team` accepts (by team and competition), on `dataset` (every dataset when
    /// empty), in id order.
    pub fn listed(
        &self,
        mut team: impl FnMut(&str, &str) -> bool,
        dataset: &str,
    ) -> Vec<Submission> {
        let on = |d: &str| dataset.is_empty() || d == dataset;
        let mut out: Vec<Submission> = self
            .open
            .values()
            .filter(|s| on(&s.dataset) && team(&s.team, &s.competition))
            .cloned()
            .collect();
        out.extend(
            self.ended
                .iter()
                .filter(|(_, k)| on(&k.dataset) && team(&k.team, &k.competition))
                .filter_map(|(id, k)| k.decode(id)),
        );
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(known) = self.names.get(name) {
            return known.clone();
        }
        let name: Arc<str> = name.into();
        self.names.insert(name.clone());
        name
    }

    fn record(&mut self, mut s: Submission) {
        let ended = matches!(
            s.status(),
            SubmissionStatus::Scored | SubmissionStatus::Failed | SubmissionStatus::TimedOut
        );
        if !ended {
            if !s.session.is_empty() && self.by_session.get(&s.session) != Some(&s.id) {
                self.by_session.insert(s.session.clone(), s.id.clone());
            }
            // A submission is in `open` or in `ended`, never both: one found open is not looked for among the
            // ended, the larger map by far.
            if let Some(open) = self.open.get_mut(&s.id) {
                *open = s;
            } else {
                self.ended.remove(&s.id);
                self.open.insert(s.id.clone(), s);
            }
            return;
        }
        self.open.remove(&s.id);
        if self.by_session.get(&s.session) == Some(&s.id) {
            self.by_session.remove(&s.session);
        }
        let id = std::mem::take(&mut s.id);
        let team = self.intern(&std::mem::take(&mut s.team));
        let competition = self.intern(&std::mem::take(&mut s.competition));
        let dataset = self.intern(&std::mem::take(&mut s.dataset));
        let kept = Kept {
            team,
            competition,
            dataset,
            encoded: s.encode_to_vec().into_boxed_slice(),
        };
        self.ended.insert(id, kept);
    }
}

#[derive(Debug, Default)]
pub struct Submissions {
    /// Submission id → the submission as last recorded. Ended ones are read rarely (a `Get`, a team's
    /// `List`) and kept for ever, so they are kept encoded, at the size the log stores them, with what a
    /// listing filters on beside.
    ended: BTreeMap<String, Kept>,
    /// Submissions not ended yet (Running or Scoring): the ones the watchdog, the scorer and the reactor look at.
    open: BTreeMap<String, Submission>,
    /// The teams and datasets that submissions name, each kept once.
    names: HashSet<Arc<str>>,
    /// Submit session name → the id of the submission it runs, while that submission has not ended: what
    /// the session's end and its predictions are matched to.
    pub by_session: HashMap<String, String>,
    pub revealed: HashMap<String, bool>,
    pub policies: HashMap<String, Policy>,
}

impl ReadModel for Submissions {
    const TYPES: Option<&'static [&'static str]> = Some(&[
        SubmissionRequested::TYPE,
        SubmissionAdmitted::TYPE,
        SubmissionPredictionsTaken::TYPE,
        SubmissionRejected::TYPE,
        SubmissionScored::TYPE,
        SubmissionFailed::TYPE,
        SubmissionTimedOut::TYPE,
        SessionRequested::TYPE,
        CompetitionApplied::TYPE,
        PrivateRevealed::TYPE,
    ]);

    fn apply(&mut self, ev: &StoredEvent) {
        let sub = if let Some(e) = decode::<SubmissionRequested>(ev) {
            e.submission
        } else if let Some(e) = decode::<SubmissionAdmitted>(ev) {
            e.submission
        } else if let Some(e) = decode::<SubmissionPredictionsTaken>(ev) {
            e.submission
        } else if let Some(e) = decode::<SubmissionRejected>(ev) {
            e.submission
        } else if let Some(e) = decode::<SubmissionScored>(ev) {
            e.submission
        } else if let Some(e) = decode::<SubmissionFailed>(ev) {
            e.submission
        } else if let Some(e) = decode::<SubmissionTimedOut>(ev) {
            e.submission
        } else {
            if let Some(e) = decode_part::<SessionRequested, SessionRequestedPart>(ev) {
                // A submit session is named before it starts, so its end always finds its submission.
                if let Some(s) = e.session.filter(|s| !s.submission_id.is_empty())
                    && !self.ended.contains_key(&s.submission_id)
                {
                    self.by_session.insert(s.name, s.submission_id);
                }
            } else if let Some(e) = decode::<CompetitionApplied>(ev) {
                if let Some(c) = e.competition {
                    self.revealed.insert(c.id.clone(), c.private_revealed);
                    if let Some(p) = c.policy {
                        self.policies.insert(c.id, p);
                    }
                }
            } else if let Some(e) = decode::<PrivateRevealed>(ev) {
                self.revealed.insert(e.competition, true);
            }
            None
        };
        if let Some(s) = sub {
            self.record(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use nsml_common::event::stored;

    use super::*;

    fn sub(id: &str, team: &str, dataset: &str, status: SubmissionStatus) -> Submission {
        Submission {
            id: id.into(),
            team: team.into(),
            dataset: dataset.into(),
            competition: "demo".into(),
            session: format!("{team}/{dataset}/9"),
            status: status as i32,
            score: 0.5,
            ..Default::default()
        }
    }

    #[test]
    fn ended_submissions_read_back_whole_and_only_unended_ones_are_open() {
        let mut p = Submissions::default();
        let running = sub("s1", "ants", "cls", SubmissionStatus::Running);
        p.apply(&stored(
            "submission-s1",
            1,
            &SubmissionAdmitted {
                submission: Some(running.clone()),
                decision_id: String::new(),
            },
        ));
        let scored = sub("s2", "bees", "cls", SubmissionStatus::Scored);
        p.apply(&stored(
            "submission-s2",
            2,
            &SubmissionScored {
                submission: Some(scored.clone()),
            },
        ));
        let ids: Vec<&str> = p.open().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["s1"]);
        assert_eq!(p.get("s2"), Some(scored.clone()));
        assert_eq!(p.open_one("s2"), None);
        assert_eq!(
            p.by_session.get("ants/cls/9").map(String::as_str),
            Some("s1")
        );
        assert_eq!(p.by_session.get("bees/cls/9"), None);
        // The running one ends: it leaves the open ones and reads back as it ended.
        let mut ended = running.clone();
        ended.set_status(SubmissionStatus::Scored);
        p.apply(&stored(
            "submission-s1",
            3,
            &SubmissionScored {
                submission: Some(ended.clone()),
            },
        ));
        assert_eq!(p.open().count(), 0);
        assert_eq!(p.get("s1"), Some(ended));
        assert_eq!(
            p.by_session.get("ants/cls/9"),
            None,
            "an ended submission's session is forgotten"
        );
        assert_eq!(p.get("nope"), None);
    }

    #[test]
    fn a_listing_keeps_the_teams_and_dataset_asked_for_in_id_order() {
        let mut p = Submissions::default();
        let events = [
            sub("s3", "ants", "cls", SubmissionStatus::Scored),
            sub("s1", "ants", "reg", SubmissionStatus::Failed),
            sub("s2", "bees", "cls", SubmissionStatus::Scored),
            sub("s4", "ants", "cls", SubmissionStatus::Running),
        ];
        for (i, s) in events.into_iter().enumerate() {
            p.apply(&stored(
                "submission",
                i as u64 + 1,
                &SubmissionRequested {
                    submission: Some(s),
                },
            ));
        }
        let ids = |v: Vec<Submission>| v.into_iter().map(|s| s.id).collect::<Vec<_>>();
        assert_eq!(
            ids(p.listed(|team, c| team == "ants" && c == "demo", "")),
            ["s1", "s3", "s4"]
        );
        assert_eq!(ids(p.listed(|team, _| team == "ants", "cls")), ["s3", "s4"]);
        assert_eq!(ids(p.listed(|_, c| c == "other", "")), Vec::<String>::new());
    }

    /// The part of a `SessionRequested` the model decodes reads the same name and submission as the whole
    /// message (its tags are `Session`'s), and a submit session requested before its submission ends is matched.
    #[test]
    fn a_requested_submit_session_is_read_by_its_name_and_submission() {
        let session = nsml_proto::v1::Session {
            name: "ants/cls/12".into(),
            team: "ants".into(),
            dataset: "cls".into(),
            competition: "demo".into(),
            submission_id: "s7".into(),
            args: "--epochs 3".into(),
            kind: nsml_proto::v1::SessionKind::Submit as i32,
            ..Default::default()
        };
        let requested = SessionRequested {
            session: Some(session.clone()),
        };
        let part = SessionRequestedPart::decode(requested.encode_to_vec().as_slice())
            .expect("decodes")
            .session
            .expect("a session");
        assert_eq!(
            (part.name.as_str(), part.submission_id.as_str()),
            (session.name.as_str(), session.submission_id.as_str())
        );
        let mut p = Submissions::default();
        p.apply(&stored("sessions", 1, &requested));
        let training = nsml_proto::v1::Session {
            name: "ants/cls/13".into(),
            submission_id: String::new(),
            ..session
        };
        p.apply(&stored(
            "sessions",
            2,
            &SessionRequested {
                session: Some(training),
            },
        ));
        assert_eq!(
            p.by_session.get("ants/cls/12").map(String::as_str),
            Some("s7")
        );
        assert_eq!(
            p.by_session.len(),
            1,
            "a training session names no submission"
        );
    }
}
