//! Reactors: consumers that turn other services' events into appends to their own streams (a session ended →
//! the quota ledger releases it). A reactor resumes from the position it saved, so a restart does not
//! re-handle the whole log; handlers must still be idempotent, because delivery is at least once.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use nsml_bus::{Bus, Delivery};
use nsml_eventstore::{EventStore, StoredEvent};
use tokio_util::sync::CancellationToken;

/// How often a reactor saves how far it got.
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// Attempts per event before a failing handler is logged and skipped.
const ATTEMPTS: u32 = 3;

async fn save(store: &dyn EventStore, name: &str, pos: u64, saved: &mut u64) {
    if pos == *saved {
        return;
    }
    match store.save_checkpoint(name, pos).await {
        Ok(()) => *saved = pos,
        Err(err) => tracing::warn!(reactor = name, %err, "cannot save the reactor's position"),
    }
}

/// Feeds every event after the reactor's saved position to `handle`, until `cancel`.
pub async fn run<F, Fut, E>(
    name: &'static str,
    store: Arc<dyn EventStore>,
    bus: Arc<dyn Bus>,
    cancel: CancellationToken,
    mut handle: F,
) where
    F: FnMut(Arc<StoredEvent>) -> Fut + Send,
    Fut: Future<Output = Result<(), E>> + Send,
    E: std::fmt::Display,
{
    let mut pos = match store.load_checkpoint(name).await {
        Ok(p) => p,
        Err(err) => {
            tracing::warn!(reactor = name, %err, "cannot load the reactor's position; starting from the beginning");
            0
        }
    };
    let mut saved = pos;
    let mut tick = tokio::time::interval(SAVE_EVERY);
    let delivery_lag = ::metrics::histogram!("nsml_bus_delivery_lag_seconds", "subscriber" => name);
    // Events read back at start-up are not late deliveries: lags count once the reactor has caught up.
    let mut live = false;
    loop {
        let mut stream = match nsml_bus::subscribe_log(store.clone(), bus.clone(), pos).await {
            Ok(s) => s,
            Err(err) => {
                tracing::error!(reactor = name, %err, "cannot subscribe to the log; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        };
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => {
                    save(store.as_ref(), name, pos, &mut saved).await;
                    return;
                }
                _ = tick.tick() => {
                    save(store.as_ref(), name, pos, &mut saved).await;
                    continue;
                }
                n = stream.next() => n,
            };
            match next {
                Some(Ok(Delivery::Event(ev))) => {
                    let at = ev.position;
                    if live {
                        crate::projection::record_lag(&delivery_lag, std::slice::from_ref(&ev));
                    }
                    // What the handler appends continues the trace of the event it handles.
                    crate::telemetry::handling(name, &ev, async {
                        for attempt in 1..=ATTEMPTS {
                            match handle(ev.clone()).await {
                                Ok(()) => break,
                                Err(err) if attempt == ATTEMPTS => {
                                    tracing::error!(reactor = name, position = at, %err, "giving up on an event");
                                }
                                Err(err) => {
                                    tracing::warn!(reactor = name, position = at, %err, "retrying an event");
                                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt)))
                                        .await;
                                }
                            }
                        }
                    })
                    .await;
                    pos = pos.max(at);
                }
                Some(Ok(Delivery::CaughtUp)) => live = true,
                Some(Ok(Delivery::Passed(at))) => pos = pos.max(at),
                Some(Err(err)) => tracing::warn!(reactor = name, %err, "log subscription error"),
                None => break,
            }
        }
    }
}
