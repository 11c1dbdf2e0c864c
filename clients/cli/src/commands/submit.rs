//! `submit [-t] SESSION CHECKPOINT`: starts a submit and narrates it until it is scored, fails or times out.
//!
//! A trial submit's output is shown as it runs. A real submit's logs are hidden from participants, so its
//! progress is told from the submission's status, polled every 300 ms.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use std::collections::HashSet;

use nsml_proto::error::ErrorCode;
use nsml_proto::v1::{
    GetSubmissionRequest, ListSubmissionsRequest, Submission, SubmissionStatus, SubmitRequest,
};

use super::Context;
use super::sessions::print_logs;
use crate::Exit;
use crate::api::Api;
use crate::output::score;
use crate::retry;

const POLL: Duration = Duration::from_millis(300);

/// How long past its time limit the client keeps waiting for a submit's verdict before giving up on the server.
const GRACE: Duration = Duration::from_secs(300);

pub async fn submit(ctx: &Context, session: &str, checkpoint: &str, trial: bool) -> Result<()> {
    println!(
        "Submit {session}/{checkpoint}{}",
        if trial { " (trial)" } else { "" }
    );
    let api = ctx.api()?;
    let request = SubmitRequest {
        session: session.to_string(),
        checkpoint: checkpoint.to_string(),
        trial,
    };
    let dataset = session.split('/').nth(1).unwrap_or_default().to_string();
    // The team's submissions of the dataset before this one, to recognise it if the answer to the submit is
    // lost; without them (an older server, say) a lost answer is an error, as it always was.
    let before = submission_ids(&api, &dataset).await.ok();
    // Sent again only while it never reached the server: a submit carries no idempotency key, so a repeat
    // of one that arrived would be a second submit.
    let sent = retry::unsent("the submit", || {
        let mut client = api.submission();
        let request = request.clone();
        async move { client.submit(request).await }
    })
    .await;
    let mut submission = match (sent, before) {
        (Ok(answer), _) => answer.into_inner(),
        // The platform went away while the submit was in flight: it may have arrived. Look for it rather
        // than send a second one, and follow it if it is there.
        (Err(status), Some(before)) if retry::is_unavailable(&status) => {
            match arrived(&api, &dataset, &request, &before).await? {
                Some(found) => {
                    eprintln!(
                        "The answer to the submit was lost, but the submit reached the server as {}: following it",
                        found.id
                    );
                    found
                }
                None => return Err(status.into()),
            }
        }
        (Err(status), _) => return Err(status.into()),
    };
    let started = Instant::now();
    let mut narrator = Narrator {
        log_shown: trial,
        ..Narrator::default()
    };

    while submission.session.is_empty() && !finished(&submission) {
        check_patience(&submission, started)?;
        tokio::time::sleep(POLL).await;
        submission = get(&api, &submission.id).await?;
    }
    narrator.show(&submission);

    if trial && !finished(&submission) && !submission.session.is_empty() {
        match print_logs(&api, &submission.session, true).await {
            Ok(()) => {}
            // The session may already be gone, or its logs withheld: the status still tells the outcome.
            Err(e)
                if e.downcast_ref::<tonic::Status>().is_some_and(|s| {
                    matches!(
                        ErrorCode::of_or_implied(s),
                        ErrorCode::NotFound | ErrorCode::PermissionDenied
                    )
                }) => {}
            Err(e) => return Err(e),
        }
    }

    while !finished(&submission) {
        check_patience(&submission, started)?;
        tokio::time::sleep(POLL).await;
        submission = get(&api, &submission.id).await?;
        narrator.show(&submission);
    }
    narrator.show(&submission);
    conclude(&submission)
}

/// The ids of the caller's team's submissions of `dataset`.
async fn submission_ids(api: &Api, dataset: &str) -> Result<HashSet<String>, tonic::Status> {
    let listed = list(api, dataset).await?;
    Ok(listed.into_iter().map(|s| s.id).collect())
}

/// The caller's team's submissions of `dataset`, asked again through an outage of the platform.
async fn list(api: &Api, dataset: &str) -> Result<Vec<Submission>, tonic::Status> {
    let request = ListSubmissionsRequest {
        dataset: dataset.to_string(),
    };
    let listed = retry::idempotent("looking for the submit", || {
        let mut client = api.submission();
        let request = request.clone();
        async move { client.list(request).await }
    })
    .await?;
    Ok(listed.into_inner().submissions)
}

/// The submission `request` made, if it reached the server although its answer was lost: the newest one of
/// the same session, checkpoint and kind that was not there before it was sent.
async fn arrived(
    api: &Api,
    dataset: &str,
    request: &SubmitRequest,
    before: &HashSet<String>,
) -> Result<Option<Submission>> {
    let listed = list(api, dataset).await?;
    Ok(listed
        .into_iter()
        .filter(|s| {
            !before.contains(&s.id)
                && s.source_session == request.session
                && s.checkpoint == request.checkpoint
                && s.trial == request.trial
        })
        .max_by_key(|s| s.submitted_at_ms))
}

/// The submission's status, asked again through an outage of the platform.
async fn get(api: &Api, id: &str) -> Result<Submission> {
    let request = GetSubmissionRequest { id: id.to_string() };
    let got = retry::idempotent("following the submission", || {
        let mut client = api.submission();
        let request = request.clone();
        async move { client.get(request).await }
    })
    .await?;
    Ok(got.into_inner())
}

fn finished(submission: &Submission) -> bool {
    matches!(
        submission.status(),
        SubmissionStatus::Scored | SubmissionStatus::Failed | SubmissionStatus::TimedOut
    )
}

/// Gives up when the server lets a submit run well past its own time limit.
fn check_patience(submission: &Submission, started: Instant) -> Result<()> {
    let limit = Duration::from_secs(submission.time_limit_secs.max(60)) + GRACE;
    if started.elapsed() > limit {
        eprintln!(
            "Submit {} has not finished {} seconds after it started; check `nsml history` later",
            submission.id,
            started.elapsed().as_secs()
        );
        bail!(Exit(1));
    }
    Ok(())
}

/// Prints each stage of a submit once, in order. A trial submit's own log (which the caller sees) says when
/// its session is ready and what it infers; a real submit's log is hidden, so its stages are told here.
#[derive(Debug, Default)]
struct Narrator {
    /// The session's log is shown between the stages.
    log_shown: bool,
    session_shown: bool,
    running_shown: bool,
    scoring_shown: bool,
}

impl Narrator {
    fn show(&mut self, submission: &Submission) {
        if !self.session_shown && !submission.session.is_empty() {
            self.session_shown = true;
            if self.log_shown {
                println!("Session {} is started", submission.session);
            } else {
                println!("Session {} ready", submission.session);
            }
        }
        let status = submission.status();
        let reached_running = matches!(
            status,
            SubmissionStatus::Running | SubmissionStatus::Scoring | SubmissionStatus::Scored
        );
        if reached_running && !self.running_shown && !self.log_shown {
            self.running_shown = true;
            println!("Load model");
            println!(
                "Infer {} set. The inference should be completed within {} seconds.",
                if submission.trial { "trial" } else { "test" },
                submission.time_limit_secs
            );
        }
        let reached_scoring =
            matches!(status, SubmissionStatus::Scoring | SubmissionStatus::Scored);
        if reached_scoring && !self.scoring_shown {
            self.scoring_shown = true;
            println!("Scoring");
        }
    }
}

/// Prints the verdict: the score and `Done`, or why the submit failed (exit code 1).
fn conclude(submission: &Submission) -> Result<()> {
    match submission.status() {
        SubmissionStatus::Scored => {
            println!("Score: {}", score(submission.score));
            if let Some(private) = submission.private_score {
                println!("Private score: {}", score(private));
            }
            println!("Done");
            Ok(())
        }
        SubmissionStatus::TimedOut => {
            eprintln!(
                "Submit timed out after {} seconds",
                submission.time_limit_secs
            );
            bail!(Exit(1))
        }
        _ => {
            let reason = if submission.reason.is_empty() {
                "no reason given"
            } else {
                &submission.reason
            };
            eprintln!("Submit failed: {}", crate::output::clean(reason));
            bail!(Exit(1))
        }
    }
}
