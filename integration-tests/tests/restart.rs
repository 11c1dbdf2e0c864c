//! Crashes leak nothing: a quota service killed mid-flow comes back with the same ledger, usage and
//! decisions, and a platform killed under a running session holds nothing for it after the restart.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::time::Duration;

use anyhow::{Context, ensure};
use nsml_integration_tests::faults::usage;
use nsml_integration_tests::grpc::{Client, small};
use nsml_integration_tests::{Deployment, FreshDb, drop_stream};
use nsml_proto::v1::{QuotaUsage, SessionStatus};

/// A comparable view of usage: what is held, by whom, and the submit state per dataset.
fn view(u: &QuotaUsage) -> String {
    let mut holdings: Vec<String> = u
        .holdings
        .iter()
        .map(|h| format!("{}:{:?}", h.session, h.resources))
        .collect();
    holdings.sort();
    let mut submits: Vec<String> = u
        .submits
        .iter()
        .map(|s| format!("{}:{}:{}", s.dataset, s.last_success_ms, s.in_flight))
        .collect();
    submits.sort();
    format!(
        "held={:?} holdings={holdings:?} submits={submits:?}",
        u.held
    )
}

async fn start_sleeper(c: &Client) -> anyhow::Result<String> {
    let snap = c
        .upload(
            "t1-cls",
            &[(
                "main.py",
                "import time\nprint('up', flush=True)\ntime.sleep(600)\n",
            )],
        )
        .await?;
    let s = c.run("t1-cls", &snap, "", small()).await?;
    c.wait_running(&s.name).await?;
    Ok(s.name)
}

#[test]
fn embedded_restart_under_a_running_session_holds_nothing() -> anyhow::Result<()> {
    let mut dep = Deployment::embedded()?;
    let rt = tokio::runtime::Runtime::new()?;
    let (name, before) = rt.block_on(async {
        let alice = Client::login(&dep.url, "alice", "alice-pass").await?;
        let trained = alice.trained("t2-reg").await?;
        let sub = alice.submit(&trained, "0", false).await?;
        alice.wait_scored(&sub.id).await?;
        let name = start_sleeper(&alice).await?;
        let u = usage(&alice).await?;
        ensure!(
            u.holdings.iter().any(|h| h.session == name),
            "the running session holds resources: {u:?}"
        );
        Ok::<_, anyhow::Error>((name, u))
    })?;
    dep.kill_and_restart()?;
    rt.block_on(async {
        let alice = Client::login(&dep.url, "alice", "alice-pass").await?;
        let s = alice.wait_session(&name).await?;
        ensure!(
            s.status() == SessionStatus::Failed && s.reason.contains("runner was lost"),
            "a session whose runner died with the platform ends Failed, saying why: {s:?}"
        );
        let after = eventually_usage(&alice, |u| u.holdings.is_empty()).await?;
        ensure!(
            after.held.unwrap_or_default().memory_bytes == 0,
            "nothing held: {after:?}"
        );
        let (b, a) = (&before.submits, &after.submits);
        ensure!(
            a.iter()
                .map(|s| (&s.dataset, s.last_success_ms))
                .eq(b.iter().map(|s| (&s.dataset, s.last_success_ms))),
            "the submit history survives: before {b:?} after {a:?}"
        );
        Ok(())
    })
}

async fn eventually_usage(
    c: &Client,
    ok: impl Fn(&QuotaUsage) -> bool,
) -> anyhow::Result<QuotaUsage> {
    for _ in 0..200 {
        let u = usage(c).await?;
        if ok(&u) {
            return Ok(u);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    usage(c)
        .await
        .context("usage never reached the expected state")
}

#[test]
fn distributed_quota_service_killed_mid_flow_comes_back_the_same() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let db = rt.block_on(FreshDb::create())?;
    let stream = format!("NSML_IT_{}", uuid::Uuid::new_v4().simple());
    let result = (|| {
        let mut dep = Deployment::distributed(&db.url, &stream)?;
        dep.host()?
            .nsml(&["admin", "competition", "apply", "examples/competition.toml"])?
            .ok()?;
        let (name, before) = rt.block_on(async {
            let alice = Client::login(&dep.url, "alice", "alice-pass").await?;
            let trained = alice.trained("t1-cls").await?;
            let sub = alice.submit(&trained, "0", false).await?;
            alice.wait_scored(&sub.id).await?;
            let name = start_sleeper(&alice).await?;
            let u = eventually_usage(&alice, |u| u.holdings.len() == 1).await?;
            Ok::<_, anyhow::Error>((name, u))
        })?;
        dep.restart_service("quota")?;
        rt.block_on(async {
            let alice = Client::login(&dep.url, "alice", "alice-pass").await?;
            let mut again = None;
            for _ in 0..100 {
                if let Ok(u) = usage(&alice).await {
                    again = Some(u);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let again = again.context("the quota service did not come back")?;
            ensure!(
                view(&again) == view(&before),
                "usage after the restart {}\nbefore {}",
                view(&again),
                view(&before)
            );
            // The restarted service still follows the log: stopping the session releases it.
            let stop = alice.stop(&name).await;
            ensure!(stop.is_ok(), "stopping the sleeper: {stop:?}");
            let freed = eventually_usage(&alice, |u| u.holdings.is_empty()).await?;
            ensure!(freed.holdings.is_empty(), "released after stop: {freed:?}");
            Ok(())
        })
    })();
    rt.block_on(drop_stream(&stream));
    rt.block_on(db.drop_db());
    result
}
