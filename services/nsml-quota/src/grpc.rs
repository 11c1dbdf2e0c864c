//! The `QuotaService` gRPC API: admission, usage, hosts' overrides and the audit (replay, explain, verify,
//! export). Conversion and authorisation only: the handlers in `handler` load, decide and append; the rules
//! live in `domain`; every error is mapped to a status once, in `error`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nsml_common::caller::Caller;
use nsml_common::live::{self, LiveStream};
use nsml_common::now_ms;
use nsml_eventstore::{ChainBreak, ChainBreakKind};
use nsml_proto::internal::v1::quota_internal_server::QuotaInternal;
use nsml_proto::v1::quota_service_server::QuotaService as QuotaApi;
use nsml_proto::v1::{
    AdmitRequest, Decision, ExplainRequest, Explanation, ExportRequest, ExportResponse, Override,
    OverrideKind, OverrideRequest, QuotaUsage, QuotaUsageRequest, ReplayMismatch, ReplayReport,
    ReplayRequest, VerifyReport, VerifyRequest,
};
use tonic::{Request, Response, Status};

use crate::domain::check_request;
use crate::error::QuotaError;
use crate::handler::Quota;
use crate::replay::{Report, Scope};

/// How long an admission that names a log position waits for the reactor to record the outcomes up to it
/// before it answers UNAVAILABLE: the reactor is milliseconds behind the log when healthy, and a loaded
/// machine may hold it back for seconds.
const CATCH_UP: Duration = Duration::from_secs(10);

/// The quota service.
#[derive(Clone)]
pub struct QuotaService {
    quota: Arc<Quota>,
}

impl QuotaService {
    pub(crate) fn new(quota: Arc<Quota>) -> Self {
        Self { quota }
    }

    /// The competitions whose decisions the caller may audit (`None`: all of them).
    fn hosted(caller: &Caller) -> Result<Option<Vec<String>>, QuotaError> {
        caller.require_authenticated()?;
        match caller {
            Caller::User(id) if id.admin => Ok(None),
            Caller::User(id) if !id.hosts.is_empty() => Ok(Some(id.hosts.clone())),
            Caller::Service(_) => Ok(None),
            _ => Err(QuotaError::HostsOnly),
        }
    }

    async fn admit(&self, req: Request<AdmitRequest>) -> Result<Decision, QuotaError> {
        let caller = Caller::of(&req)?;
        caller.require_service()?;
        let r = req.into_inner();
        if r.team.is_empty() || r.session.is_empty() || r.command_id.is_empty() {
            return Err(QuotaError::AdmissionIncomplete);
        }
        // Read-your-writes across services: a caller that saw a submit end must not be refused because the
        // ledger has not recorded that end yet. Only callers that name a position wait, so training sessions'
        // admissions do not.
        if r.seen_position > 0 {
            self.quota.catch_up(r.seen_position, CATCH_UP).await?;
        }
        self.quota.admit(&r, &caller.actor()).await
    }

    async fn usage(&self, req: Request<QuotaUsageRequest>) -> Result<QuotaUsage, QuotaError> {
        let (team, competition) = Self::whose_usage(req)?;
        self.quota.usage(team, competition).await
    }

    /// The team and competition a usage request is about, once the caller may see them.
    fn whose_usage(req: Request<QuotaUsageRequest>) -> Result<(String, String), QuotaError> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.require_authenticated()?;
        let r = req.into_inner();
        let competition = if r.competition.is_empty() {
            let mine: std::collections::BTreeSet<String> = match &caller {
                Caller::User(id) => id
                    .memberships
                    .iter()
                    .map(|m| m.competition.clone())
                    .collect(),
                _ => Default::default(),
            };
            match mine.len() {
                1 => mine.into_iter().next().unwrap_or_default(),
                _ => return Err(QuotaError::NameCompetition),
            }
        } else {
            r.competition
        };
        let team = if r.team.is_empty() {
            caller
                .team_in(&competition)
                .map(str::to_string)
                .ok_or_else(|| QuotaError::NotInTeam {
                    competition: competition.clone(),
                })?
        } else {
            r.team
        };
        if !caller.may_access_team(&team, &competition) {
            return Err(QuotaError::NotVisible { team });
        }
        Ok((team, competition))
    }

    async fn grant_override(&self, req: Request<OverrideRequest>) -> Result<Override, QuotaError> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.require_authenticated()?;
        let r = req.into_inner();
        // The round an extended deadline names is a name like the others.
        nsml_common::bounds::text("round", &r.round, nsml_common::bounds::MAX_NAME_BYTES)?;
        check_request(&r, now_ms())?;
        // A re-opened submit's dataset is the submission's, as the team's ledger has it.
        let dataset = if r.kind() == OverrideKind::ReopenSubmit {
            // Only hosts learn whether a team's submission exists.
            Self::hosted(&caller)?;
            self.quota
                .reopen_target(&r.team, r.submission_id.trim(), &r.dataset)
                .await?
        } else {
            r.dataset.clone()
        };
        let competition = self.quota.override_competition(&r, &dataset)?;
        caller.require_host_of(&competition)?;
        self.quota
            .grant_override(&r, competition, dataset, caller.actor())
            .await
    }

    async fn replay(&self, req: Request<ReplayRequest>) -> Result<ReplayReport, QuotaError> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        let hosted = Self::hosted(&caller)?;
        let r = req.into_inner();
        if !r.competition.is_empty() {
            caller.require_host_of(&r.competition)?;
        }
        let scope = Scope {
            competition: (!r.competition.is_empty()).then(|| r.competition.clone()),
            until_ms: (r.until_ms > 0).then_some(r.until_ms),
            hosted,
        };
        let started = Instant::now();
        let report = self
            .quota
            .replay(&scope, (!r.team.is_empty()).then_some(r.team.as_str()))
            .await?;
        Ok(replay_report(report, started))
    }

    async fn explain(&self, req: Request<ExplainRequest>) -> Result<Explanation, QuotaError> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        Self::hosted(&caller)?;
        let id = req.into_inner().id.trim().to_string();
        if id.is_empty() {
            return Err(QuotaError::ExplainNeedsId);
        }
        let x = self.quota.explain(&id).await?;
        let competition = x
            .request
            .as_ref()
            .map(|r| r.competition.clone())
            .unwrap_or_default();
        caller.require_host_of(&competition)?;
        Ok(x)
    }

    async fn verify(&self, req: Request<VerifyRequest>) -> Result<VerifyReport, QuotaError> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        Self::hosted(&caller)?;
        let (events, found) = self.quota.verify().await?;
        Ok(verify_report(events, found))
    }

    async fn export(&self, req: Request<ExportRequest>) -> Result<ExportResponse, QuotaError> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        Self::hosted(&caller)?;
        let team = req.into_inner().team;
        if team.is_empty() {
            return Err(QuotaError::ExportNeedsTeam);
        }
        let export = self.quota.export(&team).await?;
        for c in &export.competitions {
            caller.require_host_of(c)?;
        }
        Ok(ExportResponse {
            lines: export.lines,
        })
    }
}

/// A replay's report as the API carries it.
fn replay_report(report: Report, started: Instant) -> ReplayReport {
    ReplayReport {
        ledgers: report.ledgers,
        events: report.events,
        decisions: report.decisions,
        matched: report.matched,
        mismatches: report
            .mismatches
            .into_iter()
            .map(|m| ReplayMismatch {
                team: m.team,
                position: m.position,
                version: m.version,
                decision_id: m.recorded.id.clone(),
                session: m.request.session,
                submission_id: m.request.submission_id,
                recorded: Some(m.recorded),
                replayed: Some(m.replayed),
                differences: m.differences,
            })
            .collect(),
        elapsed_micros: started.elapsed().as_micros() as u64,
    }
}

/// A check of the log's hash chain as the API carries it.
fn verify_report(events: u64, found: Option<ChainBreak>) -> VerifyReport {
    match found {
        None => VerifyReport {
            intact: true,
            events,
            ..Default::default()
        },
        Some(b) => VerifyReport {
            intact: false,
            events,
            position: b.position,
            stream: b.stream.clone(),
            version: b.version,
            event_id: b.event_id.clone(),
            kind: match b.kind {
                ChainBreakKind::HashMismatch => "edited",
                ChainBreakKind::PositionGap => "deleted",
                ChainBreakKind::VersionGap => "version_gap",
                ChainBreakKind::BrokenLink => "inserted_or_reordered",
            }
            .into(),
            message: b.to_string(),
        },
    }
}

#[tonic::async_trait]
impl QuotaApi for QuotaService {
    async fn usage(&self, req: Request<QuotaUsageRequest>) -> Result<Response<QuotaUsage>, Status> {
        Ok(Response::new(QuotaService::usage(self, req).await?))
    }

    type WatchUsageStream = LiveStream<QuotaUsage>;

    async fn watch_usage(
        &self,
        req: Request<QuotaUsageRequest>,
    ) -> Result<Response<Self::WatchUsageStream>, Status> {
        let (team, competition) = Self::whose_usage(req)?;
        let quota = self.quota.clone();
        let (changes, stopped) = self.quota.live();
        Ok(Response::new(live::follow(changes, stopped, move || {
            let (quota, team, competition) = (quota.clone(), team.clone(), competition.clone());
            async move {
                quota
                    .usage(team, competition)
                    .await
                    .map(Some)
                    .map_err(Status::from)
            }
        })))
    }

    async fn grant_override(
        &self,
        req: Request<OverrideRequest>,
    ) -> Result<Response<Override>, Status> {
        Ok(Response::new(
            QuotaService::grant_override(self, req).await?,
        ))
    }

    async fn replay(&self, req: Request<ReplayRequest>) -> Result<Response<ReplayReport>, Status> {
        Ok(Response::new(QuotaService::replay(self, req).await?))
    }

    async fn explain(&self, req: Request<ExplainRequest>) -> Result<Response<Explanation>, Status> {
        Ok(Response::new(QuotaService::explain(self, req).await?))
    }

    async fn verify(&self, req: Request<VerifyRequest>) -> Result<Response<VerifyReport>, Status> {
        Ok(Response::new(QuotaService::verify(self, req).await?))
    }

    async fn export(
        &self,
        req: Request<ExportRequest>,
    ) -> Result<Response<ExportResponse>, Status> {
        Ok(Response::new(QuotaService::export(self, req).await?))
    }
}

#[tonic::async_trait]
impl QuotaInternal for QuotaService {
    async fn admit(&self, req: Request<AdmitRequest>) -> Result<Response<Decision>, Status> {
        Ok(Response::new(QuotaService::admit(self, req).await?))
    }
}
