//! The conformance suite against Postgres: a fresh database per case, dropped afterwards.
//!
//! Set `NSML_TEST_POSTGRES=skip` to skip these tests, or to a URL to use another server.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use nsml_eventstore::conformance::{new_events, postgres_admin_url, with_fresh_postgres};
use nsml_eventstore::{EventStore, ExpectedVersion, OutboxLease, PostgresStore};
use sqlx::{Connection, PgConnection};

/// Runs `test` with the URL of a fresh database, dropped afterwards; does nothing when Postgres tests are off.
async fn on_fresh_database<F, Fut>(test: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(admin) = postgres_admin_url() else {
        eprintln!("NSML_TEST_POSTGRES=skip: not running Postgres tests");
        return;
    };
    with_fresh_postgres(&admin, test).await;
}

async fn run<F>(case: F)
where
    F: FnOnce(Arc<PostgresStore>) -> BoxFuture<'static, ()>,
{
    on_fresh_database(|url| async move {
        let store = PostgresStore::connect(&url).await.expect("connecting");
        case(Arc::new(store.clone())).await;
        store.close().await;
    })
    .await;
}

nsml_eventstore::conformance_suite!(run);

/// Stores with pools of their own stand for processes: appends from all of them stay serialized and gapless.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_stores_on_one_database_serialize_appends() {
    on_fresh_database(|url| async move {
        let mut stores = Vec::new();
        for _ in 0..3 {
            stores.push(Arc::new(
                PostgresStore::connect(&url).await.expect("connect"),
            ));
        }
        stores[0]
            .append("race", ExpectedVersion::Any, new_events("start", 1))
            .await
            .expect("append");
        let mut tasks = Vec::new();
        for i in 0..30 {
            let store = stores[i % 3].clone();
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
        for i in 0..12 {
            let store = stores[i % 3].clone();
            tasks.push(tokio::spawn(async move {
                for r in 0..20 {
                    store
                        .append(
                            &format!("s{}", (i + r) % 4),
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
        assert_eq!(
            stores[1].head_position().await.expect("head"),
            2 + 12 * 20 * 2
        );
        assert_eq!(stores[2].verify_chain().await.expect("verify"), None);
        for store in stores {
            store.close().await;
        }
    })
    .await;
}

/// Of the processes sharing one database, one at a time holds the outbox lease; when it goes, another takes it.
#[tokio::test]
async fn one_process_at_a_time_holds_the_outbox_lease() {
    on_fresh_database(|url| async move {
        let first = PostgresStore::connect(&url).await.expect("connect");
        let second = PostgresStore::connect(&url).await.expect("connect");
        let (first_lease, second_lease) = (first.outbox_lease(), second.outbox_lease());
        assert!(first_lease.held().await, "a free lease is taken");
        assert!(
            !second_lease.held().await,
            "a held lease is not taken twice"
        );
        assert!(first_lease.held().await, "the holder keeps it");

        drop(first_lease);
        first.close().await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !second_lease.held().await {
            assert!(
                Instant::now() < deadline,
                "the lease was not taken over after its holder went"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(second_lease);
        second.close().await;
    })
    .await;
}

/// A database made before the watermark keeps its outbox through the upgrade: the watermark goes just below
/// the oldest event waiting, and the events above it no longer waiting are kept as acknowledged.
#[tokio::test]
async fn the_upgrade_keeps_what_was_waiting() {
    on_fresh_database(|url| async move {
        let mut db = PgConnection::connect(&url).await.expect("connect");
        sqlx::raw_sql(include_str!("../migrations/postgres/0001_event_log.sql"))
            .execute(&mut db)
            .await
            .expect("the original schema");
        // Seven events; 1 to 3 and 5 were published and acknowledged, 4, 6 and 7 wait.
        sqlx::raw_sql(
            "INSERT INTO events (position, stream, version, event_type, payload, metadata, prev_hash, hash) \
             SELECT p, 's', p, 't', '', '{}', '', '' FROM generate_series(1, 7) p; \
             UPDATE log_head SET position = 7; \
             INSERT INTO outbox (position) VALUES (4), (6), (7);",
        )
        .execute(&mut db)
        .await
        .expect("the original outbox");
        sqlx::raw_sql(include_str!("../migrations/postgres/0002_relay_watermark.sql"))
            .execute(&mut db)
            .await
            .expect("upgrade");
        let (relayed, beyond): (i64, Vec<i64>) =
            sqlx::query_as("SELECT relayed, relayed_beyond FROM outbox_watermark")
                .fetch_one(&mut db)
                .await
                .expect("watermark");
        assert_eq!((relayed, beyond), (3, vec![5]));
        db.close().await.expect("close");
    })
    .await;
}

/// The relay's acknowledgements reach the log together, a little after they were made: the handle that made
/// them passes over their events at once, another handle (another process) once they are written, and closing
/// the handle writes what is still waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_reach_the_log_a_little_later() {
    on_fresh_database(|url| async move {
        let relay = PostgresStore::connect(&url).await.expect("connect");
        let other = PostgresStore::connect(&url).await.expect("connect");
        relay
            .append("acks", ExpectedVersion::Any, new_events("a", 6))
            .await
            .expect("append");
        let waiting = |store: &PostgresStore| {
            let store = store.clone();
            async move {
                let events = store.outbox_peek(100).await.expect("peek");
                events.iter().map(|e| e.position).collect::<Vec<u64>>()
            }
        };
        relay.outbox_ack(&[1, 2, 3]).await.expect("ack");
        assert_eq!(waiting(&relay).await, [4, 5, 6], "the relay's own handle");
        let deadline = Instant::now() + Duration::from_secs(60);
        while waiting(&other).await != [4, 5, 6] {
            assert!(
                Instant::now() < deadline,
                "the acknowledgements were not written"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Out of order, then closed before the delay is up: what is waiting is written by the close.
        relay.outbox_ack(&[6]).await.expect("ack");
        relay.outbox_ack(&[4]).await.expect("ack");
        assert_eq!(waiting(&relay).await, [5]);
        relay.close().await;
        assert_eq!(waiting(&other).await, [5], "written when the handle closed");
        assert!(relay.outbox_ack(&[5]).await.is_err(), "a closed handle");
        other.close().await;
    })
    .await;
}
