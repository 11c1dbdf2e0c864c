//! Competition manifests applied at start-up (`--competition FILE`): `nsmld up` applies them once its
//! services are up; in a distributed deployment the process that runs the gateway applies them, once the
//! services behind it answer and the auth service has written the host token.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nsml_manifest::{Manifest, ManifestError};

use crate::deployment::ServiceName;

/// How long a process waits for the rest of its deployment (the host token, the services behind the gateway)
/// before giving up on a manifest: the other processes may be replaying a long log.
const WAIT: Duration = Duration::from_secs(600);

/// How often it looks again meanwhile.
const POLL: Duration = Duration::from_millis(500);

/// A manifest read at start-up, with the file it came from.
pub struct Competition {
    path: PathBuf,
    manifest: Manifest,
}

/// Reads the manifests given to `nsmld serve SERVICES --competition FILE…`, before anything starts: a wrong
/// one, or one given to a process without the gateway, stops the start.
pub fn load_for_serve(
    services: &[ServiceName],
    paths: &[PathBuf],
) -> anyhow::Result<Vec<Competition>> {
    anyhow::ensure!(
        paths.is_empty() || services.contains(&ServiceName::Gateway),
        "--competition applies manifests through the gateway: give it to the `nsmld serve` process that runs \
         `gateway`"
    );
    paths
        .iter()
        .map(|path| {
            let manifest = nsml_manifest::load(path)
                .with_context(|| format!("cannot load the competition {}", path.display()))?;
            Ok(Competition {
                path: path.clone(),
                manifest,
            })
        })
        .collect()
}

/// The host token: `NSML_TOKEN` when set, else the file the auth service writes, once it is there.
fn host_token(token_path: &Path) -> Option<String> {
    std::env::var("NSML_TOKEN")
        .ok()
        .or_else(|| std::fs::read_to_string(token_path).ok())
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
}

/// Whether applying may work if tried again: a service behind the gateway is not up yet, or the token read
/// is one an earlier deployment left, about to be replaced by the auth service.
fn worth_retrying(err: &ManifestError) -> bool {
    matches!(
        err,
        ManifestError::Rpc { source, .. } if matches!(
            source.code(),
            tonic::Code::Unavailable | tonic::Code::Unauthenticated | tonic::Code::DeadlineExceeded
        )
    )
}

/// Applies each competition through the gateway at `url` with the host token at `token_path` (or
/// `NSML_TOKEN`), waiting up to ten minutes for the token and for the services to answer. Applying a
/// manifest again changes nothing that it already set.
pub async fn apply_when_ready(
    url: &str,
    token_path: &Path,
    competitions: &[Competition],
) -> anyhow::Result<()> {
    let channel = nsml_common::clients::channel("gateway", url)?;
    let deadline = Instant::now() + WAIT;
    for Competition { path, manifest } in competitions {
        for warning in manifest.warnings() {
            tracing::warn!(competition = %path.display(), "{warning}");
        }
        let applied = loop {
            let Some(token) = host_token(token_path) else {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "cannot apply the competition {}: no host token at {} after {} s; the auth service \
                     writes it into its data directory, so run the gateway where it can read that file, or \
                     set NSML_TOKEN to the host token",
                    path.display(),
                    token_path.display(),
                    WAIT.as_secs()
                );
                tokio::time::sleep(POLL).await;
                continue;
            };
            match nsml_manifest::apply(channel.clone(), &token, manifest).await {
                Ok(c) => break c,
                Err(e) if worth_retrying(&e) && Instant::now() < deadline => {
                    tracing::debug!(competition = %path.display(), error = %e, "the platform cannot take the competition yet");
                    tokio::time::sleep(POLL).await;
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot apply the competition {}", path.display())
                    });
                }
            }
        };
        println!(
            "competition `{}` applied from {}",
            applied.id,
            path.display()
        );
    }
    Ok(())
}
