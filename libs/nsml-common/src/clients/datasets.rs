//! Fetching a part of a dataset (its training data, test data, labels or evaluation script) from the storage
//! service: the one way every service downloads a part, whether it unpacks it to disk as it arrives (the
//! runner) or reads it whole (the scorer's hidden labels).
//!
//! Storage answers a part as a gzip'd tar streamed in chunks. Opening the stream is retried by the transport
//! (the call is a read); a stream broken off by a restart of storage is started again whole by
//! [`fetch_part`], and left to the caller of [`open_part`], which knows what it has written so far.

use futures::StreamExt;
use nsml_proto::internal::v1::FetchDatasetPartRequest;
use nsml_proto::v1::{Chunk, DatasetPart};
use tonic::{Status, Streaming};

use super::Clients;
use super::retry::{Backoff, is_unavailable};

/// Why a part could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchPartError {
    /// Storage refused the call or failed while streaming; the status is storage's own.
    #[error("fetching part {part:?} of dataset `{dataset}`: {}", .status.message())]
    Storage {
        dataset: String,
        part: DatasetPart,
        status: Status,
    },
    /// The part is larger than the caller accepts in memory.
    #[error("part {part:?} of dataset `{dataset}` is larger than {limit} bytes")]
    TooLarge {
        dataset: String,
        part: DatasetPart,
        limit: usize,
    },
}

impl FetchPartError {
    /// Storage's status, when storage answered one.
    pub fn status(&self) -> Option<&Status> {
        match self {
            FetchPartError::Storage { status, .. } => Some(status),
            FetchPartError::TooLarge { .. } => None,
        }
    }
}

/// Opens the download of `part` of `dataset`: the gzip'd tar, chunk by chunk, as storage streams it.
pub async fn open_part(
    clients: &Clients,
    dataset: &str,
    part: DatasetPart,
) -> Result<Streaming<Chunk>, Status> {
    Ok(clients
        .storage_internal
        .clone()
        .fetch_dataset_part(FetchDatasetPartRequest {
            name: dataset.to_string(),
            part: part as i32,
        })
        .await?
        .into_inner())
}

/// Fetches `part` of `dataset` whole into memory (the gzip'd tar), refusing one larger than `limit` bytes.
/// A download that storage breaks off while restarting is started again from its beginning, for as long
/// as [`Backoff::THROUGH_RESTART`] allows.
pub async fn fetch_part(
    clients: &Clients,
    dataset: &str,
    part: DatasetPart,
    limit: usize,
) -> Result<Vec<u8>, FetchPartError> {
    let storage = |status| FetchPartError::Storage {
        dataset: dataset.to_string(),
        part,
        status,
    };
    Backoff::THROUGH_RESTART
        .retry(
            "FetchDatasetPart",
            || async {
                let mut stream = open_part(clients, dataset, part).await.map_err(storage)?;
                let mut buf = Vec::new();
                while let Some(chunk) = stream.next().await {
                    let data = chunk.map_err(storage)?.data;
                    if buf.len() + data.len() > limit {
                        return Err(FetchPartError::TooLarge {
                            dataset: dataset.to_string(),
                            part,
                            limit,
                        });
                    }
                    buf.extend_from_slice(&data);
                }
                Ok(buf)
            },
            |e: &FetchPartError| e.status().is_some_and(is_unavailable),
        )
        .await
}
