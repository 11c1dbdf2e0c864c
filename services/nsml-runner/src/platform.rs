//! What a running session asks of the platform, behind one trait so the process side can be tested
//! without the services, and its implementation over the services' gRPC clients.

use std::future::Future;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;

use futures::StreamExt;
use nsml_common::clients::Clients;
use nsml_common::clients::retry::{self, Backoff};
use nsml_proto::internal::v1::{
    CheckpointMeta, RunnerPredictionsRequest, RunnerReportRequest, RunnerStartedRequest,
    SaveCheckpointChunk, save_checkpoint_chunk,
};
use nsml_proto::v1::{MetricPoint, PullCheckpointRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::archive::{self, ExtractLimits};
use crate::error::{Result, RunnerError};

/// The platform as one session's process sees it. Calls act for that session only.
#[async_trait::async_trait]
pub trait Platform: Send + Sync + 'static {
    /// Tells the session service the process is running.
    async fn started(&self, pid: u32) -> Result<()>;
    /// Records a metrics point.
    async fn report(&self, point: MetricPoint) -> Result<()>;
    /// Stores the directory `dir` as checkpoint `checkpoint` of this session.
    async fn save_checkpoint(&self, checkpoint: &str, summary_json: &str, dir: &Path)
    -> Result<()>;
    /// Fetches checkpoint `checkpoint` of `session` and extracts it into `dest`, which must not exist.
    async fn load_checkpoint(&self, session: &str, checkpoint: &str, dest: &Path) -> Result<()>;
    /// Hands a submit's predictions (JSON) to the submission service.
    async fn predictions(&self, predictions_json: String) -> Result<()>;
}

/// How long a call is retried on `UNAVAILABLE` (a service restarting): through a 30 s restart and its
/// start-up, so that a session outlives a restart of the services it calls.
pub const RETRY_BUDGET: Duration = Duration::from_secs(40);
/// How long the finish is retried, which must not be lost: about a minute and a half.
pub const FINISH_BUDGET: Duration = Duration::from_secs(90);

/// Runs `call` until it succeeds, fails with anything but `UNAVAILABLE`, or `budget` is spent, backing off
/// (with jitter) from 100 ms up to 2 s between attempts, as every call between services does.
pub async fn with_retry<T, F, Fut>(what: &'static str, budget: Duration, call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, tonic::Status>>,
{
    Backoff::THROUGH_RESTART
        .with_budget(budget)
        .retry(what, call, retry::is_unavailable)
        .await
        .map_err(|status| RunnerError::rpc(what, status))
}

/// Why one try of a call made of several steps failed: the service (retried when unavailable), or this
/// side (never retried).
enum TryFailed {
    Service(tonic::Status),
    Local(RunnerError),
}

impl std::fmt::Display for TryFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TryFailed::Service(status) => write!(f, "{}", status.message()),
            TryFailed::Local(e) => write!(f, "{e}"),
        }
    }
}

impl TryFailed {
    /// Sorts a runner error: a service's status is the service's, anything else this side's.
    fn of(err: RunnerError) -> Self {
        match err {
            RunnerError::Rpc { status, .. } => TryFailed::Service(status),
            other => TryFailed::Local(other),
        }
    }

    fn transient(&self) -> bool {
        matches!(self, TryFailed::Service(status) if retry::is_unavailable(status))
    }

    fn into_error(self, what: &'static str) -> RunnerError {
        match self {
            TryFailed::Service(status) => RunnerError::rpc(what, status),
            TryFailed::Local(e) => e,
        }
    }
}

/// Extracts a downloaded tar, plain or gzip'd (a stream of `Chunk`s), into `dest`.
pub async fn extract_download(
    what: &'static str,
    stream: tonic::Streaming<nsml_proto::v1::Chunk>,
    dest: &Path,
    limits: ExtractLimits,
) -> Result<()> {
    let chunks = stream.map(move |r| r.map(|c| c.data).map_err(|s| RunnerError::rpc(what, s)));
    archive::extract_stream(chunks, dest, limits)
        .await
        .map(|_| ())
}

/// The platform over the services' gRPC clients, for one session.
#[derive(Clone)]
pub struct GrpcPlatform {
    clients: Clients,
    name: String,
    gpu_ids: Vec<u32>,
    submission_id: String,
}

impl GrpcPlatform {
    /// The platform for session `name`, which holds GPUs `gpu_ids`.
    pub fn new(clients: Clients, name: String, gpu_ids: Vec<u32>) -> Self {
        Self {
            clients,
            name,
            gpu_ids,
            submission_id: String::new(),
        }
    }

    /// The platform for a submit session running submission `id`.
    pub fn for_submission(mut self, id: String) -> Self {
        self.submission_id = id;
        self
    }
    /// Packs `dir` and uploads it as checkpoint `checkpoint`, once.
    async fn save_checkpoint_once(
        &self,
        checkpoint: &str,
        summary_json: &str,
        dir: &Path,
    ) -> std::result::Result<(), TryFailed> {
        let (tx, rx) = mpsc::channel::<Piece>(8);
        // Tells, once packing failed, whether it failed because the upload had ended (the call failed first).
        let upload = tx.clone();
        let dir: PathBuf = dir.to_path_buf();
        let packer = tokio::task::spawn_blocking(move || {
            // The packer reads files in large pieces; the writer gathers what it writes into chunks.
            let writer = ChunkWriter {
                tx,
                buf: Vec::with_capacity(UPLOAD_CHUNK),
                meter: nsml_common::bulk::Meter::default(),
            };
            archive::pack_dir(&dir, writer)?
                .done()
                .map_err(|e| RunnerError::io("cannot upload checkpoint", e))
        });
        let meta = SaveCheckpointChunk {
            kind: Some(save_checkpoint_chunk::Kind::Meta(CheckpointMeta {
                session: self.name.clone(),
                checkpoint: checkpoint.to_string(),
                summary_json: summary_json.to_string(),
            })),
        };
        let request = futures::stream::iter([meta]).chain(upload_data(rx));
        let mut client = self.clients.storage_internal.clone();
        let call = client.save_checkpoint(request);
        tokio::pin!(call);
        let packed = tokio::select! {
            answered = &mut call => {
                return answered.map(|_| ()).map_err(TryFailed::Service);
            }
            packed = packer => packed,
        };
        match packed {
            Ok(Ok(())) => call.await.map(|_| ()).map_err(TryFailed::Service),
            // The call ended first and dropped the upload, which stopped the packing: the call's answer
            // (a restart of storage, say) is what went wrong.
            Ok(Err(e)) if upload.is_closed() => match call.await {
                Err(status) => Err(TryFailed::Service(status)),
                Ok(_) => Err(TryFailed::Local(e)),
            },
            Ok(Err(e)) => Err(TryFailed::Local(e)),
            Err(join) => Err(TryFailed::Local(RunnerError::io(
                "checkpoint packing stopped",
                io::Error::other(join),
            ))),
        }
    }
}

/// The data chunks of an upload, as the packing thread sends them. The stream ends cleanly only after
/// `Done`: if packing fails, it stays open and the call is dropped, so the service sees a cancelled
/// upload, never a truncated checkpoint.
fn upload_data(
    rx: mpsc::Receiver<Piece>,
) -> impl futures::Stream<Item = SaveCheckpointChunk> + Send + 'static {
    let finished = Arc::new(AtomicBool::new(false));
    let seen_done = Arc::clone(&finished);
    ReceiverStream::new(rx)
        .take_while(move |piece| {
            let is_data = matches!(piece, Piece::Data(_));
            if !is_data {
                seen_done.store(true, Ordering::SeqCst);
            }
            futures::future::ready(is_data)
        })
        .filter_map(|piece| {
            futures::future::ready(match piece {
                Piece::Data(data) => Some(SaveCheckpointChunk {
                    kind: Some(save_checkpoint_chunk::Kind::Data(data)),
                }),
                Piece::Done => None,
            })
        })
        // Without `Done` the packer failed: stay pending, never end the upload cleanly.
        .chain(futures::stream::poll_fn(move |_| {
            if finished.load(Ordering::SeqCst) {
                Poll::Ready(None)
            } else {
                Poll::Pending
            }
        }))
}

/// A piece of a checkpoint archive on its way from the packing thread to the upload.
enum Piece {
    Data(Vec<u8>),
    Done,
}

/// A blocking writer that ships what is written in chunks of [`UPLOAD_CHUNK`] over a channel.
struct ChunkWriter {
    tx: mpsc::Sender<Piece>,
    buf: Vec<u8>,
    /// Announces a large checkpoint as a bulk transfer until the writer is dropped.
    meter: nsml_common::bulk::Meter,
}

/// The size of the messages a checkpoint is sent in: few enough per gigabyte that their cost does not
/// count, and far under every gRPC message limit on the way (4 MiB by default, 64 MiB between services).
const UPLOAD_CHUNK: usize = 1 << 20;

impl ChunkWriter {
    fn ship(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.meter.moved(self.buf.len());
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(UPLOAD_CHUNK));
        self.tx
            .blocking_send(Piece::Data(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload ended"))
    }

    fn done(mut self) -> io::Result<()> {
        self.ship()?;
        self.tx
            .blocking_send(Piece::Done)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload ended"))
    }
}

impl Write for ChunkWriter {
    /// Takes what fits in the chunk being gathered, and ships the chunk once full: every chunk but the
    /// last is [`UPLOAD_CHUNK`] bytes, and the buffer never grows.
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(UPLOAD_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == UPLOAD_CHUNK {
            self.ship()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[async_trait::async_trait]
impl Platform for GrpcPlatform {
    async fn started(&self, pid: u32) -> Result<()> {
        let req = RunnerStartedRequest {
            name: self.name.clone(),
            pid,
            gpu_ids: self.gpu_ids.clone(),
        };
        with_retry("RunnerStarted", RETRY_BUDGET, || {
            let mut c = self.clients.session_internal.clone();
            let req = req.clone();
            async move { c.runner_started(req).await }
        })
        .await
        .map(|_| ())
    }

    async fn report(&self, point: MetricPoint) -> Result<()> {
        let req = RunnerReportRequest {
            name: self.name.clone(),
            point: Some(point),
        };
        with_retry("RunnerReport", RETRY_BUDGET, || {
            let mut c = self.clients.session_internal.clone();
            let req = req.clone();
            async move { c.runner_report(req).await }
        })
        .await
        .map(|_| ())
    }

    async fn save_checkpoint(
        &self,
        checkpoint: &str,
        summary_json: &str,
        dir: &Path,
    ) -> Result<()> {
        // An upload cannot be replayed from what was sent: each try packs the directory again and sends it
        // whole. The storage service answers a repeat of a save it already made with that save.
        Backoff::THROUGH_RESTART
            .with_budget(RETRY_BUDGET)
            .retry(
                "SaveCheckpoint",
                || self.save_checkpoint_once(checkpoint, summary_json, dir),
                TryFailed::transient,
            )
            .await
            .map_err(|e| {
                tracing::warn!(session = %self.name, %checkpoint, error = %e, "checkpoint not saved");
                e.into_error("SaveCheckpoint")
            })
    }

    async fn load_checkpoint(&self, session: &str, checkpoint: &str, dest: &Path) -> Result<()> {
        let req = PullCheckpointRequest {
            session: session.to_string(),
            checkpoint: checkpoint.to_string(),
        };
        // A download broken off by a restart of the storage service starts again, into an empty `dest`.
        Backoff::THROUGH_RESTART
            .with_budget(RETRY_BUDGET)
            .retry(
                "PullCheckpoint",
                || async {
                    archive::remove_tree(dest).await;
                    let stream = self
                        .clients
                        .storage
                        .clone()
                        .pull_checkpoint(req.clone())
                        .await
                        .map_err(TryFailed::Service)?
                        .into_inner();
                    extract_download("PullCheckpoint", stream, dest, ExtractLimits::CHECKPOINT)
                        .await
                        .map_err(TryFailed::of)
                },
                TryFailed::transient,
            )
            .await
            .map_err(|e| e.into_error("PullCheckpoint"))
    }

    async fn predictions(&self, predictions_json: String) -> Result<()> {
        let req = RunnerPredictionsRequest {
            session: self.name.clone(),
            predictions_json,
            submission_id: self.submission_id.clone(),
        };
        // Sent again only on `UNAVAILABLE`: the submission service scored nothing then.
        with_retry("RunnerPredictions", RETRY_BUDGET, || {
            let mut c = self.clients.submission_internal.clone();
            let req = req.clone();
            async move { c.runner_predictions(req).await }
        })
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[tokio::test(start_paused = true)]
    async fn retries_unavailable_then_succeeds() {
        let calls = AtomicU32::new(0);
        let got = with_retry("RunnerFinished", FINISH_BUDGET, || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 3 {
                    Err(tonic::Status::unavailable("restarting"))
                } else {
                    Ok(n)
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(got, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_on_other_errors_and_after_the_attempts() {
        let calls = AtomicU32::new(0);
        let err = with_retry("RunnerReport", RETRY_BUDGET, || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(tonic::Status::invalid_argument("bad point")) }
        })
        .await
        .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(err.reply_text(), "bad point");

        calls.store(0, Ordering::SeqCst);
        let err = with_retry("RunnerStarted", RETRY_BUDGET, || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(tonic::Status::unavailable("down")) }
        })
        .await
        .unwrap_err();
        // Retried through a restart of 30 s, with waits of at most 2 s.
        assert!(calls.load(Ordering::SeqCst) > 15);
        assert_eq!(err.to_string(), "RunnerStarted failed: down");
    }
}
