//! What the gateway itself refuses before a call reaches a service, and the one mapping of it to statuses.

use nsml_common::error::ErrorCode;
use tonic::Status;

use crate::ratelimit;

/// A call the gateway answers itself.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("no such method `{0}`")]
    NoSuchMethod(String),
    #[error("no such service `{0}`")]
    NoSuchService(String),
    #[error("this method is internal to the platform")]
    InternalMethod,
    #[error("too many requests from {key}: retry in {retry_ms} ms")]
    TooMany { key: ratelimit::Key, retry_ms: u64 },
    #[error("your token is not one the platform issues: run `nsml login` again")]
    ForeignToken,
    #[error("the {0} is unavailable, retry shortly")]
    Unreachable(String),
}

impl From<Refusal> for Status {
    fn from(refusal: Refusal) -> Self {
        let code = match &refusal {
            Refusal::NoSuchMethod(_) | Refusal::NoSuchService(_) => ErrorCode::UnknownMethod,
            Refusal::InternalMethod => ErrorCode::PermissionDenied,
            Refusal::TooMany { retry_ms, .. } => {
                return ErrorCode::RateLimited
                    .status_with(refusal.to_string(), [("retry_ms", retry_ms.to_string())]);
            }
            Refusal::ForeignToken => ErrorCode::Unauthenticated,
            Refusal::Unreachable(_) => ErrorCode::Unavailable,
        };
        code.status(refusal.to_string())
    }
}
