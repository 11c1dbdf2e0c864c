//! The participant's loop with every service its own `nsmld serve` process over Postgres and NATS JetStream,
//! across a kill and restart of every process.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use nsml_integration_tests::{Deployment, FreshDb, drop_stream, scenario};

#[test]
fn distributed_participant_loop_survives_restart() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let db = rt.block_on(FreshDb::create())?;
    let stream = format!("NSML_IT_{}", uuid::Uuid::new_v4().simple());
    let result = (|| {
        let mut dep = Deployment::distributed(&db.url, &stream)?;
        let host = dep.host()?;
        host.nsml(&["admin", "competition", "apply", "examples/competition.toml"])?
            .ok()?;
        let work = tempfile::tempdir()?;
        let mut left = scenario::participant_loop(&dep, work.path())?;
        scenario::bad_input(&dep, work.path(), &mut left)?;
        dep.kill_and_restart()?;
        scenario::still_there(&dep, &left)?;
        Ok::<_, anyhow::Error>(())
    })();
    rt.block_on(drop_stream(&stream));
    rt.block_on(db.drop_db());
    result
}
