//! A deployment's processes starting at once against a Postgres database that does not exist yet: one of them
//! creates it, the others find it created, and every one can then open the log in it.
//!
//! Set `NSML_TEST_POSTGRES=skip` to skip these tests, or to a URL to use another server.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use nsml_eventstore::PostgresStore;
use nsml_eventstore::conformance::postgres_admin_url;
use sqlx::{Connection, PgConnection};

/// `admin_url` with its database replaced by `name` (the admin URL ends in `/DATABASE`).
fn url_of(admin_url: &str, name: &str) -> String {
    let (server, _) = admin_url
        .rsplit_once('/')
        .expect("the admin URL names a database");
    format!("{server}/{name}")
}

async fn exists(admin_url: &str, name: &str) -> bool {
    let mut admin = PgConnection::connect(admin_url).await.expect("connecting");
    let found: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut admin)
            .await
            .expect("reading pg_database");
    admin.close().await.expect("closing");
    found
}

async fn drop_database(admin_url: &str, name: &str) {
    let mut admin = PgConnection::connect(admin_url).await.expect("connecting");
    sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .expect("dropping the database");
    admin.close().await.expect("closing");
}

#[tokio::test]
async fn processes_starting_at_once_create_a_missing_database_once() {
    let Some(admin) = postgres_admin_url() else {
        eprintln!("NSML_TEST_POSTGRES=skip: not running Postgres tests");
        return;
    };
    // Upper case and a dash: the name must reach CREATE DATABASE quoted, as the URL spells it.
    let name = format!("Nsml-Create-{}", uuid::Uuid::new_v4().simple());
    let url = url_of(&admin, &name);
    assert!(
        !exists(&admin, &name).await,
        "{name} exists before the test"
    );

    let starts: Vec<_> = (0..7)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PostgresStore::create_database_if_missing(&url).await })
        })
        .collect();
    let mut created = 0;
    for start in starts {
        if start
            .await
            .expect("the task ran")
            .expect("creating or finding the database")
        {
            created += 1;
        }
    }
    let outcome = async {
        assert_eq!(created, 1, "exactly one start creates the database");
        assert!(exists(&admin, &name).await, "{name} was not created");
        assert!(
            !PostgresStore::create_database_if_missing(&url)
                .await
                .expect("finding the database"),
            "a start against an existing database creates nothing"
        );
        let store = PostgresStore::connect(&url)
            .await
            .expect("the log opens in the created database");
        store.close().await;
    };
    let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(outcome)).await;
    drop_database(&admin, &name).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
