//! What the platform asks of Slurm and reads back, as pure functions: a session's `sbatch` arguments and
//! batch script, the `squeue` lines of the platform's jobs, and Slurm's reasons and end states in words.

use nsml_proto::v1::{Session, SessionKind};
use prost::Message;

use super::SlurmConfig;

/// The fields `squeue` prints for each job, `|`-separated: id, name, state, comment, reason (last: a reason
/// may hold spaces, commas and anything else).
pub const SQUEUE_FORMAT: &str = "%i|%j|%T|%k|%r";

/// A Slurm job's state, as far as the platform tells them apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Handed to `sbatch`; no poll has seen it yet.
    Submitted,
    /// Waiting in Slurm's queue.
    Pending,
    /// Placed on a node: configuring, running, completing, suspended.
    Running,
    /// Ended, with Slurm's state name (`COMPLETED`, `TIMEOUT`, `NODE_FAIL`, …).
    Ended(String),
}

impl JobState {
    /// Reads `squeue`'s `%T`.
    pub fn parse(state: &str) -> Self {
        match state {
            "PENDING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" | "RESV_DEL_HOLD" => {
                JobState::Pending
            }
            "CONFIGURING" | "RUNNING" | "COMPLETING" | "SUSPENDED" | "STOPPED" | "RESIZING"
            | "SIGNALING" | "STAGE_OUT" => JobState::Running,
            other => JobState::Ended(other.to_string()),
        }
    }

    /// Whether the job has ended.
    pub fn is_end(&self) -> bool {
        matches!(self, JobState::Ended(_))
    }

    /// Whether the job ended in a way its runner may not have reported: anything but completing.
    pub fn unexpected_end(&self) -> bool {
        matches!(self, JobState::Ended(s) if s != "COMPLETED")
    }
}

/// One of the platform's jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Slurm's job id (empty until `sbatch` answered).
    pub id: String,
    /// The session the job runs.
    pub session: String,
    pub state: JobState,
    /// Slurm's reason code (`%r`): why it waits, or why it ended.
    pub reason: String,
}

impl Job {
    /// A job just submitted for `session`.
    pub fn submitted(session: &str, id: String) -> Self {
        Self {
            id,
            session: session.to_string(),
            state: JobState::Submitted,
            reason: String::new(),
        }
    }
}

/// The job name of session `name`: `PREFIX/TEAM/DATASET/N`.
pub fn job_name(cfg: &SlurmConfig, name: &str) -> String {
    format!("{}/{name}", cfg.job_prefix)
}

/// `squeue`'s arguments: every job Slurm still remembers (ended ones for `MinJobAge`), in
/// [`SQUEUE_FORMAT`].
pub fn squeue_args() -> Vec<String> {
    vec![
        "--noheader".into(),
        "--states=all".into(),
        format!("--format={SQUEUE_FORMAT}"),
    ]
}

/// The platform's jobs in `squeue`'s output: those named `PREFIX/TEAM/DATASET/N` whose comment is the
/// session's name. When Slurm remembers several jobs of one session (one ended, say, and another not), the
/// live one wins.
pub fn parse_squeue(out: &str, prefix: &str) -> Vec<Job> {
    let mut jobs: Vec<Job> = Vec::new();
    for line in out.lines() {
        let fields: Vec<&str> = line.trim().splitn(5, '|').collect();
        let [id, name, state, comment, reason] = fields[..] else {
            continue;
        };
        let Some(session) = name.strip_prefix(prefix).and_then(|n| n.strip_prefix('/')) else {
            continue;
        };
        if session != comment {
            continue;
        }
        let job = Job {
            id: id.to_string(),
            session: session.to_string(),
            state: JobState::parse(state),
            reason: reason.to_string(),
        };
        match jobs.iter_mut().find(|j| j.session == job.session) {
            Some(seen) if seen.state.is_end() => *seen = job,
            Some(_) => {}
            None => jobs.push(job),
        }
    }
    jobs
}

/// The job id `sbatch --parsable` printed (`ID` or `ID;CLUSTER`).
pub fn parse_sbatch(out: &str) -> String {
    let line = out.trim();
    line.split(';').next().unwrap_or(line).to_string()
}

/// What Slurm said on its error output: its `error:` lines, without the program's prefix.
pub fn slurm_message(program: &str, stderr: &str) -> String {
    let said: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.strip_prefix(&format!("{program}: error: "))
                .or_else(|| l.strip_prefix(&format!("{program}: ")))
                .unwrap_or(l)
        })
        .collect();
    if said.is_empty() {
        format!("Slurm's `{program}` failed without a message")
    } else {
        said.join("; ")
    }
}

fn is_submit(kind: SessionKind) -> bool {
    matches!(kind, SessionKind::Submit | SessionKind::TrialSubmit)
}

/// `sbatch`'s arguments for a session: its GPUs, CPUs and memory as the job's allocation, the submit
/// time limit (a minute over the runner's own, which ends the session first with the platform's message),
/// the configured partition and account, and the session's name as the job's name and comment.
pub fn sbatch_args(cfg: &SlurmConfig, session: &Session, time_limit_secs: u64) -> Vec<String> {
    const MIB: u64 = 1 << 20;
    let r = session.resources.unwrap_or_default();
    let mut args = vec![
        "--parsable".to_string(),
        format!("--job-name={}", job_name(cfg, &session.name)),
        format!("--comment={}", session.name),
        "--nodes=1".into(),
        "--ntasks=1".into(),
        format!("--cpus-per-task={}", r.cpus.max(1)),
        format!(
            "--mem={}M",
            crate::limits::session_memory(&r).div_ceil(MIB).max(1)
        ),
        "--no-requeue".into(),
        format!("--output={}", cfg.output.as_deref().unwrap_or("/dev/null")),
    ];
    if r.gpus > 0 {
        args.push(format!("--gres=gpu:{}", r.gpus));
    }
    if is_submit(session.kind()) && time_limit_secs > 0 {
        args.push(format!("--time={}", time_limit_secs.div_ceil(60) + 1));
    }
    if let Some(p) = &cfg.partition {
        args.push(format!("--partition={p}"));
    }
    if let Some(a) = &cfg.account {
        args.push(format!("--account={a}"));
    }
    args.extend(cfg.extra_args.iter().cloned());
    args
}

/// The batch script of a session's job: it becomes the session's runner, given the session (encoded,
/// hex) and its time limit. Nothing secret is in it: the runner reads the internal secret from its
/// configuration file on the node.
pub fn batch_script(cfg: &SlurmConfig, session: &Session, time_limit_secs: u64) -> String {
    format!(
        "#!/bin/sh\n# The NSML runner of session {name}.\nexec {cmd} runner --config {config} --time-limit {time_limit_secs} --session {spec}\n",
        name = session.name,
        cmd = shell_word(&cfg.runner_command.display().to_string()),
        config = shell_word(&cfg.runner_config.display().to_string()),
        spec = hex::encode(session.encode_to_vec()),
    )
}

/// `word` quoted for the shell, unless it needs no quoting.
fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Why a pending job waits, in words, or `None` when it does not wait (yet).
pub fn waiting_words(job: &Job) -> Option<String> {
    match job.state {
        JobState::Pending => {}
        JobState::Submitted => {
            return Some("Queued in Slurm: submitted, waiting for Slurm to schedule it".into());
        }
        _ => return None,
    }
    let r = job.reason.as_str();
    let words = match r {
        "Resources" => "no node has the GPUs, CPUs or memory it asks for free yet".to_string(),
        "Priority" => "jobs of higher priority are ahead of it".to_string(),
        "None" | "" => "Slurm has not scheduled it yet".to_string(),
        "Dependency" => "it waits for another job".to_string(),
        "BeginTime" => "its start time has not come".to_string(),
        "JobHeldAdmin" => "an operator holds it".to_string(),
        "JobHeldUser" => "it is held".to_string(),
        "ReqNodeNotAvail" | "NodeDown" => "the nodes it could run on are not available".to_string(),
        "PartitionDown" | "PartitionInactive" => "the partition is not taking jobs".to_string(),
        "Reservation" => "it waits for a reservation".to_string(),
        r if r.starts_with("QOS") => format!("a QOS limit holds it ({r})"),
        r if r.starts_with("Assoc") => format!("an account limit holds it ({r})"),
        r if r.starts_with("Partition") => format!("the partition's limits hold it ({r})"),
        r => r.to_string(),
    };
    let code = if r.is_empty() { "None" } else { r };
    Some(format!("Queued in Slurm ({code}): {words}"))
}

/// Why Slurm will never start a pending job, in words, when its reason says so: the job asks for more
/// than the partition, a QOS or the account allows per job, or names what does not exist. Slurm keeps such
/// a job pending (unless `EnforcePartLimits` refuses it at submission); the platform ends it instead, so
/// that it does not hold the team's quota forever.
pub fn never_starts(job: &Job) -> Option<String> {
    if job.state != JobState::Pending {
        return None;
    }
    let r = job.reason.as_str();
    let words = match r {
        "PartitionConfig" | "PartitionNodeLimit" | "PartitionTimeLimit" => {
            "the partition's limits do not allow what it asks for"
        }
        "BadConstraints" => "no node of the partition has what it asks for",
        "InvalidQOS" | "InvalidAccount" | "QOSNotAllowed" | "AccountNotAllowed" => {
            "the account or QOS may not run it"
        }
        r if r.starts_with("QOSMax") && r.contains("PerJob") => "a QOS limit per job forbids it",
        r if r.starts_with("AssocMax") && r.contains("PerJob") => {
            "an account limit per job forbids it"
        }
        _ => return None,
    };
    Some(format!(
        "Slurm will never start the job: {words} (job {}: PENDING, {r})",
        job.id
    ))
}

/// How a job ended, in words.
pub fn end_words(job: &Job) -> String {
    let JobState::Ended(state) = &job.state else {
        return format!("the Slurm job {} has not ended", job.id);
    };
    let words = match state.as_str() {
        "COMPLETED" => "the Slurm job completed, but its runner's report of the end never arrived",
        "TIMEOUT" => "Slurm ended the job at its time limit",
        "NODE_FAIL" => "the node running the job failed",
        "OUT_OF_MEMORY" => "Slurm killed the job: out of memory",
        "CANCELLED" => "the Slurm job was cancelled outside the platform",
        "PREEMPTED" => "Slurm preempted the job",
        "BOOT_FAIL" => "the node for the job failed to boot",
        "DEADLINE" => "Slurm ended the job at its deadline",
        "FAILED" => "the Slurm job failed",
        _ => "the Slurm job ended",
    };
    let reason = match job.reason.as_str() {
        "" | "None" => String::new(),
        r => format!(", {r}"),
    };
    format!("{words} (job {}: {state}{reason})", job.id)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::PathBuf;

    use nsml_proto::v1::Resources;

    use super::*;

    fn cfg() -> SlurmConfig {
        let mut c = SlurmConfig::new(
            PathBuf::from("/opt/nsml/bin/nsmld"),
            PathBuf::from("/etc/nsml/runner config.toml"),
        );
        c.partition = Some("gpu".into());
        c
    }

    fn session(kind: SessionKind, gpus: u32) -> Session {
        Session {
            name: "team-a/mnist/3".into(),
            team: "team-a".into(),
            dataset: "mnist".into(),
            number: 3,
            kind: kind as i32,
            resources: Some(Resources {
                gpus,
                cpus: 2,
                memory_bytes: 1024 << 20,
                shm_bytes: 512 << 20,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_session_asks_slurm_for_its_resources_under_its_name() {
        // Given a training session with 2 GPUs, 2 CPUs and 1 GiB of memory with 512 MiB of shared memory on top,
        let args = sbatch_args(&cfg(), &session(SessionKind::Train, 2), 0);
        // then the job asks for exactly that, named after the session, with no time limit.
        for want in [
            "--job-name=nsml/team-a/mnist/3",
            "--comment=team-a/mnist/3",
            "--cpus-per-task=2",
            "--mem=1536M",
            "--gres=gpu:2",
            "--partition=gpu",
            "--no-requeue",
        ] {
            assert!(
                args.iter().any(|a| a == want),
                "{want} missing from {args:?}"
            );
        }
        assert!(!args.iter().any(|a| a.starts_with("--time")), "{args:?}");
        // A CPU session asks for no GPU; a submit gets the submit time limit plus a minute.
        let submit = sbatch_args(&cfg(), &session(SessionKind::Submit, 0), 3600);
        assert!(
            !submit.iter().any(|a| a.starts_with("--gres")),
            "{submit:?}"
        );
        assert!(submit.iter().any(|a| a == "--time=61"), "{submit:?}");
    }

    #[test]
    fn the_batch_script_runs_the_sessions_runner() {
        let s = session(SessionKind::Train, 0);
        let script = batch_script(&cfg(), &s, 0);
        assert!(script.starts_with("#!/bin/sh\n"));
        let exec = script.lines().last().unwrap();
        assert!(
            exec.starts_with(
                "exec /opt/nsml/bin/nsmld runner --config '/etc/nsml/runner config.toml' --time-limit 0 --session "
            ),
            "{exec}"
        );
        let spec = exec.rsplit(' ').next().unwrap();
        let back = Session::decode(hex::decode(spec).unwrap().as_slice()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn squeue_lines_become_the_platforms_jobs() {
        let out = "\
17|nsml/team-a/mnist/3|PENDING|team-a/mnist/3|Resources
18|nsml/team-b/mnist/1|RUNNING|team-b/mnist/1|None
19|someone-elses-job|RUNNING|(null)|None
20|nsml/team-c/mnist/2|TIMEOUT|team-c/mnist/2|TimeLimit
21|nsml/team-c/mnist/2|RUNNING|team-c/mnist/2|None
22|nsml/team-d/mnist/1|RUNNING|team-x/mnist/1|None
23|nsml/team-e/mnist/1|PENDING|team-e/mnist/1|ReqNodeNotAvail, UnavailableNodes:cpu1|gpu1
";
        let jobs = parse_squeue(out, "nsml");
        let names: Vec<&str> = jobs.iter().map(|j| j.session.as_str()).collect();
        assert_eq!(
            names,
            [
                "team-a/mnist/3",
                "team-b/mnist/1",
                "team-c/mnist/2",
                "team-e/mnist/1"
            ]
        );
        // A reason keeps whatever it holds.
        assert_eq!(
            jobs[3].reason,
            "ReqNodeNotAvail, UnavailableNodes:cpu1|gpu1"
        );
        assert_eq!(jobs[0].state, JobState::Pending);
        assert_eq!(jobs[1].state, JobState::Running);
        // The live job of a session wins over an ended one.
        assert_eq!(
            (jobs[2].id.as_str(), &jobs[2].state),
            ("21", &JobState::Running)
        );
        assert!(parse_squeue(out, "other").is_empty());
    }

    #[test]
    fn reasons_and_ends_read_in_words() {
        let job = |state: &str, reason: &str| Job {
            id: "7".into(),
            session: "t/d/1".into(),
            state: JobState::parse(state),
            reason: reason.into(),
        };
        assert_eq!(
            waiting_words(&job("PENDING", "Resources")).unwrap(),
            "Queued in Slurm (Resources): no node has the GPUs, CPUs or memory it asks for free yet"
        );
        assert!(
            waiting_words(&job("PENDING", "QOSMaxGRESPerUser"))
                .unwrap()
                .contains("a QOS limit holds it")
        );
        assert_eq!(waiting_words(&job("RUNNING", "None")), None);
        assert_eq!(
            end_words(&job("NODE_FAIL", "None")),
            "the node running the job failed (job 7: NODE_FAIL)"
        );
        assert_eq!(
            end_words(&job("TIMEOUT", "TimeLimit")),
            "Slurm ended the job at its time limit (job 7: TIMEOUT, TimeLimit)"
        );
        assert_eq!(
            never_starts(&job("PENDING", "PartitionConfig")).unwrap(),
            "Slurm will never start the job: the partition's limits do not allow what it asks for (job 7: PENDING, PartitionConfig)"
        );
        assert!(
            never_starts(&job("PENDING", "QOSMaxCpuPerJobLimit"))
                .unwrap()
                .contains("a QOS limit per job")
        );
        // Waiting for others' jobs to end is not never.
        assert_eq!(never_starts(&job("PENDING", "Resources")), None);
        assert_eq!(
            never_starts(&job("PENDING", "QOSMaxJobsPerUserLimit")),
            None
        );
        assert!(!JobState::parse("COMPLETED").unexpected_end());
        assert!(JobState::parse("OUT_OF_MEMORY").unexpected_end());
    }

    #[test]
    fn slurms_refusals_keep_its_words() {
        assert_eq!(
            slurm_message(
                "sbatch",
                "sbatch: error: Batch job submission failed: Invalid partition name specified\n"
            ),
            "Batch job submission failed: Invalid partition name specified"
        );
        assert_eq!(parse_sbatch("42\n"), "42");
        assert_eq!(parse_sbatch("42;cluster\n"), "42");
    }
}
