//! The participant's loop on the embedded deployment (`nsmld up`), across a kill and restart.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use nsml_integration_tests::{Deployment, scenario};

#[test]
fn embedded_participant_loop_survives_restart() -> anyhow::Result<()> {
    let mut dep = Deployment::embedded()?;
    let work = tempfile::tempdir()?;
    let mut left = scenario::participant_loop(&dep, work.path())?;
    scenario::bad_input(&dep, work.path(), &mut left)?;
    dep.kill_and_restart()?;
    scenario::still_there(&dep, &left)?;
    Ok(())
}
