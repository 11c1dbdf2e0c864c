//! The large-log bench (`nsml-bench --large-log`): a log of many scored submissions and refused admissions,
//! seeded with the events the services append for them, then `nsmld up` booted from it and its boards queried.
//!
//! Seeding appends, through the event store's own `append` (so the hash chain and the outbox are the real ones),
//! for each scored submission the four events the submission service records (built by
//! `nsml_submission::seed`, the handler's own rules and encoders), and for each refused admission the two that a
//! refused `run` leaves: the session service's `SessionRequested` and the quota service's `AdmissionDenied`
//! (decided by the quota's own admission step on the team's ledger, `nsml_quota::synthetic::LedgerSeed`). What the
//! seed leaves out, and says so: the submit sessions' own events and the quota's records of the submits (their
//! grants, successes and releases), which no read model of the boards answers from.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use nsml_common::event::{decode, new_event};
use nsml_eventstore::{EventStore, ExpectedVersion, NewEvent, SqliteStore};
use nsml_proto::v1::leaderboard_service_client::LeaderboardServiceClient;
use nsml_proto::v1::quota_service_client::QuotaServiceClient;
use nsml_proto::v1::{
    AdmitRequest, BoardRequest, CompetitionApplied, HistoryRequest, OverallRequest, Policy,
    ReplayRequest, Resources, Session, SessionKind, SessionRequested, SessionStatus,
};
use nsml_quota::synthetic::LedgerSeed;
use nsml_submission::seed::{ScoredSubmit, scored_submission};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::figures::pct;
use crate::grpc::{Client, authed};
use crate::{Deployment, repo_root};

/// The competition the seeded log is about.
const COMPETITION: &str = "large";
/// 2026-01-01T00:00:00Z: the seeded submissions start here, an hour apart per team.
const START_MS: i64 = 1_767_225_600_000;
const G: u64 = 1024 * 1024 * 1024;
/// Appends in flight at once: enough for the writer to commit many per transaction.
const IN_FLIGHT: usize = 512;

/// What to seed and how many queries to time.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub submissions: usize,
    pub teams: usize,
    pub datasets: usize,
    pub decisions: usize,
    pub queries: usize,
    /// Audit replays of every ledger to time (`Replay` as the host, as `nsml admin audit replay` calls it).
    pub replays: usize,
}

/// The member of the first team, who asks for its history.
const MEMBER: (&str, &str) = ("alice", "alice-pass");

fn team(k: usize) -> String {
    format!("t{k:05}")
}

fn dataset(d: usize) -> String {
    format!("ds-{d:02}")
}

/// The competition manifest: `datasets` datasets (each the example's classification data), the first team with
/// a member, and a host.
fn manifest(dir: &Path, datasets: usize) -> anyhow::Result<std::path::PathBuf> {
    let data = repo_root().join("examples/datasets/t1-cls");
    let mut m = format!(
        "id = \"{COMPETITION}\"\ntitle = \"Large log\"\nhosts = [\"host\"]\n\n[policy]\nteam_gpus = 2\n\
         team_cpus = 16\nteam_memory = \"170G\"\nteam_sessions = 2\nteam_storage = \"450G\"\n\
         submit_interval = \"1h\"\nsubmit_time_limit = \"1h\"\nsubmit_max_cpus = 4\n\n"
    );
    for d in 0..datasets {
        m.push_str(&format!(
            "[[datasets]]\nname = \"{}\"\ndescription = \"seeded\"\npath = \"{}\"\nmetric = \"accuracy\"\n\
             direction = \"descending\"\nprivate_fraction = 0.5\nsplit_seed = 7\n\n",
            dataset(d),
            data.display()
        ));
    }
    m.push_str(&format!(
        "[[teams]]\nname = \"{}\"\nmembers = [\"{}\"]\n\n[[users]]\nname = \"{}\"\npassword = \"{}\"\n\n\
         [[users]]\nname = \"host\"\npassword = \"host-pass\"\n",
        team(0),
        MEMBER.0,
        MEMBER.0,
        MEMBER.1
    ));
    let path = dir.join("large.toml");
    std::fs::write(&path, m)?;
    Ok(path)
}

/// xorshift64*: scores that vary, the same every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One team's appends: its scored submissions, its refused runs' requests and its ledger.
fn team_appends(
    k: usize,
    sizes: &Sizes,
    policy: (&Policy, u64),
    rng: &mut Rng,
) -> anyhow::Result<Vec<(String, Vec<NewEvent>)>> {
    let name = team(k);
    let per_team = |total: usize| total / sizes.teams + usize::from(k < total % sizes.teams);
    let mut numbers = vec![0u64; sizes.datasets];
    let mut next = |d: usize| {
        numbers[d] += 1;
        numbers[d]
    };
    let mut out = Vec::new();
    for r in 0..per_team(sizes.submissions) {
        let d = (k + r) % sizes.datasets;
        let ds = dataset(d);
        let source = next(d);
        let session = next(d);
        let submitted_at_ms = START_MS + r as i64 * 3_600_000 + k as i64;
        let score = rng.unit();
        let s = ScoredSubmit {
            source: Session {
                name: format!("{name}/{ds}/{source}"),
                team: name.clone(),
                dataset: ds.clone(),
                competition: COMPETITION.into(),
                kind: SessionKind::Train as i32,
                ..Default::default()
            },
            checkpoint: (r % 10).to_string(),
            session: format!("{name}/{ds}/{session}"),
            actor: format!("user:m-{name}"),
            metric: "accuracy".into(),
            time_limit_secs: 3600,
            score,
            private_score: Some((score * 0.9 + rng.unit() * 0.1).min(1.0)),
            submitted_at_ms,
            scored_at_ms: submitted_at_ms + 20_000,
        };
        out.push(scored_submission(&s).context("seeding a scored submission")?);
    }
    let refusals = per_team(sizes.decisions);
    if refusals > 0 {
        let mut ledger = LedgerSeed::new(&name);
        let mut requests: Vec<Vec<NewEvent>> = vec![Vec::new(); sizes.datasets];
        let mut ledger_events = Vec::new();
        // More memory than the team's whole quota: the quota service refuses it (the executor does not check
        // memory), as it refuses a team's runs once its sessions are all taken.
        let resources = Resources {
            gpus: 0,
            cpus: 1,
            memory_bytes: policy.0.team_memory_bytes + G,
            shm_bytes: G,
        };
        for j in 0..refusals {
            let d = (k + j) % sizes.datasets;
            let ds = dataset(d);
            let n = next(d);
            let session = Session {
                name: format!("{name}/{ds}/{n}"),
                number: n,
                team: name.clone(),
                dataset: ds.clone(),
                kind: SessionKind::Train as i32,
                status: SessionStatus::Queued as i32,
                entry: "main.py".into(),
                resources: Some(resources),
                code_snapshot: "seeded".into(),
                created_at_ms: nsml_common::now_ms(),
                competition: COMPETITION.into(),
                ..Default::default()
            };
            let actor = format!("user:m-{name}");
            requests[d].push(new_event(
                &SessionRequested {
                    session: Some(session.clone()),
                },
                &actor,
                "",
            ));
            let req = AdmitRequest {
                team: name.clone(),
                competition: COMPETITION.into(),
                kind: session.kind,
                session: session.name.clone(),
                dataset: ds,
                resources: session.resources,
                submission_id: String::new(),
                command_id: session.name.clone(),
                seen_position: 0,
            };
            let (decision, events) = ledger
                .admit(&req, policy, &actor)
                .context("seeding an admission")?;
            anyhow::ensure!(!decision.granted, "a seeded admission was granted");
            ledger_events.extend(events);
        }
        for (d, events) in requests.into_iter().enumerate() {
            if !events.is_empty() {
                out.push((
                    nsml_common::names::sessions_stream(&name, &dataset(d)),
                    events,
                ));
            }
        }
        out.push((ledger.stream().to_string(), ledger_events));
    }
    Ok(out)
}

/// What seeding did.
struct Seeded {
    events: u64,
    secs: f64,
}

/// Appends the seeded events to the log in `db`, marks them relayed and handled by the reactors (as they
/// would be in a log the services wrote), and closes it.
async fn seed(db: &Path, sizes: Sizes) -> anyhow::Result<Seeded> {
    let store = Arc::new(SqliteStore::open(db).await?);
    let policy = {
        let mut found = None;
        let mut after = 0;
        loop {
            let page = store.read_all(after, 1000).await?;
            let Some(last) = page.last() else { break };
            after = last.position;
            for ev in &page {
                if let Some(c) = decode::<CompetitionApplied>(ev).and_then(|e| e.competition)
                    && c.id == COMPETITION
                {
                    found = Some((c.policy.unwrap_or_default(), c.policy_version));
                }
            }
        }
        found.context("the competition was not applied")?
    };
    let t0 = Instant::now();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut teams = (0..sizes.teams).peekable();
    let mut events = 0u64;
    let mut acked = Vec::new();
    while teams.peek().is_some() {
        // A slice of teams at a time: their appends in flight together, their memory freed after.
        let mut appends = Vec::new();
        for k in teams.by_ref().take(200) {
            appends.extend(team_appends(k, &sizes, (&policy.0, policy.1), &mut rng)?);
        }
        let results: Vec<_> = futures::stream::iter(appends.into_iter().map(|(stream, evs)| {
            let store = store.clone();
            async move { store.append(&stream, ExpectedVersion::NoStream, evs).await }
        }))
        .buffered(IN_FLIGHT)
        .collect()
        .await;
        for r in results {
            let a = r?;
            events += a.last_position - a.first_position + 1;
            acked.extend(a.first_position..=a.last_position);
        }
        // Relayed to the bus when they were appended: the outbox holds none of them.
        store.outbox_ack(&acked).await?;
        acked.clear();
    }
    let head = store.head_position().await?;
    // The reactors handled them as they were appended.
    for reactor in ["quota", "submission"] {
        store.save_checkpoint(reactor, head).await?;
    }
    store.close().await;
    Ok(Seeded {
        events,
        secs: t0.elapsed().as_secs_f64(),
    })
}

async fn serving(url: &str) -> bool {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(url.to_string()) else {
        return false;
    };
    let Ok(channel) = endpoint
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
    else {
        return false;
    };
    let mut health = HealthClient::new(channel);
    for service in ["", "nsml.v1.LeaderboardService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await;
        if !status.is_ok_and(|s| s.into_inner().status() == ServingStatus::Serving) {
            return false;
        }
    }
    true
}

/// Times `n` calls of `call` (ms each).
async fn timed<F, Fut>(n: usize, mut call: F) -> anyhow::Result<Vec<f64>>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut ms = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        call(i).await?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(ms)
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "?".into(), |k| format!("{:.0} MiB", k as f64 / 1024.0))
}

/// Resident memory as the process's own (anonymous) plus the log's pages mapped by the store's readers.
fn split(pid: u32) -> String {
    match crate::soak::rss_split_kib(pid) {
        Some((anon, file)) => format!("{} + {}", mib(Some(anon)), mib(Some(file))),
        None => "?".into(),
    }
}

/// Seeds a log of `sizes`, boots `nsmld up` from it and prints the figures.
pub async fn run(sizes: Sizes, env: &[(&str, &str)]) -> anyhow::Result<()> {
    anyhow::ensure!(
        sizes.teams > 0 && sizes.datasets > 0,
        "teams and datasets must be > 0"
    );
    let dir = tempfile::tempdir()?;
    let manifest = manifest(dir.path(), sizes.datasets)?;
    // A fresh deployment applies the competition (its datasets, its team and users), then stops.
    let mut dep = Deployment::embedded_env(&[manifest], env)?;
    dep.allow_ready_within(Duration::from_secs(600));
    let db = dep.data_dir.join("nsml.db");
    let mut seeded = None;
    let mut down_at = Instant::now();
    dep.kill_and_restart_when(|| {
        let db = db.clone();
        let out = std::thread::spawn(move || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(seed(&db, sizes))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("seeding panicked"))??;
        seeded = Some(out);
        down_at = Instant::now();
        Ok(())
    })?;
    let ready_s = down_at.elapsed().as_secs_f64();
    while !serving(&dep.url).await {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let serving_s = down_at.elapsed().as_secs_f64();
    let seeded = seeded.context("nothing seeded")?;
    let pid = dep.pids().first().copied().context("no nsmld")?;
    let rss_boot = crate::soak::rss_kib(pid);
    let split_boot = split(pid);
    let db_mib = std::fs::metadata(&db).map_or(0.0, |m| m.len() as f64 / 1024.0 / 1024.0);

    let member = Client::login(&dep.url, MEMBER.0, MEMBER.1).await?;
    let mut boards = LeaderboardServiceClient::new(member.channel.clone());
    let token = member.token.clone();
    let rows = [
        std::cell::Cell::new(0usize),
        std::cell::Cell::new(0),
        std::cell::Cell::new(0),
    ];
    let board_ms = timed(sizes.queries, |i| {
        let mut boards = boards.clone();
        let token = token.clone();
        let rows = &rows[0];
        async move {
            let r = boards
                .board(authed(
                    BoardRequest {
                        dataset: dataset(i % sizes.datasets),
                        private: false,
                    },
                    &token,
                )?)
                .await?;
            rows.set(r.into_inner().rows.len());
            Ok(())
        }
    })
    .await?;
    let overall_ms = timed(sizes.queries, |_| {
        let mut boards = boards.clone();
        let token = token.clone();
        let rows = &rows[1];
        async move {
            let r = boards
                .overall(authed(
                    OverallRequest {
                        competition: COMPETITION.into(),
                        private: false,
                    },
                    &token,
                )?)
                .await?;
            rows.set(r.into_inner().rows.len());
            Ok(())
        }
    })
    .await?;
    let history_ms = timed(sizes.queries, |_| {
        let mut boards = boards.clone();
        let token = token.clone();
        let rows = &rows[2];
        async move {
            let r = boards
                .history(authed(
                    HistoryRequest {
                        dataset: String::new(),
                    },
                    &token,
                )?)
                .await?;
            rows.set(r.into_inner().entries.len());
            Ok(())
        }
    })
    .await?;
    // A last check that the board is there at all.
    let one = boards
        .board(authed(
            BoardRequest {
                dataset: dataset(0),
                private: false,
            },
            &token,
        )?)
        .await?
        .into_inner();
    let rss_after = crate::soak::rss_kib(pid);
    let split_after = split(pid);

    println!(
        "nsml-bench --large-log: {} scored submissions from {} teams over {} datasets, {} refused admissions",
        sizes.submissions, sizes.teams, sizes.datasets, sizes.decisions
    );
    println!(
        "seeding: appends exactly the events the services append (nsml_submission::seed for each scored submission: \
         requested, admitted, predictions taken, scored; for each refused run the session service's SessionRequested \
         and the quota's AdmissionDenied from its own admission step), through the event store's append; \
         not seeded: the submit sessions' events and the quota's grants and releases of submits"
    );
    println!(
        "seeded {} events in {:.1}s ({:.0}/s); log file {db_mib:.0} MiB",
        seeded.events,
        seeded.secs,
        seeded.events as f64 / seeded.secs.max(1e-9)
    );
    println!("{:<44} {:>10} {:>10}", "measure", "p50", "p99");
    println!(
        "{:<44} {:>9.2}s {:>10}",
        "boot: start -> `nsmld ready at`", ready_s, ""
    );
    println!(
        "{:<44} {:>9.2}s {:>10}",
        "boot: start -> health SERVING", serving_s, ""
    );
    println!(
        "{:<44} {:>10} {:>10}",
        "nsmld RSS after boot / after queries",
        mib(rss_boot),
        mib(rss_after)
    );
    println!(
        "{:<44} {:>10} / {}",
        "  of which own (anon) + log file mapped", split_boot, split_after
    );
    for (label, ms) in [
        (
            format!("Board ({} rows)", one.rows.len().max(rows[0].get())),
            board_ms,
        ),
        (format!("Overall ({} rows)", rows[1].get()), overall_ms),
        (
            format!("History, the team's ({} entries)", rows[2].get()),
            history_ms,
        ),
    ] {
        // The slowest calls, by their place in the run: the first ones, or spread out.
        let mut slowest: Vec<(usize, f64)> = ms.iter().copied().enumerate().collect();
        slowest.sort_by(|a, b| b.1.total_cmp(&a.1));
        let slowest: Vec<String> = slowest
            .iter()
            .take(4)
            .map(|(i, t)| format!("#{i} {t:.1}ms"))
            .collect();
        println!(
            "{:<44} {:>8.2}ms {:>8.2}ms   slowest: {}",
            label,
            pct(ms.clone(), 0.5),
            pct(ms, 0.99),
            slowest.join(", ")
        );
    }
    if sizes.replays > 0 {
        audit_replays(&dep, &member, sizes.replays).await?;
    }
    drop(dep);
    Ok(())
}

/// Times `n` audit replays of every ledger in the log, as the host asks for them (`Replay` with no competition
/// and no team: what `nsml admin audit replay` calls), and prints the median rate: by the service's own time
/// for the replay (what the CLI prints) and by the caller's. Every replay must match every recorded decision.
async fn audit_replays(dep: &Deployment, member: &Client, n: usize) -> anyhow::Result<()> {
    let token = dep.admin_token()?;
    let mut quota = QuotaServiceClient::new(member.channel.clone());
    let (mut service, mut caller) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut last = None;
    for _ in 0..n {
        let t = Instant::now();
        let report = quota
            .replay(authed(ReplayRequest::default(), &token)?)
            .await?
            .into_inner();
        let wall = t.elapsed().as_secs_f64();
        anyhow::ensure!(
            report.mismatches.is_empty() && report.events > 0,
            "the audit replay found {} mismatches in {} ledger events",
            report.mismatches.len(),
            report.events
        );
        service.push(report.events as f64 / (report.elapsed_micros.max(1) as f64 / 1e6));
        caller.push(report.events as f64 / wall.max(1e-9));
        last = Some(report);
    }
    let report = last.context("no replay")?;
    println!(
        "audit replay of every ledger (`Replay` as the host): {} ledger events of {} ledgers, {} decisions, 0 \
         mismatches; median {:.0} events/s in the service (what `nsml admin audit replay` prints), {:.0} events/s \
         as the caller sees it, over {n} replays",
        report.events,
        report.ledgers,
        report.decisions,
        pct(service, 0.5),
        pct(caller, 0.5)
    );
    Ok(())
}
