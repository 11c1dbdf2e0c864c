//! Runs a session's process: the SDK socket, output pumping, time limit, stop, the limits watched
//! from outside (disk, log volume), and the exit status read together with the session's cgroup.
//!
//! [`run_process`] needs no services: it talks to the platform through [`Platform`] and hands lines to
//! a [`LogSender`], so it can be driven by a test with a real child and a fake platform.
//!
//! The process it starts is the sandbox ([`crate::launch::build_command`]); the participant's
//! processes live in other namespaces and are reached through the session's cgroup: a stop sends
//! them SIGTERM there, and whatever ends the session, every process left in the cgroup is killed.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process_group};
use tokio::process::{Child, Command};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::cgroup::{CgroupUsage, SessionCgroup};
use crate::error::{Result, RunnerError};
use crate::limits;
use crate::logs::{self, LogBudget, LogSender};
use crate::platform::Platform;
use crate::sdk::{SdkContext, SdkServer};

/// Exit code reported when the time limit ends a session (as `timeout(1)` does).
pub const TIME_LIMIT_EXIT_CODE: i32 = 124;
/// Exit code reported when the runner or the kernel killed the session for a limit (`128 + SIGKILL`).
pub const KILLED_EXIT_CODE: i32 = 137;
/// Exit code reported when the process never ran (setup failed).
pub const SETUP_FAILED_EXIT_CODE: i32 = -1;
/// How long `stop` waits after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long output is still read after the process exits (a leftover child may hold the pipes).
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// The shortest pause between two walks of the session directory for the disk limit.
const DISK_CHECK_EVERY: Duration = Duration::from_secs(1);

/// How a session's process is held and what the runner watches from outside.
pub struct Confinement {
    /// The session's cgroup, which the command joins (see [`crate::launch::build_command`]).
    pub cgroup: SessionCgroup,
    /// Who the SDK socket is handed to, when the sandbox runs as another user than the runner.
    pub socket_owner: Option<(u32, u32)>,
    /// The memory limit, for the out-of-memory reason; 0 for none.
    pub memory_bytes: u64,
    /// The CPU quota, for the usage line; 0 for none.
    pub cpus: u32,
    /// The process limit, for the note when forks were refused.
    pub pids_limit: u64,
    /// Bytes of output logged before the rest is dropped.
    pub log_limit: u64,
    /// The disk limit on the session directory; `None` for no check.
    pub disk: Option<DiskWatch>,
}

/// What the disk limit watches.
#[derive(Debug, Clone)]
pub struct DiskWatch {
    /// The session directory.
    pub root: PathBuf,
    /// Trees in it the session cannot write (its code, dataset part and checkpoint).
    pub exclude: Vec<PathBuf>,
    /// Bytes the rest may hold.
    pub limit: u64,
}

/// Waits until the session directory holds more than the limit; walks it at most every second, less
/// often for a directory that takes long to walk.
async fn disk_exceeded(watch: &DiskWatch) {
    let mut pause = DISK_CHECK_EVERY;
    loop {
        tokio::time::sleep(pause).await;
        let (root, exclude) = (watch.root.clone(), watch.exclude.clone());
        let began = Instant::now();
        let used = tokio::task::spawn_blocking(move || limits::disk_usage(&root, &exclude))
            .await
            .unwrap_or(0);
        if used > watch.limit {
            return;
        }
        pause = DISK_CHECK_EVERY.max(began.elapsed() * 10);
    }
}

/// A process ready to run.
pub struct ProcessSpec {
    /// The command, as [`crate::launch::build_command`] made it.
    pub command: Command,
    /// Where the SDK socket listens.
    pub socket_path: PathBuf,
    /// The SDK socket's view of the session.
    pub sdk: SdkContext,
    /// `None`: no limit.
    pub time_limit: Option<Duration>,
    /// Between SIGTERM and SIGKILL on stop.
    pub stop_grace: Duration,
    /// The text of the time-limit reason, e.g. `the inference must finish within 3600 seconds`.
    pub time_limit_text: String,
    /// The session's cgroup and the limits watched from outside.
    pub confinement: Confinement,
    /// What the platform says right after `Session ready`, before anything the process prints (a submit's
    /// `Load model` and `Infer trial set. …`).
    pub ready_lines: Vec<String>,
}

/// How a session's process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessOutcome {
    /// The process id, if it started.
    pub pid: Option<u32>,
    /// The exit status (`128 + N` for signal N, 124 after the time limit, -1 if it never ran).
    pub exit_code: i32,
    /// Empty on a clean exit; otherwise what ended it.
    pub reason: String,
    /// Whether a stop request ended it.
    pub stopped: bool,
}

impl ProcessOutcome {
    /// An outcome for a session whose process never ran.
    pub fn setup_failed(reason: impl Into<String>, stopped: bool) -> Self {
        Self {
            pid: None,
            exit_code: SETUP_FAILED_EXIT_CODE,
            reason: reason.into(),
            stopped,
        }
    }
}

/// The exit code and reason of an exit status: `128 + N` and `Killed (signal N)` for a signal,
/// `exited with code N` for a non-zero code, nothing for 0.
pub fn describe_exit(status: ExitStatus) -> (i32, String) {
    if let Some(sig) = status.signal() {
        (128 + sig, format!("Killed (signal {sig})"))
    } else {
        match status.code() {
            Some(0) => (0, String::new()),
            Some(code) => (code, format!("exited with code {code}")),
            None => (-1, format!("ended with status {status}")),
        }
    }
}

/// [`describe_exit`] for a sandbox, which reports an entry killed by signal N as exit code `128 + N`.
pub fn describe_sandboxed_exit(status: ExitStatus) -> (i32, String) {
    match status.code() {
        Some(code) if (129..=128 + 64).contains(&code) => {
            (code, format!("Killed (signal {})", code - 128))
        }
        _ => describe_exit(status),
    }
}

/// Sends `sig` to the process group led by `pid`; never to group 0 or 1.
fn signal_group(pid: u32, sig: Signal) {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .filter(|p| *p > 1)
        .and_then(Pid::from_raw)
    else {
        return;
    };
    if let Err(e) = kill_process_group(pid, sig)
        && e != rustix::io::Errno::SRCH
    {
        tracing::warn!(pid = pid.as_raw_nonzero().get(), error = %e, "cannot signal process group");
    }
}

/// What ended the wait on a running process.
enum Ended {
    Exited(std::io::Result<ExitStatus>),
    Stop,
    TimeLimit,
    Disk,
}

/// The SDK socket, served while the process runs.
struct SdkServing {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl SdkServing {
    /// Binds the socket, hands it to the sandbox's user when there is one, and serves it.
    fn start(socket_path: &Path, sdk: SdkContext, owner: Option<(u32, u32)>) -> Result<Self> {
        let server =
            SdkServer::bind(socket_path, sdk).map_err(|e| RunnerError::SdkSocket(Box::new(e)))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(socket_path, Some(uid), Some(gid))
                .map_err(|e| RunnerError::io("cannot hand the SDK socket to the sandbox", e))?;
        }
        let cancel = CancellationToken::new();
        // The SDK's requests are spans of the session's trace.
        let task = tokio::spawn(server.serve(cancel.clone()).in_current_span());
        Ok(Self { cancel, task })
    }

    /// Stops serving and waits until the socket is closed.
    async fn close(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

/// A started process and the tasks pumping its output into the logs.
struct Running {
    child: Child,
    pid: u32,
    began: Instant,
    readers: JoinSet<()>,
}

/// Spawns `command` in its own process group with stdout and stderr piped into `logs` (up to
/// `log_limit` bytes), after saying the session is ready.
async fn spawn(
    mut command: Command,
    logs: &LogSender,
    log_limit: u64,
    ready_lines: Vec<String>,
) -> Result<Running> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|e| {
        let program = command.as_std().get_program().to_string_lossy();
        RunnerError::io(format!("cannot start {program}"), e)
    })?;
    let began = Instant::now();
    let pid = child.id().unwrap_or(0);
    // Sent before the readers start, so they come before anything the process prints.
    logs.nsml("Session ready").await;
    for line in ready_lines {
        logs.nsml(line).await;
    }
    let budget = LogBudget::new(log_limit);
    let mut readers = JoinSet::new();
    if let Some(out) = child.stdout.take() {
        readers.spawn(logs::pump_lines(
            out,
            logs::STDOUT,
            logs.clone(),
            budget.clone(),
        ));
    }
    if let Some(err) = child.stderr.take() {
        readers.spawn(logs::pump_lines(
            err,
            logs::STDERR,
            logs.clone(),
            budget.clone(),
        ));
    }
    Ok(Running {
        child,
        pid,
        began,
        readers,
    })
}

/// Waits for whichever comes first: the exit, a stop, the time limit or the disk limit.
async fn wait_for_end(
    child: &mut Child,
    stop: &CancellationToken,
    time_limit: Option<Duration>,
    disk: Option<&DiskWatch>,
) -> Ended {
    let limit = async {
        match time_limit {
            Some(d) => tokio::time::sleep(d).await,
            None => futures::future::pending().await,
        }
    };
    let disk_watch = async {
        match disk {
            Some(d) => disk_exceeded(d).await,
            None => futures::future::pending().await,
        }
    };
    tokio::select! {
        status = child.wait() => Ended::Exited(status),
        _ = stop.cancelled() => Ended::Stop,
        _ = limit => Ended::TimeLimit,
        _ = disk_watch => Ended::Disk,
    }
}

/// What the end of the wait means for the session, once the process is down: an exit is read as
/// the sandbox reports it; a stop sends SIGTERM to the session's processes and SIGKILL after
/// `stop_grace`; the time and disk limits kill every process in the cgroup at once.
async fn end(
    ended: Ended,
    running: &mut Running,
    cgroup: &SessionCgroup,
    logs: &LogSender,
    limits: &EndLimits<'_>,
) -> ProcessOutcome {
    let pid = running.pid;
    let child = &mut running.child;
    let outcome = |exit_code, reason, stopped| ProcessOutcome {
        pid: Some(pid),
        exit_code,
        reason,
        stopped,
    };
    match ended {
        Ended::Exited(Ok(status)) => {
            let (exit_code, reason) = describe_sandboxed_exit(status);
            outcome(exit_code, reason, false)
        }
        Ended::Exited(Err(e)) => outcome(-1, format!("cannot wait for the process: {e}"), false),
        Ended::Stop => {
            let status = stop_gracefully(child, pid, cgroup, logs, limits.stop_grace).await;
            let exit_code = status.map(|s| describe_sandboxed_exit(s).0).unwrap_or(-1);
            outcome(exit_code, "stopped".to_string(), true)
        }
        Ended::TimeLimit => {
            cgroup.kill_all().await;
            let _ = child.wait().await;
            let reason = format!("time limit exceeded: {}", limits.time_limit_text);
            logs.nsml(reason.clone()).await;
            outcome(TIME_LIMIT_EXIT_CODE, reason, false)
        }
        Ended::Disk => {
            cgroup.kill_all().await;
            let _ = child.wait().await;
            outcome(
                KILLED_EXIT_CODE,
                limits::disk_reason(limits.disk_bytes),
                false,
            )
        }
    }
}

/// What [`end`] needs of the session's limits to say what ended it.
struct EndLimits<'a> {
    stop_grace: Duration,
    time_limit_text: &'a str,
    disk_bytes: u64,
}

/// Sends SIGTERM to the session's processes and waits `grace` for the exit, then kills them all.
async fn stop_gracefully(
    child: &mut Child,
    pid: u32,
    cgroup: &SessionCgroup,
    logs: &LogSender,
    grace: Duration,
) -> std::io::Result<ExitStatus> {
    logs.nsml("Stopping: sending SIGTERM").await;
    cgroup.signal_workload(pid, Signal::TERM);
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            logs.nsml(format!(
                "Still running {} s after SIGTERM: sending SIGKILL",
                grace.as_secs()
            ))
            .await;
            cgroup.kill_all().await;
            child.wait().await
        }
    }
}

/// Kills whatever the session left running, then reads what is left of its output for a short while
/// (a process that left its group may hold the pipes open).
async fn kill_and_drain(running: &mut Running, cgroup: &SessionCgroup, name: &str) {
    // The session is over: nothing it started may outlive it.
    signal_group(running.pid, Signal::KILL);
    cgroup.kill_all().await;
    let readers = &mut running.readers;
    let drained = tokio::time::timeout(DRAIN_GRACE, async {
        while readers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(session = %name, "output still open after exit (a process left its group); not reading further");
        readers.shutdown().await;
    }
}

/// Reads the cgroup's accounting into the outcome: an out-of-memory kill becomes the reason unless a
/// stop or a limit already says what ended the session (`limit_hit`), and refused forks are noted.
async fn account_limits(
    outcome: &mut ProcessOutcome,
    usage: &CgroupUsage,
    limit_hit: bool,
    memory_bytes: u64,
    pids_limit: u64,
    logs: &LogSender,
) {
    if usage.oom_kills > 0 && outcome.exit_code != 0 && !limit_hit {
        outcome.exit_code = KILLED_EXIT_CODE;
        outcome.reason = if memory_bytes > 0 {
            limits::out_of_memory_reason(memory_bytes)
        } else {
            "Killed (out of memory)".to_string()
        };
    }
    if usage.pids_limit_hits > 0 {
        let note = limits::pids_note(pids_limit);
        logs.nsml(format!(
            "{note}: {} process or thread starts were refused",
            usage.pids_limit_hits
        ))
        .await;
        if !outcome.reason.is_empty() && !outcome.stopped && !limit_hit {
            outcome.reason = format!("{} ({note})", outcome.reason);
        }
    }
}

/// Logs the CPU time and peak memory the session used over `wall`, when the cgroup counts them.
async fn log_resources(usage: &CgroupUsage, wall: Duration, cpus: u32, logs: &LogSender) {
    let Some(cpu_ns) = usage.cpu_ns else {
        return;
    };
    let cpu_s = cpu_ns as f64 / 1e9;
    let wall_s = wall.as_secs_f64().max(1e-3);
    let cpu_limit = if cpus > 0 {
        cpus.to_string()
    } else {
        "none".to_string()
    };
    let peak = usage
        .peak_memory_bytes
        .map(|b| format!(", peak memory {}", limits::size_text(b)))
        .unwrap_or_default();
    logs.nsml(format!(
        "Resources used: {cpu_s:.2} CPU seconds in {wall_s:.2} s ({:.2} CPUs, limit {cpu_limit}){peak}",
        cpu_s / wall_s
    ))
    .await;
}

/// Runs the process to its end: binds the SDK socket, spawns the command in its own process group with
/// stdout and stderr piped into `logs` (up to the log limit), reports the start, and ends it on `stop`
/// (SIGTERM to the session's processes, then SIGKILL after the grace), at the time limit or past the
/// disk limit (SIGKILL). Whatever ends it, every process left in its cgroup is killed; the cgroup's
/// accounting then says whether memory ran out, whether forks were refused, and what was used.
/// Returns once output is drained and the socket closed; the caller reports the finish.
pub async fn run_process(
    spec: ProcessSpec,
    platform: Arc<dyn Platform>,
    logs: LogSender,
    stop: CancellationToken,
) -> ProcessOutcome {
    let ProcessSpec {
        command,
        socket_path,
        sdk,
        time_limit,
        stop_grace,
        time_limit_text,
        confinement: c,
        ready_lines,
    } = spec;
    let name = sdk.name.clone();
    let sdk = match SdkServing::start(&socket_path, sdk, c.socket_owner) {
        Ok(sdk) => sdk,
        Err(e) => {
            c.cgroup.remove().await;
            return ProcessOutcome::setup_failed(e.to_string(), false);
        }
    };
    let start = tracing::info_span!("sandbox_start", session = %name);
    let mut running = match spawn(command, &logs, c.log_limit, ready_lines)
        .instrument(start.clone())
        .await
    {
        Ok(running) => running,
        Err(e) => {
            sdk.close().await;
            c.cgroup.remove().await;
            return ProcessOutcome::setup_failed(e.to_string(), false);
        }
    };
    tracing::info!(session = %name, pid = running.pid, "process started");
    if let Err(e) = platform.started(running.pid).instrument(start).await {
        tracing::warn!(session = %name, error = %e, "cannot report the start");
    }

    let ended = wait_for_end(&mut running.child, &stop, time_limit, c.disk.as_ref()).await;
    let for_disk = matches!(ended, Ended::Disk);
    let end_limits = EndLimits {
        stop_grace,
        time_limit_text: &time_limit_text,
        disk_bytes: c.disk.as_ref().map_or(0, |d| d.limit),
    };
    let mut outcome = end(ended, &mut running, &c.cgroup, &logs, &end_limits).await;
    let wall = running.began.elapsed();
    kill_and_drain(&mut running, &c.cgroup, &name).await;
    let usage = c.cgroup.usage();
    c.cgroup.remove().await;
    // A stop, the time limit or the disk limit already says what ended the session.
    let limit_hit = outcome.stopped || outcome.exit_code == TIME_LIMIT_EXIT_CODE || for_disk;
    let (memory, pids) = (c.memory_bytes, c.pids_limit);
    account_limits(&mut outcome, &usage, limit_hit, memory, pids, &logs).await;
    log_resources(&usage, wall, c.cpus, &logs).await;
    sdk.close().await;
    if outcome.exit_code != 0 && !outcome.stopped && outcome.exit_code != TIME_LIMIT_EXIT_CODE {
        logs.nsml(format!("Session ended: {}", outcome.reason))
            .await;
    }
    outcome
}
