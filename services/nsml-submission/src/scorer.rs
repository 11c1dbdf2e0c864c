//! The scorer's task: scores each submission whose predictions were taken, off the RPC that handed them
//! over, and records the outcome.
//!
//! It fetches what a score needs (the dataset's metric and split, the hidden labels, the evaluation script),
//! runs the pure [`crate::scoring::score`] on a blocking thread (or the host's script as a child process),
//! and ends the submission Scored or Failed. At start, and every minute, it also picks up every submission
//! left Scoring (by a restart of the service, or an outcome the store did not take): one whose predictions
//! are spooled is scored, one whose predictions were lost fails with the reason.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nsml_common::clients::datasets::{FetchPartError, fetch_part};
use nsml_proto::v1::{DatasetMeta, DatasetPart, Submission, SubmissionStatus};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::domain::{EndedBy, Ending};
use crate::error::SubmissionError;
use crate::handler::Handler;
use crate::scoring::{self, Partition};

/// How many submissions are scored at once.
const PARALLEL: usize = 4;
/// How long a host's evaluation script may run.
const EVAL_TIMEOUT: Duration = Duration::from_secs(600);
/// How long one submission's scoring may take in all: fetching, then the script or the metric.
const SCORE_TIMEOUT: Duration = Duration::from_secs(900);
/// How often submissions left Scoring are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// The largest labels file or evaluation script read into memory, packed (a gzip'd tar) and unpacked.
const MAX_PART_BYTES: usize = 1 << 30;
/// Why a submission whose predictions were lost fails.
const LOST: &str = "the submission service restarted before scoring the predictions, and they were lost; submit again";

/// Scores what the handler schedules and what a sweep finds, until cancelled; waits for the scores under
/// way before returning.
pub async fn run(
    handler: Arc<Handler>,
    mut queue: mpsc::UnboundedReceiver<(String, String)>,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(PARALLEL));
    let busy: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut jobs = tokio::task::JoinSet::new();
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    loop {
        let ids = tokio::select! {
            _ = cancel.cancelled() => break,
            id = queue.recv() => match id {
                Some(scheduled) => vec![scheduled],
                None => break,
            },
            _ = sweep.tick() => left_scoring(&handler)
                .await
                .into_iter()
                .map(|id| (id, String::new()))
                .collect(),
            Some(_) = jobs.join_next(), if !jobs.is_empty() => continue,
        };
        for (id, from) in ids {
            let fresh = busy
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.clone());
            if !fresh {
                continue;
            }
            let (handler, slots, busy) = (handler.clone(), slots.clone(), busy.clone());
            jobs.spawn(async move {
                // The semaphore is never closed, so a permit always comes.
                let _slot = slots.acquire_owned().await;
                let span = nsml_common::telemetry::span_in(
                    &from,
                    || tracing::info_span!(parent: None, "score", submission = %id),
                );
                score_one(&handler, &id).instrument(span).await;
                busy.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            });
        }
    }
    // An evaluation script is killed with its task; the submission stays Scoring and is scored again at
    // the next start.
    jobs.shutdown().await;
}

/// The submissions left Scoring; spooled predictions of submissions that ended are removed on the way.
async fn left_scoring(handler: &Handler) -> Vec<String> {
    let scoring: Vec<String> = handler.read(|p| {
        p.open()
            .filter(|s| s.status() == SubmissionStatus::Scoring)
            .map(|s| s.id.clone())
            .collect()
    });
    for id in handler.spool().ids().await {
        // Only ended ones: a Running submission's predictions may be spooled just before it turns Scoring.
        let ended = handler.read(|p| {
            p.get(&id).is_some_and(|s| {
                matches!(
                    s.status(),
                    SubmissionStatus::Scored
                        | SubmissionStatus::Failed
                        | SubmissionStatus::TimedOut
                )
            })
        });
        if ended {
            handler.spool().remove(&id).await;
        }
    }
    scoring
}

/// Scores one submission and records the outcome; on a failure to record it, the submission stays Scoring
/// for the next sweep.
async fn score_one(handler: &Handler, id: &str) {
    let sub = match handler.load(id).await {
        Ok(state) => state.submission,
        Err(err) => {
            tracing::error!(%err, submission = %id, "could not read a submission to score");
            return;
        }
    };
    let Some(sub) = sub.filter(|s| s.status() == SubmissionStatus::Scoring) else {
        handler.spool().remove(id).await;
        return;
    };
    let started = std::time::Instant::now();
    let ending = match handler.spool().read(id).await {
        Ok(Some(predictions)) => {
            match tokio::time::timeout(SCORE_TIMEOUT, outcome(handler, &sub, predictions)).await {
                Ok(Ok(ending)) => ending,
                Err(_) => {
                    tracing::error!(submission = %id, "scoring a submission did not finish in time");
                    Ending::Failed(format!(
                        "the scorer could not score the predictions within {} seconds; submit again",
                        SCORE_TIMEOUT.as_secs()
                    ))
                }
                Ok(Err(err)) => {
                    tracing::error!(%err, submission = %id, "could not score a submission");
                    Ending::Failed(format!(
                        "the scorer could not score the predictions ({}); submit again",
                        err.reason()
                    ))
                }
            }
        }
        Ok(None) => Ending::Failed(LOST.into()),
        Err(err) => {
            tracing::error!(%err, submission = %id, "could not read spooled predictions");
            Ending::Failed(LOST.into())
        }
    };
    let outcome = match &ending {
        Ending::Scored { .. } => "scored",
        Ending::Failed(_) => "failed",
        Ending::TimedOut(_) => "timed_out",
    };
    metrics::histogram!("nsml_scoring_duration_seconds", "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
    match handler.end(id, ending, EndedBy::Scorer).await {
        Ok(()) => handler.spool().remove(id).await,
        Err(err) => tracing::error!(%err, submission = %id, "could not record a score"),
    }
}

/// What the scorer could not do: the platform's fault, not the participant's.
#[derive(Debug, thiserror::Error)]
enum ScorerError {
    #[error("{0}")]
    Service(#[from] SubmissionError),
    #[error("{0}")]
    Fetch(#[from] FetchPartError),
    #[error("{what}: {source}")]
    Read {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Archive {
        what: &'static str,
        source: nsml_archive::ArchiveError,
    },
    #[error("the hidden labels cannot be read: {0}")]
    Labels(scoring::ScoreError),
    #[error("the scoring thread stopped: {0}")]
    Thread(#[from] tokio::task::JoinError),
}

impl ScorerError {
    /// The part of the failure a participant may read: what could not be done, never the labels.
    fn reason(&self) -> &'static str {
        match self {
            ScorerError::Service(_) => "the dataset could not be looked up",
            ScorerError::Fetch(_) | ScorerError::Read { .. } | ScorerError::Archive { .. } => {
                "the hidden labels could not be fetched"
            }
            ScorerError::Labels(_) => "the dataset's hidden labels are malformed; tell the host",
            ScorerError::Thread(_) => "the scorer stopped",
        }
    }
}

/// How a submission ends with these predictions.
async fn outcome(
    handler: &Handler,
    sub: &Submission,
    predictions: String,
) -> Result<Ending, ScorerError> {
    let meta = handler
        .dataset(&sub.dataset)
        .await?
        .meta
        .unwrap_or_default();
    let part = if sub.trial {
        DatasetPart::TrialLabel
    } else {
        DatasetPart::TestLabel
    };
    let labels_csv = fetch_file(handler, &sub.dataset, part, "reading hidden labels").await?;
    if !meta.eval_script.is_empty() {
        return eval_script(handler, sub, predictions, labels_csv).await;
    }
    let Some(metric) = scoring::Metric::parse(&meta.metric) else {
        return Ok(Ending::Failed(format!(
            "dataset `{}` has an unknown metric `{}`",
            sub.dataset, meta.metric
        )));
    };
    let partition = partition(sub, &meta);
    tokio::task::spawn_blocking(move || {
        let labels = scoring::parse_labels(&labels_csv).map_err(ScorerError::Labels)?;
        Ok(
            match scoring::score(&labels, &predictions, &partition, metric) {
                Ok(s) => Ending::Scored {
                    score: s.public,
                    private: s.private,
                },
                Err(e) => Ending::Failed(e.to_string()),
            },
        )
    })
    .await?
}

/// The parts a submission is scored on: the whole trial set, or the test set's public and private parts.
fn partition(sub: &Submission, meta: &DatasetMeta) -> Partition {
    if sub.trial {
        Partition::Whole
    } else {
        Partition::PublicPrivate {
            private_keys: meta.private_keys.clone(),
            fraction: meta.private_fraction,
            seed: meta.split_seed,
        }
    }
}

/// Scores with the host's evaluation script (datasets whose metric is `custom`).
async fn eval_script(
    handler: &Handler,
    sub: &Submission,
    predictions: String,
    labels_csv: String,
) -> Result<Ending, ScorerError> {
    let read = |source| ScorerError::Read {
        what: "preparing the evaluation script",
        source,
    };
    let code = fetch_file(
        handler,
        &sub.dataset,
        DatasetPart::EvalScript,
        "reading the evaluation script",
    )
    .await?;
    let dir = tempfile::tempdir().map_err(read)?;
    let script = dir.path().join("eval.py");
    tokio::fs::write(&script, code).await.map_err(read)?;
    Ok(
        match scoring::eval_script::run_eval_script(
            handler.python(),
            &script,
            &predictions,
            &labels_csv,
            EVAL_TIMEOUT,
        )
        .await
        {
            Ok(score) => Ending::Scored {
                score,
                private: None,
            },
            Err(e) => {
                if let scoring::ScoreError::EvalFailed { stderr, .. } = &e {
                    tracing::warn!(submission = %sub.id, %stderr, "the evaluation script failed");
                }
                Ending::Failed(e.to_string())
            }
        },
    )
}

/// The first file of a dataset part (a gzip'd tar holding one file).
async fn fetch_file(
    handler: &Handler,
    dataset: &str,
    part: DatasetPart,
    what: &'static str,
) -> Result<String, ScorerError> {
    let archive = fetch_part(handler.clients(), dataset, part, MAX_PART_BYTES).await?;
    tokio::task::spawn_blocking(move || {
        nsml_archive::first_file(archive.as_slice(), MAX_PART_BYTES as u64)
    })
    .await?
    .map_err(|source| ScorerError::Archive { what, source })
}
