//! Session logs: appended to one file per session (JSON lines) and fanned out live to `logs -f` followers.

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

    fn sender(&self, session: &str) -> broadcast::Sender<Live> {
        self.live
            .lock()
            .entry(session.to_string())
            .or_insert_with(|| broadcast::channel(4096).0)
            .clone()
    }

    /// Subscribes to lines appended from now on.
    pub fn subscribe(&self, session: &str) -> broadcast::Receiver<Live> {
        self.sender(session).subscribe()
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
        let tx = self.sender(session);
        for l in lines {
            let _ = tx.send(Live::Line(l.clone()));
        }
        Ok(())
    }

    /// Tells followers the session has ended.
    pub fn end(&self, session: &str) {
        let _ = self.sender(session).send(Live::End);
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
