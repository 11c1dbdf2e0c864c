//! Runs real Python children through `run_process`, in the real sandbox, with a fake platform: the
//! SDK socket protocol, output streaming, exit statuses, the time limit and stop.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nsml_proto::v1::{LogLine, MetricPoint, Resources, SessionKind};
use nsml_runner::cgroup::{CgroupLimits, SessionCgroup};
use nsml_runner::error::{Result, RunnerError};
use nsml_runner::launch::{EnvSpec, LaunchSpec, build_command, session_env};
use nsml_runner::limits::LimitsConfig;
use nsml_runner::logs::LogSender;
use nsml_runner::platform::Platform;
use nsml_runner::process::{Confinement, DiskWatch, ProcessOutcome, ProcessSpec, run_process};
use nsml_runner::sandbox::{CheckpointStager, SandboxHost, SandboxSpec};
use nsml_runner::sdk::SdkContext;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// A checkpoint save: name, summary, and the saved directory's files with their contents.
type Saved = (String, String, Vec<(String, String)>);

/// Records what the process asked of the platform.
#[derive(Default)]
struct Fake {
    started: Mutex<Vec<u32>>,
    reports: Mutex<Vec<MetricPoint>>,
    saves: Mutex<Vec<Saved>>,
    loads: Mutex<Vec<(String, String)>>,
    predictions: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl Platform for Fake {
    async fn started(&self, pid: u32) -> Result<()> {
        self.started.lock().unwrap().push(pid);
        Ok(())
    }

    async fn report(&self, point: MetricPoint) -> Result<()> {
        self.reports.lock().unwrap().push(point);
        Ok(())
    }

    async fn save_checkpoint(
        &self,
        checkpoint: &str,
        summary_json: &str,
        dir: &Path,
    ) -> Result<()> {
        if checkpoint == "full" {
            return Err(RunnerError::rpc(
                "SaveCheckpoint",
                tonic::Status::resource_exhausted(
                    "team demo is over its 450 GB checkpoint storage",
                ),
            ));
        }
        let mut files = Vec::new();
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            files.push((
                e.file_name().to_string_lossy().into_owned(),
                fs::read_to_string(e.path()).unwrap_or_default(),
            ));
        }
        files.sort();
        self.saves
            .lock()
            .unwrap()
            .push((checkpoint.into(), summary_json.into(), files));
        Ok(())
    }

    async fn load_checkpoint(&self, session: &str, checkpoint: &str, dest: &Path) -> Result<()> {
        if session.starts_with("rivals/") {
            return Err(RunnerError::rpc(
                "PullCheckpoint",
                tonic::Status::permission_denied("session rivals/t1-cls/1 belongs to another team"),
            ));
        }
        self.loads
            .lock()
            .unwrap()
            .push((session.into(), checkpoint.into()));
        fs::create_dir_all(dest).unwrap();
        fs::write(dest.join("weights"), format!("{session}:{checkpoint}")).unwrap();
        Ok(())
    }

    async fn predictions(&self, predictions_json: String) -> Result<()> {
        self.predictions.lock().unwrap().push(predictions_json);
        Ok(())
    }
}

struct Run {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    fake: Arc<Fake>,
    spec: Option<ProcessSpec>,
    stager: CheckpointStager,
}

const SDK_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../clients/python");

/// The directory of the Python SDK, resolved (so that `..` is taken physically).
fn sdk_path() -> PathBuf {
    fs::canonicalize(SDK_PATH).unwrap_or_else(|_| PathBuf::from(SDK_PATH))
}

/// The real interpreter behind `python3` (a version-manager shim would add its own variables).
fn python() -> String {
    static PYTHON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let out = std::process::Command::new("python3")
                .args(["-c", "import sys; print(sys.executable)"])
                .output()
                .expect("python3 is needed for these tests");
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        })
        .clone()
}

/// This machine's sandbox, found once for all tests (it needs bubblewrap, and root for cgroups).
fn host() -> Arc<SandboxHost> {
    static HOST: std::sync::OnceLock<Arc<SandboxHost>> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        let state = tempfile::tempdir().unwrap().keep();
        Arc::new(
            SandboxHost::detect("python3", &state, &[])
                .expect("the runner's tests need bubblewrap and cgroups (run as root)"),
        )
    })
    .clone()
}

/// The resources sessions of these tests ask for.
const RESOURCES: Resources = Resources {
    gpus: 0,
    cpus: 2,
    memory_bytes: 1 << 30,
    shm_bytes: 1 << 20,
};

/// A session directory with `code/main.py` = `script`, and the process spec to run it.
fn prepare(kind: SessionKind, script: &str, time_limit: Option<Duration>) -> Run {
    prepare_with(kind, script, time_limit, RESOURCES, LimitsConfig::default())
}

/// [`prepare`] with the resources and runner limits given.
fn prepare_with(
    kind: SessionKind,
    script: &str,
    time_limit: Option<Duration>,
    resources: Resources,
    limits: LimitsConfig,
) -> Run {
    let host = host();
    let tmp = tempfile::tempdir().unwrap();
    let (root, loads) = lay_out(tmp.path(), &host, script);
    let fake = Arc::new(Fake::default());
    let cgroup = host
        .cgroups()
        .create(
            "demo/t1-cls/3",
            CgroupLimits {
                memory_bytes: nsml_runner::limits::session_memory(&resources),
                cpus: resources.cpus,
                pids: limits.pids,
            },
        )
        .unwrap();
    let launch = launch(&host, kind, &root, &loads, resources, &cgroup);
    let stager = CheckpointStager::new(
        launch.sandbox.clone(),
        root.join("code"),
        tmp.path().join("staging"),
    );
    let platform: Arc<dyn Platform> = fake.clone();
    let sdk = SdkContext::new(
        "demo/t1-cls/3".into(),
        kind,
        &root,
        loads,
        vec![root.join("data")],
        platform,
        stager.clone(),
    )
    .unwrap();
    let spec = ProcessSpec {
        command: build_command(&launch),
        socket_path: root.join("nsml.sock"),
        sdk,
        time_limit,
        stop_grace: Duration::from_secs(1),
        time_limit_text: "the inference must finish within 1 seconds".into(),
        confinement: Confinement {
            cgroup,
            socket_owner: host.owner(),
            memory_bytes: nsml_runner::limits::session_memory(&resources),
            cpus: resources.cpus,
            pids_limit: limits.pids,
            log_limit: limits.log_bytes,
            disk: Some(DiskWatch {
                root: root.clone(),
                exclude: vec![root.join("code"), root.join("data"), root.join("ckpt")],
                limit: limits.disk_bytes,
            }),
        },
        ready_lines: Vec::new(),
    };
    Run {
        _tmp: tmp,
        root,
        fake,
        spec: Some(spec),
        stager,
    }
}

/// Lays out a session directory `s` in `tmp` with `code/main.py` = `script` and a training label
/// file, a `loads` directory beside it, and a host file the session must not see; returns the
/// session directory and `loads`.
fn lay_out(tmp: &Path, host: &SandboxHost, script: &str) -> (PathBuf, PathBuf) {
    let root = tmp.join("s");
    for d in ["code", "data/train", "tmp", "ckpt"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    let loads = tmp.join("loads");
    fs::create_dir_all(&loads).unwrap();
    // Something of the host beside the session, which the session must not see.
    fs::write(tmp.join("secret"), "host secret").unwrap();
    if let Some((uid, gid)) = host.owner() {
        for d in [root.clone(), root.join("tmp")] {
            std::os::unix::fs::chown(d, Some(uid), Some(gid)).unwrap();
        }
    }
    fs::write(root.join("code/main.py"), script).unwrap();
    fs::write(root.join("data/train/train_label"), "labels").unwrap();
    (root, loads)
}

/// The launch of `main.py` in the session directory `root`, in a sandbox like the runner's.
fn launch(
    host: &Arc<SandboxHost>,
    kind: SessionKind,
    root: &Path,
    loads: &Path,
    resources: Resources,
    cgroup: &SessionCgroup,
) -> LaunchSpec {
    let socket = root.join("nsml.sock");
    let env = session_env(&EnvSpec {
        name: "demo/t1-cls/3".into(),
        dataset: "t1-cls".into(),
        kind,
        session_dir: root.to_path_buf(),
        dataset_dir: root.join("data"),
        tmp_dir: root.join("tmp"),
        checkpoint_dir: root.join("ckpt"),
        socket: socket.clone(),
        sdk_path: sdk_path(),
        gpu_ids: vec![],
        resources,
        search_path: host.search_path(),
    });
    let sandbox = SandboxSpec {
        host: host.clone(),
        writable: vec![root.to_path_buf()],
        read_only: vec![
            root.join("code"),
            root.join("data"),
            root.join("ckpt"),
            loads.to_path_buf(),
            sdk_path(),
        ],
        socket,
        devices: vec![],
        shm_bytes: resources.shm_bytes,
        tmp_bytes: resources.memory_bytes,
        cgroup_join: cgroup.join_files(),
    };
    LaunchSpec {
        python: python(),
        entry: "main.py".into(),
        args: nsml_runner::args::entry_args("--flag 'two words'", kind != SessionKind::Train)
            .unwrap(),
        cwd: root.join("code"),
        env,
        gpu_ids: vec![],
        resources,
        sandbox,
    }
}

/// Runs to the end and returns the outcome with every line sent.
async fn run(r: &mut Run, stop: CancellationToken) -> (ProcessOutcome, Vec<LogLine>) {
    let (logs, mut rx) = LogSender::channel();
    let platform: Arc<dyn Platform> = r.fake.clone();
    let spec = r.spec.take().unwrap();
    let collect = tokio::spawn(async move {
        let mut lines = Vec::new();
        while let Some(l) = rx.recv().await {
            lines.push(l);
        }
        lines
    });
    let outcome = tokio::time::timeout(
        Duration::from_secs(60),
        run_process(spec, platform, logs, stop),
    )
    .await
    .expect("run_process did not return");
    (outcome, collect.await.unwrap())
}

fn texts<'a>(lines: &'a [LogLine], stream: &str) -> Vec<&'a str> {
    lines
        .iter()
        .filter(|l| l.stream == stream)
        .map(|l| l.text.as_str())
        .collect()
}

/// The replies the script printed as `R <json>` lines.
fn replies(lines: &[LogLine]) -> Vec<Value> {
    texts(lines, "stdout")
        .iter()
        .filter_map(|t| t.strip_prefix("R "))
        .map(|t| serde_json::from_str(t).unwrap())
        .collect()
}

/// A raw protocol client, as the SDK speaks it.
const CLIENT: &str = r#"
import json, os, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(os.environ["NSML_SOCKET"])
f = sock.makefile("rwb")
def call(obj=None, raw=None):
    line = raw if raw is not None else json.dumps(obj)
    f.write(line.encode() + b"\n"); f.flush()
    reply = json.loads(f.readline())
    print("R " + json.dumps(reply), flush=True)
    return reply
"#;

#[tokio::test]
async fn an_oversized_report_is_refused_to_the_program_and_never_reaches_the_platform() {
    let script = format!(
        r#"{CLIENT}
call({{"op": "report", "summary": True, "scope": None, "step": 1, "metrics": {{"note": "x" * 70000}}}})
call({{"op": "report", "summary": True, "scope": None, "step": 2, "metrics": {{"acc": 0.5}}}})
"#
    );
    let mut r = prepare(SessionKind::Train, &script, None);
    let (outcome, lines) = run(&mut r, CancellationToken::new()).await;
    assert_eq!(outcome.exit_code, 0, "{:?}", texts(&lines, "stderr"));
    let rs = replies(&lines);
    assert_eq!(rs[0]["ok"], false);
    assert_eq!(
        rs[0]["error"].as_str().unwrap_or_default(),
        "nsml.report: metrics_json is 70011 bytes; the limit is 65536 bytes"
    );
    assert_eq!(
        rs[1]["ok"], true,
        "a report within the bound still goes through"
    );
    let reports = r.fake.reports.lock().unwrap();
    assert_eq!(
        reports.len(),
        1,
        "only the bounded report reached the platform"
    );
    assert_eq!(reports[0].metrics_json, r#"{"acc":0.5}"#);
}

#[tokio::test]
async fn a_training_session_speaks_the_sdk_protocol() {
    let mut r = prepare(SessionKind::Train, &sdk_protocol_script(), None);
    let (outcome, lines) = run(&mut r, CancellationToken::new()).await;

    let stderr = texts(&lines, "stderr");
    assert_eq!(outcome.exit_code, 3, "{stderr:?}");
    assert_eq!(outcome.reason, "exited with code 3");
    assert!(!outcome.stopped);
    assert_eq!(*r.fake.started.lock().unwrap(), [outcome.pid.unwrap()]);

    let stdout = texts(&lines, "stdout");
    assert_eq!(stdout[0], "args ['--flag', 'two words']");
    assert_eq!(stderr, ["to stderr"]);
    assert!(stdout.contains(&"loaded demo/t1-cls/3:best"));
    let nsml = texts(&lines, "nsml");
    assert_eq!(nsml.first(), Some(&"Session ready"));
    assert!(nsml.contains(&"Session ended: exited with code 3"));

    assert_sdk_replies(&r, &replies(&lines));
    assert_reported_and_saved(&r);
    assert!(r.fake.predictions.lock().unwrap().is_empty());
    assert!(
        !r.root.join("nsml.sock").exists(),
        "the socket is removed at the end"
    );
}

/// A training script that prints, reports, saves, loads and sends predictions, some of it refused,
/// then exits with code 3.
fn sdk_protocol_script() -> String {
    format!(
        r#"{CLIENT}
import sys
print("args", sys.argv[1:], flush=True)
print("to stderr", file=sys.stderr, flush=True)
call({{"op": "report", "summary": False, "scope": None, "step": 1, "metrics": {{"train__loss": 0.5}}}})
call({{"op": "report", "summary": True, "scope": "train", "step": 2, "metrics": {{"acc": 0.9}}}})
d = os.path.join(os.environ["NSML_SESSION_DIR"], "ckpt-tmp", "x")
os.makedirs(d)
open(os.path.join(d, "model.txt"), "w").write("weights")
call({{"op": "save", "checkpoint": "best", "path": d}})
call({{"op": "save", "checkpoint": "full", "path": os.environ["NSML_SESSION_DIR"] + "/code"}})
call({{"op": "save", "checkpoint": "../x", "path": os.environ["NSML_SESSION_DIR"] + "/code"}})
call({{"op": "save", "checkpoint": "etc", "path": "/etc"}})
escape = os.path.join(os.environ["NSML_SESSION_DIR"], "escape")
os.symlink("/etc", escape)
call({{"op": "save", "checkpoint": "link", "path": escape}})
call({{"op": "save", "checkpoint": "data", "path": os.environ["NSML_DATASET_PATH"] + "/train"}})
r = call({{"op": "load", "checkpoint": "best", "session": None}})
print("loaded", open(os.path.join(r["path"], "weights")).read(), flush=True)
call({{"op": "load", "checkpoint": "best", "session": "rivals/t1-cls/1"}})
call({{"op": "predictions", "predictions": [1, 2]}})
call(raw="not json")
call({{"op": "explode"}})
sys.exit(3)
"#
    )
}

/// The answers to [`sdk_protocol_script`]'s calls, in order: what is allowed succeeds, the rest is
/// refused with the reason the program is shown.
fn assert_sdk_replies(r: &Run, rs: &[Value]) {
    let ok: Vec<bool> = rs.iter().map(|v| v["ok"] == true).collect();
    assert_eq!(
        ok,
        [
            true, true, true, false, false, false, false, false, true, false, false, false, false
        ]
    );
    let err = |i: usize| rs[i]["error"].as_str().unwrap().to_string();
    assert_eq!(err(3), "team demo is over its 450 GB checkpoint storage");
    assert!(err(4).contains("invalid checkpoint name"), "{}", err(4));
    assert!(
        err(5).contains("inside the session directory"),
        "{}",
        err(5)
    );
    assert!(
        err(6).contains("inside the session directory"),
        "{}",
        err(6)
    );
    assert!(err(7).contains("dataset cannot be saved"), "{}", err(7));
    assert_eq!(err(9), "session rivals/t1-cls/1 belongs to another team");
    assert_eq!(
        *r.fake.loads.lock().unwrap(),
        [("demo/t1-cls/3".to_string(), "best".to_string())],
        "another team's checkpoint is refused by the runner, never asked of the platform"
    );
    assert!(
        err(10).contains("only accepted from a submit session"),
        "{}",
        err(10)
    );
    assert!(err(11).starts_with("invalid request"), "{}", err(11));
    assert!(err(12).starts_with("invalid request"), "{}", err(12));
    assert!(
        rs[8]["path"].as_str().unwrap().starts_with(
            r.root
                .parent()
                .unwrap()
                .join("loads/load-")
                .to_str()
                .unwrap()
        )
    );
}

/// What [`sdk_protocol_script`] reported and saved reached the platform as sent.
fn assert_reported_and_saved(r: &Run) {
    let reports = r.fake.reports.lock().unwrap();
    assert_eq!(reports.len(), 2);
    assert_eq!(
        (
            reports[0].step,
            reports[0].summary,
            reports[0].scope.as_str()
        ),
        (1, false, "")
    );
    assert_eq!(reports[0].metrics_json, r#"{"train__loss":0.5}"#);
    assert_eq!(
        (
            reports[1].step,
            reports[1].summary,
            reports[1].scope.as_str()
        ),
        (2, true, "train")
    );

    let saves = r.fake.saves.lock().unwrap();
    assert_eq!(saves.len(), 1);
    assert_eq!(saves[0].0, "best");
    assert_eq!(
        saves[0].1, r#"{"acc":0.9}"#,
        "the checkpoint carries the last summary"
    );
    assert_eq!(
        saves[0].2,
        [("model.txt".to_string(), "weights".to_string())]
    );
    assert!(
        !r.root.join("ckpt-tmp/x").exists(),
        "the saved directory is handed over and removed"
    );
}

#[tokio::test]
async fn a_submit_session_gets_test_mode_and_may_send_predictions() {
    let script = format!(
        r#"{CLIENT}
print("args", sys.argv[1:], flush=True)
print("env", os.environ["NSML_MODE"], os.environ["NSML_SUBMIT_KIND"], os.environ["NSML_CHECKPOINT_DIR"], flush=True)
call({{"op": "predictions", "predictions": [{{"id": 1, "label": "a"}}]}})
out = os.path.join(os.environ["NSML_SESSION_DIR"], "out")
os.makedirs(out)
call({{"op": "save", "checkpoint": "steal", "path": out}})
"#
    );
    let mut r = prepare(SessionKind::TrialSubmit, &script, None);
    let (outcome, lines) = run(&mut r, CancellationToken::new()).await;
    assert_eq!(
        (outcome.exit_code, outcome.reason.as_str()),
        (0, ""),
        "{lines:?}"
    );
    let stdout = texts(&lines, "stdout");
    assert_eq!(
        stdout[0],
        "args ['--flag', 'two words', '--mode', 'test', '--pause', '1']"
    );
    assert_eq!(
        stdout[1],
        format!("env test trial {}", r.root.join("ckpt").display())
    );
    let rs = replies(&lines);
    assert_eq!(rs[0]["ok"], true);
    assert_eq!(rs[1]["ok"], false);
    assert!(
        rs[1]["error"]
            .as_str()
            .unwrap()
            .contains("cannot be saved in a submit session")
    );
    assert_eq!(
        *r.fake.predictions.lock().unwrap(),
        [r#"[{"id":1,"label":"a"}]"#]
    );
}

#[tokio::test]
async fn the_environment_is_clean_and_complete() {
    let script = r#"
import json, os
print(json.dumps(dict(os.environ)), flush=True)
"#;
    let mut r = prepare(SessionKind::Submit, script, None);
    let (outcome, lines) = run(&mut r, CancellationToken::new()).await;
    assert_eq!(outcome.exit_code, 0, "{lines:?}");
    let env: serde_json::Map<String, Value> =
        serde_json::from_str(texts(&lines, "stdout")[0]).unwrap();
    let keys: BTreeSet<&str> = env.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = [
        "PATH",
        "HOME",
        "TMPDIR",
        "LANG",
        "LC_ALL",
        "PYTHONUNBUFFERED",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONPATH",
        "NSML_SESSION",
        "NSML_DATASET_NAME",
        "NSML_DATASET_PATH",
        "NSML_GPU_NUM",
        "CUDA_DEVICE_ORDER",
        "CUDA_VISIBLE_DEVICES",
        "NSML_SOCKET",
        "NSML_SESSION_DIR",
        "NSML_CPUS",
        "NSML_MEMORY_BYTES",
        "NSML_SHM_BYTES",
        "NSML_MODE",
        "NSML_CHECKPOINT_DIR",
        "NSML_SUBMIT_KIND",
        // Set by the sandbox to the working directory.
        "PWD",
    ]
    .into();
    assert_eq!(keys, want, "nothing of the runner's environment may leak");
    let s = |k: &str| env[k].as_str().unwrap().to_string();
    assert_eq!(s("NSML_SESSION"), "demo/t1-cls/3");
    assert_eq!(
        s("NSML_DATASET_PATH"),
        r.root.join("data").display().to_string()
    );
    assert_eq!(s("HOME"), r.root.display().to_string());
    assert_eq!(s("PWD"), r.root.join("code").display().to_string());
    assert_eq!(s("CUDA_VISIBLE_DEVICES"), "");
    assert_eq!(s("NSML_GPU_NUM"), "0");
    assert_eq!(s("NSML_CPUS"), "2");
    assert_eq!(s("NSML_MEMORY_BYTES"), (1u64 << 30).to_string());
    assert_eq!(s("NSML_SUBMIT_KIND"), "submit");
    assert_eq!(s("LC_ALL"), "C.UTF-8");
}

#[tokio::test]
async fn the_python_sdk_saves_reports_and_loads_through_the_runner() {
    if !sdk_path().join("nsml/__init__.py").exists() {
        eprintln!("skipped: no Python SDK at {SDK_PATH}");
        return;
    }
    let script = r#"
import os, nsml
def save(d, **kw):
    open(os.path.join(d, "m.txt"), "w").write("v1")
def load(d, **kw):
    print("load got", open(os.path.join(d, "weights")).read(), flush=True)
nsml.bind(save=save, load=load, infer=lambda p: [])
nsml.report(summary=True, step=1, loss=0.25)
nsml.save("e1")
nsml.load("e1")
print("train files", sorted(os.listdir(os.path.join(nsml.DATASET_PATH, "train"))), flush=True)
"#;
    let mut r = prepare(SessionKind::Train, script, None);
    let (outcome, lines) = run(&mut r, CancellationToken::new()).await;
    assert_eq!(outcome.exit_code, 0, "{lines:?}");
    let stdout = texts(&lines, "stdout");
    assert!(stdout.contains(&"load got demo/t1-cls/3:e1"), "{stdout:?}");
    assert!(
        stdout.contains(&"train files ['train_label']"),
        "{stdout:?}"
    );
    let saves = r.fake.saves.lock().unwrap();
    assert_eq!(saves.len(), 1);
    assert_eq!(
        (saves[0].0.as_str(), saves[0].1.as_str()),
        ("e1", r#"{"loss":0.25}"#)
    );
    assert_eq!(saves[0].2, [("m.txt".to_string(), "v1".to_string())]);
}

#[tokio::test]
async fn a_printed_line_arrives_while_the_process_runs() {
    let script = r#"
import time
print("hello", flush=True)
time.sleep(30)
"#;
    let mut r = prepare(SessionKind::Train, script, None);
    let (logs, mut rx) = LogSender::channel();
    let platform: Arc<dyn Platform> = r.fake.clone();
    let stop = CancellationToken::new();
    let task = tokio::spawn(run_process(
        r.spec.take().unwrap(),
        platform,
        logs,
        stop.clone(),
    ));
    let started = Instant::now();
    let hello = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let l = rx.recv().await.unwrap();
            if l.stream == "stdout" {
                return l;
            }
        }
    })
    .await
    .expect("the line did not arrive while the process ran");
    assert_eq!(hello.text, "hello");
    // Streamed while the process runs, not at its end 30 s later (with room for a busy machine).
    assert!(started.elapsed() < Duration::from_secs(25));
    stop.cancel();
    let outcome = task.await.unwrap();
    assert!(outcome.stopped);
    assert_eq!(outcome.exit_code, 128 + 15, "python dies of SIGTERM");
    assert_eq!(outcome.reason, "stopped");
}

#[tokio::test]
async fn a_kill_signal_reads_as_killed_137() {
    let mut r = prepare(
        SessionKind::Train,
        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
        None,
    );
    let (outcome, _) = run(&mut r, CancellationToken::new()).await;
    assert_eq!(
        (outcome.exit_code, outcome.reason.as_str()),
        (137, "Killed (signal 9)")
    );
}

#[tokio::test]
async fn the_time_limit_kills_the_whole_group() {
    let script = r#"
import subprocess, sys, time
p = subprocess.Popen(["sleep", sys.argv[-1]])
print("child", sys.argv[-1], flush=True)
time.sleep(300)
"#;
    let mut r = prepare_marked(SessionKind::Submit, script, Some(Duration::from_secs(1)));
    let t = Instant::now();
    let (outcome, lines) = run(&mut r, CancellationToken::new()).await;
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(outcome.exit_code, 124);
    assert_eq!(
        outcome.reason,
        "time limit exceeded: the inference must finish within 1 seconds"
    );
    assert!(texts(&lines, "nsml").contains(&outcome.reason.as_str()));
    assert!(!outcome.stopped);
    assert_child_gone(&lines).await;
}

#[tokio::test]
async fn stop_escalates_to_sigkill_when_sigterm_is_ignored() {
    let script = r#"
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(300)
"#;
    let mut r = prepare(SessionKind::Train, script, None);
    let (logs, mut rx) = LogSender::channel();
    let platform: Arc<dyn Platform> = r.fake.clone();
    let stop = CancellationToken::new();
    let task = tokio::spawn(run_process(
        r.spec.take().unwrap(),
        platform,
        logs,
        stop.clone(),
    ));
    while rx.recv().await.unwrap().text != "ready" {}
    let t = Instant::now();
    stop.cancel();
    let outcome = task.await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_secs(1),
        "SIGKILL came before the grace"
    );
    assert_eq!((outcome.exit_code, outcome.stopped), (137, true));
}

#[tokio::test]
async fn an_exited_leader_takes_its_leftover_children_with_it() {
    // A background child keeps the output pipe open; the session still ends promptly.
    let script = r#"
import subprocess, sys
p = subprocess.Popen(["sleep", sys.argv[-1]])
print("child", sys.argv[-1], flush=True)
"#;
    let mut r = prepare_marked(SessionKind::Train, script, None);
    let t = Instant::now();
    let (outcome, lines) = run(&mut r, CancellationToken::new()).await;
    assert_eq!(outcome.exit_code, 0);
    // Well before the child's own sleep would end (with room for a busy machine).
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    assert_child_gone(&lines).await;
}

/// Checks that no process of the host still runs `sleep MARKER` for the marker the script printed as
/// `child MARKER` (its pid inside the sandbox means nothing outside).
async fn assert_child_gone(lines: &[LogLine]) {
    let marker = texts(lines, "stdout")
        .iter()
        .find_map(|t| t.strip_prefix("child "))
        .expect("the script printed its child")
        .to_string();
    for _ in 0..100 {
        if processes_running(&format!("sleep\0{marker}")).is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("child `sleep {marker}` outlived its session");
}

/// Pids of live (not zombie) processes whose command line contains `needle` (arguments joined by NUL).
fn processes_running(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = fs::read(e.path().join("cmdline")).unwrap_or_default();
        let zombie = fs::read_to_string(e.path().join("stat")).is_ok_and(|stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        });
        if !zombie && String::from_utf8_lossy(&cmdline).contains(needle) {
            found.push(pid);
        }
    }
    found
}

/// [`prepare`] with a unique `sleep` duration as the entry's last argument, to find its child by.
fn prepare_marked(kind: SessionKind, script: &str, time_limit: Option<Duration>) -> Run {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let marker = format!("300.{nanos:09}");
    let mut r = prepare(kind, script, time_limit);
    let spec = r.spec.as_mut().unwrap();
    spec.command.arg(&marker);
    r
}

#[tokio::test]
async fn a_missing_interpreter_is_a_setup_failure() {
    let mut r = prepare(SessionKind::Train, "", None);
    let mut spec = r.spec.take().unwrap();
    spec.command = tokio::process::Command::new("/nonexistent/python3");
    r.spec = Some(spec);
    let (outcome, _) = run(&mut r, CancellationToken::new()).await;
    assert_eq!(outcome.exit_code, -1);
    assert!(
        outcome
            .reason
            .starts_with("cannot start /nonexistent/python3"),
        "{}",
        outcome.reason
    );
    assert!(r.fake.started.lock().unwrap().is_empty());
}

/// The lines the runner added on stream `nsml` that start with `prefix`.
fn nsml_lines<'a>(lines: &'a [LogLine], prefix: &str) -> Vec<&'a str> {
    texts(lines, "nsml")
        .into_iter()
        .filter(|t| t.starts_with(prefix))
        .collect()
}

#[tokio::test]
async fn the_sandbox_shows_the_session_and_nothing_else_of_the_host() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = format!(
        r#"
import errno, json, os, signal, socket
home = os.environ["NSML_SESSION_DIR"]
out = {{}}
def attempt(name, f):
    try:
        out[name] = ["ok", f()]
    except Exception as e:
        out[name] = ["error", type(e).__name__]
def write(p, n=10):
    with open(p, "wb") as fh:
        fh.write(b"x" * n)
    return True
out["uid"] = [os.getuid(), os.getgid(), os.getgroups()]
out["procs"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
out["beside"] = sorted(os.listdir(os.path.dirname(home)))
attempt("secret", lambda: open(os.path.join(os.path.dirname(home), "secret")).read())
attempt("home", lambda: write(os.path.join(home, "x")))
attempt("tmp", lambda: write("/tmp/x"))
attempt("code", lambda: write("written"))
attempt("data", lambda: write(os.path.join(os.environ["NSML_DATASET_PATH"], "x")))
attempt("shm", lambda: write("/dev/shm/big", 2 << 20))
attempt("outside", lambda: socket.create_connection(("192.0.2.1", 80), timeout=1) and True)
attempt("loopback", lambda: socket.create_connection(("127.0.0.1", {port}), timeout=1) and True)
attempt("kill_init", lambda: os.kill(1, signal.SIGKILL))
attempt("init_root", lambda: os.listdir("/proc/1/root"))
out["sys"] = os.path.exists("/sys")
out["etc"] = sorted(os.listdir("/etc"))
print("R " + json.dumps(out), flush=True)
"#
    );
    let mut r = prepare(SessionKind::Train, &script, None);
    let (outcome, lines) = run(&mut r, CancellationToken::new()).await;
    assert_eq!(outcome.exit_code, 0, "{lines:?}");
    let out = &replies(&lines)[0];
    if host().owner().is_some() {
        assert_eq!(out["uid"], serde_json::json!([65534, 65534, []]));
    }
    // Its own processes only: the sandbox's init and the entry.
    assert_eq!(out["procs"], serde_json::json!([1, 2]));
    // Beside the session directory: only what is mounted for it, never the host's files.
    assert_eq!(out["beside"], serde_json::json!(["loads", "s"]));
    let failed = |k: &str| out[k][0] == "error";
    for k in [
        "secret",
        "code",
        "data",
        "shm",
        "outside",
        "loopback",
        "kill_init",
        "init_root",
    ] {
        assert!(failed(k), "{k} should have failed: {out}");
    }
    assert!(!failed("home") && !failed("tmp"), "{out}");
    assert_eq!(out["outside"][1], "OSError", "no route out: {out}");
    assert_eq!(out["loopback"][1], "ConnectionRefusedError", "{out}");
    assert_eq!(out["sys"], false);
    let etc: Vec<&str> = out["etc"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        etc.contains(&"passwd") && etc.contains(&"ld.so.cache"),
        "{etc:?}"
    );
    assert!(!etc.contains(&"shadow") && !etc.contains(&"ssh"), "{etc:?}");
    drop(listener);
}

#[tokio::test]
async fn memory_past_the_limit_is_an_out_of_memory_kill() {
    let resources = Resources {
        memory_bytes: 64 << 20,
        ..RESOURCES
    };
    let script = "b = bytearray(256 << 20)\nprint('allocated', len(b), flush=True)\n";
    let mut r = prepare_with(
        SessionKind::Train,
        script,
        None,
        resources,
        LimitsConfig::default(),
    );
    let (outcome, lines) = run(&mut r, CancellationToken::new()).await;
    assert_eq!(
        (outcome.exit_code, outcome.reason.as_str()),
        // 64M and the 1M of shared memory on top.
        (137, "Killed (out of memory: limit 65M)"),
        "{lines:?}"
    );
    assert!(
        !texts(&lines, "stdout")
            .iter()
            .any(|t| t.starts_with("allocated"))
    );
    assert_eq!(
        nsml_lines(&lines, "Session ended"),
        ["Session ended: Killed (out of memory: limit 65M)"]
    );
}

/// The CPUs a session used on average, from the runner's usage line (the cgroup's accounting).
fn cpus_used(lines: &[LogLine]) -> f64 {
    let line = nsml_lines(lines, "Resources used:")
        .first()
        .copied()
        .unwrap_or_else(|| panic!("no usage line in {lines:?}"));
    line.split('(')
        .nth(1)
        .and_then(|r| r.split(" CPUs").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable usage line {line}"))
}

#[tokio::test]
async fn four_busy_threads_stay_near_one_cpu() {
    // hashlib releases the GIL on large inputs, so these threads really run in parallel.
    let script = r#"
import hashlib, threading, time
data = b"x" * (1 << 20)
def spin():
    end = time.time() + 3
    while time.time() < end:
        hashlib.sha256(data).digest()
threads = [threading.Thread(target=spin) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
"#;
    let one_cpu = Resources {
        cpus: 1,
        ..RESOURCES
    };
    let mut r = prepare_with(
        SessionKind::Train,
        script,
        None,
        one_cpu,
        LimitsConfig::default(),
    );
    let (outcome, lines) = run(&mut r, CancellationToken::new()).await;
    assert_eq!(outcome.exit_code, 0, "{lines:?}");
    let used = cpus_used(&lines);
    // The limit is the ceiling; how much of it the threads got depends on how busy the machine is, so the
    // floor only shows that they ran.
    assert!(used > 0.0 && used <= 1.3, "used {used} CPUs with -c 1");
    assert!(nsml_lines(&lines, "Resources used:")[0].contains("limit 1)"));
}

#[tokio::test]
async fn filling_the_session_directory_ends_at_the_disk_limit() {
    let script = r#"
import os
with open(os.path.join(os.environ["NSML_SESSION_DIR"], "fill"), "wb") as fh:
    for i in range(2000):
        fh.write(b"x" * (1 << 20))
        fh.flush()
        os.fsync(fh.fileno())
print("wrote 2G", flush=True)
"#;
    let limits = LimitsConfig {
        disk_bytes: 16 << 20,
        ..LimitsConfig::default()
    };
    let mut r = prepare_with(SessionKind::Train, script, None, RESOURCES, limits);
    let (outcome, lines) = run(&mut r, CancellationToken::new()).await;
    assert_eq!(
        (outcome.exit_code, outcome.reason.as_str()),
        (
            137,
            "Killed (disk limit: the session directory holds more than 16M)"
        ),
        "{lines:?}"
    );
    assert!(!texts(&lines, "stdout").contains(&"wrote 2G"));
}

#[tokio::test]
async fn output_past_the_log_limit_is_dropped_with_one_notice() {
    let script = r#"
import sys
line = "y" * 1023 + "\n"
for i in range(10 * 1024):
    sys.stdout.write(line)
sys.stdout.flush()
print("done", file=sys.stderr, flush=True)
"#;
    let limits = LimitsConfig {
        log_bytes: 64 << 10,
        ..LimitsConfig::default()
    };
    let mut r = prepare_with(SessionKind::Train, script, None, RESOURCES, limits);
    let (outcome, lines) = run(&mut r, CancellationToken::new()).await;
    assert_eq!((outcome.exit_code, outcome.reason.as_str()), (0, ""));
    let kept: usize = lines
        .iter()
        .filter(|l| l.stream != "nsml")
        .map(|l| l.text.len() + 1)
        .sum();
    assert_eq!(kept, 64 << 10, "exactly the budget of output is kept");
    assert_eq!(
        nsml_lines(&lines, "log limit"),
        ["log limit of 64K reached; further output is dropped"]
    );
    assert!(!texts(&lines, "stderr").contains(&"done"));
}

#[tokio::test]
async fn a_fork_bomb_stops_at_the_process_limit() {
    let script = r#"
import os, sys, time
n = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
except OSError as e:
    print("forked", n, "then", e.errno, flush=True)
    sys.exit(1)
"#;
    let limits = LimitsConfig {
        pids: 32,
        ..LimitsConfig::default()
    };
    let t = Instant::now();
    let mut r = prepare_with(SessionKind::Train, script, None, RESOURCES, limits);
    let (outcome, lines) = run(&mut r, CancellationToken::new()).await;
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    let forked = texts(&lines, "stdout")
        .iter()
        .find_map(|t| t.strip_prefix("forked "))
        .unwrap_or_else(|| panic!("{lines:?}"))
        .to_string();
    let n: u32 = forked.split_whitespace().next().unwrap().parse().unwrap();
    assert!(n < 32, "forked {n} processes under a limit of 32");
    assert!(forked.ends_with("then 11"), "EAGAIN: {forked}");
    assert_eq!(
        (outcome.exit_code, outcome.reason.as_str()),
        (1, "exited with code 1 (process limit of 32 reached)")
    );
}

#[tokio::test]
async fn stop_reaches_the_participant_process_with_sigterm() {
    let script = r#"
import signal, sys, time
def bye(*_):
    print("got SIGTERM, saving", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
print("ready", flush=True)
time.sleep(300)
"#;
    let mut r = prepare(SessionKind::Train, script, None);
    let (logs, mut rx) = LogSender::channel();
    let platform: Arc<dyn Platform> = r.fake.clone();
    let stop = CancellationToken::new();
    let task = tokio::spawn(run_process(
        r.spec.take().unwrap(),
        platform,
        logs,
        stop.clone(),
    ));
    while rx.recv().await.unwrap().text != "ready" {}
    stop.cancel();
    let outcome = task.await.unwrap();
    let mut rest = Vec::new();
    while let Some(l) = rx.recv().await {
        rest.push(l.text);
    }
    assert!(
        rest.contains(&"got SIGTERM, saving".to_string()),
        "{rest:?}"
    );
    assert_eq!((outcome.exit_code, outcome.stopped), (0, true));
}

#[tokio::test]
async fn a_saved_directory_is_read_in_the_sessions_view_only() {
    let r = prepare(SessionKind::Train, "", None);
    // The socket exists while a session runs; the sandbox binds it.
    fs::write(r.root.join("nsml.sock"), "").unwrap();
    let host_dir = r.root.parent().unwrap().join("host-only");
    fs::create_dir_all(&host_dir).unwrap();
    fs::write(host_dir.join("key"), "host key").unwrap();
    // What a swap after the runner's check leaves: a path in the session that leads out of it.
    let out = r.root.join("out");
    fs::create_dir_all(&out).unwrap();
    fs::write(out.join("weights"), "w").unwrap();
    if let Some((uid, gid)) = host().owner() {
        for p in [out.clone(), out.join("weights")] {
            std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
        }
    }
    std::os::unix::fs::symlink(&host_dir, r.root.join("swapped")).unwrap();

    let staged = r.stager.stage(&out, false).await.unwrap();
    assert_eq!(
        fs::read_to_string(staged.path.join("weights")).unwrap(),
        "w"
    );
    staged.remove().await;
    assert!(out.exists(), "kept unless handed over");

    for path in [r.root.join("swapped"), r.root.join("swapped/.")] {
        let err = r.stager.stage(&path, false).await.unwrap_err();
        assert!(err.to_string().starts_with("cannot save"), "{err}");
    }
    let consumed = r.stager.stage(&out, true).await.unwrap();
    assert!(!out.exists(), "a handed-over directory is removed");
    consumed.remove().await;
    assert_eq!(
        fs::read_dir(r.root.parent().unwrap().join("staging"))
            .unwrap()
            .count(),
        0,
        "copies are removed"
    );
    let mut r = r;
    r.spec.take().unwrap().confinement.cgroup.remove().await;
}
