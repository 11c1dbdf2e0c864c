//! The platform's one error taxonomy: a closed set of codes that every service attaches to the statuses it
//! returns, as a `google.rpc.ErrorInfo` in the status details (`reason` = the code, `domain` = [`DOMAIN`],
//! `metadata` = the facts a client may act on). Clients (the CLI, the web UI, the SDK) switch on the code,
//! never on the message; the message stays written for people.
//!
//! Each service keeps a closed enum of its own errors and maps it to a `Status` in one place, through
//! [`ErrorCode::status`] or [`ErrorCode::status_with`].
//!
//! The codes are declared for every language as the `nsml.v1.ErrorReason` enum in `proto/nsml/v1/common.proto`
//! (`ERROR_REASON_QUOTA_EXCEEDED` travels as `QUOTA_EXCEEDED`); a test keeps the two lists equal.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `domain` of every `ErrorInfo` the platform attaches.
pub const DOMAIN: &str = "nsml";

/// Why a call was refused or failed. Closed: a client may match on it exhaustively.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// A field is malformed or missing (a name, a number out of range, an unknown option).
    BadRequest,
    /// A field or upload is beyond a documented maximum.
    TooLarge,
    /// An uploaded archive breaks a safety rule or cannot be read.
    BadArchive,
    /// No credentials, or credentials that are not (or no longer) valid.
    Unauthenticated,
    /// A user name and password that do not match.
    LoginFailed,
    /// Too many failed logins from this address; it is locked for a while.
    LockedOut,
    /// Too many calls in a short time.
    RateLimited,
    /// The caller is known but may not do this.
    PermissionDenied,
    /// What was asked for does not exist (or is not visible to the caller).
    NotFound,
    /// What was to be created exists already.
    AlreadyExists,
    /// A team quota (GPUs, CPUs, memory, sessions, storage) refuses the request.
    QuotaExceeded,
    /// The dataset's submit interval has not passed since the team's last counted submit.
    SubmitTooSoon,
    /// The team already has a submit of this dataset being scored.
    SubmitInFlight,
    /// The thing is not in a state that allows this (a session that ended, a board not yet revealed).
    WrongState,
    /// A concurrent change won; the call may be repeated as it is.
    Conflict,
    /// A part of the platform is unavailable for now; the call may be repeated after a pause.
    Unavailable,
    /// The method or service called is none the platform serves (to clients).
    UnknownMethod,
    /// A fault of the platform; the operators have the details in the server log.
    Internal,
}

impl ErrorCode {
    /// Every code, in declaration order.
    pub const ALL: [ErrorCode; 18] = [
        ErrorCode::BadRequest,
        ErrorCode::TooLarge,
        ErrorCode::BadArchive,
        ErrorCode::Unauthenticated,
        ErrorCode::LoginFailed,
        ErrorCode::LockedOut,
        ErrorCode::RateLimited,
        ErrorCode::PermissionDenied,
        ErrorCode::NotFound,
        ErrorCode::AlreadyExists,
        ErrorCode::QuotaExceeded,
        ErrorCode::SubmitTooSoon,
        ErrorCode::SubmitInFlight,
        ErrorCode::WrongState,
        ErrorCode::Conflict,
        ErrorCode::Unavailable,
        ErrorCode::UnknownMethod,
        ErrorCode::Internal,
    ];

    /// The code as it travels in `ErrorInfo.reason`: upper snake case, stable across releases.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::TooLarge => "TOO_LARGE",
            ErrorCode::BadArchive => "BAD_ARCHIVE",
            ErrorCode::Unauthenticated => "UNAUTHENTICATED",
            ErrorCode::LoginFailed => "LOGIN_FAILED",
            ErrorCode::LockedOut => "LOCKED_OUT",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::PermissionDenied => "PERMISSION_DENIED",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::AlreadyExists => "ALREADY_EXISTS",
            ErrorCode::QuotaExceeded => "QUOTA_EXCEEDED",
            ErrorCode::SubmitTooSoon => "SUBMIT_TOO_SOON",
            ErrorCode::SubmitInFlight => "SUBMIT_IN_FLIGHT",
            ErrorCode::WrongState => "WRONG_STATE",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::UnknownMethod => "UNKNOWN_METHOD",
            ErrorCode::Internal => "INTERNAL",
        }
    }

    /// The code named by an `ErrorInfo.reason`, if it is one of the platform's.
    pub fn parse(reason: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == reason)
    }

    /// The gRPC status code each platform code travels under.
    pub const fn grpc(self) -> Code {
        match self {
            ErrorCode::BadRequest | ErrorCode::TooLarge | ErrorCode::BadArchive => {
                Code::InvalidArgument
            }
            ErrorCode::Unauthenticated | ErrorCode::LoginFailed => Code::Unauthenticated,
            ErrorCode::LockedOut | ErrorCode::RateLimited => Code::ResourceExhausted,
            ErrorCode::PermissionDenied => Code::PermissionDenied,
            ErrorCode::NotFound => Code::NotFound,
            ErrorCode::AlreadyExists => Code::AlreadyExists,
            // A team's quota and submit rules refuse with FAILED_PRECONDITION, as they always have: the
            // state of the team's ledger, not the caller's call rate, is what refuses.
            ErrorCode::QuotaExceeded
            | ErrorCode::SubmitTooSoon
            | ErrorCode::SubmitInFlight
            | ErrorCode::WrongState => Code::FailedPrecondition,
            ErrorCode::Conflict => Code::Aborted,
            ErrorCode::Unavailable => Code::Unavailable,
            ErrorCode::UnknownMethod => Code::Unimplemented,
            ErrorCode::Internal => Code::Internal,
        }
    }

    /// A status with this code, `message` for people and an `ErrorInfo` for programs.
    pub fn status(self, message: impl Into<String>) -> Status {
        self.status_with(message, std::iter::empty::<(String, String)>())
    }

    /// As [`ErrorCode::status`], with facts a client may act on in the `ErrorInfo`'s metadata (for a quota
    /// refusal, the rule; for a submit too soon, when the next one is allowed).
    pub fn status_with<K, V>(
        self,
        message: impl Into<String>,
        metadata: impl IntoIterator<Item = (K, V)>,
    ) -> Status
    where
        K: Into<String>,
        V: Into<String>,
    {
        let metadata: HashMap<String, String> = metadata
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        let details = ErrorDetails::with_error_info(self.as_str(), DOMAIN, metadata);
        Status::with_error_details(self.grpc(), message, details)
    }

    /// The platform code a status carries, if it carries one.
    pub fn of(status: &Status) -> Option<ErrorCode> {
        let info = status.get_details_error_info()?;
        (info.domain == DOMAIN)
            .then(|| ErrorCode::parse(&info.reason))
            .flatten()
    }

    /// The code a status carries, or the closest one its gRPC code implies (for statuses made by tonic
    /// itself or by a peer that attaches none).
    pub fn of_or_implied(status: &Status) -> ErrorCode {
        ErrorCode::of(status).unwrap_or(match status.code() {
            Code::InvalidArgument | Code::OutOfRange => ErrorCode::BadRequest,
            Code::Unauthenticated => ErrorCode::Unauthenticated,
            Code::PermissionDenied => ErrorCode::PermissionDenied,
            Code::NotFound => ErrorCode::NotFound,
            Code::AlreadyExists => ErrorCode::AlreadyExists,
            Code::ResourceExhausted => ErrorCode::RateLimited,
            Code::FailedPrecondition => ErrorCode::WrongState,
            Code::Aborted => ErrorCode::Conflict,
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => ErrorCode::Unavailable,
            Code::Unimplemented => ErrorCode::UnknownMethod,
            _ => ErrorCode::Internal,
        })
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The metadata of the platform `ErrorInfo` a status carries (empty when it carries none).
pub fn metadata(status: &Status) -> HashMap<String, String> {
    status
        .get_details_error_info()
        .filter(|info| info.domain == DOMAIN)
        .map(|info| info.metadata)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_survives_the_wire_and_keeps_its_message() {
        for code in ErrorCode::ALL {
            let sent = code.status_with("what went wrong, and what to do", [("rule", "team_gpus")]);
            assert_eq!(sent.code(), code.grpc());
            // What a client decodes is what was sent: through the binary details header.
            let response = sent.into_http::<()>();
            let received =
                Status::from_header_map(response.headers()).expect("a status in the headers");
            assert_eq!(ErrorCode::of(&received), Some(code));
            assert_eq!(received.message(), "what went wrong, and what to do");
            assert_eq!(metadata(&received)["rule"], "team_gpus");
        }
    }

    #[test]
    fn codes_are_named_uniquely_and_parse_back() {
        let names: std::collections::HashSet<_> =
            ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), ErrorCode::ALL.len());
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
        }
        assert_eq!(ErrorCode::parse("team_gpus"), None);
    }

    #[test]
    fn the_codes_are_the_protos_error_reasons() {
        // Values are numbered from 1 without gaps; 0 is unspecified.
        let mut declared: Vec<&str> = (1..)
            .map_while(|n| crate::v1::ErrorReason::try_from(n).ok())
            .map(|r| {
                r.as_str_name()
                    .strip_prefix("ERROR_REASON_")
                    .expect("prefixed")
            })
            .collect();
        let mut codes: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        declared.sort_unstable();
        codes.sort_unstable();
        assert_eq!(declared, codes);
    }

    #[test]
    fn a_status_without_details_implies_a_code_from_its_grpc_code() {
        let plain = Status::unavailable("connection refused");
        assert_eq!(ErrorCode::of(&plain), None);
        assert_eq!(ErrorCode::of_or_implied(&plain), ErrorCode::Unavailable);
        assert!(metadata(&plain).is_empty());
    }
}
