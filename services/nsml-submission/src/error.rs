//! Everything the submission service can refuse or fail at, and the one mapping of it to gRPC statuses.

use nsml_common::error::ErrorCode;
use nsml_common::status;
use nsml_eventstore::StoreError;
use tonic::Status;

/// The submission service's errors: refusals of a request (the caller can fix them) and failures of the
/// infrastructure (logged in full, masked to the caller). Also why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum SubmissionError {
    /// The service's clients of the other services could not be made (at start-up).
    #[error("service clients: {0}")]
    Clients(#[from] nsml_common::clients::ClientsError),

    /// A submit of a session of another team.
    #[error(
        "session `{session}` belongs to another team: only team `{team}` submits its checkpoints"
    )]
    OtherTeamSession { session: String, team: String },

    /// A submit of a session that is not a training session.
    #[error("`{session}` is a submit session; submit a checkpoint of a training session")]
    NotTrainSession { session: String },

    #[error(
        "checkpoint `{checkpoint}` not found in session `{session}`; `nsml model ls {session}` lists them"
    )]
    CheckpointNotFound { session: String, checkpoint: String },

    /// `submit -t` on a dataset without a trial set.
    #[error("dataset `{dataset}` has no trial set, so `submit -t` is not available")]
    NoTrialSet { dataset: String },

    #[error("submission `{id}` not found")]
    NotFound { id: String },

    /// The caller may not see another team's submission.
    #[error("submission `{id}` belongs to another team")]
    OtherTeamSubmission { id: String },

    /// Predictions from a session that runs no submission waiting for them (or not this one).
    #[error("session `{session}` runs no submission that is waiting for its predictions")]
    NotSubmitSession { session: String },

    /// Predictions for a submission that already took some, or ended.
    #[error("submission {id} already ended; predictions are taken once")]
    PredictionsTaken { id: String },

    /// A sibling service refused or failed a call made on the caller's behalf.
    #[error("{context}: {}", .status.message())]
    Upstream {
        context: &'static str,
        status: Status,
    },

    #[error("{context}: {source}")]
    Store {
        context: &'static str,
        source: StoreError,
    },

    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        source: std::io::Error,
    },

    /// A refusal phrased by a shared helper (caller checks, names, bounds).
    #[error("{}", .0.message())]
    Refused(#[from] Status),
}

impl SubmissionError {
    /// A failed call to a sibling service, with what was being done.
    pub fn upstream(context: &'static str) -> impl FnOnce(Status) -> Self {
        move |status| SubmissionError::Upstream { context, status }
    }

    /// A failed store call, with what was being done.
    pub fn store(context: &'static str) -> impl FnOnce(StoreError) -> Self {
        move |source| SubmissionError::Store { context, source }
    }

    /// A failed IO call, with what was being done.
    pub fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| SubmissionError::Io { context, source }
    }

    /// The platform code this error travels under.
    fn code(&self) -> ErrorCode {
        use SubmissionError::*;
        match self {
            OtherTeamSession { .. } | OtherTeamSubmission { .. } => ErrorCode::PermissionDenied,
            NotTrainSession { .. } | NoTrialSet { .. } | PredictionsTaken { .. } => {
                ErrorCode::WrongState
            }
            CheckpointNotFound { .. } | NotFound { .. } | NotSubmitSession { .. } => {
                ErrorCode::NotFound
            }
            Refused(status) | Upstream { status, .. } => ErrorCode::of_or_implied(status),
            Store { .. } | Io { .. } | Clients(_) => ErrorCode::Internal,
        }
    }
}

impl From<SubmissionError> for Status {
    fn from(err: SubmissionError) -> Self {
        use SubmissionError::*;
        let code = err.code();
        match err {
            Refused(status) => status,
            Upstream { context, status } => status::upstream(context, status),
            Store { context, source } => status::store(context, source),
            Io { context, source } => status::internal(context, source),
            Clients(e) => status::internal("making service clients", e),
            other => code.status(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_keep_their_grpc_codes_and_carry_a_platform_code() {
        let cases = [
            (
                SubmissionError::OtherTeamSession {
                    session: "a/b/1".into(),
                    team: "a".into(),
                },
                tonic::Code::PermissionDenied,
            ),
            (
                SubmissionError::NotTrainSession {
                    session: "a/b/1".into(),
                },
                tonic::Code::FailedPrecondition,
            ),
            (
                SubmissionError::PredictionsTaken { id: "s".into() },
                tonic::Code::FailedPrecondition,
            ),
            (
                SubmissionError::NotSubmitSession {
                    session: "a/b/1".into(),
                },
                tonic::Code::NotFound,
            ),
            (
                SubmissionError::NotFound { id: "s".into() },
                tonic::Code::NotFound,
            ),
        ];
        for (err, code) in cases {
            let msg = err.to_string();
            let st = Status::from(err);
            assert_eq!(st.code(), code, "{msg}");
            assert_eq!(st.message(), msg);
            assert!(ErrorCode::of(&st).is_some(), "{msg}");
        }
    }

    #[test]
    fn a_sibling_s_refusal_passes_through_and_its_failure_is_masked() {
        let refused = ErrorCode::SubmitTooSoon.status("wait 10 minutes");
        let st = Status::from(SubmissionError::upstream("starting the submit session")(
            refused,
        ));
        assert_eq!(ErrorCode::of(&st), Some(ErrorCode::SubmitTooSoon));
        assert_eq!(st.message(), "wait 10 minutes");
        let st = Status::from(SubmissionError::upstream("looking up the session")(
            Status::internal("secret detail"),
        ));
        assert_eq!(st.code(), tonic::Code::Internal);
        assert!(!st.message().contains("secret detail"));
    }
}
