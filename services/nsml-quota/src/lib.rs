//! The quota service: one ledger stream per team (`quota-TEAM`) that records every admission decision and
//! every fact a decision depends on (the competition policy it adopted, a session ended, a submit succeeded,
//! a host's override), so that replaying one stream re-derives every decision for that team. Decisions are a
//! pure function of the ledger, the request and its recorded time; hosts audit them by replay.

pub mod audit;
pub mod domain;
pub mod error;
mod grpc;
mod handler;
pub mod idmap;
mod projection;
mod reactor;
pub mod replay;
pub mod synthetic;

use std::sync::Arc;

use nsml_common::ServiceContext;
use nsml_common::projection::Projection;
use nsml_common::server::Started;
use nsml_proto::v1::quota_service_server::QuotaServiceServer;

pub use error::QuotaError;
pub use grpc::QuotaService;
use handler::Quota;

/// Builds the quota service and its reactor, which records outside facts (sessions ending, submits
/// finishing) in the teams' ledgers.
pub async fn start(ctx: ServiceContext) -> Result<Started, QuotaError> {
    let (proj, task) = Projection::<projection::Catalog>::spawn(
        "quota",
        ctx.store.clone(),
        ctx.bus.clone(),
        ctx.cancel.clone(),
    );
    let readiness = proj.readiness();
    proj.wait_ready().await;
    let quota = Arc::new(Quota::new(ctx.store.clone(), proj, ctx.clients("quota")?));
    let reactor = tokio::spawn(reactor::run(quota.clone(), ctx.clone()));
    let api = QuotaService::new(quota);
    let internal =
        nsml_proto::internal::v1::quota_internal_server::QuotaInternalServer::new(api.clone());
    let server = QuotaServiceServer::new(api);
    Ok(Started {
        routes: Box::new(move |r: tonic::service::Routes| {
            r.add_service(server).add_service(internal)
        }),
        names: vec!["nsml.v1.QuotaService", "nsml.internal.v1.QuotaInternal"],
        tasks: vec![task, reactor],
        ready: vec![readiness],
    })
}
