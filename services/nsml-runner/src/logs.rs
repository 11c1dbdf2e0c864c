//! A session's output on its way to the session service.
//!
//! Readers cut the child's stdout and stderr into lines ([`pump_lines`]); platform messages join them
//! as stream `nsml`. Every line goes through one channel to [`forward_logs`], which numbers the lines
//! (`seq` from 1, in the order the channel delivers them) and sends them as batches on one long-lived
//! client stream per session. A batch is whatever has arrived by the time the previous one left, so a
//! line never waits for company: under load batches grow, when idle each line goes at once.
//!
//! A session's output is capped ([`LogBudget`]): past the cap one platform line says so and the rest
//! is read and dropped, so the process never blocks on a full pipe and the log store never fills.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use nsml_common::clients::retry::Backoff;
use nsml_proto::internal::v1::RunnerLogBatch;
use nsml_proto::v1::LogLine;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The longest line sent; longer output (including output with no newline at all) is cut into pieces.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// Text per batch, well under the gRPC message limit.
const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// Lines buffered between the readers and the forwarder; when full, the child blocks on its writes.
const LINE_BUFFER: usize = 4096;
/// How long the session service may stay away before lines are dropped: through a 30 s restart.
const OUTAGE_BUDGET: Duration = crate::platform::RETRY_BUDGET;
/// How long a log stream must have been open to count as healthy again.
const HEALTHY_AFTER: Duration = Duration::from_secs(1);

/// The `stream` of a line.
pub const STDOUT: &str = "stdout";
/// The `stream` of a line.
pub const STDERR: &str = "stderr";
/// The `stream` of a platform message.
pub const NSML: &str = "nsml";

/// Hands a session's lines to its forwarder. Cheap to clone; the forwarder finishes once every clone
/// is dropped.
#[derive(Debug, Clone)]
pub struct LogSender {
    tx: mpsc::Sender<LogLine>,
}

impl LogSender {
    /// A sender and the receiving end for [`forward_logs`] (or a test).
    pub fn channel() -> (Self, mpsc::Receiver<LogLine>) {
        let (tx, rx) = mpsc::channel(LINE_BUFFER);
        (Self { tx }, rx)
    }

    /// Queues one line of `stream`; `seq` is set by the forwarder.
    pub async fn send(&self, stream: &str, text: impl Into<String>) {
        let line = LogLine {
            seq: 0,
            at_ms: nsml_common::now_ms(),
            stream: stream.to_string(),
            text: text.into(),
        };
        // A closed channel means the session is over and its logs flushed: nothing left to tell.
        let _ = self.tx.send(line).await;
    }

    /// Queues a platform message (stream `nsml`).
    pub async fn nsml(&self, text: impl Into<String>) {
        self.send(NSML, text).await;
    }
}

/// The output a session may still log, shared by its stdout and stderr readers.
#[derive(Debug)]
pub struct LogBudget {
    limit: u64,
    used: AtomicU64,
    announced: AtomicBool,
}

impl LogBudget {
    /// A budget of `limit` bytes (each line counts its text and its newline).
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicU64::new(0),
            announced: AtomicBool::new(false),
        })
    }

    /// No cap.
    pub fn unlimited() -> Arc<Self> {
        Self::new(u64::MAX)
    }

    /// Whether output has been dropped.
    pub fn exceeded(&self) -> bool {
        self.announced.load(Ordering::Relaxed)
    }

    /// Sends one line of output if the budget allows; the first line that does not fit is replaced
    /// by the notice, the later ones by nothing.
    async fn emit(&self, logs: &LogSender, stream: &str, line: &[u8]) {
        let n = line.len() as u64 + 1;
        let before = self.used.fetch_add(n, Ordering::Relaxed);
        if before.saturating_add(n) <= self.limit {
            logs.send(stream, String::from_utf8_lossy(line)).await;
        } else if !self.announced.swap(true, Ordering::Relaxed) {
            logs.nsml(crate::limits::log_limit_line(self.limit)).await;
        }
    }
}

/// Where `bytes` can be cut without splitting a UTF-8 character at its end.
fn utf8_cut(bytes: &[u8]) -> usize {
    let n = bytes.len();
    for back in 1..=n.min(4) {
        let b = bytes[n - back];
        if b & 0xC0 != 0x80 {
            let need = match b {
                0x00..=0x7F => 1,
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                _ => 4,
            };
            return if need > back { n - back } else { n };
        }
    }
    n
}

/// Reads `reader` to its end and sends each line as `stream`. A line ends at `\n`, `\r\n` or a lone `\r`
/// (progress bars redraw with `\r`); a line longer than [`MAX_LINE_BYTES`] is sent in pieces; invalid
/// UTF-8 is replaced. Lines past `budget` are dropped.
pub async fn pump_lines<R: AsyncRead + Unpin>(
    reader: R,
    stream: &'static str,
    logs: LogSender,
    budget: Arc<LogBudget>,
) {
    let mut reader = BufReader::with_capacity(MAX_LINE_BYTES, reader);
    let mut line: Vec<u8> = Vec::new();
    let mut after_cr = false;
    // The current line so far was sent in pieces and nothing came since: its newline ends it silently.
    let mut just_cut = false;
    loop {
        let buf = match reader.fill_buf().await {
            Ok([]) => break,
            Ok(buf) => buf,
            Err(e) => {
                tracing::debug!(error = %e, stream, "output read failed");
                break;
            }
        };
        if budget.exceeded() {
            // Nothing more will be sent: drain without cutting lines.
            let n = buf.len();
            reader.consume(n);
            line.clear();
            continue;
        }
        let mut start = 0;
        if after_cr {
            after_cr = false;
            if buf[0] == b'\n' {
                start = 1;
            }
        }
        let room = MAX_LINE_BYTES - line.len();
        let window = &buf[start..buf.len().min(start + room)];
        let (used, done) = match window.iter().position(|&b| b == b'\n' || b == b'\r') {
            Some(p) => {
                line.extend_from_slice(&window[..p]);
                after_cr = window[p] == b'\r';
                (start + p + 1, true)
            }
            None => {
                line.extend_from_slice(window);
                (start + window.len(), false)
            }
        };
        reader.consume(used);
        if done {
            if !(just_cut && line.is_empty()) {
                budget.emit(&logs, stream, &line).await;
            }
            line.clear();
            just_cut = false;
        } else if line.len() >= MAX_LINE_BYTES {
            let cut = utf8_cut(&line);
            let rest = line.split_off(cut);
            budget.emit(&logs, stream, &line).await;
            line = rest;
            just_cut = line.is_empty();
        } else if !line.is_empty() {
            just_cut = false;
        }
    }
    if !line.is_empty() {
        budget.emit(&logs, stream, &line).await;
    }
}

/// An open log stream: the sending side of its batches and the call that ends when the stream does.
pub type LogStream = (
    mpsc::Sender<RunnerLogBatch>,
    JoinHandle<Result<(), tonic::Status>>,
);

/// Numbers and batches the lines of `rx` and sends them on streams made by `open`, reopening (with
/// backoff) when a stream breaks. Returns once `rx` is closed and the last stream has been answered,
/// i.e. when every line has reached the service (or, if it stayed away through every reopen, been
/// given up on with a warning).
pub async fn forward_logs<F, Fut>(name: String, mut rx: mpsc::Receiver<LogLine>, open: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = LogStream>,
{
    let mut seq = 0u64;
    let mut current: Option<(LogStream, Instant)> = None;
    // When streams started failing, and the waits between reopens since. Past the budget, batches that fail
    // are dropped at once rather than holding up the session (whose output would otherwise back up behind
    // the retries).
    let mut failing_since: Option<Instant> = None;
    let mut waits = Backoff::THROUGH_RESTART.waits();
    while let Some(first) = rx.recv().await {
        let mut bytes = first.text.len();
        let mut lines = vec![first];
        while bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(line) => {
                    bytes += line.text.len();
                    lines.push(line);
                }
                Err(_) => break,
            }
        }
        for line in &mut lines {
            seq += 1;
            line.seq = seq;
        }
        let mut batch = RunnerLogBatch {
            name: name.clone(),
            lines,
        };
        loop {
            if current
                .as_ref()
                .is_some_and(|((_, call), _)| call.is_finished())
            {
                end_stream(&name, current.take().map(|(s, _)| s)).await;
            }
            let ((tx, _), opened) = match &mut current {
                Some(c) => c,
                None => current.insert((open().await, Instant::now())),
            };
            match tx.send(batch).await {
                Ok(()) => {
                    // A send only reaches a buffer; a stream that has lived a while is really up.
                    if opened.elapsed() >= HEALTHY_AFTER {
                        failing_since = None;
                        waits = Backoff::THROUGH_RESTART.waits();
                    }
                    break;
                }
                Err(mpsc::error::SendError(back)) => {
                    batch = back;
                    end_stream(&name, current.take().map(|(s, _)| s)).await;
                    if failing_since.get_or_insert_with(Instant::now).elapsed() > OUTAGE_BUDGET {
                        tracing::warn!(session = %name, lines = batch.lines.len(), "session service unreachable, dropping log lines");
                        break;
                    }
                    tokio::time::sleep(waits.next().unwrap_or(Duration::from_secs(1))).await;
                }
            }
        }
    }
    end_stream(&name, current.map(|(s, _)| s)).await;
}

/// Closes a stream and waits for the service's answer, which says whether all of it arrived.
async fn end_stream(name: &str, stream: Option<LogStream>) {
    let Some((tx, call)) = stream else { return };
    drop(tx);
    match tokio::time::timeout(Duration::from_secs(30), call).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(status))) => {
            tracing::warn!(session = %name, code = ?status.code(), message = status.message(), "log stream failed");
        }
        Ok(Err(e)) => tracing::warn!(session = %name, error = %e, "log stream task failed"),
        Err(_) => tracing::warn!(session = %name, "log stream not answered in 30 s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines_of(input: &[u8]) -> Vec<String> {
        let (logs, mut rx) = LogSender::channel();
        pump_lines(input, STDOUT, logs, LogBudget::unlimited()).await;
        let mut out = Vec::new();
        while let Some(l) = rx.recv().await {
            out.push(l.text);
        }
        out
    }

    #[tokio::test]
    async fn cuts_lines_at_newlines_and_carriage_returns() {
        assert_eq!(
            lines_of(b"a\nb\r\nc\rd\n\ne").await,
            ["a", "b", "c", "d", "", "e"]
        );
        assert_eq!(lines_of(b"").await, Vec::<String>::new());
        assert_eq!(lines_of(b"x\r").await, ["x"]);
    }

    #[tokio::test]
    async fn cuts_long_lines_at_64_kib_on_character_boundaries() {
        // Three-byte characters do not divide 64 KiB: a cut must not split one.
        let long = "한".repeat(MAX_LINE_BYTES / 2);
        let out = lines_of(format!("{long}\nend").as_bytes()).await;
        assert_eq!(
            out.iter().map(String::len).collect::<Vec<_>>(),
            [MAX_LINE_BYTES - 1, long.len() - (MAX_LINE_BYTES - 1), 3]
        );
        assert_eq!(out[..2].concat(), long);
        assert_eq!(out[2], "end");
        // A line of exactly 64 KiB is one line, not a line and an empty one.
        let exact = "x".repeat(MAX_LINE_BYTES);
        assert_eq!(
            lines_of(format!("{exact}\nnext\n").as_bytes()).await,
            [exact.as_str(), "next"]
        );
        // With no newline at all, output still flows out in pieces.
        let out = lines_of(&vec![b'x'; 3 * MAX_LINE_BYTES + 5]).await;
        assert_eq!(
            out.iter().map(String::len).collect::<Vec<_>>(),
            [MAX_LINE_BYTES, MAX_LINE_BYTES, MAX_LINE_BYTES, 5]
        );
    }

    #[tokio::test]
    async fn output_past_the_budget_is_dropped_after_one_notice() {
        let (logs, mut rx) = LogSender::channel();
        let budget = LogBudget::new(10);
        // Two readers share the budget: 4 + 4 bytes fit, the next line does not.
        pump_lines(&b"abc\n"[..], STDOUT, logs.clone(), budget.clone()).await;
        pump_lines(&b"def\nghi\njkl\n"[..], STDERR, logs, budget.clone()).await;
        let mut out = Vec::new();
        while let Some(l) = rx.recv().await {
            out.push((l.stream, l.text));
        }
        assert_eq!(
            out,
            [
                ("stdout".to_string(), "abc".to_string()),
                ("stderr".to_string(), "def".to_string()),
                (
                    "nsml".to_string(),
                    "log limit of 10 reached; further output is dropped".to_string()
                ),
            ]
        );
        assert!(budget.exceeded());
    }

    #[test]
    fn utf8_cut_keeps_partial_characters() {
        assert_eq!(utf8_cut("ab".as_bytes()), 2);
        assert_eq!(utf8_cut(&"aé".as_bytes()[..2]), 1);
        assert_eq!(utf8_cut("aé".as_bytes()), 3);
        assert_eq!(utf8_cut(&"a😀".as_bytes()[..4]), 1);
    }

    fn fake_stream(
        got: std::sync::Arc<std::sync::Mutex<Vec<RunnerLogBatch>>>,
        fail_first: bool,
    ) -> LogStream {
        let (tx, mut rx) = mpsc::channel::<RunnerLogBatch>(4);
        let call = tokio::spawn(async move {
            if fail_first {
                return Err(tonic::Status::unavailable("restarting"));
            }
            while let Some(b) = rx.recv().await {
                got.lock().unwrap().push(b);
            }
            Ok(())
        });
        (tx, call)
    }

    /// Lines written while the session service is away for 30 s reach it once it is back.
    #[tokio::test(start_paused = true)]
    async fn lines_wait_through_a_30_second_outage() {
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (logs, rx) = LogSender::channel();
        logs.send(STDOUT, "during".to_string()).await;
        drop(logs);
        let back_at = Instant::now() + Duration::from_secs(30);
        let g = got.clone();
        forward_logs("t/d/1".into(), rx, move || {
            let g = g.clone();
            async move {
                let down = Instant::now() < back_at;
                let s = fake_stream(g, down);
                if down {
                    // The call fails at once: let it, so the send finds the stream closed.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                s
            }
        })
        .await;
        let texts: Vec<String> = got
            .lock()
            .unwrap()
            .iter()
            .flat_map(|b| b.lines.iter().map(|l| l.text.clone()))
            .collect();
        assert_eq!(texts, ["during"]);
    }

    #[tokio::test]
    async fn numbers_lines_and_survives_a_broken_stream() {
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let opened = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (logs, rx) = LogSender::channel();
        for i in 0..5 {
            logs.send(if i % 2 == 0 { STDOUT } else { STDERR }, format!("l{i}"))
                .await;
        }
        drop(logs);
        let (g, o) = (got.clone(), opened.clone());
        forward_logs("t/d/1".into(), rx, move || {
            let first = o.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
            let g = g.clone();
            async move {
                // The first stream dies at once, as when the session service restarts.
                let s = fake_stream(g, first);
                if first {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                s
            }
        })
        .await;
        let batches = got.lock().unwrap();
        let lines: Vec<_> = batches.iter().flat_map(|b| b.lines.iter()).collect();
        assert_eq!(
            lines.iter().map(|l| l.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(
            lines.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(),
            ["l0", "l1", "l2", "l3", "l4"]
        );
        assert!(batches.iter().all(|b| b.name == "t/d/1"));
        assert!(opened.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    }
}
