//! The session read model: every session with its current status, summary and checkpoints, plus what the
//! service needs to know of datasets and competitions.

use std::collections::{BTreeMap, HashMap, HashSet};

use nsml_common::event::decode;
use nsml_common::projection::ReadModel;
use nsml_eventstore::StoredEvent;
use nsml_proto::v1::{
    CheckpointDeleted, CheckpointSaved, CodeUploaded, CompetitionApplied, DatasetRegistered,
    MemoChanged, MetricPoint, MetricsReported, Policy, Session, SessionAdmitted, SessionExited,
    SessionFailed, SessionRejected, SessionRemoved, SessionRequested, SessionStarted,
    SessionStatus, SessionStopRequested, SessionStopped,
};

/// A session as listed, with what only the read model tracks.
#[derive(Debug, Clone)]
pub struct Entry {
    pub session: Session,
    pub removed: bool,
    pub rejected: bool,
    /// The quota service granted its resources.
    pub admitted: bool,
    pub checkpoints: BTreeMap<String, u64>,
    pub metrics: Vec<MetricPoint>,
}

#[derive(Debug, Default)]
pub struct Sessions {
    pub sessions: BTreeMap<String, Entry>,
    /// Dataset → competition.
    pub datasets: HashMap<String, String>,
    pub policies: HashMap<String, Policy>,
    /// Code snapshot → the teams that uploaded it (content-addressed: identical code shares an id).
    pub code: HashMap<String, HashSet<String>>,
}

impl Sessions {
    /// The session, if it exists and was neither rejected nor removed.
    pub fn live(&self, name: &str) -> Option<&Entry> {
        self.sessions
            .get(name)
            .filter(|e| !e.removed && !e.rejected)
    }

    fn with(&mut self, name: &str, f: impl FnOnce(&mut Entry)) {
        if let Some(e) = self.sessions.get_mut(name) {
            f(e);
        }
    }
}

impl ReadModel for Sessions {
    fn apply(&mut self, ev: &StoredEvent) {
        if let Some(e) = decode::<SessionRequested>(ev) {
            if let Some(s) = e.session {
                self.sessions.insert(
                    s.name.clone(),
                    Entry {
                        session: s,
                        removed: false,
                        rejected: false,
                        admitted: false,
                        checkpoints: BTreeMap::new(),
                        metrics: Vec::new(),
                    },
                );
            }
        } else if let Some(e) = decode::<SessionRejected>(ev) {
            self.with(&e.name, |s| {
                s.rejected = true;
                s.session.reason = e.reason;
            });
        } else if let Some(e) = decode::<SessionAdmitted>(ev) {
            self.with(&e.name, |s| s.admitted = true);
        } else if let Some(e) = decode::<SessionStarted>(ev) {
            self.with(&e.name, |s| {
                s.session.set_status(SessionStatus::Running);
                s.session.started_at_ms = e.at_ms;
                s.session.gpu_ids = e.gpu_ids;
            });
        } else if let Some(e) = decode::<MetricsReported>(ev) {
            self.with(&e.name, |s| {
                if let Some(p) = e.point {
                    if p.summary {
                        s.session.summary_json = p.metrics_json.clone();
                    }
                    s.metrics.push(p);
                }
            });
        } else if let Some(e) = decode::<SessionStopRequested>(ev) {
            self.with(&e.name, |s| s.session.set_status(SessionStatus::Stopping));
        } else if let Some(e) = decode::<SessionExited>(ev) {
            self.with(&e.name, |s| {
                s.session.set_status(SessionStatus::Exited);
                s.session.exit_code = e.exit_code;
                s.session.ended_at_ms = e.at_ms;
            });
        } else if let Some(e) = decode::<SessionFailed>(ev) {
            self.with(&e.name, |s| {
                s.session.set_status(SessionStatus::Failed);
                s.session.exit_code = e.exit_code;
                s.session.reason = e.reason;
                s.session.ended_at_ms = e.at_ms;
            });
        } else if let Some(e) = decode::<SessionStopped>(ev) {
            self.with(&e.name, |s| {
                s.session.set_status(SessionStatus::Stopped);
                s.session.ended_at_ms = e.at_ms;
            });
        } else if let Some(e) = decode::<SessionRemoved>(ev) {
            self.with(&e.name, |s| s.removed = true);
        } else if let Some(e) = decode::<MemoChanged>(ev) {
            self.with(&e.name, |s| s.session.memo = e.memo);
        } else if let Some(e) = decode::<CheckpointSaved>(ev) {
            if let Some(c) = e.checkpoint {
                self.with(&c.session, |s| {
                    s.checkpoints.insert(c.name.clone(), c.size_bytes);
                });
            }
        } else if let Some(e) = decode::<CheckpointDeleted>(ev) {
            self.with(&e.session, |s| {
                s.checkpoints.remove(&e.checkpoint);
            });
        } else if let Some(e) = decode::<CodeUploaded>(ev) {
            if let Some(snap) = e.snapshot {
                self.code.entry(snap.id).or_default().insert(snap.team);
            }
        } else if let Some(e) = decode::<DatasetRegistered>(ev) {
            if let Some(meta) = e.dataset.and_then(|d| d.meta) {
                self.datasets.insert(meta.name, meta.competition);
            }
        } else if let Some(e) = decode::<CompetitionApplied>(ev)
            && let Some(c) = e.competition
        {
            for d in &c.datasets {
                self.datasets.insert(d.name.clone(), c.id.clone());
            }
            if let Some(p) = c.policy {
                self.policies.insert(c.id, p);
            }
        }
    }
}

/// The session as the API shows it: checkpoint count and size filled in.
pub fn view(e: &Entry) -> Session {
    let mut s = e.session.clone();
    s.checkpoint_count = e.checkpoints.len() as u32;
    s.checkpoint_bytes = e.checkpoints.values().sum();
    s
}
