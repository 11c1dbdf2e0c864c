//! The conformance suite every backend must pass, and helpers for tests that need a store.
//!
//! Each case is an async function taking a fresh, empty store. [`conformance_suite!`](crate::conformance_suite)
//! turns them into one `#[tokio::test]` each, given a runner that makes the store and cleans up after the case:
//!
//! ```ignore
//! async fn run<F>(case: F)
//! where
//!     F: FnOnce(Arc<SqliteStore>) -> BoxFuture<'static, ()>,
//! {
//!     let dir = tempfile::tempdir().unwrap();
//!     let store = SqliteStore::open(&dir.path().join("log.db")).await.unwrap();
//!     case(Arc::new(store)).await;
//! }
//! nsml_eventstore::conformance_suite!(run);
//! ```
//!
//! Tampering cases edit the tables directly through [`Tamper`], which both backends implement here.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::{FutureExt, StreamExt};

use crate::hash::{ChainBreakKind, event_hash};
use crate::row::{metadata_json, to_i64};
use crate::{
    Chain, EventStore, ExpectedVersion, Metadata, NewEvent, PostgresStore, ScannedEvent,
    SqliteStore, StoreError, StoredEvent, read_all_stream,
};

/// Direct access to a store's tables, bypassing the log's rules; only for tests that tamper with the log.
#[async_trait::async_trait]
pub trait Tamper: EventStore {
    /// Runs SQL statements directly.
    async fn execute_sql(&self, sql: &str) -> Result<(), StoreError>;

    /// Overwrites the stored payload of the event at `position`.
    async fn overwrite_payload(&self, position: u64, payload: &[u8]) -> Result<(), StoreError>;
}

/// Runs on the store's write connection, between append batches (for a log in memory, its only connection).
#[async_trait::async_trait]
impl Tamper for SqliteStore {
    async fn execute_sql(&self, sql: &str) -> Result<(), StoreError> {
        let sql = sql.to_owned();
        self.on_writer(move |connection| Ok(connection.execute_batch(&sql)?))
            .await
    }

    async fn overwrite_payload(&self, position: u64, payload: &[u8]) -> Result<(), StoreError> {
        let payload = payload.to_vec();
        self.on_writer(move |connection| {
            connection.execute(
                "UPDATE events SET payload = ?1 WHERE position = ?2",
                rusqlite::params![payload, to_i64(position)],
            )?;
            Ok(())
        })
        .await
    }
}

#[async_trait::async_trait]
impl Tamper for PostgresStore {
    async fn execute_sql(&self, sql: &str) -> Result<(), StoreError> {
        sqlx::raw_sql(sql).execute(&self.pool).await?;
        Ok(())
    }

    async fn overwrite_payload(&self, position: u64, payload: &[u8]) -> Result<(), StoreError> {
        sqlx::query("UPDATE events SET payload = $1 WHERE position = $2")
            .bind(payload)
            .bind(to_i64(position))
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// Generates one `#[tokio::test]` per conformance case.
///
/// `$run` is an async function `run(case)` where `case: FnOnce(Arc<Store>) -> BoxFuture<'static, ()>`: it makes a
/// fresh, empty store, awaits `case(store)`, and cleans up. The calling crate needs `tokio` (with `macros` and
/// `rt-multi-thread`) among its dev-dependencies.
#[macro_export]
macro_rules! conformance_suite {
    ($run:path) => {
        $crate::conformance_suite!(@cases $run;
            append_and_read_stream,
            read_all_in_position_order,
            read_all_stream_pages_through_the_log,
            scan_streams_reads_only_the_streams_named,
            read_all_of_types_reads_only_the_types_named,
            stream_version_and_head_position,
            expected_version_rules,
            conflict_message_names_stream_and_versions,
            multi_event_append_is_atomic,
            empty_append_checks_version_and_stores_nothing,
            stream_version_clash_is_recognized,
            concurrent_appends_with_same_expected_version_one_wins,
            concurrent_appends_keep_positions_and_versions_gapless,
            concurrent_appends_are_answered_each_on_its_own,
            chained_appends_stop_at_the_first_failure,
            outbox_peek_and_ack,
            checkpoints,
            verify_clean_log,
            verify_detects_edited_payload,
            verify_detects_edited_metadata,
            verify_detects_edited_type,
            verify_detects_deleted_event,
            verify_detects_deleted_last_event,
            verify_detects_reordered_events,
            verify_detects_inserted_event,
            verify_detects_event_added_after_head,
        );
    };
    (@cases $run:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                $run(|store| ::std::boxed::Box::pin($crate::conformance::$case(store))).await;
            }
        )*
    };
}

/// A new event with a fresh UUID v7 id and the current time.
pub fn new_event(event_type: &str, payload: &[u8]) -> NewEvent {
    NewEvent {
        event_type: event_type.to_owned(),
        payload: payload.to_vec(),
        metadata: Metadata {
            event_id: uuid::Uuid::now_v7().to_string(),
            command_id: uuid::Uuid::now_v7().to_string(),
            correlation_id: "corr-1".to_owned(),
            causation_id: String::new(),
            actor: "user:alice".to_owned(),
            traceparent: String::new(),
            recorded_at_ms: chrono::Utc::now().timestamp_millis(),
            schema_version: 1,
        },
    }
}

/// `n` distinct events of type `nsml.v1.TestEvent`, with payloads `{tag}-0`, `{tag}-1`, ...
pub fn new_events(tag: &str, n: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|i| new_event("nsml.v1.TestEvent", format!("{tag}-{i}").as_bytes()))
        .collect()
}

/// The Postgres server tests use, from `NSML_TEST_POSTGRES`: unset or empty means
/// `postgres://postgres@127.0.0.1:5432/postgres`, `skip` means no Postgres (returns `None`), anything else is the
/// URL of a database on the server to connect to for creating and dropping test databases.
pub fn postgres_admin_url() -> Option<String> {
    match std::env::var("NSML_TEST_POSTGRES") {
        Ok(v) if v == "skip" => None,
        Ok(v) if !v.trim().is_empty() => Some(v),
        _ => Some("postgres://postgres@127.0.0.1:5432/postgres".to_owned()),
    }
}

/// A fresh database (`nsml_test_<uuid>`) on a Postgres server, for one test.
#[derive(Debug)]
pub struct TestDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl TestDatabase {
    /// Creates a database with a new unique name on the server of `admin_url`.
    pub async fn create(admin_url: &str) -> Result<Self, StoreError> {
        let name = format!("nsml_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = connect_admin(admin_url).await?;
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        sqlx::Connection::close(admin).await?;
        let url = database_url(admin_url, &name);
        Ok(TestDatabase {
            admin_url: admin_url.to_owned(),
            name,
            url,
        })
    }

    /// The URL of the new database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The new database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Drops the database, closing whatever connections are still open to it.
    pub async fn drop_database(self) -> Result<(), StoreError> {
        let mut admin = connect_admin(&self.admin_url).await?;
        sqlx::raw_sql(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut admin)
        .await?;
        sqlx::Connection::close(admin).await?;
        Ok(())
    }
}

async fn connect_admin(admin_url: &str) -> Result<sqlx::PgConnection, StoreError> {
    Ok(<sqlx::PgConnection as sqlx::Connection>::connect(admin_url).await?)
}

/// `admin_url` with its database name replaced by `name`.
fn database_url(admin_url: &str, name: &str) -> String {
    let (base, query) = match admin_url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (admin_url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let server = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{server}/{name}?{query}"),
        None => format!("{server}/{name}"),
    }
}

/// Runs `test` with the URL of a fresh database on the server of `admin_url`, then drops the database, also
/// when `test` panics (the panic then continues).
pub async fn with_fresh_postgres<F, Fut>(admin_url: &str, test: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let db = TestDatabase::create(admin_url)
        .await
        .unwrap_or_else(|e| panic!("creating a test database on {admin_url}: {e}"));
    let outcome = AssertUnwindSafe(test(db.url().to_owned()))
        .catch_unwind()
        .await;
    let name = db.name().to_owned();
    if let Err(e) = db.drop_database().await {
        eprintln!("dropping test database {name}: {e}");
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

fn exact_conflict(result: Result<crate::Appended, StoreError>) -> (ExpectedVersion, u64) {
    match result {
        Err(StoreError::Conflict {
            expected, actual, ..
        }) => (expected, actual),
        other => panic!("expected a version conflict, got {other:?}"),
    }
}

async fn all_events<S: EventStore>(store: &S) -> Vec<StoredEvent> {
    read_all_stream(store, 0)
        .map(|e| e.expect("reading the log"))
        .collect()
        .await
}

/// Appends `n` events with the same metadata JSON shape to three interleaved streams; returns all of them.
async fn seed<S: EventStore>(store: &S, n: usize) -> Vec<StoredEvent> {
    for i in 0..n {
        let stream = format!("seed-{}", i % 3);
        store
            .append(
                &stream,
                ExpectedVersion::Any,
                vec![new_event(
                    "nsml.v1.Seeded",
                    format!("payload-{i}").as_bytes(),
                )],
            )
            .await
            .expect("seeding");
    }
    all_events(store).await
}

async fn expect_break<S: EventStore>(store: &S, position: u64, kind: ChainBreakKind) {
    let found = store
        .verify_chain()
        .await
        .expect("verifying")
        .unwrap_or_else(|| panic!("tampering at position {position} was not detected"));
    assert_eq!(
        (found.position, found.kind),
        (position, kind),
        "wrong break: {found}"
    );
}

/// Appends to two streams and reads each back in version order, after any version.
pub async fn append_and_read_stream<S: Tamper>(store: Arc<S>) {
    let a = new_events("a", 3);
    let appended = store
        .append("quota-acme", ExpectedVersion::NoStream, a.clone())
        .await
        .expect("append");
    assert_eq!(appended.version, 3);
    assert_eq!((appended.first_position, appended.last_position), (1, 3));
    store
        .append("quota-other", ExpectedVersion::Any, new_events("b", 2))
        .await
        .expect("append");
    let read = store.read_stream("quota-acme", 0).await.expect("read");
    assert_eq!(read.len(), 3);
    for (i, (stored, new)) in read.iter().zip(&a).enumerate() {
        assert_eq!(stored.stream, "quota-acme");
        assert_eq!(stored.version, i as u64 + 1);
        assert_eq!(stored.position, i as u64 + 1);
        assert_eq!(stored.event_type, new.event_type);
        assert_eq!(stored.payload, new.payload);
        assert_eq!(stored.metadata, new.metadata);
        assert_eq!(stored.hash.len(), 64);
    }
    let tail = store.read_stream("quota-acme", 2).await.expect("read");
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0].version, 3);
    assert!(
        store
            .read_stream("quota-acme", 3)
            .await
            .expect("read")
            .is_empty()
    );
    assert!(
        store
            .read_stream("missing", 0)
            .await
            .expect("read")
            .is_empty()
    );
    // In pages: the same events, a page at a time, none of the other stream's.
    let first = store
        .read_stream_page("quota-acme", 0, 2)
        .await
        .expect("read");
    let rest = store
        .read_stream_page("quota-acme", 2, 2)
        .await
        .expect("read");
    let versions: Vec<u64> = first.iter().chain(&rest).map(|e| e.version).collect();
    assert_eq!(versions, vec![1, 2, 3]);
    assert_eq!(first.iter().chain(&rest).cloned().collect::<Vec<_>>(), read);
}

/// Reads the whole log in position order, with `after_position` and `limit`.
pub async fn read_all_in_position_order<S: Tamper>(store: Arc<S>) {
    let all = seed(&*store, 10).await;
    assert_eq!(all.len(), 10);
    let page = store.read_all(0, 4).await.expect("read");
    assert_eq!(
        page.iter().map(|e| e.position).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    let page = store.read_all(4, 100).await.expect("read");
    assert_eq!(
        page.iter().map(|e| e.position).collect::<Vec<_>>(),
        [5, 6, 7, 8, 9, 10]
    );
    assert_eq!(page[0], all[4]);
    assert!(store.read_all(10, 100).await.expect("read").is_empty());
    assert!(store.read_all(0, 0).await.expect("read").is_empty());
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.position, i as u64 + 1);
        assert_eq!(e.stream, format!("seed-{}", i % 3));
        assert_eq!(e.version, (i / 3) as u64 + 1);
        assert_eq!(e.payload, format!("payload-{i}").into_bytes());
    }
}

/// `scan_streams` reads what `read_all` reads of the streams whose names start with the prefix, stream by
/// stream (each stream's events together, in version order), and the same in pages of any size.
pub async fn scan_streams_reads_only_the_streams_named<S: Tamper>(store: Arc<S>) {
    let streams = [
        "quota-a",
        "sessions-a",
        "quota-b",
        "quota",
        "quota-a",
        "xquota-a",
        "quota-é",
        "quota-a",
        "quota.",
        "quotb-a",
        "quota-\u{10FFFF}",
    ];
    for (i, stream) in streams.into_iter().enumerate() {
        store
            .append(
                stream,
                ExpectedVersion::Any,
                new_events(&format!("e{i}"), 2),
            )
            .await
            .expect("append");
    }
    let all = store.read_all(0, 100).await.expect("read");
    assert_eq!(all.len(), 22);
    for prefix in [
        "quota-",
        "quota",
        "",
        "sessions-a",
        "quota-é",
        "quota-\u{10FFFF}",
        "\u{10FFFF}",
        "nothing",
    ] {
        let mut expected: Vec<ScannedEvent> = all
            .iter()
            .filter(|e| e.stream.starts_with(prefix))
            .map(ScannedEvent::from)
            .collect();
        let read = store.scan_streams(prefix, None, 100).await.expect("read");
        // Stream by stream: a stream's events follow one another, in version order, each stream once.
        let mut seen = Vec::<&str>::new();
        for (i, e) in read.iter().enumerate() {
            if i == 0 || read[i - 1].stream != e.stream {
                assert!(!seen.contains(&&*e.stream), "prefix `{prefix}`: {read:?}");
                seen.push(&e.stream);
                assert_eq!(e.version, 1, "prefix `{prefix}`: {read:?}");
            } else {
                assert_eq!(e.version, read[i - 1].version + 1, "prefix `{prefix}`");
            }
        }
        let mut sorted = read.clone();
        sorted.sort_by_key(|e| e.position);
        expected.sort_by_key(|e| e.position);
        assert_eq!(sorted, expected, "prefix `{prefix}`");
        for limit in [1, 3] {
            let mut paged: Vec<ScannedEvent> = Vec::new();
            loop {
                let after = paged.last().map(|e| (&*e.stream, e.version));
                let page = store
                    .scan_streams(prefix, after, limit)
                    .await
                    .expect("read");
                assert!(page.len() <= limit);
                let last = page.len() < limit;
                paged.extend(page);
                if last {
                    break;
                }
            }
            assert_eq!(paged, read, "prefix `{prefix}`, pages of {limit}");
        }
    }
    assert!(
        store
            .scan_streams("quota-", None, 0)
            .await
            .expect("read")
            .is_empty()
    );
    // Read on from a name outside the prefix's, it still reads only the prefix's streams.
    let quota_b = store
        .scan_streams("quota-b", None, 100)
        .await
        .expect("read");
    assert_eq!(quota_b.len(), 2);
    let from_before = store
        .scan_streams("quota-b", Some(("quota-a", 1)), 100)
        .await
        .expect("read");
    assert_eq!(from_before, quota_b);
}

/// `read_all_of_types` reads what `read_all` reads of the types named, in pages, and says how far it looked:
/// through the last event of a full page, through the head otherwise; so does the trait's default.
pub async fn read_all_of_types_reads_only_the_types_named<S: Tamper>(store: Arc<S>) {
    let types = [
        "nsml.v1.A",
        "nsml.v1.B",
        "nsml.v1.A",
        "nsml.v1.C",
        "nsml.v1.AA",
        "nsml.v1.B",
        "nsml.v1.A",
        "nsml.v1.C",
    ];
    for (i, event_type) in types.into_iter().enumerate() {
        store
            .append(
                &format!("s-{}", i % 3),
                ExpectedVersion::Any,
                vec![new_event(event_type, format!("e{i}").as_bytes())],
            )
            .await
            .expect("append");
    }
    let all = store.read_all(0, 100).await.expect("read");
    let head = store.head_position().await.expect("head");
    assert_eq!((all.len(), head), (8, 8));
    let wanted: [&[&str]; 5] = [
        &["nsml.v1.A"],
        &["nsml.v1.B", "nsml.v1.C"],
        &["nsml.v1.A", "nsml.v1.B", "nsml.v1.C", "nsml.v1.AA"],
        &["nsml.v1.Z"],
        &[],
    ];
    for names in wanted {
        let expected: Vec<StoredEvent> = all
            .iter()
            .filter(|e| names.contains(&e.event_type.as_str()))
            .cloned()
            .collect();
        for limit in [1, 2, 100] {
            for backend in [true, false] {
                let (mut read, mut after) = (Vec::new(), 0);
                loop {
                    let page = if backend {
                        store.read_all_of_types(names, after, limit).await
                    } else {
                        crate::read_types_filtered(&*store, names, after, limit).await
                    }
                    .expect("read");
                    assert!(page.events.len() <= limit);
                    assert!(page.through >= after && page.through <= head);
                    assert!(page.events.iter().all(|e| e.position <= page.through));
                    if page.events.len() == limit {
                        assert_eq!(page.through, page.events[limit - 1].position);
                    } else {
                        assert_eq!(
                            page.through, head,
                            "{names:?}, pages of {limit}: a short page reads to the head"
                        );
                    }
                    after = page.through;
                    let last = page.events.len() < limit;
                    read.extend(page.events);
                    if last {
                        break;
                    }
                }
                assert_eq!(
                    read, expected,
                    "{names:?}, pages of {limit}, backend {backend}"
                );
            }
        }
    }
    let past = store
        .read_all_of_types(&["nsml.v1.A"], head + 5, 10)
        .await
        .expect("read past the head");
    assert_eq!((past.events.len(), past.through), (0, head + 5));
}

/// `read_all_stream` goes across page boundaries and stops at the head.
pub async fn read_all_stream_pages_through_the_log<S: Tamper>(store: Arc<S>) {
    let n = crate::READ_PAGE * 2 + 17;
    for chunk in 0..(n / 500 + 1) {
        let count = (n - (chunk * 500).min(n)).min(500);
        if count > 0 {
            store
                .append(
                    "bulk",
                    ExpectedVersion::Any,
                    new_events(&format!("c{chunk}"), count),
                )
                .await
                .expect("append");
        }
    }
    let all = all_events(&*store).await;
    assert_eq!(all.len(), n);
    assert!(
        all.iter()
            .enumerate()
            .all(|(i, e)| e.position == i as u64 + 1)
    );
    let from = crate::READ_PAGE as u64 - 1;
    let tail: Vec<StoredEvent> = read_all_stream(&*store, from)
        .map(|e| e.expect("reading"))
        .collect()
        .await;
    assert_eq!(tail.len() as u64, n as u64 - from);
    assert_eq!(tail[0].position, from + 1);
    let shared: Arc<dyn EventStore> = store.clone();
    let count = crate::read_all_stream_shared(shared, 0).count().await;
    assert_eq!(count, n);
}

/// `stream_version` and `head_position` follow appends.
pub async fn stream_version_and_head_position<S: Tamper>(store: Arc<S>) {
    assert_eq!(store.head_position().await.expect("head"), 0);
    assert_eq!(store.stream_version("s").await.expect("version"), 0);
    store
        .append("s", ExpectedVersion::Any, new_events("s", 2))
        .await
        .expect("append");
    store
        .append("t", ExpectedVersion::Any, new_events("t", 3))
        .await
        .expect("append");
    assert_eq!(store.stream_version("s").await.expect("version"), 2);
    assert_eq!(store.stream_version("t").await.expect("version"), 3);
    assert_eq!(store.head_position().await.expect("head"), 5);
}

/// `Any`, `NoStream` and `Exact`, and that a conflict stores nothing.
pub async fn expected_version_rules<S: Tamper>(store: Arc<S>) {
    let s = "sessions-acme/t1-cls";
    store
        .append(s, ExpectedVersion::NoStream, new_events("1", 1))
        .await
        .expect("no stream on a new stream");
    let (expected, actual) = exact_conflict(
        store
            .append(s, ExpectedVersion::NoStream, new_events("x", 1))
            .await,
    );
    assert_eq!((expected, actual), (ExpectedVersion::NoStream, 1));
    store
        .append(s, ExpectedVersion::Exact(1), new_events("2", 2))
        .await
        .expect("exact");
    let (expected, actual) = exact_conflict(
        store
            .append(s, ExpectedVersion::Exact(1), new_events("x", 1))
            .await,
    );
    assert_eq!((expected, actual), (ExpectedVersion::Exact(1), 3));
    let (_, actual) = exact_conflict(
        store
            .append(s, ExpectedVersion::Exact(4), new_events("x", 1))
            .await,
    );
    assert_eq!(actual, 3);
    let (_, actual) = exact_conflict(
        store
            .append(s, ExpectedVersion::Exact(0), new_events("x", 1))
            .await,
    );
    assert_eq!(actual, 3);
    store
        .append("fresh", ExpectedVersion::Exact(0), new_events("f", 1))
        .await
        .expect("exact 0 on a new stream");
    let appended = store
        .append(s, ExpectedVersion::Any, new_events("3", 1))
        .await
        .expect("any");
    assert_eq!(appended.version, 4);
    assert_eq!(store.head_position().await.expect("head"), 5);
    assert_eq!(store.read_stream(s, 0).await.expect("read").len(), 4);
    assert!(
        all_events(&*store)
            .await
            .iter()
            .all(|e| !e.payload.starts_with(b"x-")),
        "a conflicting append stored events"
    );
    assert_eq!(store.verify_chain().await.expect("verify"), None);
}

/// A conflict's message names the stream, its version and the expectation.
pub async fn conflict_message_names_stream_and_versions<S: Tamper>(store: Arc<S>) {
    store
        .append("quota-acme", ExpectedVersion::Any, new_events("q", 5))
        .await
        .expect("append");
    let err = store
        .append("quota-acme", ExpectedVersion::Exact(4), new_events("x", 1))
        .await
        .expect_err("conflict");
    assert!(err.is_conflict());
    assert_eq!(
        err.to_string(),
        "stream `quota-acme` is at version 5, expected 4"
    );
}

/// All events of one append get consecutive versions and positions, or none is stored.
pub async fn multi_event_append_is_atomic<S: Tamper>(store: Arc<S>) {
    store
        .append("other", ExpectedVersion::Any, new_events("o", 2))
        .await
        .expect("append");
    let appended = store
        .append("multi", ExpectedVersion::NoStream, new_events("m", 5))
        .await
        .expect("append");
    assert_eq!(appended.version, 5);
    assert_eq!((appended.first_position, appended.last_position), (3, 7));
    let read = store.read_stream("multi", 0).await.expect("read");
    assert_eq!(
        read.iter().map(|e| e.version).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(
        read.iter().map(|e| e.position).collect::<Vec<_>>(),
        [3, 4, 5, 6, 7]
    );
    exact_conflict(
        store
            .append("multi", ExpectedVersion::Exact(3), new_events("x", 4))
            .await,
    );
    assert_eq!(store.head_position().await.expect("head"), 7);
    assert_eq!(store.outbox_peek(100).await.expect("peek").len(), 7);
}

/// An empty append checks the expected version but stores nothing.
pub async fn empty_append_checks_version_and_stores_nothing<S: Tamper>(store: Arc<S>) {
    store
        .append("s", ExpectedVersion::Any, new_events("s", 2))
        .await
        .expect("append");
    let appended = store
        .append("s", ExpectedVersion::Exact(2), Vec::new())
        .await
        .expect("empty append");
    assert_eq!(appended.version, 2);
    assert_eq!(appended.first_position, appended.last_position + 1);
    exact_conflict(
        store
            .append("s", ExpectedVersion::Exact(1), Vec::new())
            .await,
    );
    assert_eq!(store.head_position().await.expect("head"), 2);
}

/// The database error of a second event with the same stream and version is recognized as a version clash (so
/// an append hitting it reports a conflict); a clash on position is not.
pub async fn stream_version_clash_is_recognized<S: Tamper>(store: Arc<S>) {
    store
        .append("s", ExpectedVersion::Any, new_events("s", 2))
        .await
        .expect("append");
    let insert = |position: u64, stream: &str, version: u64| {
        format!(
            "INSERT INTO events (position, stream, version, event_type, payload, metadata, prev_hash, hash) \
             SELECT {position}, '{stream}', {version}, event_type, payload, metadata, prev_hash, hash \
             FROM events WHERE position = 1"
        )
    };
    match store.execute_sql(&insert(99, "s", 2)).await {
        Err(e @ (StoreError::Database(_) | StoreError::Sqlite(_))) => assert!(
            crate::error::is_stream_version_clash(&e),
            "not recognized: {e}"
        ),
        other => panic!("expected a unique violation, got {other:?}"),
    }
    match store.execute_sql(&insert(1, "other", 1)).await {
        Err(e @ (StoreError::Database(_) | StoreError::Sqlite(_))) => assert!(
            !crate::error::is_stream_version_clash(&e),
            "a position clash taken for a version clash: {e}"
        ),
        other => panic!("expected a unique violation, got {other:?}"),
    }
}

/// Runs `work(i)` for every `i` below `writers` as tasks that a barrier releases together, so they reach the
/// store at the same moment; returns their results in the order of `i`.
pub async fn all_at_once<T, F, Fut>(writers: usize, work: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let barrier = Arc::new(tokio::sync::Barrier::new(writers));
    let tasks: Vec<_> = (0..writers)
        .map(|i| {
            let (barrier, work) = (barrier.clone(), work(i));
            tokio::spawn(async move {
                barrier.wait().await;
                work.await
            })
        })
        .collect();
    let mut results = Vec::with_capacity(writers);
    for task in tasks {
        results.push(task.await.expect("writer task"));
    }
    results
}

/// Of many concurrent appends with the same expected version, exactly one succeeds.
pub async fn concurrent_appends_with_same_expected_version_one_wins<S: Tamper>(store: Arc<S>) {
    store
        .append("race", ExpectedVersion::Any, new_events("start", 3))
        .await
        .expect("append");
    let answers = all_at_once(24, |i| {
        let store = store.clone();
        async move {
            store
                .append(
                    "race",
                    ExpectedVersion::Exact(3),
                    new_events(&format!("w{i}"), 2),
                )
                .await
        }
    })
    .await;
    let mut wins = 0;
    for answer in answers {
        match answer {
            Ok(appended) => {
                wins += 1;
                assert_eq!(appended.version, 5);
            }
            Err(StoreError::Conflict { actual, .. }) => assert_eq!(actual, 5),
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(wins, 1, "exactly one writer must win");
    assert_eq!(store.stream_version("race").await.expect("version"), 5);
    assert_eq!(store.head_position().await.expect("head"), 5);
    assert_eq!(store.verify_chain().await.expect("verify"), None);
}

/// Many concurrent writers to several streams leave gapless positions and versions and a valid chain.
pub async fn concurrent_appends_keep_positions_and_versions_gapless<S: Tamper>(store: Arc<S>) {
    let writers = 8;
    let rounds = 20;
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut count = 0;
                for r in 0..rounds {
                    let n = 1 + (w + r) % 3;
                    let stream = format!("stream-{}", (w + r) % 4);
                    store
                        .append(
                            &stream,
                            ExpectedVersion::Any,
                            new_events(&format!("{w}-{r}"), n),
                        )
                        .await
                        .expect("append");
                    count += n;
                }
                count
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("writer task");
    }
    let all = all_events(&*store).await;
    assert_eq!(all.len(), total);
    let mut versions: HashMap<&str, u64> = HashMap::new();
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.position, i as u64 + 1, "positions must be gapless");
        let v = versions.entry(e.stream.as_str()).or_default();
        *v += 1;
        assert_eq!(e.version, *v, "versions of {} must be gapless", e.stream);
    }
    for (stream, v) in versions {
        assert_eq!(store.stream_version(stream).await.expect("version"), v);
    }
    assert_eq!(store.verify_chain().await.expect("verify"), None);
}

/// Appends queued on one chain commit in queue order, each on the state the ones before it left; once one
/// fails, the later ones fail and store nothing, even where their expected version would match, while another
/// chain's appends are untouched. Stores that cannot queue appends (`append_chained` is `None`) skip this.
pub async fn chained_appends_stop_at_the_first_failure<S: EventStore>(store: Arc<S>) {
    let (ours, theirs) = (Chain::new(), Chain::new());
    let queue = |chain: &Arc<Chain>, stream: &str, expected| {
        store.append_chained(chain, stream, expected, new_events(stream, 1))
    };
    let Some(first) = queue(&ours, "c", ExpectedVersion::NoStream) else {
        return;
    };
    let queued = [
        queue(&ours, "c", ExpectedVersion::Exact(1)),
        queue(&ours, "c", ExpectedVersion::Exact(7)),
        queue(&ours, "d", ExpectedVersion::NoStream),
        queue(&theirs, "e", ExpectedVersion::NoStream),
    ];
    let first = first.await.expect("the first append");
    let mut answers = Vec::new();
    for pending in queued {
        answers.push(pending.expect("queued").await);
    }
    assert_eq!(first.version, 1);
    assert_eq!(answers[0].as_ref().expect("follows the first").version, 2);
    assert!(
        matches!(&answers[1], Err(StoreError::Conflict { actual: 2, .. })),
        "{:?}",
        answers[1]
    );
    assert!(
        matches!(&answers[2], Err(StoreError::Conflict { .. })),
        "an append queued after its chain failed: {:?}",
        answers[2]
    );
    assert_eq!(answers[3].as_ref().expect("another chain").version, 1);
    assert!(ours.is_broken() && !theirs.is_broken());
    for (stream, version) in [("c", 2), ("d", 0), ("e", 1)] {
        assert_eq!(
            store.stream_version(stream).await.expect("version"),
            version
        );
    }
    let later = queue(&ours, "d", ExpectedVersion::NoStream).expect("queued");
    assert!(matches!(later.await, Err(StoreError::Conflict { .. })));
    assert!(store.verify_chain().await.expect("verify").is_none());
}

/// Many concurrent appends, most to streams of their own and some racing on one stream with the same expected
/// version (a backend that commits appends together has both kinds in one transaction): every append to its own
/// stream succeeds with what it would have got alone, exactly one racer wins, the others get a conflict naming
/// the winner's version, and the log stays gapless and chained with every event in the outbox.
pub async fn concurrent_appends_are_answered_each_on_its_own<S: Tamper>(store: Arc<S>) {
    store
        .append("shared", ExpectedVersion::Any, new_events("start", 1))
        .await
        .expect("append");
    let writers = 200;
    let answers = all_at_once(writers, |i| {
        let store = store.clone();
        async move {
            let (stream, expected) = if i % 4 == 0 {
                ("shared".to_owned(), ExpectedVersion::Exact(1))
            } else {
                (format!("own-{i}"), ExpectedVersion::NoStream)
            };
            let n = 1 + i % 3;
            let result = store
                .append(&stream, expected, new_events(&format!("w{i}"), n))
                .await;
            (stream, n as u64, result)
        }
    })
    .await;
    let mut appended = HashMap::new();
    let mut conflicts = Vec::new();
    for (stream, n, result) in answers {
        match result {
            Ok(done) => {
                let base = if stream == "shared" { 1 } else { 0 };
                assert_eq!(done.version, base + n, "version of {stream}");
                assert_eq!(done.last_position + 1 - done.first_position, n);
                assert!(
                    appended.insert(stream.clone(), done).is_none(),
                    "two appends to {stream} succeeded"
                );
            }
            Err(StoreError::Conflict { actual, .. }) if stream == "shared" => {
                conflicts.push(actual)
            }
            Err(e) => panic!("unexpected error for {stream}: {e}"),
        }
    }
    let winner = appended.get("shared").expect("one racer wins");
    assert_eq!(
        conflicts.len(),
        writers / 4 - 1,
        "all other racers conflict"
    );
    assert!(conflicts.iter().all(|&actual| actual == winner.version));
    assert_eq!(appended.len(), writers - writers / 4 + 1);

    let all = all_events(&*store).await;
    let total = 1 + appended
        .values()
        .map(|a| a.last_position + 1 - a.first_position)
        .sum::<u64>();
    assert_eq!(all.len() as u64, total);
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.position, i as u64 + 1, "positions must be gapless");
        if e.position == 1 {
            continue;
        }
        let done = &appended[&e.stream];
        assert!(
            (done.first_position..=done.last_position).contains(&e.position),
            "event at {} is outside its append's positions {done:?}",
            e.position
        );
        assert_eq!(
            e.version,
            done.version - (done.last_position - e.position),
            "version of the event at {}",
            e.position
        );
    }
    assert_eq!(store.head_position().await.expect("head"), total);
    assert_eq!(
        store.outbox_peek(1000).await.expect("peek").len() as u64,
        total
    );
    assert_eq!(store.verify_chain().await.expect("verify"), None);
}

/// The outbox holds every appended event, oldest first, until acknowledged.
pub async fn outbox_peek_and_ack<S: Tamper>(store: Arc<S>) {
    assert!(store.outbox_peek(10).await.expect("peek").is_empty());
    store
        .append("a", ExpectedVersion::Any, new_events("a", 3))
        .await
        .expect("append");
    store
        .append("b", ExpectedVersion::Any, new_events("b", 2))
        .await
        .expect("append");
    let peeked = store.outbox_peek(2).await.expect("peek");
    assert_eq!(
        peeked.iter().map(|e| e.position).collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(peeked, store.read_all(0, 2).await.expect("read"));
    assert_eq!(
        store.outbox_peek(2).await.expect("peek"),
        peeked,
        "peek must not remove"
    );
    store.outbox_ack(&[1, 2]).await.expect("ack");
    let rest = store.outbox_peek(10).await.expect("peek");
    assert_eq!(
        rest.iter().map(|e| e.position).collect::<Vec<_>>(),
        [3, 4, 5]
    );
    store.outbox_ack(&[4]).await.expect("ack");
    store.outbox_ack(&[]).await.expect("empty ack");
    store
        .outbox_ack(&[1, 99])
        .await
        .expect("acking unknown positions");
    let rest = store.outbox_peek(10).await.expect("peek");
    assert_eq!(rest.iter().map(|e| e.position).collect::<Vec<_>>(), [3, 5]);
    store.outbox_ack(&[3, 5]).await.expect("ack");
    assert!(store.outbox_peek(10).await.expect("peek").is_empty());
    assert_eq!(
        store.read_all(0, 10).await.expect("read").len(),
        5,
        "ack must not touch the log"
    );
}

/// Checkpoints start at 0 and keep the last saved position per consumer.
pub async fn checkpoints<S: Tamper>(store: Arc<S>) {
    assert_eq!(store.load_checkpoint("projector").await.expect("load"), 0);
    store.save_checkpoint("projector", 5).await.expect("save");
    store.save_checkpoint("other", 2).await.expect("save");
    assert_eq!(store.load_checkpoint("projector").await.expect("load"), 5);
    store.save_checkpoint("projector", 9).await.expect("save");
    assert_eq!(store.load_checkpoint("projector").await.expect("load"), 9);
    assert_eq!(store.load_checkpoint("other").await.expect("load"), 2);
}

/// An untouched log verifies, empty or not, across page boundaries.
pub async fn verify_clean_log<S: Tamper>(store: Arc<S>) {
    assert_eq!(store.verify_chain().await.expect("verify"), None);
    seed(&*store, 12).await;
    store
        .append("bulk", ExpectedVersion::Any, new_events("bulk", 200))
        .await
        .expect("append");
    assert_eq!(store.verify_chain().await.expect("verify"), None);
}

/// A payload edited in place is found at its position.
pub async fn verify_detects_edited_payload<S: Tamper>(store: Arc<S>) {
    let all = seed(&*store, 10).await;
    store.overwrite_payload(4, b"forged").await.expect("tamper");
    expect_break(&*store, 4, ChainBreakKind::HashMismatch).await;
    let found = store.verify_chain().await.expect("verify").expect("break");
    assert_eq!(found.stream, all[3].stream);
    assert_eq!(found.version, all[3].version);
    assert_eq!(found.event_id, all[3].metadata.event_id);
    assert!(
        found
            .to_string()
            .starts_with("event at position 4 (stream `seed-0` version 2, id ")
    );
    assert!(found.to_string().contains("was edited"));
}

/// Edited metadata is found at its position.
pub async fn verify_detects_edited_metadata<S: Tamper>(store: Arc<S>) {
    seed(&*store, 6).await;
    store
        .execute_sql("UPDATE events SET metadata = REPLACE(metadata, 'user:alice', 'user:mallory') WHERE position = 2")
        .await
        .expect("tamper");
    expect_break(&*store, 2, ChainBreakKind::HashMismatch).await;
}

/// An edited event type is found at its position.
pub async fn verify_detects_edited_type<S: Tamper>(store: Arc<S>) {
    seed(&*store, 6).await;
    store
        .execute_sql("UPDATE events SET event_type = 'nsml.v1.Forged' WHERE position = 6")
        .await
        .expect("tamper");
    expect_break(&*store, 6, ChainBreakKind::HashMismatch).await;
}

/// A deleted event is found as a gap before the next event.
pub async fn verify_detects_deleted_event<S: Tamper>(store: Arc<S>) {
    seed(&*store, 10).await;
    store
        .execute_sql("DELETE FROM events WHERE position = 5")
        .await
        .expect("tamper");
    expect_break(&*store, 6, ChainBreakKind::PositionGap).await;
}

/// A deleted last event is found against the log head.
pub async fn verify_detects_deleted_last_event<S: Tamper>(store: Arc<S>) {
    seed(&*store, 10).await;
    store
        .execute_sql("DELETE FROM events WHERE position = 10")
        .await
        .expect("tamper");
    expect_break(&*store, 10, ChainBreakKind::PositionGap).await;
}

/// Two events swapped are found at the first of them.
pub async fn verify_detects_reordered_events<S: Tamper>(store: Arc<S>) {
    seed(&*store, 10).await;
    store
        .execute_sql(
            "UPDATE events SET position = -1 WHERE position = 4; \
             UPDATE events SET position = 4 WHERE position = 5; \
             UPDATE events SET position = 5 WHERE position = -1;",
        )
        .await
        .expect("tamper");
    expect_break(&*store, 4, ChainBreakKind::BrokenLink).await;
}

/// An event inserted in the middle (with a correctly computed hash, later events moved up) is found at the event
/// after it.
pub async fn verify_detects_inserted_event<S: Tamper>(store: Arc<S>) {
    let all = seed(&*store, 10).await;
    let before = &all[3];
    let metadata = metadata_json(&new_event("x", b"").metadata);
    let hash = event_hash(
        &before.hash,
        5,
        "intruder",
        1,
        "nsml.v1.Forged",
        b"",
        &metadata,
    );
    store
        .execute_sql(
            "UPDATE events SET position = -position WHERE position >= 5; \
             UPDATE events SET position = 1 - position WHERE position < 0;",
        )
        .await
        .expect("tamper");
    store
        .execute_sql(&format!(
            "INSERT INTO events (position, stream, version, event_type, payload, metadata, prev_hash, hash) \
             SELECT 5, 'intruder', 1, 'nsml.v1.Forged', payload, '{metadata}', '{}', '{hash}' \
             FROM events WHERE position = 6;",
            before.hash
        ))
        .await
        .expect("tamper");
    store.overwrite_payload(5, b"").await.expect("tamper");
    assert_eq!(
        store.read_all(4, 1).await.expect("read")[0].stream,
        "intruder"
    );
    expect_break(&*store, 6, ChainBreakKind::BrokenLink).await;
}

/// An event added after the head without going through the log is found.
pub async fn verify_detects_event_added_after_head<S: Tamper>(store: Arc<S>) {
    let all = seed(&*store, 5).await;
    let last = &all[4];
    let metadata = metadata_json(&new_event("x", b"").metadata);
    let hash = event_hash(
        &last.hash,
        6,
        "intruder",
        1,
        "nsml.v1.Forged",
        b"",
        &metadata,
    );
    store
        .execute_sql(&format!(
            "INSERT INTO events (position, stream, version, event_type, payload, metadata, prev_hash, hash) \
             SELECT 6, 'intruder', 1, 'nsml.v1.Forged', payload, '{metadata}', '{}', '{hash}' \
             FROM events WHERE position = 5;",
            last.hash
        ))
        .await
        .expect("tamper");
    store.overwrite_payload(6, b"").await.expect("tamper");
    expect_break(&*store, 6, ChainBreakKind::BrokenLink).await;
}

#[cfg(test)]
mod tests {
    use super::database_url;

    #[test]
    fn database_url_replaces_the_database_name() {
        assert_eq!(
            database_url("postgres://postgres@127.0.0.1:5432/postgres", "t1"),
            "postgres://postgres@127.0.0.1:5432/t1"
        );
        assert_eq!(
            database_url("postgres://u:p@h/db?sslmode=disable", "t1"),
            "postgres://u:p@h/t1?sslmode=disable"
        );
        assert_eq!(
            database_url("postgres://h:5432", "t1"),
            "postgres://h:5432/t1"
        );
    }
}
