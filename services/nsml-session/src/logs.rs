//! Session logs: appended to one file per session (JSON lines) and fanned out live to `logs -f` followers.
//!
//! A session has a live channel only while someone follows it: lines nobody follows go to the file alone,
//! and a session's channel goes when it ends, so an ended session kept for `ps` and its checkpoints costs
//! no memory here (a channel holds room for 4,096 lines).

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;

use nsml_proto::v1::LogLine;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// A live log event: a line, or the end of the session.
#[derive(Debug, Clone)]
pub enum Live {
    Line(LogLine),
    End,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    seq: u64,
    at: i64,
    s: String,
    t: String,
}

/// Where logs live.
pub struct LogStore {
    dir: PathBuf,
    live: Mutex<HashMap<String, broadcast::Sender<Live>>>,
    write_lock: Mutex<()>,
}

impl LogStore {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            live: Mutex::new(HashMap::new()),
            write_lock: Mutex::new(()),
        }
    }

    fn path(&self, session: &str) -> PathBuf {
        self.dir
            .join(format!("{}.jsonl", session.replace('/', "__")))
    }

    /// The session's live channel, while someone follows it.
    fn followed(&self, session: &str) -> Option<broadcast::Sender<Live>> {
        let mut live = self.live.lock();
        match live.get(session) {
            Some(tx) if tx.receiver_count() > 0 => Some(tx.clone()),
            Some(_) => {
                // Its followers left.
                live.remove(session);
                None
            }
            None => None,
        }
    }

    /// Subscribes to lines appended from now on.
    pub fn subscribe(&self, session: &str) -> broadcast::Receiver<Live> {
        self.live
            .lock()
            .entry(session.to_string())
            .or_insert_with(|| broadcast::channel(4096).0)
            .subscribe()
    }

    /// Appends lines to the session's log and hands them to followers.
    pub fn append(&self, session: &str, lines: &[LogLine]) -> std::io::Result<()> {
        {
            let _g = self.write_lock.lock();
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.path(session))?;
            let mut buf = Vec::new();
            for l in lines {
                let rec = Stored {
                    seq: l.seq,
                    at: l.at_ms,
                    s: l.stream.clone(),
                    t: l.text.clone(),
                };
                serde_json::to_writer(&mut buf, &rec).map_err(std::io::Error::other)?;
                buf.push(b'\n');
            }
            f.write_all(&buf)?;
        }
        if let Some(tx) = self.followed(session) {
            for l in lines {
                let _ = tx.send(Live::Line(l.clone()));
            }
        }
        Ok(())
    }

    /// Tells followers the session has ended, and lets its live channel go.
    pub fn end(&self, session: &str) {
        if let Some(tx) = self.live.lock().remove(session) {
            let _ = tx.send(Live::End);
        }
    }

    /// How many sessions have a live channel now.
    #[cfg(test)]
    fn channels(&self) -> usize {
        self.live.lock().len()
    }

    /// Reads the stored lines.
    pub fn read(&self, session: &str) -> std::io::Result<Vec<LogLine>> {
        let f = match std::fs::File::open(self.path(session)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for line in std::io::BufReader::new(f).lines() {
            let line = line?;
            if let Ok(r) = serde_json::from_str::<Stored>(&line) {
                out.push(LogLine {
                    seq: r.seq,
                    at_ms: r.at,
                    stream: r.s,
                    text: r.t,
                });
            }
        }
        Ok(out)
    }

    /// Deletes a removed session's log.
    pub fn remove(&self, session: &str) {
        let _ = std::fs::remove_file(self.path(session));
        self.live.lock().remove(session);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn line(seq: u64, text: &str) -> LogLine {
        LogLine {
            seq,
            at_ms: 1,
            stream: "stdout".into(),
            text: text.into(),
        }
    }

    #[test]
    fn only_followed_sessions_hold_a_live_channel() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::new(dir.path().to_path_buf());
        // Given a session nobody follows, when it logs and ends, then it keeps no channel, and its lines are
        // stored.
        logs.append("t/d/1", &[line(1, "a")]).unwrap();
        logs.end("t/d/1");
        assert_eq!(logs.channels(), 0);
        assert_eq!(logs.read("t/d/1").unwrap().len(), 1);

        // Given a follower, it gets the lines and the end, and the channel goes with the end.
        let mut rx = logs.subscribe("t/d/2");
        logs.append("t/d/2", &[line(1, "b")]).unwrap();
        assert_eq!(logs.channels(), 1);
        logs.end("t/d/2");
        assert_eq!(logs.channels(), 0);
        assert!(matches!(rx.try_recv().unwrap(), Live::Line(l) if l.text == "b"));
        assert!(matches!(rx.try_recv().unwrap(), Live::End));

        // A follower that left takes its channel with it at the next line.
        drop(logs.subscribe("t/d/3"));
        logs.append("t/d/3", &[line(1, "c")]).unwrap();
        assert_eq!(logs.channels(), 0);
    }
}
