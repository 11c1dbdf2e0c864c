//! Python environments built from a session's `requirements.txt`, cached on this machine.
//!
//! A session whose code holds a `requirements.txt` runs with a virtual environment made from it: the
//! runner makes it outside the sandbox (`python -m venv`, then `pip install -r`), from the package
//! index pip is configured with in the runner's own environment (`PIP_INDEX_URL`, `pip.conf`), and the
//! session's sandbox mounts it read-only and runs its interpreter. The interpreter the environment is
//! made on is the runner's (or a host environment's, [`EnvRequest::base`]); with a host environment the
//! virtual environment sees that interpreter's packages too (`--system-site-packages`), so a prepared
//! install (torch) stays visible under what the requirements add.
//!
//! ```text
//! WORK_DIR/envs/
//!   KEY/                 one environment (a virtual environment), KEY = hash of interpreter and requirements
//!     .nsml-env          written last: the environment is complete; its mtime is the last use
//!   KEY.lock             flock: shared while a session builds or uses KEY, exclusive while it is evicted
//!   KEY.build            flock: exclusive while KEY is built
//! ```
//!
//! Sessions asking for the same environment at once build it once: the builder holds the build lock,
//! the others wait for it and then find the environment complete. The locks are `flock`s on files, so
//! this holds between runner processes of one machine as well as within one. A session holds a
//! shared lock from before the build until it ends, and eviction (least recently used first, once the
//! cache is over its cap) takes only environments whose exclusive lock it gets without waiting: one
//! being built or in use is never removed.
//!
//! pip runs outside the sandbox, so what it is given is checked first ([`check_requirements`]): plain
//! requirement specifiers only (no options, includes, paths, URLs or variables), and it installs
//! wheels only (`--only-binary :all:`): building a source distribution would run the package's own
//! `setup.py` on the runner's machine, unconfined.

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::error::{Result, RunnerError};
use crate::logs::LogSender;

/// The file of a session's code that asks for an environment.
pub const REQUIREMENTS: &str = "requirements.txt";
/// The default cap on all cached environments of a machine together.
pub const DEFAULT_CACHE_LIMIT: u64 = 10 << 30;
/// How long one environment's build may take.
pub const BUILD_TIME_LIMIT: Duration = Duration::from_secs(20 * 60);
/// The largest `requirements.txt` read.
const MAX_REQUIREMENTS_BYTES: u64 = 64 << 10;
/// The marker of a complete environment.
const READY: &str = ".nsml-env";
/// Lines of pip's output kept for a failure's reason.
const TAIL_LINES: usize = 12;

/// Where a session's environment comes from.
#[derive(Debug, Clone)]
pub struct EnvRequest {
    /// The interpreter it is made on (an absolute path).
    pub base: PathBuf,
    /// The interpreter's version (`sys.version`), part of the cache key.
    pub base_version: String,
    /// Whether it sees the base interpreter's packages (a host environment's).
    pub system_site_packages: bool,
    /// The requirements, checked by [`check_requirements`].
    pub requirements: String,
}

impl EnvRequest {
    /// The cache key: the interpreter, its version, whether its packages show, and the requirements.
    pub fn key(&self) -> String {
        let mut h = Sha256::new();
        for part in [
            "nsml-env-1",
            &self.base.display().to_string(),
            &self.base_version,
            if self.system_site_packages {
                "system-site"
            } else {
                "isolated"
            },
            &self.requirements,
        ] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        hex::encode(&h.finalize()[..16])
    }
}

/// An environment ready for a session; the session holds it (a shared lock) while it runs.
#[derive(Debug)]
pub struct PreparedEnv {
    /// The environment's directory (bound read-only into the sandbox).
    pub root: PathBuf,
    /// Its interpreter, `ROOT/bin/python`.
    pub python: PathBuf,
    /// Whether it was found in the cache rather than built for this session.
    pub reused: bool,
    /// The shared lock that keeps it from eviction.
    _in_use: File,
}

/// The cache of environments on this machine.
#[derive(Debug, Clone)]
pub struct EnvironmentCache {
    dir: PathBuf,
    cap_bytes: u64,
    time_limit: Duration,
}

/// Reads the requirements of the code in `code`: `None` when it has no `requirements.txt` or one with
/// nothing but comments and blank lines.
pub fn read_requirements(code: &Path) -> Result<Option<String>> {
    let path = code.join(REQUIREMENTS);
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(RunnerError::io(format!("cannot read {REQUIREMENTS}"), e)),
    };
    let refuse = |why: String| RunnerError::Environment(why);
    if !meta.is_file() {
        return Err(refuse(format!(
            "{REQUIREMENTS} must be a plain file: make it one"
        )));
    }
    if meta.len() > MAX_REQUIREMENTS_BYTES {
        return Err(refuse(format!(
            "{REQUIREMENTS} is larger than {} KiB: list only the packages to install",
            MAX_REQUIREMENTS_BYTES >> 10
        )));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| {
        refuse(format!(
            "cannot read {REQUIREMENTS} ({e}): it must be UTF-8 text"
        ))
    })?;
    let lines = check_requirements(&text).map_err(refuse)?;
    Ok((!lines.is_empty()).then(|| lines.join("\n") + "\n"))
}

/// Checks that every line of `text` is a plain requirement specifier (`name[extras] version-spec ;
/// marker`), and returns them without comments and blank lines. pip runs outside the sandbox, so
/// options (`-e`, `-r`, `--index-url`, `--trusted-host`…), paths, URLs, direct references (`@`) and
/// variables (`${…}`) are refused, each with the line it is on.
pub fn check_requirements(text: &str) -> std::result::Result<Vec<String>, String> {
    let mut out = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = match raw.find('#') {
            Some(i) => &raw[..i],
            None => raw,
        }
        .trim();
        if line.is_empty() {
            continue;
        }
        let bad = |why: &str| {
            format!(
                "{REQUIREMENTS} line {}: `{}` {why}: only package requirements such as `six==1.16.0` are accepted",
                n + 1,
                raw.trim()
            )
        };
        if line.starts_with('-') {
            return Err(bad("is a pip option"));
        }
        if !line.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(bad("does not start with a package name"));
        }
        if line.contains("://") || line.contains('@') {
            return Err(bad("names a URL"));
        }
        if line.contains(['/', '\\', '$', '`']) {
            return Err(bad("holds a path or a variable"));
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || " \t._-[],<>=!~*;:'\"()+".contains(c);
        if let Some(c) = line.chars().find(|c| !allowed(*c)) {
            return Err(bad(&format!("holds `{c}`")));
        }
        out.push(line.to_string());
    }
    Ok(out)
}

/// Asks `python` for its version (`sys.version`).
pub async fn python_version(python: &Path) -> Result<String> {
    let out = Command::new(python)
        .args(["-c", "import sys; print(sys.version)"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| {
            RunnerError::Environment(format!(
                "cannot run the interpreter {}: {e}",
                python.display()
            ))
        })?;
    if !out.status.success() {
        return Err(RunnerError::Environment(format!(
            "the interpreter {} failed: {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Opens (making it) the lock file at `path` and takes `op` on it, off the async threads.
async fn lock(path: PathBuf, op: rustix::fs::FlockOperation) -> Result<File> {
    tokio::task::spawn_blocking(move || {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| RunnerError::io(format!("cannot open {}", path.display()), e))?;
        rustix::fs::flock(&f, op)
            .map_err(|e| RunnerError::io(format!("cannot lock {}", path.display()), e.into()))?;
        Ok(f)
    })
    .await
    .map_err(|e| RunnerError::io("locking an environment stopped", std::io::Error::other(e)))?
}

/// Marks `root` as just used (the LRU order).
fn touch(root: &Path) {
    let marker = root.join(READY);
    if let Ok(f) = File::options().append(true).open(&marker) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// A line of the session's log saying how long something took: `4.2s`.
fn took(since: Instant) -> String {
    format!("{:.1}s", since.elapsed().as_secs_f64())
}

impl EnvironmentCache {
    /// A cache under `dir` holding at most `cap_bytes` of environments.
    pub fn new(dir: PathBuf, cap_bytes: u64) -> Self {
        Self {
            dir,
            cap_bytes,
            time_limit: BUILD_TIME_LIMIT,
        }
    }

    /// The cache's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The environment `req` asks for, from the cache or built now (telling `logs` how it goes), held
    /// for the caller until the returned value is dropped.
    pub async fn prepare(&self, req: &EnvRequest, logs: &LogSender) -> Result<PreparedEnv> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| RunnerError::io(format!("cannot create {}", self.dir.display()), e))?;
        let key = req.key();
        let root = self.dir.join(&key);
        let lock_path = self.dir.join(format!("{key}.lock"));
        let ready = |root: &Path| root.join(READY).is_file();
        let found = |in_use: File, reused: bool| {
            touch(&root);
            PreparedEnv {
                python: root.join("bin").join("python"),
                root: root.clone(),
                reused,
                _in_use: in_use,
            }
        };

        // Held from here for as long as the session runs: no eviction while it is built or used.
        let in_use = lock(lock_path.clone(), rustix::fs::FlockOperation::LockShared).await?;
        if ready(&root) {
            logs.nsml(format!(
                "Reusing the environment built for {REQUIREMENTS} ({key})"
            ))
            .await;
            return Ok(found(in_use, true));
        }
        let build_lock = self.dir.join(format!("{key}.build"));
        let building = lock(build_lock, rustix::fs::FlockOperation::LockExclusive).await?;
        if ready(&root) {
            // Another session built it while this one waited.
            drop(building);
            logs.nsml(format!(
                "Reusing the environment built for {REQUIREMENTS} ({key})"
            ))
            .await;
            return Ok(found(in_use, true));
        }
        let start = Instant::now();
        let count = req.requirements.lines().count();
        logs.nsml(format!(
            "Installing requirements from {REQUIREMENTS} ({count} line{})",
            if count == 1 { "" } else { "s" }
        ))
        .await;
        let built = match tokio::time::timeout(self.time_limit, self.build(req, &root, logs)).await
        {
            Ok(r) => r,
            Err(_) => Err(RunnerError::Environment(format!(
                "installing requirements took longer than {} minutes: list fewer or smaller packages",
                self.time_limit.as_secs() / 60
            ))),
        };
        if let Err(e) = built {
            crate::archive::remove_tree(&root).await;
            return Err(e);
        }
        logs.nsml(format!("Installed requirements in {}", took(start)))
            .await;
        drop(building);
        let me = self.clone();
        let keep = root.clone();
        tokio::task::spawn_blocking(move || me.evict(&keep))
            .await
            .map_err(|e| {
                RunnerError::io("evicting environments stopped", std::io::Error::other(e))
            })?;
        Ok(found(in_use, false))
    }

    /// Makes the environment at `root` (whatever an interrupted build left there goes first) and marks
    /// it complete.
    async fn build(&self, req: &EnvRequest, root: &Path, logs: &LogSender) -> Result<()> {
        crate::archive::remove_tree(root).await;
        let mut venv = Command::new(&req.base);
        venv.args(["-m", "venv"]);
        if req.system_site_packages {
            venv.arg("--system-site-packages");
        }
        venv.arg(root);
        run_logged(venv, "making the virtual environment", logs).await?;

        let reqs = root.join(".nsml-requirements.txt");
        std::fs::write(&reqs, &req.requirements)
            .map_err(|e| RunnerError::io(format!("cannot write {}", reqs.display()), e))?;
        let mut pip = Command::new(root.join("bin").join("python"));
        pip.args([
            "-m",
            "pip",
            "install",
            "--no-input",
            "--only-binary",
            ":all:",
        ])
        .args(["--disable-pip-version-check", "--no-warn-script-location"])
        .arg("-r")
        .arg(&reqs);
        run_logged(pip, "installing requirements failed", logs).await?;

        let size = {
            let r = root.to_path_buf();
            tokio::task::spawn_blocking(move || crate::limits::disk_usage(&r, &[]))
                .await
                .unwrap_or(u64::MAX)
        };
        if size > self.cap_bytes {
            return Err(RunnerError::Environment(format!(
                "the environment from {REQUIREMENTS} takes {}, more than this machine's environment cache holds ({}): list fewer packages",
                crate::limits::size_text(size),
                crate::limits::size_text(self.cap_bytes)
            )));
        }
        let marker = root.join(READY);
        let note = format!(
            "interpreter: {}\nversion: {}\nsystem-site-packages: {}\nbytes: {size}\n",
            req.base.display(),
            req.base_version.replace('\n', " "),
            req.system_site_packages
        );
        std::fs::write(&marker, note)
            .map_err(|e| RunnerError::io(format!("cannot write {}", marker.display()), e))
    }

    /// Removes what builds interrupted by a killed runner left: environment directories without their
    /// marker that no runner is building or using now. Returns how many it removed.
    pub fn remove_incomplete(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let free = |path: PathBuf| {
            let f = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)
                .ok()?;
            rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).ok()?;
            Some(f)
        };
        let mut removed = 0;
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if !path.is_dir() || path.join(READY).exists() {
                continue;
            }
            let Some(_building) = free(self.dir.join(format!("{name}.build"))) else {
                continue;
            };
            let Some(_in_use) = free(self.dir.join(format!("{name}.lock"))) else {
                continue;
            };
            if !path.join(READY).exists() && crate::archive::remove_tree_now(&path).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    /// Removes the least recently used complete environments, other than `keep` and those in use,
    /// until the cache is within its cap. Runs after every build.
    pub fn evict(&self, keep: &Path) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut envs: Vec<(SystemTime, u64, PathBuf)> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .filter_map(|p| {
                let marker = std::fs::metadata(p.join(READY)).ok()?;
                let used = marker.modified().ok()?;
                let bytes = std::fs::read_to_string(p.join(READY))
                    .ok()
                    .and_then(|t| {
                        t.lines()
                            .find_map(|l| l.strip_prefix("bytes: ")?.trim().parse().ok())
                    })
                    .unwrap_or_else(|| crate::limits::disk_usage(&p, &[]));
                Some((used, bytes, p))
            })
            .collect();
        let mut total: u64 = envs.iter().map(|e| e.1).sum();
        envs.sort_by_key(|e| e.0);
        for (_, bytes, path) in envs {
            if total <= self.cap_bytes {
                break;
            }
            if path == keep {
                continue;
            }
            let Some(name) = path.file_name() else {
                continue;
            };
            let lock_path = self.dir.join(format!("{}.lock", name.to_string_lossy()));
            let Ok(f) = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
            else {
                continue;
            };
            // In use (or being built) when the lock is not free at once.
            if rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err()
            {
                continue;
            }
            // The marker first: a half-removed environment is never taken for a complete one.
            let _ = std::fs::remove_file(path.join(READY));
            match crate::archive::remove_tree_now(&path) {
                Ok(()) => {
                    tracing::info!(env = %path.display(), bytes, "evicted a cached environment");
                    total = total.saturating_sub(bytes);
                }
                Err(e) => {
                    tracing::warn!(env = %path.display(), error = %e, "cannot evict a cached environment")
                }
            }
        }
    }
}

/// Runs `cmd` with its output (stdout and stderr as one) as the session's log lines; on failure the
/// error says `what` and ends with the last lines of the output (pip's own `ERROR:` lines where it
/// printed some).
async fn run_logged(mut cmd: Command, what: &str, logs: &LogSender) -> Result<()> {
    // pip's configuration (index, proxy, certificates) comes from the runner's environment; what would
    // send the install elsewhere than the environment being made does not.
    for var in [
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "PIP_TARGET",
        "PIP_PREFIX",
        "PIP_USER",
        "PIP_REQUIRE_VIRTUALENV",
        "VIRTUAL_ENV",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("PIP_NO_INPUT", "1")
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| RunnerError::Environment(format!("{what}: cannot start it: {e}")))?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(64);
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(tokio::spawn(read_lines(out, tx.clone())));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(tokio::spawn(read_lines(err, tx.clone())));
    }
    drop(tx);
    let mut tail: VecDeque<String> = VecDeque::new();
    while let Some(line) = rx.recv().await {
        logs.nsml(line.clone()).await;
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    let status = child
        .wait()
        .await
        .map_err(|e| RunnerError::Environment(format!("{what}: {e}")))?;
    for r in readers {
        let _ = r.await;
    }
    if status.success() {
        return Ok(());
    }
    let errors: Vec<&str> = tail
        .iter()
        .map(|l| l.trim())
        .filter(|l| l.starts_with("ERROR:"))
        .collect();
    let detail = if errors.is_empty() {
        let lines: Vec<&str> = tail
            .iter()
            .map(|l| l.trim())
            .filter(|l| !l.is_empty())
            .collect();
        lines[lines.len().saturating_sub(3)..].join(" ")
    } else {
        errors.join(" ")
    };
    Err(RunnerError::Environment(format!("{what}: {detail}")))
}

/// Sends each line of `r` to `tx`.
async fn read_lines(r: impl tokio::io::AsyncRead + Unpin, tx: tokio::sync::mpsc::Sender<String>) {
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if tx.send(line).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_requirements_pass_without_comments() {
        let text = "# deps\nsix==1.16.0  # pinned\n\nrequests[socks] >=2.0, <3 ; python_version >= '3.8'\nnumpy\n";
        assert_eq!(
            check_requirements(text).unwrap(),
            [
                "six==1.16.0",
                "requests[socks] >=2.0, <3 ; python_version >= '3.8'",
                "numpy"
            ]
        );
        assert!(check_requirements("# nothing\n\n").unwrap().is_empty());
    }

    #[test]
    fn options_paths_urls_and_variables_are_refused_with_their_line() {
        for (line, why) in [
            ("-e .", "pip option"),
            ("--index-url https://evil.example/simple", "pip option"),
            ("-i https://evil.example/simple", "pip option"),
            ("--extra-index-url https://x", "pip option"),
            ("-r other.txt", "pip option"),
            ("-c constraints.txt", "pip option"),
            ("--trusted-host evil.example", "pip option"),
            ("-f /tmp/wheels", "pip option"),
            ("./local/pkg", "does not start with a package name"),
            ("/abs/path.whl", "does not start with a package name"),
            ("pkg @ https://evil.example/pkg.whl", "URL"),
            ("git+https://github.com/x/y", "URL"),
            ("pkg/sub", "path or a variable"),
            ("pkg==${VERSION}", "path or a variable"),
        ] {
            let err = check_requirements(&format!("six\n{line}\n")).unwrap_err();
            assert!(err.contains("line 2") && err.contains(why), "{line}: {err}");
        }
    }

    #[test]
    fn the_key_follows_interpreter_and_requirements() {
        let req = EnvRequest {
            base: "/usr/bin/python3".into(),
            base_version: "3.11.2".into(),
            system_site_packages: false,
            requirements: "six==1.16.0\n".into(),
        };
        let same = req.clone();
        assert_eq!(req.key(), same.key());
        for other in [
            EnvRequest {
                requirements: "six==1.15.0\n".into(),
                ..req.clone()
            },
            EnvRequest {
                base_version: "3.12.0".into(),
                ..req.clone()
            },
            EnvRequest {
                base: "/opt/torch/bin/python3".into(),
                ..req.clone()
            },
            EnvRequest {
                system_site_packages: true,
                ..req.clone()
            },
        ] {
            assert_ne!(req.key(), other.key());
        }
    }
}
