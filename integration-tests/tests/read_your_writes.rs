//! Read-your-writes across services: a submit the caller saw scored no longer holds its dataset's slot, so
//! the next submit, asked for at once, is never refused as "in flight".
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::time::Duration;

use anyhow::{Context, bail};
use nsml_integration_tests::Deployment;
use nsml_integration_tests::grpc::{Client, authed, example_with_interval};
use nsml_proto::v1::submission_service_client::SubmissionServiceClient;
use nsml_proto::v1::{GetSubmissionRequest, SubmissionStatus};

/// Sequential submits, each asked for the moment the previous one reads as scored. The quota ledger usually
/// records a submit's end before its caller can read it and submit again, so the race this guards against is
/// lost about once in a hundred rounds: without the wait for the caller's log position, 300 rounds find it
/// (round 71 did on the first try).
const ROUNDS: usize = 300;

/// Polls a submission until it reads as scored, with no pause between reads: the next submit is to follow the
/// first read that shows it scored as closely as a client can.
async fn scored_at_once(c: &Client, id: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut subs = SubmissionServiceClient::new(c.channel.clone());
    while tokio::time::Instant::now() < deadline {
        let s = subs
            .get(authed(GetSubmissionRequest { id: id.into() }, &c.token)?)
            .await?
            .into_inner();
        match s.status() {
            SubmissionStatus::Scored => return Ok(()),
            SubmissionStatus::Failed | SubmissionStatus::TimedOut => {
                bail!("submission {id} ended as {:?}: {}", s.status(), s.reason)
            }
            _ => tokio::task::yield_now().await,
        }
    }
    bail!("submission {id} did not end within two minutes")
}

#[test]
fn a_submit_seen_scored_is_never_in_flight_for_the_next() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    // No interval: only the one-in-flight rule stands between two submits.
    let manifest = example_with_interval(tmp.path(), "0s")?;
    // A scored submit's session holds its resources until its process exits, a moment after the score: room
    // for a few such sessions, so that only the one-in-flight rule is tested.
    let text = std::fs::read_to_string(&manifest)?;
    anyhow::ensure!(
        text.contains("team_sessions = 2\n"),
        "the example manifest's session limit changed"
    );
    std::fs::write(
        &manifest,
        text.replace("team_sessions = 2\n", "team_sessions = 16\n"),
    )?;
    // Reads follow each other without pause, faster than the gateway lets one user call by default.
    let dep = Deployment::embedded_env(&[manifest], &[("NSML_RATE_LIMIT", "1000000")])?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let alice = Client::login(&dep.url, "alice", "alice-pass").await?;
        let session = alice.trained("t1-cls").await?;
        for round in 0..ROUNDS {
            let sub = alice
                .submit(&session, "0", false)
                .await
                .with_context(|| format!("submit {round} after the previous one read as scored"))?;
            scored_at_once(&alice, &sub.id).await?;
        }
        Ok(())
    })
}
