//! Supervision of runners: after a restart, sessions whose runner is gone are failed (or queued again when
//! they were only waiting for capacity); while serving, a runner that stops heartbeating fails its sessions.
//! Either way nothing stays held by a session that is not running.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nsml_proto::v1::{SessionKind, SessionStatus};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::dispatch::Launcher;
use crate::domain::{lost_reason, silent_reason};
use crate::projection::Entry;

/// How runners are watched.
#[derive(Debug, Clone, Copy)]
pub struct Supervision {
    /// How often silent runners are looked for.
    pub sweep_every: Duration,
    /// Silence after which a launched session's runner counts as lost.
    pub heartbeat_timeout: Duration,
}

impl Default for Supervision {
    fn default() -> Self {
        Self {
            sweep_every: nsml_common::executor::HEARTBEAT_EVERY,
            heartbeat_timeout: nsml_common::executor::HEARTBEAT_TIMEOUT,
        }
    }
}

/// The live sessions of the log after a restart, by what became of their runner.
struct Recovered {
    survivors: Vec<Entry>,
    waiting: Vec<Entry>,
    lost: Vec<Entry>,
}

/// Watches the runners of launched sessions.
pub struct Supervisor {
    launcher: Arc<Launcher>,
    settings: Supervision,
}

impl Supervisor {
    pub fn new(launcher: Arc<Launcher>, settings: Supervision) -> Self {
        Self { launcher, settings }
    }

    /// Sessions the log shows as live, sorted by whether their runner survived: those with one (to adopt),
    /// those admitted and waiting for capacity (to queue again) and the rest (lost).
    fn by_runner(&self, running: &[String]) -> Recovered {
        let live: Vec<Entry> = self.launcher.handler.read(|s| {
            s.sessions
                .values()
                .filter(|e| !e.removed)
                .filter(|e| {
                    matches!(
                        e.session.status(),
                        SessionStatus::Queued | SessionStatus::Running | SessionStatus::Stopping
                    )
                })
                .cloned()
                .collect()
        });
        let (survivors, gone): (Vec<Entry>, Vec<Entry>) = live
            .into_iter()
            .partition(|e| running.contains(&e.session.name));
        let (waiting, lost) = gone
            .into_iter()
            .partition(|e| e.admitted && e.session.status() == SessionStatus::Queued);
        Recovered {
            survivors,
            waiting,
            lost,
        }
    }

    /// The time limit a queued session runs under: none for training; for a submit, its dataset's (the
    /// round's where the dataset is in a round that sets one, else the competition's).
    fn time_limit(&self, e: &Entry) -> u64 {
        match e.session.kind() {
            SessionKind::Train => 0,
            _ => self.launcher.handler.read(|s| {
                s.policies.get(&e.session.competition).map_or(3600, |p| {
                    p.rules_for(&e.session.dataset).submit_time_limit_secs
                })
            }),
        }
    }

    /// Marks sessions whose runner is gone (the platform restarted under them) as failed, so that nothing
    /// stays held by a session that is not running; admitted sessions that were waiting wait again.
    pub async fn recover_lost_runners(&self) {
        let running = self.launcher.executor.running().await;
        let Recovered {
            survivors,
            mut waiting,
            lost,
        } = self.by_runner(&running);
        // Survivors hold their resources, so the queue waits for them to end; their runners keep reporting.
        for e in &survivors {
            self.launcher.queue.adopt(&e.session, Instant::now());
        }
        // Admitted sessions that were waiting for capacity wait again, in their original order.
        waiting.sort_by_key(|e| (e.session.created_at_ms, e.session.name.clone()));
        for e in waiting {
            let limit = self.time_limit(&e);
            self.launcher.queue.enqueue(e.session, limit);
        }
        for e in lost {
            let name = e.session.name;
            // The cluster's scheduler may know how the session's job ended while the platform was away.
            let reason = match self.launcher.executor.end_of(&name).await {
                Some(end) => end,
                None => lost_reason(e.admitted).to_string(),
            };
            tracing::warn!(session = %name, reason, "marking a session failed after a restart");
            if let Err(err) = self.launcher.handler.fail(&name, -1, &reason).await {
                tracing::error!(session = %name, %err, "could not mark a lost session");
            }
        }
        self.launcher.pump().await;
    }

    /// Fails the launched sessions whose runner stopped reporting, so that they hold nothing.
    pub async fn sweep_silent_runners(&self) {
        let timeout = self.settings.heartbeat_timeout;
        let now = Instant::now();
        // A session the cluster's scheduler still holds in its queue has no runner yet to hear from: its
        // silence counts from when it leaves the queue.
        let queued: Vec<String> = self
            .launcher
            .queue
            .launched()
            .into_iter()
            .filter(|name| self.launcher.executor.waiting_reason(name).is_some())
            .collect();
        self.launcher.queue.heard_from(&queued, now);
        for name in self.launcher.queue.silent(timeout, now) {
            let reason = silent_reason(timeout);
            tracing::warn!(session = %name, "{reason}");
            if let Err(err) = self.launcher.handler.fail(&name, -1, &reason).await {
                tracing::error!(session = %name, %err, "could not fail a session whose runner is lost");
                continue;
            }
            self.launcher.executor.stop(&name).await;
            self.launcher.ended(&name).await;
        }
    }

    /// Sweeps for silent runners until `cancel`.
    pub fn spawn(self, cancel: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.settings.sweep_every);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => self.sweep_silent_runners().await,
                }
            }
        })
    }
}
