//! Follows the log and records outside facts in the teams' ledgers: sessions ending and real submits'
//! outcomes (which facts are due, and what they release, is `domain::release`). Every fact is recorded at most
//! once, so replays and duplicate deliveries are harmless.

use std::sync::Arc;

use nsml_common::ServiceContext;
use nsml_common::event::decode;
use nsml_common::names::SessionName;
use nsml_eventstore::StoredEvent;
use nsml_proto::v1::{
    SessionExited, SessionFailed, SessionRemoved, SessionStopped, SubmissionFailed,
    SubmissionScored, SubmissionTimedOut,
};

use crate::domain::SessionEnd;
use crate::handler::Quota;

/// The name the reactor saves its position under.
const NAME: &str = "quota";

/// Follows the log until cancelled, resuming where it stopped, and tells the handlers how far it has recorded
/// (for admissions that wait for what their caller saw).
pub async fn run(quota: Arc<Quota>, ctx: ServiceContext) {
    // Everything up to the saved position was recorded before a restart.
    if let Ok(saved) = ctx.store.load_checkpoint(NAME).await {
        quota.recorded_up_to(saved);
    }
    nsml_common::reactor::run(
        NAME,
        ctx.store.clone(),
        ctx.bus.clone(),
        ctx.cancel.clone(),
        |ev| {
            let quota = quota.clone();
            async move {
                handle(&quota, &ev).await?;
                // Only once recorded: a fact whose recording failed is retried, and until then an admission
                // waiting for it waits rather than decide without it. Events come in position order.
                quota.recorded_up_to(ev.position);
                Ok::<_, nsml_eventstore::StoreError>(())
            }
        },
    )
    .await;
}

/// The session that ended, and how, if `ev` says one did.
fn session_end(ev: &StoredEvent) -> Option<(String, SessionEnd)> {
    if let Some(e) = decode::<SessionExited>(ev) {
        Some((e.name, SessionEnd::Exited))
    } else if let Some(e) = decode::<SessionFailed>(ev) {
        Some((e.name, SessionEnd::Failed))
    } else if let Some(e) = decode::<SessionStopped>(ev) {
        Some((e.name, SessionEnd::Stopped))
    } else {
        decode::<SessionRemoved>(ev).map(|e| (e.name, SessionEnd::Removed))
    }
}

async fn handle(quota: &Quota, ev: &StoredEvent) -> Result<(), nsml_eventstore::StoreError> {
    let at = ev.metadata.recorded_at_ms;
    if let Some((name, end)) = session_end(ev) {
        let Ok(sn) = SessionName::parse(&name) else {
            return Ok(());
        };
        return quota.record_end(&sn.team, &name, end, at).await;
    }
    let outcome = if let Some(e) = decode::<SubmissionScored>(ev) {
        e.submission.map(|s| (s, true))
    } else if let Some(e) = decode::<SubmissionFailed>(ev) {
        e.submission.map(|s| (s, false))
    } else {
        decode::<SubmissionTimedOut>(ev).and_then(|e| e.submission.map(|s| (s, false)))
    };
    if let Some((sub, ok)) = outcome {
        if sub.trial {
            return Ok(());
        }
        return quota.record_outcome(&sub, ok).await;
    }
    Ok(())
}
