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
        // Following the queued session's log says at once why nothing comes yet.
        let mut follower = std::process::Command::new(nsml_integration_tests::bin("nsml"))
            .args(["logs", "-f", &second.name])
            .env("NSML_SERVER", &dep.url)
            .env("NSML_TOKEN", &alice.token)
            .env("NSML_CONFIG_DIR", dep.data_dir.join("cli-follower"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let stderr = follower.stderr.take().expect("piped");
        let (said, heard) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = said.send(line);
            }
        });
        let first_words = heard.recv_timeout(std::time::Duration::from_secs(60))?;
        ensure!(
            first_words.starts_with(&format!(
                "Session {} is queued: Allocated, not created yet",
                second.name
            )),
            "logs -f of a queued session says why it waits: {first_words}"
        );
        alice.stop(&first.name).await?;
        alice.wait_session(&first.name).await?;
        alice.wait_running(&second.name).await?;
        alice.stop(&second.name).await?;
        alice.wait_session(&second.name).await?;
        // Once the session has ended, the follower returns.
        let ended = nsml_integration_tests::eventually(std::time::Duration::from_secs(60), || {
            Ok(follower.try_wait()?)
        })?;
        ensure!(ended.success(), "logs -f ended with {ended}");
        Ok(())
    })
}
