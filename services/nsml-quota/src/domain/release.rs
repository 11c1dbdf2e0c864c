//! The facts from outside that the ledger records: a session that ended releases what it held (a trial submit
//! session only when stopped or removed, as NSML had it), and a real submit's outcome starts or spares the
//! submit interval. Each is due at most once, so replays and duplicate deliveries record nothing twice.

use nsml_proto::v1::{ResourcesReleased, SessionKind, Submission, SubmitEnded, SubmitSucceeded};

use super::ledger::Ledger;

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    Exited,
    Failed,
    Stopped,
    Removed,
}

impl SessionEnd {
    /// The cause as a `ResourcesReleased` records it.
    pub const fn as_str(self) -> &'static str {
        match self {
            SessionEnd::Exited => "exited",
            SessionEnd::Failed => "failed",
            SessionEnd::Stopped => "stopped",
            SessionEnd::Removed => "removed",
        }
    }

    /// Whether a session of `kind` that ended so gives back what it held: a trial submit session keeps its
    /// resources after it exits or fails, until it is stopped or removed.
    pub fn releases(self, kind: SessionKind) -> bool {
        match self {
            SessionEnd::Exited | SessionEnd::Failed => kind != SessionKind::TrialSubmit,
            SessionEnd::Stopped | SessionEnd::Removed => true,
        }
    }
}

/// The release due when `session` ended so at `at_ms`, if it holds resources it gives back.
pub fn release(
    ledger: &Ledger,
    session: &str,
    end: SessionEnd,
    at_ms: i64,
) -> Option<ResourcesReleased> {
    let h = ledger.holdings.get(session)?;
    end.releases(h.kind).then(|| ResourcesReleased {
        session: session.to_string(),
        resources: Some(h.resources),
        cause: end.as_str().to_string(),
        at_ms,
    })
}

/// The outcome of a real submit, as its ledger records it.
#[derive(Debug, Clone, PartialEq)]
pub enum SubmitOutcome {
    /// It succeeded: the interval counts from when it was submitted.
    Succeeded(SubmitSucceeded),
    /// It failed or timed out: it never counts.
    Ended(SubmitEnded),
}

/// The outcome to record for `sub`, if the ledger has it in flight (a submit it admitted and has not seen end).
pub fn submit_outcome(ledger: &Ledger, sub: &Submission, succeeded: bool) -> Option<SubmitOutcome> {
    let (dataset, submitted_at) = ledger.granted_submits.get(&sub.id)?.clone();
    let st = ledger.submits.get(&dataset)?;
    if !st.in_flight.contains_key(&sub.id) {
        return None;
    }
    Some(if succeeded {
        SubmitOutcome::Succeeded(SubmitSucceeded {
            dataset,
            submission_id: sub.id.clone(),
            at_ms: submitted_at,
        })
    } else {
        SubmitOutcome::Ended(SubmitEnded {
            dataset,
            submission_id: sub.id.clone(),
            succeeded: false,
            at_ms: sub.finished_at_ms,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::tests::{failed, given, granted, req, succeeded};

    fn sub(id: &str, finished_at_ms: i64) -> Submission {
        Submission {
            id: id.into(),
            team: "demo".into(),
            finished_at_ms,
            ..Default::default()
        }
    }

    #[test]
    fn a_training_session_that_ends_gives_back_what_it_held() {
        // Given a training session holding 2 GPUs,
        let l = given(&[granted(
            req(SessionKind::Train, "demo/t1-cls/1", 2, 8, ""),
            0,
        )]);
        // when it exits, then its resources are released, with the cause and time.
        let r = release(&l, "demo/t1-cls/1", SessionEnd::Exited, 42).unwrap();
        assert_eq!(
            (r.cause.as_str(), r.at_ms, r.resources.unwrap().gpus),
            ("exited", 42, 2)
        );
        // And a session the ledger does not hold releases nothing.
        assert!(release(&l, "demo/t1-cls/2", SessionEnd::Stopped, 42).is_none());
    }

    #[test]
    fn a_trial_submit_session_keeps_its_resources_until_stopped_or_removed() {
        // Given a trial submit session,
        let l = given(&[granted(
            req(SessionKind::TrialSubmit, "demo/t1-cls/1", 0, 4, ""),
            0,
        )]);
        // when it exits or fails, then nothing is released;
        for end in [SessionEnd::Exited, SessionEnd::Failed] {
            assert!(release(&l, "demo/t1-cls/1", end, 1).is_none(), "{end:?}");
        }
        // when it is stopped or removed, then it is.
        for end in [SessionEnd::Stopped, SessionEnd::Removed] {
            assert_eq!(
                release(&l, "demo/t1-cls/1", end, 1).unwrap().cause,
                end.as_str()
            );
        }
    }

    #[test]
    fn a_submit_outcome_is_recorded_once_while_it_is_in_flight() {
        // Given a real submit in flight, admitted at 5,
        let grant = granted(req(SessionKind::Submit, "demo/t1-cls/1", 0, 4, "sub-1"), 5);
        let l = given(std::slice::from_ref(&grant));
        // when it is scored, then its success counts from when it was submitted;
        assert!(matches!(
            submit_outcome(&l, &sub("sub-1", 99), true),
            Some(SubmitOutcome::Succeeded(SubmitSucceeded { at_ms: 5, .. }))
        ));
        // when it fails, then it ends at its finish, unsuccessful.
        assert!(matches!(
            submit_outcome(&l, &sub("sub-1", 99), false),
            Some(SubmitOutcome::Ended(SubmitEnded {
                at_ms: 99,
                succeeded: false,
                ..
            }))
        ));
        // Given its outcome recorded, when it is delivered again, then nothing more is due.
        for ended in [succeeded("sub-1", 5), failed("sub-1", 99)] {
            let l = given(&[grant.clone(), ended]);
            assert!(submit_outcome(&l, &sub("sub-1", 99), true).is_none());
        }
        // And a submit the ledger never admitted has no outcome to record.
        assert!(submit_outcome(&l, &sub("sub-2", 99), true).is_none());
    }
}
