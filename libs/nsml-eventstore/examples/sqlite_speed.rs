//! Measures the SQLite log: appends per second for one sequential writer and for 16 concurrent writers, and
//! `read_all` throughput over a million stored events. Each figure is the median of three runs.
//!
//! `cargo run --release -p nsml-eventstore --example sqlite_speed [EVENTS_TO_READ]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use nsml_eventstore::{EventStore, ExpectedVersion, Metadata, NewEvent, SqliteStore};

/// Sequential single-event appends per run.
const SEQUENTIAL_APPENDS: usize = 5_000;
/// Concurrent writers, each appending to a stream of its own.
const WRITERS: usize = 16;
/// Single-event appends per writer per run.
const APPENDS_PER_WRITER: usize = 1_000;
/// Events stored before the read runs, unless given on the command line.
const STORED_EVENTS: usize = 1_000_000;
/// Events per `read_all` page.
const PAGE: usize = 10_000;
/// Events per append while filling the log for the read runs.
const FILL_BATCH: usize = 1_000;
const RUNS: usize = 3;

fn event(i: usize) -> NewEvent {
    NewEvent {
        event_type: "nsml.v1.QuotaReserved".to_owned(),
        payload: format!("\n\x04acme\x12\x06t1-cls\x18{i}\x20\x7f\x08 reservation {i:08}")
            .into_bytes(),
        metadata: Metadata {
            event_id: uuid::Uuid::now_v7().to_string(),
            command_id: uuid::Uuid::now_v7().to_string(),
            correlation_id: uuid::Uuid::now_v7().to_string(),
            causation_id: String::new(),
            actor: "service:quota".to_owned(),
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
            recorded_at_ms: chrono::Utc::now().timestamp_millis(),
            schema_version: 1,
        },
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn per_second(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

async fn sequential(dir: &std::path::Path, run: usize) -> anyhow::Result<f64> {
    let store = SqliteStore::open(&dir.join(format!("sequential-{run}.db"))).await?;
    let started = Instant::now();
    for i in 0..SEQUENTIAL_APPENDS {
        store
            .append("sequential", ExpectedVersion::Any, vec![event(i)])
            .await?;
    }
    let rate = per_second(SEQUENTIAL_APPENDS, started.elapsed());
    store.close().await;
    Ok(rate)
}

async fn concurrent(dir: &std::path::Path, run: usize) -> anyhow::Result<f64> {
    let store = Arc::new(SqliteStore::open(&dir.join(format!("concurrent-{run}.db"))).await?);
    let started = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let stream = format!("writer-{w}");
                for i in 0..APPENDS_PER_WRITER {
                    store
                        .append(&stream, ExpectedVersion::Exact(i as u64), vec![event(i)])
                        .await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for writer in writers {
        writer.await??;
    }
    let rate = per_second(WRITERS * APPENDS_PER_WRITER, started.elapsed());
    store.close().await;
    Ok(rate)
}

async fn fill(store: &SqliteStore, events: usize) -> anyhow::Result<()> {
    let mut stored = 0;
    while stored < events {
        let n = FILL_BATCH.min(events - stored);
        let batch = (stored..stored + n).map(event).collect();
        store
            .append(
                &format!("fill-{}", stored / FILL_BATCH % 100),
                ExpectedVersion::Any,
                batch,
            )
            .await?;
        stored += n;
    }
    Ok(())
}

async fn read_everything(store: &SqliteStore, events: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut after = 0;
    let mut read = 0;
    loop {
        let page = store.read_all(after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.position;
        read += page.len();
        if page.len() < PAGE {
            break;
        }
    }
    anyhow::ensure!(read == events, "read {read} events, expected {events}");
    Ok(per_second(read, started.elapsed()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let stored_events = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => STORED_EVENTS,
    };
    let dir = tempfile::tempdir()?;

    let mut rates = Vec::new();
    for run in 0..RUNS {
        rates.push(sequential(dir.path(), run).await?);
    }
    println!(
        "sequential single-event appends, 1 writer:        {:>10.0} appends/s",
        median(rates)
    );

    let mut rates = Vec::new();
    for run in 0..RUNS {
        rates.push(concurrent(dir.path(), run).await?);
    }
    println!(
        "single-event appends, {WRITERS} concurrent writers:    {:>10.0} appends/s",
        median(rates)
    );

    let store = SqliteStore::open(&dir.path().join("read.db")).await?;
    let started = Instant::now();
    fill(&store, stored_events).await?;
    eprintln!(
        "stored {stored_events} events in batches of {FILL_BATCH} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let mut rates = Vec::new();
    for _ in 0..RUNS {
        rates.push(read_everything(&store, stored_events).await?);
    }
    println!(
        "read_all over {stored_events} events, page {PAGE}:     {:>10.0} events/s",
        median(rates)
    );
    store.close().await;
    Ok(())
}
