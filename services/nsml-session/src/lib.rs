//! The session service: training and submit sessions `TEAM/DATASET/N`, from request through admission by the
//! quota service to the runner's report of the exit, with their logs and metrics.
//!
//! The crate reads top-down: `domain` (rules), `projection` (the read model), `handler` (load, decide,
//! append), `dispatch` (the queue for the cluster and the executor), `supervision` (lost and silent runners),
//! then the API split by who calls it: `participant` (participants, and the submission service on their
//! behalf) and `runner` (the runners' reports), both served by `grpc`; `error` says what the service refuses
//! and how that travels.

mod dispatch;
mod domain;
mod error;
mod grpc;
mod handler;
mod logs;
mod participant;
mod projection;
mod runner;
mod supervision;

use std::sync::Arc;

use nsml_common::ServiceContext;
use nsml_common::projection::Projection;
use nsml_common::server::Started;
use nsml_proto::v1::session_service_server::SessionServiceServer;

pub use error::SessionError;
pub use grpc::SessionService;
pub use supervision::Supervision;

/// Builds the session service with the platform's heartbeat settings (see [`start_with`]).
pub async fn start(ctx: ServiceContext) -> Result<Started, SessionError> {
    start_with(ctx, Supervision::default()).await
}

/// Builds the session service: rebuilds sessions from the log, then marks sessions whose runner is gone as
/// failed so they hold nothing, and watches runners' heartbeats as `supervision` says.
pub async fn start_with(
    ctx: ServiceContext,
    supervision: Supervision,
) -> Result<Started, SessionError> {
    let executor = ctx.executor.clone().ok_or(SessionError::NoExecutor)?;
    let log_dir = ctx.data_dir.join("logs");
    std::fs::create_dir_all(&log_dir).map_err(|source| SessionError::LogDir {
        path: log_dir.display().to_string(),
        source,
    })?;
    let (proj, task) = Projection::<projection::Sessions>::spawn(
        "session",
        ctx.store.clone(),
        ctx.bus.clone(),
        ctx.cancel.clone(),
    );
    let readiness = proj.readiness();
    projection::sample_metrics(&proj);
    proj.wait_ready().await;
    let clients = ctx.clients("session")?;
    let handler = Arc::new(handler::Handler::new(ctx.store.clone(), proj));
    let launcher = Arc::new(dispatch::Launcher::new(
        handler,
        executor,
        Arc::new(logs::LogStore::new(log_dir)),
    ));
    let supervisor = supervision::Supervisor::new(launcher.clone(), supervision);
    supervisor.recover_lost_runners().await;
    let sweeper = supervisor.spawn(ctx.cancel.clone());
    let svc = SessionService::new(
        Arc::new(participant::Participants::new(launcher.clone(), clients)),
        Arc::new(runner::Runners::new(launcher)),
    );
    let internal =
        nsml_proto::internal::v1::session_internal_server::SessionInternalServer::new(svc.clone())
            .max_decoding_message_size(nsml_common::clients::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(nsml_common::clients::MAX_MESSAGE_BYTES);
    let server = SessionServiceServer::new(svc)
        .max_decoding_message_size(nsml_common::clients::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(nsml_common::clients::MAX_MESSAGE_BYTES);
    Ok(Started {
        routes: Box::new(move |r: tonic::service::Routes| {
            r.add_service(server).add_service(internal)
        }),
        names: vec!["nsml.v1.SessionService", "nsml.internal.v1.SessionInternal"],
        tasks: vec![task, sweeper],
        ready: vec![readiness],
    })
}
