//! Everything the quota service can refuse or fail at, and the one mapping of it to gRPC statuses.

use nsml_common::error::ErrorCode;
use nsml_eventstore::StoreError;
use nsml_proto::v1::Decision;
use tonic::Status;

use crate::domain::{OverrideRefused, ReopenRefused, Rule};

/// The quota service's errors: refusals of a request (the caller can fix them, or wait) and failures of the
/// infrastructure (logged in full, masked to the caller).
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    /// An admission request without a team, a session or a command id.
    #[error("an admission needs a team, a session and a command id")]
    AdmissionIncomplete,

    /// The competition has published no policy for a decision to apply.
    #[error("competition `{competition}` has no policy yet")]
    NoPolicy { competition: String },

    /// A rule refused an admission; `retry_after_ms` is when the submit interval allows the next submit (0
    /// when no time does).
    #[error("{reason}")]
    Refused {
        rule: Rule,
        reason: String,
        retry_after_ms: i64,
    },

    /// A caller in several competitions, or none, asked for its quota without naming one.
    #[error("name the competition: nsml quota COMPETITION")]
    NameCompetition,

    #[error("you are not in a team of competition `{competition}`")]
    NotInTeam { competition: String },

    /// The caller asked for the quota of a team that is neither theirs nor in a competition they host.
    #[error("the quota of team `{team}` is visible to its members and hosts only")]
    NotVisible { team: String },

    #[error("competition `{competition}` not found")]
    CompetitionNotFound { competition: String },

    /// An override request that is malformed or does not fit the catalog.
    #[error("{0}")]
    Override(#[from] OverrideRefused),

    /// A submit whose slot cannot be re-opened.
    #[error("{0}")]
    Reopen(#[from] ReopenRefused),

    /// The audit is for hosts (and admins, and services).
    #[error("the audit is for hosts: only hosts of a competition may do this")]
    HostsOnly,

    #[error("explain needs a session name, a submission id or a decision id")]
    ExplainNeedsId,

    #[error(
        "no admission decision recorded for `{id}`: give a session name (TEAM/DATASET/N), a submission id or a decision id"
    )]
    NoDecision { id: String },

    #[error("export needs a team")]
    ExportNeedsTeam,

    #[error("team `{team}` has no ledger")]
    NoLedger { team: String },

    /// The service stopped while an admission waited for the ledgers to catch up.
    #[error("the quota service is shutting down; retry")]
    ShuttingDown,

    /// The ledgers have not recorded the outside facts up to the log position the caller has seen.
    #[error(
        "the quota ledgers have recorded outcomes up to log position {at}, not yet {seen} as the caller has seen; retry in a few seconds"
    )]
    Behind { at: u64, seen: u64 },

    #[error("{context}: {source}")]
    Store {
        context: &'static str,
        source: StoreError,
    },

    /// A fault of the service itself (a recorded event it cannot read back).
    #[error("{context}: {detail}")]
    Internal {
        context: &'static str,
        detail: &'static str,
    },

    #[error("service clients: {0}")]
    Clients(#[from] nsml_common::clients::ClientsError),

    /// A refusal phrased by a shared helper (caller checks, request bounds).
    #[error("{}", .0.message())]
    Caller(#[from] Status),
}

impl QuotaError {
    /// Wraps a store failure with what was being done, for `map_err`.
    pub fn store(context: &'static str) -> impl FnOnce(StoreError) -> Self {
        move |source| QuotaError::Store { context, source }
    }

    /// The refusal a recorded decision stands for; `None` for a grant, or a rule this build does not know.
    pub fn refused(d: &Decision) -> Option<Self> {
        if d.granted {
            return None;
        }
        Some(QuotaError::Refused {
            rule: Rule::parse(&d.rule)?,
            reason: d.reason.clone(),
            retry_after_ms: d.retry_after_ms,
        })
    }

    /// The platform code this error travels under.
    fn code(&self) -> ErrorCode {
        use QuotaError::*;
        match self {
            AdmissionIncomplete
            | NameCompetition
            | NotInTeam { .. }
            | ExplainNeedsId
            | ExportNeedsTeam => ErrorCode::BadRequest,
            NoPolicy { .. } => ErrorCode::WrongState,
            Refused { rule, .. } => match rule {
                Rule::SubmitInterval => ErrorCode::SubmitTooSoon,
                Rule::SubmitInFlight => ErrorCode::SubmitInFlight,
                // Not a limit: the session already holds what it asks for.
                Rule::Duplicate => ErrorCode::WrongState,
                // The competition's schedule: not a limit of the team's.
                Rule::NotOpen | Rule::Closed => ErrorCode::WrongState,
                Rule::SubmitCpus
                | Rule::TeamSessions
                | Rule::TeamGpus
                | Rule::TeamCpus
                | Rule::TeamMemory => ErrorCode::QuotaExceeded,
            },
            NotVisible { .. } | HostsOnly => ErrorCode::PermissionDenied,
            CompetitionNotFound { .. } | NoDecision { .. } | NoLedger { .. } => ErrorCode::NotFound,
            Override(refused) => override_code(refused),
            Reopen(refused) => match refused {
                ReopenRefused::Unknown { .. } => ErrorCode::NotFound,
                ReopenRefused::OtherDataset { .. } => ErrorCode::BadRequest,
                ReopenRefused::Failed { .. } | ReopenRefused::AlreadyReopened { .. } => {
                    ErrorCode::WrongState
                }
            },
            ShuttingDown | Behind { .. } => ErrorCode::Unavailable,
            Caller(status) => ErrorCode::of_or_implied(status),
            Store { .. } | Internal { .. } | Clients(_) => ErrorCode::Internal,
        }
    }
}

/// The code of an override request's refusal: a missing place is not found, the rest is the request's fault.
fn override_code(refused: &OverrideRefused) -> ErrorCode {
    use OverrideRefused::*;
    match refused {
        DatasetNotFound { .. }
        | NoCompetition { .. }
        | TeamNotIn { .. }
        | DatasetNotIn { .. }
        | RoundNotFound { .. } => ErrorCode::NotFound,
        NoTeam
        | NoReason
        | ExtraNeedsDataset
        | ReopenNeedsSubmission { .. }
        | RaiseNeedsLimit
        | RaiseEndsInPast { .. }
        | DeadlineInPast { .. }
        | NoKind
        | SeveralCompetitions { .. }
        | RoundNotDeadline { .. }
        | ReopenedDatasetNotIn { .. } => ErrorCode::BadRequest,
    }
}

impl From<QuotaError> for Status {
    fn from(err: QuotaError) -> Self {
        use QuotaError::*;
        let code = err.code();
        let msg = err.to_string();
        match err {
            Caller(status) => status,
            Store { context, source } => nsml_common::status::store(context, source),
            Internal { context, detail } => nsml_common::status::internal(context, detail),
            Clients(e) => nsml_common::status::internal("starting the quota service", e),
            Refused {
                rule,
                retry_after_ms,
                ..
            } => {
                let mut metadata = vec![("rule", rule.as_str().to_string())];
                if rule == Rule::SubmitInterval {
                    metadata.push(("next_at_ms", retry_after_ms.to_string()));
                }
                code.status_with(msg, metadata)
            }
            _ => code.status(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use nsml_common::error::metadata;
    use tonic::Code;

    use super::*;

    fn refused(rule: Rule, retry_after_ms: i64) -> Status {
        let d = Decision {
            granted: false,
            rule: rule.as_str().into(),
            reason: "refused".into(),
            retry_after_ms,
            ..Default::default()
        };
        QuotaError::refused(&d).expect("a refusal").into()
    }

    #[test]
    fn a_refused_admission_carries_its_rule_and_when_to_retry() {
        // Given a refusal by the interval, then SUBMIT_TOO_SOON with when the next submit is allowed.
        let st = refused(Rule::SubmitInterval, 1_700_000_000_000);
        assert_eq!(ErrorCode::of(&st), Some(ErrorCode::SubmitTooSoon));
        assert_eq!(metadata(&st)["next_at_ms"], "1700000000000");
        assert_eq!(metadata(&st)["rule"], "submit_interval");
        // Given one by a submit in flight, then SUBMIT_IN_FLIGHT.
        assert_eq!(
            ErrorCode::of(&refused(Rule::SubmitInFlight, 0)),
            Some(ErrorCode::SubmitInFlight)
        );
        // Given one by a team limit or a submit's CPUs, then QUOTA_EXCEEDED naming the rule.
        for rule in [
            Rule::SubmitCpus,
            Rule::TeamSessions,
            Rule::TeamGpus,
            Rule::TeamCpus,
            Rule::TeamMemory,
        ] {
            let st = refused(rule, 0);
            assert_eq!(ErrorCode::of(&st), Some(ErrorCode::QuotaExceeded), "{rule}");
            assert_eq!(metadata(&st)["rule"], rule.as_str());
        }
        // Every refusal keeps the code refusals have always had, and its reason as the message.
        for rule in Rule::ALL {
            let st = refused(rule, 0);
            assert_eq!(
                (st.code(), st.message()),
                (Code::FailedPrecondition, "refused")
            );
        }
    }

    #[test]
    fn a_grant_is_no_refusal() {
        let d = Decision {
            granted: true,
            ..Default::default()
        };
        assert!(QuotaError::refused(&d).is_none());
    }

    #[test]
    fn each_refusal_keeps_its_grpc_code() {
        let cases: Vec<(QuotaError, Code)> = vec![
            (QuotaError::AdmissionIncomplete, Code::InvalidArgument),
            (
                QuotaError::NoPolicy {
                    competition: "demo".into(),
                },
                Code::FailedPrecondition,
            ),
            (QuotaError::HostsOnly, Code::PermissionDenied),
            (
                QuotaError::NoLedger {
                    team: "demo".into(),
                },
                Code::NotFound,
            ),
            (QuotaError::Behind { at: 3, seen: 9 }, Code::Unavailable),
            (QuotaError::ShuttingDown, Code::Unavailable),
            (
                ReopenRefused::Unknown {
                    team: "demo".into(),
                    submission: "s".into(),
                }
                .into(),
                Code::NotFound,
            ),
            (
                ReopenRefused::Failed {
                    submission: "s".into(),
                    dataset: "d".into(),
                }
                .into(),
                Code::FailedPrecondition,
            ),
            (
                ReopenRefused::OtherDataset {
                    submission: "s".into(),
                    found: "d".into(),
                    dataset: "e".into(),
                }
                .into(),
                Code::InvalidArgument,
            ),
            (OverrideRefused::NoReason.into(), Code::InvalidArgument),
            (
                OverrideRefused::TeamNotIn {
                    team: "demo".into(),
                    competition: "c".into(),
                }
                .into(),
                Code::NotFound,
            ),
            (
                Status::permission_denied("not a host").into(),
                Code::PermissionDenied,
            ),
        ];
        for (err, code) in cases {
            let message = err.to_string();
            let st = Status::from(err);
            assert_eq!((st.code(), st.message()), (code, message.as_str()));
        }
    }
}
