//! The `SubmissionService` gRPC API: submit, look up, list, and the runner's hand-over of predictions to
//! the scorer. Only conversion and authorisation live here; the rules are the handler's and the domain's.

use std::sync::Arc;

use nsml_common::caller::Caller;
use nsml_common::live::{self, LiveStream};
use nsml_common::names::{SessionName, check_checkpoint};
use nsml_proto::internal::v1::submission_internal_server::SubmissionInternal;
use nsml_proto::internal::v1::{RunnerPredictionsRequest, RunnerPredictionsResponse};
use nsml_proto::v1::submission_service_server::SubmissionService as SubmissionApi;
use nsml_proto::v1::{
    GetSubmissionRequest, ListSubmissionsRequest, ListSubmissionsResponse, Submission,
    SubmitRequest,
};
use tonic::{Request, Response, Status};

use crate::error::SubmissionError;
use crate::handler::Handler;

/// The submission service.
#[derive(Clone)]
pub struct SubmissionService {
    handler: Arc<Handler>,
}

impl SubmissionService {
    pub(crate) fn new(handler: Arc<Handler>) -> Self {
        Self { handler }
    }

    /// The submission as `caller` may see it: its private score only to the competition's hosts, or to
    /// everyone once the private board is revealed.
    fn visible(&self, caller: &Caller, mut s: Submission) -> Submission {
        let revealed = self
            .handler
            .read(|p| p.revealed.get(&s.competition).copied().unwrap_or(false));
        if !(caller.is_host_of(&s.competition) || revealed) {
            s.private_score = None;
        }
        s
    }

    /// The submissions `caller` may see that `r` asks for, as they may see them.
    fn listed(&self, caller: &Caller, r: &ListSubmissionsRequest) -> ListSubmissionsResponse {
        let subs: Vec<Submission> = self.handler.read(|p| {
            p.listed(
                |team, competition| caller.may_access_team(team, competition),
                &r.dataset,
            )
        });
        let submissions = subs.into_iter().map(|s| self.visible(caller, s)).collect();
        ListSubmissionsResponse { submissions }
    }
}

#[tonic::async_trait]
impl SubmissionApi for SubmissionService {
    async fn submit(&self, req: Request<SubmitRequest>) -> Result<Response<Submission>, Status> {
        // What the caller can have seen of submissions so far (a `Get` reads this projection): every earlier
        // submit's outcome it saw is at or before this position. The admission waits for the quota ledger to
        // record them, so a submit the caller saw scored never counts as in flight against this one.
        let seen_position = self.handler.position();
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.user()?;
        let r = req.into_inner();
        SessionName::parse(&r.session)?;
        check_checkpoint(&r.checkpoint)?;
        let sub = self.handler.submit(&caller, r, seen_position).await?;
        Ok(Response::new(self.visible(&caller, sub)))
    }

    async fn get(
        &self,
        req: Request<GetSubmissionRequest>,
    ) -> Result<Response<Submission>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.require_authenticated()?;
        let id = req.into_inner().id;
        let s = self
            .handler
            .read(|p| p.get(&id))
            .ok_or_else(|| SubmissionError::NotFound { id: id.clone() })?;
        if !caller.may_access_team(&s.team, &s.competition) {
            return Err(SubmissionError::OtherTeamSubmission { id }.into());
        }
        Ok(Response::new(self.visible(&caller, s)))
    }

    async fn list(
        &self,
        req: Request<ListSubmissionsRequest>,
    ) -> Result<Response<ListSubmissionsResponse>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.require_authenticated()?;
        Ok(Response::new(self.listed(&caller, &req.into_inner())))
    }

    type WatchStream = LiveStream<ListSubmissionsResponse>;

    async fn watch(
        &self,
        req: Request<ListSubmissionsRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.require_authenticated()?;
        let r = req.into_inner();
        let me = self.clone();
        let (changes, stopped) = self.handler.live();
        Ok(Response::new(live::follow(changes, stopped, move || {
            std::future::ready(Ok(Some(me.listed(&caller, &r))))
        })))
    }
}

#[tonic::async_trait]
impl SubmissionInternal for SubmissionService {
    async fn runner_predictions(
        &self,
        req: Request<RunnerPredictionsRequest>,
    ) -> Result<Response<RunnerPredictionsResponse>, Status> {
        Caller::of(&req)?.require_service()?;
        let r = req.into_inner();
        self.handler
            .take_predictions(&r.session, &r.submission_id, r.predictions_json)
            .await?;
        Ok(Response::new(RunnerPredictionsResponse {}))
    }
}
