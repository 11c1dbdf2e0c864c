//! Talking to a deployment's gateway over gRPC directly, for tests and benchmarks that need many calls at
//! once (races) or precise timings, where starting a CLI process per call would be the measurement.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, ensure};
use nsml_proto::v1::session_service_client::SessionServiceClient;
use nsml_proto::v1::storage_service_client::StorageServiceClient;
use nsml_proto::v1::submission_service_client::SubmissionServiceClient;
use nsml_proto::v1::{
    GetSessionRequest, GetSubmissionRequest, LoginRequest, LogsRequest, Resources, RunRequest,
    Session, SessionStatus, StopRequest, Submission, SubmissionStatus, SubmitRequest,
    UploadCodeChunk, UploadCodeMeta, auth_service_client::AuthServiceClient, upload_code_chunk,
};
use tokio_stream::StreamExt as _;
use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::repo_root;

/// A gzip'd tar of the given files, as the CLI uploads code.
pub fn tar_gz(files: &[(&str, &str)]) -> anyhow::Result<Vec<u8>> {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (name, body) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, body.as_bytes())?;
    }
    Ok(b.into_inner()?.finish()?)
}

/// Wraps a message with a bearer token.
pub fn authed<T>(msg: T, token: &str) -> anyhow::Result<Request<T>> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}"))?,
    );
    Ok(r)
}

/// A signed-in user's connection to the gateway.
#[derive(Clone)]
pub struct Client {
    pub channel: Channel,
    pub token: String,
}

/// Resources small enough for a CPU-only test machine.
pub fn small() -> Resources {
    Resources {
        gpus: 0,
        cpus: 1,
        memory_bytes: 1 << 30,
        shm_bytes: 64 << 20,
    }
}

impl Client {
    /// Logs in through the gateway.
    pub async fn login(url: &str, user: &str, password: &str) -> anyhow::Result<Self> {
        let channel = tonic::transport::Endpoint::from_shared(url.to_string())?
            .tcp_nodelay(true)
            .connect()
            .await?;
        let token = AuthServiceClient::new(channel.clone())
            .login(LoginRequest {
                username: user.into(),
                password: password.into(),
            })
            .await?
            .into_inner()
            .token;
        Ok(Self { channel, token })
    }

    /// Uploads code for `dataset`; returns the snapshot id.
    pub async fn upload(&self, dataset: &str, files: &[(&str, &str)]) -> anyhow::Result<String> {
        let chunks = vec![
            UploadCodeChunk {
                kind: Some(upload_code_chunk::Kind::Meta(UploadCodeMeta {
                    dataset: dataset.into(),
                })),
            },
            UploadCodeChunk {
                kind: Some(upload_code_chunk::Kind::Data(tar_gz(files)?)),
            },
        ];
        Ok(StorageServiceClient::new(self.channel.clone())
            .upload_code(authed(tokio_stream::iter(chunks), &self.token)?)
            .await?
            .into_inner()
            .id)
    }

    /// Uploads the example baseline for `dataset`.
    pub async fn upload_baseline(&self, dataset: &str) -> anyhow::Result<String> {
        let main = std::fs::read_to_string(repo_root().join("examples/baseline/main.py"))?;
        self.upload(dataset, &[("main.py", &main)]).await
    }

    /// Starts a session.
    pub async fn run(
        &self,
        dataset: &str,
        snapshot: &str,
        args: &str,
        resources: Resources,
    ) -> Result<Session, tonic::Status> {
        let req = authed(
            RunRequest {
                dataset: dataset.into(),
                entry: "main.py".into(),
                args: args.into(),
                code_snapshot: snapshot.into(),
                resources: Some(resources),
                ..Default::default()
            },
            &self.token,
        )
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
        SessionServiceClient::new(self.channel.clone())
            .run(req)
            .await
            .map(|r| r.into_inner())
    }

    /// Waits for a session to end.
    pub async fn wait_session(&self, name: &str) -> anyhow::Result<Session> {
        self.wait_ended(name, Some(600)).await
    }

    /// Polls a session every 100 ms until it has ended, at most `polls` times (`None`: for as long as it takes,
    /// for a bench whose session's slowness is what it measures).
    pub async fn wait_ended(&self, name: &str, polls: Option<usize>) -> anyhow::Result<Session> {
        for _ in 0..polls.unwrap_or(usize::MAX) {
            let s = SessionServiceClient::new(self.channel.clone())
                .get(authed(
                    GetSessionRequest { name: name.into() },
                    &self.token,
                )?)
                .await?
                .into_inner();
            if matches!(
                s.status(),
                SessionStatus::Exited | SessionStatus::Failed | SessionStatus::Stopped
            ) {
                return Ok(s);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("session {name} did not end")
    }

    /// Every line a session has printed so far.
    pub async fn log_lines(&self, name: &str) -> anyhow::Result<Vec<String>> {
        let mut logs = SessionServiceClient::new(self.channel.clone())
            .logs(authed(
                LogsRequest {
                    name: name.into(),
                    follow: false,
                },
                &self.token,
            )?)
            .await?
            .into_inner();
        let mut lines = Vec::new();
        while let Some(line) = logs.next().await {
            lines.push(line?.text);
        }
        Ok(lines)
    }

    /// Waits for a session to be running.
    pub async fn wait_running(&self, name: &str) -> anyhow::Result<()> {
        for _ in 0..600 {
            let s = SessionServiceClient::new(self.channel.clone())
                .get(authed(
                    GetSessionRequest { name: name.into() },
                    &self.token,
                )?)
                .await?
                .into_inner();
            match s.status() {
                SessionStatus::Running => return Ok(()),
                SessionStatus::Queued => tokio::time::sleep(Duration::from_millis(50)).await,
                other => anyhow::bail!("session {name} is {other:?}: {}", s.reason),
            }
        }
        anyhow::bail!("session {name} never ran")
    }

    /// Stops a session.
    pub async fn stop(&self, name: &str) -> anyhow::Result<Session> {
        Ok(SessionServiceClient::new(self.channel.clone())
            .stop(authed(StopRequest { name: name.into() }, &self.token)?)
            .await?
            .into_inner())
    }

    /// Submits a checkpoint.
    pub async fn submit(
        &self,
        session: &str,
        checkpoint: &str,
        trial: bool,
    ) -> Result<Submission, tonic::Status> {
        let req = authed(
            SubmitRequest {
                session: session.into(),
                checkpoint: checkpoint.into(),
                trial,
            },
            &self.token,
        )
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
        SubmissionServiceClient::new(self.channel.clone())
            .submit(req)
            .await
            .map(|r| r.into_inner())
    }

    /// Waits for a submission to end; requires it scored.
    pub async fn wait_scored(&self, id: &str) -> anyhow::Result<Submission> {
        for _ in 0..600 {
            let s = SubmissionServiceClient::new(self.channel.clone())
                .get(authed(GetSubmissionRequest { id: id.into() }, &self.token)?)
                .await?
                .into_inner();
            match s.status() {
                SubmissionStatus::Scored => return Ok(s),
                SubmissionStatus::Failed | SubmissionStatus::TimedOut => {
                    anyhow::bail!("submission {id} ended as {:?}: {}", s.status(), s.reason)
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        anyhow::bail!("submission {id} did not end")
    }

    /// Trains the baseline for one epoch; returns the session name (its checkpoint `0` exists).
    pub async fn trained(&self, dataset: &str) -> anyhow::Result<String> {
        let snap = self.upload_baseline(dataset).await?;
        let s = self.run(dataset, &snap, "--epochs 1", small()).await?;
        let done = self.wait_session(&s.name).await?;
        ensure!(
            done.status() == SessionStatus::Exited,
            "training {} ended as {:?}: {}",
            s.name,
            done.status(),
            done.reason
        );
        Ok(s.name)
    }
}

/// Writes a copy of the example competition with a different id and submit interval, its dataset paths made
/// absolute; returns the manifest's path.
pub fn example_with_interval(dir: &Path, interval: &str) -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string(repo_root().join("examples/competition.toml"))?;
    let datasets = repo_root().join("examples/datasets");
    let text = text
        .replace(
            "path = \"datasets/",
            &format!("path = \"{}/", datasets.display()),
        )
        .replace(
            "submit_interval = \"1h\"",
            &format!("submit_interval = \"{interval}\""),
        );
    ensure!(
        text.contains(interval),
        "the example manifest's interval line changed"
    );
    let path = dir.join("competition.toml");
    std::fs::write(&path, text).context("writing the manifest")?;
    Ok(path)
}
