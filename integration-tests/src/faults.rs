//! Fault injection: a NATS server and a Postgres cluster of the test's own, which it may kill and restart
//! (never the machine's own), and a workload that is mid-session and mid-submit when a component dies. After
//! each fault, [`Workload::settle`] and [`check_log`] check what the platform promises: no acknowledged event
//! lost, no session or submission stuck, quota released as the rules say, and an audit that still agrees.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use nsml_proto::v1::quota_service_client::QuotaServiceClient;
use nsml_proto::v1::session_service_client::SessionServiceClient;
use nsml_proto::v1::submission_service_client::SubmissionServiceClient;
use nsml_proto::v1::{
    GetSessionRequest, GetSubmissionRequest, QuotaUsage, QuotaUsageRequest, Session, SessionStatus,
    Submission, SubmissionStatus,
};

use crate::grpc::{Client, authed, small};
use crate::{User, free_port, repo_root};

/// How long a fault keeps its component down before it is started again.
pub const DOWN_FOR: Duration = Duration::from_secs(2);

/// Generous bounds for a loaded machine: conditions are waited for, never raced.
const SETTLE_BOUND: Duration = Duration::from_secs(180);
const RECOVERY_BOUND: Duration = Duration::from_secs(180);

fn wait_port(port: u16, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not listen on port {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A JetStream-enabled `nats-server` on a free port with its own store directory.
pub struct NatsServer {
    port: u16,
    store: tempfile::TempDir,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts `nats-server -js` on a free port.
    pub fn start() -> anyhow::Result<Self> {
        let mut s = Self {
            port: free_port(),
            store: tempfile::tempdir()?,
            child: None,
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let bin = [
            "/usr/sbin/nats-server",
            "/usr/bin/nats-server",
            "nats-server",
        ]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .unwrap_or("nats-server");
        let child = Command::new(bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start nats-server (Debian package `nats-server`)")?;
        self.child = Some(child);
        wait_port(self.port, "nats-server")
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the server (SIGKILL), keeps it down for `down`, then starts it again on the same port; with
    /// `empty`, on an empty store, as if the server's disk had been lost.
    pub fn restart(&mut self, down: Duration, empty: bool) -> anyhow::Result<()> {
        self.kill();
        if empty {
            for entry in std::fs::read_dir(self.store.path())? {
                let p = entry?.path();
                if p.is_dir() {
                    std::fs::remove_dir_all(&p)?;
                } else {
                    std::fs::remove_file(&p)?;
                }
            }
        }
        std::thread::sleep(down);
        self.spawn()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Postgres cluster of the test's own (initdb into a temporary directory), on a free port.
pub struct PgServer {
    port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_user: Option<String>,
}

impl PgServer {
    /// Creates and starts a cluster with trust authentication for `postgres` on 127.0.0.1.
    pub fn start() -> anyhow::Result<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .context("no Postgres server binaries under /usr/lib/postgresql")?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .find(|p| p.join("pg_ctl").is_file())
            .context("no pg_ctl under /usr/lib/postgresql/*/bin")?;
        let dir = tempfile::tempdir()?;
        // Postgres refuses to run as root: run it as the `postgres` user, which must own its directory.
        let root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let as_user = root.then(|| "postgres".to_string());
        if as_user.is_some() {
            let status = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(dir.path())
                .status()?;
            ensure!(
                status.success(),
                "cannot hand the cluster directory to postgres"
            );
        }
        let s = Self {
            port: free_port(),
            dir,
            bin,
            as_user,
        };
        let out = s
            .command("initdb")
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-D"])
            .arg(s.data())
            .output()?;
        ensure!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        s.pg_start()?;
        Ok(s)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        match &self.as_user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(exe);
                c
            }
            None => Command::new(exe),
        }
    }

    fn pg_start(&self) -> anyhow::Result<()> {
        // A killed server loses nothing it acknowledged while the machine stays up, so fsync is left off to
        // keep the suite quick on a busy machine; the faults here are process faults.
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let out = self
            .command("pg_ctl")
            .args(["-w", "-t", "60", "-D"])
            .arg(self.data())
            .args(["-o", &opts, "-l"])
            .arg(self.dir.path().join("server.log"))
            .arg("start")
            .stdout(Stdio::null())
            .output()?;
        ensure!(
            out.status.success(),
            "pg_ctl start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_port(self.port, "postgres")
    }

    fn pg_stop(&self, mode: &str) {
        let _ = self
            .command("pg_ctl")
            .args(["-w", "-D"])
            .arg(self.data())
            .args(["-m", mode, "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// The URL of the cluster's `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server the way a crash does (`immediate`: no checkpoint, no goodbye to clients), keeps it
    /// down for `down`, and starts it again.
    pub fn restart(&self, down: Duration) -> anyhow::Result<()> {
        self.pg_stop("immediate");
        std::thread::sleep(down);
        self.pg_start()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.pg_stop("immediate");
    }
}

/// Every event of a log as (position, hash), read straight from its store: `sqlite:PATH` or `postgres://…`.
pub async fn log_snapshot(store: &str) -> anyhow::Result<Vec<(i64, String)>> {
    use sqlx::Connection;
    const QUERY: &str = "SELECT position, hash FROM events ORDER BY position";
    if let Some(path) = store.strip_prefix("sqlite:") {
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .read_only(true);
        let mut c = sqlx::SqliteConnection::connect_with(&opts).await?;
        Ok(sqlx::query_as(QUERY).fetch_all(&mut c).await?)
    } else {
        let mut c = sqlx::PgConnection::connect(store).await?;
        Ok(sqlx::query_as(QUERY).fetch_all(&mut c).await?)
    }
}

/// Requires every event of `before` to be in `after` at the same position with the same hash: nothing that
/// was stored (and so acknowledged) before the fault was lost or rewritten.
pub fn check_log(before: &[(i64, String)], after: &[(i64, String)]) -> anyhow::Result<()> {
    ensure!(
        after.len() >= before.len(),
        "the log lost events: {} before the fault, {} after",
        before.len(),
        after.len()
    );
    if let Some((b, a)) = before.iter().zip(after).find(|(b, a)| b != a) {
        bail!("the log changed under the fault: {b:?} became {a:?}");
    }
    Ok(())
}

/// Requires the host's `audit replay` to find no mismatch and `audit verify` to find the chain intact.
pub fn check_audit(host: &User) -> anyhow::Result<()> {
    let replay = host.nsml(&["admin", "audit", "replay"])?.ok()?;
    ensure!(
        replay.stdout.contains(" 0 mismatches"),
        "audit replay found mismatches:\n{}",
        replay.stdout
    );
    let verify = host.nsml(&["admin", "audit", "verify"])?.ok()?;
    ensure!(
        verify.stdout.contains("Log intact"),
        "audit verify:\n{}",
        verify.all()
    );
    Ok(())
}

/// The session directories (`TEAM/DATASET/N`) under a runner's work directory in `data_dir`.
fn session_dirs(data_dir: &Path) -> Vec<PathBuf> {
    // The embedded runner's sessions, and those of every runner process (`runner/job-ID/`).
    let mut level = vec![data_dir.join("runs").join("sessions")];
    if let Ok(jobs) = std::fs::read_dir(data_dir.join("runner")) {
        level.extend(jobs.flatten().map(|j| j.path().join("sessions")));
    }
    for _ in 0..3 {
        level = level
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
    }
    level
}

/// Requires that, once every session has ended, no session's directory is left on the runner's disk: the
/// ones a killed platform left behind included.
pub fn check_no_session_dirs(data_dir: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETTLE_BOUND;
    loop {
        let left = session_dirs(data_dir);
        if left.is_empty() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "session directories outlived their sessions: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The example baseline, slowed down: each epoch waits half a second after saving its checkpoint, and
/// inference waits four seconds, so that a fault lands while training saves and while a submit infers.
fn slow_baseline() -> anyhow::Result<String> {
    let main = std::fs::read_to_string(repo_root().join("examples/baseline/main.py"))?;
    let infer = "    def infer(path, **kwargs):\n";
    let save = "        nsml.save(epoch)\n";
    ensure!(
        main.contains(infer) && main.contains(save),
        "the example baseline no longer has the lines the fault suite slows down"
    );
    Ok(main
        .replace(
            infer,
            &format!("{infer}        __import__('time').sleep(4)\n"),
        )
        .replace(
            save,
            &format!("{save}        __import__('time').sleep(0.5)\n"),
        ))
}

/// The team's quota usage in competition `demo`.
pub async fn usage(c: &Client) -> anyhow::Result<QuotaUsage> {
    Ok(QuotaServiceClient::new(c.channel.clone())
        .usage(authed(
            QuotaUsageRequest {
                team: String::new(),
                competition: "demo".into(),
            },
            &c.token,
        )?)
        .await?
        .into_inner())
}

async fn session(c: &Client, name: &str) -> anyhow::Result<Session> {
    Ok(SessionServiceClient::new(c.channel.clone())
        .get(authed(GetSessionRequest { name: name.into() }, &c.token)?)
        .await?
        .into_inner())
}

async fn submission(c: &Client, id: &str) -> anyhow::Result<Submission> {
    Ok(SubmissionServiceClient::new(c.channel.clone())
        .get(authed(GetSubmissionRequest { id: id.into() }, &c.token)?)
        .await?
        .into_inner())
}

fn ended(s: SessionStatus) -> bool {
    matches!(
        s,
        SessionStatus::Exited | SessionStatus::Failed | SessionStatus::Stopped
    )
}

/// A session and a submission in flight when a fault is injected.
pub struct InFlight {
    pub session: String,
    pub submission: String,
}

/// How the work in flight came out of a fault, and how long the platform took to be at full speed again.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub session: String,
    pub submission: String,
    pub recovered_in: Duration,
    pub events_before: usize,
    pub events_after: usize,
}

/// A participant (`alice` of team `demo`) keeping the platform busy.
pub struct Workload {
    url: String,
    alice: Client,
    slow: String,
    trained: String,
    probe_code: String,
    /// The median time of a probe before any fault.
    pub baseline: Duration,
}

impl Workload {
    /// Signs in, uploads the slow baseline and a one-line probe, trains one epoch to submit from, and
    /// measures the probe's usual time.
    pub async fn prepare(url: &str) -> anyhow::Result<Self> {
        let alice = Client::login(url, "alice", "alice-pass").await?;
        let slow = alice
            .upload("t1-cls", &[("main.py", &slow_baseline()?)])
            .await?;
        let trained = alice.run("t1-cls", &slow, "--epochs 1", small()).await?;
        let done = alice.wait_session(&trained.name).await?;
        ensure!(
            done.status() == SessionStatus::Exited,
            "training ended as {:?}: {}",
            done.status(),
            done.reason
        );
        let probe_code = alice
            .upload("t1-cls", &[("main.py", "print('probe', flush=True)\n")])
            .await?;
        let mut w = Self {
            url: url.to_string(),
            alice,
            slow,
            trained: trained.name,
            probe_code,
            baseline: Duration::ZERO,
        };
        let mut times = Vec::new();
        for _ in 0..5 {
            times.push(w.probe().await?);
        }
        times.sort();
        w.baseline = times[times.len() / 2];
        Ok(w)
    }

    /// One round trip through every service: sign in, run a one-line session to its end, and read the
    /// quota that it released. Returns how long it took.
    pub async fn probe(&self) -> anyhow::Result<Duration> {
        let t = Instant::now();
        let c = Client::login(&self.url, "alice", "alice-pass").await?;
        let s = c
            .run("t1-cls", &self.probe_code, "", small())
            .await
            .map_err(|s| anyhow::anyhow!("probe run: {s}"))?;
        loop {
            let got = session(&c, &s.name).await?;
            if ended(got.status()) {
                ensure!(
                    got.status() == SessionStatus::Exited,
                    "probe {} ended as {:?}: {}",
                    s.name,
                    got.status(),
                    got.reason
                );
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("probe {} did not end", s.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        loop {
            let u = usage(&c).await?;
            if !u.holdings.iter().any(|h| h.session == s.name) {
                return Ok(t.elapsed());
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("probe {} still holds quota", s.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts a long training session (saving a checkpoint every half second) and a real submit, and
    /// returns once both are running: the submit's inference then has about four seconds to go.
    pub async fn start_flight(&self) -> anyhow::Result<InFlight> {
        let long = self
            .alice
            .run("t1-cls", &self.slow, "--epochs 200", small())
            .await
            .map_err(|s| anyhow::anyhow!("long session: {s}"))?;
        self.alice.wait_running(&long.name).await?;
        let sub = self
            .alice
            .submit(&self.trained, "0", false)
            .await
            .map_err(|s| anyhow::anyhow!("submit: {s}"))?;
        let deadline = Instant::now() + SETTLE_BOUND;
        loop {
            let got = submission(&self.alice, &sub.id).await?;
            if !got.session.is_empty()
                && session(&self.alice, &got.session).await?.status() == SessionStatus::Running
            {
                break;
            }
            ensure!(
                got.status() == SubmissionStatus::Running,
                "the submit ended before the fault: {got:?}"
            );
            ensure!(Instant::now() < deadline, "the submit never started");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Past the checkpoint's load, into inference.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        Ok(InFlight {
            session: long.name,
            submission: sub.id,
        })
    }

    /// Probes from the moment the faulty component is back until a probe takes no more than three times
    /// the usual time (or the usual time and half a second, on a quick machine: a busy machine's noise is
    /// not a slow platform); returns how long that was.
    pub async fn recover(&self, back: Instant) -> anyhow::Result<Duration> {
        let fast = (self.baseline * 3).max(self.baseline + Duration::from_millis(500));
        let mut last = String::new();
        while back.elapsed() < RECOVERY_BOUND {
            match tokio::time::timeout(Duration::from_secs(60), self.probe()).await {
                Ok(Ok(took)) if took <= fast => return Ok(back.elapsed()),
                Ok(Ok(took)) => last = format!("a probe took {took:?}"),
                Ok(Err(e)) => last = format!("{e:#}"),
                Err(_) => last = "a probe took over a minute".into(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("the platform was not at full speed {RECOVERY_BOUND:?} after the fault; last: {last}")
    }

    /// Brings the work in flight to an end and requires that nothing is stuck: the long session is running
    /// or ended (and is stopped if running), the submission ends, and the team holds nothing and has no
    /// submit in flight. Returns how each came out.
    pub async fn settle(&self, flight: &InFlight) -> anyhow::Result<(String, String)> {
        // A fresh connection: the old one may point at a gateway that was restarted.
        let c = Client::login(&self.url, "alice", "alice-pass").await?;
        let deadline = Instant::now() + SETTLE_BOUND;
        let long = loop {
            let s = session(&c, &flight.session).await?;
            match s.status() {
                SessionStatus::Running => {
                    c.stop(&flight.session).await?;
                    let s = c.wait_session(&flight.session).await?;
                    ensure!(
                        s.status() == SessionStatus::Stopped,
                        "a stopped session ends Stopped: {s:?}"
                    );
                    break "kept running".to_string();
                }
                st if ended(st) => break format!("{st:?}: {}", s.reason),
                st => ensure!(
                    Instant::now() < deadline,
                    "session {} is stuck in {st:?}: {}",
                    flight.session,
                    s.reason
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let sub = loop {
            let s = submission(&c, &flight.submission).await?;
            match s.status() {
                SubmissionStatus::Scored => break format!("Scored {:.4}", s.score),
                SubmissionStatus::Failed | SubmissionStatus::TimedOut => {
                    break format!("{:?}: {}", s.status(), s.reason);
                }
                st => ensure!(
                    Instant::now() < deadline,
                    "submission {} is stuck in {st:?}",
                    flight.submission
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        loop {
            let u = usage(&c).await?;
            if u.holdings.is_empty() && u.submits.iter().all(|s| !s.in_flight) {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "quota was not released after the fault: {u:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok((long, sub))
    }
}

/// Prints the fault table (markdown) to stderr: shown with `--nocapture`, or when a test fails.
pub fn print_table(deployment: &str, rows: &[(String, anyhow::Result<Outcome>)]) {
    let mut out = format!(
        "\nFaults, {deployment} deployment\n\n| fault | session in flight | submit in flight | events before → after | lost | full speed after |\n| --- | --- | --- | --- | --- | --- |\n"
    );
    for (fault, r) in rows {
        match r {
            Ok(o) => out.push_str(&format!(
                "| {fault} | {} | {} | {} → {} | 0 | {:.2} s |\n",
                o.session,
                o.submission,
                o.events_before,
                o.events_after,
                o.recovered_in.as_secs_f64()
            )),
            Err(e) => out.push_str(&format!("| {fault} | FAILED: {e:#} | | | | |\n")),
        }
    }
    eprintln!("{out}");
}
