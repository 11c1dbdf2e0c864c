//! Runs a session's process: the SDK socket, output pumping, time limit, stop, and the exit status.
//!
//! [`run_process`] needs no services: it talks to the platform through [`Platform`] and hands lines to
//! a [`LogSender`], so it can be driven by a test with a real child and a fake platform.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process_group};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::logs::{self, LogSender};
use crate::platform::Platform;
use crate::sdk::{SdkContext, SdkServer};

/// Exit code reported when the time limit ends a session (as `timeout(1)` does).
pub const TIME_LIMIT_EXIT_CODE: i32 = 124;
/// Exit code reported when the process never ran (setup failed).
pub const SETUP_FAILED_EXIT_CODE: i32 = -1;
/// How long `stop` waits after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long output is still read after the process exits (a leftover child may hold the pipes).
const DRAIN_GRACE: Duration = Duration::from_secs(2);

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
}

/// Runs the process to its end: binds the SDK socket, spawns the command in its own process group with
/// stdout and stderr piped into `logs`, reports the start, and ends it on `stop` (SIGTERM, then SIGKILL
/// after the grace) or at the time limit (SIGKILL). Whatever ends the leader, the rest of its process
/// group is killed. Returns once output is drained and the socket closed; the caller reports the finish.
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
    } = spec;
    let name = sdk.name.clone();
    let server = match SdkServer::bind(&socket_path, sdk) {
        Ok(s) => s,
        Err(e) => {
            return ProcessOutcome::setup_failed(format!("cannot open the SDK socket: {e}"), false);
        }
    };
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
            let program = command
                .as_std()
                .get_program()
                .to_string_lossy()
                .into_owned();
            return ProcessOutcome::setup_failed(format!("cannot start {program}: {e}"), false);
        }
    };
    let pid = child.id().unwrap_or(0);
    tracing::info!(session = %name, pid, "process started");
    // Sent before the readers start, so it comes before anything the process prints.
    logs.nsml("Session ready").await;
    let mut readers = tokio::task::JoinSet::new();
    if let Some(out) = child.stdout.take() {
        readers.spawn(logs::pump_lines(out, logs::STDOUT, logs.clone()));
    }
    if let Some(err) = child.stderr.take() {
        readers.spawn(logs::pump_lines(err, logs::STDERR, logs.clone()));
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
    let ended = tokio::select! {
        status = child.wait() => Ended::Exited(status),
        _ = stop.cancelled() => Ended::Stop,
        _ = limit => Ended::TimeLimit,
    };
    let outcome = match ended {
        Ended::Exited(status) => match status {
            Ok(status) => {
                let (exit_code, reason) = describe_exit(status);
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
            signal_group(pid, Signal::TERM);
            let status = match tokio::time::timeout(stop_grace, child.wait()).await {
                Ok(status) => status,
                Err(_) => {
                    logs.nsml(format!(
                        "Still running {} s after SIGTERM: sending SIGKILL",
                        stop_grace.as_secs()
                    ))
                    .await;
                    signal_group(pid, Signal::KILL);
                    child.wait().await
                }
            };
            let exit_code = status.map(|s| describe_exit(s).0).unwrap_or(-1);
            ProcessOutcome {
                pid: Some(pid),
                exit_code,
                reason: "stopped".to_string(),
                stopped: true,
            }
        }
        Ended::TimeLimit => {
            signal_group(pid, Signal::KILL);
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
    };
    // The session is over: nothing it started may outlive it.
    signal_group(pid, Signal::KILL);
    let drained = tokio::time::timeout(DRAIN_GRACE, async {
        while readers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(session = %name, "output still open after exit (a process left its group); not reading further");
        readers.shutdown().await;
    }
    serving.cancel();
    let _ = server_task.await;
    if outcome.exit_code != 0 && !outcome.stopped && outcome.exit_code != TIME_LIMIT_EXIT_CODE {
        logs.nsml(format!("Session ended: {}", outcome.reason))
            .await;
    }
    outcome
}
