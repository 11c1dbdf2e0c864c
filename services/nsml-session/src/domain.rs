//! Pure rules of the session service: the sessions of one team on one dataset (stream
//! `sessions-TEAM/DATASET`), their numbering and the state machine Queued → Running → Stopping → Exited /
//! Failed / Stopped; what a request may ask for; what a runner's report and a quota refusal lead to.

use std::collections::BTreeMap;

use nsml_common::aggregate::Aggregate;
use nsml_common::event::decode;
use nsml_common::executor::Capacity;
use nsml_eventstore::StoredEvent;
use nsml_proto::v1::{
    Resources, SessionAdmitted, SessionExited, SessionFailed, SessionKind, SessionRejected,
    SessionRemoved, SessionRequested, SessionStarted, SessionStatus, SessionStopRequested,
    SessionStopped,
};

use crate::error::SessionError;

pub const GIB: u64 = 1024 * 1024 * 1024;

/// The most GPUs one session may ask for: more than any single machine carries (eight or sixteen today).
/// Beyond it a request is a mistake or an attack on the quota arithmetic, not a workload.
pub const MAX_GPUS: u32 = 64;
/// The most CPUs one session may ask for: more than the cores of any single machine.
pub const MAX_CPUS: u32 = 1024;
/// The most memory one session may ask for, in bytes (16 TiB): more than any single machine has.
pub const MAX_MEMORY_BYTES: u64 = 16 * 1024 * GIB;
/// The most shared memory one session may ask for, in bytes: shared memory is carved out of memory, so no
/// more than [`MAX_MEMORY_BYTES`].
pub const MAX_SHM_BYTES: u64 = MAX_MEMORY_BYTES;

/// Whether a session in `status` has ended.
pub fn is_ended(status: SessionStatus) -> bool {
    matches!(
        status,
        SessionStatus::Exited | SessionStatus::Failed | SessionStatus::Stopped
    )
}

/// The interpreter of the host environment `name` among competition `competition`'s `environments`
/// (empty for no name: the runner's own interpreter); an unknown name is refused with the names that
/// exist.
pub fn environment_python(
    environments: &[nsml_proto::v1::Environment],
    competition: &str,
    name: &str,
) -> Result<String, SessionError> {
    if name.is_empty() {
        return Ok(String::new());
    }
    if let Some(e) = environments.iter().find(|e| e.name == name) {
        return Ok(e.python.clone());
    }
    let known = if environments.is_empty() {
        "it names none; remove the line to run with the platform's Python".to_string()
    } else {
        let names: Vec<String> = environments
            .iter()
            .map(|e| format!("`{}`", e.name))
            .collect();
        format!(
            "it has {}; name one of them, or remove the line to run with the platform's Python",
            names.join(", ")
        )
    };
    Err(SessionError::UnknownEnvironment {
        name: name.to_string(),
        competition: competition.to_string(),
        known,
    })
}

/// Refuses an entry file outside the code directory.
pub fn check_entry(entry: &str) -> Result<(), SessionError> {
    let bad = entry.is_empty()
        || entry.starts_with('/')
        || entry.split('/').any(|p| p == ".." || p.is_empty())
        || entry.contains('\0');
    if bad {
        return Err(SessionError::BadEntry {
            entry: entry.to_string(),
        });
    }
    Ok(())
}

/// Refuses resources beyond what any machine has, naming the field and its maximum. The team's limits are the
/// quota service's to apply; this bound keeps absurd numbers out of the log and the quota arithmetic.
pub fn check_resources(r: &Resources) -> Result<(), SessionError> {
    let over = |field: &'static str, asked: String, max: String| {
        Err(SessionError::TooMuch { field, asked, max })
    };
    if r.gpus > MAX_GPUS {
        return over("gpus", r.gpus.to_string(), format!("{MAX_GPUS} GPUs"));
    }
    if r.cpus > MAX_CPUS {
        return over("cpus", r.cpus.to_string(), format!("{MAX_CPUS} CPUs"));
    }
    if r.memory_bytes > MAX_MEMORY_BYTES {
        return over(
            "memory_bytes",
            format!("{} bytes", r.memory_bytes),
            format!("{MAX_MEMORY_BYTES} bytes (16 TiB)"),
        );
    }
    if r.shm_bytes > MAX_SHM_BYTES {
        return over(
            "shm_bytes",
            format!("{} bytes", r.shm_bytes),
            format!("{MAX_SHM_BYTES} bytes (16 TiB)"),
        );
    }
    Ok(())
}

/// Refuses a session that asks for more than the whole cluster has (`capacity`, where the executor knows it):
/// it would wait as Queued forever, holding its team's quota.
pub fn check_capacity(capacity: Capacity, r: &Resources) -> Result<(), SessionError> {
    if let Some(has) = capacity.gpus
        && r.gpus > has
    {
        let hint = if has == 0 {
            "run on the CPU with `-g 0`".to_string()
        } else {
            format!("ask for at most {has} with `-g {has}`")
        };
        return Err(SessionError::NeverFits {
            asked: count(r.gpus, "GPU"),
            has: count(has, "GPU"),
            hint,
        });
    }
    if let Some(has) = capacity.cpus
        && r.cpus > has
    {
        return Err(SessionError::NeverFits {
            asked: count(r.cpus, "CPU"),
            has: count(has, "CPU"),
            hint: format!("ask for at most {has} with `-c {has}`"),
        });
    }
    Ok(())
}

/// `1 GPU`, `2 GPUs`.
fn count(n: u32, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// A training session's resources, with what the request left out (zero) set to NSML's defaults: one GPU,
/// two CPUs, 24 GiB of memory and 1 GiB of shared memory.
pub fn with_defaults(r: Option<Resources>) -> Resources {
    let mut r = r.unwrap_or(Resources {
        gpus: 1,
        cpus: 2,
        memory_bytes: 24 * GIB,
        shm_bytes: GIB,
    });
    if r.cpus == 0 {
        r.cpus = 2;
    }
    if r.memory_bytes == 0 {
        r.memory_bytes = 24 * GIB;
    }
    if r.shm_bytes == 0 {
        r.shm_bytes = GIB;
    }
    r
}

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
        self.rejected || is_ended(self.status)
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
            (
                e.name,
                Box::new(|l| l.status = status_after_start(l.status)),
            )
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

/// The status a runner's finish report leads to, for a session in `now`. A stop counts as Stopped only
/// when someone asked the platform for it (the session is Stopping); a stop nobody asked for here (an
/// operator cancelling the session's cluster job, say) is a failure with the runner's reason.
pub fn finish_status(
    exit_code: i32,
    reason: &str,
    stopped: bool,
    now: SessionStatus,
) -> SessionStatus {
    if stopped && now == SessionStatus::Stopping {
        SessionStatus::Stopped
    } else if stopped {
        SessionStatus::Failed
    } else if exit_code == 0 && reason.is_empty() {
        SessionStatus::Exited
    } else {
        SessionStatus::Failed
    }
}

/// A session's status once its runner says it started: Running, unless a stop was asked first (a queued job
/// the scheduler started as it was being cancelled), which the start does not undo.
pub fn status_after_start(now: SessionStatus) -> SessionStatus {
    if now == SessionStatus::Stopping {
        SessionStatus::Stopping
    } else {
        SessionStatus::Running
    }
}

/// Why a failed session failed, as recorded: the runner's reason, or the exit code when it gave none.
pub fn failure_reason(exit_code: i32, reason: &str) -> String {
    if reason.is_empty() {
        format!("exited with code {exit_code}")
    } else {
        reason.to_string()
    }
}

/// Why a session the log shows as live has no runner after a restart.
pub fn lost_reason(admitted: bool) -> &'static str {
    if admitted {
        "the runner was lost when the platform restarted"
    } else {
        "the admission was interrupted by a platform restart; run it again"
    }
}

/// Why a session whose runner went silent is failed.
pub fn silent_reason(timeout: std::time::Duration) -> String {
    format!(
        "the runner stopped reporting: no heartbeat for {} seconds",
        timeout.as_secs()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lite(status: SessionStatus) -> Lite {
        Lite {
            status,
            kind: SessionKind::Train,
            removed: false,
            rejected: false,
        }
    }

    #[test]
    fn given_a_cluster_without_enough_gpus_or_cpus_when_a_session_asks_then_it_is_refused_with_the_numbers()
     {
        let asked = |gpus, cpus| Resources {
            gpus,
            cpus,
            memory_bytes: GIB,
            shm_bytes: GIB,
        };
        let no_gpus = Capacity {
            gpus: Some(0),
            cpus: None,
        };
        let err = check_capacity(no_gpus, &asked(1, 2)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no machine of this cluster can ever hold the session: it asks for 1 GPU and the cluster has 0 GPUs; \
             run on the CPU with `-g 0`"
        );
        assert!(check_capacity(no_gpus, &asked(0, 64)).is_ok());
        let small = Capacity {
            gpus: Some(2),
            cpus: Some(4),
        };
        assert!(check_capacity(small, &asked(2, 4)).is_ok());
        assert!(
            check_capacity(small, &asked(3, 1))
                .unwrap_err()
                .to_string()
                .ends_with("with `-g 2`")
        );
        assert!(
            check_capacity(small, &asked(0, 5))
                .unwrap_err()
                .to_string()
                .contains("asks for 5 CPUs and the cluster has 4")
        );
        // An executor that does not know its capacity (a Slurm cluster) refuses nothing here.
        assert!(check_capacity(Capacity::default(), &asked(64, 1024)).is_ok());
    }

    #[test]
    fn given_each_status_when_asked_whether_ended_then_only_the_final_ones_are() {
        for st in [
            SessionStatus::Queued,
            SessionStatus::Running,
            SessionStatus::Stopping,
        ] {
            assert!(!is_ended(st), "{st:?}");
            assert!(!lite(st).ended(), "{st:?}");
        }
        for st in [
            SessionStatus::Exited,
            SessionStatus::Failed,
            SessionStatus::Stopped,
        ] {
            assert!(is_ended(st), "{st:?}");
            assert!(lite(st).ended(), "{st:?}");
        }
        let rejected = Lite {
            rejected: true,
            ..lite(SessionStatus::Queued)
        };
        assert!(rejected.ended(), "a rejected session holds nothing");
    }

    #[test]
    fn given_a_stream_when_events_arrive_then_the_session_walks_the_state_machine() {
        use nsml_proto::v1::{EventPayload, Session};
        fn stored<P: EventPayload>(position: u64, payload: &P) -> StoredEvent {
            nsml_common::event::stored("sessions-t/d", position, payload)
        }
        let mut td = TeamDataset::default();
        td.apply(&stored(
            1,
            &SessionRequested {
                session: Some(Session {
                    name: "t/d/1".into(),
                    number: 1,
                    ..Default::default()
                }),
            },
        ));
        assert_eq!(td.sessions[&1].status, SessionStatus::Queued);
        td.apply(&stored(
            2,
            &SessionStarted {
                name: "t/d/1".into(),
                ..Default::default()
            },
        ));
        assert_eq!(td.sessions[&1].status, SessionStatus::Running);
        td.apply(&stored(
            3,
            &SessionStopRequested {
                name: "t/d/1".into(),
            },
        ));
        assert_eq!(td.sessions[&1].status, SessionStatus::Stopping);
        td.apply(&stored(
            4,
            &SessionStopped {
                name: "t/d/1".into(),
                at_ms: 5,
            },
        ));
        assert!(td.sessions[&1].ended());
        td.apply(&stored(
            5,
            &SessionRemoved {
                name: "t/d/1".into(),
            },
        ));
        assert!(td.sessions[&1].removed);
        assert_eq!(td.next_number(), 2, "a removed session keeps its number");
    }

    #[test]
    fn given_a_stop_asked_of_a_queued_session_when_its_runner_starts_then_it_stays_stopping() {
        assert_eq!(
            status_after_start(SessionStatus::Queued),
            SessionStatus::Running
        );
        assert_eq!(
            status_after_start(SessionStatus::Stopping),
            SessionStatus::Stopping
        );
        // The stop the runner then reports is recorded as the stop that was asked.
        assert_eq!(
            finish_status(
                137,
                "ended",
                true,
                status_after_start(SessionStatus::Stopping)
            ),
            SessionStatus::Stopped
        );
    }

    #[test]
    fn given_entries_when_checked_then_only_paths_inside_the_code_directory_pass() {
        for ok in ["main.py", "src/train.py", "a.b/c.py"] {
            assert!(check_entry(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x.py",
            "a//b.py",
            "a/../../b.py",
            "a\0b",
        ] {
            let err = check_entry(bad).unwrap_err();
            assert!(matches!(err, SessionError::BadEntry { .. }), "{bad}");
        }
        assert_eq!(
            check_entry("/x").unwrap_err().to_string(),
            "invalid entry file `/x`: give a path inside your code directory, e.g. main.py"
        );
    }

    #[test]
    fn given_no_resources_when_defaulted_then_nsml_defaults_apply() {
        let r = with_defaults(None);
        assert_eq!((r.gpus, r.cpus), (1, 2));
        assert_eq!((r.memory_bytes, r.shm_bytes), (24 * GIB, GIB));
        let zeros = with_defaults(Some(Resources {
            gpus: 0,
            ..Default::default()
        }));
        assert_eq!((zeros.gpus, zeros.cpus), (0, 2), "zero GPUs is a CPU job");
    }

    #[test]
    fn given_a_failed_finish_when_recorded_then_the_reason_names_the_exit_code_if_the_runner_gave_none()
     {
        assert_eq!(failure_reason(3, ""), "exited with code 3");
        assert_eq!(failure_reason(137, "out of memory"), "out of memory");
        assert_eq!(
            silent_reason(std::time::Duration::from_secs(30)),
            "the runner stopped reporting: no heartbeat for 30 seconds"
        );
    }

    #[test]
    fn resources_beyond_any_machine_are_refused_naming_the_field_and_its_maximum() {
        let ok = with_defaults(None);
        assert!(check_resources(&ok).is_ok());
        let at_max = Resources {
            gpus: MAX_GPUS,
            cpus: MAX_CPUS,
            memory_bytes: MAX_MEMORY_BYTES,
            shm_bytes: MAX_SHM_BYTES,
        };
        assert!(check_resources(&at_max).is_ok());
        let cases = [
            (
                Resources {
                    cpus: u32::MAX,
                    ..ok
                },
                "resources.cpus is 4294967295; a session may ask for at most 1024 CPUs",
            ),
            (
                Resources {
                    gpus: MAX_GPUS + 1,
                    ..ok
                },
                "resources.gpus is 65; a session may ask for at most 64 GPUs",
            ),
            (
                Resources {
                    memory_bytes: u64::MAX - GIB + 1,
                    ..ok
                },
                "resources.memory_bytes is 18446744072635809792 bytes; a session may ask for at most 17592186044416 bytes (16 TiB)",
            ),
            (
                Resources {
                    shm_bytes: u64::MAX,
                    ..ok
                },
                "resources.shm_bytes is 18446744073709551615 bytes; a session may ask for at most 17592186044416 bytes (16 TiB)",
            ),
        ];
        for (r, want) in cases {
            let st = tonic::Status::from(check_resources(&r).unwrap_err());
            assert_eq!(st.code(), tonic::Code::InvalidArgument);
            assert!(st.message().starts_with(want), "{}", st.message());
        }
    }

    #[test]
    fn finishing_maps_to_nsml_states() {
        let running = SessionStatus::Running;
        assert_eq!(finish_status(0, "", false, running), SessionStatus::Exited);
        assert_eq!(
            finish_status(1, "exited with code 1", false, running),
            SessionStatus::Failed
        );
        assert_eq!(
            finish_status(137, "", false, running),
            SessionStatus::Failed
        );
        assert_eq!(
            finish_status(143, "", true, SessionStatus::Stopping),
            SessionStatus::Stopped
        );
    }

    #[test]
    fn a_stop_nobody_asked_the_platform_for_is_a_failure() {
        // Given a running session whose cluster job an operator cancelled,
        // when its runner reports that it stopped the process,
        // then the session failed, with the runner's reason.
        assert_eq!(
            finish_status(
                143,
                "the cluster ended the job",
                true,
                SessionStatus::Running
            ),
            SessionStatus::Failed
        );
        assert_eq!(
            finish_status(143, "", true, SessionStatus::Queued),
            SessionStatus::Failed
        );
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

    #[test]
    fn given_a_competitions_environments_when_an_entry_names_one_then_its_interpreter_runs_it() {
        let envs = [nsml_proto::v1::Environment {
            name: "torch".into(),
            python: "/opt/torch/bin/python3".into(),
            description: String::new(),
        }];
        assert_eq!(
            environment_python(&envs, "demo", "torch").unwrap(),
            "/opt/torch/bin/python3"
        );
        assert_eq!(environment_python(&envs, "demo", "").unwrap(), "");
        let err = environment_python(&envs, "demo", "tf")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("environment `tf`") && err.contains("it has `torch`"),
            "{err}"
        );
        let none = environment_python(&[], "demo", "tf")
            .unwrap_err()
            .to_string();
        assert!(none.contains("it names none"), "{none}");
    }
}
