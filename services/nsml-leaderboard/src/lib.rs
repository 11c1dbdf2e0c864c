//! The leaderboard service: per-dataset boards (each team's best score, its count of submits, its last submit and
//! the model behind the best), a competition's overall ranking, and each team's history of real submits, on the
//! public or the private part of the test set.
//!
//! It is a pure projection: it appends no events of its own. Its read model ([`projection`]) is folded from the
//! log — `CompetitionApplied`, `DatasetRegistered`, `PrivateRevealed` and `SubmissionScored` — and rebuilt from
//! the start at every boot; the ranking rules are pure functions ([`domain`]); [`grpc`] checks who calls and
//! answers.

pub mod domain;
pub mod error;
pub mod grpc;
pub mod projection;

use std::sync::Arc;

use nsml_common::ServiceContext;
use nsml_common::projection::Projection;
use nsml_common::server::Started;
use nsml_proto::codec::Encoded;

pub use error::LeaderboardError;
pub use grpc::LeaderboardService;

/// Builds the leaderboard service: starts its projection of the log (which catches up in the background; calls
/// wait for it) and returns its routes.
pub async fn start(ctx: ServiceContext) -> Result<Started, LeaderboardError> {
    let (proj, task) = Projection::<projection::LeaderboardState>::spawn(
        "leaderboard",
        ctx.store.clone(),
        ctx.bus.clone(),
        ctx.cancel.clone(),
    );
    let readiness = proj.readiness();
    let proj_for_warm = proj.clone();
    // SERVING once the boards are computed too: the first answers come at the speed of the ones after.
    let (warmed, warm_readiness) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        warm(proj_for_warm).await;
        warmed.send_replace(true);
    });
    let svc = LeaderboardService::new(proj);
    Ok(Started {
        routes: Box::new(move |r: tonic::service::Routes| r.add_service(grpc::Server::new(svc))),
        names: vec!["nsml.v1.LeaderboardService"],
        tasks: vec![task],
        ready: vec![readiness, warm_readiness],
    })
}

/// Once the read model has caught up with the log, computes every board and overall ranking participants see
/// (the public ones; the private ones once revealed) and encodes its answer, so that the first query of each does
/// not pay for reading all of its dataset's submits nor for encoding thousands of rows. The boards first, then
/// the overall rankings made of them; each on two threads (the catch-up has left the cores idle), one at a time
/// under its own read of the model, so that events keep being applied in between.
async fn warm(proj: Arc<Projection<projection::LeaderboardState>>) {
    proj.wait_ready().await;
    let (boards, overalls) = proj.read(|s| s.rankings());
    on_two_threads(&proj, boards, grpc::board_answer).await;
    on_two_threads(&proj, overalls, grpc::overall_answer).await;
}

/// Runs `warm` on every ranking of `rankings`, half of them on each of two blocking threads.
async fn on_two_threads(
    proj: &Arc<Projection<projection::LeaderboardState>>,
    mut rankings: Vec<projection::Ranking>,
    warm: fn(
        &projection::LeaderboardState,
        &str,
        domain::Side,
    ) -> Result<Encoded, LeaderboardError>,
) {
    let second = rankings.split_off(rankings.len() / 2);
    let halves = [rankings, second].map(|half| {
        let proj = proj.clone();
        tokio::task::spawn_blocking(move || {
            for (name, side) in half {
                // A ranking that cannot be made now (its dataset just removed) is made when asked for.
                let _ = proj.read(|s| warm(s, &name, side));
            }
        })
    });
    for half in halves {
        let _ = half.await;
    }
}
