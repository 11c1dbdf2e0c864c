//! The submission service: `submit -t` on the trial set and `submit` on the hidden test set. A submit runs
//! as a submit session of the source session's code; the predictions it returns are scored here, outside
//! any participant process, against labels that never leave the platform's services.

mod domain;
mod grpc;
mod projection;
mod reactor;
pub mod scoring;

use nsml_common::ServiceContext;
use nsml_common::projection::Projection;
use nsml_common::server::Started;
use nsml_proto::v1::submission_service_server::SubmissionServiceServer;

pub use grpc::SubmissionService;

/// Why the submission service could not start.
#[derive(Debug, thiserror::Error)]
pub enum SubmissionError {
    #[error("service clients: {0}")]
    Clients(#[from] nsml_common::clients::ClientsError),
}

/// Builds the submission service, its reactor (submit sessions that end without predictions) and its
/// watchdog (submits past their time limit).
pub async fn start(ctx: ServiceContext, python: String) -> Result<Started, SubmissionError> {
    let (proj, task) = Projection::<projection::Submissions>::spawn(
        "submission",
        ctx.store.clone(),
        ctx.bus.clone(),
        ctx.cancel.clone(),
    );
    proj.wait_ready().await;
    let clients = ctx.clients("submission")?;
    let svc = SubmissionService::new(ctx.clone(), proj, clients, python);
    let reactor = tokio::spawn(reactor::run(svc.clone(), ctx.clone()));
    let server = SubmissionServiceServer::new(svc)
        .max_decoding_message_size(nsml_common::clients::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(nsml_common::clients::MAX_MESSAGE_BYTES);
    Ok(Started {
        routes: Box::new(move |r: tonic::service::Routes| r.add_service(server)),
        names: vec!["nsml.v1.SubmissionService"],
        tasks: vec![task, reactor],
    })
}
