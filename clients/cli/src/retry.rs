//! Riding out a short outage of the platform (a restart of the gateway or of a service behind it): calls that
//! may be repeated are retried with backoff for up to [`BUDGET`], after one line telling the user so.
//!
//! Only calls whose repeat is harmless go through [`idempotent`]: reads, and the following of a submit or a
//! log. A call that changes something (a submit) goes through [`unsent`], which sends it again only when it
//! never reached the server (the connection was refused), so that it is never made twice.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use nsml_proto::error::ErrorCode;
use tonic::{Code, Status};

/// How long a call is retried: through a 30 s restart and the start-up after it.
pub const BUDGET: Duration = Duration::from_secs(40);
/// The wait after the first failure; it doubles up to [`MAX_WAIT`].
const FIRST_WAIT: Duration = Duration::from_millis(200);
/// The longest wait between tries, short so that the platform's return is noticed within seconds.
const MAX_WAIT: Duration = Duration::from_secs(2);

/// Whether a status says the server could not be reached or is restarting.
pub fn is_unavailable(status: &Status) -> bool {
    ErrorCode::of_or_implied(status) == ErrorCode::Unavailable
        || (status.code() == Code::Unknown && std::error::Error::source(status).is_some())
}

/// Whether a call failed before anything reached the server: its connection was refused or never made.
pub fn never_sent(status: &Status) -> bool {
    let mut cause = std::error::Error::source(status);
    while let Some(e) = cause {
        if e.downcast_ref::<tonic::ConnectError>().is_some() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// Retries as the module says while `transient` holds for the failure and the budget lasts.
pub struct Retry {
    what: &'static str,
    started: Option<Instant>,
    wait: Duration,
    told: bool,
}

impl Retry {
    /// A retry of the calls that `what` names in its message (`following the submission`).
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            started: None,
            wait: FIRST_WAIT,
            told: false,
        }
    }

    /// Waits before the next try and returns true, or returns false when `status` is not worth a retry or
    /// the budget is spent.
    pub async fn again(&mut self, status: &Status, transient: fn(&Status) -> bool) -> bool {
        if !transient(status) {
            return false;
        }
        let started = *self.started.get_or_insert_with(Instant::now);
        if started.elapsed() >= BUDGET {
            return false;
        }
        if !self.told {
            self.told = true;
            eprintln!(
                "The NSML server is unavailable ({}); retrying {} for up to {} seconds",
                status.code().description(),
                self.what,
                BUDGET.as_secs()
            );
        }
        tokio::time::sleep(jittered(self.wait)).await;
        self.wait = (self.wait * 2).min(MAX_WAIT);
        true
    }

    /// Forgets a past outage: the call went through.
    pub fn reset(&mut self) {
        self.started = None;
        self.wait = FIRST_WAIT;
    }
}

/// A wait drawn from the upper half of `wait`, so that clients failed together do not return together.
fn jittered(wait: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let half = wait / 2;
    half + half.mul_f64(f64::from(nanos % 1000) / 1000.0)
}

/// Runs a call whose repeat is harmless, retrying it through an outage.
pub async fn idempotent<T, F, Fut>(what: &'static str, call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    retried(what, call, is_unavailable).await
}

/// Runs a call that must not be made twice, sending it again only while it never reached the server.
pub async fn unsent<T, F, Fut>(what: &'static str, call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    retried(what, call, never_sent).await
}

/// Runs `call` until it succeeds, fails in a way `transient` does not accept, or the budget is spent.
async fn retried<T, F, Fut>(
    what: &'static str,
    mut call: F,
    transient: fn(&Status) -> bool,
) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut retry = Retry::new(what);
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(status) if retry.again(&status, transient).await => {}
            Err(status) => return Err(status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn an_idempotent_call_is_retried_through_an_outage() {
        let calls = AtomicU32::new(0);
        let got = idempotent("the test", || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 10 {
                    Err(Status::unavailable("restarting"))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(got.ok(), Some(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_gives_up_after_the_budget_or_on_a_refusal() {
        let calls = AtomicU32::new(0);
        let got: Result<(), Status> = idempotent("the test", || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(Status::unavailable("down for good")) }
        })
        .await;
        assert_eq!(got.map_err(|s| s.code()), Err(Code::Unavailable));
        assert!(calls.load(Ordering::SeqCst) > 15);

        calls.store(0, Ordering::SeqCst);
        let got: Result<(), Status> = idempotent("the test", || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(Status::not_found("no such submission")) }
        })
        .await;
        assert_eq!(got.map_err(|s| s.code()), Err(Code::NotFound));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_submit_the_server_answered_unavailable_is_not_sent_again() {
        let calls = AtomicU32::new(0);
        let got: Result<(), Status> = unsent("the submit", || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(Status::unavailable("the submission service is restarting")) }
        })
        .await;
        assert!(got.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
