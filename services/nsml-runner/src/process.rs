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
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process_group};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::cgroup::SessionCgroup;
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

enum Ended {
    Exited(std::io::Result<ExitStatus>),
    Stop,
    TimeLimit,
    Disk,
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
        mut command,
        socket_path,
        sdk,
        time_limit,
        stop_grace,
        time_limit_text,
        confinement,
    } = spec;
    let Confinement {
        cgroup,
        socket_owner,
        memory_bytes,
        cpus,
        pids_limit,
        log_limit,
        disk,
    } = confinement;
    let name = sdk.name.clone();
    let server = match SdkServer::bind(&socket_path, sdk) {
        Ok(s) => s,
        Err(e) => {
            cgroup.remove().await;
            return ProcessOutcome::setup_failed(format!("cannot open the SDK socket: {e}"), false);
        }
    };
    if let Some((uid, gid)) = socket_owner
        && let Err(e) = std::os::unix::fs::chown(&socket_path, Some(uid), Some(gid))
    {
        cgroup.remove().await;
        return ProcessOutcome::setup_failed(
            format!("cannot hand the SDK socket to the sandbox: {e}"),
            false,
        );
    }
    let serving = CancellationToken::new();
    let server_task = tokio::spawn(server.serve(serving.clone()));

    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            serving.cancel();
            let _ = server_task.await;
            cgroup.remove().await;
            let program = command
                .as_std()
                .get_program()
                .to_string_lossy()
                .into_owned();
            return ProcessOutcome::setup_failed(format!("cannot start {program}: {e}"), false);
        }
    };
    let began = Instant::now();
    let pid = child.id().unwrap_or(0);
    tracing::info!(session = %name, pid, "process started");
    // Sent before the readers start, so it comes before anything the process prints.
    logs.nsml("Session ready").await;
    let budget = LogBudget::new(log_limit);
    let mut readers = tokio::task::JoinSet::new();
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
    if let Err(e) = platform.started(pid).await {
        tracing::warn!(session = %name, error = %e, "cannot report the start");
    }

    let limit = async {
        match time_limit {
            Some(d) => tokio::time::sleep(d).await,
            None => futures::future::pending().await,
        }
    };
    let disk_limit = disk.as_ref().map_or(0, |d| d.limit);
    let disk_watch = async {
        match &disk {
            Some(d) => disk_exceeded(d).await,
            None => futures::future::pending().await,
        }
    };
    let ended = tokio::select! {
        status = child.wait() => Ended::Exited(status),
        _ = stop.cancelled() => Ended::Stop,
        _ = limit => Ended::TimeLimit,
        _ = disk_watch => Ended::Disk,
    };
    let for_disk = matches!(ended, Ended::Disk);
    let mut outcome = match ended {
        Ended::Exited(status) => match status {
            Ok(status) => {
                let (exit_code, reason) = describe_sandboxed_exit(status);
                ProcessOutcome {
                    pid: Some(pid),
                    exit_code,
                    reason,
                    stopped: false,
                }
            }
            Err(e) => ProcessOutcome {
                pid: Some(pid),
                exit_code: -1,
                reason: format!("cannot wait for the process: {e}"),
                stopped: false,
            },
        },
        Ended::Stop => {
            logs.nsml("Stopping: sending SIGTERM").await;
            cgroup.signal_workload(pid, Signal::TERM);
            let status = match tokio::time::timeout(stop_grace, child.wait()).await {
                Ok(status) => status,
                Err(_) => {
                    logs.nsml(format!(
                        "Still running {} s after SIGTERM: sending SIGKILL",
                        stop_grace.as_secs()
                    ))
                    .await;
                    cgroup.kill_all().await;
                    child.wait().await
                }
            };
            let exit_code = status.map(|s| describe_sandboxed_exit(s).0).unwrap_or(-1);
            ProcessOutcome {
                pid: Some(pid),
                exit_code,
                reason: "stopped".to_string(),
                stopped: true,
            }
        }
        Ended::TimeLimit => {
            cgroup.kill_all().await;
            let _ = child.wait().await;
            let reason = format!("time limit exceeded: {time_limit_text}");
            logs.nsml(reason.clone()).await;
            ProcessOutcome {
                pid: Some(pid),
                exit_code: TIME_LIMIT_EXIT_CODE,
                reason,
                stopped: false,
            }
        }
        Ended::Disk => {
            cgroup.kill_all().await;
            let _ = child.wait().await;
            ProcessOutcome {
                pid: Some(pid),
                exit_code: KILLED_EXIT_CODE,
                reason: limits::disk_reason(disk_limit),
                stopped: false,
            }
        }
    };
    let wall = began.elapsed();
    // The session is over: nothing it started may outlive it.
    signal_group(pid, Signal::KILL);
    cgroup.kill_all().await;
    let drained = tokio::time::timeout(DRAIN_GRACE, async {
        while readers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(session = %name, "output still open after exit (a process left its group); not reading further");
        readers.shutdown().await;
    }
    let usage = cgroup.usage();
    cgroup.remove().await;
    // A stop, the time limit or the disk limit already says what ended the session.
    let limit_hit = outcome.stopped || outcome.exit_code == TIME_LIMIT_EXIT_CODE || for_disk;
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
    if let Some(cpu_ns) = usage.cpu_ns {
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
    serving.cancel();
    let _ = server_task.await;
    if outcome.exit_code != 0 && !outcome.stopped && outcome.exit_code != TIME_LIMIT_EXIT_CODE {
        logs.nsml(format!("Session ended: {}", outcome.reason))
            .await;
    }
    outcome
}
