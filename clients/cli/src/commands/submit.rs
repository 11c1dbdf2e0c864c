//! `submit [-t] SESSION CHECKPOINT`: starts a submit and narrates it until it is scored, fails or times out.
//!
//! A trial submit's output is shown as it runs. A real submit's logs are hidden from participants, so its
//! progress is told from the submission's status, polled every 300 ms.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use nsml_proto::v1::{GetSubmissionRequest, Submission, SubmissionStatus, SubmitRequest};
use tonic::Code;

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
    // Sent again only while it never reached the server: a submit carries no idempotency key, so a repeat
    // of one that arrived would be a second submit.
    let mut submission = retry::unsent("the submit", || {
        let mut client = api.submission();
        let request = request.clone();
        async move { client.submit(request).await }
    })
    .await?
    .into_inner();
    let started = Instant::now();
    let mut narrator = Narrator::default();

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
                    matches!(s.code(), Code::NotFound | Code::PermissionDenied)
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

/// Prints each stage of a submit once, in order.
#[derive(Debug, Default)]
struct Narrator {
    session_shown: bool,
    running_shown: bool,
    scoring_shown: bool,
}

impl Narrator {
    fn show(&mut self, submission: &Submission) {
        if !self.session_shown && !submission.session.is_empty() {
            self.session_shown = true;
            println!("Session {} ready", submission.session);
        }
        let status = submission.status();
        let reached_running = matches!(
            status,
            SubmissionStatus::Running | SubmissionStatus::Scoring | SubmissionStatus::Scored
        );
        if reached_running && !self.running_shown {
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
