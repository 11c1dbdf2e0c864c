//! The limits a session runs under beyond what it asked for, and how they read to people.
//!
//! Memory, CPUs and shared memory come from the session's request ([`nsml_proto::v1::Resources`]);
//! the process count, the disk written in the session directory and the log volume are the runner's
//! own policy ([`LimitsConfig`]), the same for every session.
//!
//! Disk is enforced by a periodic walk of the session directory ([`disk_usage`]) rather than a
//! size-capped mount: a tmpfs would hold checkpoints in memory, and a loop-mounted image per session
//! costs seconds to make. The walk charges every entry at least one 4 KiB block, so a session cannot
//! exhaust inodes with millions of empty files either. A writer can overshoot the limit by what it
//! writes between two walks (about a second); the session is then killed and its directory removed.

use std::path::{Path, PathBuf};

use crate::error::{Result, RunnerError};

/// Processes and threads a session may have at once (fork bombs stop here).
pub const DEFAULT_PIDS_LIMIT: u64 = 1024;
/// Bytes a session may keep in its directory (outside the code, data and checkpoint it was given).
pub const DEFAULT_DISK_LIMIT: u64 = 100 << 30;
/// Bytes of output a session may log; later output is read and dropped.
pub const DEFAULT_LOG_LIMIT: u64 = 100 << 20;

/// The smallest charge for one directory entry in [`disk_usage`].
const MIN_ENTRY_BYTES: u64 = 4096;

/// The runner's own limits, the same for every session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitsConfig {
    /// `pids.max` of each session's cgroup.
    pub pids: u64,
    /// What a session may keep in its directory; past it the session is killed.
    pub disk_bytes: u64,
    /// What a session may print; past it output is dropped with one notice.
    pub log_bytes: u64,
    /// What the cached Python environments of this machine may take together
    /// ([`crate::environment`]); past it the least recently used ones are removed.
    pub env_cache_bytes: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            pids: DEFAULT_PIDS_LIMIT,
            disk_bytes: DEFAULT_DISK_LIMIT,
            log_bytes: DEFAULT_LOG_LIMIT,
            env_cache_bytes: crate::environment::DEFAULT_CACHE_LIMIT,
        }
    }
}

impl LimitsConfig {
    /// The defaults, overridden by `NSML_RUNNER_PIDS_LIMIT` (a count), `NSML_RUNNER_DISK_LIMIT`,
    /// `NSML_RUNNER_LOG_LIMIT` and `NSML_RUNNER_ENV_CACHE_LIMIT` (sizes such as `100G`, `64M`).
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// The defaults, overridden by the variables `get` returns.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let mut cfg = Self::default();
        let bad = |var: &str, value: &str| RunnerError::Config {
            what: var.to_string(),
            why: format!("`{value}` is not a size such as 64M or 100G"),
        };
        if let Some(v) = get("NSML_RUNNER_PIDS_LIMIT") {
            cfg.pids =
                v.trim()
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| RunnerError::Config {
                        what: "NSML_RUNNER_PIDS_LIMIT".into(),
                        why: format!("`{v}` is not a positive count"),
                    })?;
        }
        for (var, slot) in [
            ("NSML_RUNNER_DISK_LIMIT", &mut cfg.disk_bytes),
            ("NSML_RUNNER_LOG_LIMIT", &mut cfg.log_bytes),
            ("NSML_RUNNER_ENV_CACHE_LIMIT", &mut cfg.env_cache_bytes),
        ] {
            if let Some(v) = get(var) {
                *slot = parse_size(&v)
                    .filter(|n| *n > 0)
                    .ok_or_else(|| bad(var, &v))?;
            }
        }
        Ok(cfg)
    }
}

/// Parses `64M`, `24G`, `1.5G`, `4096` (binary units, as `--memory` takes them).
pub fn parse_size(text: &str) -> Option<u64> {
    nsml_manifest::parse_size(text).ok()
}

/// A limit as NSML printed it: `64M`, `24G`, `1.5G`, `512K`, `100` (bytes).
pub fn size_text(bytes: u64) -> String {
    nsml_manifest::short_size(bytes)
}

/// The memory a session may hold in all: its `--memory` and, on top, its `--shm` (`/dev/shm` is memory charged
/// to the session's cgroup), as the team's memory quota counts them (NSML's "RAM including shared memory").
pub fn session_memory(r: &nsml_proto::v1::Resources) -> u64 {
    r.memory_bytes.saturating_add(r.shm_bytes)
}

/// The reason of a session the kernel killed for memory: `Killed (out of memory: limit 24G)`.
pub fn out_of_memory_reason(limit: u64) -> String {
    format!("Killed (out of memory: limit {})", size_text(limit))
}

/// The reason of a session killed for what it kept in its directory.
pub fn disk_reason(limit: u64) -> String {
    format!(
        "Killed (disk limit: the session directory holds more than {})",
        size_text(limit)
    )
}

/// The line that replaces a session's output once it has printed `limit` bytes.
pub fn log_limit_line(limit: u64) -> String {
    format!(
        "log limit of {} reached; further output is dropped",
        size_text(limit)
    )
}

/// What is added to a failed session's reason when it ran into its process limit.
pub fn pids_note(limit: u64) -> String {
    format!("process limit of {limit} reached")
}

/// Bytes kept under `root`, not counting the trees in `exclude` (mount points the session cannot
/// write). Each entry counts its allocated blocks, and at least `MIN_ENTRY_BYTES` (4 KiB); symlinks are not
/// followed. Entries that vanish during the walk are skipped.
pub fn disk_usage(root: &Path, exclude: &[PathBuf]) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if exclude.contains(&path) {
                continue;
            }
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            total = total.saturating_add((meta.blocks() * 512).max(MIN_ENTRY_BYTES));
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_holds_its_memory_and_its_shared_memory_on_top() {
        let r = nsml_proto::v1::Resources {
            gpus: 0,
            cpus: 1,
            memory_bytes: 1 << 30,
            shm_bytes: 1 << 30,
        };
        assert_eq!(session_memory(&r), 2 << 30, "as the team's quota counts it");
        let huge = nsml_proto::v1::Resources {
            memory_bytes: u64::MAX,
            ..r
        };
        assert_eq!(session_memory(&huge), u64::MAX);
    }

    #[test]
    fn sizes_read_like_nsml() {
        assert_eq!(size_text(64 << 20), "64M");
        assert_eq!(size_text(24 << 30), "24G");
        assert_eq!(size_text(3 << 29), "1.5G");
        assert_eq!(size_text(1536 << 20), "1.5G");
        assert_eq!(size_text(512 << 10), "512K");
        assert_eq!(size_text(100), "100");
        assert_eq!(size_text(2 << 40), "2T");
        assert_eq!(
            out_of_memory_reason(64 << 20),
            "Killed (out of memory: limit 64M)"
        );
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("1.5g"), Some(3 << 29));
        assert_eq!(parse_size("100GiB"), Some(100 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("5X"), None);
    }

    #[test]
    fn the_environment_overrides_the_defaults() {
        let vars = |k: &str| match k {
            "NSML_RUNNER_DISK_LIMIT" => Some("64M".to_string()),
            "NSML_RUNNER_PIDS_LIMIT" => Some("256".to_string()),
            _ => None,
        };
        let cfg = LimitsConfig::from_vars(vars).unwrap();
        assert_eq!(
            cfg,
            LimitsConfig {
                pids: 256,
                disk_bytes: 64 << 20,
                log_bytes: DEFAULT_LOG_LIMIT,
                env_cache_bytes: crate::environment::DEFAULT_CACHE_LIMIT,
            }
        );
        let err = LimitsConfig::from_vars(|k| {
            (k == "NSML_RUNNER_LOG_LIMIT").then(|| "plenty".to_string())
        })
        .unwrap_err();
        assert!(err.to_string().contains("NSML_RUNNER_LOG_LIMIT"), "{err}");
    }

    #[test]
    fn disk_usage_counts_blocks_and_entries_but_not_excluded_trees() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("code")).unwrap();
        std::fs::write(root.join("code/big"), vec![1u8; 1 << 20]).unwrap();
        std::fs::create_dir_all(root.join("out/deep")).unwrap();
        std::fs::write(root.join("out/deep/f"), vec![1u8; 256 << 10]).unwrap();
        for i in 0..10 {
            std::fs::write(root.join(format!("out/empty{i}")), b"").unwrap();
        }
        std::os::unix::fs::symlink("/usr", root.join("out/link")).unwrap();
        let used = disk_usage(root, &[root.join("code")]);
        // 256 KiB of data, two directories, ten empty files and a link at 4 KiB each at least.
        let floor = (256 << 10) + 13 * MIN_ENTRY_BYTES;
        assert!(used >= floor && used < floor + (64 << 10), "{used}");
    }
}
