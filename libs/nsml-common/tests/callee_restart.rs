//! A call between services made while the service called is down waits for it to come back, over real TCP.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::time::Duration;

use nsml_common::clients::retry::{Backoff, Retrying};
use nsml_common::clients::transport;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Listens on `port` and serves the health service there until `stop` is cancelled.
async fn serve_health(port: u16, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("the port is free again");
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await
            .expect("serve");
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waits_through_a_restart_of_the_service_called() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let addr = format!("http://127.0.0.1:{port}");
    let retrying = Retrying::new(
        transport("health", &addr, None).expect("an address"),
        Backoff::THROUGH_RESTART,
    );
    let mut client = HealthClient::new(retrying);

    // Up: answered.
    let stop = CancellationToken::new();
    let server = serve_health(port, stop.clone()).await;
    client
        .check(HealthCheckRequest::default())
        .await
        .expect("answered while up");

    // Down for two seconds: the call made meanwhile is answered once the service is back.
    stop.cancel();
    server.await.expect("server stopped");
    let call = tokio::spawn({
        let mut client = client.clone();
        async move { client.check(HealthCheckRequest::default()).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    if call.is_finished() {
        panic!(
            "the call failed while the service was down: {:?}",
            call.await
        );
    }
    let stop = CancellationToken::new();
    let server = serve_health(port, stop.clone()).await;
    let answer = tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .expect("the call ends within its budget")
        .expect("the call's task");
    assert!(answer.is_ok(), "the call failed: {answer:?}");
    stop.cancel();
    let _ = server.await;
}
