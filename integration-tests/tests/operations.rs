//! What a host operates by: the metrics a process serves (scraped before and after real work, the counters
//! moving as they should) and `grpc.health.v1` (NOT_SERVING while a service is away or starting, SERVING once
//! it has caught up with the log), on the gateway and on every service's port.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nsml_integration_tests::grpc::Client;
use nsml_integration_tests::{Deployment, FreshDb, drop_stream, free_port};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// One scrape: every sample line, keyed by its name and labels as printed (`name{a="b"}`).
struct Scrape(HashMap<String, f64>);

impl Scrape {
    fn take(addr: &str) -> anyhow::Result<Self> {
        use std::io::{Read as _, Write as _};
        let mut tcp = std::net::TcpStream::connect(addr)?;
        write!(
            tcp,
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        tcp.read_to_string(&mut text)?;
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_default();
        anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "scrape answered {head}");
        anyhow::ensure!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain"),
            "Prometheus text: {head}"
        );
        let mut samples = HashMap::new();
        // A chunked body's size lines hold no space-separated sample and are skipped like comments.
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            if let Some((key, value)) = line.rsplit_once(' ')
                && let Ok(v) = value.trim().parse::<f64>()
            {
                samples.insert(key.to_string(), v);
            }
        }
        Ok(Scrape(samples))
    }

    fn get(&self, key: &str) -> f64 {
        self.0.get(key).copied().unwrap_or(0.0)
    }

    /// The sum over every sample whose key starts with `prefix` and holds each of `labels`.
    fn sum(&self, prefix: &str, labels: &[&str]) -> f64 {
        self.0
            .iter()
            .filter(|(k, _)| k.starts_with(prefix) && labels.iter().all(|l| k.contains(l)))
            .map(|(_, v)| v)
            .sum()
    }
}

#[test]
fn the_metrics_endpoint_counts_a_run_and_a_submit() -> anyhow::Result<()> {
    let metrics = format!("127.0.0.1:{}", free_port());
    let dep = Deployment::embedded_env(&[], &[("NSML_METRICS_LISTEN", &metrics)])?;
    let rt = tokio::runtime::Runtime::new()?;
    let before = Scrape::take(&metrics)?;
    for projection in ["auth", "session", "quota", "submission", "leaderboard"] {
        assert!(
            before.0.contains_key(&format!(
                "nsml_projection_lag_events{{projection=\"{projection}\"}}"
            )),
            "every read model says how far behind the log it is ({projection})"
        );
    }

    let (alice, session) = rt.block_on(async {
        let alice = Client::login(&dep.url, "alice", "alice-pass").await?;
        let session = alice.trained("t1-cls").await?;
        let sub = alice.submit(&session, "0", false).await?;
        alice.wait_scored(&sub.id).await?;
        anyhow::Ok((alice, session))
    })?;
    drop(alice);
    let after = Scrape::take(&metrics)?;

    let granted = |s: &Scrape, kind: &str| {
        s.sum(
            "nsml_admissions_total{",
            &[&format!("kind=\"{kind}\""), "outcome=\"granted\""],
        )
    };
    assert_eq!(granted(&after, "train") - granted(&before, "train"), 1.0);
    assert_eq!(granted(&after, "submit") - granted(&before, "submit"), 1.0);
    let exited = "nsml_sessions{state=\"exited\"}";
    assert!(
        after.get(exited) >= before.get(exited) + 1.0,
        "the trained session ({session}) is counted Exited"
    );
    assert_eq!(after.get("nsml_session_queue_depth"), 0.0);
    assert!(
        after.get("nsml_runner_heartbeats_total") >= before.get("nsml_runner_heartbeats_total"),
        "heartbeats only grow"
    );
    assert_eq!(
        after.sum(
            "nsml_scoring_duration_seconds_count{",
            &["outcome=\"scored\""]
        ) - before.sum(
            "nsml_scoring_duration_seconds_count{",
            &["outcome=\"scored\""]
        ),
        1.0,
        "the submit was scored once"
    );
    assert!(
        after.get("nsml_eventstore_append_seconds_count")
            > before.get("nsml_eventstore_append_seconds_count"),
        "appends are timed"
    );
    assert!(
        after.sum(
            "nsml_eventstore_commit_appends_count{",
            &["store=\"sqlite\""]
        ) > 0.0,
        "commits are counted by store"
    );
    let run = "nsml_gateway_requests_total{method=\"/nsml.v1.SessionService/Run\",code=\"OK\"}";
    assert_eq!(
        after.get(run) - before.get(run),
        1.0,
        "one Run through the gateway"
    );
    assert!(
        after.sum(
            "nsml_gateway_request_duration_seconds_count{",
            &["method=\"/nsml.v1.SessionService/Run\""]
        ) >= 1.0
    );
    assert!(
        after.sum(
            "nsml_bus_delivery_lag_seconds_count{",
            &["subscriber=\"session\""]
        ) > 0.0,
        "live deliveries to a read model are timed"
    );
    assert!(
        after.get("nsml_projection_position{projection=\"session\"}")
            > before.get("nsml_projection_position{projection=\"session\"}")
    );

    // A refused call is counted with its code, and a method nobody declared is not a label of its own.
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(dep.url.clone())?
            .connect()
            .await?;
        let mut auth = nsml_proto::v1::auth_service_client::AuthServiceClient::new(channel);
        let refused = auth
            .who_am_i(nsml_proto::v1::Empty::default())
            .await
            .expect_err("no token");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        anyhow::Ok(())
    })?;
    let refused = Scrape::take(&metrics)?;
    assert_eq!(
        refused.get(
            "nsml_gateway_requests_total{method=\"/nsml.v1.AuthService/WhoAmI\",code=\"UNAUTHENTICATED\"}"
        ),
        1.0
    );
    Ok(())
}

async fn health(url: &str, service: &str) -> Option<ServingStatus> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .ok()?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .ok()?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .ok()?;
    Some(answer.into_inner().status())
}

/// Waits (generously) until `url` reports `want` for `service`.
fn wait_health(
    rt: &tokio::runtime::Runtime,
    url: &str,
    service: &str,
    want: ServingStatus,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let now = rt.block_on(health(url, service));
        if now == Some(want) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{url} reports {now:?} for `{service}`, not {want:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn health_follows_each_service_through_the_gateway() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let db = rt.block_on(FreshDb::create())?;
    let stream = format!("NSML_IT_{}", uuid::Uuid::new_v4().simple());
    let result = (|| {
        let mut dep = Deployment::distributed(&db.url, &stream)?;
        let url = dep.url.clone();
        wait_health(&rt, &url, "", ServingStatus::Serving)?;
        for service in nsml_common::service::Service::ALL {
            wait_health(&rt, &url, service.grpc_name(), ServingStatus::Serving)?;
        }
        let board = "nsml.v1.LeaderboardService";
        // While the leaderboard is away, the gateway says so for it and for itself as a whole; the rest serve.
        dep.restart_service_when("leaderboard", || {
            wait_health(&rt, &url, board, ServingStatus::NotServing)?;
            wait_health(&rt, &url, "", ServingStatus::NotServing)?;
            wait_health(&rt, &url, "nsml.v1.SessionService", ServingStatus::Serving)?;
            Ok(())
        })?;
        wait_health(&rt, &url, board, ServingStatus::Serving)?;
        wait_health(&rt, &url, "", ServingStatus::Serving)?;
        Ok::<_, anyhow::Error>(())
    })();
    rt.block_on(drop_stream(&stream));
    rt.block_on(db.drop_db());
    result
}
