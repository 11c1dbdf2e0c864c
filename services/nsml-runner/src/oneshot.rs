//! One session's runner in a process of its own, as a cluster job runs it (`nsmld runner`): it runs the
//! session it was started for, reaches the platform only over gRPC (the session service, storage and
//! submission, with the internal secret), and exits once the session's end is reported.
//!
//! The job's end is the session's: a termination signal (Slurm cancelling the job, for the platform or
//! for an operator, or ending it at its time limit) stops the session's process, and the runner reports
//! the stop before it exits.

use std::sync::Arc;
use std::time::Duration;

use nsml_common::executor::Executor;
use nsml_proto::v1::Session;
use tokio::signal::unix::{SignalKind, signal};

use crate::error::{Result, RunnerError};
use crate::executor::LocalExecutor;

/// What the session's finish says when the job was ended from outside: if the platform asked for the
/// stop, the session is recorded Stopped; otherwise it failed with this reason.
pub const JOB_ENDED: &str = "the cluster's scheduler ended the session's job (cancelled outside the platform, or at its time limit)";

/// How often the runner looks whether its session has ended.
const CHECK_EVERY: Duration = Duration::from_millis(200);

/// Runs `session` on `exec` until its end is reported; a SIGTERM or SIGINT stops it first.
pub async fn run_one(
    exec: Arc<LocalExecutor>,
    session: Session,
    time_limit_secs: u64,
) -> Result<()> {
    let name = session.name.clone();
    let signals = |kind: SignalKind| {
        signal(kind).map_err(|e| RunnerError::io("cannot watch for termination signals", e))
    };
    let (mut term, mut int) = (
        signals(SignalKind::terminate())?,
        signals(SignalKind::interrupt())?,
    );
    exec.start(session, time_limit_secs)
        .await
        .map_err(|why| RunnerError::Session {
            name: name.clone(),
            why,
        })?;
    let mut stopping = false;
    let mut tick = tokio::time::interval(CHECK_EVERY);
    loop {
        tokio::select! {
            _ = term.recv(), if !stopping => {
                tracing::info!(session = %name, "terminated: stopping the session");
                stopping = exec.stop_because(&name, JOB_ENDED);
            }
            _ = int.recv(), if !stopping => {
                tracing::info!(session = %name, "interrupted: stopping the session");
                stopping = exec.stop_because(&name, JOB_ENDED);
            }
            _ = tick.tick() => {
                if !exec.unfinished(&name) {
                    return Ok(());
                }
            }
        }
    }
}
