//! The submission service: `submit -t` on the trial set and `submit` on the hidden test set. A submit runs
//! as a submit session of the source session's code; the predictions it returns are scored here, outside
//! any participant process, against labels that never leave the platform's services.
//!
//! Read top-down: `domain` (a submission's rules, pure) → `handler` (load, decide, append) →
//! `projection` (the read model) → `grpc` (conversion and authorisation) → `error` (the one mapping to
//! statuses). The `scorer` scores taken predictions on its own task with the pure [`scoring`]; the
//! `reactor` ends submissions whose submit session ended without predictions or ran out of time.

mod domain;
mod error;
mod grpc;
mod handler;
mod projection;
mod reactor;
mod scorer;
pub mod scoring;
pub mod seed;

use std::sync::Arc;

use nsml_common::ServiceContext;
use nsml_common::projection::Projection;
use nsml_common::server::Started;
use nsml_proto::v1::submission_service_server::SubmissionServiceServer;

pub use error::SubmissionError;
pub use grpc::SubmissionService;

/// Builds the submission service, its scorer (which first picks up submissions a restart left unscored),
/// its reactor (submit sessions that end without predictions) and its watchdog (submits past their time
/// limit).
pub async fn start(ctx: ServiceContext, python: String) -> Result<Started, SubmissionError> {
    let (proj, task) = Projection::<projection::Submissions>::spawn(
        "submission",
        ctx.store.clone(),
        ctx.bus.clone(),
        ctx.cancel.clone(),
    );
    let readiness = proj.readiness();
    proj.wait_ready().await;
    let clients = ctx.clients("submission")?;
    let (handler, queue) = handler::Handler::new(&ctx, proj, clients, python);
    let handler = Arc::new(handler);
    let scorer = tokio::spawn(scorer::run(handler.clone(), queue, ctx.cancel.clone()));
    let reactor = tokio::spawn(reactor::run(handler.clone(), ctx.clone()));
    let api = SubmissionService::new(handler);
    let internal =
        nsml_proto::internal::v1::submission_internal_server::SubmissionInternalServer::new(
            api.clone(),
        )
        .max_decoding_message_size(nsml_common::clients::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(nsml_common::clients::MAX_MESSAGE_BYTES);
    let server = SubmissionServiceServer::new(api)
        .max_decoding_message_size(nsml_common::clients::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(nsml_common::clients::MAX_MESSAGE_BYTES);
    Ok(Started {
        routes: Box::new(move |r: tonic::service::Routes| {
            r.add_service(server).add_service(internal)
        }),
        names: vec![
            "nsml.v1.SubmissionService",
            "nsml.internal.v1.SubmissionInternal",
        ],
        tasks: vec![task, scorer, reactor],
        ready: vec![readiness],
    })
}
