//! The SQLite store's writer thread: `close` stops it and later calls fail, dropping the last clone stops it.
//!
//! One test in a binary of its own, so that no other test's stores are counted among the writer threads.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use nsml_eventstore::conformance::new_events;
use nsml_eventstore::{EventStore, ExpectedVersion, SqliteStore, StoreError};

/// How many writer threads this process has, by the name the store gives them.
#[cfg(target_os = "linux")]
fn writer_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("listing threads")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim_end() == "nsml-log-writer")
        .count()
}

#[cfg(not(target_os = "linux"))]
fn writer_threads() -> usize {
    0
}

fn assert_closed<T: std::fmt::Debug>(result: Result<T, StoreError>) {
    match result {
        Err(StoreError::Closed) => {}
        other => panic!("expected the store to be closed, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_or_dropping_the_store_stops_its_writer() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let linux = cfg!(target_os = "linux");

    // Calls after `close` fail, on every clone, for both kinds of store.
    for store in [
        SqliteStore::open(&dir.path().join("closed.db"))
            .await
            .expect("open"),
        SqliteStore::in_memory().await.expect("open"),
    ] {
        store
            .append("s", ExpectedVersion::Any, new_events("s", 1))
            .await
            .expect("append");
        let clone = store.clone();
        store.close().await;
        assert_closed(
            clone
                .append("s", ExpectedVersion::Any, new_events("s", 1))
                .await,
        );
        assert_closed(clone.read_all(0, 10).await);
        assert_closed(clone.stream_version("s").await);
        assert_closed(store.save_checkpoint("c", 1).await);
        assert_closed(store.verify_chain().await);
        store.close().await;
    }
    // A closed file can be opened again and holds what was appended.
    let reopened = SqliteStore::open(&dir.path().join("closed.db"))
        .await
        .expect("reopen");
    assert_eq!(reopened.head_position().await.expect("head"), 1);
    drop(reopened);
    if linux {
        assert_eq!(writer_threads(), 0);
    }

    // Dropping the last clone ends the thread.
    let mut stores = Vec::new();
    for i in 0..100 {
        let store = if i % 2 == 0 {
            SqliteStore::open(&dir.path().join(format!("{i}.db")))
                .await
                .expect("open")
        } else {
            SqliteStore::in_memory().await.expect("open")
        };
        store
            .append("s", ExpectedVersion::Any, new_events("s", 1))
            .await
            .expect("append");
        stores.push((store.clone(), store));
    }
    if linux {
        assert_eq!(writer_threads(), 100);
    }
    for (store, clone) in stores {
        drop(store);
        clone.read_all(0, 1).await.expect("the clone still works");
    }
    if linux {
        assert_eq!(writer_threads(), 0);
    }
}
