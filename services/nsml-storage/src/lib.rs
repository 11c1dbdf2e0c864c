//! The storage service: competitions' datasets, participants' code snapshots, sessions' checkpoints and
//! every team's byte usage, kept as content-addressed blobs with the facts about them in the log.
//!
//! - A dataset is registered by a host as one gzip'd tar in NSML's layout (`train/...`, `test/test_data`,
//!   `test/test_label`, optionally `test_submit/...`, `eval/...`, `private_keys.txt`). It is stored as
//!   separate parts so that the hidden labels travel on their own: only platform services fetch parts,
//!   and training sessions get the train part only. See [`domain::DatasetBlobs`] for the parts' layout.
//! - Code is stored under its SHA-256, which is the snapshot's id; its team and platform services may
//!   download it.
//! - Checkpoints are saved by the runner for a session and count against the team's storage quota; saving
//!   one under an existing name overwrites it, as on NSML.
//!
//! Events: `DatasetRegistered` (stream `dataset-NAME`), `CodeUploaded` (`code-ID`), `CheckpointSaved` and
//! `CheckpointDeleted` (`checkpoints-TEAM`, whose version serialises each team's quota decisions).
//!
//! The crate reads top-down: [`domain`] (rules), [`archive`] (safe reading of uploads), [`blobs`] (where
//! bytes go), [`projection`] (the read model), [`handler`] (commands), [`grpc`] (the API).

pub mod archive;
pub mod blobs;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod handler;
pub mod projection;

use std::sync::Arc;

use nsml_common::ServiceContext;
use nsml_common::clients::MAX_MESSAGE_BYTES;
use nsml_common::projection::Projection;
use nsml_common::server::Started;
use nsml_proto::v1::storage_service_server::StorageServiceServer;

pub use error::StorageError;

use crate::blobs::{LocalBlobStore, Staging};
use crate::domain::{GIB, MIB};
use crate::grpc::StorageApi;
use crate::handler::Storage;
use crate::projection::StorageView;

/// Sizes the service accepts.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest dataset archive, in bytes.
    pub dataset_bytes: u64,
    /// Largest code upload, in bytes.
    pub code_bytes: u64,
    /// Most entries (files, directories, links) in a code upload.
    pub code_entries: usize,
    /// Most entries in a checkpoint.
    pub checkpoint_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            dataset_bytes: 2 * GIB,
            code_bytes: 100 * MIB,
            code_entries: 10_000,
            checkpoint_entries: 100_000,
        }
    }
}

/// Starts the storage service with the default limits.
pub async fn start(ctx: ServiceContext) -> Result<Started, StorageError> {
    start_with_limits(ctx, Limits::default()).await
}

/// Starts the storage service: spawns its read model (ended by `ctx.cancel`) and returns its routes. Blobs
/// live under `ctx.data_dir/blobs`, uploads in flight under `ctx.data_dir/tmp`.
pub async fn start_with_limits(
    ctx: ServiceContext,
    limits: Limits,
) -> Result<Started, StorageError> {
    let staging = Staging::new(ctx.data_dir.join("tmp")).await?;
    let blobs = Arc::new(LocalBlobStore::new(ctx.data_dir.join("blobs")).await?);
    let (view, task) = Projection::<StorageView>::spawn(
        "storage",
        ctx.store.clone(),
        ctx.bus.clone(),
        ctx.cancel.clone(),
    );
    let core = Arc::new(Storage::new(
        ctx.store.clone(),
        view,
        blobs,
        staging,
        limits,
    ));
    let server = StorageServiceServer::new(StorageApi::new(core))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    Ok(Started {
        routes: Box::new(move |r: tonic::service::Routes| r.add_service(server)),
        names: vec!["nsml.v1.StorageService"],
        tasks: vec![task],
    })
}
