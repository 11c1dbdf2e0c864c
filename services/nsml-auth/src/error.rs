//! Everything the auth service can refuse or fail at, and the one mapping of it to gRPC statuses.

use nsml_common::error::ErrorCode;
use nsml_eventstore::StoreError;
use tonic::Status;

/// The auth service's errors: refusals of a request (the caller can fix them), failures of the
/// infrastructure (logged in full, masked to the caller) and what keeps the service from starting.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The user name and password do not match (or the user does not exist: the caller is not told which).
    #[error("wrong username or password")]
    LoginFailed,

    /// Too many failed logins for this user from this address, or from this address at all.
    #[error(
        "too many failed logins for `{user}` from your address: try again in {retry_after_secs} seconds"
    )]
    LockedOut {
        /// The user name as it may be shown.
        user: String,
        retry_after_secs: i64,
    },

    /// A logout without a bearer token.
    #[error("no token to end")]
    NoToken,

    /// A token that is unknown, expired or revoked.
    #[error("your login has expired or was ended: run `nsml login` again")]
    TokenExpired,

    #[error("the password for `{user}` is too short: use at least 4 characters")]
    PasswordTooShort { user: String },

    #[error("a password is required: pass it on stdin with --password-stdin")]
    PasswordRequired,

    #[error("the manifest has no competition")]
    NoCompetition,

    #[error("competition `{competition}` lists no datasets")]
    NoDatasets { competition: String },

    /// A round the competition's policy cannot hold (see `domain::check_rounds`).
    #[error("competition `{competition}`: {why}; fix the manifest's [[rounds]] and apply it again")]
    BadRound { competition: String, why: String },

    /// A manifest lists one user in two teams.
    #[error(
        "user `{user}` is listed in teams `{first}` and `{second}`; a user is in at most one team per competition"
    )]
    ListedTwice {
        user: String,
        first: String,
        second: String,
    },

    /// A user is already in another team of the competition.
    #[error(
        "user `{user}` is already in team `{team}` of competition `{competition}`; a user is in at most one team per competition"
    )]
    InAnotherTeam {
        user: String,
        team: String,
        competition: String,
    },

    /// A team is added a member without naming a competition, and has entered none.
    #[error("team `{team}` has not entered any competition: pass --competition")]
    NoCompetitionOfTeam { team: String },

    /// The competition does not exist (its id as it may be shown).
    #[error("competition `{id}` not found")]
    CompetitionNotFound { id: String },

    #[error("only the platform administrator may create a competition")]
    AdminOnly,

    /// The caller may not set this user's password; the message says why.
    #[error("{0}")]
    NotYourUser(String),

    /// A competition lists a dataset that another competition holds.
    #[error(
        "dataset `{dataset}` belongs to competition `{owner}`: a dataset is in one competition only"
    )]
    DatasetTaken { dataset: String, owner: String },

    /// A refusal phrased by a shared helper (names, caller checks, bounds).
    #[error("{}", .0.message())]
    Refused(#[from] Status),

    #[error("{context}: {source}")]
    Store {
        context: &'static str,
        source: StoreError,
    },

    /// A fault of the service (a hashing or blocking task failure), with what was being done.
    #[error("{context}: {message}")]
    Internal {
        context: &'static str,
        message: String,
    },

    /// The admin token file cannot be written at start-up.
    #[error("cannot write the admin token file `{path}`: {source}")]
    TokenFile {
        path: String,
        source: std::io::Error,
    },
}

impl AuthError {
    /// Wraps a store error with what was being stored.
    pub fn store(context: &'static str) -> impl FnOnce(StoreError) -> Self {
        move |source| AuthError::Store { context, source }
    }

    /// Wraps an internal failure with what was being done.
    pub fn internal(context: &'static str) -> impl FnOnce(String) -> Self {
        move |message| AuthError::Internal { context, message }
    }

    /// The platform code this error travels under.
    fn code(&self) -> ErrorCode {
        use AuthError::*;
        match self {
            LoginFailed => ErrorCode::LoginFailed,
            LockedOut { .. } => ErrorCode::LockedOut,
            NoToken | TokenExpired => ErrorCode::Unauthenticated,
            PasswordTooShort { .. }
            | PasswordRequired
            | NoCompetition
            | NoDatasets { .. }
            | BadRound { .. }
            | ListedTwice { .. } => ErrorCode::BadRequest,
            InAnotherTeam { .. } | NoCompetitionOfTeam { .. } => ErrorCode::WrongState,
            CompetitionNotFound { .. } => ErrorCode::NotFound,
            AdminOnly | NotYourUser(_) => ErrorCode::PermissionDenied,
            DatasetTaken { .. } => ErrorCode::AlreadyExists,
            Refused(status) => ErrorCode::of_or_implied(status),
            Store { .. } | Internal { .. } | TokenFile { .. } => ErrorCode::Internal,
        }
    }
}

impl From<AuthError> for Status {
    fn from(err: AuthError) -> Self {
        use AuthError::*;
        let code = err.code();
        match err {
            Refused(status) => status,
            Store { context, source } => nsml_common::status::store(context, source),
            Internal { context, message } => nsml_common::status::internal(context, message),
            TokenFile { .. } => nsml_common::status::internal("starting", err),
            LockedOut {
                retry_after_secs, ..
            } => code.status_with(
                err.to_string(),
                [("retry_after_secs", retry_after_secs.to_string())],
            ),
            _ => code.status(err.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn refusals_keep_their_grpc_codes_and_carry_the_platform_code() {
        let cases = [
            (
                AuthError::LoginFailed,
                Code::Unauthenticated,
                ErrorCode::LoginFailed,
            ),
            (
                AuthError::LockedOut {
                    user: "alice".into(),
                    retry_after_secs: 60,
                },
                Code::ResourceExhausted,
                ErrorCode::LockedOut,
            ),
            (
                AuthError::TokenExpired,
                Code::Unauthenticated,
                ErrorCode::Unauthenticated,
            ),
            (
                AuthError::NoToken,
                Code::Unauthenticated,
                ErrorCode::Unauthenticated,
            ),
            (
                AuthError::CompetitionNotFound { id: "c".into() },
                Code::NotFound,
                ErrorCode::NotFound,
            ),
            (
                AuthError::NoCompetitionOfTeam { team: "t".into() },
                Code::FailedPrecondition,
                ErrorCode::WrongState,
            ),
            (
                AuthError::AdminOnly,
                Code::PermissionDenied,
                ErrorCode::PermissionDenied,
            ),
            (
                AuthError::DatasetTaken {
                    dataset: "d".into(),
                    owner: "c".into(),
                },
                Code::AlreadyExists,
                ErrorCode::AlreadyExists,
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
    fn a_lockout_says_when_to_try_again() {
        let st = Status::from(AuthError::LockedOut {
            user: "alice".into(),
            retry_after_secs: 42,
        });
        assert_eq!(
            st.message(),
            "too many failed logins for `alice` from your address: try again in 42 seconds"
        );
        assert_eq!(nsml_common::error::metadata(&st)["retry_after_secs"], "42");
    }

    #[test]
    fn a_store_failure_is_masked() {
        let st = Status::from(AuthError::Internal {
            context: "hashing a password",
            message: "secret detail".into(),
        });
        assert_eq!(st.code(), Code::Internal);
        assert!(!st.message().contains("secret detail"));
    }
}
