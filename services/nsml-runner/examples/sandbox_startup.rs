//! What the sandbox adds to a session's start: spawn → the entry's first line, for `python -u main.py`
//! run bare and run as the runner runs it (cgroup made and joined, bubblewrap, `setpriv`), interleaved.
//!
//! Usage (as root, with bubblewrap installed): `cargo run --release -p nsml-runner --example
//! sandbox_startup [RUNS]`; prints the median and 90th percentile of each, in milliseconds.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Instant;

use nsml_proto::v1::{Resources, SessionKind};
use nsml_runner::cgroup::CgroupLimits;
use nsml_runner::launch::{EnvSpec, LaunchSpec, build_command, session_env};
use nsml_runner::sandbox::{SandboxHost, SandboxSpec};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const RESOURCES: Resources = Resources {
    gpus: 0,
    cpus: 1,
    memory_bytes: 2 << 30,
    shm_bytes: 64 << 20,
};

/// Spawns `cmd` and returns the milliseconds until its first stdout line.
async fn first_line_ms(mut cmd: Command, began: Instant) -> Result<f64> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).await?;
    let ms = began.elapsed().as_secs_f64() * 1000.0;
    if line.trim() != "started" {
        return Err(format!("the entry printed {line:?}").into());
    }
    child.wait().await?;
    Ok(ms)
}

fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    (at(0.5), at(0.9))
}

#[tokio::main]
async fn main() -> Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(30);
    let tmp = tempfile::tempdir()?;
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../clients/python")
        .canonicalize()?;
    let host = Arc::new(SandboxHost::detect(
        "python3",
        &tmp.path().join("sandbox"),
        &[],
    )?);
    let root = tmp.path().join("sessions/demo/t1-cls/1");
    for d in ["code", "data", "ckpt", "tmp"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    let loads = tmp.path().join("loads");
    std::fs::create_dir_all(&loads)?;
    std::fs::write(root.join("code/main.py"), "print('started', flush=True)\n")?;
    if let Some((uid, gid)) = host.owner() {
        for d in [root.clone(), root.join("tmp")] {
            std::os::unix::fs::chown(d, Some(uid), Some(gid))?;
        }
    }
    let env = session_env(&EnvSpec {
        name: "demo/t1-cls/1".into(),
        dataset: "t1-cls".into(),
        kind: SessionKind::Train,
        session_dir: root.clone(),
        dataset_dir: root.join("data"),
        tmp_dir: root.join("tmp"),
        checkpoint_dir: root.join("ckpt"),
        socket: root.join("nsml.sock"),
        sdk_path: sdk.clone(),
        gpu_ids: vec![],
        resources: RESOURCES,
        search_path: host.search_path(),
    });
    let python = host.python().display().to_string();

    let (mut bare, mut boxed) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let began = Instant::now();
        let mut cmd = Command::new(&python);
        cmd.arg("-u")
            .arg("main.py")
            .current_dir(root.join("code"))
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)));
        bare.push(first_line_ms(cmd, began).await?);

        // Everything the runner does per session from here on counts: the cgroup too.
        let began = Instant::now();
        let cgroup = host.cgroups().create(
            "demo/t1-cls/1",
            CgroupLimits {
                memory_bytes: RESOURCES.memory_bytes,
                cpus: RESOURCES.cpus,
                pids: 1024,
            },
        )?;
        // The SDK socket is bound into the sandbox; a plain file stands in for it here.
        std::fs::write(root.join("nsml.sock"), "")?;
        let launch = LaunchSpec {
            python: python.clone(),
            entry: "main.py".into(),
            args: vec![],
            cwd: root.join("code"),
            env: env.clone(),
            gpu_ids: vec![],
            resources: RESOURCES,
            sandbox: SandboxSpec {
                host: host.clone(),
                writable: vec![root.clone()],
                read_only: vec![
                    root.join("code"),
                    root.join("data"),
                    root.join("ckpt"),
                    loads.clone(),
                    sdk.clone(),
                ],
                socket: root.join("nsml.sock"),
                devices: vec![],
                shm_bytes: RESOURCES.shm_bytes,
                tmp_bytes: RESOURCES.memory_bytes,
                cgroup_join: cgroup.join_files(),
            },
        };
        boxed.push(first_line_ms(build_command(&launch), began).await?);
        cgroup.remove().await;
    }
    let (b50, b90) = stats(bare);
    let (s50, s90) = stats(boxed);
    println!("run -> entry started, {runs} runs each (ms)");
    println!("  without the sandbox: median {b50:.1}, p90 {b90:.1}");
    println!("  with the sandbox:    median {s50:.1}, p90 {s90:.1}");
    println!("  added by the sandbox (medians): {:.1}", s50 - b50);
    Ok(())
}
