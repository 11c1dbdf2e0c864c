//! The session read model: every session with its current status, summary and checkpoints, plus what the
//! service needs to know of datasets and competitions.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::domain::status_after_start;
use nsml_common::event::{decode, decode_part};
use nsml_common::projection::ReadModel;
use nsml_eventstore::StoredEvent;
use nsml_proto::v1::{
    AdmissionDenied, CheckpointDeleted, CheckpointSaved, CodeUploaded, CompetitionApplied,
    DatasetRegistered, EventPayload, MemoChanged, MetricPoint, MetricsReported, Policy, Session,
    SessionAdmitted, SessionExited, SessionFailed, SessionRejected, SessionRemoved,
    SessionRequested, SessionStarted, SessionStatus, SessionStopRequested, SessionStopped,
};

/// A session as listed, with what only the read model tracks.
#[derive(Debug, Clone)]
pub struct Entry {
    pub session: Session,
    pub removed: bool,
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
    /// Competition → its host environments (`#nsml: NAME`).
    pub environments: HashMap<String, Vec<nsml_proto::v1::Environment>>,
    /// Code snapshot → the teams that uploaded it (content-addressed: identical code shares an id).
    pub code: HashMap<String, HashSet<String>>,
}

impl Sessions {
    /// The session, if it exists and was neither rejected nor removed.
    pub fn live(&self, name: &str) -> Option<&Entry> {
        self.sessions.get(name).filter(|e| !e.removed)
    }

    fn with(&mut self, name: &str, f: impl FnOnce(&mut Entry)) {
        if let Some(e) = self.sessions.get_mut(name) {
            f(e);
        }
    }
}

/// What the read model reads of a refusal (`AdmissionDenied`), most of a busy log: the session refused, under
/// the tags of `AdmissionDenied.request` and `AdmitRequest.session`; the rest of the request and the decision
/// are skipped.
#[derive(Clone, PartialEq, prost::Message)]
struct AdmissionDeniedPart {
    #[prost(message, optional, tag = "1")]
    request: Option<AdmitRequestPart>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct AdmitRequestPart {
    #[prost(string, tag = "4")]
    session: String,
}

impl ReadModel for Sessions {
    const TYPES: Option<&'static [&'static str]> = Some(&[
        SessionRequested::TYPE,
        SessionRejected::TYPE,
        AdmissionDenied::TYPE,
        SessionAdmitted::TYPE,
        SessionStarted::TYPE,
        MetricsReported::TYPE,
        SessionStopRequested::TYPE,
        SessionExited::TYPE,
        SessionFailed::TYPE,
        SessionStopped::TYPE,
        SessionRemoved::TYPE,
        MemoChanged::TYPE,
        CheckpointSaved::TYPE,
        CheckpointDeleted::TYPE,
        CodeUploaded::TYPE,
        DatasetRegistered::TYPE,
        CompetitionApplied::TYPE,
    ]);

    fn apply(&mut self, ev: &StoredEvent) {
        if !self.apply_lifecycle(ev) {
            self.apply_outside(ev);
        }
    }
}

impl Sessions {
    /// Applies an event of a session's own stream; returns whether it was one.
    fn apply_lifecycle(&mut self, ev: &StoredEvent) -> bool {
        if let Some(e) = decode::<SessionRequested>(ev) {
            if let Some(s) = e.session {
                self.sessions.insert(
                    s.name.clone(),
                    Entry {
                        session: s,
                        removed: false,
                        admitted: false,
                        checkpoints: BTreeMap::new(),
                        metrics: Vec::new(),
                    },
                );
            }
        } else if let Some(e) = decode::<SessionRejected>(ev) {
            // A rejected session is never shown and holds nothing: it leaves the read model (its number stays
            // taken in its stream). Refused requests cost no memory however many come.
            self.sessions.remove(&e.name);
        } else if let Some(e) = decode_part::<AdmissionDenied, AdmissionDeniedPart>(ev) {
            // The quota service's refusal is the session's rejection; the session service records none of
            // its own for it.
            if let Some(r) = e.request {
                self.sessions.remove(&r.session);
            }
        } else if let Some(e) = decode::<SessionAdmitted>(ev) {
            self.with(&e.name, |s| s.admitted = true);
        } else if let Some(e) = decode::<SessionStarted>(ev) {
            self.with(&e.name, |s| {
                let status = status_after_start(s.session.status());
                s.session.set_status(status);
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
        } else {
            return false;
        }
        true
    }

    /// Applies what other services record that sessions depend on: checkpoints, code, datasets and
    /// competitions' policies.
    fn apply_outside(&mut self, ev: &StoredEvent) {
        if let Some(e) = decode::<CheckpointSaved>(ev) {
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
            self.environments
                .insert(c.id.clone(), c.environments.clone());
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

/// Has each metrics scrape count the sessions by status (`nsml_sessions`), and those admitted and waiting for
/// cluster capacity (`nsml_session_queue_depth`).
pub fn sample_metrics(projection: &std::sync::Arc<nsml_common::projection::Projection<Sessions>>) {
    const STATES: [SessionStatus; 6] = [
        SessionStatus::Queued,
        SessionStatus::Running,
        SessionStatus::Stopping,
        SessionStatus::Exited,
        SessionStatus::Failed,
        SessionStatus::Stopped,
    ];
    let projection = std::sync::Arc::downgrade(projection);
    let gauges = STATES.map(|s| {
        let state = s
            .as_str_name()
            .trim_start_matches("SESSION_STATUS_")
            .to_lowercase();
        metrics::gauge!("nsml_sessions", "state" => state)
    });
    let queued = metrics::gauge!("nsml_session_queue_depth");
    nsml_common::metrics::sampler(move || {
        if let Some(projection) = projection.upgrade() {
            let (counts, waiting) = projection.read(|p| {
                let mut counts = [0u64; STATES.len()];
                let mut waiting = 0u64;
                for e in p.sessions.values().filter(|e| !e.removed) {
                    let status = e.session.status();
                    if let Some(i) = STATES.iter().position(|s| *s == status) {
                        counts[i] += 1;
                    }
                    waiting += u64::from(status == SessionStatus::Queued && e.admitted);
                }
                (counts, waiting)
            });
            for (gauge, n) in gauges.iter().zip(counts) {
                gauge.set(n as f64);
            }
            queued.set(waiting as f64);
        }
        Box::pin(async {})
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsml_proto::v1::{AdmitRequest, Decision, EventPayload, ResourcesGranted};

    fn stored<P: EventPayload>(position: u64, payload: &P) -> StoredEvent {
        nsml_common::event::stored("test", position, payload)
    }

    fn requested(name: &str) -> SessionRequested {
        SessionRequested {
            session: Some(Session {
                name: name.into(),
                team: "t1".into(),
                dataset: "d".into(),
                ..Default::default()
            }),
        }
    }

    fn request(session: &str) -> AdmitRequest {
        AdmitRequest {
            team: "t1".into(),
            session: session.into(),
            command_id: session.into(),
            ..Default::default()
        }
    }

    fn decision(granted: bool, reason: &str) -> Decision {
        Decision {
            granted,
            reason: reason.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_quota_services_refusal_rejects_the_session_it_names() {
        let mut m = Sessions::default();
        m.apply(&stored(1, &requested("t1/d/1")));
        m.apply(&stored(2, &requested("t1/d/2")));
        m.apply(&stored(
            3,
            &AdmissionDenied {
                request: Some(request("t1/d/2")),
                decision: Some(decision(false, "team_sessions: 2 of 2 held")),
            },
        ));
        m.apply(&stored(
            4,
            &ResourcesGranted {
                request: Some(request("t1/d/1")),
                decision: Some(decision(true, "")),
            },
        ));
        assert!(m.live("t1/d/1").is_some(), "a grant rejects nothing");
        assert!(m.live("t1/d/2").is_none(), "a refused session is not shown");
        assert!(
            !m.sessions.contains_key("t1/d/2"),
            "nor kept: refused requests cost the read model nothing"
        );
    }

    #[test]
    fn a_refusal_naming_an_unknown_session_changes_nothing() {
        let mut m = Sessions::default();
        m.apply(&stored(1, &requested("t1/d/1")));
        m.apply(&stored(
            2,
            &AdmissionDenied {
                request: Some(request("t1/d/9")),
                decision: Some(decision(false, "no")),
            },
        ));
        assert_eq!(m.sessions.len(), 1);
        assert!(m.live("t1/d/1").is_some());
    }
}
