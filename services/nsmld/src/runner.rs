//! `nsmld runner`: one session's runner as a process of its own, as a Slurm job runs it. It reaches the
//! platform only over gRPC, at the addresses and with the internal secret of its configuration file, and
//! keeps the session's files in a scratch directory of its own on the node.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use nsml_common::clients::{Clients, ServiceAddrs};
use nsml_common::tls::TlsSection;
use nsml_proto::v1::Session;
use prost::Message;
use serde::Deserialize;

use crate::deployment::{Listen, RunnerSection, override_from_env};

/// What a runner on a compute node reads from its configuration file. The platform's own configuration
/// file serves as well: what a runner does not need (the store, the bus) is ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct RunnerHost {
    /// The node's scratch directory: sessions' directories go under `DATA_DIR/runner/`.
    pub data_dir: PathBuf,
    pub internal_secret: String,
    /// Where the platform's services are reached.
    pub services: Listen,
    #[serde(default)]
    pub runner: RunnerSection,
    /// TLS to the services (`[tls]`, as in the platform's configuration): required when they serve TLS.
    #[serde(default)]
    pub tls: Option<TlsSection>,
}

impl RunnerHost {
    /// Reads the runner's configuration file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        nsml_runner::processes::check_private(path).map_err(anyhow::Error::msg)?;
        let text = std::fs::read_to_string(path).with_context(|| {
            format!("cannot read the runner's configuration {}", path.display())
        })?;
        let mut host: RunnerHost = toml::from_str(&text)
            .with_context(|| format!("invalid runner configuration {}", path.display()))?;
        // As `nsmld serve` does: a runner the session service starts shares its environment.
        override_from_env("NSML_INTERNAL_SECRET", &mut host.internal_secret);
        override_from_env("NSML_DATA_DIR", &mut host.data_dir);
        anyhow::ensure!(
            host.internal_secret.len() >= 16,
            "internal_secret must be at least 16 characters"
        );
        Ok(host)
    }

    /// Where the services are reached, over TLS when the configuration at `config` has a `[tls]` table
    /// (its relative paths read from the configuration's directory).
    pub fn addrs(&self, config: &Path) -> anyhow::Result<ServiceAddrs> {
        let tls = match &self.tls {
            Some(files) => Some(
                files
                    .load(std::path::absolute(config)?.parent())
                    .with_context(|| format!("invalid [tls] table in {}", config.display()))?,
            ),
            None => None,
        };
        let scheme = nsml_common::tls::scheme(tls.as_ref());
        Ok(ServiceAddrs {
            tls,
            ..ServiceAddrs::from_fn(|service| format!("{scheme}://{}", self.services.get(service)))
        })
    }
}

/// The session a job was started for, as the executor encoded it (hex of the `Session` message).
pub fn decode_session(spec: &str) -> anyhow::Result<Session> {
    let bytes = hex::decode(spec.trim()).context("--session is not the hex the executor writes")?;
    Session::decode(bytes.as_slice()).context("--session does not hold a session")
}

/// Runs the session `spec` names until its end is reported, holding the GPUs `gpus` names (else those of
/// its Slurm job, else the configuration's).
pub async fn run(
    config: &Path,
    spec: &str,
    time_limit_secs: u64,
    gpus: Option<&str>,
) -> anyhow::Result<()> {
    let host = RunnerHost::load(config)?;
    let session = decode_session(spec)?;
    let in_job = std::env::var("SLURM_JOB_ID").ok();
    let gpus = match (gpus, &in_job) {
        (Some(list), _) => nsml_runner::GpuSource::ids(list).with_context(|| {
            format!("--gpus takes `none` or GPU indices such as 0,1, not `{list}`")
        })?,
        // Inside a Slurm job, the runner holds exactly the GPUs Slurm allocated to the job.
        (None, Some(_)) => nsml_runner::GpuSource::from_slurm_job(|k| std::env::var(k).ok())?,
        (None, None) => host.runner.gpu_source()?,
    };
    let id = in_job.unwrap_or_else(|| format!("pid-{}", std::process::id()));
    let work_dir = host.data_dir.join("runner").join(format!("job-{id}"));
    let mut cfg = host.runner.local(work_dir.clone(), gpus)?;
    // The job's directory goes with the job; the environments it builds stay for the next sessions here.
    cfg.env_cache = Some(host.data_dir.join("runner").join("envs"));
    let addrs = host.addrs(config)?;
    let clients = Clients::new(&addrs, &host.internal_secret, "runner")?;
    tracing::info!(session = %session.name, work_dir = %work_dir.display(), "running a session");
    let exec = nsml_runner::LocalExecutor::new(cfg, clients);
    let result = nsml_runner::oneshot::run_one(exec, session, time_limit_secs).await;
    if let Err(e) = nsml_runner::archive::remove_tree_now(&work_dir) {
        tracing::warn!(path = %work_dir.display(), error = %e, "cannot remove the job's scratch directory");
    }
    result.map_err(anyhow::Error::from)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

    use nsml_common::service::Service;
    use nsml_common::tls::testing::TestCa;

    use super::RunnerHost;

    const HOST: &str = r#"data_dir = "/tmp/nsml-runner"
internal_secret = "0123456789abcdef0123"

[services]
auth = "10.0.0.5:7101"
storage = "10.0.0.5:7102"
session = "10.0.0.5:7103"
quota = "10.0.0.5:7104"
submission = "10.0.0.5:7105"
leaderboard = "10.0.0.5:7106"
"#;

    #[test]
    fn a_runner_with_a_tls_table_reaches_the_services_over_tls() {
        let dir = tempfile::tempdir().unwrap();
        TestCa::new("nsml test CA")
            .unwrap()
            .write(dir.path(), &["10.0.0.5"])
            .unwrap();
        let config = dir.path().join("runner.toml");
        let text = format!(
            "{HOST}\n[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\nca = \"ca.pem\"\nmutual = true\n"
        );
        let host: RunnerHost = toml::from_str(&text).unwrap();
        let addrs = host.addrs(&config).unwrap();
        assert_eq!(addrs.get(Service::Session), "https://10.0.0.5:7103");
        assert!(addrs.tls.as_ref().is_some_and(|t| t.mutual()));

        let plain: RunnerHost = toml::from_str(HOST).unwrap();
        let addrs = plain.addrs(&config).unwrap();
        assert_eq!(addrs.get(Service::Session), "http://10.0.0.5:7103");
        assert!(addrs.tls.is_none());
    }

    #[test]
    fn a_runner_whose_key_is_missing_says_which_file() {
        let dir = tempfile::tempdir().unwrap();
        TestCa::new("nsml test CA")
            .unwrap()
            .write(dir.path(), &["10.0.0.5"])
            .unwrap();
        let config = dir.path().join("runner.toml");
        let text =
            format!("{HOST}\n[tls]\ncert = \"cert.pem\"\nkey = \"gone.pem\"\nca = \"ca.pem\"\n");
        let host: RunnerHost = toml::from_str(&text).unwrap();
        let err = format!("{:#}", host.addrs(&config).unwrap_err());
        assert!(err.contains("tls.key"), "{err}");
        assert!(
            err.contains(&dir.path().join("gone.pem").display().to_string()),
            "{err}"
        );
    }
}
