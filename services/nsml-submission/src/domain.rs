//! One submission's state machine (stream `submission-ID`): Running → Scored / Failed / TimedOut, each
//! outcome recorded once.

use nsml_common::aggregate::Aggregate;
use nsml_common::event::decode;
use nsml_eventstore::StoredEvent;
use nsml_proto::v1::{
    Submission, SubmissionAdmitted, SubmissionFailed, SubmissionRejected, SubmissionRequested,
    SubmissionScored, SubmissionStatus, SubmissionTimedOut,
};

/// The submission as its stream tells it.
#[derive(Debug, Clone, Default)]
pub struct SubmitState {
    pub submission: Option<Submission>,
    pub rejected: bool,
}

impl SubmitState {
    /// Whether an outcome was already recorded.
    pub fn ended(&self) -> bool {
        self.rejected
            || self.submission.as_ref().is_some_and(|s| {
                matches!(
                    s.status(),
                    SubmissionStatus::Scored
                        | SubmissionStatus::Failed
                        | SubmissionStatus::TimedOut
                )
            })
    }
}

impl Aggregate for SubmitState {
    fn apply(&mut self, ev: &StoredEvent) {
        if let Some(e) = decode::<SubmissionRequested>(ev) {
            self.submission = e.submission;
        } else if let Some(e) = decode::<SubmissionAdmitted>(ev) {
            self.submission = e.submission;
        } else if decode::<SubmissionRejected>(ev).is_some() {
            self.rejected = true;
        } else if let Some(e) = decode::<SubmissionScored>(ev) {
            self.submission = e.submission;
        } else if let Some(e) = decode::<SubmissionFailed>(ev) {
            self.submission = e.submission;
        } else if let Some(e) = decode::<SubmissionTimedOut>(ev) {
            self.submission = e.submission;
        }
    }
}
