//! `nsml-bench`: figures for the embedded deployment, printed as a table.
//!
//! - `run` → entry process started (p50), over sequential runs of a trivial entry;
//! - `ps` round trip through the gateway (p50/p99);
//! - a line printed by the entry → seen by `logs -f` (p50);
//! - idle `nsmld up` resident memory.
//!
//! Usage: `cargo build --release --workspace --bins && target/release/nsml-bench [--runs N] [--ps N]`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use nsml_integration_tests::Deployment;
use nsml_proto::v1::session_service_client::SessionServiceClient;
use nsml_proto::v1::storage_service_client::StorageServiceClient;
use nsml_proto::v1::{
    ListSessionsRequest, LoginRequest, LogsRequest, Resources, RunRequest, SessionStatus,
    UploadCodeChunk, UploadCodeMeta, auth_service_client::AuthServiceClient, upload_code_chunk,
};
use tokio_stream::StreamExt;
use tonic::Request;
use tonic::metadata::MetadataValue;

fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn now_ms_f() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

fn tar_gz(files: &[(&str, &str)]) -> anyhow::Result<Vec<u8>> {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (name, body) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, body.as_bytes())?;
    }
    Ok(b.into_inner()?.finish()?)
}

fn authed<T>(msg: T, token: &str) -> anyhow::Result<Request<T>> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}"))?,
    );
    Ok(r)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let get = |k: &str, d: usize| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let runs = get("--runs", 10);
    let ps_n = get("--ps", 2000);

    let dep = Deployment::embedded()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = dep.pids().first().and_then(|p| rss_kib(*p));
    let channel = tonic::transport::Endpoint::from_shared(dep.url.clone())?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let token = AuthServiceClient::new(channel.clone())
        .login(LoginRequest {
            username: "alice".into(),
            password: "alice-pass".into(),
        })
        .await?
        .into_inner()
        .token;
    let mut storage = StorageServiceClient::new(channel.clone());
    let mut sessions = SessionServiceClient::new(channel.clone());
    let code = tar_gz(&[(
        "main.py",
        "import time\nfor i in range(20):\n    print('tick %.3f' % (time.time() * 1000), flush=True)\n    time.sleep(0.05)\n",
    )])?;
    let chunks = vec![
        UploadCodeChunk {
            kind: Some(upload_code_chunk::Kind::Meta(UploadCodeMeta {
                dataset: "t1-cls".into(),
            })),
        },
        UploadCodeChunk {
            kind: Some(upload_code_chunk::Kind::Data(code)),
        },
    ];
    let snap = storage
        .upload_code(authed(tokio_stream::iter(chunks), &token)?)
        .await?
        .into_inner()
        .id;

    let mut start_ms = Vec::new();
    let mut line_ms = Vec::new();
    for _ in 0..runs {
        let t0 = now_ms_f();
        let s = sessions
            .run(authed(
                RunRequest {
                    dataset: "t1-cls".into(),
                    entry: "main.py".into(),
                    code_snapshot: snap.clone(),
                    resources: Some(Resources {
                        gpus: 0,
                        cpus: 1,
                        memory_bytes: 1 << 30,
                        shm_bytes: 64 << 20,
                    }),
                    ..Default::default()
                },
                &token,
            )?)
            .await?
            .into_inner();
        let mut logs = sessions
            .logs(authed(
                LogsRequest {
                    name: s.name.clone(),
                    follow: true,
                },
                &token,
            )?)
            .await?
            .into_inner();
        while let Some(l) = logs.next().await {
            let l = l?;
            let seen = now_ms_f();
            if let Some(v) = l
                .text
                .strip_prefix("tick ")
                .and_then(|v| v.trim().parse::<f64>().ok())
            {
                line_ms.push(seen - v);
            }
        }
        let done = sessions
            .get(authed(
                nsml_proto::v1::GetSessionRequest {
                    name: s.name.clone(),
                },
                &token,
            )?)
            .await?
            .into_inner();
        anyhow::ensure!(
            done.status() == SessionStatus::Exited,
            "bench session {} ended as {:?}: {}",
            s.name,
            done.status(),
            done.reason
        );
        start_ms.push(done.started_at_ms as f64 - t0);
    }

    let mut ps_ms = Vec::new();
    for _ in 0..ps_n {
        let t = Instant::now();
        sessions
            .list(authed(
                ListSessionsRequest {
                    all: true,
                    ..Default::default()
                },
                &token,
            )?)
            .await
            .context("ps")?;
        ps_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }

    println!(
        "nsml-bench (embedded, `nsmld up`, {} runs, {} ps calls)",
        runs, ps_n
    );
    println!("{:<44} {:>10} {:>10}", "measure", "p50", "p99");
    println!(
        "{:<44} {:>8.1}ms {:>10}",
        "run -> entry process started",
        pct(start_ms.clone(), 0.5),
        ""
    );
    println!(
        "{:<44} {:>8.2}ms {:>8.2}ms",
        "ps round trip through the gateway",
        pct(ps_ms.clone(), 0.5),
        pct(ps_ms, 0.99)
    );
    println!(
        "{:<44} {:>8.1}ms {:>8.1}ms",
        "line printed -> seen by logs -f",
        pct(line_ms.clone(), 0.5),
        pct(line_ms, 0.99)
    );
    match idle_rss {
        Some(k) => println!(
            "{:<44} {:>8.1}MB",
            "idle nsmld up resident memory",
            k as f64 / 1024.0
        ),
        None => println!("{:<44} {:>10}", "idle nsmld up resident memory", "n/a"),
    }
    Ok(())
}
