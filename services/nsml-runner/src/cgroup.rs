//! One cgroup per session: its memory, CPU and process-count limits, its accounting, and a way to
//! reach (and kill) every process it holds, whatever namespaces they live in.
//!
//! Both layouts are handled, detected at start-up ([`CgroupParent::detect`]):
//! - **v2** (`/sys/fs/cgroup/cgroup.controllers` exists): sessions are made under the runner's own
//!   cgroup, in `nsml/`, with `memory`, `cpu` and `pids` enabled for them. v2 forbids processes in a
//!   cgroup whose controllers are handed down, so the runner first moves itself into a leaf
//!   (`nsml-runner/`) when its cgroup refuses.
//! - **v1** (a hierarchy per controller under `/sys/fs/cgroup/`): one directory per session in each of
//!   the `memory`, `cpu`, `cpuacct` and `pids` hierarchies, under the runner's own cgroup there.
//!
//! A process joins by writing `0` (itself) to every join file of its session before it runs anything
//! (see [`crate::launch::build_command`] and [`SessionCgroup::join_files`]); everything it starts
//! afterwards is held there too.
//!
//! Each runner keeps its sessions under `nsml/runner-PID/`, and at start-up kills what runners no
//! longer alive left running there and removes their cgroups (a runner killed outright cannot remove
//! its sessions' cgroups itself). The executor detects the cgroups when it starts, so this happens at
//! the runner's start, not at its first session.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process};

use crate::error::{Result, RunnerError};

/// The CFS period the CPU quota is expressed in (100 ms, the kernel's default).
pub const CPU_PERIOD_US: u64 = 100_000;

/// Controllers a session's cgroup needs.
const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// Which cgroup layout this machine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// Where session cgroups are made.
#[derive(Debug, Clone)]
pub struct CgroupParent {
    version: CgroupVersion,
    memory: PathBuf,
    cpu: PathBuf,
    cpuacct: PathBuf,
    pids: PathBuf,
}

/// What a session's cgroup allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    /// Memory including `/dev/shm` and `/tmp` (both tmpfs); 0 for none. Swap is off where possible.
    pub memory_bytes: u64,
    /// CPUs of quota per period; 0 for none.
    pub cpus: u32,
    /// Processes and threads at once.
    pub pids: u64,
}

/// What a session's cgroup counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupUsage {
    /// CPU time used by every process of the session.
    pub cpu_ns: Option<u64>,
    /// The most memory the session held at once.
    pub peak_memory_bytes: Option<u64>,
    /// Processes the kernel killed for memory.
    pub oom_kills: u64,
    /// Forks refused by the process limit.
    pub pids_limit_hits: u64,
}

fn io_err(what: &str, path: &Path, source: std::io::Error) -> RunnerError {
    RunnerError::Cgroup {
        what: format!("{what} {}", path.display()),
        source,
    }
}

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(|e| io_err("cannot write", path, e))
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// The value of `key` in a flat keyed file such as `memory.events` (`oom_kill 3`).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.trim().split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The cgroup path of this process for `controller` (v1) or the unified one (`controller` empty),
/// from the text of `/proc/self/cgroup`.
fn own_path(proc_self_cgroup: &str, controller: &str) -> Option<String> {
    proc_self_cgroup.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, list, path) = (parts.next()?, parts.next()?, parts.next()?);
        let hit = if controller.is_empty() {
            list.is_empty()
        } else {
            list.split(',').any(|c| c == controller)
        };
        hit.then(|| path.trim().to_string())
    })
}

/// `mount/own` when that directory exists (it does not inside a container that sees only its own
/// part of the hierarchy at the mount), else `mount`.
fn below(mount: &Path, own: Option<&str>) -> PathBuf {
    let rel = own.unwrap_or("/").trim_start_matches('/');
    let p = mount.join(rel);
    if !rel.is_empty() && p.is_dir() {
        p
    } else {
        mount.to_path_buf()
    }
}

impl CgroupParent {
    /// Finds this machine's cgroups and prepares the parent of session cgroups under this process's
    /// own cgroup.
    pub fn detect() -> Result<Self> {
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| io_err("cannot read", Path::new("/proc/self/cgroup"), e))?;
        Self::detect_at(Path::new("/sys/fs/cgroup"), &own, std::process::id())
    }

    /// [`detect`](Self::detect) with the cgroup mount at `root`, this process's `/proc/self/cgroup`
    /// text and pid given (tests point it at a fake tree).
    pub fn detect_at(root: &Path, proc_self_cgroup: &str, pid: u32) -> Result<Self> {
        if root.join("cgroup.controllers").is_file() {
            Self::detect_v2(root, proc_self_cgroup, pid)
        } else {
            Self::detect_v1(root, proc_self_cgroup, pid)
        }
    }

    fn detect_v1(root: &Path, own: &str, pid: u32) -> Result<Self> {
        let parent = |controller: &str| -> Result<PathBuf> {
            let mount = root.join(controller);
            if !mount.join("cgroup.procs").is_file() {
                return Err(RunnerError::Sandbox(format!(
                    "no cgroup controller `{controller}` at {} (cgroup v1) or cgroup v2 at {}: session limits cannot be enforced",
                    mount.display(),
                    root.display()
                )));
            }
            let all = below(&mount, own_path(own, controller).as_deref()).join("nsml");
            sweep(&all, pid);
            let dir = all.join(format!("runner-{pid}"));
            std::fs::create_dir_all(&dir).map_err(|e| io_err("cannot create", &dir, e))?;
            Ok(dir)
        };
        Ok(Self {
            version: CgroupVersion::V1,
            memory: parent("memory")?,
            cpu: parent("cpu")?,
            cpuacct: parent("cpuacct")?,
            pids: parent("pids")?,
        })
    }

    fn detect_v2(root: &Path, own: &str, pid: u32) -> Result<Self> {
        let base = below(root, own_path(own, "").as_deref());
        let offered = read(&base.join("cgroup.controllers")).unwrap_or_default();
        let missing: Vec<&str> = CONTROLLERS
            .iter()
            .copied()
            .filter(|c| !offered.split_whitespace().any(|o| o == *c))
            .collect();
        if !missing.is_empty() {
            return Err(RunnerError::Sandbox(format!(
                "cgroup v2 at {} does not offer the runner the {} controller(s): session limits cannot be enforced",
                base.display(),
                missing.join(", ")
            )));
        }
        let enable = "+memory +cpu +pids";
        let control = base.join("cgroup.subtree_control");
        if let Err(first) = std::fs::write(&control, enable) {
            // Busy: processes live here. Move this process into a leaf and try again.
            let leaf = base.join("nsml-runner");
            std::fs::create_dir_all(&leaf).map_err(|e| io_err("cannot create", &leaf, e))?;
            write(&leaf.join("cgroup.procs"), &pid.to_string())?;
            std::fs::write(&control, enable).map_err(|e| {
                RunnerError::Sandbox(format!(
                    "cannot enable the memory, cpu and pids controllers in {} ({first}; after moving the runner to {}: {e}): run the runner in a cgroup of its own",
                    base.display(),
                    leaf.display()
                ))
            })?;
        }
        let all = base.join("nsml");
        std::fs::create_dir_all(&all).map_err(|e| io_err("cannot create", &all, e))?;
        write(&all.join("cgroup.subtree_control"), enable)?;
        sweep(&all, pid);
        let parent = all.join(format!("runner-{pid}"));
        std::fs::create_dir_all(&parent).map_err(|e| io_err("cannot create", &parent, e))?;
        write(&parent.join("cgroup.subtree_control"), enable)?;
        Ok(Self {
            version: CgroupVersion::V2,
            memory: parent.clone(),
            cpu: parent.clone(),
            cpuacct: parent.clone(),
            pids: parent,
        })
    }

    /// The layout in use.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// Makes the cgroup of one session, named after it, with `limits` applied.
    pub fn create(&self, session: &str, limits: CgroupLimits) -> Result<SessionCgroup> {
        let slug: String = session
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let name = format!("{slug}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let cg = SessionCgroup {
            version: self.version,
            memory: self.memory.join(&name),
            cpu: self.cpu.join(&name),
            cpuacct: self.cpuacct.join(&name),
            pids: self.pids.join(&name),
        };
        for dir in cg.dirs() {
            std::fs::create_dir(&dir).map_err(|e| io_err("cannot create", &dir, e))?;
        }
        if let Err(e) = cg.apply(limits) {
            cg.remove_now();
            return Err(e);
        }
        Ok(cg)
    }
}

/// The cgroup of one running session.
#[derive(Debug)]
pub struct SessionCgroup {
    version: CgroupVersion,
    memory: PathBuf,
    cpu: PathBuf,
    cpuacct: PathBuf,
    pids: PathBuf,
}

impl SessionCgroup {
    /// The session's directories, one per hierarchy (v1) or one (v2).
    fn dirs(&self) -> Vec<PathBuf> {
        let mut dirs = vec![
            self.memory.clone(),
            self.cpu.clone(),
            self.cpuacct.clone(),
            self.pids.clone(),
        ];
        dirs.dedup();
        dirs.sort();
        dirs.dedup();
        dirs
    }

    /// The files a single-threaded process writes `0` to, to join with itself: `tasks` on v1,
    /// `cgroup.procs` on v2.
    ///
    /// On v1, moving a whole thread group (`cgroup.procs`) write-locks the kernel's global
    /// threadgroup lock, and taking it while nothing else holds it waits out an RCU grace period:
    /// 5 to 25 ms per session on an otherwise idle machine. A task moving only itself through
    /// `tasks` skips that lock; a process with one thread (the `/bin/sh` that joins, before it
    /// `exec`s anything) is then entirely in the cgroup, as with `cgroup.procs`. v2 moves threads
    /// only within a threaded subtree, so there the join stays on `cgroup.procs`.
    pub fn join_files(&self) -> Vec<PathBuf> {
        let file = match self.version {
            CgroupVersion::V1 => "tasks",
            CgroupVersion::V2 => "cgroup.procs",
        };
        self.dirs().into_iter().map(|d| d.join(file)).collect()
    }

    fn apply(&self, limits: CgroupLimits) -> Result<()> {
        let m = &self.memory;
        match self.version {
            CgroupVersion::V1 => {
                if limits.memory_bytes > 0 {
                    write(
                        &m.join("memory.limit_in_bytes"),
                        &limits.memory_bytes.to_string(),
                    )?;
                    // Memory plus swap capped at the same value: no swap. Absent without swap accounting.
                    let memsw = m.join("memory.memsw.limit_in_bytes");
                    if memsw.exists() {
                        write(&memsw, &limits.memory_bytes.to_string())?;
                    }
                    let _ = std::fs::write(m.join("memory.swappiness"), "0");
                }
                if limits.cpus > 0 {
                    write(
                        &self.cpu.join("cpu.cfs_period_us"),
                        &CPU_PERIOD_US.to_string(),
                    )?;
                    write(
                        &self.cpu.join("cpu.cfs_quota_us"),
                        &(u64::from(limits.cpus) * CPU_PERIOD_US).to_string(),
                    )?;
                }
            }
            CgroupVersion::V2 => {
                if limits.memory_bytes > 0 {
                    write(&m.join("memory.max"), &limits.memory_bytes.to_string())?;
                    let swap = m.join("memory.swap.max");
                    if swap.exists() {
                        write(&swap, "0")?;
                    }
                    // One process out of memory ends them all, as a container's would.
                    let _ = std::fs::write(m.join("memory.oom.group"), "1");
                }
                if limits.cpus > 0 {
                    write(
                        &self.cpu.join("cpu.max"),
                        &format!("{} {CPU_PERIOD_US}", u64::from(limits.cpus) * CPU_PERIOD_US),
                    )?;
                }
            }
        }
        write(&self.pids.join("pids.max"), &limits.pids.to_string())
    }

    /// The processes in the session, as host pids.
    pub fn pids(&self) -> Vec<u32> {
        read(&self.pids.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// What the session's processes have used so far.
    pub fn usage(&self) -> CgroupUsage {
        let events = read(&self.pids.join("pids.events")).unwrap_or_default();
        let pids_limit_hits = keyed(&events, "max").unwrap_or(0);
        match self.version {
            CgroupVersion::V1 => CgroupUsage {
                cpu_ns: read(&self.cpuacct.join("cpuacct.usage"))
                    .and_then(|s| s.trim().parse().ok()),
                peak_memory_bytes: read(&self.memory.join("memory.max_usage_in_bytes"))
                    .and_then(|s| s.trim().parse().ok()),
                oom_kills: read(&self.memory.join("memory.oom_control"))
                    .and_then(|s| keyed(&s, "oom_kill"))
                    .unwrap_or(0),
                pids_limit_hits,
            },
            CgroupVersion::V2 => CgroupUsage {
                cpu_ns: read(&self.cpu.join("cpu.stat"))
                    .and_then(|s| keyed(&s, "usage_usec"))
                    .map(|us| us * 1000),
                peak_memory_bytes: read(&self.memory.join("memory.peak"))
                    .and_then(|s| s.trim().parse().ok()),
                oom_kills: read(&self.memory.join("memory.events"))
                    .and_then(|s| keyed(&s, "oom_kill"))
                    .unwrap_or(0),
                pids_limit_hits,
            },
        }
    }

    /// Sends `sig` to every process of the session except the sandbox's own: `leader` (the process
    /// the runner started) and its direct children (the sandbox's init). A stop reaches the
    /// participant's processes this way, which the sandbox would not pass on.
    pub fn signal_workload(&self, leader: u32, sig: Signal) {
        for pid in self.pids() {
            if pid == leader || parent_of(pid) == Some(leader) {
                continue;
            }
            signal(pid, sig);
        }
    }

    /// Kills every process of the session and waits (up to a few seconds) until none is left.
    pub async fn kill_all(&self) {
        if self.version == CgroupVersion::V2 {
            let _ = std::fs::write(self.pids.join("cgroup.kill"), "1");
        }
        for _ in 0..200 {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                signal(pid, Signal::KILL);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::warn!(cgroup = %self.pids.display(), "processes of a session survived SIGKILL");
    }

    /// Removes the session's cgroup once its last process is gone (retrying while exiting processes
    /// are still being reaped).
    pub async fn remove(self) {
        for _ in 0..100 {
            if self.try_remove() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!(cgroup = %self.pids.display(), "cannot remove a session's cgroup");
    }

    fn remove_now(&self) {
        self.try_remove();
    }

    fn try_remove(&self) -> bool {
        let mut all = true;
        for dir in self.dirs() {
            match std::fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                // cgroupfs answers EBUSY while processes remain; only a plain directory (a test's
                // fake tree) says it is not empty.
                Err(e) if e.kind() == ErrorKind::DirectoryNotEmpty => {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                Err(_) => all = false,
            }
        }
        all
    }
}

/// Removes, under `all`, the session cgroups of runners other than `own` that are no longer running
/// (`runner-PID/` with no process PID), and their directories. A runner killed outright leaves its
/// sessions' cgroups behind, and sometimes processes in them (whatever escaped the sandbox's
/// death-with-parent): the platform has failed those sessions, so what they still hold is killed
/// first, or the cgroup could never be removed and its processes would keep memory and GPUs.
fn sweep(all: &Path, own: u32) {
    let Ok(entries) = std::fs::read_dir(all) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("runner-")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == own || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(sessions) = std::fs::read_dir(e.path()) {
            for s in sessions.flatten().filter(|s| s.path().is_dir()) {
                reap(&s.path());
            }
        }
        let _ = std::fs::remove_dir(e.path());
    }
}

/// Kills every process left in a dead runner's session cgroup `dir` (waiting a few seconds at most
/// for them to go) and removes it.
fn reap(dir: &Path) {
    let kill = dir.join("cgroup.kill");
    if kill.is_file() {
        let _ = std::fs::write(&kill, "1");
    }
    for _ in 0..250 {
        // A zombie holds nothing and is its parent's to reap; it does not keep the cgroup.
        let left: Vec<u32> = read(&dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .filter(|pid| !gone(*pid))
            .collect();
        if left.is_empty() {
            break;
        }
        for pid in left {
            signal(pid, Signal::KILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        // Only a plain directory (a test's fake tree) says it is not empty; cgroupfs answers EBUSY.
        Err(e) if e.kind() == ErrorKind::DirectoryNotEmpty => {
            let _ = std::fs::remove_dir_all(dir);
        }
        Err(e) => {
            tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove a dead runner's session cgroup")
        }
    }
}

/// The fields of `/proc/PID/stat` after the command (`state ppid pgrp …`; the command may hold spaces and
/// parentheses, so they are read after its last `)`), or `None` when there is no such process.
pub(crate) fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Whether `pid` has exited (no such process, or a zombie).
pub(crate) fn gone(pid: u32) -> bool {
    stat_fields(pid)
        .and_then(|f| f.into_iter().next())
        .is_none_or(|state| state == "Z" || state == "X")
}

/// The parent pid of `pid`, from `/proc/PID/stat`.
fn parent_of(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

fn signal(pid: u32, sig: Signal) {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .filter(|p| *p > 1)
        .and_then(Pid::from_raw)
    else {
        return;
    };
    if let Err(e) = kill_process(pid, sig)
        && e != rustix::io::Errno::SRCH
    {
        tracing::warn!(pid = pid.as_raw_nonzero().get(), error = %e, "cannot signal a session process");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_v1(root: &Path) {
        for c in ["memory", "cpu", "cpuacct", "pids"] {
            let own = root.join(c).join("svc");
            std::fs::create_dir_all(&own).unwrap();
            std::fs::write(root.join(c).join("cgroup.procs"), "").unwrap();
        }
    }

    const SELF_V1: &str =
        "9:name=systemd:/\n8:pids:/svc\n4:memory:/svc\n2:cpuacct:/\n1:cpu:/\n0::/\n";

    #[test]
    fn own_paths_are_read_per_controller() {
        assert_eq!(own_path(SELF_V1, "memory").as_deref(), Some("/svc"));
        assert_eq!(own_path(SELF_V1, "cpu").as_deref(), Some("/"));
        assert_eq!(
            own_path("0::/user.slice/x\n", "").as_deref(),
            Some("/user.slice/x")
        );
        assert_eq!(
            own_path("3:cpu,cpuacct:/a\n", "cpuacct").as_deref(),
            Some("/a")
        );
        assert_eq!(own_path(SELF_V1, "blkio"), None);
    }

    #[test]
    fn v1_sessions_get_a_directory_per_hierarchy_with_their_limits() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fake_v1(root);
        let parent = CgroupParent::detect_at(root, SELF_V1, 42).unwrap();
        assert_eq!(parent.version(), CgroupVersion::V1);
        let cg = parent
            .create(
                "demo/t1-cls/3",
                CgroupLimits {
                    memory_bytes: 64 << 20,
                    cpus: 2,
                    pids: 512,
                },
            )
            .unwrap();
        let procs = cg.join_files();
        assert_eq!(procs.len(), 4);
        // A v1 join moves the joining task itself, never a thread group.
        assert!(procs.iter().all(|p| p.file_name().unwrap() == "tasks"));
        let mem = procs
            .iter()
            .find(|p| p.starts_with(root.join("memory/svc/nsml")))
            .expect("memory under the runner's own cgroup")
            .parent()
            .unwrap()
            .to_path_buf();
        assert!(
            mem.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("demo-t1-cls-3-")
        );
        let r = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(
            r(mem.join("memory.limit_in_bytes")),
            (64u64 << 20).to_string()
        );
        let cpu = procs
            .iter()
            .find(|p| p.starts_with(root.join("cpu/nsml")))
            .unwrap()
            .parent()
            .unwrap()
            .to_path_buf();
        assert_eq!(r(cpu.join("cpu.cfs_quota_us")), "200000");
        assert_eq!(r(cpu.join("cpu.cfs_period_us")), "100000");
        let pids = procs
            .iter()
            .find(|p| p.starts_with(root.join("pids/svc/nsml")))
            .unwrap()
            .parent()
            .unwrap()
            .to_path_buf();
        assert_eq!(r(pids.join("pids.max")), "512");

        std::fs::write(
            mem.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
        )
        .unwrap();
        std::fs::write(mem.join("memory.max_usage_in_bytes"), "67108864\n").unwrap();
        std::fs::write(pids.join("pids.events"), "max 7\n").unwrap();
        let cpuacct = root
            .join("cpuacct/nsml/runner-42")
            .join(mem.file_name().unwrap());
        std::fs::write(cpuacct.join("cpuacct.usage"), "2500000000\n").unwrap();
        assert_eq!(
            cg.usage(),
            CgroupUsage {
                cpu_ns: Some(2_500_000_000),
                peak_memory_bytes: Some(64 << 20),
                oom_kills: 1,
                pids_limit_hits: 7
            }
        );
    }

    #[test]
    fn cgroups_left_by_dead_runners_are_swept_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fake_v1(root);
        let all = root.join("pids/svc/nsml");
        // A runner that died (no such pid) left an empty session cgroup; pid 1 is alive.
        let dead = all.join(format!("runner-{}", u32::MAX - 1));
        std::fs::create_dir_all(dead.join("demo-t1-cls-1-0000")).unwrap();
        std::fs::create_dir_all(all.join("runner-1/demo-t1-cls-2-0000")).unwrap();
        std::fs::create_dir_all(all.join("elsewhere")).unwrap();
        CgroupParent::detect_at(root, SELF_V1, 42).unwrap();
        assert!(!dead.exists());
        assert!(all.join("runner-1/demo-t1-cls-2-0000").exists());
        assert!(all.join("elsewhere").exists());
        assert!(all.join("runner-42").is_dir());
    }

    #[test]
    fn processes_left_in_a_dead_runners_cgroup_are_killed_and_the_cgroup_removed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fake_v1(root);
        let mut orphan = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        let session = root
            .join("pids/svc/nsml")
            .join(format!("runner-{}", u32::MAX - 2))
            .join("demo-t1-cls-4-0000");
        std::fs::create_dir_all(&session).unwrap();
        std::fs::write(session.join("cgroup.procs"), format!("{}\n", orphan.id())).unwrap();
        CgroupParent::detect_at(root, SELF_V1, 42).unwrap();
        let mut exited = None;
        for _ in 0..600 {
            exited = orphan.try_wait().unwrap();
            if exited.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if exited.is_none() {
            let _ = orphan.kill();
            let _ = orphan.wait();
            panic!("the process left by the dead runner is still running");
        }
        assert!(!session.exists(), "the session cgroup is removed");
        assert!(!session.parent().unwrap().exists());
    }

    #[test]
    fn v2_sessions_get_one_directory_with_controllers_enabled() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let own = root.join("system.slice/nsmld.service");
        std::fs::create_dir_all(&own).unwrap();
        std::fs::write(root.join("cgroup.controllers"), "cpuset cpu io memory pids").unwrap();
        std::fs::write(own.join("cgroup.controllers"), "cpu memory pids").unwrap();
        let parent = CgroupParent::detect_at(root, "0::/system.slice/nsmld.service\n", 42).unwrap();
        assert_eq!(parent.version(), CgroupVersion::V2);
        let r = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(r(own.join("cgroup.subtree_control")), "+memory +cpu +pids");
        assert_eq!(
            r(own.join("nsml/cgroup.subtree_control")),
            "+memory +cpu +pids"
        );
        let cg = parent
            .create(
                "rivals/t2-reg/10",
                CgroupLimits {
                    memory_bytes: 24 << 30,
                    cpus: 1,
                    pids: 1024,
                },
            )
            .unwrap();
        let procs = cg.join_files();
        assert_eq!(procs.len(), 1);
        assert_eq!(procs[0].file_name().unwrap(), "cgroup.procs");
        let d = procs[0].parent().unwrap().to_path_buf();
        assert!(d.starts_with(own.join("nsml")));
        assert_eq!(r(d.join("memory.max")), (24u64 << 30).to_string());
        assert_eq!(r(d.join("cpu.max")), "100000 100000");
        assert_eq!(r(d.join("pids.max")), "1024");
        std::fs::write(
            d.join("memory.events"),
            "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\n",
        )
        .unwrap();
        std::fs::write(
            d.join("cpu.stat"),
            "usage_usec 1500000\nuser_usec 1000000\n",
        )
        .unwrap();
        let u = cg.usage();
        assert_eq!((u.oom_kills, u.cpu_ns), (1, Some(1_500_000_000)));
        cg.remove_now();
        assert!(!d.exists());
    }

    #[test]
    fn v2_without_the_controllers_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), "cpu io").unwrap();
        let err = CgroupParent::detect_at(dir.path(), "0::/\n", 42).unwrap_err();
        assert!(err.to_string().contains("memory, pids"), "{err}");
    }

    #[test]
    fn v1_without_controllers_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = CgroupParent::detect_at(dir.path(), SELF_V1, 42).unwrap_err();
        assert!(err.to_string().contains("cannot be enforced"), "{err}");
    }
}
