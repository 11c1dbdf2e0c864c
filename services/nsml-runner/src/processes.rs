//! The process executor: each session's runner is a process of its own on this machine (`nsmld runner`),
//! which reaches the platform only over gRPC, as a Slurm job's runner does. The distributed deployment
//! uses it when sessions run on the session service's machine, so that no participant's session lives in a
//! service's process, and a restart of the session service leaves running sessions running.
//!
//! The executor hands out this machine's GPUs (each runner is told which it holds) and keeps a record of
//! every runner it started under its state directory, so that after a restart it finds the runners that
//! still run and adopts them, GPUs included.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Weak};
use std::time::Duration;

use nsml_common::executor::{Capacity, Executor};
use nsml_proto::v1::Session;
use parking_lot::Mutex;
use prost::Message;
use rustix::process::{Pid, Signal, kill_process};
use serde::{Deserialize, Serialize};

use crate::gpu::{GpuInventory, GpuLease};

/// How the process executor starts runners.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// The `nsmld` binary that runs a runner (`nsmld runner`).
    pub command: PathBuf,
    /// The runner's configuration file (the platform's addresses and internal secret), mode 600.
    pub runner_config: PathBuf,
    /// Where the records of started runners and their own logs are kept.
    pub state_dir: PathBuf,
    /// The GPUs of this machine the runners are given.
    pub gpus: GpuInventory,
    /// CPUs all sessions on this machine may hold at once (`None`: no limit beyond the teams' quotas).
    pub cpus: Option<u32>,
}

/// What is kept of a started runner, to find it again after a restart.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    session: String,
    pid: i32,
    /// The process's start time (`/proc/PID/stat`), so that a reused pid is not taken for the runner.
    started: u64,
    gpus: Vec<u32>,
}

/// A runner this executor watches.
struct Runner {
    pid: i32,
    _gpus: GpuLease,
}

/// Runs each session's runner as a process of its own on this machine.
pub struct ProcessExecutor {
    cfg: ProcessConfig,
    live: Mutex<HashMap<String, Runner>>,
    me: Weak<ProcessExecutor>,
}

/// How often an adopted runner (not this process's child) is checked for having ended.
const ADOPTED_CHECK: Duration = Duration::from_millis(500);

/// The start time of process `pid` in clock ticks since boot (field 22 of `/proc/PID/stat`), or `None`
/// when it is gone.
fn start_time(pid: i32) -> Option<u64> {
    let pid = u32::try_from(pid).ok()?;
    if crate::cgroup::gone(pid) {
        return None;
    }
    crate::cgroup::stat_fields(pid)?.get(19)?.parse().ok()
}

/// A file name for session `name` with extension `ext` (`TEAM/DATASET/N` has no `.`).
fn file_name(name: &str, ext: &str) -> String {
    format!("{}.{ext}", name.replace('/', "."))
}

/// The name of the record of session `name`'s runner.
fn record_name(name: &str) -> String {
    file_name(name, "json")
}

impl ProcessExecutor {
    /// An executor starting runners with `cfg`; runners that an earlier executor started on this state
    /// directory and that still run are adopted. Refuses a runner configuration others may read.
    pub fn new(cfg: ProcessConfig) -> Result<Arc<Self>, String> {
        check_private(&cfg.runner_config)?;
        std::fs::create_dir_all(cfg.state_dir.join("logs"))
            .map_err(|e| format!("cannot create {}: {e}", cfg.state_dir.display()))?;
        let exec = Arc::new_cyclic(|me| Self {
            cfg,
            live: Mutex::new(HashMap::new()),
            me: me.clone(),
        });
        exec.adopt_survivors();
        Ok(exec)
    }

    /// Adopts the runners the records name that still run; forgets the others.
    fn adopt_survivors(&self) {
        let Ok(entries) = std::fs::read_dir(&self.cfg.state_dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let record: Option<Record> = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            match record {
                Some(r) if start_time(r.pid) == Some(r.started) => {
                    tracing::info!(session = %r.session, pid = r.pid, "adopting a runner that survived a restart");
                    let lease = self.cfg.gpus.take(&r.gpus);
                    self.live.lock().insert(
                        r.session.clone(),
                        Runner {
                            pid: r.pid,
                            _gpus: lease,
                        },
                    );
                    if let Ok(rt) = tokio::runtime::Handle::try_current() {
                        rt.spawn(watch_adopted(self.me.clone(), r));
                    }
                }
                _ => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }

    /// Forgets a runner that ended: its record, and the GPUs it held.
    fn ended(&self, session: &str, pid: i32) {
        let mut live = self.live.lock();
        if live.get(session).is_some_and(|r| r.pid == pid) {
            live.remove(session);
            let _ = std::fs::remove_file(self.cfg.state_dir.join(record_name(session)));
        }
    }

    fn spawn_runner(
        &self,
        session: &Session,
        time_limit_secs: u64,
        lease: &GpuLease,
    ) -> Result<tokio::process::Child, String> {
        let log_path = self
            .cfg
            .state_dir
            .join("logs")
            .join(file_name(&session.name, "log"));
        let log = std::fs::File::create(&log_path)
            .map_err(|e| format!("cannot create the runner's log {}: {e}", log_path.display()))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cannot open the runner's log: {e}"))?;
        let gpus: Vec<String> = lease.ids().iter().map(u32::to_string).collect();
        let mut cmd = tokio::process::Command::new(&self.cfg.command);
        cmd.arg("runner")
            .arg("--config")
            .arg(&self.cfg.runner_config)
            .arg("--time-limit")
            .arg(time_limit_secs.to_string())
            .arg("--gpus")
            .arg(if gpus.is_empty() {
                "none".to_string()
            } else {
                gpus.join(",")
            })
            .arg("--session")
            .arg(hex::encode(session.encode_to_vec()))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: a signal meant for the service (a terminal's Ctrl-C) is not the
            // runner's, and the runner outlives the service's process.
            .process_group(0);
        cmd.spawn().map_err(|e| {
            format!(
                "cannot start the runner {}: {e}",
                self.cfg.command.display()
            )
        })
    }
}

/// Watches a runner that is not this process's child until it ends.
async fn watch_adopted(exec: Weak<ProcessExecutor>, r: Record) {
    loop {
        tokio::time::sleep(ADOPTED_CHECK).await;
        let Some(me) = exec.upgrade() else {
            return;
        };
        if start_time(r.pid) != Some(r.started) {
            me.ended(&r.session, r.pid);
            return;
        }
    }
}

/// Refuses a runner configuration that others than its owner may read: it holds the internal secret.
pub fn check_private(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path)
        .map_err(|e| {
            format!(
                "cannot read the runner's configuration {}: {e}",
                path.display()
            )
        })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "the runner's configuration {} holds the internal secret but others may read it (mode {:o}): chmod 600 it",
            path.display(),
            mode & 0o777
        ));
    }
    Ok(())
}

#[async_trait::async_trait]
impl Executor for ProcessExecutor {
    async fn start(&self, session: Session, time_limit_secs: u64) -> Result<(), String> {
        if self.live.lock().contains_key(&session.name) {
            return Ok(());
        }
        let asked = session.resources.unwrap_or_default().gpus;
        let lease = self.cfg.gpus.assign(asked).map_err(|e| e.to_string())?;
        let mut child = self.spawn_runner(&session, time_limit_secs, &lease)?;
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or("the runner exited at once")?;
        let record = Record {
            session: session.name.clone(),
            pid,
            started: start_time(pid).unwrap_or_default(),
            gpus: lease.ids().to_vec(),
        };
        let path = self.cfg.state_dir.join(record_name(&session.name));
        if let Err(e) = serde_json::to_vec(&record)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&path, b))
        {
            tracing::warn!(session = %session.name, error = %e, "cannot record the runner: a restart will not find it");
        }
        self.live
            .lock()
            .insert(session.name.clone(), Runner { pid, _gpus: lease });
        let me = self.me.clone();
        let name = session.name;
        tokio::spawn(async move {
            let status = child.wait().await;
            tracing::info!(session = %name, ?status, "the session's runner exited");
            if let Some(me) = me.upgrade() {
                me.ended(&name, pid);
            }
        });
        Ok(())
    }

    /// Asks the runner to stop its session (SIGTERM); it reports the stop.
    async fn stop(&self, name: &str) -> bool {
        let Some(pid) = self.live.lock().get(name).map(|r| r.pid) else {
            return false;
        };
        match Pid::from_raw(pid) {
            Some(pid) => kill_process(pid, Signal::TERM).is_ok(),
            None => false,
        }
    }

    async fn running(&self) -> Vec<String> {
        let mut names: Vec<String> = self.live.lock().keys().cloned().collect();
        names.sort();
        names
    }

    fn capacity(&self) -> Capacity {
        Capacity {
            gpus: Some(self.cfg.gpus.total()),
            cpus: self.cfg.cpus,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn a_process_is_known_by_its_pid_and_start_time() {
        let me = i32::try_from(std::process::id()).unwrap();
        let started = start_time(me).unwrap();
        assert!(started > 0);
        assert_eq!(start_time(me), Some(started));
        assert_eq!(start_time(i32::MAX), None);
        assert_eq!(record_name("team/ds/3"), "team.ds.3.json");
    }

    #[test]
    fn a_configuration_others_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runner.toml");
        std::fs::write(&path, "x").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = check_private(&path).unwrap_err();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        check_private(&path).unwrap();
    }
}
