//! Limits hold under concurrency: requests that only one of fits are never both admitted, in either
//! deployment, and with two quota service processes deciding side by side.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, ensure};
use nsml_integration_tests::grpc::{Client, example_with_interval};
use nsml_integration_tests::{Deployment, FreshDb, bin, drop_stream, free_port, repo_root};
use nsml_proto::internal::v1::quota_internal_client::QuotaInternalClient;
use nsml_proto::v1::{AdmitRequest, Resources, SessionKind};

const G: u64 = 1024 * 1024 * 1024;

/// Two runs that each fit the team's 170G alone but not together: exactly one is admitted.
async fn two_runs_one_fits(c: &Client) -> anyhow::Result<()> {
    let snap = c.upload_baseline("t1-cls").await?;
    let big = Resources {
        gpus: 0,
        cpus: 1,
        memory_bytes: 100 * G,
        shm_bytes: G,
    };
    let (a, b) = tokio::join!(
        c.run("t1-cls", &snap, "--epochs 1", big),
        c.run("t1-cls", &snap, "--epochs 1", big)
    );
    let admitted: Vec<_> = [&a, &b]
        .into_iter()
        .filter_map(|r| r.as_ref().ok())
        .collect();
    ensure!(
        admitted.len() == 1,
        "two runs over the memory limit: {a:?} / {b:?}"
    );
    let refused = [a.as_ref().err(), b.as_ref().err()]
        .into_iter()
        .flatten()
        .next()
        .context("no refusal")?;
    ensure!(
        refused.message().contains("memory") && refused.message().contains("limit 170G"),
        "refusal names the rule and numbers: {}",
        refused.message()
    );
    c.wait_session(&admitted[0].name).await?;
    Ok(())
}

/// 100 concurrent real submits when the interval has just ended: exactly one is admitted.
async fn hundred_submits_one_admitted(c: &Client, interval: Duration) -> anyhow::Result<()> {
    let session = c.trained("t1-cls").await?;
    let first = c.submit(&session, "0", false).await?;
    c.wait_scored(&first.id).await?;
    // The interval counts from the first submit's time; wake just as it ends.
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64
        - first.submitted_at_ms;
    let wait = interval.as_millis() as i64 - since;
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait as u64 + 5)).await;
    }
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (c, s) = (c.clone(), session.clone());
            tokio::spawn(async move { c.submit(&s, "0", false).await })
        })
        .collect();
    let mut admitted = Vec::new();
    let mut refusals = Vec::new();
    for t in tasks {
        match t.await? {
            Ok(s) => admitted.push(s),
            Err(st) => refusals.push(st),
        }
    }
    ensure!(
        admitted.len() == 1,
        "{} of 100 concurrent submits admitted; refusals e.g. {:?}",
        admitted.len(),
        refusals.first()
    );
    ensure!(
        refusals
            .iter()
            .all(|r| r.code() == tonic::Code::FailedPrecondition),
        "every other submit is refused by a rule: {:?}",
        refusals
            .iter()
            .find(|r| r.code() != tonic::Code::FailedPrecondition)
    );
    c.wait_scored(&admitted[0].id).await?;
    Ok(())
}

#[test]
fn embedded_limits_hold_under_concurrency() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let manifest = example_with_interval(tmp.path(), "4s")?;
    let dep = Deployment::embedded_with(&[manifest])?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let alice = Client::login(&dep.url, "alice", "alice-pass").await?;
        two_runs_one_fits(&alice).await?;
        hundred_submits_one_admitted(&alice, Duration::from_secs(4)).await
    })
}

fn config_value(config: &str, key: &str) -> anyhow::Result<String> {
    config
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
        })
        .with_context(|| format!("no `{key}` in the configuration"))
}

/// Two quota service processes over one log, each asked to admit half of 100 sessions that only one
/// fits: exactly one is granted across both.
async fn two_quota_processes(dep: &Deployment) -> anyhow::Result<()> {
    let path = dep.config_path().context("not distributed")?;
    let config = std::fs::read_to_string(path)?;
    let secret = config_value(&config, "internal_secret")?;
    let first = config_value(&config, "quota")?;
    let second = format!("127.0.0.1:{}", free_port());
    let second_cfg = path.with_file_name("nsmld-quota2.toml");
    std::fs::write(&second_cfg, config.replace(&first, &second))?;
    let mut proc2 = Command::new(bin("nsmld"))
        .args(["serve", "quota", "--config"])
        .arg(&second_cfg)
        .current_dir(repo_root())
        .stdout(Stdio::null())
        .spawn()?;
    let result = async {
        let mut clients = Vec::new();
        for addr in [&first, &second] {
            let mut tries = 0;
            let ch = loop {
                match tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                    .connect()
                    .await
                {
                    Ok(ch) => break ch,
                    Err(_) if tries < 100 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            clients.push(QuotaInternalClient::new(ch));
        }
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let mut q = clients[i % 2].clone();
                let secret = secret.clone();
                tokio::spawn(async move {
                    let mut req = tonic::Request::new(AdmitRequest {
                        team: "rivals".into(),
                        competition: "demo".into(),
                        kind: SessionKind::Train as i32,
                        session: format!("rivals/t2-reg/{}", 1000 + i),
                        dataset: "t2-reg".into(),
                        resources: Some(Resources {
                            gpus: 0,
                            cpus: 1,
                            memory_bytes: 100 * G,
                            shm_bytes: G,
                        }),
                        submission_id: String::new(),
                        command_id: format!("race-{i}"),
                        seen_position: 0,
                    });
                    req.metadata_mut()
                        .insert("x-nsml-internal", secret.parse()?);
                    req.metadata_mut()
                        .insert("x-nsml-service", "session".parse()?);
                    Ok::<_, anyhow::Error>(q.admit(req).await?.into_inner())
                })
            })
            .collect();
        let mut granted = 0;
        for t in tasks {
            if t.await??.granted {
                granted += 1;
            }
        }
        ensure!(
            granted == 1,
            "{granted} of 100 admissions granted across two quota processes"
        );
        Ok(())
    }
    .await;
    let _ = proc2.kill();
    let _ = proc2.wait();
    result
}

#[test]
fn distributed_limits_hold_under_concurrency() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let db = rt.block_on(FreshDb::create())?;
    let stream = format!("NSML_IT_{}", uuid::Uuid::new_v4().simple());
    let tmp = tempfile::tempdir()?;
    let result = (|| {
        let dep = Deployment::distributed(&db.url, &stream)?;
        let manifest = example_with_interval(tmp.path(), "4s")?;
        dep.apply_competition(&manifest)?;
        rt.block_on(async {
            let alice = Client::login(&dep.url, "alice", "alice-pass").await?;
            two_runs_one_fits(&alice).await?;
            hundred_submits_one_admitted(&alice, Duration::from_secs(4)).await?;
            two_quota_processes(&dep).await
        })
    })();
    rt.block_on(drop_stream(&stream));
    rt.block_on(db.drop_db());
    result
}
