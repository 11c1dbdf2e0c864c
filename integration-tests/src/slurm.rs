//! A real two-node Slurm cluster on this machine (`scripts/slurm-cluster`, configuration in
//! `deploy/slurm/`), started and stopped by the tests that use it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::{Deployment, eventually, repo_root};

/// A running cluster: munged, slurmctld and the slurmd of nodes `gpu1` (2 GPUs) and `cpu1` (none).
pub struct SlurmCluster {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    stopped: bool,
}

fn script() -> PathBuf {
    repo_root().join("scripts/slurm-cluster")
}

impl SlurmCluster {
    /// Starts a cluster in a fresh state directory.
    pub fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("nsml-slurm-").tempdir()?;
        // Each node declares 256 GiB (more than this machine has; Slurm does not enforce it, the runner's
        // cgroup enforces each session's own limit), so that the example competition's quotas, not the
        // nodes' memory, decide what the participant's scenario may hold.
        let out = Command::new(script())
            .args(["start", &dir.path().display().to_string()])
            .env("SLURM_CLUSTER_NODE_MEM_MB", "262144")
            .output()
            .context("cannot run scripts/slurm-cluster (are slurm-wlm and munge installed?)")?;
        if !out.status.success() {
            let _ = Command::new(script())
                .args(["stop", &dir.path().display().to_string()])
                .output();
            bail!(
                "the Slurm cluster did not start:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let env = read_env(&dir.path().join("env"))?;
        Ok(Self {
            dir,
            env,
            stopped: false,
        })
    }

    /// The environment Slurm's commands need to find this cluster (`SLURM_CONF`).
    pub fn env(&self) -> Vec<(&str, &str)> {
        self.env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    /// Runs a Slurm command (`squeue`, `scontrol`, …) against this cluster; returns its output.
    pub fn command(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(program)
            .args(args)
            .envs(self.env.iter().cloned())
            .output()
            .with_context(|| format!("cannot run {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The node the job of session `name` runs on, once it runs.
    pub fn node_of(&self, name: &str) -> anyhow::Result<String> {
        eventually(Duration::from_secs(120), || {
            let out = self.command(
                "squeue",
                &["--noheader", "--states=all", "--format=%k|%T|%N"],
            )?;
            Ok(out.lines().find_map(|l| {
                let mut f = l.trim().split('|');
                let (Some(comment), Some(state), Some(node)) = (f.next(), f.next(), f.next())
                else {
                    return None;
                };
                (comment == name && state == "RUNNING" && !node.is_empty())
                    .then(|| node.to_string())
            }))
        })
    }

    /// Kills node `node` as if its machine were lost: its slurmd and every process of its jobs.
    pub fn kill_node(&self, node: &str) -> anyhow::Result<()> {
        self.harness(&["kill-node", &self.dir.path().display().to_string(), node])
    }

    /// Starts a killed node's slurmd again (the node returns to service).
    pub fn start_node(&self, node: &str) -> anyhow::Result<()> {
        self.harness(&["start-node", &self.dir.path().display().to_string(), node])
    }

    /// The state of the job of session `name` (`RUNNING`, `NODE_FAIL`, …), as `squeue` shows it.
    pub fn job_state(&self, name: &str) -> anyhow::Result<Option<String>> {
        let out = self.command("squeue", &["--noheader", "--states=all", "--format=%k|%T"])?;
        Ok(out.lines().find_map(|l| {
            l.trim()
                .split_once('|')
                .filter(|(k, _)| *k == name)
                .map(|(_, state)| state.to_string())
        }))
    }

    /// Stops slurmctld (Slurm unreachable) or starts it again.
    pub fn controller(&self, up: bool) -> anyhow::Result<()> {
        let verb = if up { "start-ctld" } else { "stop-ctld" };
        self.harness(&[verb, &self.dir.path().display().to_string()])
    }

    fn harness(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new(script()).args(args).output()?;
        if !out.status.success() {
            bail!(
                "scripts/slurm-cluster {args:?} failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The cluster's state directory (its daemons' logs; a good place for the jobs' own output).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The distributed deployment over `db_url` and `stream` whose sessions run on this cluster, with the example
    /// competition applied. The runners' configuration and scratch space are under `node_dir` (nothing shared with
    /// the platform's data directory); the jobs' own output goes to the cluster's directory.
    pub fn deployment(
        &self,
        db_url: &str,
        stream: &str,
        node_dir: &Path,
    ) -> anyhow::Result<Deployment> {
        std::fs::create_dir_all(node_dir)?;
        let runner_config = node_dir.join("runner.toml");
        let executor = executor_config(&runner_config, self.dir(), &[]);
        let dep = Deployment::distributed_with(
            db_url,
            "nats://127.0.0.1:4222",
            stream,
            &self.env(),
            &executor,
        )?;
        write_runner_config(&dep, &runner_config, &node_dir.join("scratch"))?;
        dep.apply_competition(&repo_root().join("examples/competition.toml"))?;
        Ok(dep)
    }

    /// Prints the tail of every log of the cluster (slurmctld, the slurmd, munged, the jobs' runners), for a
    /// failed test.
    pub fn print_logs(&self) {
        let mut logs = Vec::new();
        let mut dirs = vec![self.dir.path().to_path_buf()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "log") {
                    logs.push(p);
                }
            }
        }
        logs.sort();
        for p in logs {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!("--- {} (last {} lines)", p.display(), tail.len());
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

impl Drop for SlurmCluster {
    fn drop(&mut self) {
        if !self.stopped {
            self.stopped = true;
            let _ = Command::new(script())
                .args(["stop", &self.dir.path().display().to_string()])
                .output();
        }
    }
}

/// `KEY=VALUE` lines (optionally `export`ed).
fn read_env(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("the cluster wrote no {}", path.display()))?;
    Ok(text
        .lines()
        .map(|l| l.trim().trim_start_matches("export ").trim())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            (
                k.to_string(),
                v.trim_matches('"').trim_matches('\'').to_string(),
            )
        })
        .collect())
}

/// The `[executor]` table of a deployment whose sessions run on this cluster: the runner is this
/// workspace's `nsmld`, reading `runner_config`; jobs' own output goes to `output_dir`.
fn executor_config(runner_config: &Path, output_dir: &Path, extra_args: &[&str]) -> String {
    let extra: Vec<String> = extra_args.iter().map(|a| format!("{a:?}")).collect();
    format!(
        r#"
[executor]
kind = "slurm"
partition = "nsml"
runner_command = "{nsmld}"
runner_config = "{runner}"
output = "{out}/runner-%j.log"
poll_every_ms = 500
extra_args = [{extra}]
"#,
        nsmld = crate::bin("nsmld").display(),
        runner = runner_config.display(),
        out = output_dir.display(),
        extra = extra.join(", "),
    )
}

/// Writes the runner's configuration for the "nodes": the deployment's service addresses and secret, and a
/// scratch directory of its own (nothing shared with the platform's data directory), readable by its owner
/// only.
fn write_runner_config(dep: &Deployment, path: &Path, scratch: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let platform = std::fs::read_to_string(dep.config_path().context("no config")?)?;
    let mut text = format!("data_dir = \"{}\"\n", scratch.display());
    for line in platform
        .lines()
        .filter(|l| l.starts_with("internal_secret"))
    {
        text.push_str(line);
        text.push('\n');
    }
    let services = platform
        .split("[services]")
        .nth(1)
        .context("no [services] in the deployment's configuration")?;
    text.push_str("\n[services]\n");
    for line in services
        .lines()
        .take_while(|l| !l.trim_start().starts_with('['))
    {
        text.push_str(line);
        text.push('\n');
    }
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}
