//! Applies a manifest to a running platform over gRPC.

use nsml_proto::v1 as pb;
use nsml_proto::v1::auth_service_client::AuthServiceClient;
use nsml_proto::v1::register_dataset_chunk::Kind;
use nsml_proto::v1::storage_service_client::StorageServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

use crate::{Manifest, ManifestError};

/// The size of the `data` chunks of streamed uploads.
pub const CHUNK_SIZE: usize = 256 * 1024;

/// Registers every dataset of the manifest (`StorageService.RegisterDataset`: a `meta` chunk, then the packed
/// archive in `data` chunks of [`CHUNK_SIZE`]), then the competition (`AuthService.ApplyCompetition`), each call
/// carrying `authorization: Bearer <token>`; returns the competition as the server stored it.
///
/// Every dataset's files are checked before the first upload, so a missing part leaves the server untouched.
/// Packing reads the files synchronously.
pub async fn apply(
    channel: Channel,
    token: &str,
    manifest: &Manifest,
) -> Result<pb::Competition, ManifestError> {
    manifest.check_files()?;
    let bearer: Option<MetadataValue<Ascii>> = if token.is_empty() {
        None
    } else {
        Some(
            format!("Bearer {token}")
                .parse()
                .map_err(|_| ManifestError::InvalidToken)?,
        )
    };

    let mut storage = StorageServiceClient::new(channel.clone());
    for meta in manifest.dataset_metas() {
        let name = meta.name.clone();
        let archive = manifest.pack_dataset(&name)?;
        let chunks: Vec<pb::RegisterDatasetChunk> = std::iter::once(Kind::Meta(meta))
            .chain(archive.chunks(CHUNK_SIZE).map(|c| Kind::Data(c.to_vec())))
            .map(|kind| pb::RegisterDatasetChunk { kind: Some(kind) })
            .collect();
        drop(archive);
        storage
            .register_dataset(authorize(&bearer, tokio_stream::iter(chunks)))
            .await
            .map_err(|source| ManifestError::Rpc {
                action: format!("registering dataset `{name}`"),
                source,
            })?;
    }

    let mut auth = AuthServiceClient::new(channel);
    let competition = auth
        .apply_competition(authorize(&bearer, manifest.competition_request()))
        .await
        .map_err(|source| ManifestError::Rpc {
            action: format!("applying competition `{}`", manifest.id()),
            source,
        })?;
    Ok(competition.into_inner())
}

fn authorize<T>(bearer: &Option<MetadataValue<Ascii>>, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(bearer) = bearer {
        request
            .metadata_mut()
            .insert("authorization", bearer.clone());
    }
    request
}
