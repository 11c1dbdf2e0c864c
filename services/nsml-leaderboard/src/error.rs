//! Everything the leaderboard service refuses, and the one mapping of it to gRPC statuses.

use nsml_common::error::ErrorCode;
use tonic::Status;

/// Why a leaderboard request was refused. Each maps to one platform error code, below.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaderboardError {
    #[error("dataset `{0}` not found; `nsml dataset ls` lists them")]
    DatasetNotFound(String),
    #[error("competition `{0}` not found")]
    CompetitionNotFound(String),
    #[error("the private leaderboard of `{0}` is hidden until the host reveals it")]
    PrivateHidden(String),
    #[error("name a dataset, e.g. `nsml dataset board DATASET`")]
    NoDataset,
    #[error("name the competition: you are in {0}")]
    AmbiguousCompetition(String),
    #[error("there is no competition yet")]
    NoCompetition,
    #[error("you are not in a team of competition `{0}`")]
    NotInCompetition(String),
    #[error("the leaderboard is still reading the log; retry in a few seconds")]
    Loading,
}

impl From<LeaderboardError> for Status {
    fn from(err: LeaderboardError) -> Self {
        let code = match err {
            LeaderboardError::DatasetNotFound(_)
            | LeaderboardError::CompetitionNotFound(_)
            | LeaderboardError::NoCompetition => ErrorCode::NotFound,
            LeaderboardError::PrivateHidden(_) | LeaderboardError::NotInCompetition(_) => {
                ErrorCode::PermissionDenied
            }
            LeaderboardError::NoDataset | LeaderboardError::AmbiguousCompetition(_) => {
                ErrorCode::BadRequest
            }
            LeaderboardError::Loading => ErrorCode::Unavailable,
        };
        code.status(err.to_string())
    }
}
