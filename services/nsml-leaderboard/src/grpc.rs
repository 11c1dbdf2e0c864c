//! The `LeaderboardService` gRPC API: checks who calls, reads the projection, answers; and the one mapping of
//! [`LeaderboardError`] to gRPC statuses.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use nsml_common::caller::Caller;
use nsml_common::live::{self, LiveStream};
use nsml_common::projection::Projection;
use nsml_proto::v1::leaderboard_service_server::LeaderboardService as LeaderboardApi;
use nsml_proto::v1::{
    BoardRequest, BoardResponse, BoardRow, HistoryEntry, HistoryRequest, HistoryResponse,
    OverallRequest, OverallResponse, OverallRow,
};
use tonic::{Request, Response, Status};

use crate::LeaderboardError;
use crate::domain::{self, HistoryScope, Side};
use crate::projection::LeaderboardState;

/// How long a call waits for the projection to catch up with the log at boot before answering `UNAVAILABLE`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The leaderboard service.
#[derive(Clone)]
pub struct LeaderboardService {
    proj: Arc<Projection<LeaderboardState>>,
}

impl LeaderboardService {
    /// Serves the boards of `proj`.
    pub fn new(proj: Arc<Projection<LeaderboardState>>) -> Self {
        Self { proj }
    }

    /// The authenticated caller of `req`, once the projection has caught up with the log.
    async fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let caller = Caller::of(req)?;
        caller.require_authenticated()?;
        tokio::time::timeout(READY_TIMEOUT, self.proj.wait_ready())
            .await
            .map_err(|_| LeaderboardError::Loading)?;
        Ok(caller)
    }

    /// What `answer` reads from the boards, now and on every change.
    fn follow<T>(
        &self,
        answer: impl Fn(&LeaderboardState) -> Result<T, LeaderboardError> + Send + 'static,
    ) -> LiveStream<T>
    where
        T: PartialEq + Clone + Send + 'static,
    {
        let proj = self.proj.clone();
        let (changes, stopped) = self.proj.live();
        live::follow(changes, stopped, move || {
            std::future::ready(proj.read(&answer).map(Some).map_err(Status::from))
        })
    }
}

#[tonic::async_trait]
impl LeaderboardApi for LeaderboardService {
    #[tracing::instrument(skip_all, fields(dataset = %req.get_ref().dataset, private = req.get_ref().private))]
    async fn board(&self, req: Request<BoardRequest>) -> Result<Response<BoardResponse>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let resp = self.proj.read(|s| board(s, &caller, &req))?;
        Ok(Response::new(resp))
    }

    #[tracing::instrument(skip_all, fields(competition = %req.get_ref().competition, private = req.get_ref().private))]
    async fn overall(
        &self,
        req: Request<OverallRequest>,
    ) -> Result<Response<OverallResponse>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let resp = self.proj.read(|s| overall(s, &caller, &req))?;
        Ok(Response::new(resp))
    }

    type WatchBoardStream = LiveStream<BoardResponse>;

    async fn watch_board(
        &self,
        req: Request<BoardRequest>,
    ) -> Result<Response<Self::WatchBoardStream>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        Ok(Response::new(self.follow(move |s| board(s, &caller, &req))))
    }

    type WatchOverallStream = LiveStream<OverallResponse>;

    async fn watch_overall(
        &self,
        req: Request<OverallRequest>,
    ) -> Result<Response<Self::WatchOverallStream>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        Ok(Response::new(
            self.follow(move |s| overall(s, &caller, &req)),
        ))
    }

    #[tracing::instrument(skip_all, fields(dataset = %req.get_ref().dataset))]
    async fn history(
        &self,
        req: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let resp = self.proj.read(|s| history(s, &caller, &req))?;
        Ok(Response::new(resp))
    }
}

fn board(
    s: &LeaderboardState,
    caller: &Caller,
    req: &BoardRequest,
) -> Result<BoardResponse, LeaderboardError> {
    let name = req.dataset.trim();
    if name.is_empty() {
        return Err(LeaderboardError::NoDataset);
    }
    let dataset = s.dataset(name)?;
    if req.private {
        let (hosts, revealed) = s.privacy(&dataset.competition);
        domain::check_private(caller, &dataset.competition, hosts, revealed)?;
    }
    let rows = s.board_shared(name, Side::of(req.private))?;
    Ok(BoardResponse {
        dataset: name.to_string(),
        competition: dataset.competition.clone(),
        metric: dataset.metric.clone(),
        direction: dataset.ranking_direction() as i32,
        private: req.private,
        rows: rows
            .iter()
            .map(|r| BoardRow {
                rank: r.rank,
                team: r.team.clone(),
                score: r.score,
                model: r.model.clone(),
                count: r.count,
                last_submit_ms: r.last_submit_ms,
                best_at_ms: r.best_at_ms,
            })
            .collect(),
    })
}

fn overall(
    s: &LeaderboardState,
    caller: &Caller,
    req: &OverallRequest,
) -> Result<OverallResponse, LeaderboardError> {
    let id = match req.competition.trim() {
        "" => domain::resolve_competition(caller, s.competitions.keys().cloned())?,
        named => named.to_string(),
    };
    let competition = s.competition(&id)?;
    if req.private {
        domain::check_private(
            caller,
            &id,
            &competition.hosts,
            competition.private_revealed,
        )?;
    }
    let datasets = s.competition_datasets(&id);
    let overall = s.overall_shared(&id, Side::of(req.private))?;
    Ok(OverallResponse {
        competition: id,
        datasets,
        private: req.private,
        rows: overall
            .iter()
            .map(|r| OverallRow {
                rank: r.rank,
                team: r.team.clone(),
                mean_rank: r.mean_rank,
                ranks: r.ranks.clone(),
                submitted: r.submitted.clone(),
            })
            .collect(),
    })
}

fn history(
    s: &LeaderboardState,
    caller: &Caller,
    req: &HistoryRequest,
) -> Result<HistoryResponse, LeaderboardError> {
    let dataset = req.dataset.trim();
    let submits: Vec<_> = if dataset.is_empty() {
        match domain::teams_seen(caller, s.competitions.values().map(|c| &c.hosts[..])) {
            // A participant sees their teams' submits only: those are all there is to filter.
            Some(teams) => teams.iter().flat_map(|t| s.submits_of(t)).collect(),
            None => s.all_submits().collect(),
        }
    } else {
        let d = s.dataset(dataset)?;
        let (hosts, _) = s.privacy(&d.competition);
        if domain::history_scope(caller, &d.competition, hosts) == HistoryScope::Nothing {
            return Err(LeaderboardError::NotInCompetition(d.competition.clone()));
        }
        s.submits_on(dataset).collect()
    };
    // Per competition: whose submits the caller sees, and whether private scores.
    let mut rights: HashMap<&str, (HistoryScope, bool)> = HashMap::new();
    let mut entries: Vec<(&crate::domain::Scored, bool)> = Vec::new();
    for sub in submits {
        let (scope, private) = rights.entry(&*sub.competition).or_insert_with(|| {
            let (hosts, revealed) = s.privacy(&sub.competition);
            (
                domain::history_scope(caller, &sub.competition, hosts),
                domain::may_see_private(caller, &sub.competition, hosts, revealed),
            )
        });
        let visible = match scope {
            HistoryScope::AllTeams => true,
            HistoryScope::Team(team) => **team == *sub.team,
            HistoryScope::Nothing => false,
        };
        if visible {
            entries.push((sub, *private));
        }
    }
    entries.sort_by(|a, b| {
        b.0.submitted_at_ms
            .cmp(&a.0.submitted_at_ms)
            .then_with(|| b.0.id.cmp(&a.0.id))
    });
    Ok(HistoryResponse {
        entries: entries
            .into_iter()
            .map(|(sub, private)| HistoryEntry {
                submission_id: sub.id.to_string(),
                dataset: sub.dataset.to_string(),
                model: sub.model.clone(),
                score: sub.score,
                private_score: if private { sub.private_score } else { None },
                at_ms: sub.submitted_at_ms,
                team: sub.team.to_string(),
            })
            .collect(),
    })
}
