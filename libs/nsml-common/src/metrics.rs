//! Metrics: every process that is given an address serves its figures there as Prometheus text
//! (`GET /metrics`), recorded through the `metrics` facade (`docs/adr/2026-12-04-metrics-and-health.md`).
//!
//! Counters and histograms are recorded where things happen (an admission decided, an append committed, a call
//! answered). Gauges that describe a state (sessions by state, how far a read model lags behind the log) are
//! sampled when they are scraped, by the [`sampler`]s the services register, so nothing is counted twice and
//! nothing drifts. Without [`install`] (a process given no metrics address) every recording is a no-op.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use futures::future::BoxFuture;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Buckets of the latency histograms, in seconds: 100 µs to 60 s.
const SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];
/// Buckets of the count histograms (appends per commit, events per append).
const COUNTS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// A gauge refreshed just before each scrape.
type Sampler = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static SAMPLERS: Mutex<Vec<Sampler>> = Mutex::new(Vec::new());

/// Why metrics could not be served.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot set up the metrics recorder: {0}")]
    Recorder(String),
    #[error("cannot serve metrics on {addr}: {source} (is another process using the port?)")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Installs this process's recorder (once; later calls return the same handle).
pub fn install() -> Result<&'static PrometheusHandle, MetricsError> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle);
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_appends".into()), COUNTS))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_events".into()), COUNTS))
        .map_err(|e| MetricsError::Recorder(e.to_string()))?
        .build_recorder();
    let handle = recorder.handle();
    // Another recorder set first (tests in one process) keeps its own; this handle then renders nothing.
    if metrics::set_global_recorder(recorder).is_err() {
        tracing::debug!("a metrics recorder was installed already");
    }
    describe();
    Ok(HANDLE.get_or_init(|| handle))
}

/// Registers `sample`, run before each scrape to set the gauges it owns, in a process that serves metrics
/// (none is kept otherwise). A sampler that holds a service's state should hold it weakly, so that it does not
/// outlive the service.
pub fn sampler(sample: impl Fn() -> BoxFuture<'static, ()> + Send + Sync + 'static) {
    if HANDLE.get().is_some() {
        SAMPLERS.lock().push(Arc::new(sample));
    }
}

/// Every metric's figures, after running the samplers: the Prometheus text exposition format.
pub async fn render() -> String {
    let samplers: Vec<Sampler> = SAMPLERS.lock().clone();
    futures::future::join_all(samplers.iter().map(|s| s())).await;
    match HANDLE.get() {
        Some(handle) => {
            handle.run_upkeep();
            handle.render()
        }
        None => String::new(),
    }
}

/// Installs the recorder and serves `GET /metrics` on `addr` until `cancel`.
pub async fn serve(
    addr: SocketAddr,
    cancel: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, MetricsError> {
    install()?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Listen { addr, source })?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(
                    http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                render().await,
            )
        }),
    );
    Ok(tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await
        {
            tracing::error!(%err, "serving metrics failed");
        }
    }))
}

/// What each metric means, in the exposition's `# HELP` lines.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "nsml_admissions_total",
        "Admission decisions taken, by kind (session, submit, trial), outcome (granted, refused) and the rule that refused"
    );
    describe_gauge!(
        "nsml_sessions",
        "Sessions the session service knows, by state"
    );
    describe_gauge!(
        "nsml_session_queue_depth",
        "Admitted sessions waiting for cluster capacity (Queued)"
    );
    describe_counter!(
        "nsml_runner_heartbeats_total",
        "Heartbeats received from sessions' runners"
    );
    describe_histogram!(
        "nsml_scoring_duration_seconds",
        Unit::Seconds,
        "Time to score one submission's predictions, by outcome"
    );
    describe_histogram!(
        "nsml_eventstore_append_seconds",
        Unit::Seconds,
        "Time from an append's request to its commit"
    );
    describe_histogram!("nsml_eventstore_append_events", "Events per append");
    describe_histogram!(
        "nsml_eventstore_commit_appends",
        "Appends committed together in one transaction, by store"
    );
    describe_histogram!(
        "nsml_bus_delivery_lag_seconds",
        Unit::Seconds,
        "Time from an event's commit to its delivery to a live subscriber, by subscriber"
    );
    describe_gauge!(
        "nsml_projection_lag_events",
        "Events in the log that a read model has not applied yet, by projection"
    );
    describe_gauge!(
        "nsml_projection_position",
        "The log position a read model has applied up to, by projection"
    );
    describe_counter!(
        "nsml_gateway_requests_total",
        "Calls the gateway answered, by method and gRPC status code"
    );
    describe_histogram!(
        "nsml_gateway_request_duration_seconds",
        Unit::Seconds,
        "Time from a call's arrival at the gateway to its end (the last message of a stream), by method"
    );
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_scrape_runs_the_samplers_and_shows_what_was_recorded() {
        super::install().expect("recorder");
        super::sampler(|| {
            Box::pin(async {
                metrics::gauge!("nsml_test_sampled").set(7.0);
            })
        });
        metrics::counter!("nsml_test_total", "rule" => "team_gpus").increment(2);
        metrics::histogram!("nsml_test_seconds").record(0.003);
        let text = super::render().await;
        assert!(text.contains("nsml_test_sampled 7"), "{text}");
        assert!(
            text.contains("nsml_test_total{rule=\"team_gpus\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("nsml_test_seconds_bucket{le=\"0.005\"} 1"),
            "a latency is a histogram with the platform's buckets: {text}"
        );
    }
}
