//! The SQLite log's write-ahead log keeps starting again under a steady stream of appends, instead of growing
//! for as long as the appends go on.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nsml_eventstore::conformance::new_events;
use nsml_eventstore::{EventStore, ExpectedVersion, SqliteStore};

/// The write-ahead log's checkpoint sequence number (bytes 12..16 of its header, big-endian): SQLite adds one
/// each time the log starts again from its beginning.
fn restarts(wal: &Path) -> Option<u32> {
    let mut header = [0u8; 16];
    std::fs::File::open(wal)
        .ok()?
        .read_exact(&mut header)
        .ok()?;
    Some(u32::from_be_bytes(header[12..16].try_into().ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_ahead_log_starts_again_while_appends_never_pause() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("log.db");
    let store = SqliteStore::open(&path).await.expect("open");
    let wal = dir.path().join("log.db-wal");
    store
        .append("warm-up", ExpectedVersion::Any, new_events("warm-up", 1))
        .await
        .expect("append");
    let first = restarts(&wal).expect("the log has a write-ahead log");

    // Enough appenders that the writer always has the next batch waiting: the checkpointer never finds it idle.
    let running = Arc::new(AtomicBool::new(true));
    let appenders: Vec<_> = (0..16)
        .map(|i| {
            let (store, running) = (store.clone(), running.clone());
            tokio::spawn(async move {
                let stream = format!("s-{i}");
                while running.load(Ordering::Relaxed) {
                    store
                        .append(&stream, ExpectedVersion::Any, new_events(&stream, 1))
                        .await
                        .expect("append");
                }
            })
        })
        .collect();

    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut seen, mut largest) = (0, 0);
    while Instant::now() < deadline && seen < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if let Some(now) = restarts(&wal) {
            seen = now.wrapping_sub(first);
        }
        largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
    }
    running.store(false, Ordering::Relaxed);
    for appender in appenders {
        appender.await.expect("appender");
    }
    let events = store.read_all(0, u32::MAX as usize).await.expect("read");
    assert!(
        seen >= 2,
        "the write-ahead log started again {seen} times in a minute of appends ({} events); it grew to {largest} bytes",
        events.len()
    );
    // Every append survived the restarts, in order.
    assert!(
        events
            .windows(2)
            .all(|w| w[1].position == w[0].position + 1)
    );
    assert_eq!(store.verify_chain().await.expect("verify"), None);
    store.close().await;
}
