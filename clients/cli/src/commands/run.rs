//! `run`: upload the working directory and start a training session.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use nsml_manifest::{CHUNK_SIZE, format_size};
use nsml_proto::v1::upload_code_chunk::Kind;
use nsml_proto::v1::{
    CodeSnapshot, FindCodeRequest, GetSessionRequest, RemoveRequest, Resources, RunRequest,
    Session, SessionStatus, StopRequest, UploadCodeChunk, UploadCodeMeta,
};
use sha2::{Digest as _, Sha256};

use super::Context;
use super::sessions::print_logs;
use crate::api::Api;
use crate::archive;
use crate::cli::RunArgs;
use crate::ignore::IgnoreRules;
use crate::known_code::KnownCode;
use crate::output::{session_ended, session_status};
use crate::{Exit, UsageError};

/// The host environment the entry's first line names, NSML's way: `#nsml: NAME` (empty without one).
fn entry_environment(entry: &Path) -> Result<String> {
    use std::io::{BufRead as _, Read as _};
    let file = std::fs::File::open(entry)
        .with_context(|| format!("cannot read the entry file {}", entry.display()))?;
    let mut first = String::new();
    // A first line that is not text names no environment.
    let _ = std::io::BufReader::new(file)
        .take(4096)
        .read_line(&mut first);
    Ok(first
        .trim()
        .strip_prefix("#nsml:")
        .map(|name| name.trim().to_string())
        .unwrap_or_default())
}

/// What `run` says when the team has the code already.
const UNCHANGED: &str = "Code unchanged since it was last uploaded: nothing to upload";

/// Uploads above this size get a warning: they are usually data or checkpoints that belong in `.nsmlignore`.
const LARGE_UPLOAD: usize = 10 * 1024 * 1024;

pub async fn run(ctx: &Context, args: RunArgs) -> Result<()> {
    let dir = args.dir.clone();
    if !dir.is_dir() {
        bail!(UsageError(format!("{} is not a directory", dir.display())));
    }
    println!(".nsmlignore check - start");
    let rules = load_rules(&dir)?;
    let collected = archive::collect(&dir, &rules)?;
    for (path, kind) in &collected.skipped {
        eprintln!("Warning: skipping {kind} {path}");
    }
    println!(".nsmlignore check - done");
    if !collected.contains_file(&args.entry) {
        bail!("entry file {} not found in {}", args.entry, dir.display());
    }
    let environment = entry_environment(&dir.join(&args.entry))?;
    // On the runtime's one thread, which has nothing else to do yet (the connection is made by the first
    // call): for an unchanged tree this reads the files and hashes them, which costs less than a thread.
    let packed = name_code(&dir, collected, &KnownCode::in_dir(ctx.store.dir()))?;
    let api = ctx.api()?;
    let request = RunRequest {
        dataset: args.dataset.clone(),
        entry: args.entry.clone(),
        args: args.args.clone(),
        resources: Some(Resources {
            gpus: args.gpus,
            cpus: args.cpus,
            memory_bytes: args.memory,
            shm_bytes: args.shm,
        }),
        memo: args.memo.clone(),
        code_snapshot: packed.id.clone(),
        interactive: args.interactive,
        environment,
        code_unconfirmed: false,
    };
    // Code this machine packed before is likely uploaded: one call checks that and starts the session.
    let started = if packed.upload.is_none() {
        run_if_code_known(&api, &request).await?
    } else {
        None
    };
    let session = match started {
        Some(session) => {
            println!("{UNCHANGED}");
            session
        }
        None => {
            let snapshot = stored_snapshot(ctx, &api, &args.dataset, &dir, packed).await?;
            api.session()
                .run(RunRequest {
                    code_snapshot: snapshot.id,
                    ..request
                })
                .await?
                .into_inner()
        }
    };
    println!("Session {} is started", session.name);
    if args.interactive {
        return interact(&api, &session.name).await;
    }
    Ok(())
}

fn load_rules(dir: &Path) -> Result<IgnoreRules> {
    let path = dir.join(".nsmlignore");
    match std::fs::read_to_string(&path) {
        Ok(text) => IgnoreRules::parse(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(IgnoreRules::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// The code of a directory as `run` names it: the snapshot id it uploads as, and the gzip'd archive when it
/// had to be packed to learn that id.
struct Packed {
    /// SHA-256 of the plain tar (see [`archive::digest`]).
    digest: String,
    /// SHA-256 of the gzip'd tar: the snapshot's id.
    id: String,
    upload: Option<Vec<u8>>,
    collected: archive::Collected,
}

/// Names the collected code of `dir`. The snapshot id is the SHA-256 of the gzip'd archive, whose bytes depend on
/// the plain tar's bytes alone (names, modes, modification times and contents); an id remembered for the plain
/// tar's digest is that id without compressing anything. Blocks: it reads every file.
fn name_code(dir: &Path, collected: archive::Collected, known: &KnownCode) -> Result<Packed> {
    let digest = archive::digest(dir, &collected)?;
    if let Some(id) = known.get(&digest) {
        return Ok(Packed {
            digest,
            id,
            upload: None,
            collected,
        });
    }
    // The digest remembered is the one of the tar compressed: a file changed since it was hashed above must not
    // lend its old content's digest to the new content's id.
    let (digest, upload) = archive::pack(dir, &collected)?;
    let id = hex::encode(Sha256::digest(&upload));
    known.remember(&digest, &id);
    Ok(Packed {
        digest,
        id,
        upload: Some(upload),
        collected,
    })
}

/// Starts the session if the team has the code `request` names, checked by the same call
/// (`RunRequest.code_unconfirmed`); `None` when it has not, or may not have (the server says NOT_FOUND): the
/// code is then looked for and uploaded as for code packed for the first time, and whatever the refusal was
/// about (a dataset that does not exist) is said by those calls, as it was before.
async fn run_if_code_known(api: &Api, request: &RunRequest) -> Result<Option<Session>> {
    let request = RunRequest {
        code_unconfirmed: true,
        ..request.clone()
    };
    match api.session().run(request).await {
        Ok(session) => Ok(Some(session.into_inner())),
        Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
        Err(status) => Err(status.into()),
    }
}

/// The team's snapshot of the packed code: found when the team uploaded it before, uploaded otherwise.
async fn stored_snapshot(
    ctx: &Context,
    api: &Api,
    dataset: &str,
    dir: &Path,
    packed: Packed,
) -> Result<CodeSnapshot> {
    if let Some(snapshot) = find_code(api, dataset, &packed.id).await? {
        println!("{UNCHANGED}");
        return Ok(snapshot);
    }
    let (digest, upload) = match packed.upload {
        Some(upload) => (packed.digest, upload),
        None => {
            let (dir, collected) = (dir.to_path_buf(), packed.collected);
            tokio::task::spawn_blocking(move || archive::pack(&dir, &collected))
                .await
                .context("packing the upload stopped")??
        }
    };
    if upload.len() > LARGE_UPLOAD {
        eprintln!(
            "Warning: the upload is {}, over 10 MB; consider .nsmlignore",
            format_size(upload.len() as u64)
        );
    }
    let snapshot = upload_code(api, dataset, upload).await?;
    // Storage names the snapshot by the bytes it received; that is the id to remember.
    KnownCode::in_dir(ctx.store.dir()).remember(&digest, &snapshot.id);
    Ok(snapshot)
}

/// The team's snapshot `id` of code for `dataset`, if it uploaded that code before; `None` also from a server
/// that cannot say (one older than `FindCode`), which then gets the upload.
async fn find_code(api: &Api, dataset: &str, id: &str) -> Result<Option<CodeSnapshot>> {
    let request = FindCodeRequest {
        dataset: dataset.to_string(),
        id: id.to_string(),
    };
    match api.storage().find_code(request).await {
        Ok(found) => Ok(Some(found.into_inner())),
        Err(status)
            if matches!(
                status.code(),
                tonic::Code::NotFound | tonic::Code::Unimplemented
            ) =>
        {
            Ok(None)
        }
        Err(status) => Err(status.into()),
    }
}

/// Streams the archive to `StorageService.UploadCode`: a `meta` message, then chunks, with a progress bar on a
/// terminal.
async fn upload_code(api: &Api, dataset: &str, archive: Vec<u8>) -> Result<CodeSnapshot> {
    let bar = progress_bar(archive.len() as u64);
    let total = archive.len();
    let meta = UploadCodeChunk {
        kind: Some(Kind::Meta(UploadCodeMeta {
            dataset: dataset.to_string(),
        })),
    };
    let counter = bar.clone();
    let data = futures::stream::iter((0..total).step_by(CHUNK_SIZE)).map(move |start| {
        let end = (start + CHUNK_SIZE).min(total);
        counter.inc((end - start) as u64);
        UploadCodeChunk {
            kind: Some(Kind::Data(archive[start..end].to_vec())),
        }
    });
    let stream = futures::stream::iter([meta]).chain(data);
    let result = api.storage().upload_code(stream).await;
    bar.finish_and_clear();
    Ok(result?.into_inner())
}

/// Returns a byte progress bar drawn on stderr, or a hidden one when stderr is not a terminal.
pub fn progress_bar(total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("Uploading [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// `run -i`: follows the output until the session ends (Ctrl-C stops it), then removes it; fails when the
/// session did.
async fn interact(api: &Api, name: &str) -> Result<()> {
    let mut stopping = false;
    let follow = print_logs(api, name, true);
    tokio::pin!(follow);
    loop {
        tokio::select! {
            result = &mut follow => { result?; break; }
            _ = tokio::signal::ctrl_c(), if !stopping => {
                stopping = true;
                eprintln!("Stopping {name}");
                api.session().stop(StopRequest { name: name.to_string() }).await?;
            }
        }
    }
    // The log stream ends with the session; give the final status a moment to be recorded.
    let mut ended = get_session(api, name).await?;
    for _ in 0..60 {
        if session_ended(ended.status()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        ended = get_session(api, name).await?;
    }
    let failed = ended.status() == SessionStatus::Failed || ended.exit_code != 0;
    if failed {
        let reason = if ended.reason.is_empty() {
            String::new()
        } else {
            format!(": {}", crate::output::clean(&ended.reason))
        };
        eprintln!("Session {name} ended {}{reason}", session_status(&ended));
    }
    let removed = api
        .session()
        .remove(RemoveRequest {
            pattern: name.to_string(),
            force: true,
        })
        .await?
        .into_inner();
    for name in removed.removed {
        println!("Removed {name}");
    }
    if failed {
        bail!(Exit(1));
    }
    Ok(())
}

async fn get_session(api: &Api, name: &str) -> Result<Session> {
    let request = GetSessionRequest {
        name: name.to_string(),
    };
    Ok(api.session().get(request).await?.into_inner())
}
