//! What runners report about the sessions they run: the start, log lines, metric points, heartbeats and the
//! finish. Only platform services (the runner among them) may call these; the gRPC face checks that.

use std::sync::Arc;
use std::time::Instant;

use nsml_common::event::new_event;
use nsml_common::now_ms;
use nsml_proto::internal::v1::{RunnerFinishedRequest, RunnerStartedRequest};
use nsml_proto::v1::{
    LogLine, MetricPoint, SessionExited, SessionFailed, SessionStarted, SessionStatus,
    SessionStopped,
};

use crate::dispatch::Launcher;
use crate::domain::{Lite, failure_reason, finish_status};
use crate::error::SessionError;

/// The runner API's handlers.
pub struct Runners {
    launcher: Arc<Launcher>,
}

impl Runners {
    pub fn new(launcher: Arc<Launcher>) -> Self {
        Self { launcher }
    }

    /// Records that a session's process started (once; a repeat or a report after the end changes nothing).
    pub async fn started(&self, r: RunnerStartedRequest) -> Result<(), SessionError> {
        let ev = new_event(
            &SessionStarted {
                name: r.name.clone(),
                pid: r.pid,
                gpu_ids: r.gpu_ids,
                at_ms: now_ms(),
            },
            "runner",
            "",
        );
        self.launcher
            .handler
            .transition(
                &r.name,
                |l| l.ended() || l.status == SessionStatus::Running,
                ev,
            )
            .await
    }

    /// Stores a batch of a session's log lines and hands them to followers.
    pub fn log_batch(&self, name: &str, lines: &[LogLine]) -> Result<(), SessionError> {
        self.launcher
            .logs
            .append(name, lines)
            .map_err(SessionError::internal("writing a session log"))
    }

    /// Records a metric point a session's program reported.
    pub async fn report(&self, name: &str, point: Option<MetricPoint>) -> Result<(), SessionError> {
        self.launcher.handler.report(name, point).await
    }

    /// Records that the runners of `names` are alive.
    pub fn heartbeat(&self, names: &[String]) {
        metrics::counter!("nsml_runner_heartbeats_total").increment(1);
        self.launcher.queue.heard_from(names, Instant::now());
    }

    /// Records how a session ended (once), and frees what it held.
    pub async fn finished(&self, r: RunnerFinishedRequest) -> Result<(), SessionError> {
        let at_ms = now_ms();
        let name = r.name.clone();
        let finish = |now: &Lite| {
            if now.ended() {
                return None;
            }
            Some(
                match finish_status(r.exit_code, &r.reason, r.stopped, now.status) {
                    SessionStatus::Exited => new_event(
                        &SessionExited {
                            name: name.clone(),
                            exit_code: r.exit_code,
                            at_ms,
                        },
                        "runner",
                        "",
                    ),
                    SessionStatus::Stopped => new_event(
                        &SessionStopped {
                            name: name.clone(),
                            at_ms,
                        },
                        "runner",
                        "",
                    ),
                    _ => new_event(
                        &SessionFailed {
                            name: name.clone(),
                            exit_code: r.exit_code,
                            reason: failure_reason(r.exit_code, &r.reason),
                            at_ms,
                        },
                        "runner",
                        "",
                    ),
                },
            )
        };
        self.launcher.handler.transition_by(&name, finish).await?;
        self.launcher.ended(&name).await;
        Ok(())
    }
}
