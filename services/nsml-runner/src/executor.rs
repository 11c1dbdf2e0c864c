//! The local executor: runs each session as a child process on this machine.
//!
//! For every started session a task lays out the session directory, fetches what the session needs
//! from storage, takes its GPUs, makes its cgroup, runs the entry in its sandbox through
//! [`run_process`], flushes the logs, reports the finish (retried through a service restart) and
//! removes the directory.
//!
//! ```text
//! WORK_DIR/
//!   datasets/DATASET/PART-VERSION/   extracted dataset parts, shared by sessions (copied, never linked)
//!   sessions/TEAM/DATASET/N/         HOME, NSML_SESSION_DIR: writable by the session (its own uid)
//!     code/                          the code snapshot; the entry's working directory (read-only)
//!     data/                          NSML_DATASET_PATH: train/... or test/test_data (read-only)
//!     ckpt/                          NSML_CHECKPOINT_DIR: the submitted checkpoint (read-only)
//!     tmp/                           TMPDIR
//!     nsml.sock                      NSML_SOCKET: the SDK socket
//!   loads/ID/                        checkpoints loaded through the SDK (read-only to the session,
//!                                    written by the runner only, out of the session's reach)
//!   sockets/                         SDK sockets of sessions whose path would be too long for a socket
//!   staging/ID/                      a checkpoint being saved, copied there by the session's user
//!   sandbox/                         the sandbox's /etc/passwd and /etc/group
//! ```
//!
//! Inside the sandbox these paths are the same as outside; nothing else of `WORK_DIR` exists there.
//!
//! # What outlives a session
//!
//! Nothing of a session's directory, its `loads/` entry or its socket is needed once the session
//! ends: its logs, metrics, checkpoints and predictions are in the services by then (each SDK call
//! answers only after the service has what it sent), so all of it is removed at every end (exit,
//! failure, stop, a failed setup) before the finish is reported. What a failed removal leaves is
//! removed by `nsml rm` ([`Executor::remove`]); what a runner killed outright leaves (and the
//! processes and cgroups of its sessions, see [`crate::cgroup`]) is removed when the next runner
//! starts on the same `WORK_DIR`, before it lays out any session. `WORK_DIR` belongs to one runner.

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::FutureExt;
use nsml_common::clients::{Clients, datasets};
use nsml_common::executor::Executor;
use nsml_proto::internal::v1::RunnerFinishedRequest;
use nsml_proto::v1::{
    DatasetPart, DownloadCodeRequest, GetDatasetRequest, PullCheckpointRequest, Resources, Session,
    SessionKind,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::archive::{self, ExtractLimits};
use crate::args::entry_args;
use crate::cgroup::{CgroupLimits, SessionCgroup};
use crate::dataset::{normalize_part, part_for, part_slug};
use crate::environment::{
    EnvRequest, EnvironmentCache, PreparedEnv, python_version, read_requirements,
};
use crate::error::{Result, RunnerError};
use crate::gpu::{GpuInventory, GpuLease};
use crate::launch::{EnvSpec, LaunchSpec, build_command, session_env};
use crate::limits::LimitsConfig;
use crate::logs::{LogSender, forward_logs};
use crate::platform::{FINISH_BUDGET, GrpcPlatform, Platform, extract_download, with_retry};
use crate::process::{
    Confinement, DiskWatch, ProcessOutcome, ProcessSpec, STOP_GRACE, run_process,
};
use crate::sandbox::{CheckpointStager, SandboxHost, SandboxSpec, dev_entries, gpu_device_nodes};
use crate::sdk::SdkContext;

/// The longest socket path used; the kernel's limit is 107 bytes.
const MAX_SOCKET_PATH: usize = 100;

/// How the local executor runs sessions.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Sessions under `work_dir/sessions/TEAM/DATASET/N`, the dataset cache under `work_dir/datasets`.
    pub work_dir: PathBuf,
    /// The Python interpreter, looked up on `PATH` (default `python3`).
    pub python: String,
    /// The directory holding the `nsml` Python package; it is the child's `PYTHONPATH`.
    pub sdk_path: PathBuf,
    /// The GPUs sessions are given.
    pub gpus: GpuInventory,
    /// The runner's own limits on every session (processes, disk, log volume).
    pub limits: LimitsConfig,
    /// CPUs all sessions on this machine may hold at once (`None`: no limit beyond the teams' quotas).
    pub cpus: Option<u32>,
    /// Where environments built from sessions' `requirements.txt` are cached (`None`: `work_dir/envs`).
    /// Runners of one machine may share it: builds and evictions lock ([`crate::environment`]).
    pub env_cache: Option<PathBuf>,
}

impl RunnerConfig {
    /// A configuration with `python3`, the GPUs `nvidia-smi` lists and the default limits.
    pub fn new(work_dir: PathBuf, sdk_path: PathBuf) -> Self {
        Self {
            work_dir,
            python: "python3".to_string(),
            sdk_path,
            gpus: GpuInventory::detect(),
            limits: LimitsConfig::default(),
            cpus: None,
            env_cache: None,
        }
    }
}

/// Tells the session service, every few seconds, which sessions' runners are alive, until the executor is
/// dropped; a session whose runner goes silent is failed there, so it holds nothing.
async fn heartbeats(exec: Weak<LocalExecutor>) {
    let mut tick = tokio::time::interval(nsml_common::executor::HEARTBEAT_EVERY);
    loop {
        tick.tick().await;
        let Some(me) = exec.upgrade() else {
            return;
        };
        let names: Vec<String> = me.live().keys().cloned().collect();
        let mut session = me.clients.session_internal.clone();
        drop(me);
        if names.is_empty() {
            continue;
        }
        let req = nsml_proto::internal::v1::RunnerHeartbeatRequest { names };
        if let Err(status) = session.runner_heartbeat(req).await {
            tracing::warn!(%status, "cannot report the runner's heartbeat");
        }
    }
}

/// Held while one dataset part is fetched into the cache or copied out of it.
type PartLock = Arc<tokio::sync::Mutex<()>>;

/// Runs sessions as child processes of this process.
pub struct LocalExecutor {
    /// This executor, for the tasks it spawns (`Executor::start` only gets `&self`).
    me: Weak<LocalExecutor>,
    cfg: RunnerConfig,
    clients: Clients,
    live: Mutex<HashMap<String, CancellationToken>>,
    /// Sessions started and not yet through reporting their finish.
    unfinished: Mutex<HashSet<String>>,
    /// Why sessions were stopped, where the stop did not come from the platform (`stop_because`).
    stop_reasons: Mutex<HashMap<String, String>>,
    dataset_locks: Mutex<HashMap<(String, i32), PartLock>>,
    /// What this machine offers the sandbox, found at start (and again after a failure, so
    /// installing bubblewrap needs no restart).
    sandbox: tokio::sync::OnceCell<Arc<SandboxHost>>,
    /// Python environments built from sessions' `requirements.txt`, under `work_dir/envs`.
    envs: EnvironmentCache,
    /// Set once what earlier runners left is gone; sessions are laid out only after.
    swept: tokio::sync::OnceCell<()>,
}

/// The paths of one session's directory.
#[derive(Debug, Clone)]
struct SessionDirs {
    root: PathBuf,
    code: PathBuf,
    data: PathBuf,
    ckpt: PathBuf,
    tmp: PathBuf,
    loads: PathBuf,
    socket: PathBuf,
}

impl SessionDirs {
    fn new(root: PathBuf, work_dir: &Path, session: &Session) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let mut socket = root.join("nsml.sock");
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            socket = work_dir.join("sockets").join(format!("{id}.sock"));
        }
        Self {
            code: root.join("code"),
            data: root.join("data"),
            ckpt: root.join("ckpt"),
            tmp: root.join("tmp"),
            loads: work_dir
                .join("loads")
                .join(format!("{}{id}", loads_prefix(session))),
            socket,
            root,
        }
    }
}

impl SessionDirs {
    /// Makes the session's directories afresh (whatever a session of the same name left goes first).
    async fn lay_out(&self) -> Result<()> {
        archive::remove_tree(&self.root).await;
        for d in [&self.root, &self.tmp, &self.ckpt, &self.loads] {
            std::fs::create_dir_all(d)
                .map_err(|e| RunnerError::io(format!("cannot create {}", d.display()), e))?;
        }
        if let Some(parent) = self.socket.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| RunnerError::io(format!("cannot create {}", parent.display()), e))?;
        }
        Ok(())
    }

    /// Hands the session directory and TMPDIR to the sandbox's user, who writes as the session; the
    /// code, data and checkpoint stay the runner's, and are mounted read-only anyway.
    fn hand_over(&self, host: &SandboxHost) -> Result<()> {
        if let Some((uid, gid)) = host.owner() {
            for d in [&self.root, &self.tmp] {
                std::os::unix::fs::chown(d, Some(uid), Some(gid)).map_err(|e| {
                    RunnerError::io(format!("cannot hand {} to the sandbox", d.display()), e)
                })?;
            }
        }
        Ok(())
    }

    /// The session's sandbox: its directory writable, what it reads (code, data, checkpoint, loaded
    /// checkpoints, the SDK) read-only, its GPUs' device nodes, and its cgroup.
    fn sandbox(
        &self,
        host: Arc<SandboxHost>,
        sdk_path: PathBuf,
        lease: &GpuLease,
        resources: &Resources,
        cgroup: &SessionCgroup,
    ) -> SandboxSpec {
        SandboxSpec {
            host,
            writable: vec![self.root.clone()],
            read_only: vec![
                self.code.clone(),
                self.data.clone(),
                self.ckpt.clone(),
                self.loads.clone(),
                sdk_path,
            ],
            socket: self.socket.clone(),
            devices: gpu_device_nodes(&dev_entries(), lease.ids()),
            shm_bytes: resources.shm_bytes,
            tmp_bytes: resources.memory_bytes,
            cgroup_join: cgroup.join_files(),
        }
    }
}

/// What a prepared session runs with: its launch, its GPUs, its cgroup and the cached environment it
/// holds (kept from eviction while it runs).
type Prepared = (LaunchSpec, GpuLease, SessionCgroup, Option<PreparedEnv>);

/// The interpreter a session runs with, what of it the sandbox must mount, and the cached environment
/// it holds.
struct SessionPython {
    executable: PathBuf,
    /// Bound read-only at the same path.
    mounts: Vec<PathBuf>,
    environment: Option<PreparedEnv>,
}

impl SessionPython {
    /// `PATH` inside the sandbox: the environment's `bin` first, where there is one.
    fn search_path(&self, host: &SandboxHost) -> String {
        match &self.environment {
            Some(env) => format!("{}:{}", env.root.join("bin").display(), host.search_path()),
            None => host.search_path(),
        }
    }
}

/// The time limit as the session is told it ended: `the inference must finish within N seconds`.
fn time_limit_text(kind: SessionKind, secs: u64) -> String {
    if is_submit(kind) {
        format!("the inference must finish within {secs} seconds")
    } else {
        format!("the session must finish within {secs} seconds")
    }
}

/// The start of the names of a session's `loads/` entries: `TEAM.DATASET.N.` (names have no `.`,
/// so no other session's entries start the same).
fn loads_prefix(session: &Session) -> String {
    format!("{}.{}.{}.", session.team, session.dataset, session.number)
}

/// Removes what runners before this one left in `work_dir`: session directories, loaded
/// checkpoints, sockets, checkpoint staging and half-fetched dataset parts. Runs before this runner
/// lays out any session, so all of it is a dead session's.
fn remove_leftovers(work_dir: &Path) -> usize {
    let mut removed = 0;
    let mut remove = |path: PathBuf| match archive::remove_tree_now(&path) {
        Ok(()) => removed += 1,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove what an earlier runner left")
        }
    };
    for area in ["sessions", "loads", "sockets", "staging"] {
        if let Ok(entries) = std::fs::read_dir(work_dir.join(area)) {
            entries.flatten().for_each(|e| remove(e.path()));
        }
    }
    if let Ok(datasets) = std::fs::read_dir(work_dir.join("datasets")) {
        for dataset in datasets.flatten() {
            if let Ok(parts) = std::fs::read_dir(dataset.path()) {
                parts
                    .flatten()
                    .filter(|p| p.file_name().to_string_lossy().starts_with('.'))
                    .for_each(|p| remove(p.path()));
            }
        }
    }
    removed
}

/// Checks that `entry` names a file inside `code` (after resolving links) and returns it relative.
fn check_entry(code: &Path, entry: &str) -> Result<PathBuf> {
    let missing = || RunnerError::EntryNotFound {
        entry: entry.to_string(),
    };
    let rel = Path::new(entry);
    if entry.is_empty()
        || !rel
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(missing());
    }
    let code = code.canonicalize().map_err(|_| missing())?;
    let full = code.join(rel).canonicalize().map_err(|_| missing())?;
    if !full.starts_with(&code) || !full.is_file() {
        return Err(missing());
    }
    Ok(rel.to_path_buf())
}

/// A session with only the parts of its name `TEAM/DATASET/N` filled in.
fn session_of(name: &str) -> Result<Session> {
    let bad = || RunnerError::Session {
        name: name.to_string(),
        why: "a session name is TEAM/DATASET/NUMBER".into(),
    };
    let mut parts = name.split('/');
    let (Some(team), Some(dataset), Some(number), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    Ok(Session {
        name: name.to_string(),
        team: team.to_string(),
        dataset: dataset.to_string(),
        number: number.parse().map_err(|_| bad())?,
        ..Default::default()
    })
}

fn is_submit(kind: SessionKind) -> bool {
    matches!(kind, SessionKind::Submit | SessionKind::TrialSubmit)
}

impl LocalExecutor {
    /// An executor running sessions with `cfg`, talking to the services through `clients`.
    pub fn new(mut cfg: RunnerConfig, clients: Clients) -> Arc<Self> {
        // Session paths are bound into sandboxes at the same place, which needs them absolute.
        if let Ok(abs) = std::path::absolute(&cfg.work_dir) {
            cfg.work_dir = abs;
        }
        let env_dir = cfg
            .env_cache
            .clone()
            .unwrap_or_else(|| cfg.work_dir.join("envs"));
        // Bound into sandboxes at the same place, too.
        let env_dir = std::path::absolute(&env_dir).unwrap_or(env_dir);
        let envs = EnvironmentCache::new(env_dir, cfg.limits.env_cache_bytes);
        let exec = Arc::new_cyclic(|me| Self {
            me: me.clone(),
            cfg,
            clients,
            live: Mutex::new(HashMap::new()),
            unfinished: Mutex::new(HashSet::new()),
            stop_reasons: Mutex::new(HashMap::new()),
            dataset_locks: Mutex::new(HashMap::new()),
            sandbox: tokio::sync::OnceCell::new(),
            envs,
            swept: tokio::sync::OnceCell::new(),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(heartbeats(Arc::downgrade(&exec)));
            let me = Arc::clone(&exec);
            rt.spawn(async move { me.swept().await });
        }
        exec
    }

    /// Waits until what earlier runners on this `WORK_DIR` left is gone, removing it on the first
    /// call: first their sessions' processes and cgroups (found with the sandbox), so that nothing
    /// writes into a directory being removed, then the directories.
    pub async fn swept(&self) {
        self.swept
            .get_or_init(|| async {
                if let Err(e) = self.sandbox_host().await {
                    tracing::warn!(error = %e, "cannot check for sessions earlier runners left running");
                }
                let work = self.cfg.work_dir.clone();
                let envs = self.envs.clone();
                let sweep = move || remove_leftovers(&work) + envs.remove_incomplete();
                match tokio::task::spawn_blocking(sweep).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(removed = n, "removed what earlier runners left"),
                    Err(e) => tracing::warn!(error = %e, "removing what earlier runners left stopped"),
                }
            })
            .await;
    }

    /// What this machine offers the sandbox; an error (bubblewrap missing, no cgroups) refuses the
    /// session rather than running its code unconfined.
    async fn sandbox_host(&self) -> Result<Arc<SandboxHost>> {
        self.sandbox
            .get_or_try_init(|| async {
                let python = self.cfg.python.clone();
                let work = self.cfg.work_dir.clone();
                let state = work.join("sandbox");
                let mut protected = vec![work.clone()];
                protected.extend(work.parent().map(Path::to_path_buf));
                tokio::task::spawn_blocking(move || {
                    SandboxHost::detect(&python, &state, &protected).map(Arc::new)
                })
                .await
                .map_err(|e| RunnerError::Sandbox(format!("sandbox detection stopped: {e}")))?
            })
            .await
            .cloned()
    }

    /// Whether session `name` was started here and its finish is not yet reported (or given up).
    pub fn unfinished(&self, name: &str) -> bool {
        self.unfinished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(name)
    }

    /// Stops a session for a reason of this machine's (its cluster job was ended, say): the finish
    /// reports `why`. Returns false when no runner is known for it.
    pub fn stop_because(&self, name: &str, why: impl Into<String>) -> bool {
        let Some(token) = self.live().get(name).cloned() else {
            return false;
        };
        self.stop_reasons
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), why.into());
        token.cancel();
        true
    }

    /// The GPUs this executor hands out.
    pub fn gpus(&self) -> &GpuInventory {
        &self.cfg.gpus
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, CancellationToken>> {
        // A map of tokens stays consistent through a panic elsewhere: recovering from poison is sound.
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn session_root(&self, session: &Session) -> Result<PathBuf> {
        let bad = |why: String| RunnerError::Session {
            name: session.name.clone(),
            why,
        };
        for (what, v) in [("team", &session.team), ("dataset", &session.dataset)] {
            nsml_common::names::check_ident(what, v).map_err(|s| bad(s.message().to_string()))?;
        }
        let expected = format!("{}/{}/{}", session.team, session.dataset, session.number);
        if session.name != expected {
            return Err(bad(format!(
                "the name does not match its parts `{expected}`"
            )));
        }
        Ok(self
            .cfg
            .work_dir
            .join("sessions")
            .join(&session.team)
            .join(&session.dataset)
            .join(session.number.to_string()))
    }

    /// Runs one session from setup to reported finish.
    async fn run_session(
        self: Arc<Self>,
        session: Session,
        time_limit_secs: u64,
        stop: CancellationToken,
    ) {
        let name = session.name.clone();
        let (logs, rx) = LogSender::channel();
        let clients = self.clients.clone();
        let forwarder = tokio::spawn(forward_logs(name.clone(), rx, move || {
            let mut client = clients.session_internal.clone();
            async move {
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                let call = tokio::spawn(async move {
                    client
                        .runner_logs(tokio_stream::wrappers::ReceiverStream::new(rx))
                        .await
                        .map(|_| ())
                });
                (tx, call)
            }
        }));

        let mut dirs = None;
        // A bug here must still end in a reported finish, or the session would hang in Running.
        let run = self.prepare_and_run(&session, time_limit_secs, &logs, &stop, &mut dirs);
        let outcome = match std::panic::AssertUnwindSafe(run).catch_unwind().await {
            Ok(outcome) => outcome,
            Err(_) => {
                tracing::error!(session = %name, "the runner failed while running the session");
                ProcessOutcome::setup_failed("internal runner error", false)
            }
        };
        if outcome.pid.is_none() {
            let what = if outcome.stopped {
                "Session stopped"
            } else {
                "Session failed"
            };
            logs.nsml(format!("{what}: {}", outcome.reason)).await;
        }
        // Every line must be in before the finish: the session service closes the log on finish.
        drop(logs);
        if let Err(e) = forwarder.await {
            tracing::warn!(session = %name, error = %e, "log forwarder failed");
        }
        // Everything the session held is given back before the finish is reported: a session admitted
        // on the strength of that finish finds the GPUs (dropped with the process) and the disk free.
        if let Some(dirs) = dirs {
            archive::remove_tree(&dirs.root).await;
            archive::remove_tree(&dirs.loads).await;
            if !dirs.socket.starts_with(&dirs.root) {
                let _ = std::fs::remove_file(&dirs.socket);
            }
        }
        self.live().remove(&name);
        self.report_finish(&name, &outcome).await;
    }

    /// Reports how session `name` ended (with the reason it was stopped for, where this machine stopped
    /// it), retrying through a restart of the session service; then the session is finished here.
    async fn report_finish(&self, name: &str, outcome: &ProcessOutcome) {
        let stop_reason = self
            .stop_reasons
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        // Stopped from this machine, the process may have ended of the same signal before the runner stopped
        // it (a Slurm job's processes are all signalled at once): the stop is what ended it either way.
        let (reason, stopped) = match stop_reason {
            Some(why) if outcome.stopped || outcome.exit_code != 0 => (why, true),
            _ => (outcome.reason.clone(), outcome.stopped),
        };
        let req = RunnerFinishedRequest {
            name: name.to_string(),
            exit_code: outcome.exit_code,
            reason,
            stopped,
        };
        let finished = with_retry("RunnerFinished", FINISH_BUDGET, || {
            let mut c = self.clients.session_internal.clone();
            let req = req.clone();
            async move { c.runner_finished(req).await }
        })
        .await;
        match finished {
            Ok(_) => {
                tracing::info!(session = %name, exit_code = outcome.exit_code, reason = %req.reason, "session finished")
            }
            Err(e) => tracing::error!(session = %name, error = %e, "could not report the finish"),
        }
        self.unfinished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }

    /// Sets the session up and runs it; setup failures and stops during setup become outcomes.
    async fn prepare_and_run(
        &self,
        session: &Session,
        time_limit_secs: u64,
        logs: &LogSender,
        stop: &CancellationToken,
        dirs_out: &mut Option<SessionDirs>,
    ) -> ProcessOutcome {
        let root = match self.session_root(session) {
            Ok(root) => root,
            Err(e) => return ProcessOutcome::setup_failed(e.to_string(), false),
        };
        let dirs = SessionDirs::new(root, &self.cfg.work_dir, session);
        *dirs_out = Some(dirs.clone());
        let prepared = tokio::select! {
            p = self.prepare(session, &dirs, logs) => p,
            _ = stop.cancelled() => {
                return ProcessOutcome::setup_failed("stopped before the process started", true);
            }
        };
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => return ProcessOutcome::setup_failed(e.to_string(), false),
        };
        self.run_prepared(session, time_limit_secs, &dirs, prepared, logs, stop)
            .await
    }

    /// Runs a prepared session's entry under its time limit, with its SDK socket and its limits
    /// watched; the session's GPUs are held until it ends.
    async fn run_prepared(
        &self,
        session: &Session,
        time_limit_secs: u64,
        dirs: &SessionDirs,
        (launch, lease, cgroup, _environment): Prepared,
        logs: &LogSender,
        stop: &CancellationToken,
    ) -> ProcessOutcome {
        let platform: Arc<dyn Platform> = Arc::new(
            GrpcPlatform::new(
                self.clients.clone(),
                session.name.clone(),
                lease.ids().to_vec(),
            )
            .for_submission(session.submission_id.clone()),
        );
        let sdk = match self.sdk_context(session, dirs, &launch, Arc::clone(&platform)) {
            Ok(sdk) => sdk,
            Err(e) => {
                cgroup.remove().await;
                return ProcessOutcome::setup_failed(e.to_string(), false);
            }
        };
        let kind = session.kind();
        let time_limit = (time_limit_secs > 0).then(|| Duration::from_secs(time_limit_secs));
        // NSML's words for a submit, once its program is up.
        let ready_lines = if is_submit(kind) && time_limit.is_some() {
            let set = if kind == SessionKind::TrialSubmit {
                "trial"
            } else {
                "test"
            };
            vec![
                "Load model".to_string(),
                format!(
                    "Infer {set} set. The inference should be completed within {time_limit_secs} seconds."
                ),
            ]
        } else {
            Vec::new()
        };
        let spec = ProcessSpec {
            command: build_command(&launch),
            socket_path: dirs.socket.clone(),
            sdk,
            time_limit,
            stop_grace: STOP_GRACE,
            time_limit_text: time_limit_text(kind, time_limit_secs),
            confinement: self.confinement(cgroup, &launch, dirs),
            ready_lines,
        };
        let outcome = run_process(spec, platform, logs.clone(), stop.clone()).await;
        drop(lease);
        outcome
    }

    /// What the session's SDK socket knows of it: its directories, its platform, and how a
    /// checkpoint it saves is copied out of its reach.
    fn sdk_context(
        &self,
        session: &Session,
        dirs: &SessionDirs,
        launch: &LaunchSpec,
        platform: Arc<dyn Platform>,
    ) -> Result<SdkContext> {
        SdkContext::new(
            session.name.clone(),
            session.kind(),
            &dirs.root,
            dirs.loads.clone(),
            vec![dirs.data.clone()],
            platform,
            CheckpointStager::new(
                launch.sandbox.clone(),
                dirs.code.clone(),
                self.cfg.work_dir.join("staging"),
            ),
        )
    }

    /// How the session's process is held (its cgroup) and what is watched from outside.
    fn confinement(
        &self,
        cgroup: SessionCgroup,
        launch: &LaunchSpec,
        dirs: &SessionDirs,
    ) -> Confinement {
        let limits = &self.cfg.limits;
        Confinement {
            cgroup,
            socket_owner: launch.sandbox.host.owner(),
            memory_bytes: crate::limits::session_memory(&launch.resources),
            cpus: launch.resources.cpus,
            pids_limit: limits.pids,
            log_limit: limits.log_bytes,
            disk: Some(DiskWatch {
                root: dirs.root.clone(),
                exclude: vec![dirs.code.clone(), dirs.data.clone(), dirs.ckpt.clone()],
                limit: limits.disk_bytes,
            }),
        }
    }

    /// Lays out the session directory, makes the session's cgroup and builds the launch; holds the
    /// session's GPUs on success.
    async fn prepare(
        &self,
        session: &Session,
        dirs: &SessionDirs,
        logs: &LogSender,
    ) -> Result<Prepared> {
        // A directory laid out before the start-up sweep could be taken for a dead session's.
        self.swept().await;
        let host = self.sandbox_host().await?;
        let kind = session.kind();
        let resources = session.resources.unwrap_or_default();
        let lease = self.cfg.gpus.assign(resources.gpus)?;
        let part = part_for(kind).ok_or_else(|| RunnerError::Session {
            name: session.name.clone(),
            why: "unknown session kind".into(),
        })?;
        let args = entry_args(&session.args, is_submit(kind))?;

        dirs.lay_out().await?;
        let entry = self.fetch_code(session, dirs, logs).await?;
        let python = self.python(session, &host, dirs, logs).await?;
        logs.nsml(format!(
            "Preparing dataset {} ({})",
            session.dataset,
            part_slug(part)
        ))
        .await;
        self.place_dataset(&session.dataset, part, &dirs.data)
            .await?;
        if is_submit(kind) {
            self.fetch_checkpoint(session, dirs, logs).await?;
        }
        dirs.hand_over(&host)?;

        let sdk_path = self.sdk_path()?;
        let env = session_env(&EnvSpec {
            name: session.name.clone(),
            dataset: session.dataset.clone(),
            kind,
            session_dir: dirs.root.clone(),
            dataset_dir: dirs.data.clone(),
            tmp_dir: dirs.tmp.clone(),
            checkpoint_dir: dirs.ckpt.clone(),
            socket: dirs.socket.clone(),
            sdk_path: sdk_path.clone(),
            gpu_ids: lease.ids().to_vec(),
            resources,
            search_path: python.search_path(&host),
        });
        let cgroup = host.cgroups().create(
            &session.name,
            CgroupLimits {
                memory_bytes: crate::limits::session_memory(&resources),
                cpus: resources.cpus,
                pids: self.cfg.limits.pids,
            },
        )?;
        let mut launch = LaunchSpec {
            python: python.executable.display().to_string(),
            entry,
            args,
            cwd: dirs.code.clone(),
            env,
            gpu_ids: lease.ids().to_vec(),
            resources,
            sandbox: dirs.sandbox(host, sdk_path, &lease, &resources, &cgroup),
        };
        launch.sandbox.read_only.extend(python.mounts);
        Ok((launch, lease, cgroup, python.environment))
    }

    /// The interpreter the session runs with: the runner's, or the virtual environment its
    /// `requirements.txt` asks for, made on the runner's interpreter (see [`crate::environment`]).
    async fn python(
        &self,
        session: &Session,
        host: &SandboxHost,
        dirs: &SessionDirs,
        logs: &LogSender,
    ) -> Result<SessionPython> {
        let (base, mut mounts) = if session.environment_python.is_empty() {
            (host.python().to_path_buf(), Vec::new())
        } else {
            logs.nsml(format!(
                "Using environment {} ({})",
                session.environment, session.environment_python
            ))
            .await;
            self.host_environment(session, host).await?
        };
        let host_env = !session.environment_python.is_empty();
        let code = dirs.code.clone();
        let requirements = tokio::task::spawn_blocking(move || read_requirements(&code))
            .await
            .map_err(|e| {
                RunnerError::io("reading requirements stopped", std::io::Error::other(e))
            })??;
        let Some(requirements) = requirements else {
            return Ok(SessionPython {
                executable: base,
                mounts,
                environment: None,
            });
        };
        let req = EnvRequest {
            base_version: python_version(&base).await?,
            base,
            // A host environment's packages (its torch) stay visible under what the requirements add.
            system_site_packages: host_env,
            requirements,
        };
        let env = self.envs.prepare(&req, logs).await?;
        mounts.push(env.root.clone());
        Ok(SessionPython {
            executable: env.python.clone(),
            mounts,
            environment: Some(env),
        })
    }

    /// The interpreter of the session's host environment (`#nsml: NAME`), as this machine has it, and
    /// the directories of it the sandbox must mount.
    async fn host_environment(
        &self,
        session: &Session,
        host: &SandboxHost,
    ) -> Result<(PathBuf, Vec<PathBuf>)> {
        let python = session.environment_python.clone();
        let probed = {
            let python = python.clone();
            tokio::task::spawn_blocking(move || crate::sandbox::probe_python(&python))
                .await
                .map_err(|e| {
                    RunnerError::io("probing the interpreter stopped", std::io::Error::other(e))
                })?
        };
        let install = probed.map_err(|e| {
            RunnerError::Environment(format!(
                "environment `{}` names the interpreter {python}, which this machine cannot run ({e}): ask the competition's host to install it here or fix the manifest",
                session.environment
            ))
        })?;
        let mut protected = vec![self.cfg.work_dir.clone()];
        protected.extend(self.cfg.work_dir.parent().map(Path::to_path_buf));
        let mounts = host.python_mounts(&install, &protected)?;
        Ok((install.executable, mounts))
    }

    /// Fetches the session's code snapshot into `code/` and returns its entry, checked to be a file
    /// of the code.
    async fn fetch_code(
        &self,
        session: &Session,
        dirs: &SessionDirs,
        logs: &LogSender,
    ) -> Result<PathBuf> {
        logs.nsml("Fetching code").await;
        let code = self
            .clients
            .storage
            .clone()
            .download_code(DownloadCodeRequest {
                id: session.code_snapshot.clone(),
            })
            .await
            .map_err(|s| RunnerError::rpc("DownloadCode", s))?
            .into_inner();
        extract_download("DownloadCode", code, &dirs.code, ExtractLimits::CODE).await?;
        let entry_name = if session.entry.is_empty() {
            "main.py"
        } else {
            &session.entry
        };
        check_entry(&dirs.code, entry_name)
    }

    /// Fetches the checkpoint a submit runs with into `ckpt/`.
    async fn fetch_checkpoint(
        &self,
        session: &Session,
        dirs: &SessionDirs,
        logs: &LogSender,
    ) -> Result<()> {
        logs.nsml(format!(
            "Fetching checkpoint {} of {}",
            session.source_checkpoint, session.source_session
        ))
        .await;
        let stream = self
            .clients
            .storage
            .clone()
            .pull_checkpoint(PullCheckpointRequest {
                session: session.source_session.clone(),
                checkpoint: session.source_checkpoint.clone(),
            })
            .await
            .map_err(|s| RunnerError::rpc("PullCheckpoint", s))?
            .into_inner();
        std::fs::remove_dir(&dirs.ckpt)
            .map_err(|e| RunnerError::io(format!("cannot prepare {}", dirs.ckpt.display()), e))?;
        extract_download(
            "PullCheckpoint",
            stream,
            &dirs.ckpt,
            ExtractLimits::CHECKPOINT,
        )
        .await
    }

    /// The Python SDK's directory, resolved: it is mounted into the sandbox at the same path.
    fn sdk_path(&self) -> Result<PathBuf> {
        self.cfg.sdk_path.canonicalize().map_err(|e| {
            RunnerError::io(
                format!(
                    "cannot find the Python SDK at {}",
                    self.cfg.sdk_path.display()
                ),
                e,
            )
        })
    }

    /// Removes the directory and loaded checkpoints of session `name`, whatever is left of them.
    async fn remove_files(&self, name: &str) -> Result<()> {
        let session = session_of(name)?;
        let root = self.session_root(&session)?;
        let work = self.cfg.work_dir.clone();
        let prefix = loads_prefix(&session);
        tokio::task::spawn_blocking(move || {
            let mut doomed = vec![root];
            if let Ok(entries) = std::fs::read_dir(work.join("loads")) {
                doomed.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                        .map(|e| e.path()),
                );
            }
            for path in doomed {
                archive::remove_tree_now(&path)
                    .map_err(|e| RunnerError::io(format!("cannot remove {}", path.display()), e))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| {
            let what = format!("removing session `{name}`'s files stopped");
            RunnerError::io(what, std::io::Error::other(e))
        })?
    }

    /// Copies dataset `dataset`'s `part` into `dest`, fetching it into the cache first if needed.
    async fn place_dataset(&self, dataset: &str, part: DatasetPart, dest: &Path) -> Result<()> {
        let lock = {
            let mut locks = self.dataset_locks.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(locks.entry((dataset.to_string(), part as i32)).or_default())
        };
        // One session at a time per part: the first fetches, the others copy the cached tree.
        let _held = lock.lock().await;
        let info = self
            .clients
            .storage
            .clone()
            .get_dataset(GetDatasetRequest {
                name: dataset.to_string(),
            })
            .await
            .map_err(|s| RunnerError::rpc("GetDataset", s))?
            .into_inner();
        let base = self.cfg.work_dir.join("datasets").join(dataset);
        let slug = part_slug(part);
        // A re-registered dataset gets a new version, so a stale cache is never used.
        let cached = base.join(format!("{slug}-{}", info.updated_at_ms));
        if !cached.is_dir() {
            self.fetch_part(dataset, part, &base, &cached).await?;
            remove_stale_parts(&base, slug, &cached).await;
        }
        let (from, to) = (cached.clone(), dest.to_path_buf());
        tokio::task::spawn_blocking(move || archive::copy_tree(&from, &to))
            .await
            .map_err(|e| RunnerError::io("dataset copy stopped", std::io::Error::other(e)))??;
        Ok(())
    }

    /// Fetches `part` of `dataset` into a staging directory of `base`, lays it out as sessions see it,
    /// and installs it at `cached`; the staging directory goes whatever happens.
    async fn fetch_part(
        &self,
        dataset: &str,
        part: DatasetPart,
        base: &Path,
        cached: &Path,
    ) -> Result<()> {
        let staging = base.join(format!(
            ".{}-{}",
            part_slug(part),
            uuid::Uuid::new_v4().simple()
        ));
        let stream = datasets::open_part(&self.clients, dataset, part)
            .await
            .map_err(|s| RunnerError::rpc("FetchDatasetPart", s))?;
        let extracted = staging.join("archive");
        extract_download(
            "FetchDatasetPart",
            stream,
            &extracted,
            ExtractLimits::DATASET,
        )
        .await?;
        let (ds, root, from) = (dataset.to_string(), staging.join("root"), extracted.clone());
        let normalized =
            tokio::task::spawn_blocking(move || normalize_part(&ds, part, &from, &root))
                .await
                .map_err(|e| RunnerError::io("dataset layout stopped", std::io::Error::other(e)))
                .and_then(|r| r);
        let installed = normalized.and_then(|()| {
            std::fs::rename(staging.join("root"), cached)
                .map_err(|e| RunnerError::io(format!("cannot install {}", cached.display()), e))
        });
        archive::remove_tree(&staging).await;
        installed
    }
}

/// Removes from `base` the cached versions of the part named `slug` other than `current`, and
/// staging left by a runner that died mid-fetch.
async fn remove_stale_parts(base: &Path, slug: &str, current: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let stale = n.starts_with(&format!("{slug}-")) || n.starts_with(&format!(".{slug}-"));
        if stale && e.path() != current {
            archive::remove_tree(&e.path()).await;
        }
    }
}

#[async_trait::async_trait]
impl Executor for LocalExecutor {
    async fn start(
        &self,
        session: Session,
        time_limit_secs: u64,
    ) -> std::result::Result<(), String> {
        // `self` is reachable only through the Arc made by `new`, so the upgrade succeeds.
        let Some(me) = self.me.upgrade() else {
            return Err(RunnerError::ShuttingDown.to_string());
        };
        let stop = CancellationToken::new();
        {
            let mut live = self.live();
            if live.contains_key(&session.name) {
                return Err(RunnerError::AlreadyRunning(session.name).to_string());
            }
            live.insert(session.name.clone(), stop.clone());
        }
        self.unfinished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(session.name.clone());
        // A child of the call that asked for the session, in this process or (`nsmld runner`) another one.
        let span = nsml_common::telemetry::span_in(
            &session.traceparent,
            || tracing::info_span!("session", name = %session.name, kind = ?session.kind()),
        );
        tokio::spawn(
            me.run_session(session, time_limit_secs, stop)
                .instrument(span),
        );
        Ok(())
    }

    async fn stop(&self, name: &str) -> bool {
        match self.live().get(name) {
            Some(token) => {
                token.cancel();
                true
            }
            None => false,
        }
    }

    async fn running(&self) -> Vec<String> {
        let mut names: Vec<String> = self.live().keys().cloned().collect();
        names.sort();
        names
    }

    /// Removes the session's directory and loaded checkpoints, if anything of them is left. A
    /// session still running keeps them: its own end removes them.
    async fn remove(&self, name: &str) -> std::result::Result<(), String> {
        if self.live().contains_key(name) {
            return Ok(());
        }
        self.remove_files(name).await.map_err(|e| e.to_string())
    }

    fn capacity(&self) -> nsml_common::executor::Capacity {
        nsml_common::executor::Capacity {
            gpus: Some(self.cfg.gpus.total()),
            cpus: self.cfg.cpus,
        }
    }
}
