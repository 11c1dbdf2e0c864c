//! Runs real Python children through `run_process` with a fake platform: the SDK socket protocol,
//! output streaming, exit statuses, the time limit and stop.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nsml_proto::v1::{LogLine, MetricPoint, Resources, SessionKind};
use nsml_runner::error::{Result, RunnerError};
use nsml_runner::launch::{EnvSpec, LaunchSpec, build_command, session_env};
use nsml_runner::logs::LogSender;
use nsml_runner::platform::Platform;
use nsml_runner::process::{ProcessOutcome, ProcessSpec, run_process};
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

/// A session directory with `code/main.py` = `script`, and the process spec to run it.
fn prepare(kind: SessionKind, script: &str, time_limit: Option<Duration>) -> Run {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    for d in ["code", "data/train", "tmp", "ckpt"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::write(root.join("code/main.py"), script).unwrap();
    fs::write(root.join("data/train/train_label"), "labels").unwrap();
    let fake = Arc::new(Fake::default());
    let socket = root.join("nsml.sock");
    let env = session_env(&EnvSpec {
        name: "demo/t1-cls/3".into(),
        dataset: "t1-cls".into(),
        kind,
        session_dir: root.clone(),
        dataset_dir: root.join("data"),
        tmp_dir: root.join("tmp"),
        checkpoint_dir: root.join("ckpt"),
        socket: socket.clone(),
        sdk_path: sdk_path(),
        gpu_ids: vec![],
        resources: Resources {
            gpus: 0,
            cpus: 2,
            memory_bytes: 1 << 30,
            shm_bytes: 1 << 20,
        },
    });
    let launch = LaunchSpec {
        python: python(),
        entry: "main.py".into(),
        args: nsml_runner::args::entry_args("--flag 'two words'", kind != SessionKind::Train)
            .unwrap(),
        cwd: root.join("code"),
        env,
        gpu_ids: vec![],
        resources: Resources::default(),
    };
    let platform: Arc<dyn Platform> = fake.clone();
    let sdk = SdkContext::new(
        "demo/t1-cls/3".into(),
        kind,
        &root,
        root.join("tmp"),
        vec![root.join("data")],
        platform,
    )
    .unwrap();
    let spec = ProcessSpec {
        command: build_command(&launch),
        socket_path: socket,
        sdk,
        time_limit,
        stop_grace: Duration::from_secs(1),
        time_limit_text: "the inference must finish within 1 seconds".into(),
    };
    Run {
        _tmp: tmp,
        root,
        fake,
        spec: Some(spec),
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
async fn a_training_session_speaks_the_sdk_protocol() {
    let script = format!(
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
os.symlink("/etc", "escape")
call({{"op": "save", "checkpoint": "link", "path": os.path.abspath("escape")}})
call({{"op": "save", "checkpoint": "data", "path": os.environ["NSML_DATASET_PATH"] + "/train"}})
r = call({{"op": "load", "checkpoint": "best", "session": None}})
print("loaded", open(os.path.join(r["path"], "weights")).read(), flush=True)
call({{"op": "load", "checkpoint": "best", "session": "rivals/t1-cls/1"}})
call({{"op": "predictions", "predictions": [1, 2]}})
call(raw="not json")
call({{"op": "explode"}})
sys.exit(3)
"#
    );
    let mut r = prepare(SessionKind::Train, &script, None);
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

    let rs = replies(&lines);
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
    assert!(
        err(10).contains("only accepted from a submit session"),
        "{}",
        err(10)
    );
    assert!(err(11).starts_with("invalid request"), "{}", err(11));
    assert!(err(12).starts_with("invalid request"), "{}", err(12));
    assert!(
        rs[8]["path"]
            .as_str()
            .unwrap()
            .starts_with(r.root.join("tmp/load-").to_str().unwrap())
    );

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
    assert!(r.fake.predictions.lock().unwrap().is_empty());
    assert!(
        !r.root.join("nsml.sock").exists(),
        "the socket is removed at the end"
    );
}

#[tokio::test]
async fn a_submit_session_gets_test_mode_and_may_send_predictions() {
    let script = format!(
        r#"{CLIENT}
print("args", sys.argv[1:], flush=True)
print("env", os.environ["NSML_MODE"], os.environ["NSML_SUBMIT_KIND"], os.environ["NSML_CHECKPOINT_DIR"], flush=True)
call({{"op": "predictions", "predictions": [{{"id": 1, "label": "a"}}]}})
os.makedirs("out")
call({{"op": "save", "checkpoint": "steal", "path": os.path.abspath("out")}})
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
    assert!(started.elapsed() < Duration::from_secs(10));
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
import subprocess, time
p = subprocess.Popen(["sleep", "300"])
print("child", p.pid, flush=True)
time.sleep(300)
"#;
    let mut r = prepare(SessionKind::Submit, script, Some(Duration::from_secs(1)));
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
import subprocess
p = subprocess.Popen(["sleep", "300"])
print("child", p.pid, flush=True)
"#;
    let mut r = prepare(SessionKind::Train, script, None);
    let t = Instant::now();
    let (outcome, lines) = run(&mut r, CancellationToken::new()).await;
    assert_eq!(outcome.exit_code, 0);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    assert_child_gone(&lines).await;
}

/// Checks that the process whose pid the script printed as `child PID` is dead (gone or a zombie).
async fn assert_child_gone(lines: &[LogLine]) {
    let pid: u32 = texts(lines, "stdout")
        .iter()
        .find_map(|t| t.strip_prefix("child "))
        .expect("the script printed its child")
        .parse()
        .unwrap();
    for _ in 0..100 {
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return,
            Ok(stat)
                if stat
                    .rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z')) =>
            {
                return;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    panic!("child {pid} outlived its session");
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
