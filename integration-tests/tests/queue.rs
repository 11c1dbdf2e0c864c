//! Within quota but over the cluster's capacity: the session waits as Queued, says why, and starts when
//! capacity frees.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use anyhow::ensure;
use nsml_integration_tests::Deployment;
use nsml_integration_tests::grpc::{Client, authed, small};
use nsml_proto::v1::GetSessionRequest;
use nsml_proto::v1::SessionStatus;
use nsml_proto::v1::session_service_client::SessionServiceClient;

#[test]
fn a_session_over_cluster_capacity_waits_then_starts() -> anyhow::Result<()> {
    // One CPU in the whole cluster: each session asks for one.
    let dep = Deployment::embedded_env(&[], &[("NSML_CLUSTER_CPUS", "1")])?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let alice = Client::login(&dep.url, "alice", "alice-pass").await?;
        let snap = alice
            .upload("t1-cls", &[("main.py", "import time\ntime.sleep(600)\n")])
            .await?;
        let first = alice.run("t1-cls", &snap, "", small()).await?;
        alice.wait_running(&first.name).await?;
        let second = alice.run("t1-cls", &snap, "", small()).await?;
        let got = SessionServiceClient::new(alice.channel.clone())
            .get(authed(
                GetSessionRequest {
                    name: second.name.clone(),
                },
                &alice.token,
            )?)
            .await?
            .into_inner();
        ensure!(
            got.status() == SessionStatus::Queued
                && got.reason.contains("Allocated, not created yet"),
            "the second session waits and says why: {got:?}"
        );
        alice.stop(&first.name).await?;
        alice.wait_session(&first.name).await?;
        alice.wait_running(&second.name).await?;
        alice.stop(&second.name).await?;
        alice.wait_session(&second.name).await?;
        Ok(())
    })
}
