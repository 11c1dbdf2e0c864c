//! The gateway's `grpc.health.v1`: each public service as the service itself reports it, followed over
//! `Health/Watch` on its internal port, and the gateway as a whole SERVING only while every service is. A
//! service that cannot be reached, or has not caught up with the log, is NOT_SERVING here too.

use std::time::Duration;

use futures::StreamExt;
use nsml_common::clients::Transport;
use nsml_common::service::Service;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::server::HealthReporter;

/// How long after a service's health stream failed it is asked again.
const AGAIN_AFTER: Duration = Duration::from_millis(500);

/// Reports the gateway, and every service through it, NOT_SERVING: how it starts.
pub(crate) async fn not_serving(reporter: &HealthReporter) {
    for name in Service::ALL.map(Service::grpc_name).into_iter().chain([""]) {
        reporter
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
}

/// Follows every service's health into `reporter` until `cancel`.
pub(crate) async fn mirror(
    reporter: HealthReporter,
    upstream: Vec<(Service, Transport)>,
    cancel: CancellationToken,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Service, ServingStatus)>(16);
    for (service, transport) in upstream {
        let (tx, cancel) = (tx.clone(), cancel.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => {}
                () = follow(service, transport, tx) => {}
            }
        });
    }
    drop(tx);
    let mut serving = std::collections::HashSet::new();
    while let Some((service, status)) = rx.recv().await {
        reporter
            .set_service_status(service.grpc_name(), status)
            .await;
        if status == ServingStatus::Serving {
            serving.insert(service);
        } else {
            serving.remove(&service);
        }
        let all = if serving.len() == Service::ALL.len() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        reporter.set_service_status("", all).await;
    }
}

/// Sends every status `service` reports, and NOT_SERVING whenever it cannot be asked.
async fn follow(
    service: Service,
    transport: Transport,
    tx: tokio::sync::mpsc::Sender<(Service, ServingStatus)>,
) {
    let mut client = HealthClient::new(transport);
    loop {
        let request = HealthCheckRequest {
            service: service.grpc_name().to_string(),
        };
        match client.watch(request).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                while let Some(Ok(answer)) = stream.next().await {
                    let status = if answer.status
                        == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
                    {
                        ServingStatus::Serving
                    } else {
                        ServingStatus::NotServing
                    };
                    if tx.send((service, status)).await.is_err() {
                        return;
                    }
                }
            }
            Err(status) => {
                tracing::debug!(%service, %status, "cannot follow a service's health; asking again");
            }
        }
        if tx.send((service, ServingStatus::NotServing)).await.is_err() {
            return;
        }
        tokio::time::sleep(AGAIN_AFTER).await;
    }
}
