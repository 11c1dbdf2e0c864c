//! `slurm-bench`: the Slurm executor against raw `sbatch` on the same two-node Slurm cluster, in one run.
//!
//! - start latency (p50, p90): raw `sbatch` → the job's first statement, against `Run` → the entry's first
//!   statement through the platform (the distributed deployment with the Slurm executor: admission, `sbatch`,
//!   the job's runner fetching code and data, the sandbox, the interpreter);
//! - dispatch rate: sessions handed to the Slurm executor and submitted (`sbatch --hold`, so none runs), from 16
//!   at a time, against raw `sbatch --hold` from 16 at a time.
//!
//! - the CLI against the command line: `nsml run` of an unchanged directory on `nsmld up` as a whole process,
//!   against `sbatch --hold` as a whole process, alternated (p50, p90, and the sequential rate).
//!
//! Usage: `cargo build --release --workspace --bins && target/release/slurm-bench [--runs N] [--dispatch N]
//! [--cli N] [--cli-only]`.
//! Needs `slurm-wlm` and `munge` (it starts its own cluster from `deploy/slurm/`), Postgres and NATS.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt as _;
use nsml_common::clients::{Clients, ServiceAddrs};
use nsml_common::executor::Executor as _;
use nsml_integration_tests::figures::{now_ms, pct};
use nsml_integration_tests::grpc::{Client, authed};
use nsml_integration_tests::slurm::SlurmCluster;
use nsml_integration_tests::{Deployment, FreshDb, drop_stream, scenario};
use nsml_proto::v1::session_service_client::SessionServiceClient;
use nsml_proto::v1::{LogsRequest, Resources, Session};

const CONCURRENCY: usize = 16;

fn small() -> Resources {
    Resources {
        gpus: 0,
        cpus: 1,
        memory_bytes: 256 << 20,
        shm_bytes: 64 << 20,
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let get = |k: &str, d: usize| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let runs = get("--runs", 10);
    let dispatch_n = get("--dispatch", 200);
    let cli_n = get("--cli", 20);
    let cluster = SlurmCluster::start()?;
    for (k, v) in cluster.env() {
        // SAFETY: set before any other thread of this process exists (a current-thread runtime, nothing
        // spawned yet); Slurm's commands started from here then find the bench's cluster.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var(k, v)
        };
    }
    let (cli_ours, cli_raw) = cli_pairs(&cluster, cli_n)?;
    let cli_rows = || {
        for (what, p) in [("p50", 0.5), ("p90", 0.9)] {
            let (raw, ours) = (pct(cli_raw.clone(), p), pct(cli_ours.clone(), p));
            println!(
                "| `nsml run` (unchanged directory, `nsmld up`) against `sbatch --hold`, whole process, {what} | \
                 {raw:.0} ms | {ours:.0} ms | {:.2}× |",
                ours / raw
            );
        }
        let rate = |v: &Vec<f64>| 1000.0 * v.len() as f64 / v.iter().sum::<f64>();
        println!(
            "| the same, one after another | {:.1}/s | {:.1}/s | {:.2}× |",
            rate(&cli_raw),
            rate(&cli_ours),
            rate(&cli_ours) / rate(&cli_raw)
        );
    };
    if args.iter().any(|a| a == "--cli-only") {
        println!("slurm-bench (this machine, {cli_n} pairs)");
        println!("| measure | raw sbatch | platform | platform / sbatch |");
        println!("| --- | --- | --- | --- |");
        cli_rows();
        return Ok(());
    }

    let raw_start = raw_starts(&cluster, runs).await?;
    let platform_start = platform_starts(&cluster, runs).await?;
    let raw_rate = raw_dispatch(&cluster, dispatch_n).await?;
    cluster.command("scancel", &["--partition=nsml"])?;
    let exec_rate = executor_dispatch(dispatch_n).await?;
    cluster.command("scancel", &["--partition=nsml"])?;

    println!("slurm-bench (two slurmd on this machine, {runs} runs, {dispatch_n} dispatched)");
    println!("| measure | raw sbatch | platform | difference |");
    println!("| --- | --- | --- | --- |");
    for (what, p) in [("p50", 0.5), ("p90", 0.9)] {
        let (raw, ours) = (pct(raw_start.clone(), p), pct(platform_start.clone(), p));
        println!(
            "| submitted → first statement, {what} | {raw:.0} ms | {ours:.0} ms | {:+.0} ms |",
            ours - raw
        );
    }
    println!(
        "| dispatched (sbatch --hold), {CONCURRENCY} at a time | {raw_rate:.0}/s | {exec_rate:.0}/s | {:.2}× |",
        exec_rate / raw_rate
    );
    cli_rows();
    Ok(())
}

/// `nsml run` of an unchanged directory as a whole process (the CLI's start, the snapshot's hash, `FindCode`,
/// `Run`: admission and start) on `nsmld up`, against `sbatch --hold` as a whole process on the cluster, `n`
/// pairs, alternating which goes first: the wall times (ms), ours then sbatch's. The first run, which uploads
/// the directory, is not counted; every counted run must say it uploaded nothing. Each session is waited for
/// (not timed) before the next pair, so that none waits for another's slot.
fn cli_pairs(cluster: &SlurmCluster, n: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let dep = Deployment::embedded_env(&[], &[("NSML_RATE_LIMIT", "1000000")])?;
    let alice = scenario::login(&dep, "alice", "alice-pass")?;
    let work = tempfile::tempdir()?;
    std::fs::write(work.path().join("main.py"), "print('ok')\n")?;
    let args = [
        &["run", "-d", "t1-cls", "-e", "main.py"][..],
        &scenario::SMALL_RUN,
    ]
    .concat();
    let run = |counted: bool| -> anyhow::Result<f64> {
        let t = Instant::now();
        let out = alice.nsml_in(work.path(), &args, "")?.ok()?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        anyhow::ensure!(
            !counted || out.stdout.contains("nothing to upload"),
            "an unchanged directory was uploaded again: {}",
            out.all()
        );
        scenario::wait_ended(&alice, &scenario::started(&out)?)?;
        Ok(ms)
    };
    let sbatch = || -> anyhow::Result<f64> {
        let t = Instant::now();
        cluster.command(
            "sbatch",
            &[
                "--hold",
                "--parsable",
                "--partition=nsml",
                "--output=/dev/null",
                "--wrap=true",
            ],
        )?;
        Ok(t.elapsed().as_secs_f64() * 1000.0)
    };
    run(false)?;
    let (mut ours, mut raw) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        if i % 2 == 0 {
            raw.push(sbatch()?);
            ours.push(run(true)?);
        } else {
            ours.push(run(true)?);
            raw.push(sbatch()?);
        }
    }
    cluster.command("scancel", &["--partition=nsml"])?;
    Ok((ours, raw))
}

/// Raw `sbatch` → the job's first statement (a timestamp written by the job), sequential runs.
async fn raw_starts(cluster: &SlurmCluster, runs: usize) -> anyhow::Result<Vec<f64>> {
    let dir = tempfile::tempdir()?;
    let mut out = Vec::new();
    for i in 0..runs {
        let stamp = dir.path().join(format!("{i}"));
        let t0 = now_ms();
        cluster.command(
            "sbatch",
            &[
                "--parsable",
                "--partition=nsml",
                "--cpus-per-task=1",
                "--mem=256M",
                "--output=/dev/null",
                &format!(
                    "--wrap=python3 -c 'import time; open(\"{}\", \"w\").write(str(time.time() * 1000))'",
                    stamp.display()
                ),
            ],
        )?;
        out.push(wait_stamp(&stamp).await? - t0);
    }
    Ok(out)
}

async fn wait_stamp(path: &Path) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(v) = text.trim().parse::<f64>()
        {
            return Ok(v);
        }
        anyhow::ensure!(Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `Run` → the entry's first statement through the distributed deployment with the Slurm executor.
async fn platform_starts(cluster: &SlurmCluster, runs: usize) -> anyhow::Result<Vec<f64>> {
    let db = FreshDb::create().await?;
    let stream = format!("NSML_BENCH_{}", uuid::Uuid::new_v4().simple());
    let node = tempfile::tempdir()?;
    let result = async {
        let dep = cluster.deployment(&db.url, &stream, node.path())?;
        let alice = Client::login(&dep.url, "alice", "alice-pass").await?;
        let snap = alice
            .upload(
                "t1-cls",
                &[(
                    "main.py",
                    "import time\nprint('tick %.3f' % (time.time() * 1000), flush=True)\n",
                )],
            )
            .await?;
        let mut sessions = SessionServiceClient::new(alice.channel.clone());
        let mut out = Vec::new();
        for _ in 0..runs {
            let t0 = now_ms();
            let s = alice.run("t1-cls", &snap, "", small()).await?;
            let mut logs = sessions
                .logs(authed(
                    LogsRequest {
                        name: s.name.clone(),
                        follow: true,
                    },
                    &alice.token,
                )?)
                .await?
                .into_inner();
            let mut first = None;
            while let Some(line) = logs.next().await {
                if let Some(v) = line?
                    .text
                    .strip_prefix("tick ")
                    .and_then(|v| v.trim().parse::<f64>().ok())
                {
                    first.get_or_insert(v);
                }
            }
            out.push(first.with_context(|| format!("session {} printed nothing", s.name))? - t0);
        }
        Ok::<_, anyhow::Error>(out)
    }
    .await;
    drop_stream(&stream).await;
    db.drop_db().await;
    result
}

/// Raw `sbatch --hold`, `CONCURRENCY` at a time: jobs submitted per second.
async fn raw_dispatch(cluster: &SlurmCluster, n: usize) -> anyhow::Result<f64> {
    let env: Vec<(String, String)> = cluster
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let t = Instant::now();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(0..n)
        .map(|i| {
            let env = env.clone();
            async move {
                let out = tokio::process::Command::new("sbatch")
                    .args([
                        "--parsable",
                        "--hold",
                        "--partition=nsml",
                        "--cpus-per-task=1",
                        "--mem=256M",
                        "--output=/dev/null",
                        &format!("--job-name=raw/{i}"),
                        "--wrap=true",
                    ])
                    .envs(env)
                    .output()
                    .await?;
                anyhow::ensure!(
                    out.status.success(),
                    "sbatch: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let elapsed = t.elapsed().as_secs_f64();
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    Ok(n as f64 / elapsed)
}

/// Sessions handed to the Slurm executor, `CONCURRENCY` at a time, submitted held: sessions per second.
async fn executor_dispatch(n: usize) -> anyhow::Result<f64> {
    let mut cfg = nsml_runner::SlurmConfig::new(
        nsml_integration_tests::bin("nsmld"),
        "/nonexistent/runner.toml".into(),
    );
    cfg.partition = Some("nsml".into());
    cfg.job_prefix = format!("bench{}", uuid::Uuid::new_v4().simple());
    cfg.extra_args = vec!["--hold".into()];
    // The held jobs never run, so no runner calls back: the clients point nowhere.
    let clients = Clients::new(
        &ServiceAddrs::all_at("http://127.0.0.1:9"),
        "bench-secret-0123456789",
        "bench",
    )?;
    let exec = nsml_runner::SlurmExecutor::new(cfg, clients);
    exec.running().await;
    let t = Instant::now();
    let results: Vec<Result<(), String>> = futures::stream::iter(0..n)
        .map(|i| {
            let exec = Arc::clone(&exec);
            async move {
                let session = Session {
                    name: format!("bench/ds/{i}"),
                    team: "bench".into(),
                    dataset: "ds".into(),
                    number: i as u64,
                    resources: Some(small()),
                    ..Default::default()
                };
                exec.start(session, 0).await
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let elapsed = t.elapsed().as_secs_f64();
    results
        .into_iter()
        .collect::<Result<Vec<()>, String>>()
        .map_err(anyhow::Error::msg)?;
    Ok(n as f64 / elapsed)
}
