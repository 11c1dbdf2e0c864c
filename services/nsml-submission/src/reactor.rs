//! Ends submissions whose submit session ended without predictions, and those past their time limit.

use std::sync::Arc;
use std::time::Duration;

use nsml_common::event::decode;
use nsml_common::{ServiceContext, now_ms};
use nsml_eventstore::StoredEvent;
use nsml_proto::v1::{SessionExited, SessionFailed, SessionStopped, SubmissionStatus};

use crate::domain::{EndedBy, Ending};
use crate::handler::Handler;

/// Grace after the time limit before the watchdog ends a submit the runner did not end.
const GRACE_MS: i64 = 120_000;

/// Follows the log, resuming where it stopped, and checks time limits until cancelled.
pub async fn run(svc: Arc<Handler>, ctx: ServiceContext) {
    let watchdog = {
        let (svc, cancel) = (svc.clone(), ctx.cancel.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => watchdog(&svc).await,
                }
            }
        }
    };
    let reactor = nsml_common::reactor::run(
        "submission",
        ctx.store.clone(),
        ctx.bus.clone(),
        ctx.cancel.clone(),
        |ev| {
            let svc = svc.clone();
            async move {
                handle(&svc, &ev).await;
                Ok::<(), std::convert::Infallible>(())
            }
        },
    );
    tokio::join!(watchdog, reactor);
}

async fn handle(svc: &Handler, ev: &StoredEvent) {
    let ended = if let Some(e) = decode::<SessionExited>(ev) {
        Some((
            e.name,
            Ending::Failed(
                "the submit session exited without returning predictions: call `nsml.paused(scope=locals())` when `--pause` is set, after `nsml.bind(...)`".into(),
            ),
        ))
    } else if let Some(e) = decode::<SessionFailed>(ev) {
        let ending = if e.reason.starts_with("time limit") {
            Ending::TimedOut(e.reason)
        } else {
            Ending::Failed(format!("the submit session failed: {}", e.reason))
        };
        Some((e.name, ending))
    } else {
        decode::<SessionStopped>(ev).map(|e| {
            (
                e.name,
                Ending::Failed("the submit session was stopped".into()),
            )
        })
    };
    let Some((session, ending)) = ended else {
        return;
    };
    let running = svc.read(|p| {
        p.by_session
            .get(&session)
            .and_then(|id| p.open_one(id))
            .filter(|s| s.status() == SubmissionStatus::Running)
            .map(|s| s.id.clone())
    });
    if let Some(id) = running
        && let Err(err) = svc.end(&id, ending, EndedBy::Session).await
    {
        tracing::error!(%err, submission = %id, "could not record a submit's end");
    }
}

async fn watchdog(svc: &Handler) {
    let now = now_ms();
    let overdue: Vec<(String, u64)> = svc.read(|p| {
        p.open()
            .filter(|s| s.status() == SubmissionStatus::Running)
            .filter(|s| s.submitted_at_ms + s.time_limit_secs as i64 * 1000 + GRACE_MS < now)
            .map(|s| (s.id.clone(), s.time_limit_secs))
            .collect()
    });
    for (id, limit) in overdue {
        let reason =
            format!("time limit exceeded: the inference must finish within {limit} seconds");
        if let Err(err) = svc
            .end(&id, Ending::TimedOut(reason), EndedBy::Session)
            .await
        {
            tracing::error!(%err, submission = %id, "could not time out a submit");
        }
    }
}
