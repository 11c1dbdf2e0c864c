//! The soak: a busy competition hour compressed into a few minutes against `nsmld up`, with the server's
//! resident memory sampled throughout, to show whether memory levels off.
//!
//! The mix, all at once, for the whole duration:
//! - two teams training (`demo`'s alice and `rivals`' bob): the baseline for two epochs (logs, metrics, two
//!   checkpoints), then its logs and metrics read back and the session removed, as participants clean up;
//! - alice submitting from a trained session, a trial submit then a real one (the competition's interval is one
//!   second), each submit session removed once it ends;
//! - a reader polling what the web and `nsml ps` show: sessions, both boards, history and quota usage;
//! - hostile traffic: logins as unknown users with long names, wrong passwords, calls with forged tokens,
//!   oversized memos and runs far over the team's quota, all refused.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use nsml_proto::v1::auth_service_client::AuthServiceClient;
use nsml_proto::v1::leaderboard_service_client::LeaderboardServiceClient;
use nsml_proto::v1::quota_service_client::QuotaServiceClient;
use nsml_proto::v1::session_service_client::SessionServiceClient;
use nsml_proto::v1::{
    BoardRequest, HistoryRequest, ListSessionsRequest, LoginRequest, LogsRequest, MemoRequest,
    MetricsRequest, OverallRequest, QuotaUsageRequest, RemoveRequest, Resources,
};
use tokio_stream::StreamExt;

use crate::Deployment;
use crate::grpc::{Client, authed, example_with_interval, small};

/// Counts of what the soak did.
#[derive(Default)]
pub struct Counts {
    pub sessions: AtomicU64,
    pub submits: AtomicU64,
    pub reads: AtomicU64,
    pub refused: AtomicU64,
    pub errors: AtomicU64,
}

/// One sample of the server's resident memory.
pub struct Sample {
    pub at: Duration,
    pub rss_kib: u64,
}

/// What the soak measured.
pub struct Report {
    pub samples: Vec<Sample>,
    pub counts: Arc<Counts>,
    pub log_bytes_before: u64,
    pub log_bytes_after: u64,
}

/// A process's resident memory in KiB, from `/proc/PID/status`.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A process's resident memory of its own (`RssAnon`: the heap, what the services keep) and of mapped files
/// (`RssFile`: the log's pages read through a memory map, which the kernel drops under pressure), in KiB.
pub fn rss_split_kib(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        s.lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("RssAnon:")?, field("RssFile:")?))
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("nsml.db"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Runs the soak for `duration` on a fresh embedded deployment started with `env`.
pub async fn soak(duration: Duration, env: &[(&str, &str)]) -> anyhow::Result<Report> {
    let tmp = tempfile::tempdir()?;
    let manifest = example_with_interval(tmp.path(), "1s")?;
    let dep = Deployment::embedded_env(&[manifest], env)?;
    let pid = *dep.pids().first().context("no server process")?;
    let alice = Client::login(&dep.url, "alice", "alice-pass").await?;
    let bob = Client::login(&dep.url, "bob", "bob-pass").await?;
    let trained = alice.trained("t1-cls").await?;
    // Settle after start-up and the first training, then take the first sample.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log_bytes_before = dir_bytes(&dep.data_dir);

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let mut tasks = Vec::new();
    for who in [alice.clone(), bob.clone()] {
        let (stop, counts) = (stop.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            let snap = who.upload_baseline("t1-cls").await?;
            while !stop.load(Ordering::Relaxed) {
                train_once(&who, &snap, &counts).await;
            }
            anyhow::Ok(())
        }));
    }
    {
        let (stop, counts, who) = (stop.clone(), counts.clone(), alice.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for trial in [true, false] {
                    submit_once(&who, &trained, trial, &counts).await;
                }
            }
            anyhow::Ok(())
        }));
    }
    {
        let (stop, counts, who) = (stop.clone(), counts.clone(), alice.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                read_once(&who, &counts).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok(())
        }));
    }
    {
        let (stop, counts, who, url) = (stop.clone(), counts.clone(), bob.clone(), dep.url.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                hostile_once(&url, &who, i, &counts).await;
                i += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::Ok(())
        }));
    }

    let t0 = Instant::now();
    let mut samples = Vec::new();
    while t0.elapsed() < duration {
        if let Some(rss_kib) = rss_kib(pid) {
            samples.push(Sample {
                at: t0.elapsed(),
                rss_kib,
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    if let Some(rss_kib) = rss_kib(pid) {
        samples.push(Sample {
            at: t0.elapsed(),
            rss_kib,
        });
    }
    Ok(Report {
        samples,
        counts,
        log_bytes_before,
        log_bytes_after: dir_bytes(&dep.data_dir),
    })
}

fn refused_or_error(counts: &Counts, st: &tonic::Status) {
    use tonic::Code::*;
    match st.code() {
        FailedPrecondition | ResourceExhausted | InvalidArgument | Unauthenticated
        | PermissionDenied | NotFound => counts.refused.fetch_add(1, Ordering::Relaxed),
        _ => counts.errors.fetch_add(1, Ordering::Relaxed),
    };
}

async fn remove(who: &Client, name: &str) -> Result<(), tonic::Status> {
    let req = authed(
        RemoveRequest {
            pattern: name.into(),
            force: true,
        },
        &who.token,
    )
    .map_err(|e| tonic::Status::internal(e.to_string()))?;
    SessionServiceClient::new(who.channel.clone())
        .remove(req)
        .await
        .map(|_| ())
}

async fn train_once(who: &Client, snap: &str, counts: &Counts) {
    let s = match who.run("t1-cls", snap, "--epochs 2", small()).await {
        Ok(s) => s,
        Err(st) => {
            refused_or_error(counts, &st);
            tokio::time::sleep(Duration::from_millis(200)).await;
            return;
        }
    };
    if who.wait_session(&s.name).await.is_err() {
        counts.errors.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut sessions = SessionServiceClient::new(who.channel.clone());
    let read = async {
        let mut logs = sessions
            .logs(authed(
                LogsRequest {
                    name: s.name.clone(),
                    follow: false,
                },
                &who.token,
            )?)
            .await?
            .into_inner();
        while logs.next().await.transpose()?.is_some() {}
        sessions
            .metrics(authed(
                MetricsRequest {
                    name: s.name.clone(),
                },
                &who.token,
            )?)
            .await?;
        anyhow::Ok(())
    };
    if read.await.is_err() || remove(who, &s.name).await.is_err() {
        counts.errors.fetch_add(1, Ordering::Relaxed);
        return;
    }
    counts.sessions.fetch_add(1, Ordering::Relaxed);
}

async fn submit_once(who: &Client, trained: &str, trial: bool, counts: &Counts) {
    let sub = match who.submit(trained, "0", trial).await {
        Ok(sub) => sub,
        Err(st) => {
            refused_or_error(counts, &st);
            tokio::time::sleep(Duration::from_millis(200)).await;
            return;
        }
    };
    // The submit session holds quota until it is removed, as a trial session does on NSML.
    let ended = match who.wait_scored(&sub.id).await {
        Ok(done) => remove(who, &done.session).await.is_ok(),
        Err(_) => false,
    };
    let counter = if ended {
        &counts.submits
    } else {
        &counts.errors
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

async fn read_once(who: &Client, counts: &Counts) {
    let ch = who.channel.clone();
    let t = &who.token;
    let r = async {
        SessionServiceClient::new(ch.clone())
            .list(authed(
                ListSessionsRequest {
                    all: true,
                    ..Default::default()
                },
                t,
            )?)
            .await?;
        let mut boards = LeaderboardServiceClient::new(ch.clone());
        boards
            .board(authed(
                BoardRequest {
                    dataset: "t1-cls".into(),
                    private: false,
                },
                t,
            )?)
            .await?;
        boards
            .overall(authed(
                OverallRequest {
                    competition: "demo".into(),
                    private: false,
                },
                t,
            )?)
            .await?;
        boards
            .history(authed(
                HistoryRequest {
                    dataset: "t1-cls".into(),
                },
                t,
            )?)
            .await?;
        QuotaServiceClient::new(ch)
            .usage(authed(
                QuotaUsageRequest {
                    team: String::new(),
                    competition: "demo".into(),
                },
                t,
            )?)
            .await?;
        anyhow::Ok(())
    };
    match r.await {
        Ok(()) => counts.reads.fetch_add(1, Ordering::Relaxed),
        Err(_) => counts.errors.fetch_add(1, Ordering::Relaxed),
    };
}

async fn hostile_once(url: &str, who: &Client, i: u64, counts: &Counts) {
    let answer = match i % 5 {
        0 => {
            // An unknown user with a long, never-repeated name.
            let name = format!("{i}-{}", "x".repeat(4096));
            login(url, &name, "guess").await
        }
        1 => login(url, "bob", "wrong-password").await,
        2 => {
            let forged = Client {
                channel: who.channel.clone(),
                token: format!("forged-{i}"),
            };
            match authed(ListSessionsRequest::default(), &forged.token) {
                Ok(r) => SessionServiceClient::new(forged.channel)
                    .list(r)
                    .await
                    .map(|_| ()),
                Err(_) => return,
            }
        }
        3 => match authed(
            MemoRequest {
                name: "rivals/t1-cls/1".into(),
                memo: "m".repeat(1 << 20),
            },
            &who.token,
        ) {
            Ok(r) => SessionServiceClient::new(who.channel.clone())
                .memo(r)
                .await
                .map(|_| ()),
            Err(_) => return,
        },
        _ => who
            .run(
                "t1-cls",
                "none",
                "",
                Resources {
                    gpus: 0,
                    cpus: 1000,
                    memory_bytes: 1 << 40,
                    shm_bytes: 0,
                },
            )
            .await
            .map(|_| ()),
    };
    match answer {
        Ok(()) => counts.errors.fetch_add(1, Ordering::Relaxed),
        Err(st) => {
            refused_or_error(counts, &st);
            0
        }
    };
}

async fn login(url: &str, user: &str, password: &str) -> Result<(), tonic::Status> {
    let ch = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| tonic::Status::internal(e.to_string()))?
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    AuthServiceClient::new(ch)
        .login(LoginRequest {
            username: user.into(),
            password: password.into(),
        })
        .await
        .map(|_| ())
}

/// Prints the soak's figures: what it did, resident memory over time, and how much it grew in the second half.
pub fn print(report: &Report, duration: Duration) {
    let c = &report.counts;
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "\nSoak, {:.0} s: {} training sessions, {} submits, {} read rounds, {} hostile or over-quota requests refused, {} errors",
        duration.as_secs_f64(),
        n(&c.sessions),
        n(&c.submits),
        n(&c.reads),
        n(&c.refused),
        n(&c.errors)
    );
    println!("| elapsed | nsmld RSS |\n| --- | --- |");
    let s = &report.samples;
    if s.is_empty() {
        println!("| - | no samples |");
        return;
    }
    for k in 0..=10 {
        let i = ((s.len() - 1) * k) / 10;
        println!(
            "| {:>5.0} s | {:>7.1} MB |",
            s[i].at.as_secs_f64(),
            s[i].rss_kib as f64 / 1024.0
        );
    }
    let mid = s[s.len() / 2].rss_kib as f64 / 1024.0;
    let first = s[0].rss_kib as f64 / 1024.0;
    let last = s[s.len() - 1].rss_kib as f64 / 1024.0;
    let peak = s.iter().map(|x| x.rss_kib).max().unwrap_or(0) as f64 / 1024.0;
    println!(
        "RSS: {first:.1} MB at the start, {mid:.1} MB at half time, {last:.1} MB at the end (peak {peak:.1} MB); second half: {:+.1} MB ({:+.1}%)",
        last - mid,
        (last - mid) / mid * 100.0
    );
    println!(
        "Log files: {:.1} MB before, {:.1} MB after",
        report.log_bytes_before as f64 / 1e6,
        report.log_bytes_after as f64 / 1e6
    );
}
