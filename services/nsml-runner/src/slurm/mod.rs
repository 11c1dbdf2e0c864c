//! The Slurm executor: each admitted session is one Slurm job, which runs the session's runner
//! (`nsmld runner`) on the node Slurm picks.
//!
//! The platform keeps what only it does (team quotas, submit rules, the ledger, scoring) and hands
//! placement to Slurm: every admitted session is submitted at once, and Slurm's queue is the cluster's
//! queue (`docs/adr/2026-12-04-slurm-queues-admitted-sessions.md`). A pending job's session shows as
//! Queued with Slurm's reason in words; a job Slurm ends (time limit, node failure, out of memory,
//! cancelled outside the platform) ends its session with that reason.
//!
//! - [`jobs`]: what is asked of Slurm and read back, as pure functions (arguments, the batch script,
//!   `squeue` lines, reasons and end states in words);
//! - this module: the [`SlurmExecutor`], which runs `sbatch`, `squeue` and `scancel`, and a monitor that
//!   polls `squeue` for the state of every job of the platform.

pub mod jobs;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use nsml_common::clients::Clients;
use nsml_common::executor::Executor;
use nsml_proto::internal::v1::RunnerFinishedRequest;
use nsml_proto::v1::Session;
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;

use self::jobs::{Job, JobState};

/// How the platform submits sessions to Slurm (`[executor]` with `kind = "slurm"`).
#[derive(Debug, Clone)]
pub struct SlurmConfig {
    /// The partition jobs go to (`--partition`); Slurm's default partition when unset.
    pub partition: Option<String>,
    /// The account jobs are charged to (`--account`).
    pub account: Option<String>,
    /// The `nsmld` binary on the compute nodes.
    pub runner_command: PathBuf,
    /// The runner's configuration file on the compute nodes (the platform's addresses, the internal secret,
    /// the runner's settings).
    pub runner_config: PathBuf,
    /// Where a job's own output (the runner's log) goes on its node, with Slurm's patterns (`%j`: the
    /// job id); `/dev/null` when unset. The session's logs go to the platform either way.
    pub output: Option<String>,
    /// Job names start with this, then `/TEAM/DATASET/N`, so the platform's jobs are told apart from
    /// others on a shared cluster.
    pub job_prefix: String,
    /// How often `squeue` is polled for the platform's jobs.
    pub poll_every: Duration,
    /// Further `sbatch` arguments a host needs (`--qos=…`, `--constraint=…`).
    pub extra_args: Vec<String>,
}

impl SlurmConfig {
    /// A configuration with the defaults: Slurm's default partition, no account, output discarded, jobs
    /// named `nsml/…`, `squeue` every 2 seconds.
    pub fn new(runner_command: PathBuf, runner_config: PathBuf) -> Self {
        Self {
            partition: None,
            account: None,
            runner_command,
            runner_config,
            output: None,
            job_prefix: "nsml".into(),
            poll_every: Duration::from_secs(2),
            extra_args: Vec::new(),
        }
    }
}

/// How long one Slurm command may take before it counts as failed (slurmctld unreachable).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a job Slurm ended is left to its runner, which reports the end in its own words (an exit
/// code, the platform's own limits), before the monitor reports Slurm's.
const RUNNER_GRACE: Duration = Duration::from_secs(10);

/// What the monitor knows of the platform's jobs.
#[derive(Debug, Default)]
struct Known {
    /// The platform's jobs by session, as the last poll saw them (and as submitted since).
    jobs: HashMap<String, Job>,
    /// When each job was first seen ended.
    ended_at: HashMap<String, Instant>,
    /// Sessions whose job the platform cancelled itself: their runner reports the stop.
    cancelled: HashSet<String>,
    /// Sessions whose end the monitor has reported.
    reported: HashSet<String>,
    /// The last poll's failure, if it failed.
    unreachable: Option<String>,
    /// When the last poll finished.
    polled_at: Option<Instant>,
    /// Whether a poll has read Slurm's jobs yet.
    synced: bool,
}

/// Runs sessions as Slurm jobs.
pub struct SlurmExecutor {
    cfg: SlurmConfig,
    clients: Clients,
    known: Mutex<Known>,
    /// Set once the first poll has read what Slurm already holds: nothing is submitted before, so a
    /// session whose job survived a restart of the platform is never submitted twice.
    first_poll: tokio::sync::OnceCell<()>,
}

impl SlurmExecutor {
    /// An executor submitting to the Slurm cluster that the environment's `SLURM_CONF` (or Slurm's default
    /// configuration) names; its monitor runs until the executor is dropped.
    pub fn new(cfg: SlurmConfig, clients: Clients) -> Arc<Self> {
        let exec = Arc::new(Self {
            cfg,
            clients,
            known: Mutex::new(Known::default()),
            first_poll: tokio::sync::OnceCell::new(),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(monitor(Arc::downgrade(&exec)));
        }
        exec
    }

    /// Waits for the first poll of `squeue` (made now if the monitor has not yet).
    async fn polled(&self) {
        self.first_poll
            .get_or_init(|| async {
                self.poll().await;
            })
            .await;
    }

    /// Reads the state of every job of the platform, records it, and reports the ends the runners did
    /// not report.
    async fn poll(&self) {
        let listed = command("squeue", &jobs::squeue_args(), None).await;
        let now = Instant::now();
        let mut to_report = Vec::new();
        let mut to_cancel = Vec::new();
        {
            let mut k = self.known.lock();
            k.polled_at = Some(now);
            match listed {
                Err(why) => {
                    k.unreachable = Some(why);
                    return;
                }
                Ok(out) => {
                    k.unreachable = None;
                    let first = !k.synced;
                    k.synced = true;
                    let seen = jobs::parse_squeue(&out, &self.cfg.job_prefix);
                    let names: HashSet<String> = seen.iter().map(|j| j.session.clone()).collect();
                    // A job submitted since the poll began is not in its output yet: keep it.
                    k.jobs.retain(|name, job| {
                        names.contains(name) || job.state == JobState::Submitted
                    });
                    for job in seen {
                        // Jobs that ended before this process started were dealt with before it (or are
                        // recorded by the restart's recovery, which asks `end_of`): not reported again.
                        if first && job.state.is_end() {
                            k.reported.insert(job.session.clone());
                        }
                        k.jobs.insert(job.session.clone(), job);
                    }
                    // What is kept of a job goes when Slurm forgets it (`MinJobAge`).
                    let kept: HashSet<String> = k.jobs.keys().cloned().collect();
                    k.ended_at.retain(|n, _| kept.contains(n));
                    k.reported.retain(|n| kept.contains(n));
                    k.cancelled.retain(|n| kept.contains(n));
                }
            }
            // A job Slurm will never start holds its team's quota for nothing: cancelled, its session failed.
            let hopeless: Vec<(String, Job, String)> = k
                .jobs
                .iter()
                .filter(|(n, _)| !k.reported.contains(*n) && !k.cancelled.contains(*n))
                .filter_map(|(n, j)| jobs::never_starts(j).map(|why| (n.clone(), j.clone(), why)))
                .collect();
            for (name, job, why) in hopeless {
                k.reported.insert(name.clone());
                k.cancelled.insert(name.clone());
                to_cancel.push(job.id);
                to_report.push((name, why));
            }
            let ended: Vec<(String, Job)> = k
                .jobs
                .iter()
                .filter(|(_, j)| j.state.is_end())
                .map(|(n, j)| (n.clone(), j.clone()))
                .collect();
            for (name, job) in ended {
                let since = *k.ended_at.entry(name.clone()).or_insert(now);
                let unreported = !k.reported.contains(&name) && !k.cancelled.contains(&name);
                if unreported
                    && job.state.unexpected_end()
                    && now.duration_since(since) >= RUNNER_GRACE
                {
                    k.reported.insert(name.clone());
                    to_report.push((name, jobs::end_words(&job)));
                }
            }
        }
        for id in to_cancel {
            if let Err(e) = command("scancel", std::slice::from_ref(&id), None).await {
                tracing::warn!(job = %id, error = %e, "cannot cancel a job Slurm will never start");
            }
        }
        for (name, reason) in to_report {
            self.report_end(&name, reason).await;
        }
    }

    /// Records that Slurm ended a session's job, in Slurm's words; a session that has ended already (its
    /// runner reported first) is left as it is.
    async fn report_end(&self, name: &str, reason: String) {
        tracing::warn!(session = %name, reason, "Slurm ended the session's job");
        let req = RunnerFinishedRequest {
            name: name.to_string(),
            exit_code: -1,
            reason,
            stopped: false,
        };
        let mut session = self.clients.session_internal.clone();
        if let Err(status) = session.runner_finished(req).await {
            tracing::error!(session = %name, %status, "cannot record the end of a Slurm job");
            self.known.lock().reported.remove(name);
        }
    }

    /// The job of session `name` as last seen.
    fn job(&self, name: &str) -> Option<Job> {
        self.known.lock().jobs.get(name).cloned()
    }
}

/// Polls `squeue` until the executor is dropped.
async fn monitor(exec: Weak<SlurmExecutor>) {
    let every = match exec.upgrade() {
        Some(e) => e.cfg.poll_every,
        None => return,
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(me) = exec.upgrade() else {
            return;
        };
        me.polled().await;
        me.poll().await;
    }
}

/// Runs Slurm command `program` with `args` (and `stdin`), and returns its standard output; the error
/// says what Slurm said, or that it could not be reached in time.
async fn command(program: &str, args: &[String], stdin: Option<&str>) -> Result<String, String> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| {
        format!("cannot run `{program}` (is Slurm installed on this machine?): {e}")
    })?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        input
            .write_all(text.as_bytes())
            .await
            .map_err(|e| format!("cannot hand `{program}` its input: {e}"))?;
    }
    let out = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| {
            format!(
                "`{program}` got no answer from Slurm within {} seconds",
                COMMAND_TIMEOUT.as_secs()
            )
        })?
        .map_err(|e| format!("`{program}` failed: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(jobs::slurm_message(
            program,
            &String::from_utf8_lossy(&out.stderr),
        ))
    }
}

#[async_trait::async_trait]
impl Executor for SlurmExecutor {
    /// Submits the session's job, unless Slurm already holds one for it.
    async fn start(&self, session: Session, time_limit_secs: u64) -> Result<(), String> {
        self.polled().await;
        if let Some(job) = self.job(&session.name) {
            return if job.state.is_end() {
                Err(jobs::end_words(&job))
            } else {
                Ok(())
            };
        }
        let args = jobs::sbatch_args(&self.cfg, &session, time_limit_secs);
        let script = jobs::batch_script(&self.cfg, &session, time_limit_secs);
        // Recorded before `sbatch` answers, so a poll meanwhile does not forget it.
        self.known.lock().jobs.insert(
            session.name.clone(),
            Job::submitted(&session.name, String::new()),
        );
        match command("sbatch", &args, Some(&script)).await {
            Ok(out) => {
                let id = jobs::parse_sbatch(&out);
                tracing::info!(session = %session.name, job = %id, "submitted the session to Slurm");
                self.known
                    .lock()
                    .jobs
                    .insert(session.name.clone(), Job::submitted(&session.name, id));
                Ok(())
            }
            Err(said) => {
                let why = format!("Slurm refused the job: {said}");
                // An `sbatch` that got no answer may still have made the job (slurmctld answered too late):
                // it must not run a session that is failed for it.
                if why.contains("timed out") || why.contains("no answer") {
                    let name = format!("--name={}", jobs::job_name(&self.cfg, &session.name));
                    if let Err(e) = command("scancel", &[name], None).await {
                        tracing::warn!(session = %session.name, error = %e, "cannot cancel a job sbatch may have made");
                    }
                }
                self.known.lock().jobs.remove(&session.name);
                Err(why)
            }
        }
    }

    /// Cancels the session's job; its runner stops the session and reports it.
    async fn stop(&self, name: &str) -> bool {
        let Some(job) = self.job(name).filter(|j| !j.state.is_end()) else {
            return false;
        };
        self.known.lock().cancelled.insert(name.to_string());
        let target = if job.id.is_empty() {
            vec![format!("--name={}", jobs::job_name(&self.cfg, name))]
        } else {
            vec![job.id.clone()]
        };
        match command("scancel", &target, None).await {
            Ok(_) => true,
            Err(why) => {
                tracing::error!(session = %name, why, "cannot cancel the session's Slurm job");
                // The runner cannot be told: the caller records the stop itself.
                false
            }
        }
    }

    async fn running(&self) -> Vec<String> {
        self.polled().await;
        let k = self.known.lock();
        let mut names: Vec<String> = k
            .jobs
            .iter()
            .filter(|(_, j)| !j.state.is_end())
            .map(|(n, _)| n.clone())
            .collect();
        names.sort();
        names
    }

    /// Slurm answers: as the last poll found a moment ago, or as `squeue` finds now.
    async fn available(&self) -> Result<(), String> {
        let unreachable =
            |why: &str| format!("the cluster's scheduler (Slurm) cannot be reached: {why}");
        let last = {
            let k = self.known.lock();
            k.polled_at
                .filter(|at| at.elapsed() <= self.cfg.poll_every * 2)
                .map(|_| k.unreachable.clone())
        };
        match last {
            Some(None) => Ok(()),
            Some(Some(why)) => Err(unreachable(&why)),
            None => command("squeue", &["--noheader".into(), "--me".into()], None)
                .await
                .map(|_| ())
                .map_err(|why| unreachable(&why)),
        }
    }

    fn waiting_reason(&self, name: &str) -> Option<String> {
        let job = self.job(name)?;
        jobs::waiting_words(&job)
    }

    async fn end_of(&self, name: &str) -> Option<String> {
        self.polled().await;
        let job = self.job(name)?;
        job.state.is_end().then(|| jobs::end_words(&job))
    }
}
