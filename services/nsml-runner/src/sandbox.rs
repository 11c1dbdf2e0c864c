//! The sandbox every participant process runs in, built on bubblewrap (`bwrap`).
//!
//! A session's process gets new mount, PID, network, IPC, UTS and cgroup namespaces: no network at
//! all (only a loopback of its own), a private `/tmp` and `/dev/shm` (tmpfs, sized by the session's
//! memory and `--shm`, charged to its cgroup), its own processes only in `/proc`, and a filesystem
//! made of nothing but:
//! - the system directories a Python program needs, read-only (`/usr`, `/bin`, `/lib*`, a few files of
//!   `/etc`, and the interpreter's own prefixes, wherever it is installed);
//! - an `/etc/passwd` and `/etc/group` naming only `root` and the sandbox's user;
//! - the session's directory, writable, with its code, dataset part and checkpoint read-only over it;
//! - the Python SDK read-only, the SDK socket, and the session's GPU device nodes.
//!
//! Every other path of the host, the platform's data directory above all, does not exist inside.
//! Directories on the way to a mounted path are empty directories made for the sandbox.
//!
//! When the runner is root, the sandbox has no user namespace (one made by root would map the
//! participant to root outside); instead `setpriv` switches to an unprivileged uid (65534, `nobody`)
//! with every capability dropped, after bubblewrap has made the mounts. When the runner is not root,
//! bubblewrap's user namespace runs the process as the runner's own uid and forbids nested ones.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::process::Command;

use crate::cgroup::CgroupParent;
use crate::error::{Result, RunnerError};

/// What a session without bubblewrap gets told.
pub const BWRAP_MISSING: &str =
    "bubblewrap (bwrap) is required to run participant code: install it";
/// The uid and gid participant code runs as when the runner is root (`nobody`/`nogroup`).
pub const SANDBOX_UID: u32 = 65534;
/// See [`SANDBOX_UID`].
pub const SANDBOX_GID: u32 = 65534;

/// System directories bound read-only (or recreated as the same symlinks) when they exist.
const SYSTEM_DIRS: [&str; 7] = [
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
];
/// Files and directories of `/etc` a program may read: the dynamic linker's cache, time zone, name
/// service switch, `alternatives` links of `/usr/bin`, and `hosts` for `localhost`.
const ETC_PATHS: [&str; 7] = [
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/nsswitch.conf",
    "/etc/alternatives",
    "/etc/hosts",
];
/// Writes `0` (the shell itself, which has one thread) into each join file given (their count
/// first), then runs the rest.
const JOIN_CGROUP: &str = "n=$1; shift; while [ \"$n\" -gt 0 ]; do echo 0 > \"$1\" || exit 125; shift; n=$((n-1)); done; exec \"$@\"";
/// GPU device nodes every CUDA process needs besides its own `/dev/nvidiaN`.
const GPU_SHARED_NODES: [&str; 3] = ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"];

/// How participant code loses the runner's privileges.
#[derive(Debug, Clone)]
enum Privilege {
    /// The runner is root: no user namespace; `setpriv` switches to `uid`/`gid` inside.
    Root {
        setpriv: PathBuf,
        uid: u32,
        gid: u32,
    },
    /// The runner is an ordinary user: bubblewrap's user namespace, the runner's own uid.
    User,
}

/// A system directory as it appears in the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SystemPath {
    /// Bound read-only at the same path.
    Dir(PathBuf),
    /// A symlink (merged `/usr`: `/bin -> usr/bin`), made again inside.
    Symlink { link: PathBuf, target: PathBuf },
}

/// The interpreter participant code runs with, and the directories it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PythonInstall {
    /// `sys.executable`: the interpreter itself (a virtual environment's, if it is one).
    pub executable: PathBuf,
    /// Its prefixes (the environment's and the base installation's), bound read-only.
    pub roots: Vec<PathBuf>,
}

/// What this machine offers the sandbox, found once ([`SandboxHost::detect`]).
#[derive(Debug)]
pub struct SandboxHost {
    bwrap: PathBuf,
    /// bubblewrap 0.8 or later: `--size` for tmpfs mounts and `--disable-userns`.
    modern: bool,
    privilege: Privilege,
    python: PythonInstall,
    system: Vec<SystemPath>,
    /// Read-only binds: (host path, path inside).
    files: Vec<(PathBuf, PathBuf)>,
    cgroups: CgroupParent,
}

/// Finds `name` in the directories of `search` (a `PATH` value).
fn which(search: Option<&std::ffi::OsStr>, name: &str) -> Option<PathBuf> {
    std::env::split_paths(search?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Parses `bubblewrap 0.8.0` into `(0, 8)`.
fn bwrap_version(text: &str) -> Option<(u32, u32)> {
    let v = text.split_whitespace().last()?;
    let mut parts = v.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Asks `python` (looked up on `PATH`, through any version-manager shim) where it lives.
pub fn probe_python(python: &str) -> Result<PythonInstall> {
    const PROBE: &str = "import json, os, sys\n\
        ex = sys.executable\n\
        roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,\n\
                 os.path.dirname(os.path.dirname(os.path.realpath(ex)))}\n\
        print(json.dumps({'executable': ex, 'roots': sorted(roots)}))\n";
    let out = std::process::Command::new(python)
        .args(["-c", PROBE])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| RunnerError::Sandbox(format!("cannot run {python}: {e}")))?;
    if !out.status.success() {
        return Err(RunnerError::Sandbox(format!(
            "{python} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    #[derive(serde::Deserialize)]
    struct Probe {
        executable: PathBuf,
        roots: Vec<PathBuf>,
    }
    let p: Probe = serde_json::from_slice(&out.stdout).map_err(|e| {
        RunnerError::Sandbox(format!("cannot read where {python} is installed: {e}"))
    })?;
    Ok(PythonInstall {
        executable: p.executable,
        roots: p.roots,
    })
}

/// Finds bubblewrap in `search` and whether it is 0.8 or later.
fn find_bwrap(search: Option<&std::ffi::OsStr>) -> Result<(PathBuf, bool)> {
    let bwrap = which(search, "bwrap").ok_or_else(|| RunnerError::Sandbox(BWRAP_MISSING.into()))?;
    let version = std::process::Command::new(&bwrap)
        .arg("--version")
        .output()
        .map_err(|e| RunnerError::Sandbox(format!("{BWRAP_MISSING} ({e})")))?;
    let modern =
        bwrap_version(&String::from_utf8_lossy(&version.stdout)).is_some_and(|v| v >= (0, 8));
    if !modern {
        tracing::warn!(
            "bubblewrap older than 0.8: /dev/shm and /tmp are not sized (the memory limit still holds them)"
        );
    }
    Ok((bwrap, modern))
}

/// How participant code loses the runner's privileges: through `setpriv` (found in `search`) when
/// the runner is root, through bubblewrap's user namespace otherwise.
fn find_privilege(search: Option<&std::ffi::OsStr>) -> Result<Privilege> {
    if !rustix::process::geteuid().is_root() {
        return Ok(Privilege::User);
    }
    let setpriv = which(search, "setpriv").ok_or_else(|| {
        RunnerError::Sandbox(
            "setpriv (util-linux) is required to run participant code unprivileged: install it"
                .into(),
        )
    })?;
    Ok(Privilege::Root {
        setpriv,
        uid: SANDBOX_UID,
        gid: SANDBOX_GID,
    })
}

/// Refuses an interpreter whose directories, bound into every sandbox, would hold a path of
/// `protected` (the platform's data) or the runner's home directory, or are `/` itself.
fn check_python_roots(python: &PythonInstall, protected: &[PathBuf]) -> Result<()> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    for root in &python.roots {
        let exposes = |p: &Path| p.starts_with(root);
        if root.parent().is_none()
            || protected.iter().any(|p| exposes(p))
            || home.as_deref().is_some_and(exposes)
        {
            return Err(RunnerError::Sandbox(format!(
                "the interpreter's directory {} would expose the platform's files or the runner's home to participant code: install Python elsewhere",
                root.display()
            )));
        }
    }
    Ok(())
}

/// The system directories of this machine, as they appear in the sandbox.
fn system_paths() -> Vec<SystemPath> {
    let mut system = Vec::new();
    for d in SYSTEM_DIRS.map(Path::new) {
        match std::fs::symlink_metadata(d) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(d) {
                    system.push(SystemPath::Symlink {
                        link: d.to_path_buf(),
                        target,
                    });
                }
            }
            Ok(m) if m.is_dir() => system.push(SystemPath::Dir(d.to_path_buf())),
            _ => {}
        }
    }
    system
}

/// Writes the sandbox's `/etc/passwd` and `/etc/group` (only `root` and the sandbox's user) into
/// `state_dir`; returns them as binds.
fn write_users(state_dir: &Path, privilege: &Privilege) -> Result<Vec<(PathBuf, PathBuf)>> {
    std::fs::create_dir_all(state_dir)
        .map_err(|e| RunnerError::io(format!("cannot create {}", state_dir.display()), e))?;
    let (uid, gid) = match privilege {
        Privilege::Root { uid, gid, .. } => (*uid, *gid),
        Privilege::User => (
            rustix::process::getuid().as_raw(),
            rustix::process::getgid().as_raw(),
        ),
    };
    let mut files = Vec::new();
    for (name, text) in [
        (
            "passwd",
            format!(
                "root:x:0:0:root:/root:/usr/sbin/nologin\nnobody:x:{uid}:{gid}:nobody:/nonexistent:/usr/sbin/nologin\n"
            ),
        ),
        ("group", format!("root:x:0:\nnogroup:x:{gid}:\n")),
    ] {
        let p = state_dir.join(name);
        std::fs::write(&p, text)
            .map_err(|e| RunnerError::io(format!("cannot write {}", p.display()), e))?;
        files.push((p, PathBuf::from("/etc").join(name)));
    }
    Ok(files)
}

impl SandboxHost {
    /// Finds bubblewrap, `setpriv` (when the runner is root), the interpreter `python` and the
    /// cgroups, and writes the sandbox's `/etc/passwd` and `/etc/group` into `state_dir`. None of
    /// the interpreter's directories may contain a path of `protected` (the platform's data) or the
    /// runner's home directory.
    pub fn detect(python: &str, state_dir: &Path, protected: &[PathBuf]) -> Result<Self> {
        Self::detect_in(
            std::env::var_os("PATH").as_deref(),
            python,
            state_dir,
            protected,
        )
    }

    /// [`detect`](Self::detect) with the tools looked up in `search` instead of the runner's `PATH`.
    pub fn detect_in(
        search: Option<&std::ffi::OsStr>,
        python: &str,
        state_dir: &Path,
        protected: &[PathBuf],
    ) -> Result<Self> {
        let (bwrap, modern) = find_bwrap(search)?;
        let privilege = find_privilege(search)?;
        let python = probe_python(python)?;
        check_python_roots(&python, protected)?;
        let system = system_paths();
        let mut files: Vec<(PathBuf, PathBuf)> = ETC_PATHS
            .iter()
            .map(PathBuf::from)
            .filter(|p| p.exists())
            .map(|p| (p.clone(), p))
            .collect();
        files.extend(write_users(state_dir, &privilege)?);
        if let Privilege::Root { setpriv, .. } = &privilege
            && !under_system(&system, setpriv)
        {
            files.push((setpriv.clone(), setpriv.clone()));
        }
        let cgroups = CgroupParent::detect()?;
        Ok(Self {
            bwrap,
            modern,
            privilege,
            python,
            system,
            files,
            cgroups,
        })
    }

    /// Where session cgroups are made.
    pub fn cgroups(&self) -> &CgroupParent {
        &self.cgroups
    }

    /// The interpreter to run inside (the same path as outside).
    pub fn python(&self) -> &Path {
        &self.python.executable
    }

    /// The directories a sandbox must mount, besides what it mounts for the runner's interpreter, to
    /// run `python` (a host environment's interpreter); refused like the runner's own where they
    /// would expose a path of `protected` or the runner's home.
    pub fn python_mounts(
        &self,
        python: &PythonInstall,
        protected: &[PathBuf],
    ) -> Result<Vec<PathBuf>> {
        check_python_roots(python, protected)?;
        Ok(python
            .roots
            .iter()
            .filter(|r| !under_system(&self.system, r) && !self.python.roots.contains(r))
            .cloned()
            .collect())
    }

    /// `PATH` inside: the interpreter's directory, then the system's.
    pub fn search_path(&self) -> String {
        let mut dirs = Vec::new();
        if let Some(d) = self.python.executable.parent() {
            dirs.push(d.display().to_string());
        }
        dirs.extend(["/usr/local/bin", "/usr/bin", "/bin"].map(String::from));
        dirs.dedup();
        dirs.join(":")
    }

    /// The uid and gid the session's writable directories and socket must belong to, when the
    /// sandbox runs as another user than the runner.
    pub fn owner(&self) -> Option<(u32, u32)> {
        match self.privilege {
            Privilege::Root { uid, gid, .. } => Some((uid, gid)),
            Privilege::User => None,
        }
    }
}

fn under_system(system: &[SystemPath], p: &Path) -> bool {
    system
        .iter()
        .any(|s| matches!(s, SystemPath::Dir(d) if p.starts_with(d)))
}

/// The device nodes a session holding GPUs `gpu_ids` sees, given the names in `/dev`: its own
/// `/dev/nvidiaN` and the shared control nodes; none for a session without GPUs.
pub fn gpu_device_nodes(dev_entries: &[String], gpu_ids: &[u32]) -> Vec<PathBuf> {
    if gpu_ids.is_empty() {
        return Vec::new();
    }
    let has = |n: &str| dev_entries.iter().any(|e| e == n);
    let own = gpu_ids.iter().map(|i| format!("nvidia{i}"));
    own.chain(GPU_SHARED_NODES.iter().map(|s| s.to_string()))
        .filter(|n| has(n))
        .map(|n| Path::new("/dev").join(n))
        .collect()
}

/// The names in this machine's `/dev`.
pub fn dev_entries() -> Vec<String> {
    std::fs::read_dir("/dev")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// One session's sandbox: what it mounts and how it is limited.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub host: Arc<SandboxHost>,
    /// Bound read-write at the same path (the session directory).
    pub writable: Vec<PathBuf>,
    /// Bound read-only at the same path, over the writable ones where nested (code, dataset part,
    /// checkpoint, the SDK, loaded checkpoints).
    pub read_only: Vec<PathBuf>,
    /// The SDK socket, bound at the same path.
    pub socket: PathBuf,
    /// GPU device nodes bound in ([`gpu_device_nodes`]).
    pub devices: Vec<PathBuf>,
    /// Size of `/dev/shm`; 0 leaves it to the memory limit.
    pub shm_bytes: u64,
    /// Size of `/tmp`; 0 leaves it to the memory limit.
    pub tmp_bytes: u64,
    /// The files the process joins its cgroup through before the sandbox starts
    /// ([`crate::cgroup::SessionCgroup::join_files`]).
    pub cgroup_join: Vec<PathBuf>,
}

/// How a path is mounted in [`SandboxSpec::bwrap_args`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Bind {
    ReadOnly,
    ReadWrite,
}

fn os(s: &str) -> OsString {
    OsString::from(s)
}

/// The arguments binding `mounts` (sorted parents first), each after the empty directories made on
/// its way that no tree of `full` already provides.
fn mount_args(mounts: Vec<(PathBuf, PathBuf, Bind)>, mut full: Vec<PathBuf>) -> Vec<OsString> {
    let mut a = Vec::new();
    // Directories made empty for the sandbox (what lies below must be made too).
    let mut made: Vec<PathBuf> = vec!["/".into(), "/tmp".into()];
    for (src, dest, bind) in mounts {
        let ancestors: Vec<&Path> = dest.ancestors().skip(1).collect();
        for anc in ancestors.into_iter().rev() {
            if full.iter().any(|f| anc.starts_with(f)) {
                break;
            }
            if !made.iter().any(|m| m == anc) {
                a.extend([os("--perms"), os("0755"), os("--dir"), anc.into()]);
                made.push(anc.to_path_buf());
            }
        }
        let flag = match bind {
            Bind::ReadOnly => "--ro-bind",
            Bind::ReadWrite => "--bind",
        };
        a.extend([os(flag), src.into(), dest.clone().into()]);
        full.push(dest);
    }
    a
}

impl SandboxSpec {
    /// The bubblewrap program.
    pub fn bwrap(&self) -> &Path {
        &self.host.bwrap
    }

    /// A command that runs, in this sandbox (and its cgroup) with `cwd` as working directory, the
    /// program and arguments the caller appends, as the sandbox's user, with an empty environment.
    /// A session's entry ([`crate::launch::build_command`]) and the runner's own helpers that touch
    /// what participant code can change ([`CheckpointStager`]) run this way.
    ///
    /// `/bin/sh` joins the cgroup, then `exec`s bubblewrap: joining happens before anything of the
    /// session runs, so every process it ever starts is held by the cgroup's limits and reachable
    /// through it.
    pub fn command(&self, cwd: &Path) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(JOIN_CGROUP)
            .arg("nsml-sandbox")
            .arg(self.cgroup_join.len().to_string())
            .args(&self.cgroup_join)
            .arg(self.bwrap())
            .args(self.bwrap_args(cwd))
            .args(self.privilege_drop())
            .current_dir(cwd)
            .env_clear();
        cmd
    }

    /// bubblewrap's arguments up to and including `--`, with `cwd` as the working directory inside.
    pub fn bwrap_args(&self, cwd: &Path) -> Vec<OsString> {
        let host = &self.host;
        let mut a: Vec<OsString> = self.namespace_args();
        a.extend(self.scratch_args());
        for d in &self.devices {
            a.extend([os("--dev-bind"), d.into(), d.into()]);
        }
        // Trees whose contents exist inside (everything below them is there).
        let mut full: Vec<PathBuf> = vec!["/proc".into(), "/dev".into()];
        for s in &host.system {
            match s {
                SystemPath::Dir(d) => {
                    a.extend([os("--ro-bind"), d.into(), d.into()]);
                    full.push(d.clone());
                }
                SystemPath::Symlink { link, target } => {
                    a.extend([os("--symlink"), target.into(), link.into()]);
                    full.push(link.clone());
                }
            }
        }
        let mounts = self.mounts(&full);
        a.extend(mount_args(mounts, full));
        a.extend([os("--chdir"), cwd.into()]);
        if let Privilege::Root { .. } = host.privilege {
            a.extend(
                [
                    "--cap-drop",
                    "ALL",
                    "--cap-add",
                    "CAP_SETUID",
                    "--cap-add",
                    "CAP_SETGID",
                    "--cap-add",
                    "CAP_SETPCAP",
                ]
                .map(os),
            );
        }
        a.push(os("--"));
        a
    }

    /// The namespaces the sandbox gets, and its ties to the runner (it dies with it, has no terminal).
    fn namespace_args(&self) -> Vec<OsString> {
        let namespaces: &[&str] = match self.host.privilege {
            Privilege::Root { .. } => &[
                "--unshare-ipc",
                "--unshare-pid",
                "--unshare-net",
                "--unshare-uts",
                "--unshare-cgroup-try",
            ],
            Privilege::User if self.host.modern => {
                &["--unshare-all", "--unshare-user", "--disable-userns"]
            }
            Privilege::User => &["--unshare-all"],
        };
        let mut a: Vec<OsString> = namespaces.iter().map(|f| os(f)).collect();
        a.extend([os("--die-with-parent"), os("--new-session")]);
        a
    }

    /// A private `/tmp` and `/dev/shm` (sized where bubblewrap can), `/proc` and `/dev`.
    fn scratch_args(&self) -> Vec<OsString> {
        let sized = |bytes: u64| -> Vec<OsString> {
            if self.host.modern && bytes > 0 {
                vec![os("--size"), OsString::from(bytes.to_string())]
            } else {
                Vec::new()
            }
        };
        let mut a = vec![os("--perms"), os("1777")];
        a.extend(sized(self.tmp_bytes));
        a.extend([os("--tmpfs"), os("/tmp")]);
        a.extend([os("--proc"), os("/proc"), os("--dev"), os("/dev")]);
        a.extend([os("--perms"), os("1777")]);
        a.extend(sized(self.shm_bytes));
        a.extend([os("--tmpfs"), os("/dev/shm")]);
        a
    }

    /// Every path bound in besides the system directories (`full` holds those), parents first, so a
    /// read-only tree lands over the writable one that holds it; one mount per destination.
    fn mounts(&self, full: &[PathBuf]) -> Vec<(PathBuf, PathBuf, Bind)> {
        let host = &self.host;
        let mut mounts: Vec<(PathBuf, PathBuf, Bind)> = Vec::new();
        for (src, dest) in &host.files {
            mounts.push((src.clone(), dest.clone(), Bind::ReadOnly));
        }
        for r in &host.python.roots {
            if !full.iter().any(|f| r.starts_with(f)) {
                mounts.push((r.clone(), r.clone(), Bind::ReadOnly));
            }
        }
        for w in &self.writable {
            mounts.push((w.clone(), w.clone(), Bind::ReadWrite));
        }
        for r in &self.read_only {
            mounts.push((r.clone(), r.clone(), Bind::ReadOnly));
        }
        mounts.push((self.socket.clone(), self.socket.clone(), Bind::ReadWrite));
        mounts.sort_by(|x, y| x.1.cmp(&y.1).then(x.2.cmp(&y.2)));
        mounts.dedup_by(|x, y| x.1 == y.1);
        mounts
    }

    /// What runs first inside the sandbox before the interpreter: `setpriv` dropping to the
    /// sandbox's uid, every capability and supplementary group gone (nothing for an unprivileged
    /// runner).
    pub fn privilege_drop(&self) -> Vec<OsString> {
        match &self.host.privilege {
            Privilege::Root { setpriv, uid, gid } => vec![
                setpriv.into(),
                OsString::from(format!("--reuid={uid}")),
                OsString::from(format!("--regid={gid}")),
                os("--clear-groups"),
                os("--inh-caps=-all"),
                os("--bounding-set=-all"),
                os("--"),
            ],
            Privilege::User => Vec::new(),
        }
    }
}

/// Takes a directory participant code names (a checkpoint to save) out of its reach before the
/// runner reads it.
///
/// The runner runs as root: reading a path the session can change meanwhile (a directory swapped for
/// a symlink between the check and the read) could reach any file of the host. So a directory the
/// session names is copied by the session's own user inside its own sandbox, where nothing but the
/// session's view exists, into a directory that only the runner and that copy see; the runner then
/// packs the copy, which nothing else can touch. Symlinks are copied as links, never followed.
///
/// The directories the SDK makes for `nsml.save` are handed over instead ([`Self::hand_over`]):
/// renamed, on the same file system, into the staging area, so that a checkpoint is not written twice
/// (in the session's cgroup, whose memory its page cache counts against). What the session may still
/// hold open of it, the packer reads by descriptor, never following a link.
#[derive(Debug, Clone)]
pub struct CheckpointStager {
    sandbox: SandboxSpec,
    cwd: PathBuf,
    staging: PathBuf,
}

/// A staged copy; [`StagedDir::remove`] deletes it.
#[derive(Debug)]
pub struct StagedDir {
    root: PathBuf,
    /// The copied directory.
    pub path: PathBuf,
}

impl StagedDir {
    /// Deletes the copy.
    pub async fn remove(self) {
        crate::archive::remove_tree(&self.root).await;
    }
}

impl CheckpointStager {
    /// Copies run in `sandbox` (the session's) with working directory `cwd`, into fresh directories
    /// under `staging` (the runner's, never mounted into the session's sandbox).
    pub fn new(sandbox: SandboxSpec, cwd: PathBuf, staging: PathBuf) -> Self {
        Self {
            sandbox,
            cwd,
            staging,
        }
    }

    /// Takes the directory `name` out of `parent` (a directory of the session's, by its canonical path) by
    /// renaming it into a fresh staging directory: the SDK's own saved directories are handed over this
    /// way, not copied. `None` when it cannot be renamed there (another file system): copy it then.
    ///
    /// The session is not trusted to leave the names alone meanwhile: `parent` is opened without
    /// following a link, the rename is made relative to it, and what arrives must be a real directory.
    /// A process of the session may still hold the directory open and change it; the packer reads it by
    /// descriptor, never through a link ([`nsml_archive::pack_dir`]), so it reads only what the session
    /// wrote itself, as it would read a copy.
    pub async fn hand_over(&self, parent: &Path, name: &OsStr) -> Result<Option<StagedDir>> {
        use rustix::fs::{CWD, Mode, OFlags};
        let refuse = |why: &str| {
            RunnerError::Refused(format!(
                "cannot save `{}`: {why}",
                parent.join(name).display()
            ))
        };
        if name.is_empty() || name == "." || name == ".." || name.as_bytes().contains(&b'/') {
            return Err(refuse("not a directory"));
        }
        // The runner reads what is handed over itself. A session may hard-link into it only files it may
        // read and write itself where the kernel protects hard links; elsewhere, the copy the session's own
        // user makes reads only what that user can.
        if !hard_links_protected() {
            return Ok(None);
        }
        let root = self.staging.join(uuid::Uuid::new_v4().simple().to_string());
        std::fs::create_dir_all(&root)
            .map_err(|e| RunnerError::io(format!("cannot create {}", root.display()), e))?;
        let staged = StagedDir {
            path: root.join("ckpt"),
            root: root.clone(),
        };
        let dir_flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let moved = rustix::fs::openat(CWD, parent, dir_flags, Mode::empty()).and_then(|from| {
            let to = rustix::fs::openat(CWD, &root, dir_flags, Mode::empty())?;
            rustix::fs::renameat(&from, name, &to, "ckpt")
        });
        match moved {
            Ok(()) => {}
            Err(rustix::io::Errno::XDEV) => {
                staged.remove().await;
                return Ok(None);
            }
            Err(e) => {
                staged.remove().await;
                return Err(match e {
                    rustix::io::Errno::NOENT
                    | rustix::io::Errno::NOTDIR
                    | rustix::io::Errno::LOOP => refuse("no such directory"),
                    e => RunnerError::io("cannot take the saved directory", e.into()),
                });
            }
        }
        // Only a real directory is packed: a link or file swapped in for it is not.
        if !std::fs::symlink_metadata(&staged.path).is_ok_and(|m| m.is_dir()) {
            staged.remove().await;
            return Err(refuse("not a directory"));
        }
        Ok(Some(staged))
    }

    /// Copies `src` (a path as the session sees it) and, when `consume`, removes `src` afterwards
    /// (as far as the session could), both as the session's user in its sandbox; returns the copy.
    pub async fn stage(&self, src: &Path, consume: bool) -> Result<StagedDir> {
        let root = self.staging.join(uuid::Uuid::new_v4().simple().to_string());
        std::fs::create_dir_all(&root)
            .map_err(|e| RunnerError::io(format!("cannot create {}", root.display()), e))?;
        if let Some((uid, gid)) = self.sandbox.host.owner() {
            std::os::unix::fs::chown(&root, Some(uid), Some(gid)).map_err(|e| {
                RunnerError::io(format!("cannot hand {} to the sandbox", root.display()), e)
            })?;
        }
        let staged = StagedDir {
            path: root.join("ckpt"),
            root: root.clone(),
        };
        let mut sandbox = self.sandbox.clone();
        sandbox.writable.push(root);
        let mut cmd = sandbox.command(&self.cwd);
        cmd.args(["/bin/sh", "-c"])
            .arg("cp -a --reflink=auto -- \"$1\" \"$2\" || exit 1; [ \"$3\" = 1 ] && rm -rf -- \"$1\"; exit 0")
            .arg("nsml-stage")
            .arg(src)
            .arg(&staged.path)
            .arg(if consume { "1" } else { "0" })
            .env("PATH", "/usr/bin:/bin")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let out = match cmd.output().await {
            Ok(out) => out,
            Err(e) => {
                staged.remove().await;
                return Err(RunnerError::io("cannot start the checkpoint copy", e));
            }
        };
        // Only a real directory is packed: a link here would be read in the runner's view.
        let is_dir = std::fs::symlink_metadata(&staged.path).is_ok_and(|m| m.is_dir());
        if !out.status.success() || !is_dir {
            let why = String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("not a directory")
                .to_string();
            staged.remove().await;
            return Err(RunnerError::Refused(format!(
                "cannot save `{}`: {why}",
                src.display()
            )));
        }
        Ok(staged)
    }
}

/// Whether the kernel lets a user hard-link only files it owns or may read and write
/// (`fs.protected_hardlinks`).
fn hard_links_protected() -> bool {
    std::fs::read_to_string("/proc/sys/fs/protected_hardlinks").is_ok_and(|v| v.trim() == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(privilege: Privilege, cg: &Path) -> SandboxHost {
        for c in ["memory", "cpu", "cpuacct", "pids"] {
            std::fs::create_dir_all(cg.join(c)).unwrap();
            std::fs::write(cg.join(c).join("cgroup.procs"), "").unwrap();
        }
        SandboxHost {
            bwrap: "/usr/bin/bwrap".into(),
            modern: true,
            privilege,
            python: PythonInstall {
                executable: "/root/.pyenv/versions/3.11.7/bin/python3".into(),
                roots: vec!["/root/.pyenv/versions/3.11.7".into(), "/usr".into()],
            },
            system: vec![
                SystemPath::Dir("/usr".into()),
                SystemPath::Symlink {
                    link: "/bin".into(),
                    target: "usr/bin".into(),
                },
            ],
            files: vec![
                ("/etc/ld.so.cache".into(), "/etc/ld.so.cache".into()),
                ("/state/passwd".into(), "/etc/passwd".into()),
            ],
            cgroups: CgroupParent::detect_at(cg, "0::/\n", 1).unwrap(),
        }
    }

    fn spec(privilege: Privilege, cg: &Path) -> SandboxSpec {
        let s = PathBuf::from("/data/runs/sessions/demo/t1-cls/3");
        SandboxSpec {
            host: Arc::new(host(privilege, cg)),
            writable: vec![s.clone()],
            read_only: vec![
                s.join("code"),
                s.join("data"),
                s.join("ckpt"),
                "/repo/clients/python".into(),
            ],
            socket: s.join("nsml.sock"),
            devices: vec!["/dev/nvidia1".into(), "/dev/nvidiactl".into()],
            shm_bytes: 256 << 20,
            tmp_bytes: 2 << 30,
            cgroup_join: vec![],
        }
    }

    fn text(args: &[OsString]) -> String {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn root() -> Privilege {
        Privilege::Root {
            setpriv: "/usr/bin/setpriv".into(),
            uid: 65534,
            gid: 65534,
        }
    }

    #[test]
    fn a_root_runner_confines_without_a_user_namespace_and_drops_to_nobody() {
        let cg = tempfile::tempdir().unwrap();
        let sp = spec(root(), cg.path());
        let args = sp.bwrap_args(Path::new("/data/runs/sessions/demo/t1-cls/3/code"));
        let t = text(&args);
        for want in [
            "--unshare-ipc --unshare-pid --unshare-net --unshare-uts --unshare-cgroup-try",
            "--die-with-parent --new-session",
            "--perms 1777 --size 2147483648 --tmpfs /tmp",
            "--proc /proc --dev /dev",
            "--perms 1777 --size 268435456 --tmpfs /dev/shm",
            "--dev-bind /dev/nvidia1 /dev/nvidia1 --dev-bind /dev/nvidiactl /dev/nvidiactl",
            "--ro-bind /usr /usr --symlink usr/bin /bin",
            "--ro-bind /state/passwd /etc/passwd",
            "--ro-bind /root/.pyenv/versions/3.11.7 /root/.pyenv/versions/3.11.7",
            "--bind /data/runs/sessions/demo/t1-cls/3 /data/runs/sessions/demo/t1-cls/3 ",
            "--ro-bind /data/runs/sessions/demo/t1-cls/3/ckpt /data/runs/sessions/demo/t1-cls/3/ckpt --ro-bind /data/runs/sessions/demo/t1-cls/3/code /data/runs/sessions/demo/t1-cls/3/code --ro-bind /data/runs/sessions/demo/t1-cls/3/data /data/runs/sessions/demo/t1-cls/3/data",
            "--chdir /data/runs/sessions/demo/t1-cls/3/code",
            "--cap-drop ALL --cap-add CAP_SETUID --cap-add CAP_SETGID --cap-add CAP_SETPCAP --",
        ] {
            assert!(t.contains(want), "missing `{want}` in {t}");
        }
        assert!(t.ends_with(" --"));
        assert!(!t.contains("--unshare-all") && !t.contains("--unshare-user"));
        // Only the interpreter's prefix of /root, never /root itself; /usr once (it is a system dir).
        assert!(!t.contains("--ro-bind /root "));
        assert_eq!(t.matches("--ro-bind /usr /usr").count(), 1);
        // Directories on the way are made traversable, once each, before what they hold.
        for d in [
            "/root",
            "/root/.pyenv",
            "/root/.pyenv/versions",
            "/data",
            "/data/runs/sessions/demo/t1-cls",
            "/etc",
            "/repo/clients",
        ] {
            let made = format!("--perms 0755 --dir {d} ");
            assert_eq!(t.matches(&made).count(), 1, "{made} in {t}");
        }
        // Nothing is made inside a bound tree, and the socket inside the session is bound over it.
        assert!(!t.contains("--dir /data/runs/sessions/demo/t1-cls/3"));
        assert!(t.contains(
            "--bind /data/runs/sessions/demo/t1-cls/3/nsml.sock /data/runs/sessions/demo/t1-cls/3/nsml.sock"
        ));
        let pos = |s: &str| t.find(s).unwrap();
        assert!(pos("--dir /data ") < pos("--bind /data/runs"));
        assert!(pos("--bind /data/runs") < pos("--ro-bind /data/runs/sessions/demo/t1-cls/3/code"));
        assert_eq!(
            text(&sp.privilege_drop()),
            "/usr/bin/setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all --bounding-set=-all --"
        );
        assert_eq!(sp.host.owner(), Some((65534, 65534)));
    }

    #[test]
    fn an_unprivileged_runner_uses_a_user_namespace_without_nested_ones() {
        let cg = tempfile::tempdir().unwrap();
        let sp = spec(Privilege::User, cg.path());
        let t = text(&sp.bwrap_args(Path::new("/x")));
        assert!(t.starts_with("--unshare-all --unshare-user --disable-userns"));
        assert!(!t.contains("--cap-"));
        assert!(sp.privilege_drop().is_empty());
        assert_eq!(sp.host.owner(), None);
    }

    #[test]
    fn old_bubblewrap_gets_no_sizes() {
        let cg = tempfile::tempdir().unwrap();
        let mut h = host(root(), cg.path());
        h.modern = false;
        let mut sp = spec(root(), cg.path());
        sp.host = Arc::new(h);
        let t = text(&sp.bwrap_args(Path::new("/x")));
        assert!(!t.contains("--size"));
        assert!(t.contains("--perms 1777 --tmpfs /dev/shm"));
    }

    /// `ls /dev` of the H200 machine in reference/gpu-machine.md, plus what any machine has.
    fn h200_dev() -> Vec<String> {
        [
            "null",
            "zero",
            "shm",
            "nvidia0",
            "nvidiactl",
            "nvidia-uvm",
            "nvidia-uvm-tools",
            "nvidia-caps",
        ]
        .map(String::from)
        .to_vec()
    }

    #[test]
    fn gpu_sessions_see_their_own_nodes_and_the_shared_ones() {
        let nodes = gpu_device_nodes(&h200_dev(), &[0]);
        assert_eq!(
            nodes,
            [
                "/dev/nvidia0",
                "/dev/nvidiactl",
                "/dev/nvidia-uvm",
                "/dev/nvidia-uvm-tools"
            ]
            .map(PathBuf::from)
        );
        assert!(gpu_device_nodes(&h200_dev(), &[]).is_empty());
        // On an eight-GPU machine a session holding 2 and 5 sees only those.
        let mut eight = h200_dev();
        eight.extend((1..8).map(|i| format!("nvidia{i}")));
        let nodes = gpu_device_nodes(&eight, &[2, 5]);
        assert_eq!(
            nodes[..2],
            [PathBuf::from("/dev/nvidia2"), PathBuf::from("/dev/nvidia5")]
        );
        assert_eq!(nodes.len(), 5);
        assert!(!nodes.iter().any(|n| n.ends_with("nvidia0")));
        // No driver, no nodes.
        assert!(gpu_device_nodes(&["null".to_string()], &[0]).is_empty());
    }

    #[test]
    fn without_bubblewrap_nothing_runs_and_the_error_says_what_to_install() {
        let empty = tempfile::tempdir().unwrap();
        let err = SandboxHost::detect_in(
            Some(empty.path().as_os_str()),
            "python3",
            &empty.path().join("state"),
            &[],
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "bubblewrap (bwrap) is required to run participant code: install it"
        );
    }

    #[test]
    fn bubblewrap_versions_parse() {
        assert_eq!(bwrap_version("bubblewrap 0.8.0\n"), Some((0, 8)));
        assert_eq!(bwrap_version("bubblewrap 0.6.1"), Some((0, 6)));
        assert_eq!(bwrap_version("garbage"), None);
    }
}
