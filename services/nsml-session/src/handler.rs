//! Command handling: load a session's stream, decide against its state, append the event, then wait until
//! the read model shows it (so a call right after sees the change). Also the reads that decisions rest on.

use std::sync::Arc;
use std::time::Duration;

use nsml_common::aggregate::{Aggregates, Outcome};
use nsml_common::caller::Caller;
use nsml_common::event::new_event;
use nsml_common::names::{SessionName, sessions_stream};
use nsml_common::now_ms;
use nsml_common::projection::Projection;
use nsml_eventstore::{EventStore, ExpectedVersion, NewEvent};
use nsml_proto::v1::{MetricPoint, MetricsReported, Session, SessionFailed, SessionRequested};

use crate::domain::{Lite, TeamDataset, is_ended};
use crate::error::SessionError;
use crate::projection::{Entry, Sessions};

/// How long a write waits for the read model to show it before answering anyway.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a run waits for the upload of its code to reach the read model.
const CODE_TIMEOUT: Duration = Duration::from_secs(5);

/// The session log's state and the commands that change it, shared by every part of the service.
pub struct Handler {
    store: Arc<dyn EventStore>,
    proj: Arc<Projection<Sessions>>,
    streams: Aggregates<TeamDataset>,
}

impl Handler {
    /// Builds the handlers over a running projection.
    pub fn new(store: Arc<dyn EventStore>, proj: Arc<Projection<Sessions>>) -> Self {
        Self {
            streams: Aggregates::new(store.clone()),
            store,
            proj,
        }
    }

    /// Reads the read model.
    pub fn read<R>(&self, f: impl FnOnce(&Sessions) -> R) -> R {
        self.proj.read(f)
    }

    /// What a live view of the read model follows: its position, and when it stops.
    pub fn live(
        &self,
    ) -> (
        tokio::sync::watch::Receiver<u64>,
        tokio_util::sync::CancellationToken,
    ) {
        self.proj.live()
    }

    /// The status the read model shows for a session, if it knows it.
    fn status_of(&self, name: &str) -> Option<nsml_proto::v1::SessionStatus> {
        self.read(|s| s.sessions.get(name).map(|e| e.session.status()))
    }

    /// Waits until the read model shows `position`. Called after an append is stored: the caller must not
    /// repeat it, so a lag is logged, not returned.
    async fn settle(&self, position: u64) {
        if let Err(lag) = self.proj.wait_for(position, SETTLE_TIMEOUT).await {
            tracing::warn!(%lag, "the session view did not show an append in time");
        }
    }

    /// Appends an event to a session's stream unless `skip` says the transition already happened, and waits
    /// until the read model shows it.
    pub async fn transition(
        &self,
        name: &str,
        skip: impl Fn(&Lite) -> bool,
        event: NewEvent,
    ) -> Result<(), SessionError> {
        self.transition_by(name, |l| (!skip(l)).then(|| event.clone()))
            .await
    }

    /// Appends the event `decide` makes of the session's state as recorded (none: the transition already
    /// happened), and waits until the read model shows it.
    pub async fn transition_by(
        &self,
        name: &str,
        decide: impl Fn(&Lite) -> Option<NewEvent>,
    ) -> Result<(), SessionError> {
        if let Some(position) = self.record_by(name, decide).await? {
            self.settle(position).await;
        }
        Ok(())
    }

    /// Appends an event to a session's stream unless `skip` says the transition already happened; returns the
    /// event's position when it was appended.
    pub async fn record(
        &self,
        name: &str,
        skip: impl Fn(&Lite) -> bool,
        event: NewEvent,
    ) -> Result<Option<u64>, SessionError> {
        self.record_by(name, |l| (!skip(l)).then(|| event.clone()))
            .await
    }

    /// Appends the event `decide` makes of the session's state as recorded, if any; returns the event's
    /// position when it was appended.
    pub async fn record_by(
        &self,
        name: &str,
        decide: impl Fn(&Lite) -> Option<NewEvent>,
    ) -> Result<Option<u64>, SessionError> {
        let sn = SessionName::parse(name)?;
        let outcome = self
            .streams
            .execute(&sn.stream(), |state, _| {
                match state.sessions.get(&sn.number) {
                    None => Err(SessionError::SessionNotFound {
                        name: name.to_string(),
                    }),
                    Some(l) => Ok(decide(l).into_iter().collect()),
                }
            })
            .await
            .map_err(SessionError::store("recording a session change"))?;
        match outcome {
            Outcome::Committed { appended } => Ok(Some(appended.last_position)),
            Outcome::Unchanged { .. } => Ok(None),
            Outcome::Rejected(err) => Err(err),
        }
    }

    /// Allocates the next number on the team's dataset and records the request.
    pub async fn request(&self, template: Session, actor: &str) -> Result<Session, SessionError> {
        let stream = sessions_stream(&template.team, &template.dataset);
        let mut made = None;
        let outcome = self
            .streams
            .execute(&stream, |state, _| {
                let n = state.next_number();
                let mut s = template.clone();
                s.number = n;
                s.name = format!("{}/{}/{}", s.team, s.dataset, n);
                let ev = new_event(
                    &SessionRequested {
                        session: Some(s.clone()),
                    },
                    actor,
                    "",
                );
                made = Some(s);
                Ok::<_, SessionError>(vec![ev])
            })
            .await
            .map_err(SessionError::store("recording a session request"))?;
        if let Outcome::Rejected(err) = outcome {
            return Err(err);
        }
        made.ok_or_else(|| SessionError::internal("requesting a session")("no session made"))
    }

    /// Records that a session failed, unless it has ended already.
    pub async fn fail(&self, name: &str, exit_code: i32, reason: &str) -> Result<(), SessionError> {
        self.transition(
            name,
            |l| l.ended(),
            new_event(
                &SessionFailed {
                    name: name.to_string(),
                    exit_code,
                    reason: reason.to_string(),
                    at_ms: now_ms(),
                },
                "service:session",
                "",
            ),
        )
        .await
    }

    /// Records a metric point a session's program reported.
    pub async fn report(&self, name: &str, point: Option<MetricPoint>) -> Result<(), SessionError> {
        let sn = SessionName::parse(name)?;
        let ev = new_event(
            &MetricsReported {
                name: name.to_string(),
                point,
            },
            "runner",
            "",
        );
        let a = self
            .store
            .append(&sn.stream(), ExpectedVersion::Any, vec![ev])
            .await
            .map_err(SessionError::store("recording metrics"))?;
        self.settle(a.last_position).await;
        Ok(())
    }

    /// Requires `snapshot` to be code that `team` uploaded, as the read model has it now, for a client that
    /// named its code by its hash without knowing whether it was uploaded (`RunRequest.code_unconfirmed`) and
    /// uploads it when refused: nothing is waited for, and a snapshot only another team uploaded is refused as
    /// unknown, as `FindCode` refuses it (the caller is not to learn that another team has that code).
    pub fn check_code_now(&self, team: &str, snapshot: &str) -> Result<(), SessionError> {
        let known = self.read(|s| s.code.get(snapshot).is_some_and(|t| t.contains(team)));
        if known {
            Ok(())
        } else {
            Err(SessionError::CodeNotFound {
                snapshot: snapshot.to_string(),
            })
        }
    }

    /// Requires `snapshot` to be code that `team` uploaded: another team's snapshot id must not run in this
    /// team's session, whose checkpoints and logs would hand that code over. The upload's event may reach this
    /// service's read model a moment after the upload returned, so a snapshot not known yet, or known only as
    /// another team's (teams that upload the same code share its snapshot), is waited for.
    pub async fn check_code(&self, team: &str, snapshot: &str) -> Result<(), SessionError> {
        let deadline = tokio::time::Instant::now() + CODE_TIMEOUT;
        loop {
            let teams = self.read(|s| s.code.get(snapshot).cloned());
            match teams {
                Some(t) if t.contains(team) => return Ok(()),
                _ if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Some(_) => {
                    return Err(SessionError::CodeOfAnotherTeam {
                        snapshot: snapshot.to_string(),
                    });
                }
                None => {
                    return Err(SessionError::CodeNotFound {
                        snapshot: snapshot.to_string(),
                    });
                }
            }
        }
    }

    /// Finds a session the caller may see.
    pub fn visible(&self, caller: &Caller, name: &str) -> Result<Entry, SessionError> {
        caller.require_authenticated()?;
        SessionName::parse(name)?;
        let e = self
            .read(|s| s.live(name).cloned())
            .ok_or_else(|| SessionError::NotListed {
                name: name.to_string(),
            })?;
        if !caller.may_access_team(&e.session.team, &e.session.competition) {
            return Err(SessionError::OtherTeam {
                name: name.to_string(),
            });
        }
        Ok(e)
    }

    /// Whether a session has ended (or is unknown) in the read model.
    pub fn has_ended(&self, name: &str) -> bool {
        self.status_of(name).is_none_or(is_ended)
    }

    /// Waits up to `timeout` for a session to end; returns whether it did.
    pub async fn wait_ended(&self, name: &str, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.has_ended(name) {
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
