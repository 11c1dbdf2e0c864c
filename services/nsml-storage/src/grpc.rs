//! The gRPC face of the storage service: reads uploads off client streams, checks who may do what,
//! converts messages and maps errors. The rules live in [`crate::domain`], the work in [`crate::handler`].

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use nsml_common::bounds::Bounded;
use nsml_common::caller::Caller;
use nsml_common::names::{SessionName, check_checkpoint, check_ident};
use nsml_proto::internal::v1::storage_internal_server::StorageInternal;
use nsml_proto::internal::v1::{
    CheckpointMeta, FetchDatasetPartRequest, SaveCheckpointChunk, save_checkpoint_chunk,
};
use nsml_proto::v1::storage_service_server::StorageService;
use nsml_proto::v1::{
    Checkpoint, Chunk, CodeSnapshot, Dataset, DatasetMeta, DatasetPart, DeleteCheckpointRequest,
    DeleteCheckpointResponse, DownloadCodeRequest, FindCodeRequest, GetDatasetRequest,
    ListCheckpointsRequest, ListCheckpointsResponse, ListDatasetsRequest, ListDatasetsResponse,
    PullCheckpointRequest, RegisterDatasetChunk, StorageUsage, UploadCodeChunk, UploadCodeMeta,
    UsageRequest, register_dataset_chunk, upload_code_chunk,
};
use tonic::{Request, Response, Status, Streaming};

use crate::blobs::ByteStream;
use crate::domain::check_dataset_meta;
use crate::error::StorageError;
use crate::handler::Storage;

/// A download, as sent.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, Status>> + Send>>;

/// The `nsml.v1.StorageService` implementation.
#[derive(Clone)]
pub struct StorageApi {
    core: Arc<Storage>,
}

impl StorageApi {
    /// Serves the handlers in `core`.
    pub fn new(core: Arc<Storage>) -> Self {
        Self { core }
    }
}

/// One message of an upload: the metadata (first) or a piece of the archive.
enum Piece<M> {
    Meta(M),
    Data(Vec<u8>),
}

/// The upload messages of the API, each a `oneof { meta, data }`.
trait UploadChunk: Send + 'static {
    type Meta;
    fn piece(self) -> Option<Piece<Self::Meta>>;
}

macro_rules! upload_chunk {
    ($chunk:ty, $meta:ty, $kind:path) => {
        impl UploadChunk for $chunk {
            type Meta = $meta;
            fn piece(self) -> Option<Piece<$meta>> {
                use $kind as K;
                match self.kind? {
                    K::Meta(m) => Some(Piece::Meta(m)),
                    K::Data(d) => Some(Piece::Data(d)),
                }
            }
        }
    };
}

upload_chunk!(
    RegisterDatasetChunk,
    DatasetMeta,
    register_dataset_chunk::Kind
);
upload_chunk!(UploadCodeChunk, UploadCodeMeta, upload_code_chunk::Kind);
upload_chunk!(
    SaveCheckpointChunk,
    CheckpointMeta,
    save_checkpoint_chunk::Kind
);

/// Reads an upload's first message, which must carry the metadata, and measures the metadata's fields.
async fn first_meta<C: UploadChunk>(stream: &mut Streaming<C>) -> Result<C::Meta, Status>
where
    C::Meta: Bounded,
{
    match stream.message().await? {
        Some(chunk) => match chunk.piece() {
            Some(Piece::Meta(meta)) => {
                meta.check_bounds()?;
                Ok(meta)
            }
            _ => Err(StorageError::BadRequest(
                "the first message of an upload must carry `meta`".into(),
            )
            .into()),
        },
        None => Err(StorageError::BadRequest(
            "empty upload: the first message must carry `meta`".into(),
        )
        .into()),
    }
}

/// The archive bytes of an upload, after its first message.
fn data_of<C: UploadChunk>(
    stream: Streaming<C>,
) -> impl Stream<Item = Result<Vec<u8>, StorageError>> + Unpin {
    stream.map(|msg| match msg {
        Ok(chunk) => match chunk.piece() {
            Some(Piece::Data(d)) => Ok(d),
            Some(Piece::Meta(_)) => Err(StorageError::BadRequest(
                "an upload carries `meta` in its first message only".into(),
            )),
            None => Ok(Vec::new()),
        },
        Err(status) => Err(StorageError::Interrupted(status.message().to_string())),
    })
}

fn download(bytes: ByteStream) -> Response<ChunkStream> {
    Response::new(Box::pin(
        bytes.map(|r| r.map(|data| Chunk { data }).map_err(Status::from)),
    ))
}

/// Hides what only the dataset's hosts may see: which test items are private.
fn as_seen_by(caller: &Caller, mut dataset: Dataset) -> Dataset {
    if let Some(meta) = dataset.meta.as_mut()
        && !caller.is_host_of(&meta.competition)
    {
        meta.private_keys.clear();
    }
    dataset
}

impl StorageApi {
    /// Checks that the caller may see what belongs to a session's team.
    fn authorize_session(
        &self,
        caller: &Caller,
        session: &SessionName,
    ) -> Result<(), StorageError> {
        if caller.is_service() {
            return Ok(());
        }
        caller.require_authenticated()?;
        let competition = self
            .core
            .read(|v| v.competition_of(&session.dataset).map(String::from));
        let Some(competition) = competition else {
            if caller.is_admin() {
                return Ok(());
            }
            return Err(StorageError::DatasetNotFound {
                name: session.dataset.clone(),
            });
        };
        if caller.may_access_team(&session.team, &competition) {
            Ok(())
        } else {
            Err(StorageError::OtherTeam {
                what: format!("session `{session}`"),
            })
        }
    }

    /// The team a usage request is about: the one named, or the caller's only team.
    /// The caller's team in the competition `dataset` belongs to.
    fn team_for(&self, caller: &Caller, dataset: &str) -> Result<String, StorageError> {
        let competition = self
            .core
            .read(|v| v.competition_of(dataset).map(String::from))
            .ok_or_else(|| StorageError::DatasetNotFound {
                name: dataset.to_string(),
            })?;
        caller
            .team_in(&competition)
            .map(str::to_string)
            .ok_or_else(|| StorageError::NotInCompetition {
                competition,
                dataset: dataset.to_string(),
            })
    }

    fn usage_team(&self, caller: &Caller, team: String) -> Result<String, StorageError> {
        if !team.is_empty() {
            let allowed = caller.is_service()
                || caller.is_admin()
                || caller.is_member_of(&team)
                || self
                    .core
                    .read(|v| v.competitions_of_team(&team).any(|c| caller.is_host_of(c)));
            return if allowed {
                Ok(team)
            } else {
                Err(StorageError::NotYourTeam { team })
            };
        }
        let user = caller.user()?;
        let mut teams: Vec<&str> = user.memberships.iter().map(|m| m.team.as_str()).collect();
        teams.sort_unstable();
        teams.dedup();
        match teams.as_slice() {
            [only] => Ok(only.to_string()),
            [] => Err(StorageError::BadRequest(
                "you are in no team: name the team whose usage to show".into(),
            )),
            many => Err(StorageError::BadRequest(format!(
                "you are in several teams ({}): name the one whose usage to show",
                many.join(", ")
            ))),
        }
    }
}

#[tonic::async_trait]
impl StorageService for StorageApi {
    async fn register_dataset(
        &self,
        req: Request<Streaming<RegisterDatasetChunk>>,
    ) -> Result<Response<Dataset>, Status> {
        let caller = Caller::of(&req)?;
        let mut stream = req.into_inner();
        let meta = first_meta(&mut stream).await?;
        check_ident("dataset", &meta.name)?;
        check_ident("competition", &meta.competition)?;
        // The competition may not exist yet (datasets are registered before the competition is applied):
        // the identity's host rights are what counts.
        caller.require_host_of(&meta.competition)?;
        let meta = check_dataset_meta(meta)?;
        self.core.ready().await?;
        self.core.check_dataset_owner(&meta)?;
        let limit = self.core.limits().dataset_bytes;
        let what = format!("dataset `{}` archive", meta.name);
        let archive = self
            .core
            .staging()
            .spool(data_of(stream), limit, |_| StorageError::TooLarge {
                what,
                limit,
                hint: "",
            })
            .await?;
        let dataset = self
            .core
            .register_dataset(meta, caller.name(), &caller.actor(), archive)
            .await?;
        Ok(Response::new(dataset))
    }

    async fn list_datasets(
        &self,
        req: Request<ListDatasetsRequest>,
    ) -> Result<Response<ListDatasetsResponse>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.require_authenticated()?;
        let competition = req.into_inner().competition;
        self.core.ready().await?;
        // Every signed-in user sees every dataset, as on NSML; only hosts see the private split.
        let datasets = self.core.read(|v| {
            v.datasets()
                .filter(|d| {
                    competition.is_empty()
                        || d.dataset
                            .meta
                            .as_ref()
                            .is_some_and(|m| m.competition == competition)
                })
                .map(|d| as_seen_by(&caller, d.dataset.clone()))
                .collect()
        });
        Ok(Response::new(ListDatasetsResponse { datasets }))
    }

    async fn get_dataset(
        &self,
        req: Request<GetDatasetRequest>,
    ) -> Result<Response<Dataset>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.require_authenticated()?;
        let name = req.into_inner().name;
        self.core.ready().await?;
        let dataset = self
            .core
            .read(|v| v.dataset(&name).map(|d| d.dataset.clone()))
            .ok_or(StorageError::DatasetNotFound { name })?;
        Ok(Response::new(as_seen_by(&caller, dataset)))
    }

    async fn upload_code(
        &self,
        req: Request<Streaming<UploadCodeChunk>>,
    ) -> Result<Response<CodeSnapshot>, Status> {
        let caller = Caller::of(&req)?;
        caller.user()?;
        let mut stream = req.into_inner();
        let meta = first_meta(&mut stream).await?;
        self.core.ready().await?;
        let dataset = meta.dataset;
        let team = self.team_for(&caller, &dataset)?;
        let limit = self.core.limits().code_bytes;
        let archive = self
            .core
            .staging()
            .spool(data_of(stream), limit, |_| StorageError::TooLarge {
                what: "code upload".into(),
                limit,
                hint: "; leave data, checkpoints and environments out with `.nsmlignore`",
            })
            .await?;
        let snapshot = self
            .core
            .upload_code(&team, caller.name(), &caller.actor(), archive)
            .await?;
        Ok(Response::new(snapshot))
    }

    type DownloadCodeStream = ChunkStream;

    async fn download_code(
        &self,
        req: Request<DownloadCodeRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.require_authenticated()?;
        let id = req.into_inner().id;
        self.core.ready().await?;
        let teams = self
            .core
            .read(|v| v.code(&id).map(|c| c.teams.clone()))
            .ok_or_else(|| StorageError::CodeNotFound { id: id.clone() })?;
        if !(caller.is_service()
            || caller.is_admin()
            || teams.iter().any(|t| caller.is_member_of(t)))
        {
            return Err(StorageError::OtherTeam {
                what: format!("code snapshot `{id}`"),
            }
            .into());
        }
        Ok(download(self.core.blob(&id).await?))
    }

    async fn find_code(
        &self,
        req: Request<FindCodeRequest>,
    ) -> Result<Response<CodeSnapshot>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.user()?;
        let FindCodeRequest { dataset, id } = req.into_inner();
        self.core.ready().await?;
        let team = self.team_for(&caller, &dataset)?;
        // Another team's identical code is not the caller's to know of: NOT_FOUND alike.
        let size = self
            .core
            .read(|v| {
                v.code(&id)
                    .filter(|c| c.teams.contains(&team))
                    .map(|c| c.size)
            })
            .ok_or_else(|| StorageError::CodeNotFound { id: id.clone() })?;
        Ok(Response::new(CodeSnapshot {
            id,
            size_bytes: size,
            team,
        }))
    }

    async fn list_checkpoints(
        &self,
        req: Request<ListCheckpointsRequest>,
    ) -> Result<Response<ListCheckpointsResponse>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        let session = SessionName::parse(&req.into_inner().session)?;
        self.core.ready().await?;
        self.authorize_session(&caller, &session)?;
        let name = session.to_string();
        let checkpoints = self
            .core
            .read(|v| v.checkpoints_of(&session.team, &name))
            .into_iter()
            .map(|c| c.checkpoint)
            .collect();
        Ok(Response::new(ListCheckpointsResponse { checkpoints }))
    }

    type PullCheckpointStream = ChunkStream;

    async fn pull_checkpoint(
        &self,
        req: Request<PullCheckpointRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        let req = req.into_inner();
        let session = SessionName::parse(&req.session)?;
        self.core.ready().await?;
        self.authorize_session(&caller, &session)?;
        let name = session.to_string();
        let blob = self
            .core
            .read(|v| {
                v.team_checkpoints(&session.team)
                    .and_then(|t| t.get(&name, &req.checkpoint))
                    .map(|c| c.blob.clone())
            })
            .ok_or_else(|| StorageError::CheckpointNotFound {
                session: name.clone(),
                checkpoint: req.checkpoint.clone(),
            })?;
        Ok(download(self.core.blob(&blob).await?))
    }

    async fn delete_checkpoint(
        &self,
        req: Request<DeleteCheckpointRequest>,
    ) -> Result<Response<DeleteCheckpointResponse>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        let req = req.into_inner();
        let session = SessionName::parse(&req.session)?;
        check_checkpoint(&req.checkpoint)?;
        self.core.ready().await?;
        self.authorize_session(&caller, &session)?;
        let (deleted, kept) = self
            .core
            .delete_checkpoints(&session, &req.checkpoint, &caller.actor())
            .await?;
        Ok(Response::new(DeleteCheckpointResponse { deleted, kept }))
    }

    async fn usage(&self, req: Request<UsageRequest>) -> Result<Response<StorageUsage>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.require_authenticated()?;
        self.core.ready().await?;
        let team = self.usage_team(&caller, req.into_inner().team)?;
        let (checkpoint_bytes, code_bytes) = self.core.read(|v| v.usage(&team));
        Ok(Response::new(StorageUsage {
            team,
            checkpoint_bytes,
            code_bytes,
        }))
    }
}

#[tonic::async_trait]
impl StorageInternal for StorageApi {
    type FetchDatasetPartStream = ChunkStream;

    async fn fetch_dataset_part(
        &self,
        req: Request<FetchDatasetPartRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        // Parts include hidden labels: only the platform's own services fetch them.
        Caller::of(&req)?.require_service()?;
        let req = req.into_inner();
        let part = DatasetPart::try_from(req.part).unwrap_or(DatasetPart::Unspecified);
        self.core.ready().await?;
        let blob = self.core.read(|v| match v.dataset(&req.name) {
            Some(d) => d.blobs.part(&req.name, part).map(String::from),
            None => Err(StorageError::DatasetNotFound {
                name: req.name.clone(),
            }),
        })?;
        Ok(download(self.core.blob(&blob).await?))
    }

    async fn save_checkpoint(
        &self,
        req: Request<Streaming<SaveCheckpointChunk>>,
    ) -> Result<Response<Checkpoint>, Status> {
        let caller = Caller::of(&req)?;
        // The runner saves what the session's program wrote; users save through their sessions only.
        caller.require_service()?;
        let mut stream = req.into_inner();
        let meta = first_meta(&mut stream).await?;
        let session = SessionName::parse(&meta.session)?;
        check_checkpoint(&meta.checkpoint)?;
        if !meta.summary_json.is_empty()
            && serde_json::from_str::<serde_json::Value>(&meta.summary_json).is_err()
        {
            return Err(StorageError::BadRequest(format!(
                "the summary of checkpoint `{session}/{}` is not JSON",
                meta.checkpoint
            ))
            .into());
        }
        self.core.ready().await?;
        let checkpoint = self
            .core
            .save_checkpoint(
                &session,
                &meta.checkpoint,
                meta.summary_json,
                &caller.actor(),
                data_of(stream),
            )
            .await?;
        Ok(Response::new(checkpoint))
    }
}
