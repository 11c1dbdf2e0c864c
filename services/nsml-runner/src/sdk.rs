//! The Unix socket the Python SDK (`import nsml`) talks to from inside a session.
//!
//! Newline-delimited JSON: each request is one JSON object on one line, answered by one line, in order,
//! on any number of connections (threads and forked workers each open their own):
//!
//! ```text
//! {"op":"report","summary":bool,"scope":str|null,"step":int|null,"metrics":{...}}  -> {"ok":true}
//! {"op":"save","checkpoint":"NAME","path":"/abs/dir"}                              -> {"ok":true}
//! {"op":"load","checkpoint":"NAME","session":"TEAM/DATASET/N"|null}               -> {"ok":true,"path":"/abs/dir"}
//! {"op":"predictions","predictions":<json>}                                        -> {"ok":true}
//! ```
//!
//! A refusal is `{"ok":false,"error":"..."}` (a service's own message where a service refused). The
//! socket acts for its own session only: nothing in a request names the session it acts for.
//! `save` takes a directory inside the session directory only (checked after resolving symlinks),
//! read through a copy the session's own user makes in its sandbox, or, for the directories the SDK
//! makes itself, renamed out of the session's reach and read by descriptor (see [`CheckpointStager`]), and
//! is refused in submit sessions, which must not carry test inputs out; `load` reaches the checkpoints
//! of the session's own team only; `predictions` is accepted from submit sessions only.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nsml_proto::v1::{MetricPoint, SessionKind};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::{Result, RunnerError};
use crate::platform::Platform;
use crate::sandbox::CheckpointStager;

/// The longest request line accepted (predictions of a large test set); the gRPC limit is the same.
pub const MAX_REQUEST_BYTES: usize = nsml_common::clients::MAX_MESSAGE_BYTES;

/// Connections served at once; more are closed on arrival (each may buffer a request of up to
/// [`MAX_REQUEST_BYTES`], so the count bounds the runner's memory).
pub const MAX_CONNECTIONS: usize = 32;

/// What the SDK socket of one session knows about it.
pub struct SdkContext {
    /// `TEAM/DATASET/N`.
    pub name: String,
    pub kind: SessionKind,
    /// The session directory, canonical; `save` paths must lie inside it.
    pub session_dir: PathBuf,
    /// Where loaded checkpoints are extracted (`load-…` inside it): a directory the session can read
    /// but not write, so the runner never writes where the session could redirect it.
    pub tmp_dir: PathBuf,
    /// Directories not to be saved as checkpoints (the dataset).
    pub no_save: Vec<PathBuf>,
    pub platform: Arc<dyn Platform>,
    /// Copies a directory to save out of the session's reach before it is read.
    pub stager: CheckpointStager,
    last_summary: Mutex<String>,
}

impl SdkContext {
    /// A context for session `name`; paths are canonicalised here.
    pub fn new(
        name: String,
        kind: SessionKind,
        session_dir: &Path,
        tmp_dir: PathBuf,
        no_save: Vec<PathBuf>,
        platform: Arc<dyn Platform>,
        stager: CheckpointStager,
    ) -> Result<Self> {
        let canon = |p: &Path| {
            p.canonicalize()
                .map_err(|e| RunnerError::io(format!("cannot resolve {}", p.display()), e))
        };
        Ok(Self {
            name,
            kind,
            session_dir: canon(session_dir)?,
            tmp_dir,
            no_save: no_save
                .iter()
                .filter_map(|p| p.canonicalize().ok())
                .collect(),
            platform,
            stager,
            last_summary: Mutex::new("{}".to_string()),
        })
    }

    fn is_submit(&self) -> bool {
        matches!(self.kind, SessionKind::Submit | SessionKind::TrialSubmit)
    }

    /// The last `report(summary=True)` metrics, as JSON (`{}` before any).
    pub fn last_summary(&self) -> String {
        self.last_summary
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    Report {
        #[serde(default)]
        summary: bool,
        #[serde(default)]
        scope: Option<String>,
        #[serde(default)]
        step: Option<i64>,
        #[serde(default)]
        metrics: Map<String, Value>,
    },
    Save {
        checkpoint: String,
        path: String,
    },
    Load {
        checkpoint: String,
        #[serde(default)]
        session: Option<String>,
    },
    Predictions {
        predictions: Value,
    },
}

impl Request {
    /// The request's `op`, as the SDK names it.
    fn op(&self) -> &'static str {
        match self {
            Request::Report { .. } => "report",
            Request::Save { .. } => "save",
            Request::Load { .. } => "load",
            Request::Predictions { .. } => "predictions",
        }
    }
}

/// The SDK socket of one session, bound and ready to serve.
pub struct SdkServer {
    listener: UnixListener,
    path: PathBuf,
    ctx: Arc<SdkContext>,
}

impl SdkServer {
    /// Binds the socket at `path` (replacing a stale one).
    pub fn bind(path: &Path, ctx: SdkContext) -> Result<Self> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(RunnerError::io(
                    format!("cannot remove {}", path.display()),
                    e,
                ));
            }
            _ => {}
        }
        let listener = UnixListener::bind(path)
            .map_err(|e| RunnerError::io(format!("cannot listen on {}", path.display()), e))?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            ctx: Arc::new(ctx),
        })
    }

    /// The session context, shared with the connections.
    pub fn context(&self) -> Arc<SdkContext> {
        Arc::clone(&self.ctx)
    }

    /// Serves connections until `cancel` fires, then drops them and removes the socket file.
    pub async fn serve(self, cancel: CancellationToken) {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) if conns.len() >= MAX_CONNECTIONS => {
                        tracing::warn!(session = %self.ctx.name, "too many SDK connections, closing a new one");
                        drop(stream);
                    }
                    Ok((stream, _)) => {
                        let ctx = Arc::clone(&self.ctx);
                        let (r, w) = stream.into_split();
                        conns.spawn(serve_connection(r, w, ctx).in_current_span());
                    }
                    Err(e) => {
                        tracing::warn!(session = %self.ctx.name, error = %e, "SDK socket accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        conns.shutdown().await;
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads one `\n`-terminated line of at most `max` bytes; `Ok(None)` at the end of the stream.
async fn read_line<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    max: usize,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok((!line.is_empty()).then_some(line));
        }
        let (used, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(p) => {
                line.extend_from_slice(&buf[..p]);
                (p + 1, true)
            }
            None => {
                line.extend_from_slice(buf);
                (buf.len(), false)
            }
        };
        r.consume(used);
        if line.len() > max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("request longer than {max} bytes"),
            ));
        }
        if done {
            return Ok(Some(line));
        }
    }
}

/// Answers the requests of one connection in order until it closes.
pub async fn serve_connection<R, W>(r: R, mut w: W, ctx: Arc<SdkContext>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut r = BufReader::new(r);
    loop {
        let reply = match read_line(&mut r, MAX_REQUEST_BYTES).await {
            Ok(None) => return,
            Ok(Some(line)) if line.iter().all(u8::is_ascii_whitespace) => continue,
            Ok(Some(line)) => match serde_json::from_slice::<Request>(&line) {
                Ok(req) => match handle(&ctx, req)
                    .instrument(tracing::info_span!(
                        "sdk_request",
                        op = tracing::field::Empty
                    ))
                    .await
                {
                    Ok(extra) => {
                        let mut reply = json!({"ok": true});
                        if let (Some(obj), Value::Object(extra)) = (reply.as_object_mut(), extra) {
                            obj.extend(extra);
                        }
                        reply
                    }
                    Err(e) => json!({"ok": false, "error": e.reply_text()}),
                },
                Err(e) => json!({"ok": false, "error": format!("invalid request: {e}")}),
            },
            Err(e) => {
                let reply = json!({"ok": false, "error": format!("invalid request: {e}")});
                let _ = w.write_all(format!("{reply}\n").as_bytes()).await;
                return;
            }
        };
        if w.write_all(format!("{reply}\n").as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Carries out one request; the `Ok` value's fields are added to `{"ok":true}`.
async fn handle(ctx: &SdkContext, req: Request) -> Result<Value> {
    tracing::Span::current().record("op", req.op());
    match req {
        Request::Report {
            summary,
            scope,
            step,
            metrics,
        } => report(ctx, summary, scope, step, metrics).await,
        Request::Save { checkpoint, path } => save(ctx, &checkpoint, &path).await,
        Request::Load {
            checkpoint,
            session,
        } => load(ctx, &checkpoint, session).await,
        Request::Predictions { predictions } => {
            if !ctx.is_submit() {
                return Err(RunnerError::Refused(
                    "predictions are only accepted from a submit session (nsml submit runs your code with --mode test --pause 1)".into(),
                ));
            }
            ctx.platform.predictions(predictions.to_string()).await?;
            Ok(Value::Null)
        }
    }
}

/// `report`: records a metrics point; a summary one is kept as the summary of later checkpoints.
async fn report(
    ctx: &SdkContext,
    summary: bool,
    scope: Option<String>,
    step: Option<i64>,
    metrics: Map<String, Value>,
) -> Result<Value> {
    let metrics_json = Value::Object(metrics).to_string();
    let point = MetricPoint {
        at_ms: nsml_common::now_ms(),
        step: step.unwrap_or(0),
        summary,
        scope: scope.unwrap_or_default(),
        metrics_json: metrics_json.clone(),
    };
    // Every report is an event in the log: refuse an oversized one here, saying so to the program.
    nsml_common::bounds::Bounded::check_bounds(&point)
        .map_err(|s| RunnerError::Refused(format!("nsml.report: {}", s.message())))?;
    ctx.platform.report(point).await?;
    if summary {
        *ctx.last_summary.lock().unwrap_or_else(|e| e.into_inner()) = metrics_json;
    }
    Ok(Value::Null)
}

/// `save`: stores a directory of the session as checkpoint `checkpoint`, read once it is staged out of
/// the session's reach.
async fn save(ctx: &SdkContext, checkpoint: &str, path: &str) -> Result<Value> {
    if ctx.is_submit() {
        return Err(RunnerError::Refused(
            "checkpoints cannot be saved in a submit session".into(),
        ));
    }
    check_checkpoint(checkpoint)?;
    let dir = save_dir(ctx, path)?;
    // The SDK hands its own directories over once saved: they go, so sessions do not fill the
    // disk. One made directly in `ckpt-tmp` is renamed out of the session's reach, not copied;
    // anything else is copied as the session's user (and removed by the copy when it is the SDK's).
    let sdk_tmp = ctx.session_dir.join("ckpt-tmp");
    let consume = dir.starts_with(&sdk_tmp);
    let handed = match (dir.parent(), dir.file_name()) {
        (Some(parent), Some(name)) if parent == sdk_tmp => {
            ctx.stager.hand_over(parent, name).await?
        }
        _ => None,
    };
    let staged = match handed {
        Some(staged) => staged,
        None => ctx.stager.stage(&dir, consume).await?,
    };
    let saved = ctx
        .platform
        .save_checkpoint(checkpoint, &ctx.last_summary(), &staged.path)
        .await;
    staged.remove().await;
    saved?;
    Ok(Value::Null)
}

/// `load`: extracts a checkpoint of the session's own team where the session can read it, and
/// answers the path.
async fn load(ctx: &SdkContext, checkpoint: &str, session: Option<String>) -> Result<Value> {
    check_checkpoint(checkpoint)?;
    let session = session
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| ctx.name.clone());
    let wanted = nsml_common::names::SessionName::parse(&session)
        .map_err(|s| RunnerError::Refused(s.message().to_string()))?;
    // The services trust the runner, so the runner checks: a session loads its own team's
    // checkpoints only.
    let own_team = ctx.name.split('/').next().unwrap_or_default();
    if wanted.team != own_team {
        return Err(RunnerError::Refused(format!(
            "session {session} belongs to another team"
        )));
    }
    let dest = ctx
        .tmp_dir
        .join(format!("load-{}", uuid::Uuid::new_v4().simple()));
    ctx.platform
        .load_checkpoint(&session, checkpoint, &dest)
        .await?;
    Ok(json!({"path": dest.display().to_string()}))
}

fn check_checkpoint(name: &str) -> Result<()> {
    nsml_common::names::check_checkpoint(name)
        .map_err(|s| RunnerError::Refused(s.message().to_string()))
}

/// Resolves the directory a `save` names and checks it lies inside the session directory.
fn save_dir(ctx: &SdkContext, path: &str) -> Result<PathBuf> {
    let refuse = |why: &str| RunnerError::Refused(format!("cannot save `{path}`: {why}"));
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(refuse("the path must be absolute"));
    }
    let dir = p.canonicalize().map_err(|_| refuse("no such directory"))?;
    if !dir.starts_with(&ctx.session_dir) || dir == ctx.session_dir {
        return Err(refuse(
            "checkpoints must be saved from a directory inside the session directory",
        ));
    }
    if ctx
        .no_save
        .iter()
        .any(|n| dir.starts_with(n) || n.starts_with(&dir))
    {
        return Err(refuse("the dataset cannot be saved as a checkpoint"));
    }
    if !dir.is_dir() {
        return Err(refuse("not a directory"));
    }
    Ok(dir)
}
