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

impl Limits {
    /// The defaults, overridden by the server's environment: `NSML_CODE_LIMIT` and `NSML_DATASET_LIMIT`
    /// (sizes such as `100M` or `2G`), `NSML_CODE_FILES` and `NSML_CHECKPOINT_FILES` (entry counts).
    pub fn from_env() -> Result<Self, StorageError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// The defaults, overridden by the variables `get` returns.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, StorageError> {
        let mut limits = Self::default();
        for (var, slot) in [
            ("NSML_CODE_LIMIT", &mut limits.code_bytes),
            ("NSML_DATASET_LIMIT", &mut limits.dataset_bytes),
        ] {
            if let Some(value) = get(var) {
                *slot = nsml_manifest::parse_size(&value)
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or(StorageError::Config {
                        var,
                        value,
                        expected: "a size such as 100M or 2G",
                    })?;
            }
        }
        for (var, slot) in [
            ("NSML_CODE_FILES", &mut limits.code_entries),
            ("NSML_CHECKPOINT_FILES", &mut limits.checkpoint_entries),
        ] {
            if let Some(value) = get(var) {
                *slot =
                    value
                        .trim()
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or(StorageError::Config {
                            var,
                            value,
                            expected: "a positive number of files",
                        })?;
            }
        }
        Ok(limits)
    }
}

/// Starts the storage service with the limits the environment sets (see [`Limits::from_env`]).
pub async fn start(ctx: ServiceContext) -> Result<Started, StorageError> {
    start_with_limits(ctx, Limits::from_env()?).await
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
    let readiness = view.readiness();
    let core = Arc::new(Storage::new(
        ctx.store.clone(),
        view,
        blobs,
        staging,
        limits,
    ));
    let api = StorageApi::new(core);
    let internal =
        nsml_proto::internal::v1::storage_internal_server::StorageInternalServer::new(api.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let server = StorageServiceServer::new(api)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    Ok(Started {
        routes: Box::new(move |r: tonic::service::Routes| {
            r.add_service(server).add_service(internal)
        }),
        names: vec!["nsml.v1.StorageService", "nsml.internal.v1.StorageInternal"],
        tasks: vec![task],
        ready: vec![readiness],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_come_from_the_environment() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let l = Limits::from_vars(vars(&[
            ("NSML_CODE_LIMIT", "64K"),
            ("NSML_CODE_FILES", "20"),
        ]))
        .unwrap();
        assert_eq!((l.code_bytes, l.code_entries), (64 * 1024, 20));
        assert_eq!(l.dataset_bytes, Limits::default().dataset_bytes);
        let err = Limits::from_vars(vars(&[("NSML_CODE_FILES", "many")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "`NSML_CODE_FILES=many` is not a positive number of files"
        );
        assert!(Limits::from_vars(vars(&[("NSML_CODE_LIMIT", "0")])).is_err());
    }
}
