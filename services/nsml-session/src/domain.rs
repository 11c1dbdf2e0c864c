//! The sessions of one team on one dataset (stream `sessions-TEAM/DATASET`): numbering and the state machine
//! Queued → Running → Stopping → Exited / Failed / Stopped.

use std::collections::BTreeMap;

use nsml_common::aggregate::Aggregate;
use nsml_common::event::decode;
use nsml_eventstore::StoredEvent;
use nsml_proto::v1::{
    SessionAdmitted, SessionExited, SessionFailed, SessionKind, SessionRejected, SessionRemoved,
    SessionRequested, SessionStarted, SessionStatus, SessionStopRequested, SessionStopped,
};

/// What the stream knows of one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lite {
    pub status: SessionStatus,
    pub kind: SessionKind,
    pub removed: bool,
    pub rejected: bool,
}

impl Lite {
    /// Whether the session has ended.
    pub fn ended(&self) -> bool {
        self.rejected
            || matches!(
                self.status,
                SessionStatus::Exited | SessionStatus::Failed | SessionStatus::Stopped
            )
    }
}

/// All sessions of a team on a dataset.
#[derive(Debug, Clone, Default)]
pub struct TeamDataset {
    pub sessions: BTreeMap<u64, Lite>,
}

impl TeamDataset {
    /// The number the next session gets: N is shared by training and submit sessions.
    pub fn next_number(&self) -> u64 {
        self.sessions.keys().next_back().map_or(1, |n| n + 1)
    }
}

/// A change to one session's state.
type Mark = Box<dyn Fn(&mut Lite)>;

fn number_of(name: &str) -> Option<u64> {
    name.rsplit('/').next()?.parse().ok()
}

impl Aggregate for TeamDataset {
    fn apply(&mut self, ev: &StoredEvent) {
        if let Some(e) = decode::<SessionRequested>(ev) {
            if let Some(s) = e.session {
                self.sessions.insert(
                    s.number,
                    Lite {
                        status: SessionStatus::Queued,
                        kind: s.kind(),
                        removed: false,
                        rejected: false,
                    },
                );
            }
            return;
        }
        let (name, f): (String, Mark) = if let Some(e) = decode::<SessionRejected>(ev) {
            (e.name, Box::new(|l| l.rejected = true))
        } else if let Some(e) = decode::<SessionAdmitted>(ev) {
            (e.name, Box::new(|_| {}))
        } else if let Some(e) = decode::<SessionStarted>(ev) {
            (e.name, Box::new(|l| l.status = SessionStatus::Running))
        } else if let Some(e) = decode::<SessionStopRequested>(ev) {
            (e.name, Box::new(|l| l.status = SessionStatus::Stopping))
        } else if let Some(e) = decode::<SessionExited>(ev) {
            (e.name, Box::new(|l| l.status = SessionStatus::Exited))
        } else if let Some(e) = decode::<SessionFailed>(ev) {
            (e.name, Box::new(|l| l.status = SessionStatus::Failed))
        } else if let Some(e) = decode::<SessionStopped>(ev) {
            (e.name, Box::new(|l| l.status = SessionStatus::Stopped))
        } else if let Some(e) = decode::<SessionRemoved>(ev) {
            (e.name, Box::new(|l| l.removed = true))
        } else {
            return;
        };
        if let Some(l) = number_of(&name).and_then(|n| self.sessions.get_mut(&n)) {
            f(l);
        }
    }
}

/// The status a runner's finish report leads to.
pub fn finish_status(exit_code: i32, reason: &str, stopped: bool) -> SessionStatus {
    if stopped {
        SessionStatus::Stopped
    } else if exit_code == 0 && reason.is_empty() {
        SessionStatus::Exited
    } else {
        SessionStatus::Failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finishing_maps_to_nsml_states() {
        assert_eq!(finish_status(0, "", false), SessionStatus::Exited);
        assert_eq!(
            finish_status(1, "exited with code 1", false),
            SessionStatus::Failed
        );
        assert_eq!(finish_status(137, "", false), SessionStatus::Failed);
        assert_eq!(finish_status(143, "", true), SessionStatus::Stopped);
    }

    #[test]
    fn numbers_continue_after_the_highest() {
        let mut td = TeamDataset::default();
        assert_eq!(td.next_number(), 1);
        td.sessions.insert(
            3,
            Lite {
                status: SessionStatus::Exited,
                kind: SessionKind::Train,
                removed: true,
                rejected: false,
            },
        );
        assert_eq!(td.next_number(), 4);
    }
}
