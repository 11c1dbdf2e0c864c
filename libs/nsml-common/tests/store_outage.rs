//! A write while Postgres is down is answered `UNAVAILABLE`, which clients retry, not `INTERNAL`.
//!
//! The test runs a Postgres server of its own on a free port (never the machine's) and stops it; it is
//! skipped when `NSML_TEST_POSTGRES=skip`, when not run as root, or when no Postgres binaries are installed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::path::{Path, PathBuf};
use std::process::Command;

use nsml_eventstore::conformance::new_events;
use nsml_eventstore::{EventStore, ExpectedVersion, PostgresStore};

/// A Postgres server of the test's own, in a temporary directory owned by the `postgres` user.
struct OwnPostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

impl OwnPostgres {
    fn start() -> Option<Self> {
        if std::env::var("NSML_TEST_POSTGRES").is_ok_and(|v| v == "skip") {
            return None;
        }
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .find(|b| b.join("pg_ctl").is_file())?;
        if !Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
        {
            return None;
        }
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let pg = Self { bin, dir, port };
        pg.as_postgres(&["chown", "-R", "postgres:postgres"], &[pg.dir.path()]);
        let data = pg.data();
        pg.as_postgres(
            &[&pg.tool("initdb"), "-A", "trust", "-U", "postgres", "-D"],
            &[&data],
        );
        pg.ctl("start");
        Some(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn tool(&self, name: &str) -> String {
        self.bin.join(name).to_string_lossy().into_owned()
    }

    /// Runs a command as the `postgres` user (`chown` as root), and expects it to succeed.
    fn as_postgres(&self, args: &[&str], paths: &[&Path]) {
        let mut cmd = if args[0] == "chown" {
            Command::new("chown")
        } else {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", args[0]]);
            c
        };
        cmd.args(&args[1..]).args(paths);
        let out = cmd.output().expect("the command runs");
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn ctl(&self, what: &str) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log");
        let data = self.data();
        self.as_postgres(
            &[
                &self.tool("pg_ctl"),
                "-w",
                "-m",
                "fast",
                "-o",
                &options,
                "-l",
            ],
            &[&log, Path::new("-D"), &data, Path::new(what)],
        );
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let data = self.data();
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.tool("pg_ctl"))
            .args(["-m", "immediate", "-D"])
            .arg(&data)
            .arg("stop")
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_while_postgres_is_down_is_unavailable() {
    let Some(pg) = OwnPostgres::start() else {
        eprintln!("no Postgres of the test's own (skipped, not root, or not installed)");
        return;
    };
    let store = PostgresStore::connect(&pg.url()).await.expect("connect");
    store
        .append("s", ExpectedVersion::Any, new_events("up", 1))
        .await
        .expect("append while up");

    pg.ctl("stop");
    let err = store
        .append("s", ExpectedVersion::Any, new_events("down", 1))
        .await
        .expect_err("no append while Postgres is down");
    assert!(err.is_unavailable(), "not classed unavailable: {err:?}");
    let status = nsml_common::status::store("recording", err);
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");

    // Back up: the same store writes again.
    pg.ctl("start");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while let Err(e) = store
        .append("s", ExpectedVersion::Any, new_events("back", 1))
        .await
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no append after Postgres came back: {e}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    store.close().await;
}
