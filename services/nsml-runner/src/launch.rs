//! How a session's entry is started: its environment and the one function that builds the command.
//!
//! [`build_command`] is the single place where the child process is described, and it always
//! describes a confined one: the session's sandbox ([`SandboxSpec::command`]) runs the interpreter,
//! unprivileged, inside the session's cgroup.
//!
//! ```text
//! /bin/sh -c JOIN nsml-sandbox N PROCS… BWRAP ARGS… -- [setpriv …] PYTHON -u ENTRY ARGS…
//! ```

use std::path::PathBuf;

use nsml_proto::v1::{Resources, SessionKind};
use tokio::process::Command;

use crate::sandbox::SandboxSpec;

/// Everything needed to start a session's entry.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The Python interpreter, by its path (the same inside the sandbox as outside).
    pub python: String,
    /// The entry, relative to `cwd`.
    pub entry: PathBuf,
    pub args: Vec<String>,
    /// The code directory.
    pub cwd: PathBuf,
    /// The complete environment of the child: nothing is inherited from the runner.
    pub env: Vec<(String, String)>,
    /// GPU device indices the session holds (for a sandbox's device binding).
    pub gpu_ids: Vec<u32>,
    /// The resources the session asked for (for a sandbox's limits).
    pub resources: Resources,
    /// The sandbox it runs in.
    pub sandbox: SandboxSpec,
}

/// What the environment of a session is made from.
#[derive(Debug, Clone)]
pub struct EnvSpec {
    pub name: String,
    pub dataset: String,
    pub kind: SessionKind,
    pub session_dir: PathBuf,
    pub dataset_dir: PathBuf,
    pub tmp_dir: PathBuf,
    pub checkpoint_dir: PathBuf,
    pub socket: PathBuf,
    pub sdk_path: PathBuf,
    pub gpu_ids: Vec<u32>,
    pub resources: Resources,
    /// `PATH` inside the sandbox ([`crate::sandbox::SandboxHost::search_path`]).
    pub search_path: String,
}

/// The child's whole environment. Nothing else from the runner's environment (credentials, service
/// addresses, secrets) reaches participant code; bubblewrap adds only `PWD`, the working directory.
pub fn session_env(spec: &EnvSpec) -> Vec<(String, String)> {
    let path = |p: &PathBuf| p.display().to_string();
    let gpus = spec
        .gpu_ids
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let r = &spec.resources;
    let mut env = vec![
        ("PATH".to_string(), spec.search_path.clone()),
        ("HOME".to_string(), path(&spec.session_dir)),
        ("TMPDIR".to_string(), path(&spec.tmp_dir)),
        ("LANG".to_string(), "C.UTF-8".to_string()),
        ("LC_ALL".to_string(), "C.UTF-8".to_string()),
        ("PYTHONUNBUFFERED".to_string(), "1".to_string()),
        ("PYTHONDONTWRITEBYTECODE".to_string(), "1".to_string()),
        ("PYTHONPATH".to_string(), path(&spec.sdk_path)),
        ("NSML_SESSION".to_string(), spec.name.clone()),
        ("NSML_DATASET_NAME".to_string(), spec.dataset.clone()),
        ("NSML_DATASET_PATH".to_string(), path(&spec.dataset_dir)),
        ("NSML_GPU_NUM".to_string(), spec.gpu_ids.len().to_string()),
        // Indices as nvidia-smi numbers them; CUDA's default order is fastest-first.
        ("CUDA_DEVICE_ORDER".to_string(), "PCI_BUS_ID".to_string()),
        ("CUDA_VISIBLE_DEVICES".to_string(), gpus),
        ("NSML_SOCKET".to_string(), path(&spec.socket)),
        ("NSML_SESSION_DIR".to_string(), path(&spec.session_dir)),
        ("NSML_CPUS".to_string(), r.cpus.to_string()),
        ("NSML_MEMORY_BYTES".to_string(), r.memory_bytes.to_string()),
        ("NSML_SHM_BYTES".to_string(), r.shm_bytes.to_string()),
    ];
    let submit_kind = match spec.kind {
        SessionKind::Submit => Some("submit"),
        SessionKind::TrialSubmit => Some("trial"),
        _ => None,
    };
    if let Some(kind) = submit_kind {
        env.push(("NSML_MODE".to_string(), "test".to_string()));
        env.push((
            "NSML_CHECKPOINT_DIR".to_string(),
            path(&spec.checkpoint_dir),
        ));
        env.push(("NSML_SUBMIT_KIND".to_string(), kind.to_string()));
    }
    env
}

/// Builds the command that runs `python -u ENTRY ARGS...` in the code directory, inside the session's
/// sandbox and cgroup, with exactly the given environment. The caller adds the plumbing (pipes,
/// process group). This is the sandbox's seam.
pub fn build_command(spec: &LaunchSpec) -> Command {
    let mut cmd = spec.sandbox.command(&spec.cwd);
    cmd.arg(&spec.python)
        .arg("-u")
        .arg(&spec.entry)
        .args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)));
    cmd
}
