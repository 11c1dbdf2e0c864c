//! The conformance suite against SQLite: a database file in a temporary directory per case, and in memory.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::sync::Arc;

use futures::future::BoxFuture;
use nsml_eventstore::conformance::{self, Tamper, new_events};
use nsml_eventstore::{EventStore, ExpectedVersion, SqliteStore, StoreError};

async fn run<F>(case: F)
where
    F: FnOnce(Arc<SqliteStore>) -> BoxFuture<'static, ()>,
{
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = SqliteStore::open(&dir.path().join("log.db"))
        .await
        .expect("opening the store");
    case(Arc::new(store.clone())).await;
    store.close().await;
}

nsml_eventstore::conformance_suite!(run);

mod in_memory {
    use super::*;

    pub(super) async fn run<F>(case: F)
    where
        F: FnOnce(Arc<SqliteStore>) -> BoxFuture<'static, ()>,
    {
        let store = SqliteStore::in_memory().await.expect("opening the store");
        case(Arc::new(store)).await;
    }

    nsml_eventstore::conformance_suite!(run);
}

/// Two stores on one file stand for two processes: `BEGIN IMMEDIATE` serializes their appends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_stores_on_one_file_serialize_appends() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("log.db");
    let a = Arc::new(SqliteStore::open(&path).await.expect("open"));
    let b = Arc::new(SqliteStore::open(&path).await.expect("open"));
    a.append("race", ExpectedVersion::Any, new_events("start", 1))
        .await
        .expect("append");

    let mut tasks = Vec::new();
    for (i, store) in [a.clone(), b.clone()]
        .into_iter()
        .cycle()
        .take(20)
        .enumerate()
    {
        tasks.push(tokio::spawn(async move {
            store
                .append(
                    "race",
                    ExpectedVersion::Exact(1),
                    new_events(&format!("w{i}"), 1),
                )
                .await
        }));
    }
    let mut wins = 0;
    for task in tasks {
        match task.await.expect("task") {
            Ok(_) => wins += 1,
            Err(e) => assert!(e.is_conflict(), "unexpected error: {e}"),
        }
    }
    assert_eq!(wins, 1);

    let mut tasks = Vec::new();
    for (i, store) in [a.clone(), b.clone()]
        .into_iter()
        .cycle()
        .take(8)
        .enumerate()
    {
        tasks.push(tokio::spawn(async move {
            for r in 0..25 {
                store
                    .append(
                        &format!("s{}", r % 3),
                        ExpectedVersion::Any,
                        new_events(&format!("{i}-{r}"), 2),
                    )
                    .await
                    .expect("append");
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    assert_eq!(b.head_position().await.expect("head"), 2 + 8 * 25 * 2);
    assert_eq!(a.verify_chain().await.expect("verify"), None);
    let _ = conformance::new_event("x", b"");
}

/// Appends that the database rejects (here a trigger refuses one stream) fail alone: the appends committed in the
/// same transactions beside them are stored.
async fn rejected_appends_fail_alone(store: Arc<SqliteStore>) {
    store
        .execute_sql(
            "CREATE TRIGGER poison BEFORE INSERT ON events WHEN NEW.stream LIKE 'poison-%' \
             BEGIN SELECT RAISE(ABORT, 'poisoned stream'); END;",
        )
        .await
        .expect("trigger");
    let writers = 200;
    let answers = conformance::all_at_once(writers, |i| {
        let store = store.clone();
        async move {
            let stream = if i % 5 == 0 {
                format!("poison-{i}")
            } else {
                format!("own-{i}")
            };
            let result = store
                .append(&stream, ExpectedVersion::NoStream, new_events("e", 2))
                .await;
            (stream, result)
        }
    })
    .await;
    for answer in answers {
        match answer {
            (stream, Ok(appended)) => {
                assert!(stream.starts_with("own-"), "{stream} was stored");
                assert_eq!(appended.version, 2);
            }
            (stream, Err(err @ StoreError::Sqlite(_))) if stream.starts_with("poison-") => {
                assert!(err.to_string().contains("poisoned stream"), "{err}")
            }
            (stream, Err(err)) => panic!("unexpected error for {stream}: {err}"),
        }
    }
    let stored = writers - writers / 5;
    assert_eq!(
        store.head_position().await.expect("head"),
        2 * stored as u64
    );
    assert_eq!(store.stream_version("poison-0").await.expect("version"), 0);
    assert_eq!(store.verify_chain().await.expect("verify"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejected_appends_fail_alone_in_a_file() {
    run(|store| Box::pin(rejected_appends_fail_alone(store))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejected_appends_fail_alone_in_memory() {
    in_memory::run(|store| Box::pin(rejected_appends_fail_alone(store))).await;
}
