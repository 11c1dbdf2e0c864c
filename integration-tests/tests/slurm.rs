//! Sessions run as Slurm jobs: the distributed deployment with the Slurm executor, over a real two-node
//! cluster started from `deploy/slurm/` (munged, slurmctld, and the slurmd of `gpu1`, which declares 2 GPUs
//! through gres, and `cpu1`, which has none).
//!
//! Exercised for real: sbatch/squeue/scancel against slurmctld, placement by Slurm's allocation of GPUs, CPUs
//! and memory, the runner as its own process started by the job (reaching the platform over gRPC only, with
//! its own scratch directory), `SLURM_JOB_GPUS` handed to the session as `CUDA_VISIBLE_DEVICES`, a lost
//! node, Slurm unreachable, and a restart of the platform under a running job. Not exercised: real GPU work
//! (the gres device files are plain files made by the harness) and several machines (the two slurmd share
//! this one).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, ensure};
use nsml_integration_tests::slurm::SlurmCluster;
use nsml_integration_tests::{Deployment, FreshDb, User, drop_stream, eventually, scenario};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(180);

/// A session that prints what it was given, then runs until stopped (or for `secs`), saving a checkpoint
/// every second.
fn long_session(dir: &Path, secs: u32) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("main.py"),
        format!(
            r#"import os, time
import nsml
print("gpus=" + os.environ.get("CUDA_VISIBLE_DEVICES", ""), flush=True)
step = [0]
def save(path, **kwargs):
    with open(os.path.join(path, "w"), "w") as f:
        f.write(str(step[0]))
nsml.bind(save=save)
for i in range({secs}):
    step[0] = i
    nsml.report(step=i, loss=1.0 / (i + 1))
    nsml.save(i)
    print("tick", i, flush=True)
    time.sleep(1)
print("done", flush=True)
"#
        ),
    )?;
    Ok(())
}

fn status(u: &User, name: &str) -> anyhow::Result<Value> {
    scenario::session(u, name)
}

fn wait_status(u: &User, name: &str, want: &str) -> anyhow::Result<Value> {
    eventually(LONG, || {
        let s = status(u, name)?;
        Ok((s["status"] == want).then_some(s))
    })
    .with_context(|| format!("session {name} never reached {want}"))
}

/// Starts `main.py` of `dir` as a training session with `gpus` GPUs, `cpus` CPUs and 1 GiB; returns its name.
fn start(u: &User, dir: &Path, gpus: &str, cpus: &str) -> anyhow::Result<String> {
    scenario::run_with(
        u,
        dir,
        "t1-cls",
        &["-g", gpus, "-c", cpus, "--memory", "1G", "--shm", "64M"],
    )
}

/// Waits until session `name`'s log shows `text`; returns the log.
fn logged(u: &User, name: &str, text: &str) -> anyhow::Result<String> {
    eventually(LONG, || {
        let out = u.nsml(&["logs", name])?.ok()?;
        Ok(out.stdout.contains(text).then_some(out.stdout))
    })
    .with_context(|| format!("session {name} never logged `{text}`"))
}

/// Waits until the team holds nothing, as `nsml quota -j` shows it.
fn holds_nothing(u: &User) -> anyhow::Result<()> {
    eventually(LONG, || {
        let q = u.nsml(&["quota", "-j"])?.ok()?.json()?;
        let held = |v: &Value| v.as_u64().unwrap_or(0);
        Ok((held(&q["held"]["gpus"]) == 0
            && held(&q["held"]["cpus"]) == 0
            && held(&q["sessions"]) == 0)
            .then_some(()))
    })
    .context("the team's quota was not released")
}

#[test]
fn sessions_run_as_slurm_jobs() -> anyhow::Result<()> {
    let cluster = SlurmCluster::start()?;
    let rt = tokio::runtime::Runtime::new()?;
    let db = rt.block_on(FreshDb::create())?;
    let stream = format!("NSML_IT_{}", uuid::Uuid::new_v4().simple());
    let node = tempfile::tempdir()?;
    let result = (|| {
        let mut dep = cluster.deployment(&db.url, &stream, node.path())?;
        let work = tempfile::tempdir()?;

        // The participant's whole loop, every session a Slurm job.
        let left = scenario::participant_loop(&dep, work.path())?;
        let alice = scenario::login(&dep, "alice", "alice-pass")?;
        let bob = scenario::login(&dep, "bob", "bob-pass")?;
        placement_stop_and_queue(&cluster, &alice, &bob, work.path())?;
        refusals(&cluster, &alice, work.path())?;
        cancelled_by_an_operator(&cluster, &alice, work.path())?;
        restart_under_a_running_job(&cluster, &mut dep, &alice, work.path())?;
        lost_node(&cluster, &bob, work.path())?;
        ended_while_the_platform_was_down(&cluster, &mut dep, &bob, work.path())?;
        scenario::still_there(&dep, &left)?;
        Ok::<_, anyhow::Error>(())
    })();
    rt.block_on(drop_stream(&stream));
    rt.block_on(db.drop_db());
    if result.is_err() {
        cluster.print_logs();
    }
    result
}

/// A 2-GPU session lands on the GPU node with Slurm's GPUs; another team's CPU session goes to the other
/// node when the first is full; a session Slurm cannot place yet is Queued with Slurm's reason; stop cancels
/// the job and releases the quota.
fn placement_stop_and_queue(
    cluster: &SlurmCluster,
    alice: &User,
    bob: &User,
    work: &Path,
) -> anyhow::Result<()> {
    let a_dir = work.join("alice-long");
    long_session(&a_dir, 600)?;
    let gpu = start(alice, &a_dir, "2", "2")?;
    ensure!(
        cluster.node_of(&gpu)? == "gpu1",
        "the 2-GPU session is not on gpu1"
    );
    let logs = logged(alice, &gpu, "tick 0")?;
    ensure!(
        logs.contains("gpus=0,1"),
        "the session did not get Slurm's GPUs: {logs}"
    );

    let b_dir = work.join("bob-long");
    long_session(&b_dir, 600)?;
    let cpu = start(bob, &b_dir, "0", "2")?;
    ensure!(
        cluster.node_of(&cpu)? == "cpu1",
        "the CPU session is not on cpu1"
    );

    // Both nodes are full: the next session waits in Slurm's queue, and ps says why.
    let queued = start(bob, &b_dir, "0", "2")?;
    let shown = eventually(LONG, || {
        let s = status(bob, &queued)?;
        let reason = s["reason"].as_str().unwrap_or_default().to_string();
        Ok(
            (s["status"] == "queued" && reason.contains("Queued in Slurm (Resources)"))
                .then_some(reason),
        )
    })?;
    let ps = bob.nsml(&["ps"])?.ok()?;
    ensure!(ps.stdout.contains("Queued"), "ps: {}", ps.stdout);
    eprintln!("queued: {shown}");

    // Stopping the GPU session cancels its job; its runner reports the stop.
    alice.nsml(&["stop", &gpu])?.ok()?;
    wait_status(alice, &gpu, "stopped")?;
    holds_nothing(alice)?;
    // The queued session now gets the GPU node's CPUs.
    ensure!(
        cluster.node_of(&queued)? == "gpu1",
        "the queued session did not start on gpu1"
    );
    for s in [&queued, &cpu] {
        bob.nsml(&["stop", s])?.ok()?;
        wait_status(bob, s, "stopped")?;
    }
    holds_nothing(bob)?;
    Ok(())
}

/// sbatch refusing a job fails the session with Slurm's message; Slurm unreachable refuses `run` before
/// anything is held.
fn refusals(cluster: &SlurmCluster, alice: &User, work: &Path) -> anyhow::Result<()> {
    let dir = work.join("alice-refused");
    long_session(&dir, 1)?;
    // More CPUs than any node has, within the team's quota.
    let big = start(alice, &dir, "0", "16")?;
    let failed = wait_status(alice, &big, "failed")?;
    let reason = failed["reason"].as_str().unwrap_or_default();
    // Slurm either refuses it at once or keeps it pending for its partition's limits; either way the session
    // fails with Slurm's words.
    ensure!(
        reason.contains("Slurm refused") || reason.contains("Slurm will never start"),
        "reason: {failed}"
    );
    holds_nothing(alice)?;

    cluster.controller(false)?;
    let out = alice
        .nsml_in(
            &dir,
            &[
                "run", "-d", "t1-cls", "-g", "0", "-c", "1", "--memory", "1G",
            ],
            "",
        )?
        .failed()?;
    ensure!(out.all().contains("Slurm"), "refusal: {}", out.all());
    ensure!(!out.all().contains("is started"), "refusal: {}", out.all());
    holds_nothing(alice)?;
    cluster.controller(true)?;
    // Runs are taken again once the platform sees Slurm answer.
    eventually(LONG, || {
        let out = alice.nsml_in(
            &dir,
            &[
                "run", "-d", "t1-cls", "-g", "0", "-c", "1", "--memory", "1G", "--shm", "64M",
            ],
            "",
        )?;
        if out.code == 0 {
            return Ok(Some(()));
        }
        ensure!(
            out.all().contains("cannot be reached"),
            "run: {}",
            out.all()
        );
        Ok(None)
    })
    .context("runs were not taken again after Slurm came back")?;
    Ok(())
}

/// An operator cancelling a session's job outside the platform ends the session as Failed, saying so.
fn cancelled_by_an_operator(
    cluster: &SlurmCluster,
    alice: &User,
    work: &Path,
) -> anyhow::Result<()> {
    let dir = work.join("alice-cancelled");
    long_session(&dir, 600)?;
    let s = start(alice, &dir, "0", "1")?;
    cluster.node_of(&s)?;
    logged(alice, &s, "tick 0")?;
    let id = cluster
        .command("squeue", &["--noheader", "--format=%i|%k"])?
        .lines()
        .find_map(|l| {
            l.trim()
                .split_once('|')
                .filter(|(_, k)| *k == s)
                .map(|(i, _)| i.to_string())
        })
        .context("the session's job is not in squeue")?;
    cluster.command("scancel", &[&id])?;
    let failed = wait_status(alice, &s, "failed")?;
    let reason = failed["reason"].as_str().unwrap_or_default();
    ensure!(
        reason.contains("ended the session's job")
            || reason.contains("cancelled outside the platform"),
        "reason: {failed}"
    );
    holds_nothing(alice)?;
    Ok(())
}

/// The platform killed and restarted under a running job: the job keeps running, its runner reports to
/// the restarted services, and the session ends normally with its checkpoints and logs complete.
fn restart_under_a_running_job(
    cluster: &SlurmCluster,
    dep: &mut Deployment,
    alice: &User,
    work: &Path,
) -> anyhow::Result<()> {
    let dir = work.join("alice-restart");
    long_session(&dir, 25)?;
    let s = start(alice, &dir, "0", "1")?;
    cluster.node_of(&s)?;
    logged(alice, &s, "tick 2")?;
    dep.kill_and_restart_after(Duration::from_secs(5))?;
    let ended = wait_status(alice, &s, "exited")?;
    let logs = alice.nsml(&["logs", &s])?.ok()?;
    ensure!(
        logs.stdout.contains("tick 24") && logs.stdout.contains("done"),
        "logs after the restart: {}",
        logs.stdout
    );
    let ckpts = alice.nsml(&["model", "ls", &s, "-j"])?.ok()?.json()?;
    ensure!(
        ckpts.as_array().map_or(0, Vec::len) == 25,
        "checkpoints after the restart: {ckpts} ({ended})"
    );
    // One job for the session: nothing was submitted twice.
    let jobs = cluster.command("squeue", &["--noheader", "--states=all", "--format=%k"])?;
    ensure!(
        jobs.lines().filter(|l| l.trim() == s).count() == 1,
        "jobs: {jobs}"
    );
    holds_nothing(alice)?;
    Ok(())
}

/// A compute node lost mid-session ends the session as Failed with the reason and releases its quota.
fn lost_node(cluster: &SlurmCluster, bob: &User, work: &Path) -> anyhow::Result<()> {
    let dir = work.join("bob-lost");
    long_session(&dir, 600)?;
    let s = start(bob, &dir, "0", "2")?;
    let node = cluster.node_of(&s)?;
    logged(bob, &s, "tick 1")?;
    cluster.kill_node(&node)?;
    let failed = wait_status(bob, &s, "failed")?;
    let reason = failed["reason"].as_str().unwrap_or_default();
    ensure!(
        reason.contains("node") || reason.contains("heartbeat"),
        "reason: {failed}"
    );
    holds_nothing(bob)?;
    cluster.start_node(&node)?;
    Ok(())
}

/// A job that ends while the platform is down (its node lost with its runner) is recorded after the
/// restart with how Slurm says it ended, and holds nothing.
fn ended_while_the_platform_was_down(
    cluster: &SlurmCluster,
    dep: &mut Deployment,
    bob: &User,
    work: &Path,
) -> anyhow::Result<()> {
    let dir = work.join("bob-while-down");
    long_session(&dir, 600)?;
    let s = start(bob, &dir, "0", "2")?;
    let node = cluster.node_of(&s)?;
    dep.kill_and_restart_when(|| {
        cluster.kill_node(&node)?;
        eventually(LONG, || {
            Ok((cluster.job_state(&s)?.as_deref() == Some("NODE_FAIL")).then_some(()))
        })
        .context("Slurm never marked the job failed")
    })?;
    let failed = wait_status(bob, &s, "failed")?;
    let reason = failed["reason"].as_str().unwrap_or_default();
    ensure!(
        reason.contains("the node running the job failed") && reason.contains("NODE_FAIL"),
        "reason: {failed}"
    );
    holds_nothing(bob)?;
    cluster.start_node(&node)?;
    Ok(())
}
