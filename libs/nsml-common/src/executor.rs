//! The contract between the session service and whatever starts sessions' runners.

use std::time::Duration;

use nsml_proto::v1::Session;

/// How often a runner reports that its sessions are alive.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// Silence after which a running session's runner counts as lost.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(30);

/// What the machines behind an executor offer all sessions at once; `None` is no limit on that resource.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capacity {
    pub gpus: Option<u32>,
    pub cpus: Option<u32>,
}

/// Starts and stops runners for sessions. The local executor runs them on this machine; a cluster
/// executor would submit them to a scheduler.
#[async_trait::async_trait]
pub trait Executor: Send + Sync + 'static {
    /// Starts the runner for an admitted session. Returns once the start is under way; the runner reports
    /// progress to the session service itself.
    async fn start(&self, session: Session, time_limit_secs: u64) -> Result<(), String>;

    /// Asks a session's runner to stop its process; returns false when no runner is known for it.
    async fn stop(&self, name: &str) -> bool;

    /// Names of the sessions whose runners are alive.
    async fn running(&self) -> Vec<String>;

    /// Removes whatever of an ended session the executor still keeps on its machines (its working
    /// directory): called when the session is removed. What the session produced for the platform
    /// (logs, checkpoints, predictions) lives in the services, not here. An executor that keeps
    /// nothing has nothing to do.
    async fn remove(&self, name: &str) -> Result<(), String> {
        let _ = name;
        Ok(())
    }

    /// The cluster's capacity: admitted sessions beyond it wait as Queued until capacity frees.
    fn capacity(&self) -> Capacity {
        Capacity::default()
    }

    /// Whether sessions can be started now; the error says why not (the cluster's scheduler cannot be
    /// reached, say). Asked before a session is admitted, so that a session that could not start holds
    /// nothing.
    async fn available(&self) -> Result<(), String> {
        Ok(())
    }

    /// Why a session handed to the executor has not started yet, in words (the cluster's queue reason),
    /// or `None` when the executor knows of no wait.
    fn waiting_reason(&self, name: &str) -> Option<String> {
        let _ = name;
        None
    }

    /// How a session the executor no longer runs ended, when the executor knows (a cluster scheduler
    /// remembers its jobs): asked after a restart for sessions the log shows as live.
    async fn end_of(&self, name: &str) -> Option<String> {
        let _ = name;
        None
    }
}
