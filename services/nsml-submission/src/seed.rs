//! The events this service records for a real submit that is admitted, hands over its predictions and is
//! scored, built by the same rules and encoders as the handler's: for the bench that seeds a large log
//! without running a million submit sessions.

use nsml_common::aggregate::Aggregate;
use nsml_eventstore::{NewEvent, StoredEvent};
use nsml_proto::v1::{Session, SubmissionPredictionsTaken, SubmissionRequested, SubmitRequest};

use crate::domain::{
    EndedBy, Ending, SubmitState, decide_end, decide_session, decide_take_predictions,
};
use crate::error::SubmissionError;
use crate::handler::{SERVICE_ACTOR, admitted, ended, submission_of};

/// A real submit scored end to end.
#[derive(Debug, Clone)]
pub struct ScoredSubmit {
    /// The training session submitted, `TEAM/DATASET/N`, of the competition it runs in.
    pub source: Session,
    pub checkpoint: String,
    /// The submit session that ran it, `TEAM/DATASET/N`.
    pub session: String,
    /// Who submitted it, as the log names actors (`user:alice`).
    pub actor: String,
    /// The dataset's metric.
    pub metric: String,
    pub time_limit_secs: u64,
    pub score: f64,
    pub private_score: Option<f64>,
    pub submitted_at_ms: i64,
    pub scored_at_ms: i64,
}

/// The events of `submission-ID` for `s`, in order: requested, admitted (its submit session named),
/// predictions taken, scored; each decided on the submission's state as the events before it left it, and
/// stamped with the time the service would have recorded it.
pub fn scored_submission(s: &ScoredSubmit) -> Result<(String, Vec<NewEvent>), SubmissionError> {
    let request = SubmitRequest {
        session: s.source.name.clone(),
        checkpoint: s.checkpoint.clone(),
        trial: false,
    };
    let sub = submission_of(
        &s.source,
        &request,
        s.metric.clone(),
        s.time_limit_secs,
        s.submitted_at_ms,
    );
    let stream = format!("submission-{}", sub.id);
    let mut state = SubmitState::default();
    let mut events = Vec::with_capacity(4);
    let mut record = |state: &mut SubmitState, mut e: NewEvent, at_ms: i64| {
        e.metadata.recorded_at_ms = at_ms;
        e.metadata.traceparent.clear();
        let version = events.len() as u64 + 1;
        state.apply(&StoredEvent {
            position: version,
            stream: stream.clone(),
            version,
            event_type: e.event_type.clone(),
            payload: e.payload.clone(),
            metadata: e.metadata.clone(),
            hash: String::new(),
        });
        events.push(e);
    };
    let requested = SubmissionRequested {
        submission: Some(sub.clone()),
    };
    record(
        &mut state,
        nsml_common::event::new_event(&requested, &s.actor, ""),
        s.submitted_at_ms,
    );
    let mut running = sub.clone();
    running.session = s.session.clone();
    if let Some(known) = decide_session(&state, &running) {
        record(&mut state, admitted(known, &s.actor), s.submitted_at_ms);
    }
    let scoring = decide_take_predictions(&state, &s.session, &s.source.team)?;
    let taken = SubmissionPredictionsTaken {
        submission: Some(scoring),
    };
    record(
        &mut state,
        nsml_common::event::new_event(&taken, SERVICE_ACTOR, ""),
        s.scored_at_ms,
    );
    let ending = Ending::Scored {
        score: s.score,
        private: s.private_score,
    };
    if let Some(scored) = decide_end(&state, &ending, EndedBy::Scorer, s.scored_at_ms) {
        record(&mut state, ended(scored), s.scored_at_ms);
    }
    Ok((stream, events))
}

#[cfg(test)]
mod tests {
    use nsml_proto::v1::{EventPayload, SubmissionAdmitted, SubmissionScored, SubmissionStatus};

    use super::*;

    #[test]
    fn a_scored_submit_is_requested_admitted_taken_and_scored() {
        let s = ScoredSubmit {
            source: Session {
                name: "ants/cls/1".into(),
                team: "ants".into(),
                dataset: "cls".into(),
                competition: "demo".into(),
                ..Default::default()
            },
            checkpoint: "4".into(),
            session: "ants/cls/2".into(),
            actor: "user:alice".into(),
            metric: "accuracy".into(),
            time_limit_secs: 3600,
            score: 0.75,
            private_score: Some(0.5),
            submitted_at_ms: 1_000,
            scored_at_ms: 4_000,
        };
        let (stream, events) = scored_submission(&s).unwrap();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(
            types,
            [
                SubmissionRequested::TYPE,
                SubmissionAdmitted::TYPE,
                SubmissionPredictionsTaken::TYPE,
                SubmissionScored::TYPE
            ]
        );
        let last = events.last().unwrap();
        let scored = nsml_common::event::stored(&stream, 4, &SubmissionScored::default());
        let scored = nsml_common::event::decode::<SubmissionScored>(&StoredEvent {
            payload: last.payload.clone(),
            ..scored
        });
        let sub = scored.and_then(|e| e.submission).unwrap();
        assert_eq!(stream, format!("submission-{}", sub.id));
        assert_eq!(sub.status(), SubmissionStatus::Scored);
        assert_eq!((sub.score, sub.private_score), (0.75, Some(0.5)));
        assert_eq!(sub.session, "ants/cls/2");
        assert_eq!((sub.submitted_at_ms, sub.finished_at_ms), (1_000, 4_000));
        assert_eq!(last.metadata.recorded_at_ms, 4_000);
    }
}
