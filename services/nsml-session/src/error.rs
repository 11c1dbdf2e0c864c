//! Everything the session service can refuse or fail at, and the one mapping of it to gRPC statuses.

use nsml_common::clients::ClientsError;
use nsml_common::error::ErrorCode;
use nsml_eventstore::StoreError;
use tonic::Status;

/// The session service's errors: refusals of a request (the caller can fix them), failures of the
/// infrastructure (logged in full, masked to the caller) and what keeps the service from starting.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("invalid entry file `{entry}`: give a path inside your code directory, e.g. main.py")]
    BadEntry { entry: String },

    /// A resource beyond what any machine has.
    #[error(
        "resources.{field} is {asked}; a session may ask for at most {max}, more than any machine has: ask for what the job needs"
    )]
    TooMuch {
        field: &'static str,
        asked: String,
        max: String,
    },

    /// More than the whole cluster has: the session could never start, so it is not queued.
    #[error(
        "no machine of this cluster can ever hold the session: it asks for {asked} and the cluster has {has}; \
         {hint}"
    )]
    NeverFits {
        asked: String,
        has: String,
        hint: String,
    },

    #[error("no code snapshot: upload the code first (the nsml CLI does this for you)")]
    NoCodeSnapshot,

    #[error(
        "code snapshot `{snapshot}` not found: upload the code first (the nsml CLI does this for you)"
    )]
    CodeNotFound { snapshot: String },

    #[error("code snapshot `{snapshot}` belongs to another team")]
    CodeOfAnotherTeam { snapshot: String },

    #[error("dataset `{dataset}` not found; `nsml dataset ls` lists them")]
    DatasetNotFound { dataset: String },

    /// The entry's `#nsml: NAME` names an environment the competition does not have.
    #[error(
        "environment `{name}` (the `#nsml:` line of the entry) is not one of competition `{competition}`: {known}"
    )]
    UnknownEnvironment {
        name: String,
        competition: String,
        /// The names that exist, as a sentence.
        known: String,
    },

    /// The caller has no team in the competition a dataset belongs to.
    #[error(
        "you are not in a team of competition `{competition}`, which dataset `{dataset}` belongs to"
    )]
    NotInCompetition {
        competition: String,
        dataset: String,
    },

    /// A session named by another service, or one that the log does not hold.
    #[error("session `{name}` not found")]
    SessionNotFound { name: String },

    /// A session a participant asked for that is not there (or was removed).
    #[error("session `{name}` not found; `nsml ps -a` lists your sessions")]
    NotListed { name: String },

    #[error("session `{name}` belongs to another team")]
    OtherTeam { name: String },

    #[error("no session of yours matches `{pattern}`")]
    NoMatch { pattern: String },

    /// Sessions to remove that have not ended, their names joined.
    #[error("session {names} is still running: stop it first (`nsml stop`) or use `nsml rm -f`")]
    StillRunning { names: String },

    #[error(
        "logs of real submit sessions are hidden from participants; `nsml submit -t {session} {checkpoint}` runs the same code on the trial set with visible logs"
    )]
    LogsHidden { session: String, checkpoint: String },

    #[error(
        "metrics of real submit sessions are hidden from participants, as their logs are; `nsml submit -t {session} {checkpoint}` runs the same code on the trial set with visible output"
    )]
    MetricsHidden { session: String, checkpoint: String },

    #[error("`{name}` is a submit session; submit a checkpoint of a training session")]
    NotTraining { name: String },

    /// The quota service refused the session's resources; `rule` names the rule that refused.
    #[error("{reason}")]
    Denied {
        reason: String,
        rule: String,
        retry_after_ms: i64,
    },

    /// The executor could not start an admitted session.
    #[error("session {name} could not start: {reason}")]
    CouldNotStart { name: String, reason: String },

    /// The executor cannot start sessions now (its cluster scheduler is unreachable, say); asked before
    /// admission, so the refused session holds nothing.
    #[error(
        "sessions cannot start now: {why}. Nothing was held; run it again once the cluster is back"
    )]
    ClusterUnavailable { why: String },

    /// A sibling service answered with an error.
    #[error("{context}: {}", .status.message())]
    Upstream {
        context: &'static str,
        status: Status,
    },

    /// A refusal phrased by a shared helper (names, caller checks, bounds).
    #[error("{}", .0.message())]
    Refused(#[from] Status),

    #[error("{context}: {source}")]
    Store {
        context: &'static str,
        source: StoreError,
    },

    /// A fault of the service, with what was being done.
    #[error("{context}: {message}")]
    Internal {
        context: &'static str,
        message: String,
    },

    #[error("service clients: {0}")]
    Clients(#[from] ClientsError),

    #[error("cannot create the log directory `{path}`: {source}")]
    LogDir {
        path: String,
        source: std::io::Error,
    },

    #[error("the session service needs an executor to start runners")]
    NoExecutor,
}

impl SessionError {
    /// Wraps a store error with what was being stored.
    pub fn store(context: &'static str) -> impl FnOnce(StoreError) -> Self {
        move |source| SessionError::Store { context, source }
    }

    /// Wraps an internal failure with what was being done.
    pub fn internal<E: std::fmt::Display>(context: &'static str) -> impl FnOnce(E) -> Self {
        move |err| SessionError::Internal {
            context,
            message: err.to_string(),
        }
    }

    /// Wraps a sibling service's error with what was asked of it.
    pub fn upstream(context: &'static str) -> impl FnOnce(Status) -> Self {
        move |status| SessionError::Upstream { context, status }
    }

    /// The platform code this error travels under.
    fn code(&self) -> ErrorCode {
        use SessionError::*;
        match self {
            BadEntry { .. } | NoCodeSnapshot | UnknownEnvironment { .. } => ErrorCode::BadRequest,
            TooMuch { .. } | NeverFits { .. } => ErrorCode::TooLarge,
            CodeNotFound { .. }
            | DatasetNotFound { .. }
            | SessionNotFound { .. }
            | NotListed { .. }
            | NoMatch { .. } => ErrorCode::NotFound,
            CodeOfAnotherTeam { .. }
            | NotInCompetition { .. }
            | OtherTeam { .. }
            | LogsHidden { .. }
            | MetricsHidden { .. } => ErrorCode::PermissionDenied,
            StillRunning { .. } | NotTraining { .. } | CouldNotStart { .. } => {
                ErrorCode::WrongState
            }
            Denied { rule, .. } => denial_code(rule),
            ClusterUnavailable { .. } => ErrorCode::Unavailable,
            Upstream { status, .. } | Refused(status) => ErrorCode::of_or_implied(status),
            Store { .. } | Internal { .. } | Clients(_) | LogDir { .. } | NoExecutor => {
                ErrorCode::Internal
            }
        }
    }
}

impl From<SessionError> for Status {
    fn from(err: SessionError) -> Self {
        use SessionError::*;
        let code = err.code();
        match err {
            Refused(status) => status,
            Upstream { context, status } => nsml_common::status::upstream(context, status),
            Store { context, source } => nsml_common::status::store(context, source),
            Internal { context, message } => nsml_common::status::internal(context, message),
            Clients(_) | LogDir { .. } | NoExecutor => {
                nsml_common::status::internal("starting the session service", err)
            }
            Denied {
                reason,
                rule,
                retry_after_ms,
            } => {
                let mut facts = vec![("rule", rule)];
                if retry_after_ms > 0 {
                    facts.push(("retry_after_ms", retry_after_ms.to_string()));
                }
                code.status_with(reason, facts)
            }
            _ => code.status(err.to_string()),
        }
    }
}

/// The platform code a quota refusal travels under, by the rule that refused.
pub fn denial_code(rule: &str) -> ErrorCode {
    match rule {
        "submit_interval" => ErrorCode::SubmitTooSoon,
        "submit_in_flight" => ErrorCode::SubmitInFlight,
        // The session holds its resources already: not a quota, a state.
        "duplicate" => ErrorCode::WrongState,
        _ => ErrorCode::QuotaExceeded,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn given_a_refusal_when_mapped_then_its_rule_picks_the_code() {
        assert_eq!(denial_code("submit_interval"), ErrorCode::SubmitTooSoon);
        assert_eq!(denial_code("submit_in_flight"), ErrorCode::SubmitInFlight);
        assert_eq!(denial_code("duplicate"), ErrorCode::WrongState);
        assert_eq!(denial_code("team_gpus"), ErrorCode::QuotaExceeded);
        assert_eq!(denial_code(""), ErrorCode::QuotaExceeded);
    }

    #[test]
    fn refusals_keep_their_grpc_codes_and_carry_the_platform_code() {
        let cases = [
            (
                SessionError::NotListed {
                    name: "t/d/1".into(),
                },
                Code::NotFound,
                ErrorCode::NotFound,
            ),
            (
                SessionError::OtherTeam {
                    name: "t/d/1".into(),
                },
                Code::PermissionDenied,
                ErrorCode::PermissionDenied,
            ),
            (
                SessionError::StillRunning {
                    names: "t/d/1".into(),
                },
                Code::FailedPrecondition,
                ErrorCode::WrongState,
            ),
            (
                SessionError::NoCodeSnapshot,
                Code::InvalidArgument,
                ErrorCode::BadRequest,
            ),
            (
                SessionError::TooMuch {
                    field: "gpus",
                    asked: "65".into(),
                    max: "64 GPUs".into(),
                },
                Code::InvalidArgument,
                ErrorCode::TooLarge,
            ),
            (
                SessionError::CouldNotStart {
                    name: "t/d/1".into(),
                    reason: "no python".into(),
                },
                Code::FailedPrecondition,
                ErrorCode::WrongState,
            ),
        ];
        for (err, grpc, code) in cases {
            let message = err.to_string();
            let st = Status::from(err);
            assert_eq!(st.code(), grpc, "{message}");
            assert_eq!(ErrorCode::of(&st), Some(code), "{message}");
            assert_eq!(st.message(), message);
        }
    }

    #[test]
    fn a_quota_refusal_carries_its_reason_and_rule() {
        let st = Status::from(SessionError::Denied {
            reason: "team_gpus: 2 of 2 held".into(),
            rule: "team_gpus".into(),
            retry_after_ms: 0,
        });
        assert_eq!(st.code(), Code::FailedPrecondition);
        assert_eq!(st.message(), "team_gpus: 2 of 2 held");
        assert_eq!(ErrorCode::of(&st), Some(ErrorCode::QuotaExceeded));
        assert_eq!(nsml_common::error::metadata(&st)["rule"], "team_gpus");
        let soon = Status::from(SessionError::Denied {
            reason: "next submit in 10 s".into(),
            rule: "submit_interval".into(),
            retry_after_ms: 10_000,
        });
        assert_eq!(ErrorCode::of(&soon), Some(ErrorCode::SubmitTooSoon));
        assert_eq!(
            nsml_common::error::metadata(&soon)["retry_after_ms"],
            "10000"
        );
    }

    #[test]
    fn an_internal_failure_is_masked() {
        let st = Status::from(SessionError::Internal {
            context: "reading a session log",
            message: "secret detail".into(),
        });
        assert_eq!(st.code(), Code::Internal);
        assert!(!st.message().contains("secret detail"));
    }
}
