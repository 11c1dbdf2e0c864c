//! Admitted sessions wait as Queued ("Allocated, not created yet") until the cluster has room for them.
//!
//! A team's quota decides whether a session may hold resources at all; the cluster's capacity (the
//! executor's configuration) decides when it starts. Sessions start first come, first served within a team,
//! and a team whose next session does not fit yet does not hold back another team's that does.
//!
//! [`Dispatcher`] is the queue and the ledger of what launched sessions hold; [`Launcher`] hands what fits
//! to the executor and frees what ended sessions held.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nsml_common::executor::{Capacity, Executor};
use nsml_proto::v1::{Resources, Session, SessionStatus};
use parking_lot::Mutex;

use crate::error::SessionError;
use crate::handler::Handler;
use crate::logs::LogStore;
use crate::projection::{Entry, view};

/// What a queued session's reason says while it waits for the cluster.
pub const WAITING_REASON: &str = "Allocated, not created yet: waiting for free cluster capacity";

/// Starts admitted sessions on the executor as the cluster has room, and frees what ended ones held.
pub struct Launcher {
    pub handler: Arc<Handler>,
    pub executor: Arc<dyn Executor>,
    pub logs: Arc<LogStore>,
    pub queue: Dispatcher,
}

impl Launcher {
    pub fn new(handler: Arc<Handler>, executor: Arc<dyn Executor>, logs: Arc<LogStore>) -> Self {
        Self {
            handler,
            executor,
            logs,
            queue: Dispatcher::default(),
        }
    }

    /// Queues an admitted session and starts whatever fits the cluster now; a start failure of this
    /// session is the caller's error.
    pub async fn launch(&self, s: &Session, time_limit_secs: u64) -> Result<(), SessionError> {
        // The runner's spans join the trace of the call that asked for the session, however long it queues.
        let traced = Session {
            traceparent: nsml_common::telemetry::current_traceparent(),
            ..s.clone()
        };
        self.queue.enqueue(traced, time_limit_secs);
        self.pump().await;
        let failed = self.handler.read(|st| {
            st.sessions
                .get(&s.name)
                .filter(|e| e.session.status() == SessionStatus::Failed)
                .map(|e| e.session.reason.clone())
        });
        match failed {
            Some(reason) => Err(SessionError::CouldNotStart {
                name: s.name.clone(),
                reason,
            }),
            None => Ok(()),
        }
    }

    /// Hands every queued session that fits the cluster to the executor; a start failure fails the session.
    pub async fn pump(&self) {
        loop {
            let ready = self.queue.take_ready(self.executor.capacity());
            if ready.is_empty() {
                return;
            }
            for w in ready {
                let name = w.session.name.clone();
                if let Err(reason) = self.executor.start(w.session, w.time_limit_secs).await {
                    if let Err(err) = self.handler.fail(&name, -1, &reason).await {
                        tracing::error!(session = %name, %err, "could not record a failed start");
                    }
                    self.logs.end(&name);
                    self.queue.forget(&name);
                }
            }
        }
    }

    /// What every ended session needs: followers told, its cluster resources freed for the queue.
    pub async fn ended(&self, name: &str) {
        self.logs.end(name);
        self.queue.forget(name);
        self.pump().await;
    }

    /// The session as the API shows it, saying why a queued session has not started.
    pub fn shown(&self, e: &Entry) -> Session {
        let mut s = view(e);
        if self.queue.is_waiting(&s.name) {
            s.reason = WAITING_REASON.into();
        } else if s.status() == SessionStatus::Queued
            && let Some(why) = self.executor.waiting_reason(&s.name)
        {
            s.reason = why;
        }
        s
    }

    /// The session `name` as the API shows it, or `fallback` when the read model does not show it yet.
    pub fn shown_or(&self, name: &str, fallback: Session) -> Session {
        self.handler
            .read(|st| st.sessions.get(name).map(|e| self.shown(e)))
            .unwrap_or(fallback)
    }
}

/// A session waiting for capacity.
#[derive(Debug, Clone)]
pub struct Waiting {
    pub session: Session,
    pub time_limit_secs: u64,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Waiting>,
    /// Sessions handed to the executor and not ended, with what they hold of the cluster.
    launched: HashMap<String, Launched>,
}

#[derive(Debug)]
struct Launched {
    resources: Resources,
    /// When its runner last reported (or when it was launched).
    last_seen: Instant,
}

/// The queue of admitted sessions and the cluster resources launched sessions hold.
#[derive(Debug, Default)]
pub struct Dispatcher {
    state: Mutex<State>,
}

fn fits(cap: Capacity, used: &Resources, asked: &Resources) -> bool {
    cap.gpus.is_none_or(|g| used.gpus + asked.gpus <= g)
        && cap.cpus.is_none_or(|c| used.cpus + asked.cpus <= c)
}

impl Dispatcher {
    /// Queues an admitted session.
    pub fn enqueue(&self, session: Session, time_limit_secs: u64) {
        let mut st = self.state.lock();
        if st.launched.contains_key(&session.name)
            || st.queue.iter().any(|w| w.session.name == session.name)
        {
            return;
        }
        st.queue.push_back(Waiting {
            session,
            time_limit_secs,
        });
    }

    /// Takes the queued sessions that fit now and counts them as launched.
    pub fn take_ready(&self, cap: Capacity) -> Vec<Waiting> {
        self.take_ready_at(cap, Instant::now())
    }

    fn take_ready_at(&self, cap: Capacity, now: Instant) -> Vec<Waiting> {
        let mut st = self.state.lock();
        let mut used = st.launched.values().fold(Resources::default(), |mut a, l| {
            a.gpus += l.resources.gpus;
            a.cpus += l.resources.cpus;
            a
        });
        let mut blocked: HashSet<String> = HashSet::new();
        let mut ready = Vec::new();
        let mut rest = VecDeque::new();
        while let Some(w) = st.queue.pop_front() {
            let asked = w.session.resources.unwrap_or_default();
            if !blocked.contains(&w.session.team) && fits(cap, &used, &asked) {
                used.gpus += asked.gpus;
                used.cpus += asked.cpus;
                ready.push(w);
            } else {
                // First come, first served within a team: its later sessions wait behind this one.
                blocked.insert(w.session.team.clone());
                rest.push_back(w);
            }
        }
        st.queue = rest;
        for w in &ready {
            st.launched.insert(
                w.session.name.clone(),
                Launched {
                    resources: w.session.resources.unwrap_or_default(),
                    last_seen: now,
                },
            );
        }
        ready
    }

    /// Counts a session whose runner survived a restart of the service as launched: it holds its resources
    /// and its runner is watched, as if it had been launched by this dispatcher.
    pub fn adopt(&self, session: &Session, now: Instant) {
        let mut st = self.state.lock();
        st.queue.retain(|w| w.session.name != session.name);
        st.launched.insert(
            session.name.clone(),
            Launched {
                resources: session.resources.unwrap_or_default(),
                last_seen: now,
            },
        );
    }

    /// Records that the runners of `names` are alive.
    pub fn heard_from(&self, names: &[String], now: Instant) {
        let mut st = self.state.lock();
        for n in names {
            if let Some(l) = st.launched.get_mut(n) {
                l.last_seen = now;
            }
        }
    }

    /// The sessions handed to the executor and not ended.
    pub fn launched(&self) -> Vec<String> {
        let mut names: Vec<String> = self.state.lock().launched.keys().cloned().collect();
        names.sort();
        names
    }

    /// Launched sessions whose runner has not reported for longer than `timeout`.
    pub fn silent(&self, timeout: Duration, now: Instant) -> Vec<String> {
        let st = self.state.lock();
        let mut names: Vec<String> = st
            .launched
            .iter()
            .filter(|(_, l)| now.saturating_duration_since(l.last_seen) > timeout)
            .map(|(n, _)| n.clone())
            .collect();
        names.sort();
        names
    }

    /// Forgets a session that ended or was stopped; returns whether it was still waiting in the queue.
    pub fn forget(&self, name: &str) -> bool {
        let mut st = self.state.lock();
        st.launched.remove(name);
        let before = st.queue.len();
        st.queue.retain(|w| w.session.name != name);
        st.queue.len() != before
    }

    /// Whether a session is waiting for capacity.
    pub fn is_waiting(&self, name: &str) -> bool {
        self.state
            .lock()
            .queue
            .iter()
            .any(|w| w.session.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(name: &str, gpus: u32, cpus: u32) -> Session {
        Session {
            name: name.into(),
            team: name.split('/').next().unwrap_or_default().into(),
            resources: Some(Resources {
                gpus,
                cpus,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn names(w: &[Waiting]) -> Vec<&str> {
        w.iter().map(|w| w.session.name.as_str()).collect()
    }

    const ONE_GPU: Capacity = Capacity {
        gpus: Some(1),
        cpus: None,
    };

    #[test]
    fn given_a_busy_cluster_when_capacity_frees_then_the_next_session_starts() {
        let d = Dispatcher::default();
        d.enqueue(s("a/ds/1", 1, 2), 0);
        d.enqueue(s("b/ds/1", 1, 2), 0);
        assert_eq!(names(&d.take_ready(ONE_GPU)), ["a/ds/1"]);
        assert!(
            d.take_ready(ONE_GPU).is_empty(),
            "b waits while a holds the GPU"
        );
        assert!(d.is_waiting("b/ds/1"));
        d.forget("a/ds/1");
        assert_eq!(names(&d.take_ready(ONE_GPU)), ["b/ds/1"]);
    }

    #[test]
    fn a_team_whose_head_does_not_fit_does_not_block_other_teams() {
        let d = Dispatcher::default();
        let cap = Capacity {
            gpus: Some(2),
            cpus: None,
        };
        d.enqueue(s("a/ds/1", 1, 1), 0);
        assert_eq!(names(&d.take_ready(cap)), ["a/ds/1"]);
        d.enqueue(s("a/ds/2", 2, 1), 0);
        d.enqueue(s("a/ds/3", 1, 1), 0);
        d.enqueue(s("b/ds/1", 1, 1), 0);
        // a/ds/2 does not fit; a/ds/3 waits behind it (first come, first served in team a); b goes.
        assert_eq!(names(&d.take_ready(cap)), ["b/ds/1"]);
        d.forget("a/ds/1");
        d.forget("b/ds/1");
        assert_eq!(names(&d.take_ready(cap)), ["a/ds/2"]);
    }

    #[test]
    fn cpus_count_too_and_no_capacity_means_no_queue() {
        let d = Dispatcher::default();
        let cap = Capacity {
            gpus: None,
            cpus: Some(4),
        };
        d.enqueue(s("a/ds/1", 0, 3), 0);
        d.enqueue(s("b/ds/1", 0, 2), 0);
        assert_eq!(names(&d.take_ready(cap)), ["a/ds/1"]);
        assert_eq!(names(&d.take_ready(Capacity::default())), ["b/ds/1"]);
    }

    #[test]
    fn a_runner_that_goes_silent_is_found() {
        let d = Dispatcher::default();
        let t0 = Instant::now();
        d.enqueue(s("a/ds/1", 0, 1), 0);
        d.enqueue(s("b/ds/1", 0, 1), 0);
        assert_eq!(d.take_ready_at(Capacity::default(), t0).len(), 2);
        let timeout = Duration::from_secs(30);
        d.heard_from(&["a/ds/1".to_string()], t0 + Duration::from_secs(20));
        assert!(d.silent(timeout, t0 + Duration::from_secs(25)).is_empty());
        assert_eq!(d.silent(timeout, t0 + Duration::from_secs(31)), ["b/ds/1"]);
        d.forget("b/ds/1");
        assert_eq!(d.silent(timeout, t0 + Duration::from_secs(51)), ["a/ds/1"]);
    }

    #[test]
    fn given_a_survivor_of_a_restart_when_adopted_then_it_holds_its_resources_and_is_watched() {
        let d = Dispatcher::default();
        let t0 = Instant::now();
        d.adopt(&s("a/ds/1", 1, 1), t0);
        d.enqueue(s("a/ds/2", 1, 1), 0);
        assert!(
            d.take_ready(ONE_GPU).is_empty(),
            "the survivor holds the GPU"
        );
        let timeout = Duration::from_secs(30);
        assert_eq!(d.silent(timeout, t0 + Duration::from_secs(31)), ["a/ds/1"]);
        d.forget("a/ds/1");
        assert_eq!(names(&d.take_ready(ONE_GPU)), ["a/ds/2"]);
    }

    #[test]
    fn a_stopped_waiting_session_leaves_the_queue() {
        let d = Dispatcher::default();
        d.enqueue(s("a/ds/1", 1, 1), 0);
        d.enqueue(s("a/ds/2", 1, 1), 0);
        assert_eq!(names(&d.take_ready(ONE_GPU)), ["a/ds/1"]);
        assert!(d.forget("a/ds/2"));
        d.forget("a/ds/1");
        assert!(d.take_ready(ONE_GPU).is_empty());
    }
}
