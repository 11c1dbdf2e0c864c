//! The `LeaderboardService` gRPC API: checks who calls, reads the projection, answers; and the one mapping of
//! [`LeaderboardError`] to gRPC statuses.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use nsml_common::bounds::Bounded;
use nsml_common::caller::Caller;
use nsml_common::live::{self, LiveStream};
use nsml_common::projection::Projection;
use nsml_proto::codec::{Encoded, EncodedAnswerCodec};
use nsml_proto::v1::leaderboard_service_server::{
    LeaderboardService as LeaderboardApi, LeaderboardServiceServer,
};
use nsml_proto::v1::{
    BoardRequest, BoardResponse, BoardRow, HistoryEntry, HistoryRequest, HistoryResponse,
    OverallRequest, OverallResponse, OverallRow,
};
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::server::{NamedService, UnaryService};
use tonic::{Request, Response, Status};

use crate::LeaderboardError;
use crate::domain::{self, HistoryScope, OverallStanding, Side, Standing};
use crate::projection::{DatasetView, LeaderboardState};

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

    /// `Board`, answered with the encoding kept for the dataset and side (see [`Server`]).
    #[tracing::instrument(skip_all, fields(dataset = %req.get_ref().dataset, private = req.get_ref().private))]
    async fn board_encoded(&self, req: Request<BoardRequest>) -> Result<Response<Encoded>, Status> {
        self.answer(req, board_encoded).await
    }

    /// `Overall`, answered with the encoding kept for the competition and side (see [`Server`]).
    #[tracing::instrument(skip_all, fields(competition = %req.get_ref().competition, private = req.get_ref().private))]
    async fn overall_encoded(
        &self,
        req: Request<OverallRequest>,
    ) -> Result<Response<Encoded>, Status> {
        self.answer(req, overall_encoded).await
    }

    /// The answer `read` makes to `req` from the read model, for its authenticated caller.
    async fn answer<R: Bounded, T>(
        &self,
        req: Request<R>,
        read: impl FnOnce(&LeaderboardState, &Caller, &R) -> Result<T, LeaderboardError>,
    ) -> Result<Response<T>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let answer = self.proj.read(|s| read(s, &caller, &req))?;
        Ok(Response::new(answer))
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

/// A kept answer as the message it encodes, for the generated server's own `Board` and `Overall`, which
/// [`Server`] answers before them with the bytes.
fn decoded<M: prost::Message + Default>(
    answer: Result<Response<Encoded>, Status>,
) -> Result<Response<M>, Status> {
    let (metadata, encoded, extensions) = answer?.into_parts();
    let message = encoded
        .decode()
        .map_err(|e| Status::internal(format!("a kept answer does not decode: {e}")))?;
    Ok(Response::from_parts(metadata, message, extensions))
}

#[tonic::async_trait]
impl LeaderboardApi for LeaderboardService {
    async fn board(&self, req: Request<BoardRequest>) -> Result<Response<BoardResponse>, Status> {
        decoded(self.board_encoded(req).await)
    }

    async fn overall(
        &self,
        req: Request<OverallRequest>,
    ) -> Result<Response<OverallResponse>, Status> {
        decoded(self.overall_encoded(req).await)
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
        self.answer(req, history).await
    }
}

/// The dataset whose board `req` asks for, once the caller may see it on the side asked.
fn board_dataset<'a>(
    s: &'a LeaderboardState,
    caller: &Caller,
    req: &'a BoardRequest,
) -> Result<(&'a str, &'a DatasetView), LeaderboardError> {
    let name = req.dataset.trim();
    if name.is_empty() {
        return Err(LeaderboardError::NoDataset);
    }
    let dataset = s.dataset(name)?;
    if req.private {
        let (hosts, revealed) = s.privacy(&dataset.competition);
        domain::check_private(caller, &dataset.competition, hosts, revealed)?;
    }
    Ok((name, dataset))
}

fn board(
    s: &LeaderboardState,
    caller: &Caller,
    req: &BoardRequest,
) -> Result<BoardResponse, LeaderboardError> {
    let (name, dataset) = board_dataset(s, caller, req)?;
    let rows = s.board_shared(name, Side::of(req.private))?;
    Ok(board_of(name, dataset, req.private, &rows))
}

/// As [`board`], encoded once per dataset and side and then shared until the board changes.
fn board_encoded(
    s: &LeaderboardState,
    caller: &Caller,
    req: &BoardRequest,
) -> Result<Encoded, LeaderboardError> {
    let (name, _) = board_dataset(s, caller, req)?;
    board_answer(s, name, Side::of(req.private))
}

/// The encoded answer of the board of dataset `name` on `side`: computed and encoded by the first caller (a
/// `Board`, or the warm-up before SERVING), then kept until the board changes. No access check: callers check.
pub(crate) fn board_answer(
    s: &LeaderboardState,
    name: &str,
    side: Side,
) -> Result<Encoded, LeaderboardError> {
    let dataset = s.dataset(name)?;
    let rows = s.board_shared(name, side)?;
    Ok(rows.answer(|rows| Encoded::of(&board_of(name, dataset, side == Side::Private, rows))))
}

/// As [`board_answer`], for the overall ranking of competition `id`.
pub(crate) fn overall_answer(
    s: &LeaderboardState,
    id: &str,
    side: Side,
) -> Result<Encoded, LeaderboardError> {
    let rows = s.overall_shared(id, side)?;
    Ok(
        rows.answer(|rows| {
            Encoded::of(&overall_of(s, id.to_string(), side == Side::Private, rows))
        }),
    )
}

/// The answer showing `rows`, the board of dataset `name`, public or `private`.
fn board_of(name: &str, dataset: &DatasetView, private: bool, rows: &[Standing]) -> BoardResponse {
    BoardResponse {
        dataset: name.to_string(),
        competition: dataset.competition.clone(),
        metric: dataset.metric.clone(),
        direction: dataset.ranking_direction() as i32,
        private,
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
    }
}

/// The competition whose overall ranking `req` asks for, once the caller may see it on the side asked.
fn overall_competition(
    s: &LeaderboardState,
    caller: &Caller,
    req: &OverallRequest,
) -> Result<String, LeaderboardError> {
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
    Ok(id)
}

fn overall(
    s: &LeaderboardState,
    caller: &Caller,
    req: &OverallRequest,
) -> Result<OverallResponse, LeaderboardError> {
    let id = overall_competition(s, caller, req)?;
    let rows = s.overall_shared(&id, Side::of(req.private))?;
    Ok(overall_of(s, id, req.private, &rows))
}

/// As [`overall`], encoded once per competition and side and then shared until a board changes.
fn overall_encoded(
    s: &LeaderboardState,
    caller: &Caller,
    req: &OverallRequest,
) -> Result<Encoded, LeaderboardError> {
    let id = overall_competition(s, caller, req)?;
    overall_answer(s, &id, Side::of(req.private))
}

/// The answer showing `rows`, the overall ranking of competition `id`, public or `private`.
fn overall_of(
    s: &LeaderboardState,
    id: String,
    private: bool,
    rows: &[OverallStanding],
) -> OverallResponse {
    OverallResponse {
        datasets: s.competition_datasets(&id),
        competition: id,
        private,
        rows: rows
            .iter()
            .map(|r| OverallRow {
                rank: r.rank,
                team: r.team.clone(),
                mean_rank: r.mean_rank,
                ranks: r.ranks.clone(),
                submitted: r.submitted.clone(),
            })
            .collect(),
    }
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

/// The service's gRPC server: the generated one, except that `Board` and `Overall` are answered with the
/// encoding kept with their board or ranking ([`crate::projection::Shared::answer`]) rather than built and encoded again for
/// every caller. Everything else, the live `Watch…` streams included, goes to the generated server.
#[derive(Clone)]
pub struct Server {
    svc: LeaderboardService,
    generated: LeaderboardServiceServer<LeaderboardService>,
}

impl Server {
    /// Serves `svc`.
    pub fn new(svc: LeaderboardService) -> Self {
        Self {
            generated: LeaderboardServiceServer::new(svc.clone()),
            svc,
        }
    }
}

/// The paths of `Board` and `Overall`, answered from their kept encodings.
const BOARD: &str = "/nsml.v1.LeaderboardService/Board";
const OVERALL: &str = "/nsml.v1.LeaderboardService/Overall";

impl NamedService for Server {
    const NAME: &'static str = <LeaderboardServiceServer<LeaderboardService> as NamedService>::NAME;
}

impl<B> Service<http::Request<B>> for Server
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let svc = self.svc.clone();
        match req.uri().path() {
            BOARD => kept(req, move |r| {
                let svc = svc.clone();
                Box::pin(async move { svc.board_encoded(r).await })
            }),
            OVERALL => kept(req, move |r| {
                let svc = svc.clone();
                Box::pin(async move { svc.overall_encoded(r).await })
            }),
            _ => self.generated.call(req),
        }
    }
}

/// What a unary method answered with a kept encoding gives the request `R` it decodes.
type KeptAnswer = BoxFuture<Response<Encoded>, Status>;

/// Answers `req`, a call of a unary method taking `R`, with the encoding `answer` gives, sent as it is.
fn kept<R, B>(
    req: http::Request<B>,
    answer: impl FnMut(Request<R>) -> KeptAnswer + Send + 'static,
) -> BoxFuture<http::Response<tonic::body::Body>, Infallible>
where
    R: prost::Message + Default + Send + 'static,
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    Box::pin(async move {
        let mut grpc = tonic::server::Grpc::new(EncodedAnswerCodec::<R>::default());
        Ok(grpc.unary(Kept(answer), req).await)
    })
}

/// A unary method of requests `R` answered with kept encodings by the function it holds.
struct Kept<F>(F);

impl<R, F> UnaryService<R> for Kept<F>
where
    F: FnMut(Request<R>) -> KeptAnswer,
{
    type Response = Encoded;
    type Future = KeptAnswer;

    fn call(&mut self, req: Request<R>) -> Self::Future {
        (self.0)(req)
    }
}
