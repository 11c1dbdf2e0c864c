//! The session service: training and submit sessions `TEAM/DATASET/N`, from request through admission by the
//! quota service to the runner's report of the exit, with their logs and metrics.

mod dispatch;
mod domain;
mod grpc;
mod logs;
mod projection;

use std::sync::Arc;

use nsml_common::ServiceContext;
use nsml_common::projection::Projection;
use nsml_common::server::Started;
use nsml_proto::v1::session_service_server::SessionServiceServer;

pub use grpc::SessionService;

/// Why the session service could not start.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("service clients: {0}")]
    Clients(#[from] nsml_common::clients::ClientsError),
    #[error("cannot create the log directory `{path}`: {source}")]
    LogDir {
        path: String,
        source: std::io::Error,
    },
    #[error("the session service needs an executor to start runners")]
    NoExecutor,
}

/// Builds the session service: rebuilds sessions from the log, then marks sessions whose runner is gone as
/// failed so they hold nothing.
pub async fn start(ctx: ServiceContext) -> Result<Started, SessionError> {
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
    proj.wait_ready().await;
    let clients = ctx.clients("session")?;
    let svc = SessionService::new(
        ctx.clone(),
        proj,
        clients,
        executor,
        Arc::new(logs::LogStore::new(log_dir)),
    );
    svc.recover_lost_runners().await;
    let sweeper = {
        let (svc, cancel) = (svc.clone(), ctx.cancel.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(nsml_common::executor::HEARTBEAT_EVERY);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => svc.sweep_silent_runners().await,
                }
            }
        })
    };
    let server = SessionServiceServer::new(svc)
        .max_decoding_message_size(nsml_common::clients::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(nsml_common::clients::MAX_MESSAGE_BYTES);
    Ok(Started {
        routes: Box::new(move |r: tonic::service::Routes| r.add_service(server)),
        names: vec!["nsml.v1.SessionService"],
        tasks: vec![task, sweeper],
    })
}
