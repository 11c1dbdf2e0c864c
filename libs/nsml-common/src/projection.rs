//! In-memory read models fed by the whole log: rebuilt from the start at every boot, then kept live.
//!
//! A [`Projection`] subscribes through [`nsml_bus::subscribe_log`], applies every event to its state and
//! publishes how far it got, so that a handler can wait until its own append is visible before answering
//! (read-your-writes for `ps` right after `run`).

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use nsml_bus::{Bus, Delivery};
use nsml_eventstore::{EventStore, StoredEvent};
use parking_lot::RwLock;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// State that folds events.
pub trait ReadModel: Default + Send + Sync + 'static {
    /// Every event type `apply` reads, when it reads only some: the catch-up at start-up then reads only these
    /// from the log, which costs a long log of other events little. `None` reads every event. A type missing
    /// here is missed at every start, so list each type `apply` decodes or looks at.
    const TYPES: Option<&'static [&'static str]> = None;

    /// Applies one event (of any type: ignore the ones that don't matter).
    fn apply(&mut self, event: &StoredEvent);
}

/// The most events applied under one lock: a long catch-up still lets readers in between bursts.
const BURST: usize = 256;

/// A read model kept up to date from the log.
pub struct Projection<S> {
    state: RwLock<S>,
    watermark: watch::Sender<u64>,
    ready: watch::Sender<bool>,
    stopped: CancellationToken,
}

impl<S: ReadModel> Projection<S> {
    /// Starts the projection: catches up from the log, then follows the bus until `cancel`.
    pub fn spawn(
        name: &'static str,
        store: Arc<dyn EventStore>,
        bus: Arc<dyn Bus>,
        cancel: CancellationToken,
    ) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let this = Arc::new(Self {
            state: RwLock::new(S::default()),
            watermark: watch::channel(0).0,
            ready: watch::channel(false).0,
            stopped: cancel.clone(),
        });
        let me = this.clone();
        register_lag_sampler(name, Arc::downgrade(&this), store.clone());
        let delivery_lag =
            ::metrics::histogram!("nsml_bus_delivery_lag_seconds", "subscriber" => name);
        let task = tokio::spawn(async move {
            loop {
                let subscribed = match S::TYPES {
                    Some(types) => {
                        nsml_bus::subscribe_log_of_types(store.clone(), bus.clone(), 0, types).await
                    }
                    None => nsml_bus::subscribe_log(store.clone(), bus.clone(), 0).await,
                };
                let stream = match subscribed {
                    Ok(s) => s,
                    Err(err) => {
                        tracing::error!(projection = name, %err, "cannot subscribe to the log; retrying");
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                        }
                    }
                };
                let mut stream = stream;
                let (began, mut applied) = (std::time::Instant::now(), 0_u64);
                // What ended the last burst, to be handled next.
                let mut held = None;
                let mut burst = Vec::with_capacity(BURST);
                loop {
                    let next = match held.take() {
                        Some(next) => next,
                        None => tokio::select! {
                            _ = cancel.cancelled() => return,
                            n = stream.next() => n,
                        },
                    };
                    match next {
                        Some(Ok(Delivery::Event(ev))) => {
                            // The events that are ready already are applied with it, under one lock and one
                            // wake-up of those waiting on the watermark.
                            burst.push(ev);
                            applied += 1;
                            while burst.len() < BURST {
                                match stream.next().now_or_never() {
                                    Some(Some(Ok(Delivery::Event(ev)))) => {
                                        burst.push(ev);
                                        applied += 1;
                                    }
                                    Some(other) => {
                                        held = Some(other);
                                        break;
                                    }
                                    None => break,
                                }
                            }
                            if *me.ready.borrow() {
                                record_lag(&delivery_lag, &burst);
                            }
                            me.apply(name, &burst);
                            burst.clear();
                        }
                        Some(Ok(Delivery::CaughtUp)) => {
                            tracing::info!(
                                projection = name,
                                events = applied,
                                position = me.position(),
                                "caught up with the log in {:.1?}",
                                began.elapsed()
                            );
                            me.ready.send_replace(true);
                        }
                        Some(Ok(Delivery::Passed(position))) => me.pass(position),
                        Some(Err(err)) => {
                            tracing::warn!(projection = name, %err, "log subscription error");
                        }
                        None => break,
                    }
                }
                // The subscription ended: resubscribing re-delivers from the start; skip what was applied.
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        });
        (this, task)
    }

    fn apply(&self, name: &'static str, events: &[Arc<StoredEvent>]) {
        // `subscribe_log` delivers each event once and in position order; a resubscription starts over from
        // the beginning, so anything at or below the watermark was applied already.
        let mut state = self.state.write();
        let applied = *self.watermark.borrow();
        let mut last = applied;
        // Once caught up, each event the read model uses is a span of the trace that appended it (when that
        // trace is exported); the catch-up at start-up replays old traces and is not.
        let mut applying = (*self.ready.borrow())
            .then(|| crate::telemetry::Applying::start(name))
            .flatten();
        for ev in events.iter().filter(|ev| ev.position > applied) {
            match &mut applying {
                Some(applying) => applying.one(ev, || state.apply(ev)),
                None => state.apply(ev),
            }
            last = ev.position;
        }
        if last != applied {
            self.watermark.send_replace(last);
        }
    }

    /// Counts the log as applied up to `position`, whose events up to it the read model does not use.
    fn pass(&self, position: u64) {
        // Under the state's lock, as `apply` moves the watermark.
        let _state = self.state.write();
        if position > *self.watermark.borrow() {
            self.watermark.send_replace(position);
        }
    }

    /// Reads the state.
    pub fn read<R>(&self, f: impl FnOnce(&S) -> R) -> R {
        f(&self.state.read())
    }

    /// Waits until every event up to `position` has been applied, for at most `timeout`. A caller decides
    /// what a lag means for it: after its own append the write is stored and only the read lags; before a
    /// decision it must not decide on a stale view.
    pub async fn wait_for(&self, position: u64, timeout: Duration) -> Result<(), Lagging> {
        let mut rx = self.watermark.subscribe();
        match tokio::time::timeout(timeout, rx.wait_for(|w| *w >= position)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Lagging {
                wanted: position,
                applied: self.position(),
                waited: timeout,
            }),
        }
    }

    /// Waits until the projection has caught up with the log as it was at start-up.
    pub async fn wait_ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// Whether the projection has caught up with the log as it was at start-up, as it changes: what a port
    /// waits on before it reports SERVING ([`crate::server::Port::started`]).
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// What a live view ([`crate::live::follow`]) follows: the position applied, which changes with every burst
    /// of events, and a token cancelled when the projection stops following the log (the process shuts down).
    pub fn live(&self) -> (watch::Receiver<u64>, CancellationToken) {
        (self.watermark.subscribe(), self.stopped.clone())
    }

    /// Position of the last event applied without gaps.
    pub fn position(&self) -> u64 {
        *self.watermark.borrow()
    }
}

/// Records, for each event of a live burst, how long after its commit it reached the subscriber.
pub(crate) fn record_lag(lag: &::metrics::Histogram, events: &[Arc<StoredEvent>]) {
    let now = crate::now_ms();
    for ev in events {
        lag.record(now.saturating_sub(ev.metadata.recorded_at_ms).max(0) as f64 / 1000.0);
    }
}

/// Has each scrape say how far the projection `name` has applied the log, and how far behind its head it is.
fn register_lag_sampler<S: ReadModel>(
    name: &'static str,
    projection: std::sync::Weak<Projection<S>>,
    store: Arc<dyn EventStore>,
) {
    let store = Arc::downgrade(&store);
    let position = ::metrics::gauge!("nsml_projection_position", "projection" => name);
    let lag = ::metrics::gauge!("nsml_projection_lag_events", "projection" => name);
    crate::metrics::sampler(move || {
        let (projection, store) = (projection.clone(), store.clone());
        let (position, lag) = (position.clone(), lag.clone());
        Box::pin(async move {
            let (Some(applied), Some(store)) =
                (projection.upgrade().map(|p| p.position()), store.upgrade())
            else {
                return;
            };
            position.set(applied as f64);
            if let Ok(head) = store.head_position().await {
                lag.set(head.saturating_sub(applied) as f64);
            }
        })
    });
}

/// A read model that had not applied the log up to a position within the time it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "this service's view of the log is at position {applied}, short of {wanted}, after {waited:?}"
)]
pub struct Lagging {
    /// The position waited for.
    pub wanted: u64,
    /// The position applied when the wait ended.
    pub applied: u64,
    /// How long was waited.
    pub waited: Duration,
}

impl From<Lagging> for tonic::Status {
    fn from(lag: Lagging) -> Self {
        tracing::warn!(%lag, "a read model lags behind the log");
        crate::error::ErrorCode::Unavailable
            .status("the platform is catching up with recent changes; retry shortly")
    }
}
