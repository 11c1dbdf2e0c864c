//! A session's checkpoint save and load ride out a restart of the storage service: the upload is sent again
//! whole, the download started again into an empty directory.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nsml_common::clients::{Clients, ServiceAddrs};
use nsml_proto::internal::v1::storage_internal_server::{StorageInternal, StorageInternalServer};
use nsml_proto::internal::v1::*;
use nsml_proto::v1::storage_service_server::{StorageService, StorageServiceServer};
use nsml_proto::v1::*;
use nsml_runner::platform::{GrpcPlatform, Platform};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// A storage service that answers its first `refuse` uploads and downloads `UNAVAILABLE` (as one restarting
/// does) after taking them in whole, and keeps what later uploads bring.
#[derive(Clone, Default)]
struct Restarting {
    refuse: usize,
    /// Refuses every other upload at its first message, before reading the rest.
    alternate: bool,
    attempts: Arc<Mutex<usize>>,
    uploads: Arc<Mutex<Vec<Vec<u8>>>>,
    pulls: Arc<Mutex<usize>>,
}

type ChunkStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<Chunk, Status>> + Send>>;

fn nope<T>() -> Result<T, Status> {
    Err(Status::unimplemented("not in the fake"))
}

#[tonic::async_trait]
impl StorageService for Restarting {
    type DownloadCodeStream = ChunkStream;
    type PullCheckpointStream = ChunkStream;
    async fn register_dataset(
        &self,
        _: Request<Streaming<RegisterDatasetChunk>>,
    ) -> Result<Response<Dataset>, Status> {
        nope()
    }
    async fn list_datasets(
        &self,
        _: Request<ListDatasetsRequest>,
    ) -> Result<Response<ListDatasetsResponse>, Status> {
        nope()
    }
    async fn get_dataset(
        &self,
        _: Request<GetDatasetRequest>,
    ) -> Result<Response<Dataset>, Status> {
        nope()
    }
    async fn upload_code(
        &self,
        _: Request<Streaming<UploadCodeChunk>>,
    ) -> Result<Response<CodeSnapshot>, Status> {
        nope()
    }
    async fn download_code(
        &self,
        _: Request<DownloadCodeRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        nope()
    }
    async fn find_code(
        &self,
        _: Request<nsml_proto::v1::FindCodeRequest>,
    ) -> Result<Response<CodeSnapshot>, Status> {
        nope()
    }
    async fn list_checkpoints(
        &self,
        _: Request<ListCheckpointsRequest>,
    ) -> Result<Response<ListCheckpointsResponse>, Status> {
        nope()
    }
    async fn delete_checkpoint(
        &self,
        _: Request<DeleteCheckpointRequest>,
    ) -> Result<Response<DeleteCheckpointResponse>, Status> {
        nope()
    }
    async fn usage(&self, _: Request<UsageRequest>) -> Result<Response<StorageUsage>, Status> {
        nope()
    }

    async fn pull_checkpoint(
        &self,
        _: Request<PullCheckpointRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let bytes = self
            .uploads
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .ok_or_else(|| Status::not_found("no checkpoint"))?;
        let mut pulls = self.pulls.lock().expect("lock");
        *pulls += 1;
        let pieces: Vec<Result<Chunk, Status>> = bytes
            .chunks(100)
            .map(|c| Ok(Chunk { data: c.to_vec() }))
            .collect();
        if *pulls <= self.refuse {
            // Broken off half-way, as by a restart.
            let half = pieces.len() / 2;
            let broken = pieces
                .into_iter()
                .take(half)
                .chain([Err(Status::unavailable("storage is restarting"))]);
            return Ok(Response::new(Box::pin(tokio_stream::iter(broken))));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(pieces))))
    }
}

#[tonic::async_trait]
impl StorageInternal for Restarting {
    type FetchDatasetPartStream = ChunkStream;
    async fn fetch_dataset_part(
        &self,
        _: Request<FetchDatasetPartRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        nope()
    }
    async fn save_checkpoint(
        &self,
        r: Request<Streaming<SaveCheckpointChunk>>,
    ) -> Result<Response<Checkpoint>, Status> {
        let mut s = r.into_inner();
        if self.alternate {
            let mut attempts = self.attempts.lock().expect("lock");
            *attempts += 1;
            if *attempts % 2 == 1 {
                return Err(Status::unavailable("storage is restarting"));
            }
        }
        let mut meta = None;
        let mut data = Vec::new();
        while let Some(c) = s.next().await {
            match c?.kind {
                Some(save_checkpoint_chunk::Kind::Meta(m)) => meta = Some(m),
                Some(save_checkpoint_chunk::Kind::Data(d)) => data.extend(d),
                None => {}
            }
        }
        let meta = meta.ok_or_else(|| Status::invalid_argument("the upload has no meta"))?;
        let mut uploads = self.uploads.lock().expect("lock");
        uploads.push(data);
        if uploads.len() <= self.refuse {
            return Err(Status::unavailable("storage is restarting"));
        }
        Ok(Response::new(Checkpoint {
            session: meta.session,
            name: meta.checkpoint,
            ..Default::default()
        }))
    }
}

/// Serves `fake` on `port` from now until `stop`.
async fn serve(fake: Restarting, port: u16, stop: CancellationToken) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("the port is free");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(StorageServiceServer::new(fake.clone()))
            .add_service(StorageInternalServer::new(fake))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.cancelled_owned(),
            ),
    );
}

fn platform(port: u16) -> GrpcPlatform {
    let addr = format!("http://127.0.0.1:{port}");
    let addrs = ServiceAddrs {
        auth: addr.clone(),
        storage: addr.clone(),
        session: addr.clone(),
        quota: addr.clone(),
        submission: addr.clone(),
        leaderboard: addr,
        local: None,
        tls: None,
    };
    let clients = Clients::new(&addrs, "secret", "runner").expect("clients");
    GrpcPlatform::new(clients, "team/ds/1".into(), vec![])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_is_saved_and_loaded_through_a_storage_restart() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let dir = tempfile::tempdir().expect("temporary directory");
    let model = dir.path().join("model");
    std::fs::create_dir(&model).expect("mkdir");
    // Incompressible, so that the archive spans many upload chunks.
    let weights: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(model.join("weights.bin"), &weights).expect("write");

    // Storage is down when the save starts, and refuses the first upload once it is back.
    let platform = platform(port);
    let save = tokio::spawn({
        let platform = platform.clone();
        let model = model.clone();
        async move { platform.save_checkpoint("e1", "{}", &model).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !save.is_finished(),
        "the save gave up while storage was down"
    );
    let fake = Restarting {
        refuse: 1,
        ..Restarting::default()
    };
    let stop = CancellationToken::new();
    serve(fake.clone(), port, stop.clone()).await;
    tokio::time::timeout(Duration::from_secs(60), save)
        .await
        .expect("the save ends within its budget")
        .expect("the save's task")
        .expect("the save succeeds once storage is back");
    let uploads = fake.uploads.lock().expect("lock").clone();
    assert_eq!(uploads.len(), 2, "one refused upload, one kept");
    assert_eq!(uploads[0], uploads[1], "the upload is sent again whole");

    // The first download breaks off half-way; the second lands whole in an empty directory.
    let dest = dir.path().join("loaded");
    platform
        .load_checkpoint("team/ds/1", "e1", &dest)
        .await
        .expect("the load succeeds");
    assert_eq!(*fake.pulls.lock().expect("lock"), 2);
    let loaded = std::fs::read(dest.join("weights.bin")).expect("the loaded checkpoint");
    assert!(loaded == weights, "the loaded checkpoint differs");
    stop.cancel();
}

/// A save refused before its upload is read ends the upload under the packing, which then fails too: the save
/// is sent again all the same, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_refused_at_once_is_sent_again() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let dir = tempfile::tempdir().expect("temporary directory");
    let model = dir.path().join("model");
    std::fs::create_dir(&model).expect("mkdir");
    let weights: Vec<u8> = (0..2_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(model.join("weights.bin"), &weights).expect("write");
    let fake = Restarting {
        alternate: true,
        ..Restarting::default()
    };
    let stop = CancellationToken::new();
    serve(fake.clone(), port, stop.clone()).await;
    let platform = platform(port);
    for i in 0..20 {
        platform
            .save_checkpoint(&format!("e{i}"), "{}", &model)
            .await
            .expect("saved on the second try");
    }
    assert_eq!(fake.uploads.lock().expect("lock").len(), 20);
    stop.cancel();
}
