//! Records outside facts in the teams' ledgers: a session that ended releases what it held (a trial submit
//! session only when stopped or removed, as NSML had it), and a real submit's outcome starts or spares the
//! submit interval. Every fact is recorded at most once, so replays and duplicate deliveries are harmless.

use nsml_common::ServiceContext;
use nsml_common::event::{decode, new_event};
use nsml_common::names::SessionName;
use nsml_eventstore::StoredEvent;
use nsml_proto::v1::{
    ResourcesReleased, SessionExited, SessionFailed, SessionKind, SessionRemoved, SessionStopped,
    Submission, SubmissionFailed, SubmissionScored, SubmissionTimedOut, SubmitEnded,
    SubmitSucceeded,
};

use crate::grpc::QuotaService;

/// The name the reactor saves its position under.
const NAME: &str = "quota";

/// Follows the log until cancelled, resuming where it stopped, and tells the service how far it has recorded
/// (for admissions that wait for what their caller saw).
pub async fn run(svc: QuotaService, ctx: ServiceContext) {
    // Everything up to the saved position was recorded before a restart.
    if let Ok(saved) = ctx.store.load_checkpoint(NAME).await {
        svc.recorded_up_to(saved);
    }
    // Shared, not cloned per event: the service holds a client of every other service.
    let svc = std::sync::Arc::new(svc);
    nsml_common::reactor::run(
        NAME,
        ctx.store.clone(),
        ctx.bus.clone(),
        ctx.cancel.clone(),
        |ev| {
            let svc = svc.clone();
            async move {
                handle(&svc, &ev).await?;
                // Only once recorded: a fact whose recording failed is retried, and until then an admission
                // waiting for it waits rather than decide without it. Events come in position order.
                svc.recorded_up_to(ev.position);
                Ok::<_, nsml_eventstore::StoreError>(())
            }
        },
    )
    .await;
}

fn release(
    session: &str,
    cause: &str,
    at_ms: i64,
    only_if: fn(SessionKind) -> bool,
) -> impl Fn(&crate::domain::Ledger) -> Option<nsml_eventstore::NewEvent> {
    let session = session.to_string();
    let cause = cause.to_string();
    move |l| {
        let h = l.holdings.get(&session)?;
        if !only_if(h.kind) {
            return None;
        }
        Some(new_event(
            &ResourcesReleased {
                session: session.clone(),
                resources: Some(h.resources),
                cause: cause.clone(),
                at_ms,
            },
            "service:quota",
            "",
        ))
    }
}

fn not_trial(k: SessionKind) -> bool {
    k != SessionKind::TrialSubmit
}

fn any(_: SessionKind) -> bool {
    true
}

fn submit_outcome(
    sub: &Submission,
    succeeded: bool,
) -> impl Fn(&crate::domain::Ledger) -> Option<nsml_eventstore::NewEvent> {
    let sub = sub.clone();
    move |l| {
        let (dataset, submitted_at) = l.granted_submits.get(&sub.id)?.clone();
        let st = l.submits.get(&dataset)?;
        if !st.in_flight.contains_key(&sub.id) {
            return None;
        }
        Some(if succeeded {
            new_event(
                &SubmitSucceeded {
                    dataset,
                    submission_id: sub.id.clone(),
                    at_ms: submitted_at,
                },
                "service:quota",
                "",
            )
        } else {
            new_event(
                &SubmitEnded {
                    dataset,
                    submission_id: sub.id.clone(),
                    succeeded: false,
                    at_ms: sub.finished_at_ms,
                },
                "service:quota",
                "",
            )
        })
    }
}

async fn handle(svc: &QuotaService, ev: &StoredEvent) -> Result<(), nsml_eventstore::StoreError> {
    let at = ev.metadata.recorded_at_ms;
    let session_fact = if let Some(e) = decode::<SessionExited>(ev) {
        Some((e.name, "exited", not_trial as fn(SessionKind) -> bool))
    } else if let Some(e) = decode::<SessionFailed>(ev) {
        Some((e.name, "failed", not_trial as fn(SessionKind) -> bool))
    } else if let Some(e) = decode::<SessionStopped>(ev) {
        Some((e.name, "stopped", any as fn(SessionKind) -> bool))
    } else {
        decode::<SessionRemoved>(ev).map(|e| (e.name, "removed", any as fn(SessionKind) -> bool))
    };
    if let Some((name, cause, only_if)) = session_fact {
        let Ok(sn) = SessionName::parse(&name) else {
            return Ok(());
        };
        return svc
            .record(&sn.team, release(&name, cause, at, only_if))
            .await;
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
        return svc.record(&sub.team, submit_outcome(&sub, ok)).await;
    }
    Ok(())
}
