use futures::StreamExt;
use nsml_eventstore::conformance::new_events;
use nsml_eventstore::*;
use std::time::Instant;

async fn bench<S: EventStore>(name: &str, store: &S) {
    let t = Instant::now();
    let n = 300;
    for i in 0..n {
        store
            .append(
                &format!("s{}", i % 10),
                ExpectedVersion::Any,
                new_events("x", 1),
            )
            .await
            .unwrap();
    }
    println!("{name}: single append {:?}/op", t.elapsed() / n);
    let t = Instant::now();
    for _ in 0..200 {
        store
            .append(
                "bulk",
                ExpectedVersion::Any,
                new_events("payload-abcdefghijklmnop", 1000),
            )
            .await
            .unwrap();
    }
    println!("{name}: bulk append 200k {:?}", t.elapsed());
    let t = Instant::now();
    let c = read_all_stream(store, 0).count().await;
    println!(
        "{name}: replay {c} in {:?} = {:.0}/s",
        t.elapsed(),
        c as f64 / t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let mut after = 0;
    let mut c = 0;
    loop {
        let p = store.read_all(after, 10000).await.unwrap();
        if p.is_empty() {
            break;
        }
        after = p.last().unwrap().position;
        c += p.len();
    }
    println!(
        "{name}: replay 10k pages {c} in {:?} = {:.0}/s",
        t.elapsed(),
        c as f64 / t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    assert!(store.verify_chain().await.unwrap().is_none());
    println!("{name}: verify {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn perf() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("x.db")).await.unwrap();
    bench("sqlite", &s).await;
    nsml_eventstore::conformance::with_fresh_postgres(
        "postgres://postgres@127.0.0.1:5432/postgres",
        |url| async move {
            let s = PostgresStore::connect(&url).await.unwrap();
            bench("postgres", &s).await;
            s.close().await;
        },
    )
    .await;
}
