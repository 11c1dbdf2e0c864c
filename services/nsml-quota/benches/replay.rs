//! Replay speed over a generated ledger of 1,000,000 events (`NSML_BENCH_EVENTS` to change it): first pure
//! (decode, re-derive every decision, fold; no IO), then through a SQLite store: the read alone (the ledgers
//! scanned in pages, nothing replayed), and the replay read the way `audit replay` reads it (every ledger, and
//! the team's stream alone). Prints each run and the median, with events per CPU-second of the process (every
//! thread), which a busy machine changes less than the wall-clock rate.
//!
//! `cargo bench -p nsml-quota --bench replay` (add `-- --memory-only` to skip the store). With
//! `NSML_BENCH_LOG=PATH` it replays a copy of a platform's SQLite log instead (`nsml.db` of a stopped
//! `nsmld up`), as `nsml admin audit replay` does.

use std::time::Instant;

use nsml_eventstore::{EventStore, ExpectedVersion, SqliteStore};
use nsml_quota::domain::LEDGER_PREFIX;
use nsml_quota::replay::{Report, Scope, replay_ledger};
use nsml_quota::{audit, synthetic};

const RUNS: usize = 5;

/// Replays of a given log (`NSML_BENCH_LOG`): short, so more of them.
const LOG_RUNS: usize = 21;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// CPU time this thread has used (Linux: `/proc/thread-self/stat`, in 10 ms ticks), so that a run on a busy
/// machine can be told apart from a slow one.
fn thread_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// CPU time the whole process has used (every thread: the replay and the store's readers), as above.
fn process_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Events per CPU-second of the process between `before` and now, when both are known.
fn per_process_cpu(n: usize, before: Option<f64>) -> Option<f64> {
    let cpu = process_cpu_secs().zip(before).map(|(b, a)| b - a)?;
    (cpu > 0.0).then(|| n as f64 / cpu)
}

fn median(mut rates: Vec<f64>) -> f64 {
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

/// `, N per CPU-second` (the median), or nothing when the CPU time could not be read.
fn per_cpu_second(cpu_rates: Vec<f64>) -> String {
    if cpu_rates.is_empty() {
        String::new()
    } else {
        format!(", {:.0} per CPU-second", median(cpu_rates))
    }
}

fn check(report: &Report, n: usize) {
    assert_eq!(report.events, n as u64, "every event replayed");
    assert!(
        report.mismatches.is_empty(),
        "a generated ledger replays without mismatches: {:?}",
        report.mismatches.first()
    );
}

/// Replays every ledger of a copy of the SQLite log at `path` (a platform's `nsml.db`) as `audit replay`
/// does, `LOG_RUNS` times, and prints the median rate in ledger events per second, the figure `nsml admin audit
/// replay` prints, without the RPC around it.
fn replay_log(path: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let copy = dir.path().join("nsml.db");
    std::fs::copy(path, &copy)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let store = SqliteStore::open(&copy).await?;
        let logged = store.head_position().await?;
        let (mut rates, mut cpu_rates) = (Vec::new(), Vec::new());
        for run in 1..=LOG_RUNS {
            let cpu = process_cpu_secs();
            let started = Instant::now();
            let report = audit::replay(&store as &dyn EventStore, &Scope::default(), None).await?;
            let secs = started.elapsed().as_secs_f64();
            let per_cpu = per_process_cpu(report.events as usize, cpu);
            let rate = report.events as f64 / secs;
            println!(
                "{}, run {run}: {} ledger events of {logged} in the log, {} ledgers, {} mismatches, in {:.1} ms = {rate:.0} events/s{}",
                path.display(),
                report.events,
                report.ledgers,
                report.mismatches.len(),
                secs * 1e3,
                per_cpu.map_or(String::new(), |r| format!(" ({r:.0} per CPU-second)"))
            );
            rates.push(rate);
            cpu_rates.extend(per_cpu);
        }
        println!(
            "replay of {}: median {:.0} events/s over {LOG_RUNS} runs{}",
            path.display(),
            median(rates),
            per_cpu_second(cpu_rates)
        );
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if let Some(path) = std::env::var_os("NSML_BENCH_LOG") {
        return replay_log(path.as_ref());
    }
    let n: usize = std::env::var("NSML_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let memory_only = std::env::args().any(|a| a == "--memory-only");
    let started = Instant::now();
    let events = synthetic::ledger("bench", n, 42);
    println!(
        "generated a ledger of {n} events in {:.2}s",
        started.elapsed().as_secs_f64()
    );

    let mut rates = Vec::new();
    let mut cpu_rates = Vec::new();
    for run in 1..=RUNS {
        let cpu = thread_cpu_secs();
        let started = Instant::now();
        let mut report = Report::default();
        replay_ledger("bench", &events, &Scope::default(), &mut report);
        let secs = started.elapsed().as_secs_f64();
        let cpu = thread_cpu_secs().zip(cpu).map(|(b, a)| b - a);
        check(&report, n);
        let rate = n as f64 / secs;
        let per_cpu = cpu.filter(|c| *c > 0.0).map(|c| n as f64 / c);
        println!(
            "in memory, run {run}: {n} events ({} decisions, {} matched) in {secs:.3}s = {rate:.0} events/s{}",
            report.decisions,
            report.matched,
            per_cpu.map_or(String::new(), |r| format!(" ({r:.0} per CPU-second)"))
        );
        rates.push(rate);
        cpu_rates.extend(per_cpu);
    }
    println!(
        "replay in memory: median {:.0} events/s over {RUNS} runs{}",
        median(rates),
        per_cpu_second(cpu_rates)
    );
    if memory_only {
        return Ok(());
    }

    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let dir = tempfile::tempdir()?;
        let store = SqliteStore::open(&dir.path().join("bench.db")).await?;
        let started = Instant::now();
        for (i, chunk) in events.chunks(1000).enumerate() {
            let expected = if i == 0 {
                ExpectedVersion::NoStream
            } else {
                ExpectedVersion::Exact((i * 1000) as u64)
            };
            store
                .append("quota-bench", expected, synthetic::to_append(chunk))
                .await?;
        }
        println!(
            "stored the ledger in SQLite in {:.2}s",
            started.elapsed().as_secs_f64()
        );
        // The read alone, page by page as the replay scans the ledgers, without replaying anything.
        let mut rates = Vec::new();
        let mut cpu_rates = Vec::new();
        for run in 1..=3 {
            let cpu = process_cpu_secs();
            let started = Instant::now();
            let mut read = 0;
            let mut after: Option<(std::sync::Arc<str>, u64)> = None;
            loop {
                let from = after.as_ref().map(|(s, v)| (&**s, *v));
                let page = store.scan_streams(LEDGER_PREFIX, from, 10_000).await?;
                read += page.len();
                match page.last() {
                    Some(last) if page.len() == 10_000 => {
                        after = Some((last.stream.clone(), last.version));
                    }
                    _ => break,
                }
            }
            let secs = started.elapsed().as_secs_f64();
            assert_eq!(read, n, "every event read");
            let rate = n as f64 / secs;
            let per_cpu = per_process_cpu(n, cpu);
            println!(
                "SQLite, read only, run {run}: {secs:.3}s = {rate:.0} events/s{}",
                per_cpu.map_or(String::new(), |r| format!(" ({r:.0} per CPU-second)"))
            );
            rates.push(rate);
            cpu_rates.extend(per_cpu);
        }
        println!(
            "read from SQLite, no replay: median {:.0} events/s over 3 runs{}",
            median(rates),
            per_cpu_second(cpu_rates)
        );
        for (label, team) in [("whole log", None), ("team stream", Some("bench"))] {
            let mut rates = Vec::new();
            let mut cpu_rates = Vec::new();
            for run in 1..=3 {
                let cpu = process_cpu_secs();
                let started = Instant::now();
                let report =
                    audit::replay(&store as &dyn EventStore, &Scope::default(), team).await?;
                let secs = started.elapsed().as_secs_f64();
                let per_cpu = per_process_cpu(n, cpu);
                check(&report, n);
                let rate = n as f64 / secs;
                println!(
                    "SQLite, {label}, run {run}: {secs:.3}s = {rate:.0} events/s{}",
                    per_cpu.map_or(String::new(), |r| format!(" ({r:.0} per CPU-second)"))
                );
                rates.push(rate);
                cpu_rates.extend(per_cpu);
            }
            println!(
                "replay from SQLite ({label}): median {:.0} events/s over 3 runs{}",
                median(rates),
                per_cpu_second(cpu_rates)
            );
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}
