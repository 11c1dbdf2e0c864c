//! The one mapping from infrastructure failures to gRPC statuses: logged in full, masked to the caller.

use nsml_eventstore::StoreError;
use tonic::Status;

use crate::error::ErrorCode;

/// Logs an internal failure and returns a masked `INTERNAL` status.
pub fn internal(context: &str, err: impl std::fmt::Display) -> Status {
    tracing::error!(%err, "{context}");
    ErrorCode::Internal.status(format!(
        "internal error while {context}; the operators have the details in the server log"
    ))
}

/// Maps a store error: a version conflict is `ABORTED` (retry), a database out of reach (down, restarting,
/// no connection free) `UNAVAILABLE` (retry after a pause, as clients do), anything else internal.
pub fn store(context: &str, err: StoreError) -> Status {
    match err {
        StoreError::Conflict { .. } => {
            ErrorCode::Conflict.status(format!("{context}: concurrent change, retry"))
        }
        other if other.is_unavailable() => {
            tracing::error!(err = %other, "{context}");
            ErrorCode::Unavailable.status(format!(
                "{context}: the platform's database is unavailable, retry shortly"
            ))
        }
        other => internal(context, other),
    }
}

/// Maps an error from a sibling service: user-facing codes pass through, the rest are masked.
pub fn upstream(context: &str, status: Status) -> Status {
    use tonic::Code::*;
    match status.code() {
        InvalidArgument | NotFound | PermissionDenied | Unauthenticated | FailedPrecondition
        | ResourceExhausted | AlreadyExists | Aborted | OutOfRange | DeadlineExceeded => status,
        Unavailable => {
            tracing::error!(%status, "{context}");
            ErrorCode::Unavailable.status(format!(
                "{context}: a platform service is unavailable, retry shortly"
            ))
        }
        _ => internal(context, status),
    }
}
