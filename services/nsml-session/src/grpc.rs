//! The gRPC face of the session service: checks who calls, converts messages and maps errors. Participants'
//! calls are handled in [`crate::participant`], runners' reports in [`crate::runner`].

use std::sync::Arc;

use nsml_common::bounds;
use nsml_common::caller::Caller;
use nsml_common::live::LiveStream;
use nsml_proto::internal::v1::session_internal_server::SessionInternal;
use nsml_proto::internal::v1::{
    RunnerFinishedRequest, RunnerHeartbeatRequest, RunnerLogBatch, RunnerReportRequest,
    RunnerStartedRequest, StartSubmitRequest,
};
use nsml_proto::v1::session_service_server::SessionService as SessionApi;
use nsml_proto::v1::{
    Empty, GetSessionRequest, ListSessionsRequest, ListSessionsResponse, LogsRequest, MemoRequest,
    MetricsRequest, MetricsResponse, RemoveRequest, RemoveResponse, RunRequest, Session,
    StopRequest,
};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::participant::{LogStream, Participants};
use crate::runner::Runners;

/// The `nsml.v1.SessionService` implementation.
#[derive(Clone)]
pub struct SessionService {
    participants: Arc<Participants>,
    runners: Arc<Runners>,
}

impl SessionService {
    pub(crate) fn new(participants: Arc<Participants>, runners: Arc<Runners>) -> Self {
        Self {
            participants,
            runners,
        }
    }
}

#[tonic::async_trait]
impl SessionApi for SessionService {
    async fn run(&self, req: Request<RunRequest>) -> Result<Response<Session>, Status> {
        bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.user()?;
        let s = self.participants.run(&caller, req.into_inner()).await?;
        Ok(Response::new(s))
    }

    async fn list(
        &self,
        req: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.require_authenticated()?;
        let sessions = self.participants.list(&caller, req.get_ref());
        Ok(Response::new(ListSessionsResponse { sessions }))
    }

    async fn get(&self, req: Request<GetSessionRequest>) -> Result<Response<Session>, Status> {
        bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        Ok(Response::new(
            self.participants.get(&caller, &req.get_ref().name)?,
        ))
    }

    type LogsStream = LogStream;

    async fn logs(&self, req: Request<LogsRequest>) -> Result<Response<Self::LogsStream>, Status> {
        bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        Ok(Response::new(
            self.participants.logs(&caller, req.into_inner())?,
        ))
    }

    async fn stop(&self, req: Request<StopRequest>) -> Result<Response<Session>, Status> {
        bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        let s = self.participants.stop(&caller, &req.get_ref().name).await?;
        Ok(Response::new(s))
    }

    async fn remove(
        &self,
        req: Request<RemoveRequest>,
    ) -> Result<Response<RemoveResponse>, Status> {
        bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.require_authenticated()?;
        Ok(Response::new(
            self.participants.remove(&caller, req.get_ref()).await?,
        ))
    }

    async fn memo(&self, req: Request<MemoRequest>) -> Result<Response<Session>, Status> {
        bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        let s = self.participants.memo(&caller, &r.name, &r.memo).await?;
        Ok(Response::new(s))
    }

    async fn metrics(
        &self,
        req: Request<MetricsRequest>,
    ) -> Result<Response<MetricsResponse>, Status> {
        bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        let points = self.participants.metrics(&caller, &req.get_ref().name)?;
        Ok(Response::new(MetricsResponse { points }))
    }

    type WatchStream = LiveStream<ListSessionsResponse>;

    async fn watch(
        &self,
        req: Request<ListSessionsRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.require_authenticated()?;
        Ok(Response::new(
            self.participants.watch(caller, req.into_inner()),
        ))
    }

    type WatchMetricsStream = LiveStream<MetricsResponse>;

    async fn watch_metrics(
        &self,
        req: Request<MetricsRequest>,
    ) -> Result<Response<Self::WatchMetricsStream>, Status> {
        bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        let name = req.into_inner().name;
        Ok(Response::new(
            self.participants.watch_metrics(caller, name)?,
        ))
    }
}

#[tonic::async_trait]
impl SessionInternal for SessionService {
    async fn start_submit(
        &self,
        req: Request<StartSubmitRequest>,
    ) -> Result<Response<Session>, Status> {
        let caller = Caller::of(&req)?;
        caller.require_service()?;
        let s = self
            .participants
            .start_submit(&caller, req.into_inner())
            .await?;
        Ok(Response::new(s))
    }

    async fn runner_started(
        &self,
        req: Request<RunnerStartedRequest>,
    ) -> Result<Response<Empty>, Status> {
        Caller::of(&req)?.require_service()?;
        self.runners.started(req.into_inner()).await?;
        Ok(Response::new(Empty {}))
    }

    async fn runner_logs(
        &self,
        req: Request<Streaming<RunnerLogBatch>>,
    ) -> Result<Response<Empty>, Status> {
        Caller::of(&req)?.require_service()?;
        let mut stream = req.into_inner();
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            self.runners.log_batch(&batch.name, &batch.lines)?;
        }
        Ok(Response::new(Empty {}))
    }

    async fn runner_report(
        &self,
        req: Request<RunnerReportRequest>,
    ) -> Result<Response<Empty>, Status> {
        Caller::of(&req)?.require_service()?;
        // The point comes from participant code: it is measured before it becomes an event.
        bounds::check(&req)?;
        let r = req.into_inner();
        self.runners.report(&r.name, r.point).await?;
        Ok(Response::new(Empty {}))
    }

    async fn runner_heartbeat(
        &self,
        req: Request<RunnerHeartbeatRequest>,
    ) -> Result<Response<Empty>, Status> {
        Caller::of(&req)?.require_service()?;
        self.runners.heartbeat(&req.get_ref().names);
        Ok(Response::new(Empty {}))
    }

    async fn runner_finished(
        &self,
        req: Request<RunnerFinishedRequest>,
    ) -> Result<Response<Empty>, Status> {
        Caller::of(&req)?.require_service()?;
        self.runners.finished(req.into_inner()).await?;
        Ok(Response::new(Empty {}))
    }
}
