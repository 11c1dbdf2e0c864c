//! `nsml-bench`: figures for the embedded deployment, and admissions in the distributed one, printed as a table.
//!
//! - `run` → entry process started (p50): from the `Run` call to the entry's first statement, inside its
//!   sandbox, over sequential runs of a trivial entry;
//! - `ps` round trip through the gateway (p50/p99);
//! - a line printed by the entry → seen by `logs -f` (p50);
//! - admission decisions through the gateway: `run` requests decided by the quota service while the team's
//!   sessions are all taken, from concurrent clients and from one (decisions/s, p50/p99), in the embedded
//!   deployment and then in the distributed one (every service its own process, Postgres, NATS JetStream);
//!   and, embedded, offered at a fixed rate (open loop: each request is sent when it is due, whether or not the
//!   ones before have been answered, and its latency counts from when it was due);
//! - where the CPU of the distributed admissions from concurrent clients went, per admission: each service's
//!   process, the Postgres backends serving the deployment's database, the NATS servers, the bench's clients and
//!   the rest of the machine (read from `/proc`, so for a deployment on the bench's own machine);
//! - idle `nsmld up` resident memory.
//!
//! With `--kept N` it measures only what each ended session kept costs: `nsmld up`'s resident memory after 50
//! trivial sessions and after N, and the growth per session between.
//!
//! With `--refused N` it measures only what each refused admission leaves in memory: `nsmld up`'s resident
//! memory after 2,000 refusals and after N more, and the growth per refusal between.
//!
//! With `--soak SECONDS` it runs only the soak instead (`nsml_integration_tests::soak`): a busy competition
//! hour compressed into that many seconds, with `nsmld`'s resident memory sampled throughout.
//!
//! With `--tracing-cost` it measures only what tracing costs admissions (see [`tracing_cost`]).
//!
//! With `--admissions-only` it measures only the admissions from concurrent clients and from one, embedded and
//! then distributed (unless `--embedded-only`), each deployment started fresh: the quick way to compare the two.
//!
//! With `--checkpoints` it measures only checkpoints (see [`checkpoints`]): `nsml.save` and `nsml.load` timed
//! inside a real session, `nsml model pull` through the CLI, each against `cp FILE DIR; sync` of the same size
//! in the same run.
//!
//! With `--reports` it measures only metric reports from inside a real session (see [`reports`]): `--calls`
//! `nsml.report` calls of one metric each (default 5,000), then `--batches` calls of 1,000 metrics each (200).
//!
//! With `--large-log` it measures only what a large competition's log costs (see
//! [`nsml_integration_tests::large_log`]): a log of `--submissions` scored submissions (default 1,000,000) from
//! `--teams` teams (10,000) over `--datasets` datasets (20), plus `--decisions` refused admissions (1,000,000),
//! seeded with the events the services append; then `nsmld up`'s boot from it, its resident memory, and
//! `Board`, `Overall` and `History` through the gateway (`--queries` of each, 300); with `--audit-replays N`,
//! also the host's audit replay of every ledger in that log (`Replay`, as `nsml admin audit replay` calls it), N
//! times.
//!
//! Usage: `cargo build --release --workspace --bins && target/release/nsml-bench [--runs N] [--ps N]
//! [--admissions N] [--clients N] [--rate N] [--embedded-only] [--admissions-only]`, or
//! `target/release/nsml-bench --soak 240`, or
//! `target/release/nsml-bench --tracing-cost [--rounds N] [--admissions N] [--clients N]`, or
//! `target/release/nsml-bench --checkpoints [--runs N] [--sizes 200,1024]`, or
//! `target/release/nsml-bench --reports [--calls N] [--batches N]`, or
//! `target/release/nsml-bench --large-log [--submissions N] [--teams N] [--datasets N] [--decisions N]
//! [--queries N] [--audit-replays N]`.

use std::time::{Duration, Instant};

use anyhow::Context;
use nsml_integration_tests::figures::{exited, now_ms, pct};
use nsml_integration_tests::grpc::{Client, authed, small};
use nsml_integration_tests::{Deployment, FreshDb, drop_stream};
use nsml_proto::v1::session_service_client::SessionServiceClient;
use nsml_proto::v1::{GetSessionRequest, ListSessionsRequest, LogsRequest};
use tokio_stream::StreamExt;

/// CPU time (user and system) a process has used so far, from `/proc/PID/stat`.
fn cpu_secs(pid: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces, closed by the last `)`: state is the first,
    // utime the 12th and stime the 13th.
    let mut rest = s.rsplit_once(')')?.1.split_whitespace().skip(11);
    let (user, system): (f64, f64) = (rest.next()?.parse().ok()?, rest.next()?.parse().ok()?);
    clock_ticks().map(|ticks| (user + system) / ticks)
}

/// Clock ticks per second, the unit of `/proc`'s CPU times.
fn clock_ticks() -> Option<f64> {
    // SAFETY: sysconf only reads a configuration value.
    #[allow(unsafe_code)]
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then_some(ticks as f64)
}

/// CPU time used by `nsmld` and by this bench (its clients) while `f` runs, per item `f` returns the count of.
async fn cpu_per<F, T>(server: Option<u32>, f: F) -> anyhow::Result<(T, Option<(f64, f64)>)>
where
    F: Future<Output = anyhow::Result<(T, usize)>>,
{
    let server = server.map(|p| p.to_string());
    let before = (server.as_deref().and_then(cpu_secs), cpu_secs("self"));
    let (out, n) = f.await?;
    let after = (server.as_deref().and_then(cpu_secs), cpu_secs("self"));
    let per = match (before, after) {
        ((Some(s0), Some(c0)), (Some(s1), Some(c1))) if n > 0 => {
            Some(((s1 - s0) / n as f64 * 1e6, (c1 - c0) / n as f64 * 1e6))
        }
        _ => None,
    };
    Ok((out, per))
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
    let ps_n = get("--ps", 2000);
    let admissions_n = get("--admissions", 20000);
    let clients = get("--clients", 16);
    let rate = get("--rate", 5000);
    let skip_distributed = args.iter().any(|a| a == "--embedded-only");
    let soak_secs = get("--soak", 0);
    let kept = get("--kept", 0);
    if kept > 0 {
        return kept_sessions(kept).await;
    }
    if args.iter().any(|a| a == "--large-log") {
        let sizes = nsml_integration_tests::large_log::Sizes {
            submissions: get("--submissions", 1_000_000),
            teams: get("--teams", 10_000),
            datasets: get("--datasets", 20),
            decisions: get("--decisions", 1_000_000),
            queries: get("--queries", 300),
            replays: get("--audit-replays", 0),
        };
        return nsml_integration_tests::large_log::run(sizes, UNLIMITED).await;
    }
    let refused = get("--refused", 0);
    if refused > 0 {
        return refused_admissions(refused).await;
    }
    if args.iter().any(|a| a == "--checkpoints") {
        let sizes = args
            .iter()
            .position(|a| a == "--sizes")
            .and_then(|i| args.get(i + 1))
            .map_or_else(
                || vec![200, 1024],
                |v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect(),
            );
        return checkpoints(&sizes, get("--runs", 3)).await;
    }
    if args.iter().any(|a| a == "--reports") {
        return reports(get("--calls", 5000), get("--batches", 200)).await;
    }
    if args.iter().any(|a| a == "--tracing-cost") {
        return tracing_cost(get("--rounds", 5), get("--admissions", 3000), clients).await;
    }
    if args.iter().any(|a| a == "--admissions-only") {
        return admissions_only(admissions_n, clients, skip_distributed).await;
    }
    if soak_secs > 0 {
        let duration = Duration::from_secs(soak_secs as u64);
        let report = nsml_integration_tests::soak::soak(duration, UNLIMITED).await?;
        nsml_integration_tests::soak::print(&report, duration);
        return Ok(());
    }

    let dep = Deployment::embedded_env(&[], UNLIMITED)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = dep
        .pids()
        .first()
        .and_then(|p| nsml_integration_tests::soak::rss_kib(*p));
    let alice = Client::login(&dep.url, "alice", "alice-pass").await?;
    let token = alice.token.clone();
    let mut sessions = SessionServiceClient::new(alice.channel.clone());
    let snap = alice
        .upload(
            "t1-cls",
            &[(
                "main.py",
                "import time\nfor i in range(20):\n    print('tick %.3f' % (time.time() * 1000), flush=True)\n    time.sleep(0.05)\n",
            )],
        )
        .await?;

    let mut start_ms = Vec::new();
    let mut line_ms = Vec::new();
    for _ in 0..runs {
        let t0 = now_ms();
        let s = alice.run("t1-cls", &snap, "", small()).await?;
        let mut logs = sessions
            .logs(authed(
                LogsRequest {
                    name: s.name.clone(),
                    follow: true,
                },
                &token,
            )?)
            .await?
            .into_inner();
        let mut first_line_at = None;
        while let Some(l) = logs.next().await {
            let l = l?;
            let seen = now_ms();
            if let Some(v) = l
                .text
                .strip_prefix("tick ")
                .and_then(|v| v.trim().parse::<f64>().ok())
            {
                first_line_at.get_or_insert(v);
                line_ms.push(seen - v);
            }
        }
        let done = sessions
            .get(authed(
                GetSessionRequest {
                    name: s.name.clone(),
                },
                &token,
            )?)
            .await?
            .into_inner();
        exited(&done)?;
        // The entry's first statement stamps the time it runs: sandbox and interpreter start-up included.
        start_ms.push(first_line_at.context("the entry printed nothing")? - t0);
    }

    let mut ps_ms = Vec::new();
    for _ in 0..ps_n {
        let t = Instant::now();
        sessions
            .list(authed(
                ListSessionsRequest {
                    all: true,
                    ..Default::default()
                },
                &token,
            )?)
            .await
            .context("ps")?;
        ps_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }

    let ((adm_ms, adm_rate), adm_cpu) = cpu_per(dep.pids().first().copied(), async {
        let figures = admissions(&alice, admissions_n, clients).await?;
        let n = figures.0.len();
        Ok((figures, n))
    })
    .await?;
    let (one_ms, one_rate) = admissions(&alice, admissions_n.min(2000), 1).await?;
    let (paced_ms, paced_rate) = admissions_at_rate(&alice, admissions_n, rate as f64).await?;
    drop(dep);
    let distributed = if skip_distributed {
        None
    } else {
        // The distributed deployment decides far fewer a second; a smaller count keeps its run to minutes.
        Some(distributed_admissions(admissions_n.min(DISTRIBUTED_ADMISSIONS), clients).await?)
    };

    println!(
        "nsml-bench (embedded, `nsmld up`, {runs} runs, {ps_n} ps calls, {} admissions from {clients} clients)",
        adm_ms.len()
    );
    println!("{:<44} {:>10} {:>10}", "measure", "p50", "p99");
    println!(
        "{:<44} {:>8.1}ms {:>10}",
        "run -> entry process started",
        pct(start_ms, 0.5),
        ""
    );
    println!(
        "{:<44} {:>8.2}ms {:>8.2}ms",
        "ps round trip through the gateway",
        pct(ps_ms.clone(), 0.5),
        pct(ps_ms, 0.99)
    );
    println!(
        "{:<44} {:>8.1}ms {:>8.1}ms",
        "line printed -> seen by logs -f",
        pct(line_ms.clone(), 0.5),
        pct(line_ms, 0.99)
    );
    let row = admission_row;
    row(
        &format!("admissions, {}, embedded", count(clients)),
        &adm_ms,
        adm_rate,
    );
    if let Some((server_us, client_us)) = adm_cpu {
        println!(
            "{:<44} {:>8.0}us {:>10}   (the bench's clients: {:.0}us)",
            format!("  CPU per admission, {}, nsmld", count(clients)),
            server_us,
            "",
            client_us
        );
    }
    row("admissions, 1 client, embedded", &one_ms, one_rate);
    row(
        &format!("admissions offered at {rate}/s, embedded"),
        &paced_ms,
        paced_rate,
    );
    if let Some(((ms, rate), (one, one_rate), shares)) = &distributed {
        row(
            &format!("admissions, {}, distributed", count(clients)),
            ms,
            *rate,
        );
        row("admissions, 1 client, distributed", one, *one_rate);
        cpu_row(
            &format!("  CPU per admission, {}, distributed", count(clients)),
            shares,
        );
    }
    match idle_rss {
        Some(k) => println!(
            "{:<44} {:>8.1}MB",
            "idle nsmld up resident memory",
            k as f64 / 1024.0
        ),
        None => println!("{:<44} {:>10}", "idle nsmld up resident memory", "n/a"),
    }
    Ok(())
}

type Figures = (Vec<f64>, f64);

/// One line of admission figures: p50 and p99 latency, and the rate.
fn admission_row(label: &str, ms: &[f64], rate: f64) {
    println!(
        "{:<44} {:>8.2}ms {:>8.2}ms   {:.0}/s",
        label,
        pct(ms.to_vec(), 0.5),
        pct(ms.to_vec(), 0.99),
        rate
    );
}

/// The bench is one caller making thousands of calls: it lifts the gateway's per-caller rate limit (500/s,
/// which the distributed deployment's admissions also exceed).
const UNLIMITED: &[(&str, &str)] = &[("NSML_RATE_LIMIT", "1000000")];

/// The most admissions asked of the distributed deployment.
const DISTRIBUTED_ADMISSIONS: usize = 5000;

fn count(clients: usize) -> String {
    format!("{clients} client{}", if clients == 1 { "" } else { "s" })
}

/// Admission decisions through the gateway: `n` `run` requests from `clients` concurrent clients of one team
/// whose session slots are all taken, so every request is decided and refused. Each goes gateway → session
/// (number allocated, request recorded) → quota (decision appended, which is also the session's rejection).
async fn admissions(alice: &Client, n: usize, clients: usize) -> anyhow::Result<Figures> {
    let sleeper = take_slots(alice).await?;
    let per_client = n.div_ceil(clients);
    let t_all = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (c, snap) = (alice.clone(), sleeper.clone());
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    let t = Instant::now();
                    let r = c.run("t1-cls", &snap, "", small()).await;
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                    decided(r)?;
                }
                anyhow::Ok(lat)
            })
        })
        .collect();
    let mut adm_ms = Vec::new();
    for t in tasks {
        adm_ms.extend(t.await??);
    }
    let rate = adm_ms.len() as f64 / t_all.elapsed().as_secs_f64();
    Ok((adm_ms, rate))
}

/// The same admissions offered at `rate` per second, in an open loop: request `i` is sent when it is due, at
/// `i / rate` seconds after the start, however many earlier ones are still unanswered, and its latency counts
/// from when it was due, so a request that could not be sent on time is charged for the wait. A thread of its
/// own keeps the pace, which an async timer (millisecond ticks) could not at 5,000/s. Returns the latencies and
/// the rate achieved.
async fn admissions_at_rate(alice: &Client, n: usize, rate: f64) -> anyhow::Result<Figures> {
    anyhow::ensure!(rate > 0.0, "--rate must be above zero");
    let sleeper = take_slots(alice).await?;
    let (client, runtime) = (alice.clone(), tokio::runtime::Handle::current());
    let t_all = Instant::now();
    let pacer = std::thread::spawn(move || {
        (0..n)
            .map(|i| {
                let due = t_all + Duration::from_secs_f64(i as f64 / rate);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let (c, snap) = (client.clone(), sleeper.clone());
                runtime.spawn(async move {
                    let r = c.run("t1-cls", &snap, "", small()).await;
                    (due.elapsed().as_secs_f64() * 1000.0, decided(r))
                })
            })
            .collect::<Vec<_>>()
    });
    let tasks = tokio::task::spawn_blocking(move || pacer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the pacing thread panicked"))?;
    let mut ms = Vec::with_capacity(n);
    for task in tasks {
        let (latency, answer) = task.await?;
        answer?;
        ms.push(latency);
    }
    let achieved = ms.len() as f64 / t_all.elapsed().as_secs_f64();
    Ok((ms, achieved))
}

/// Every admission of the bench is decided: refused for the team's session limit (or, for the few that find a
/// slot free, admitted); any other answer stops the bench.
fn decided<T>(answer: Result<T, tonic::Status>) -> anyhow::Result<()> {
    match answer {
        Err(st) if st.code() != tonic::Code::FailedPrecondition => {
            Err(anyhow::anyhow!("unexpected answer: {st}"))
        }
        _ => Ok(()),
    }
}

/// Fills the team's two concurrent-session slots with sleepers, unless they are taken already; returns the
/// sleeper's code snapshot.
async fn take_slots(alice: &Client) -> anyhow::Result<String> {
    let sleeper = alice
        .upload("t1-cls", &[("main.py", "import time\ntime.sleep(600)\n")])
        .await?;
    for _ in 0..2 {
        match alice.run("t1-cls", &sleeper, "", small()).await {
            Ok(_) => {}
            Err(st) if st.code() == tonic::Code::FailedPrecondition => break,
            Err(st) => return Err(st.into()),
        }
    }
    Ok(sleeper)
}

/// The figures of the distributed deployment: admissions from many clients and from one, and where the CPU of
/// the many went.
type DistributedFigures = (Figures, Figures, CpuShares);

/// The same admissions against the distributed deployment: every service its own process, the log in a
/// fresh Postgres database, events over NATS JetStream.
async fn distributed_admissions(n: usize, clients: usize) -> anyhow::Result<DistributedFigures> {
    let db = FreshDb::create().await?;
    let stream = format!("NSML_BENCH_{}", uuid::Uuid::new_v4().simple());
    let figures = async {
        let dep = Deployment::distributed_env(&db.url, &stream, UNLIMITED)?;
        let host = dep.host()?;
        host.nsml(&["admin", "competition", "apply", "examples/competition.toml"])?
            .ok()?;
        let alice = Client::login(&dep.url, "alice", "alice-pass").await?;
        let processes: Vec<(String, u32)> = nsml_integration_tests::services()
            .map(str::to_string)
            .zip(dep.pids())
            .collect();
        let before = CpuSample::take(&processes, &db.backends().await?);
        let many = admissions(&alice, n, clients).await?;
        let after = CpuSample::take(&processes, &db.backends().await?);
        let shares = before.shares_until(&after, many.0.len());
        let one = admissions(&alice, n.min(2000), 1).await?;
        anyhow::Ok((many, one, shares))
    }
    .await;
    drop_stream(&stream).await;
    db.drop_db().await;
    figures
}

/// The CPU time (seconds) used so far by each process an admission goes through, and the machine's busy and
/// total time (`/proc/stat`, in clock ticks).
struct CpuSample {
    processes: Vec<(String, f64)>,
    machine: Option<(u64, u64)>,
}

/// Where the CPU of a phase went, in µs per admission: by process, and the machine's whole busy time with the
/// share of it that was busy.
struct CpuShares {
    processes: Vec<(String, f64)>,
    machine: Option<(f64, f64)>,
}

impl CpuSample {
    /// Samples the deployment's `processes`, the Postgres backends serving its database, the NATS servers on this
    /// machine, this bench (the clients) and the machine.
    fn take(processes: &[(String, u32)], backends: &[u32]) -> Self {
        let mut sampled: Vec<(String, f64)> = processes
            .iter()
            .map(|(name, pid)| (name.clone(), cpu_secs(&pid.to_string()).unwrap_or(0.0)))
            .collect();
        // Backends that ended meanwhile are not counted: the pool keeps its connections through the phase.
        sampled.extend(backends.iter().map(|pid| {
            (
                format!("postgres:{pid}"),
                cpu_secs(&pid.to_string()).unwrap_or(0.0),
            )
        }));
        sampled.extend(processes_named("nats-server").into_iter().map(|pid| {
            (
                format!("nats-server:{pid}"),
                cpu_secs(&pid.to_string()).unwrap_or(0.0),
            )
        }));
        sampled.push(("bench clients".into(), cpu_secs("self").unwrap_or(0.0)));
        CpuSample {
            processes: sampled,
            machine: machine_ticks(),
        }
    }

    /// The CPU each process used from this sample to `later`, per admission of `n`; the Postgres backends and the
    /// NATS servers each added up under one name.
    fn shares_until(&self, later: &CpuSample, n: usize) -> CpuShares {
        let per = |secs: f64| secs / n.max(1) as f64 * 1e6;
        let mut processes: Vec<(String, f64)> = Vec::new();
        for (name, after) in &later.processes {
            let before = self
                .processes
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0.0, |(_, b)| *b);
            let group = name.split(':').next().unwrap_or(name).to_string();
            let used = per((after - before).max(0.0));
            match processes.iter_mut().find(|(g, _)| *g == group) {
                Some((_, sum)) => *sum += used,
                None => processes.push((group, used)),
            }
        }
        let machine = match (self.machine, later.machine, clock_ticks()) {
            (Some((b0, t0)), Some((b1, t1)), Some(ticks)) if t1 > t0 => Some((
                per((b1 - b0) as f64 / ticks),
                (b1 - b0) as f64 / (t1 - t0) as f64,
            )),
            _ => None,
        };
        CpuShares { processes, machine }
    }
}

/// The ids of this machine's processes whose command is `name`.
fn processes_named(name: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .collect()
}

/// The machine's busy and total CPU time so far, in clock ticks (`/proc/stat`'s first line; idle and I/O wait
/// are not busy).
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4)?;
    Some((total - idle, total))
}

/// One line of where the CPU went.
fn cpu_row(label: &str, shares: &CpuShares) {
    let processes: Vec<String> = shares
        .processes
        .iter()
        .map(|(name, us)| format!("{name} {us:.0}"))
        .collect();
    let counted: f64 = shares.processes.iter().map(|(_, us)| us).sum();
    match shares.machine {
        Some((busy, share)) => println!(
            "{label}: {busy:.0} µs of the machine's CPU ({:.0}% of it busy); by process, µs: {}; the rest \
             (kernel, other processes) {:.0}",
            share * 100.0,
            processes.join(", "),
            (busy - counted).max(0.0)
        ),
        None => println!("{label}: by process, µs: {}", processes.join(", ")),
    }
}

/// Admissions alone (see [`admissions`]): from `clients` clients and from one, in a fresh embedded deployment,
/// then (unless `skip_distributed`) in a fresh distributed one.
async fn admissions_only(n: usize, clients: usize, skip_distributed: bool) -> anyhow::Result<()> {
    let embedded = {
        let dep = Deployment::embedded_env(&[], UNLIMITED)?;
        let alice = Client::login(&dep.url, "alice", "alice-pass").await?;
        let many = admissions(&alice, n, clients).await?;
        let one = admissions(&alice, n.min(2000), 1).await?;
        (many, one)
    };
    let distributed = if skip_distributed {
        None
    } else {
        Some(distributed_admissions(n.min(DISTRIBUTED_ADMISSIONS), clients).await?)
    };
    println!("nsml-bench --admissions-only ({n} admissions from {clients} clients, 2000 from one)");
    println!("{:<44} {:>10} {:>10}", "measure", "p50", "p99");
    let row = |label: &str, (ms, rate): &Figures| admission_row(label, ms, *rate);
    let (distributed, shares) = match distributed {
        Some((many, one, shares)) => (Some((many, one)), Some(shares)),
        None => (None, None),
    };
    let deployments =
        std::iter::once(("embedded", embedded)).chain(distributed.map(|d| ("distributed", d)));
    for (deployment, (many, one)) in deployments {
        row(
            &format!("admissions, {}, {deployment}", count(clients)),
            &many,
        );
        row(&format!("admissions, 1 client, {deployment}"), &one);
    }
    if let Some(shares) = shares {
        cpu_row(
            &format!("CPU per admission, {}, distributed", count(clients)),
            &shares,
        );
    }
    Ok(())
}

/// Resident memory of `nsmld up` after 50 ended sessions and after `n` (none removed): the growth per session
/// kept.
async fn kept_sessions(n: usize) -> anyhow::Result<()> {
    const FIRST: usize = 50;
    anyhow::ensure!(n > FIRST, "--kept takes more than {FIRST} sessions");
    let dep = Deployment::embedded_env(&[], UNLIMITED)?;
    let pid = dep.pids().first().copied().context("no nsmld process")?;
    let alice = Client::login(&dep.url, "alice", "alice-pass").await?;
    let snap = alice
        .upload("t1-cls", &[("main.py", "print('hi')\n")])
        .await?;
    let (mut at_first, mut split_first, mut at_half) = (None, None, None);
    for i in 1..=n {
        let s = alice.run("t1-cls", &snap, "", small()).await?;
        let done = alice.wait_session(&s.name).await?;
        exited(&done)?;
        if i == FIRST {
            tokio::time::sleep(Duration::from_secs(2)).await;
            at_first = nsml_integration_tests::soak::rss_kib(pid);
            split_first = nsml_integration_tests::soak::rss_split_kib(pid);
        }
        if i == n / 2 && i > FIRST {
            tokio::time::sleep(Duration::from_secs(2)).await;
            at_half = nsml_integration_tests::soak::rss_kib(pid);
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let at_last = nsml_integration_tests::soak::rss_kib(pid);
    let split_last = nsml_integration_tests::soak::rss_split_kib(pid);
    let (Some(first), Some(last)) = (at_first, at_last) else {
        anyhow::bail!("cannot read nsmld's resident memory");
    };
    println!("nsml-bench --kept (embedded, `nsmld up`, trivial sessions, none removed)");
    println!(
        "resident memory after {FIRST} sessions: {:.1} MB",
        first as f64 / 1024.0
    );
    println!(
        "resident memory after {n} sessions: {:.1} MB",
        last as f64 / 1024.0
    );
    println!(
        "growth per kept session: {:.1} KiB",
        last.saturating_sub(first) as f64 / (n - FIRST) as f64
    );
    if let (Some((anon0, file0)), Some((anon1, file1))) = (split_first, split_last) {
        println!(
            "of which the process's own memory (RssAnon): {:.1} KiB, and pages of mapped files (RssFile, the log \
             read through its memory map): {:.1} KiB",
            anon1.saturating_sub(anon0) as f64 / (n - FIRST) as f64,
            file1.saturating_sub(file0) as f64 / (n - FIRST) as f64
        );
    }
    // Bounded caches (the log's page caches, the allocator's) fill over the first sessions; the second half
    // shows what each session costs once they are warm.
    if let Some(half) = at_half {
        println!(
            "growth per kept session over the second half ({} to {n}): {:.1} KiB",
            n / 2,
            last.saturating_sub(half) as f64 / (n - n / 2) as f64
        );
    }
    Ok(())
}

/// What each refused admission leaves in memory: `nsmld up`'s resident memory after 2,000 refused `run`s (the
/// team's session slots all taken) and after `n` more, and the growth per refusal between.
async fn refused_admissions(n: usize) -> anyhow::Result<()> {
    const FIRST: usize = 2000;
    let dep = Deployment::embedded_env(&[], UNLIMITED)?;
    let pid = dep.pids().first().copied().context("no nsmld process")?;
    let alice = Client::login(&dep.url, "alice", "alice-pass").await?;
    let sleeper = take_slots(&alice).await?;
    let refuse = |count: usize| {
        let (alice, sleeper) = (alice.clone(), sleeper.clone());
        async move {
            for _ in 0..count {
                decided(alice.run("t1-cls", &sleeper, "", small()).await)?;
            }
            anyhow::Ok(())
        }
    };
    refuse(FIRST).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let first = nsml_integration_tests::soak::rss_kib(pid);
    refuse(n).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let last = nsml_integration_tests::soak::rss_kib(pid);
    let (Some(first), Some(last)) = (first, last) else {
        anyhow::bail!("cannot read nsmld's resident memory");
    };
    println!(
        "nsml-bench --refused (embedded, `nsmld up`, `run` refused for the team's session limit)"
    );
    println!(
        "resident memory after {FIRST} refusals: {:.1} MB",
        first as f64 / 1024.0
    );
    println!(
        "resident memory after {} refusals: {:.1} MB",
        FIRST + n,
        last as f64 / 1024.0
    );
    println!(
        "growth per refused admission: {:.2} KiB",
        last.saturating_sub(first) as f64 / n as f64
    );
    Ok(())
}

/// What tracing costs admissions, all in one run: six `nsmld up` side by side, one with no tracing layer
/// at all (`NSML_TRACING=off`: the baseline, as a build without tracing would run), one as it ships with export
/// off (no `OTEL_*` variables, text logs: no layer either, so its difference from the baseline is the bench's
/// noise), one with export off and JSON logs (the layer makes trace ids for the log lines and passes them on,
/// nothing sampled), one sampling every trace (`OTEL_TRACES_SAMPLER=always_on`) and exporting it over
/// OTLP/gRPC to a receiver this bench serves, the same without the read models' and reactors' span per event
/// (`NSML_TRACE_EVENTS=off`), and one sampling a tenth of the traces. Rounds of `n` admissions from `clients`
/// clients go to each in turn, starting with the next one each round, `rounds` times, so that a slower stretch
/// of the machine falls on all of them; the medians over rounds are compared.
async fn tracing_cost(rounds: usize, n: usize, clients: usize) -> anyhow::Result<()> {
    // The receiver runs on a thread of its own, as a collector would in a process of its own: on the bench's
    // one client thread, decoding the spans would slow the clients down and be counted as tracing's cost.
    let collector = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let receiver = collector
        .spawn(nsml_integration_tests::otlp::Receiver::start(false))
        .await??;
    let endpoint = receiver.endpoint.clone();
    let settings: [(&str, Vec<(&str, &str)>); 6] = [
        (
            "no tracing (NSML_TRACING=off: no tracing layer)",
            vec![("NSML_TRACING", "off")],
        ),
        ("tracing, export off (no OTEL_* variables)", vec![]),
        (
            "tracing, export off, JSON logs (trace ids, none sampled)",
            vec![("NSML_LOG_FORMAT", "json")],
        ),
        (
            "tracing, 100% sampled, exported over OTLP/gRPC",
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
                ("OTEL_TRACES_SAMPLER", "always_on"),
            ],
        ),
        (
            "tracing, 100% sampled, no span per event (NSML_TRACE_EVENTS=off)",
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
                ("OTEL_TRACES_SAMPLER", "always_on"),
                ("NSML_TRACE_EVENTS", "off"),
            ],
        ),
        (
            "tracing, 10% sampled, exported over OTLP/gRPC",
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.1"),
            ],
        ),
    ];
    let mut deployments = Vec::new();
    for (_, env) in &settings {
        let env: Vec<(&str, &str)> = UNLIMITED
            .iter()
            .copied()
            .chain(env.iter().copied())
            .collect();
        let dep = Deployment::embedded_env(&[], &env)?;
        let alice = Client::login(&dep.url, "alice", "alice-pass").await?;
        // A first round warms each up (connections, allocator, the team's sleepers), and is not counted.
        admissions(&alice, n.min(500), clients).await?;
        deployments.push((dep, alice));
    }
    // Per setting: decisions per second, p50 latency (ms), nsmld's CPU time per decision (µs) and the bench's
    // own (clients and receiver), per round.
    let mut figures = vec![(Vec::new(), Vec::new(), Vec::new(), Vec::new()); settings.len()];
    for round in 0..rounds {
        // Each round starts with the next setting, so that none always follows the same one.
        for k in 0..deployments.len() {
            let i = (round + k) % deployments.len();
            let (dep, alice) = &deployments[i];
            let ((lat, rate), cpu) = cpu_per(dep.pids().first().copied(), async {
                let f = admissions(alice, n, clients).await?;
                let count = f.0.len();
                Ok((f, count))
            })
            .await?;
            figures[i].0.push(rate);
            figures[i].1.push(pct(lat, 0.5));
            figures[i]
                .2
                .push(cpu.map_or(f64::NAN, |(server, _)| server));
            figures[i].3.push(cpu.map_or(f64::NAN, |(_, own)| own));
        }
    }
    let spans = receiver.count();
    drop(deployments);
    drop(receiver);
    collector.shutdown_background();
    println!(
        "nsml-bench --tracing-cost (embedded, `nsmld up`; {rounds} rounds of {n} admissions from {clients} \
         clients per setting, interleaved; medians over rounds)"
    );
    println!(
        "{:<66} {:>12} {:>9} {:>14} {:>10} {:>10} {:>14}",
        "setting", "decisions/s", "p50", "nsmld CPU", "rate", "CPU", "bench CPU"
    );
    let median = |v: &Vec<f64>| pct(v.clone(), 0.5);
    // Ratios are taken round by round, against the baseline's figure of the same round, so that a slow
    // stretch of the machine cancels out; their median is printed.
    let ratio =
        |of: &Vec<f64>, to: &Vec<f64>| median(&of.iter().zip(to).map(|(a, b)| a / b).collect());
    let base = &figures[0];
    for ((name, _), (rate, p50, cpu, own)) in settings.iter().zip(&figures) {
        println!(
            "{:<66} {:>12.0} {:>7.2}ms {:>11.0}µs/d {:>9.3}x {:>9.3}x {:>11.0}µs/d",
            name,
            median(rate),
            median(p50),
            median(cpu),
            ratio(rate, &base.0),
            ratio(cpu, &base.2),
            median(own),
        );
    }
    println!("spans received by the local OTLP receiver: {spans}");
    println!(
        "(rate: decisions/s against no tracing's in the same round, higher is better; CPU: nsmld's CPU per decision \
         against no tracing's in the same round (both the median over rounds); \
         bench CPU: this process's, its clients and the receiver decoding the spans, on the same cores)"
    );
    Ok(())
}

/// The entry of a `--checkpoints` session: for `MB` megabytes and `RUNS` runs (its arguments), saves a
/// checkpoint of one file of that many incompressible bytes `RUNS` times and loads each back, printing the
/// seconds each step took as seen by the program.
const CHECKPOINT_ENTRY: &str = r#"
import os, sys, time
import nsml

mb, runs = int(sys.argv[1]), int(sys.argv[2])
size = mb << 20
# Random blocks repeated: incompressible to gzip, whose window is 32 KiB, and quick to make.
block = os.urandom(64 << 20)
view = memoryview(block)
took = {}

def save(path, **kwargs):
    t = time.perf_counter()
    with open(os.path.join(path, "model.bin"), "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(block))
            f.write(view[:n])
            left -= n
    took["write"] = time.perf_counter() - t

def load(path, **kwargs):
    got = os.path.getsize(os.path.join(path, "model.bin"))
    assert got == size, (got, size)

nsml.bind(save=save, load=load)
for i in range(runs):
    t = time.perf_counter()
    nsml.save("ckpt-%d" % i)
    total = time.perf_counter() - t
    print("BENCH save %d %.6f %.6f" % (i, total, took["write"]), flush=True)
    t = time.perf_counter()
    nsml.load("ckpt-%d" % i)
    print("BENCH load %d %.6f" % (i, time.perf_counter() - t), flush=True)
"#;

/// The entry `--reports` runs: `calls` reports of one metric each, then `batches` reports of 1,000 metrics
/// each, every one answered by the runner before the next is made; prints the time each series took.
const REPORTS_ENTRY: &str = r#"
import sys, time
import nsml

calls, batches = int(sys.argv[1]), int(sys.argv[2])
t = time.perf_counter()
for i in range(calls):
    nsml.report(step=i, train__loss=1.0 / (i + 1))
print("BENCH one %.6f" % (time.perf_counter() - t), flush=True)
names = ["m%04d" % k for k in range(1000)]
t = time.perf_counter()
for i in range(batches):
    nsml.report(step=calls + i, **{n: i + k / 1000.0 for k, n in enumerate(names)})
print("BENCH bulk %.6f" % (time.perf_counter() - t), flush=True)
"#;

/// Metric reports from inside a real session on `nsmld up`: the rate of `nsml.report` calls of one metric
/// each, and of metrics reported 1,000 to a call; then checks that the session's metric history holds every
/// point reported.
async fn reports(calls: usize, batches: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        calls > 0 && batches > 0,
        "--reports needs calls and batches"
    );
    let dep = Deployment::embedded_env(&[], UNLIMITED)?;
    let alice = Client::login(&dep.url, "alice", "alice-pass").await?;
    let snap = alice
        .upload("t1-cls", &[("main.py", REPORTS_ENTRY)])
        .await?;
    let s = alice
        .run("t1-cls", &snap, &format!("{calls} {batches}"), small())
        .await?;
    let done = alice.wait_ended(&s.name, None).await?;
    let lines = alice.log_lines(&s.name).await?;
    if let Err(e) = exited(&done) {
        anyhow::bail!("{e}; the session printed:\n{}", lines.join("\n"));
    }
    let (mut one_secs, mut bulk_secs) = (None, None);
    for l in &lines {
        match l.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["BENCH", "one", secs] => one_secs = Some(secs.parse::<f64>()?),
            ["BENCH", "bulk", secs] => bulk_secs = Some(secs.parse::<f64>()?),
            _ => {}
        }
    }
    let (one_secs, bulk_secs) = one_secs
        .zip(bulk_secs)
        .with_context(|| format!("the session printed {lines:?}"))?;
    let metrics = batches * 1000;
    // The history of 1,000-metric reports is larger than a client takes by default, as the CLI's is.
    let points = SessionServiceClient::new(alice.channel.clone())
        .max_decoding_message_size(nsml_common::clients::MAX_MESSAGE_BYTES)
        .metrics(authed(
            nsml_proto::v1::MetricsRequest {
                name: s.name.clone(),
            },
            &alice.token,
        )?)
        .await?
        .into_inner()
        .points
        .len();
    anyhow::ensure!(
        points == calls + batches,
        "the session's history holds {points} points of the {} reported",
        calls + batches
    );
    println!(
        "nsml-bench --reports (embedded, `nsmld up`, from inside one session; each call answered before the next)"
    );
    println!(
        "reports, one metric per call          {:>8.0} calls/s   ({calls} calls in {one_secs:.2} s)",
        calls as f64 / one_secs
    );
    println!(
        "reports, 1,000 metrics per call       {:>8.0} metrics/s ({metrics} metrics in {bulk_secs:.2} s)",
        metrics as f64 / bulk_secs
    );
    Ok(())
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

/// Checkpoints on `nsmld up`: for each size (MB), one session whose entry writes that many random bytes and
/// calls `nsml.save` `runs` times (timed inside the session: the whole call, and the write its bound function
/// makes) and `nsml.load` (timed inside, extraction included); `nsml model pull` of each through the CLI
/// (the whole process); and, as the anchor, `cp FILE DIR; sync` of a file of the same size, on the same file
/// system as the deployment's data, between the same runs. Prints medians as MB/s and the ratio to the anchor.
async fn checkpoints(sizes_mb: &[usize], runs: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        runs > 0 && !sizes_mb.is_empty(),
        "--checkpoints needs runs and sizes"
    );
    let dep = Deployment::embedded_env(&[], UNLIMITED)?;
    let alice = Client::login(&dep.url, "alice", "alice-pass").await?;
    let cli = nsml_integration_tests::scenario::login(&dep, "alice", "alice-pass")?;
    let snap = alice
        .upload("t1-cls", &[("main.py", CHECKPOINT_ENTRY)])
        .await?;
    let work = dep
        .data_dir
        .parent()
        .context("the deployment's directory")?
        .join("bench-checkpoints");
    std::fs::create_dir_all(&work)?;

    println!(
        "nsml-bench --checkpoints (embedded, `nsmld up`, {runs} runs per size, medians; one file of random bytes)"
    );
    println!(
        "{:>7} | {:>16} | {:>16} | {:>11} | {:>16} | {:>16} | {:>10}",
        "size", "nsml.save", "of it: write", "cp; sync", "nsml.load", "model pull", "save/cp"
    );
    for &mb in sizes_mb {
        let bytes = (mb as f64) * 1024.0 * 1024.0;
        let rate = |secs: f64| bytes / secs / 1e6;

        // The anchor: the same bytes copied on the same file system and synced, timed as one command.
        let source = work.join(format!("source-{mb}"));
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "head -c {} /dev/urandom > '{}'",
                mb << 20,
                source.display()
            ))
            .status()?;
        anyhow::ensure!(status.success(), "cannot write the anchor's source");
        let mut cp = Vec::new();
        for i in 0..runs {
            let dest = work.join(format!("cp-{mb}-{i}"));
            std::fs::create_dir_all(&dest)?;
            let status = std::process::Command::new("sync").status()?;
            anyhow::ensure!(status.success(), "sync failed");
            let t = Instant::now();
            let status = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "cp '{}' '{}'; sync",
                    source.display(),
                    dest.display()
                ))
                .status()?;
            cp.push(t.elapsed().as_secs_f64());
            anyhow::ensure!(status.success(), "cp; sync failed");
            std::fs::remove_dir_all(&dest)?;
        }
        std::fs::remove_file(&source)?;

        // The session: memory for the program's block, the file's page cache and room to spare.
        let resources = nsml_proto::v1::Resources {
            gpus: 0,
            cpus: 2,
            memory_bytes: ((mb as u64) << 20) + (2 << 30),
            shm_bytes: 64 << 20,
        };
        let s = alice
            .run("t1-cls", &snap, &format!("{mb} {runs}"), resources)
            .await?;
        // Saves at the speeds measured before take minutes: wait longer than `wait_session` does.
        let done = alice.wait_ended(&s.name, None).await?;
        let lines = alice.log_lines(&s.name).await?;
        let (mut save, mut write, mut load) = (Vec::new(), Vec::new(), Vec::new());
        let mut printed = Vec::new();
        for l in lines {
            let words: Vec<&str> = l.split_whitespace().collect();
            match words.as_slice() {
                ["BENCH", "save", _, total, w] => {
                    save.push(total.parse::<f64>()?);
                    write.push(w.parse::<f64>()?);
                }
                ["BENCH", "load", _, total] => load.push(total.parse::<f64>()?),
                _ => printed.push(l),
            }
        }
        if let Err(e) = exited(&done) {
            anyhow::bail!("{e}; the session printed:\n{}", printed.join("\n"));
        }
        anyhow::ensure!(
            save.len() == runs && load.len() == runs,
            "the session printed {printed:?}"
        );

        // `nsml model pull` through the CLI, the whole process timed.
        let mut pull = Vec::new();
        for i in 0..runs {
            let dest = work.join(format!("pull-{mb}-{i}"));
            let t = Instant::now();
            let out = cli.nsml_in(
                &work,
                &[
                    "model",
                    "pull",
                    &s.name,
                    &format!("ckpt-{i}"),
                    &dest.display().to_string(),
                ],
                "",
            )?;
            pull.push(t.elapsed().as_secs_f64());
            out.ok()?;
            let got = std::fs::metadata(dest.join("model.bin"))?.len();
            anyhow::ensure!(got == (mb as u64) << 20, "pulled {got} bytes");
            std::fs::remove_dir_all(&dest)?;
        }
        let each = |xs: &[f64]| {
            xs.iter()
                .map(|s| format!("{s:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "{:>7}   each run, s: save {} | write {} | cp; sync {} | load {} | pull {}",
            "",
            each(&save),
            each(&write),
            each(&cp),
            each(&load),
            each(&pull)
        );
        let (save, write, load, pull, cp) = (
            median(&mut save),
            median(&mut write),
            median(&mut load),
            median(&mut pull),
            median(&mut cp),
        );
        let shown = |secs: f64| format!("{:>6.0} MB/s {:>5.2}s", rate(secs), secs);
        println!(
            "{:>4} MB | {} | {} | {:>6.0} MB/s | {} | {} | {:>9.2}×",
            mb,
            shown(save),
            shown(write),
            rate(cp),
            shown(load),
            shown(pull),
            cp / save
        );
        println!(
            "{:>7}   the platform's part of nsml.save (the call less the write): {:.0} MB/s, {:.2}× cp; sync",
            "",
            rate(save - write),
            cp / (save - write)
        );
    }
    println!(
        "MB = 10^6 bytes per second; sizes in MiB. save/cp: the time of cp; sync over that of nsml.save."
    );
    Ok(())
}
