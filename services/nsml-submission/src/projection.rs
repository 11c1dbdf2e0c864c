//! The submission read model: submissions by id and by submit session, and who may see private scores.

use std::collections::{BTreeMap, HashMap};

use nsml_common::event::decode;
use nsml_common::projection::ReadModel;
use nsml_eventstore::StoredEvent;
use nsml_proto::v1::{
    CompetitionApplied, Policy, PrivateRevealed, SessionRequested, Submission, SubmissionAdmitted,
    SubmissionFailed, SubmissionPredictionsTaken, SubmissionRejected, SubmissionRequested,
    SubmissionScored, SubmissionTimedOut,
};

#[derive(Debug, Default)]
pub struct Submissions {
    pub by_id: BTreeMap<String, Submission>,
    /// Submit session name → submission id.
    pub by_session: HashMap<String, String>,
    pub revealed: HashMap<String, bool>,
    pub policies: HashMap<String, Policy>,
}

impl ReadModel for Submissions {
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
            if let Some(e) = decode::<SessionRequested>(ev) {
                // A submit session is named before it starts, so its end always finds its submission.
                if let Some(s) = e.session.filter(|s| !s.submission_id.is_empty()) {
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
            if !s.session.is_empty() {
                self.by_session.insert(s.session.clone(), s.id.clone());
            }
            self.by_id.insert(s.id.clone(), s);
        }
    }
}
