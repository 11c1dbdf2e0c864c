//! One submission's state machine (stream `submission-ID`), as pure rules over what its stream holds:
//! Running → (predictions taken) Scoring → Scored / Failed, or Running → Failed / TimedOut when the submit
//! session ends without predictions; each outcome recorded once.
//!
//! Every event of the stream carries the whole submission as it stands after it: `SubmissionRequested`,
//! `SubmissionAdmitted` (the submit session named), `SubmissionPredictionsTaken` (status Scoring), then one
//! of `SubmissionScored`, `SubmissionFailed`, `SubmissionTimedOut` or `SubmissionRejected`.

use nsml_common::aggregate::Aggregate;
use nsml_common::event::decode;
use nsml_eventstore::StoredEvent;
use nsml_proto::v1::{
    Submission, SubmissionAdmitted, SubmissionFailed, SubmissionPredictionsTaken,
    SubmissionRejected, SubmissionRequested, SubmissionScored, SubmissionStatus,
    SubmissionTimedOut,
};

use crate::error::SubmissionError;

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

    fn status(&self) -> Option<SubmissionStatus> {
        self.submission.as_ref().map(Submission::status)
    }
}

impl Aggregate for SubmitState {
    fn apply(&mut self, ev: &StoredEvent) {
        if let Some(e) = decode::<SubmissionRequested>(ev) {
            self.submission = e.submission;
        } else if let Some(e) = decode::<SubmissionAdmitted>(ev) {
            self.submission = e.submission;
        } else if let Some(e) = decode::<SubmissionPredictionsTaken>(ev) {
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

/// How a submission ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Ending {
    Scored { score: f64, private: Option<f64> },
    Failed(String),
    TimedOut(String),
}

/// Who ends a submission, which decides from which state it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndedBy {
    /// The submit session ended, or ran past its time limit, before handing over predictions: ends a
    /// Running submission only, since one whose predictions were taken is the scorer's to end.
    Session,
    /// The scorer, with the predictions' score or why there is none: ends a Scoring submission only.
    Scorer,
}

/// The submission as it ends, or `None` when this ending does not apply (already ended, unknown, or not in
/// the state `by` may end).
pub fn decide_end(
    state: &SubmitState,
    ending: &Ending,
    by: EndedBy,
    now_ms: i64,
) -> Option<Submission> {
    let from = match by {
        EndedBy::Session => SubmissionStatus::Running,
        EndedBy::Scorer => SubmissionStatus::Scoring,
    };
    if state.ended() || state.status() != Some(from) {
        return None;
    }
    let mut s = state.submission.clone()?;
    s.finished_at_ms = now_ms;
    match ending {
        Ending::Scored { score, private } => {
            s.set_status(SubmissionStatus::Scored);
            s.score = *score;
            s.private_score = *private;
        }
        Ending::Failed(reason) => {
            s.set_status(SubmissionStatus::Failed);
            s.reason = reason.clone();
        }
        Ending::TimedOut(reason) => {
            s.set_status(SubmissionStatus::TimedOut);
            s.reason = reason.clone();
        }
    }
    Some(s)
}

/// The submission with its submit session named, or `None` when the session is known already or the
/// submission ended.
pub fn decide_session(state: &SubmitState, admitted: &Submission) -> Option<Submission> {
    let known = state
        .submission
        .as_ref()
        .is_some_and(|s| !s.session.is_empty());
    (!state.ended() && !known).then(|| admitted.clone())
}

/// The submission whose predictions `session` of `team` hands over, as the scorer will see it once they
/// are taken (status Scoring); refused when the session does not run it or predictions were taken already.
pub fn decide_take_predictions(
    state: &SubmitState,
    session: &str,
    team: &str,
) -> Result<Submission, SubmissionError> {
    let not_submit = || SubmissionError::NotSubmitSession {
        session: session.to_string(),
    };
    let mut sub = state.submission.clone().ok_or_else(not_submit)?;
    if sub.team != team || (!sub.session.is_empty() && sub.session != session) {
        return Err(not_submit());
    }
    if state.ended() || sub.status() != SubmissionStatus::Running {
        return Err(SubmissionError::PredictionsTaken { id: sub.id });
    }
    sub.session = session.to_string();
    sub.set_status(SubmissionStatus::Scoring);
    Ok(sub)
}

#[cfg(test)]
mod tests {
    use nsml_common::event::stored;

    use super::*;

    fn running() -> Submission {
        Submission {
            id: "s1".into(),
            team: "demo".into(),
            session: "demo/t1/9".into(),
            status: SubmissionStatus::Running as i32,
            ..Default::default()
        }
    }

    fn given(events: &[StoredEvent]) -> SubmitState {
        let mut st = SubmitState::default();
        for e in events {
            st.apply(e);
        }
        st
    }

    fn admitted(s: Submission) -> StoredEvent {
        stored(
            "submission-s1",
            2,
            &SubmissionAdmitted {
                submission: Some(s),
                decision_id: String::new(),
            },
        )
    }

    fn scoring() -> Submission {
        let mut s = running();
        s.set_status(SubmissionStatus::Scoring);
        s
    }

    #[test]
    fn predictions_of_a_running_submission_are_taken_and_it_is_scoring() {
        // Given a running submission
        let st = given(&[admitted(running())]);
        // When its session hands over predictions
        let sub = decide_take_predictions(&st, "demo/t1/9", "demo").unwrap();
        // Then it is scoring
        assert_eq!(sub.status(), SubmissionStatus::Scoring);
    }

    #[test]
    fn predictions_are_taken_once() {
        // Given a submission whose predictions were taken
        let st = given(&[admitted(scoring())]);
        // When predictions come again
        let err = decide_take_predictions(&st, "demo/t1/9", "demo").unwrap_err();
        // Then they are refused
        assert_eq!(
            err.to_string(),
            "submission s1 already ended; predictions are taken once"
        );
    }

    #[test]
    fn predictions_from_another_session_or_team_are_refused() {
        let st = given(&[admitted(running())]);
        for (session, team) in [("demo/t1/8", "demo"), ("other/t1/9", "other")] {
            let err = decide_take_predictions(&st, session, team).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "session `{session}` runs no submission that is waiting for its predictions"
                )
            );
        }
        // Nothing recorded yet: no submission to hand predictions to.
        assert!(decide_take_predictions(&SubmitState::default(), "demo/t1/9", "demo").is_err());
    }

    #[test]
    fn the_session_that_names_itself_first_is_recorded() {
        // Given a submission requested before its session was known
        let mut requested = running();
        requested.session.clear();
        let st = given(&[admitted(requested)]);
        // When predictions come from its session
        let sub = decide_take_predictions(&st, "demo/t1/9", "demo").unwrap();
        // Then that session is the one recorded
        assert_eq!(sub.session, "demo/t1/9");
    }

    #[test]
    fn a_session_ending_does_not_fail_a_submission_being_scored() {
        // Given a submission being scored
        let st = given(&[admitted(scoring())]);
        // When its submit session exits
        let ending = Ending::Failed("the submit session exited".into());
        // Then nothing is recorded: the scorer ends it
        assert_eq!(decide_end(&st, &ending, EndedBy::Session, 5), None);
        let scored = Ending::Scored {
            score: 0.5,
            private: Some(0.25),
        };
        let s = decide_end(&st, &scored, EndedBy::Scorer, 5).unwrap();
        assert_eq!(
            (s.status(), s.score, s.private_score, s.finished_at_ms),
            (SubmissionStatus::Scored, 0.5, Some(0.25), 5)
        );
    }

    #[test]
    fn a_running_submission_ends_with_its_session_and_not_by_the_scorer() {
        // Given a running submission
        let st = given(&[admitted(running())]);
        // When the scorer ends it (it never took predictions)
        let scored = Ending::Scored {
            score: 1.0,
            private: None,
        };
        assert_eq!(decide_end(&st, &scored, EndedBy::Scorer, 5), None);
        // Then only its session's end counts, with the reason
        let timed_out = Ending::TimedOut("time limit exceeded".into());
        let s = decide_end(&st, &timed_out, EndedBy::Session, 5).unwrap();
        assert_eq!(
            (s.status(), s.reason.as_str()),
            (SubmissionStatus::TimedOut, "time limit exceeded")
        );
    }

    #[test]
    fn an_outcome_is_recorded_once() {
        // Given a scored submission
        let mut done = scoring();
        done.set_status(SubmissionStatus::Scored);
        let st = given(&[stored(
            "submission-s1",
            3,
            &SubmissionScored {
                submission: Some(done),
            },
        )]);
        // When anything else tries to end it
        for by in [EndedBy::Session, EndedBy::Scorer] {
            let failed = Ending::Failed("late".into());
            // Then nothing is recorded
            assert_eq!(decide_end(&st, &failed, by, 9), None);
        }
        assert_eq!(decide_session(&st, &running()), None);
    }

    #[test]
    fn a_session_is_named_once() {
        let mut requested = running();
        requested.session.clear();
        let st = given(&[admitted(requested)]);
        assert_eq!(decide_session(&st, &running()), Some(running()));
        let st = given(&[admitted(running())]);
        assert_eq!(decide_session(&st, &running()), None);
    }
}
