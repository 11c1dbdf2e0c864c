//! A start with no hand steps: the distributed deployment on a Postgres database that does not exist yet,
//! with its competition given on the command line; and an `nsmld` copied out of the repository running a
//! session with the Python SDK it carries inside.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, ensure};
use nsml_integration_tests::{User, bin, drop_stream, eventually, free_ports, repo_root, services};
use sqlx::{Connection, PgConnection};

const MAINTENANCE: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const LONG: Duration = Duration::from_secs(180);

/// Server processes, killed when the test ends however it ends.
#[derive(Default)]
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn database_exists(name: &str) -> anyhow::Result<bool> {
    let mut c = PgConnection::connect(MAINTENANCE).await?;
    let found: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut c)
            .await?;
    c.close().await?;
    Ok(found)
}

async fn drop_database(name: &str) {
    if let Ok(mut c) = PgConnection::connect(MAINTENANCE).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut c)
            .await;
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Signs `name` in with the password the example competition gives them.
fn login(server: &str, config_dir: &Path, cwd: &Path, name: &str) -> anyhow::Result<User> {
    std::fs::create_dir_all(config_dir)?;
    let u = User {
        server: server.to_string(),
        config_dir: config_dir.to_path_buf(),
        token: None,
    };
    let out = u
        .nsml_in(
            cwd,
            &["login", "-u", name, "--password-stdin"],
            &format!("{name}-pass\n"),
        )?
        .ok()?;
    ensure!(
        out.stdout.contains("Welcome to NSML!"),
        "login: {}",
        out.all()
    );
    Ok(u)
}

#[test]
fn serve_creates_its_database_prints_the_token_and_applies_the_competition() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let name = format!("nsml_it_{}", uuid::Uuid::new_v4().simple());
    let stream = format!("NSML_IT_{}", uuid::Uuid::new_v4().simple());
    ensure!(
        !rt.block_on(database_exists(&name))?,
        "{name} exists already"
    );
    let result = start_on_missing_database(&rt, &name, &stream);
    rt.block_on(drop_stream(&stream));
    rt.block_on(drop_database(&name));
    result
}

fn start_on_missing_database(
    rt: &tokio::runtime::Runtime,
    name: &str,
    stream: &str,
) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let data_dir = tmp.path().join("data");
    let [gateway, a, s, se, q, su, l] = free_ports();
    let config = format!(
        r#"data_dir = "{data}"
store = "postgres://postgres@127.0.0.1:5432/{name}"
bus = "nats://127.0.0.1:4222"
bus_stream = "{stream}"
internal_secret = "{secret}"
public_listen = "127.0.0.1:{gateway}"

[services]
auth = "127.0.0.1:{a}"
storage = "127.0.0.1:{s}"
session = "127.0.0.1:{se}"
quota = "127.0.0.1:{q}"
submission = "127.0.0.1:{su}"
leaderboard = "127.0.0.1:{l}"

[runner]
gpus = "0"
"#,
        data = data_dir.display(),
        secret = uuid::Uuid::new_v4().simple(),
    );
    let cfg = tmp.path().join("nsmld.toml");
    std::fs::write(&cfg, config)?;
    // It holds the internal secret: the session service refuses a configuration others may read.
    std::fs::set_permissions(&cfg, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let manifest = repo_root().join("examples/competition.toml");

    // A manifest given to a process without the gateway, or one that cannot be read, stops the start and
    // says why, before anything is opened.
    let out = Command::new(bin("nsmld"))
        .args(["serve", "auth", "--config"])
        .arg(&cfg)
        .arg("--competition")
        .arg(&manifest)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("process that runs `gateway`"),
        "--competition without the gateway: {err}"
    );
    let missing = tmp.path().join("no-such-competition.toml");
    let out = Command::new(bin("nsmld"))
        .args(["serve", "gateway", "--config"])
        .arg(&cfg)
        .arg("--competition")
        .arg(&missing)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains(&missing.display().to_string()),
        "a missing manifest: {err}"
    );
    ensure!(
        !rt.block_on(database_exists(name))?,
        "a start refused for its arguments created the database"
    );

    // All seven processes start at once against the missing database, as a host's supervisor starts them.
    let mut procs = Procs::default();
    let mut outputs = Vec::new();
    for svc in services() {
        let out_path = tmp.path().join(format!("{svc}.out"));
        let mut cmd = Command::new(bin("nsmld"));
        cmd.args(["serve", svc, "--config"]).arg(&cfg);
        if svc == "gateway" {
            cmd.arg("--competition").arg(&manifest);
        }
        let child = cmd
            .current_dir(tmp.path())
            .env_remove("NSML_TOKEN")
            .stdout(Stdio::from(std::fs::File::create(&out_path)?))
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start nsmld (is the workspace built?)")?;
        procs.0.push(child);
        outputs.push((svc, out_path));
    }
    let output_of = |svc: &str| {
        outputs
            .iter()
            .find(|(s, _)| *s == svc)
            .map(|(_, p)| read(p))
            .unwrap_or_default()
    };

    let applied = eventually(LONG, || {
        for c in &mut procs.0 {
            if let Some(status) = c.try_wait()? {
                anyhow::bail!("a server process ended with {status}");
            }
        }
        let out = output_of("gateway");
        Ok(out
            .lines()
            .find(|l| l.starts_with("competition `demo` applied from"))
            .map(str::to_string))
    })
    .context("the gateway did not apply the competition")?;
    ensure!(
        applied.ends_with(&manifest.display().to_string()),
        "applied line: {applied}"
    );

    ensure!(
        rt.block_on(database_exists(name))?,
        "{name} was not created"
    );
    let creators: Vec<&str> = outputs
        .iter()
        .filter(|(_, p)| read(p).contains("created the Postgres database"))
        .map(|(s, _)| *s)
        .collect();
    ensure!(
        creators.len() == 1,
        "one process should say it created the database, not {creators:?}"
    );

    let token_path = data_dir.join("admin.token");
    let want = format!(
        "host token in {p} (export NSML_TOKEN=$(cat {p}))",
        p = token_path.display()
    );
    let auth = output_of("auth");
    ensure!(auth.contains(&want), "auth printed: {auth}");
    let token_lines: usize = outputs
        .iter()
        .map(|(_, p)| read(p).matches("host token in").count())
        .sum();
    ensure!(
        token_lines == 1,
        "the token path is printed {token_lines} times"
    );

    // The token printed works, and the competition's users, teams and datasets are there.
    let host = User {
        server: format!("http://127.0.0.1:{gateway}"),
        config_dir: tmp.path().join("cli-host"),
        token: Some(std::fs::read_to_string(&token_path)?.trim().to_string()),
    };
    let who = host.nsml(&["whoami"])?.ok()?;
    ensure!(who.stdout.contains("admin"), "whoami: {}", who.all());
    let alice = login(
        &host.server,
        &tmp.path().join("cli-alice"),
        tmp.path(),
        "alice",
    )?;
    let datasets = alice.nsml_in(tmp.path(), &["dataset", "ls"], "")?.ok()?;
    ensure!(
        datasets.stdout.contains("t1-cls") && datasets.stdout.contains("t2-reg"),
        "dataset ls: {}",
        datasets.all()
    );
    Ok(())
}

#[test]
fn a_copied_binary_runs_a_session_with_the_sdk_it_carries() -> anyhow::Result<()> {
    // Nothing of the repository is beside the copy or under its working directory.
    let tmp = tempfile::tempdir()?;
    ensure!(
        !tmp.path().starts_with(repo_root()),
        "the temporary directory is inside the repository"
    );
    let nsmld = tmp.path().join("bin/nsmld");
    std::fs::create_dir_all(tmp.path().join("bin"))?;
    std::fs::copy(bin("nsmld"), &nsmld)?;
    let data_dir = tmp.path().join("data");
    let mut procs = Procs::default();
    let mut child = Command::new(&nsmld)
        .args(["up", "--data-dir"])
        .arg(&data_dir)
        .args(["--listen", "127.0.0.1:0", "--gpus", "0", "--competition"])
        .arg(repo_root().join("examples/competition.toml"))
        .current_dir(tmp.path())
        .env_remove("NSML_SDK_PATH")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().context("no stdout")?;
    procs.0.push(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(url) = line.strip_prefix("nsmld ready at ") {
                let _ = tx.send(url.trim().to_string());
            }
        }
    });
    let url = rx
        .recv_timeout(LONG)
        .context("the copied nsmld did not print `nsmld ready at`")?;

    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work)?;
    for f in ["main.py", ".nsmlignore"] {
        std::fs::copy(repo_root().join("examples/baseline").join(f), work.join(f))?;
    }
    let alice = login(&url, &tmp.path().join("cli-alice"), &work, "alice")?;
    let out = alice
        .nsml_in(
            &work,
            &[
                &["run", "-d", "t1-cls", "-e", "main.py"][..],
                &nsml_integration_tests::scenario::SMALL_RUN,
                &["-a", "--epochs 2"],
            ]
            .concat(),
            "",
        )?
        .ok()?;
    let session = nsml_integration_tests::scenario::started(&out)?;
    let ended = eventually(LONG, || {
        let ps = alice
            .nsml_in(&work, &["ps", "-a", "-j"], "")?
            .ok()?
            .json()?;
        let s = ps
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == session.as_str()).cloned())
            .with_context(|| format!("{session} not in ps: {ps}"))?;
        let ended = matches!(s["status"].as_str(), Some("exited" | "failed" | "stopped"));
        Ok(ended.then_some(s))
    })?;
    let logs = alice.nsml_in(&work, &["logs", &session], "")?;
    ensure!(
        ended["status"] == "exited",
        "the session ended as {ended}; its log: {}",
        logs.all()
    );
    ensure!(logs.all().contains("epoch 2/2"), "logs: {}", logs.all());

    // The SDK the session imported is the one the binary wrote out, under its data directory.
    let sdk = data_dir.join("runs/sdk");
    let copies: Vec<PathBuf> = std::fs::read_dir(&sdk)
        .with_context(|| format!("no SDK written under {}", sdk.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    ensure!(
        copies.len() == 1 && copies[0].join("nsml/__init__.py").is_file(),
        "SDK copies under {}: {copies:?}",
        sdk.display()
    );
    Ok(())
}
