//! Live views: server streams that answer now, then again each time the log moves a read model and the answer
//! changed (the web UI's sessions, boards, submissions and quota, without polling).
//!
//! A view follows a projection's position ([`Projection::live`](crate::projection::Projection::live)),
//! so a change reaches the caller as soon as the event that made it is applied. A burst of events is answered
//! once: after a change the view waits [`COALESCE`] for the rest of the burst before computing again. A view
//! ends when the caller hangs up, when the process shuts down, or after [`LIFETIME`], so that a revoked token
//! or a changed membership is checked again when the client reconnects.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// How long after a change a view waits before answering again: the events of one burst become one message.
pub const COALESCE: Duration = Duration::from_millis(100);
/// How long one view stays open; clients reconnect, and are checked again.
pub const LIFETIME: Duration = Duration::from_secs(300);

/// The stream a live view returns.
pub type LiveStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Streams what `answer` returns, now and after every change of `changes` until `stopped`: an answer equal to
/// the last one sent is not sent again, `Ok(None)` sends nothing, and an error is sent and ends the stream.
pub fn follow<T, F, Fut>(
    mut changes: watch::Receiver<u64>,
    stopped: CancellationToken,
    mut answer: F,
) -> LiveStream<T>
where
    T: PartialEq + Clone + Send + 'static,
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<Option<T>, Status>> + Send,
{
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + LIFETIME;
        let mut last: Option<T> = None;
        loop {
            changes.borrow_and_update();
            match answer().await {
                Ok(Some(next)) if last.as_ref() != Some(&next) => {
                    if tx.send(Ok(next.clone())).await.is_err() {
                        return;
                    }
                    last = Some(next);
                }
                Ok(_) => {}
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = tx.closed() => return,
                _ = stopped.cancelled() => return,
                _ = tokio::time::sleep_until(deadline) => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(COALESCE) => {}
                _ = tx.closed() => return,
                _ = stopped.cancelled() => return,
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    const BOUND: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn answers_now_then_on_each_change_and_never_twice_the_same() {
        let (tx, rx) = watch::channel(0u64);
        let value = Arc::new(AtomicU64::new(1));
        let v = value.clone();
        let mut stream = follow(rx, CancellationToken::new(), move || {
            let now = v.load(Ordering::SeqCst);
            async move { Ok(Some(now)) }
        });
        let first = tokio::time::timeout(BOUND, stream.next()).await.unwrap();
        assert_eq!(first.unwrap().unwrap(), 1);
        // A change of position that leaves the answer as it was sends nothing.
        tx.send_replace(1);
        value.store(2, Ordering::SeqCst);
        tx.send_replace(2);
        let next = tokio::time::timeout(BOUND, stream.next()).await.unwrap();
        assert_eq!(next.unwrap().unwrap(), 2);
    }

    #[tokio::test]
    async fn ends_when_the_process_stops_and_sends_errors_once() {
        let (_tx, rx) = watch::channel(0u64);
        let stopped = CancellationToken::new();
        let mut stream = follow(rx, stopped.clone(), || async { Ok(Some(7u8)) });
        assert_eq!(stream.next().await.unwrap().unwrap(), 7);
        stopped.cancel();
        assert!(
            tokio::time::timeout(BOUND, stream.next())
                .await
                .unwrap()
                .is_none()
        );

        let (_tx, rx) = watch::channel(0u64);
        let mut stream = follow(rx, CancellationToken::new(), || async {
            Err::<Option<u8>, _>(Status::permission_denied("not yours"))
        });
        assert_eq!(
            stream.next().await.unwrap().unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert!(stream.next().await.is_none());
    }
}
