//! Drives whole deployments as real processes: `nsmld up` (embedded) or one `nsmld serve` process per
//! service over Postgres and NATS JetStream (distributed), and the `nsml` CLI as a user would.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod access;
pub mod faults;
pub mod figures;
pub mod grpc;
pub mod hostile;
pub mod large_log;
pub mod otlp;
pub mod scenario;
pub mod slurm;
pub mod soak;

use anyhow::{Context, bail};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A built binary of the workspace (`nsml`, `nsmld`), from the target directory the tests run from.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/debug/deps/test-hash → target/debug/NAME
    for dir in exe.ancestors().skip(1) {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    repo_root().join("target/debug").join(name)
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// `N` different free TCP ports on 127.0.0.1. Each is held until all are chosen: a port that is released
/// before the next is asked for can be handed out again, and two services of one deployment would then be
/// given the same address.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<Option<TcpListener>> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").ok())
        .collect();
    std::array::from_fn(|i| {
        held[i]
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map_or(0, |a| a.port())
    })
}

/// What a CLI invocation printed.
#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Requires success.
    pub fn ok(self) -> anyhow::Result<Self> {
        if self.code != 0 {
            bail!(
                "command failed with {}:\nstdout: {}\nstderr: {}",
                self.code,
                self.stdout,
                self.stderr
            );
        }
        Ok(self)
    }

    /// Requires failure.
    pub fn failed(self) -> anyhow::Result<Self> {
        if self.code == 0 {
            bail!(
                "command unexpectedly succeeded:\nstdout: {}\nstderr: {}",
                self.stdout,
                self.stderr
            );
        }
        Ok(self)
    }

    /// Parses stdout as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.stdout).with_context(|| format!("not JSON: {}", self.stdout))
    }

    /// Everything printed.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// One user of the CLI: their own config directory (stored login), and optionally a token.
#[derive(Clone)]
pub struct User {
    pub server: String,
    pub config_dir: PathBuf,
    pub token: Option<String>,
}

impl User {
    /// Runs `nsml ARGS` in `cwd`, with `stdin` fed in.
    pub fn nsml_in(&self, cwd: &Path, args: &[&str], stdin: &str) -> anyhow::Result<Output> {
        self.nsml_env(cwd, args, stdin, &[])
    }

    /// Runs `nsml ARGS` in `cwd`, with `stdin` fed in and `env` added to its environment.
    pub fn nsml_env(
        &self,
        cwd: &Path,
        args: &[&str],
        stdin: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Output> {
        let mut cmd = Command::new(bin("nsml"));
        cmd.args(args)
            .envs(env.iter().copied())
            .current_dir(cwd)
            .env("NSML_SERVER", &self.server)
            .env("NSML_CONFIG_DIR", &self.config_dir)
            .env_remove("NSML_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(t) = &self.token {
            cmd.env("NSML_TOKEN", t);
        }
        let mut child = cmd
            .spawn()
            .context("cannot start nsml (is the workspace built?)")?;
        if let Some(mut i) = child.stdin.take() {
            let _ = i.write_all(stdin.as_bytes());
        }
        let out = child.wait_with_output()?;
        Ok(Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs `nsml ARGS` in the repository root.
    pub fn nsml(&self, args: &[&str]) -> anyhow::Result<Output> {
        self.nsml_in(&repo_root(), args, "")
    }
}

/// The processes of a distributed deployment, one `nsmld serve` process each, in the order they start: the
/// platform's services, then the gateway.
pub fn services() -> impl Iterator<Item = &'static str> {
    nsml_common::service::Service::ALL
        .into_iter()
        .map(|s| s.name())
        .chain(["gateway"])
}

/// How long `nsmld up` may take to print that it is ready, unless a caller allows longer.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// A running deployment.
pub struct Deployment {
    pub url: String,
    pub data_dir: PathBuf,
    procs: Vec<(Vec<String>, Child)>,
    pub _tmp: Option<tempfile::TempDir>,
    config: Option<PathBuf>,
    env: Vec<(String, String)>,
    competitions: Vec<PathBuf>,
    store: String,
    /// How long `nsmld up` may take to print that it is ready.
    ready_timeout: Duration,
}

fn wait_ready(child: &mut Child, timeout: Duration) -> anyhow::Result<String> {
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("nsmld ready at ") {
                let _ = tx.send(url.trim().to_string());
            }
        }
    });
    rx.recv_timeout(timeout)
        .context("the server did not print `nsmld ready at` in time")
}

impl Deployment {
    /// Starts `nsmld up` on a fresh data directory.
    pub fn embedded() -> anyhow::Result<Self> {
        Self::embedded_with(&[])
    }

    /// Starts `nsmld up` with the given competition manifests instead of the example.
    pub fn embedded_with(competitions: &[PathBuf]) -> anyhow::Result<Self> {
        Self::embedded_env(competitions, &[])
    }

    /// Starts `nsmld up` with competition manifests and extra environment for the server.
    pub fn embedded_env(competitions: &[PathBuf], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let tmp = tempfile::tempdir()?;
        let data_dir = tmp.path().join("data");
        let mut d = Self {
            url: String::new(),
            store: format!("sqlite:{}", data_dir.join("nsml.db").display()),
            data_dir,
            procs: vec![],
            _tmp: Some(tmp),
            config: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            competitions: competitions.to_vec(),
            ready_timeout: READY_TIMEOUT,
        };
        d.start_embedded()?;
        Ok(d)
    }

    fn start_embedded(&mut self) -> anyhow::Result<()> {
        let args: Vec<String> = vec![
            "up".into(),
            "--data-dir".into(),
            self.data_dir.display().to_string(),
            "--listen".into(),
            if self.url.is_empty() {
                "127.0.0.1:0".into()
            } else {
                self.url.trim_start_matches("http://").to_string()
            },
            "--gpus".into(),
            "0".into(),
        ];
        let mut args = args;
        for c in &self.competitions {
            args.push("--competition".into());
            args.push(c.display().to_string());
        }
        let mut child = Command::new(bin("nsmld"))
            .args(&args)
            .current_dir(repo_root())
            .envs(self.env.iter().cloned())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start nsmld (is the workspace built?)")?;
        self.url = wait_ready(&mut child, self.ready_timeout)?;
        self.procs.push((args, child));
        Ok(())
    }

    /// Starts every service as its own `nsmld serve` process over Postgres and NATS JetStream.
    pub fn distributed(pg_url: &str, stream: &str) -> anyhow::Result<Self> {
        Self::distributed_env(pg_url, stream, &[])
    }

    /// Starts the distributed deployment with extra environment for every service process.
    pub fn distributed_env(
        pg_url: &str,
        stream: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::distributed_on(pg_url, "nats://127.0.0.1:4222", stream, env)
    }

    /// Starts the distributed deployment over the given Postgres database and NATS server.
    pub fn distributed_on(
        pg_url: &str,
        nats_url: &str,
        stream: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::distributed_with(pg_url, nats_url, stream, env, "")
    }

    /// Starts the distributed deployment with `extra` appended to its configuration (an `[executor]`
    /// table, say).
    pub fn distributed_with(
        pg_url: &str,
        nats_url: &str,
        stream: &str,
        env: &[(&str, &str)],
        extra: &str,
    ) -> anyhow::Result<Self> {
        let tmp = tempfile::tempdir()?;
        let data_dir = tmp.path().join("data");
        std::fs::create_dir_all(&data_dir)?;
        let [gateway_port, a, s, se, q, su, l] = free_ports();
        let config = format!(
            r#"data_dir = "{data}"
store = "{pg_url}"
bus = "{nats_url}"
bus_stream = "{stream}"
internal_secret = "{secret}"
public_listen = "127.0.0.1:{gateway_port}"

[services]
auth = "127.0.0.1:{a}"
storage = "127.0.0.1:{s}"
session = "127.0.0.1:{se}"
quota = "127.0.0.1:{q}"
submission = "127.0.0.1:{su}"
leaderboard = "127.0.0.1:{l}"

[runner]
gpus = "0"
{extra}
"#,
            data = data_dir.display(),
            secret = uuid::Uuid::new_v4().simple(),
        );
        let cfg_path = tmp.path().join("nsmld.toml");
        std::fs::write(&cfg_path, config)?;
        // It holds the internal secret: runners refuse a configuration others may read.
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&cfg_path, std::fs::Permissions::from_mode(0o600))?;
        }
        let mut d = Self {
            url: format!("http://127.0.0.1:{gateway_port}"),
            store: pg_url.to_string(),
            data_dir,
            procs: vec![],
            _tmp: Some(tmp),
            config: Some(cfg_path),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            competitions: vec![],
            ready_timeout: READY_TIMEOUT,
        };
        d.start_distributed()?;
        Ok(d)
    }

    fn start_distributed(&mut self) -> anyhow::Result<()> {
        let cfg = self.config.clone().context("no config")?;
        for svc in services() {
            let args: Vec<String> = vec![
                "serve".into(),
                svc.into(),
                "--config".into(),
                cfg.display().to_string(),
            ];
            let child = Command::new(bin("nsmld"))
                .args(&args)
                .current_dir(repo_root())
                .envs(self.env.iter().cloned())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .context("cannot start nsmld")?;
            self.procs.push((args, child));
        }
        let token_path = self.data_dir.join("admin.token");
        let mut addrs: Vec<String> = self.service_addrs()?.into_iter().map(|(_, a)| a).collect();
        addrs.push(self.url.clone());
        let deadline = Instant::now() + Duration::from_secs(60);
        while !token_path.exists() || !addrs.iter().all(|a| port_open(a)) {
            if Instant::now() > deadline {
                bail!("the distributed deployment did not come up");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// The internal services' names and addresses, from the `[services]` table of the configuration.
    fn service_addrs(&self) -> anyhow::Result<Vec<(String, String)>> {
        let cfg = std::fs::read_to_string(self.config.as_ref().context("no config")?)?;
        let table = cfg
            .split("[services]")
            .nth(1)
            .context("no [services] table")?;
        Ok(table
            .lines()
            .take_while(|l| !l.trim_start().starts_with('['))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
            .collect())
    }

    /// The distributed deployment's configuration file.
    pub fn config_path(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    /// Process ids of the deployment's server processes.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|(_, c)| c.id()).collect()
    }

    /// The host token `nsmld` wrote.
    pub fn admin_token(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(self.data_dir.join("admin.token"))?
            .trim()
            .to_string())
    }

    /// A CLI user with their own config directory.
    pub fn user(&self, name: &str) -> User {
        let dir = self
            .data_dir
            .parent()
            .unwrap_or(&self.data_dir)
            .join(format!("cli-{name}"));
        let _ = std::fs::create_dir_all(&dir);
        User {
            server: self.url.clone(),
            config_dir: dir,
            token: None,
        }
    }

    /// The host, signed in with the admin token.
    pub fn host(&self) -> anyhow::Result<User> {
        let mut u = self.user("admin");
        u.token = Some(self.admin_token()?);
        Ok(u)
    }

    /// Registers the competition of the manifest at `path`, as the host does with `nsml admin competition apply`.
    pub fn apply_competition(&self, path: &Path) -> anyhow::Result<()> {
        self.host()?
            .nsml(&["admin", "competition", "apply", &path.display().to_string()])?
            .ok()?;
        Ok(())
    }

    /// The deployment's event store: `sqlite:PATH` or a Postgres URL.
    pub fn store_url(&self) -> &str {
        &self.store
    }

    /// Lets a later start of `nsmld up` take up to `timeout` to print that it is ready (a large log's boot).
    pub fn allow_ready_within(&mut self, timeout: Duration) {
        self.ready_timeout = timeout;
    }

    /// Kills every process (SIGKILL: no graceful shutdown) and starts them again on the same data.
    pub fn kill_and_restart(&mut self) -> anyhow::Result<()> {
        self.kill_and_restart_after(Duration::from_millis(300))
    }

    /// Kills every process (SIGKILL), keeps them down for `down`, and starts them again on the same data.
    pub fn kill_and_restart_after(&mut self, down: Duration) -> anyhow::Result<()> {
        self.kill();
        std::thread::sleep(down);
        if self.config.is_some() {
            let _ = std::fs::remove_file(self.data_dir.join("admin.token"));
            self.start_distributed()
        } else {
            self.start_embedded()
        }
    }

    /// Kills every process (SIGKILL), runs `while_down`, and starts them again on the same data.
    pub fn kill_and_restart_when(
        &mut self,
        while_down: impl FnOnce() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        self.kill();
        while_down()?;
        self.kill_and_restart_after(Duration::ZERO)
    }

    /// Kills one service's process of a distributed deployment (SIGKILL) and starts it again.
    pub fn restart_service(&mut self, service: &str) -> anyhow::Result<()> {
        self.restart_service_after(service, Duration::ZERO)
    }

    /// Kills one service's process of a distributed deployment (SIGKILL), keeps it down for `down`, and
    /// starts it again; returns once it listens.
    pub fn restart_service_after(&mut self, service: &str, down: Duration) -> anyhow::Result<()> {
        self.restart_service_when(service, || {
            std::thread::sleep(down);
            Ok(())
        })
    }

    /// Kills one service's process of a distributed deployment (SIGKILL), runs `while_down`, and starts it
    /// again; returns once it listens.
    pub fn restart_service_when(
        &mut self,
        service: &str,
        while_down: impl FnOnce() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let i = self
            .procs
            .iter()
            .position(|(args, _)| args.get(1).is_some_and(|a| a == service))
            .with_context(|| format!("no `{service}` process"))?;
        let (args, mut child) = self.procs.remove(i);
        let _ = child.kill();
        let _ = child.wait();
        while_down()?;
        let child = Command::new(bin("nsmld"))
            .args(&args)
            .current_dir(repo_root())
            .envs(self.env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start nsmld")?;
        self.procs.push((args, child));
        let addr = self
            .service_addrs()?
            .into_iter()
            .find(|(name, _)| name == service)
            .map(|(_, a)| a)
            .unwrap_or_else(|| self.url.clone());
        let deadline = Instant::now() + Duration::from_secs(60);
        while !port_open(&addr) {
            if Instant::now() > deadline {
                bail!("the {service} service did not come back");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn kill(&mut self) {
        for (_, mut c) in self.procs.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn port_open(url: &str) -> bool {
    std::net::TcpStream::connect(url.trim_start_matches("http://")).is_ok()
}

/// Kills the runner processes started with configuration `config` (the session service starts them in
/// process groups of their own, so that they outlive a restart of the service).
fn kill_runners(config: &Path) {
    let config = config.display().to_string();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_runner =
            args.get(1).is_some_and(|a| *a == b"runner") && args.contains(&config.as_bytes());
        if is_runner {
            // SAFETY: kill only sends a signal.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        self.kill();
        if let Some(config) = &self.config {
            kill_runners(config);
        }
    }
}

/// A fresh Postgres database for one test run; dropped at the end.
pub struct FreshDb {
    pub url: String,
    name: String,
}

impl FreshDb {
    /// Creates `nsml_it_<uuid>` on the local server.
    pub async fn create() -> anyhow::Result<Self> {
        use sqlx::Connection;
        let name = format!("nsml_it_{}", uuid::Uuid::new_v4().simple());
        let mut c =
            sqlx::PgConnection::connect("postgres://postgres@127.0.0.1:5432/postgres").await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut c)
            .await?;
        Ok(Self {
            url: format!("postgres://postgres@127.0.0.1:5432/{name}"),
            name,
        })
    }

    /// The process ids of the server's backends connected to the database now.
    pub async fn backends(&self) -> anyhow::Result<Vec<u32>> {
        use sqlx::Connection;
        let mut c =
            sqlx::PgConnection::connect("postgres://postgres@127.0.0.1:5432/postgres").await?;
        let pids: Vec<i32> =
            sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = $1")
                .bind(&self.name)
                .fetch_all(&mut c)
                .await?;
        Ok(pids
            .into_iter()
            .filter_map(|p| u32::try_from(p).ok())
            .collect())
    }

    /// Drops the database.
    pub async fn drop_db(self) {
        use sqlx::Connection;
        if let Ok(mut c) =
            sqlx::PgConnection::connect("postgres://postgres@127.0.0.1:5432/postgres").await
        {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut c)
            .await;
        }
    }
}

/// Deletes a JetStream stream made for a test run.
pub async fn drop_stream(name: &str) {
    if let Ok(c) = async_nats::connect("127.0.0.1:4222").await {
        let js = async_nats::jetstream::new(c);
        let _ = js.delete_stream(name).await;
    }
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn eventually<T>(
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("condition not met within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
