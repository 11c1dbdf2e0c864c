//! Helpers for the hostile-code suite: an embedded deployment with small runner limits, one `main.py`
//! per case (with a shared prelude of Python helpers), and what a session printed.
//!
//! Every case's `main.py` prints `LEAK what …` for anything forbidden it managed and `DENIED what
//! ERROR` for what was refused, so a test asserts on the session's own account of what happened.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::Value;

use crate::scenario::{session, wait_ended};
use crate::{Deployment, User};

/// The runner limits of the hostile deployment: small enough to reach in a test.
pub const LIMITS: [(&str, &str); 3] = [
    ("NSML_RUNNER_DISK_LIMIT", "64M"),
    ("NSML_RUNNER_LOG_LIMIT", "1M"),
    ("NSML_RUNNER_PIDS_LIMIT", "128"),
];

/// Python helpers every case's `main.py` starts with.
///
/// - `ARGS`: the entry's `key=value` arguments; `TEST_MODE`: run by a submit (`--mode test`);
/// - `attempt(what, f)`: runs `f`; prints `LEAK` with what it got, or `DENIED` with the error;
/// - `only(items, allowed)`: raises unless `items` holds something beyond `allowed` (then returns it);
/// - `read(path)`: the first 4 KiB of a file; `sdk(request)`: one raw request on the SDK socket.
pub const PRELUDE: &str = r#"
import json, os, signal, socket, sys, time
ARGS = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
TEST_MODE = "--mode" in sys.argv and sys.argv[sys.argv.index("--mode") + 1] == "test"

def attempt(what, f):
    try:
        got = f()
    except BaseException as e:
        print("DENIED", what, type(e).__name__, flush=True)
        return None
    print("LEAK", what, repr(got)[:300], flush=True)
    return got

def only(items, allowed):
    extra = sorted(set(items) - set(allowed))
    if not extra:
        raise PermissionError("nothing beyond %s" % sorted(allowed))
    return extra

def read(path):
    with open(path, "rb") as fh:
        return fh.read(4096)

def sdk(request):
    s = socket.socket(socket.AF_UNIX)
    s.connect(os.environ["NSML_SOCKET"])
    f = s.makefile("rwb")
    f.write(json.dumps(request).encode() + b"\n")
    f.flush()
    reply = json.loads(f.readline())
    s.close()
    return reply
"#;

/// Starts `nsmld up` on a fresh data directory with [`LIMITS`] in its environment.
pub fn deployment() -> anyhow::Result<Deployment> {
    Deployment::embedded_env(&[], &LIMITS)
}

/// A fresh directory `work/name` holding `main.py` = [`PRELUDE`] + `script`.
pub fn case(work: &Path, name: &str, script: &str) -> anyhow::Result<PathBuf> {
    let dir = work.join(name);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("main.py"), format!("{PRELUDE}\n{script}"))?;
    Ok(dir)
}

/// What a session left: its `ps` entry once ended and its logs.
#[derive(Debug)]
pub struct Ended {
    pub name: String,
    pub session: Value,
    pub logs: String,
}

impl Ended {
    /// `status`, `exit_code` and `reason` from `ps`.
    pub fn outcome(&self) -> (String, i64, String) {
        (
            self.session["status"].as_str().unwrap_or_default().into(),
            self.session["exit_code"].as_i64().unwrap_or(i64::MIN),
            self.session["reason"].as_str().unwrap_or_default().into(),
        )
    }

    /// The lines the session printed as `LEAK …`.
    pub fn leaks(&self) -> Vec<&str> {
        self.logs
            .lines()
            .filter(|l| l.starts_with("LEAK "))
            .collect()
    }

    /// The names of what it reported `DENIED`.
    pub fn denied(&self) -> Vec<&str> {
        self.logs
            .lines()
            .filter_map(|l| l.strip_prefix("DENIED "))
            .collect()
    }
}

/// Runs `dir/main.py` as a training session on `t1-cls` with `cpus` and `memory`, the entry getting
/// `args`; waits for its end.
pub fn run_case(
    u: &User,
    dir: &Path,
    cpus: &str,
    memory: &str,
    args: &str,
) -> anyhow::Result<Ended> {
    let out = u
        .nsml_in(
            dir,
            &[
                "run", "-d", "t1-cls", "-e", "main.py", "-g", "0", "-c", cpus, "--memory", memory,
                "--shm", "64M", "-a", args,
            ],
            "",
        )?
        .ok()?;
    let name = out
        .stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("Session ")
                .and_then(|l| l.strip_suffix(" is started"))
        })
        .with_context(|| format!("no session started: {}", out.all()))?
        .to_string();
    ended(u, &name)
}

/// Waits for session `name` to end; returns its `ps` entry and logs.
pub fn ended(u: &User, name: &str) -> anyhow::Result<Ended> {
    let session = wait_ended(u, name)?;
    let logs = u.nsml(&["logs", name])?.ok()?.all();
    Ok(Ended {
        name: name.to_string(),
        session,
        logs,
    })
}

/// Whether the platform still answers: `nsml ps` succeeds and lists `name`.
pub fn still_serving(u: &User, name: &str) -> anyhow::Result<()> {
    session(u, name).map(|_| ())
}
