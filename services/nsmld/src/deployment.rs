//! The one place that knows embedded from distributed: which store, which bus, which addresses, which
//! services in this process. Services themselves only see a [`ServiceContext`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use nsml_bus::Bus;
use nsml_common::ServiceContext;
use nsml_common::clients::{Clients, LocalRoutes, ServiceAddrs};
use nsml_common::executor::Executor;
use nsml_common::server::{Port, Started};
use nsml_common::service::Service;
use nsml_common::tls::{Tls, TlsSection};
use nsml_eventstore::{EventStore, OutboxLease};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A process `nsmld serve` can run: one of the platform's services, or the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceName {
    Platform(Service),
    Gateway,
}

impl ServiceName {
    /// Every name `nsmld serve` takes, in the order a deployment starts them.
    const ALL: [ServiceName; Service::ALL.len() + 1] = {
        let mut all = [ServiceName::Gateway; Service::ALL.len() + 1];
        let mut i = 0;
        while i < Service::ALL.len() {
            all[i] = ServiceName::Platform(Service::ALL[i]);
            i += 1;
        }
        all
    };

    fn name(self) -> &'static str {
        match self {
            ServiceName::Platform(service) => service.name(),
            ServiceName::Gateway => "gateway",
        }
    }
}

impl clap::ValueEnum for ServiceName {
    fn value_variants<'a>() -> &'a [Self] {
        &Self::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()))
    }
}

/// Where each internal service listens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub auth: SocketAddr,
    pub storage: SocketAddr,
    pub session: SocketAddr,
    pub quota: SocketAddr,
    pub submission: SocketAddr,
    pub leaderboard: SocketAddr,
}

impl Listen {
    /// Where `service` listens.
    pub fn get(&self, service: Service) -> SocketAddr {
        match service {
            Service::Auth => self.auth,
            Service::Storage => self.storage,
            Service::Session => self.session,
            Service::Quota => self.quota,
            Service::Submission => self.submission,
            Service::Leaderboard => self.leaderboard,
        }
    }
}

/// The local runner's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunnerSection {
    /// A GPU count, or `auto` to ask nvidia-smi.
    pub gpus: String,
    pub python: String,
    /// The directory holding the `nsml` Python package (`NSML_SDK_PATH` when unset); when neither is set, the
    /// runner writes the SDK shipped inside the binary under its work directory.
    pub sdk_path: Option<PathBuf>,
    /// CPUs all sessions may hold at once; admitted sessions beyond it wait as Queued (default: no limit).
    pub cpus: Option<u32>,
}

impl RunnerSection {
    /// The GPUs named by `gpus`: a count, or `auto`.
    pub fn gpu_source(&self) -> anyhow::Result<nsml_runner::GpuSource> {
        Ok(if self.gpus == "auto" {
            nsml_runner::GpuSource::Auto
        } else {
            nsml_runner::GpuSource::Count(self.gpus.parse().with_context(|| {
                format!("runner gpus must be a count or `auto`, got `{}`", self.gpus)
            })?)
        })
    }

    /// A runner on this machine with these settings, its sessions under `work_dir`, holding `gpus`.
    pub fn local(
        &self,
        work_dir: PathBuf,
        gpus: nsml_runner::GpuSource,
    ) -> anyhow::Result<nsml_runner::RunnerConfig> {
        let sdk_path = match &self.sdk_path {
            Some(p) => p.clone(),
            None => match std::env::var_os("NSML_SDK_PATH") {
                Some(p) => PathBuf::from(p),
                None => crate::sdk::install(&work_dir.join("sdk"))?,
            },
        };
        Ok(nsml_runner::RunnerConfig {
            work_dir,
            python: self.python.clone(),
            sdk_path,
            gpus: nsml_runner::GpuInventory::from_source(&gpus),
            limits: nsml_runner::LimitsConfig::from_env()?,
            cpus: self.cpus,
            env_cache: None,
        })
    }
}

impl Default for RunnerSection {
    fn default() -> Self {
        Self {
            gpus: "auto".into(),
            python: "python3".into(),
            sdk_path: None,
            cpus: None,
        }
    }
}

/// Where sessions run (`[executor]`): on the session service's machine (`local`, the default), or as Slurm
/// jobs (`slurm`), each running its session's runner (`nsmld runner`) on the node Slurm picks.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "lowercase")]
pub enum ExecutorSection {
    #[default]
    Local,
    Slurm(SlurmSection),
}

/// The Slurm executor's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmSection {
    /// The partition sessions' jobs go to; Slurm's default partition when unset.
    pub partition: Option<String>,
    /// The account jobs are charged to.
    pub account: Option<String>,
    /// The `nsmld` binary on the compute nodes (default: this binary's path).
    pub runner_command: Option<PathBuf>,
    /// The runner's configuration file on the compute nodes.
    pub runner_config: PathBuf,
    /// Where a job's own output goes on its node (`%j`: the job id); discarded when unset.
    pub output: Option<String>,
    /// Job names start with this, then `/TEAM/DATASET/N` (default `nsml`).
    pub job_prefix: Option<String>,
    /// How often `squeue` is polled, in milliseconds (default 2000).
    pub poll_every_ms: Option<u64>,
    /// Further `sbatch` arguments (`--qos=…`).
    #[serde(default)]
    pub extra_args: Vec<String>,
}

impl SlurmSection {
    /// The executor's configuration.
    pub fn config(&self) -> anyhow::Result<nsml_runner::SlurmConfig> {
        let command = match &self.runner_command {
            Some(c) => c.clone(),
            None => std::env::current_exe().context("cannot find this binary's path")?,
        };
        let mut cfg = nsml_runner::SlurmConfig::new(command, self.runner_config.clone());
        cfg.partition.clone_from(&self.partition);
        cfg.account.clone_from(&self.account);
        cfg.output.clone_from(&self.output);
        if let Some(p) = &self.job_prefix {
            cfg.job_prefix.clone_from(p);
        }
        if let Some(ms) = self.poll_every_ms {
            anyhow::ensure!(
                ms >= 100,
                "executor.poll_every_ms must be at least 100, got {ms}"
            );
            cfg.poll_every = std::time::Duration::from_millis(ms);
        }
        cfg.extra_args.clone_from(&self.extra_args);
        Ok(cfg)
    }
}

/// A deployment's configuration: file, then `NSML_…` environment overrides.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub data_dir: PathBuf,
    /// `sqlite:PATH` or `postgres://…`.
    pub store: String,
    /// `inprocess` or `nats://HOST:PORT`.
    pub bus: String,
    #[serde(default = "default_stream")]
    pub bus_stream: String,
    pub internal_secret: String,
    pub public_listen: SocketAddr,
    /// Internal listen addresses; `None` in the embedded deployment, where one internal port serves all.
    pub services: Option<Listen>,
    #[serde(default)]
    pub runner: RunnerSection,
    #[serde(default)]
    pub executor: ExecutorSection,
    /// The file this configuration was read from (none for the embedded default).
    #[serde(skip)]
    pub source: Option<PathBuf>,
    /// TLS on every internal port and call (`[tls]`); clear text when absent.
    #[serde(default, rename = "tls")]
    pub tls_files: Option<TlsSection>,
    /// The `[tls]` files, read and checked by [`Config::load`].
    #[serde(skip)]
    pub tls: Option<Tls>,
}

fn default_stream() -> String {
    "NSML".into()
}

impl Config {
    /// The embedded default: everything under `data_dir`.
    pub fn embedded(
        data_dir: PathBuf,
        listen: SocketAddr,
        gpus: &str,
        cpus: Option<u32>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
        let data_dir = data_dir.canonicalize()?;
        Ok(Self {
            store: format!("sqlite:{}", data_dir.join("nsml.db").display()),
            data_dir,
            bus: "inprocess".into(),
            bus_stream: default_stream(),
            internal_secret: nsml_common::server::random_secret(),
            public_listen: listen,
            services: None,
            runner: RunnerSection {
                gpus: gpus.to_string(),
                cpus,
                ..Default::default()
            },
            executor: ExecutorSection::Local,
            source: None,
            tls_files: None,
            tls: None,
        })
    }

    /// Reads a configuration file, then applies `NSML_STORE`, `NSML_BUS`, `NSML_BUS_STREAM`,
    /// `NSML_INTERNAL_SECRET` and `NSML_DATA_DIR` from the environment.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the configuration {}", path.display()))?;
        let mut c: Config = toml::from_str(&text)
            .with_context(|| format!("invalid configuration {}", path.display()))?;
        c.source = Some(std::path::absolute(path)?);
        override_from_env("NSML_STORE", &mut c.store);
        override_from_env("NSML_BUS", &mut c.bus);
        override_from_env("NSML_BUS_STREAM", &mut c.bus_stream);
        override_from_env("NSML_INTERNAL_SECRET", &mut c.internal_secret);
        override_from_env("NSML_DATA_DIR", &mut c.data_dir);
        if c.internal_secret.len() < 16 {
            anyhow::bail!("internal_secret must be at least 16 characters");
        }
        if c.services.is_none() {
            anyhow::bail!(
                "a distributed deployment needs a [services] table with every service's address"
            );
        }
        if let Some(files) = &c.tls_files {
            let tls = files
                .load(c.source.as_deref().and_then(Path::parent))
                .with_context(|| format!("invalid [tls] table in {}", path.display()))?;
            c.tls = Some(tls);
        }
        std::fs::create_dir_all(&c.data_dir)?;
        Ok(c)
    }

    /// The address of an internal port: `https://…` when TLS is configured.
    pub fn internal_url(&self, addr: SocketAddr) -> String {
        format!("{}://{addr}", nsml_common::tls::scheme(self.tls.as_ref()))
    }
}

/// Sets `field` from the environment variable `var` when it is set: the environment overrides the file.
pub fn override_from_env<T: From<String>>(var: &str, field: &mut T) {
    if let Ok(v) = std::env::var(var) {
        *field = T::from(v);
    }
}

/// An opened deployment: its store and bus, ready to run services.
pub struct Deployment {
    config: Config,
    /// The log as services see it: appends wake the relay.
    store: Arc<dyn EventStore>,
    /// The same log when it is a SQLite file, for what only SQLite needs.
    sqlite: Option<nsml_eventstore::SqliteStore>,
    bus: Arc<dyn Bus>,
    cancel: CancellationToken,
    relay: tokio::task::JoinHandle<()>,
}

/// How many events make a log long at start-up (see [`Deployment::before_catch_up`]).
const LONG_LOG: u64 = 100_000;

fn http(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// A store URL as it may be printed: without the password it may hold.
fn redact_password(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(at)) if at > scheme.len() + 3 => {
            let user_info = &rest[..at - scheme.len() - 3];
            let user = user_info
                .split_once(':')
                .map_or(user_info, |(user, _)| user);
            format!("{scheme}://{user}@{}", &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

fn find_beside_binary(rel: &str) -> Option<PathBuf> {
    let cwd = std::env::current_dir().ok()?.join(rel);
    if cwd.exists() {
        return Some(cwd);
    }
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .skip(1)
        .map(|a| a.join(rel))
        .find(|p| p.exists())
}

impl Deployment {
    /// Opens the store and the bus named by the configuration.
    pub async fn open(config: Config) -> anyhow::Result<Self> {
        // A Postgres log is shared by every process of the deployment: one at a time sweeps its outbox.
        let mut sqlite = None;
        let (store, lease): (Arc<dyn EventStore>, Option<Arc<dyn OutboxLease>>) =
            if let Some(path) = config.store.strip_prefix("sqlite:") {
                let store = nsml_eventstore::SqliteStore::open(Path::new(path))
                    .await
                    .with_context(|| format!("cannot open the SQLite log {path}"))?;
                sqlite = Some(store.clone());
                (Arc::new(store), None)
            } else if config.store.starts_with("postgres") {
                // Every process of a fresh deployment may get here at once: one creates the database.
                let created = nsml_eventstore::PostgresStore::create_database_if_missing(
                    &config.store,
                )
                .await
                .context(
                    "cannot create the deployment's Postgres database: give the store's user the \
                     CREATEDB privilege, or create the database by hand (createdb NAME)",
                )?;
                if created {
                    println!(
                        "created the Postgres database of {}",
                        redact_password(&config.store)
                    );
                }
                let store = nsml_eventstore::PostgresStore::connect(&config.store)
                    .await
                    .context("cannot open the Postgres log")?;
                let lease = Arc::new(store.outbox_lease());
                (Arc::new(store), Some(lease))
            } else {
                anyhow::bail!(
                    "unknown store `{}`: use sqlite:PATH or postgres://…",
                    config.store
                );
            };
        let bus: Arc<dyn Bus> = if config.bus == "inprocess" {
            nsml_bus::InProcessBus::new()
        } else if config.bus.starts_with("nats://") {
            nsml_bus::NatsBus::connect(&config.bus, &config.bus_stream)
                .await
                .context("cannot connect to NATS")?
        } else {
            anyhow::bail!(
                "unknown bus `{}`: use inprocess or nats://HOST:PORT",
                config.bus
            );
        };
        // One relay per process moves appends from the outbox to the bus as they commit; where the log is
        // shared, only the one holding the lease does, for every process. Every append of this process wakes
        // it; with a log no other process appends to (no lease) and the in-process bus, whose subscribers are all
        // in this process, nothing else needs publishing soon, so the relay polls an empty outbox only as a check.
        let cancel = CancellationToken::new();
        let idle_poll = if lease.is_none() && config.bus == "inprocess" {
            nsml_bus::RELAY_WOKEN_IDLE_POLL
        } else {
            nsml_bus::RELAY_IDLE_POLL
        };
        let relay = nsml_bus::Relay::spawn_leased(
            store.clone(),
            bus.clone(),
            cancel.clone(),
            lease,
            idle_poll,
        );
        // Over a SQLite log every service's read models are in this process and read the one log at start-up:
        // they share one read of it. Over Postgres each process has its own few, and each reads its types where
        // the log is.
        let store = if sqlite.is_some() {
            nsml_bus::WakingStore::sharing_catch_ups(store, relay.waker())
        } else {
            nsml_bus::WakingStore::new(store, relay.waker())
        };
        Ok(Self {
            config,
            store,
            sqlite,
            bus,
            cancel,
            relay: relay.into_handle(),
        })
    }

    /// Whether the log is long enough for the allocator to be told so while the services catch up with it
    /// (see [`crate::reading_long_log`]).
    async fn before_catch_up(&self) -> bool {
        let long = matches!(self.store.head_position().await, Ok(head) if head >= LONG_LOG);
        if long {
            crate::reading_long_log(true);
        }
        long
    }

    /// Once every read model of `ready` has caught up with the log, closes the SQLite log's idle read
    /// connections (the catch-up read the whole log through them, and each keeps what it mapped of the file
    /// counted in this process's resident memory while it stays open), and tells the allocator a `long` read is
    /// over. Returns `ready` with one more receiver, ready once that is done: the process reports itself serving
    /// only at the size it will stay at.
    fn after_catch_up(
        &self,
        ready: Vec<tokio::sync::watch::Receiver<bool>>,
        long: bool,
    ) -> Vec<tokio::sync::watch::Receiver<bool>> {
        let sqlite = self.sqlite.clone();
        let (settled, settled_rx) = tokio::sync::watch::channel(false);
        let caught_up = ready.clone();
        tokio::spawn(async move {
            for mut r in caught_up {
                if r.wait_for(|ready| *ready).await.is_err() {
                    return;
                }
            }
            let began = std::time::Instant::now();
            if let Some(sqlite) = sqlite {
                sqlite.close_idle_readers();
            }
            let closed = began.elapsed();
            if long {
                crate::reading_long_log(false);
            }
            tracing::info!(
                readers_closed = ?closed,
                memory_returned = ?began.elapsed() - closed,
                "caught up: closed the log's read connections, returned freed memory"
            );
            settled.send_replace(true);
        });
        ready.into_iter().chain([settled_rx]).collect()
    }

    fn context(&self, addrs: &ServiceAddrs, executor: Option<Arc<dyn Executor>>) -> ServiceContext {
        ServiceContext {
            store: self.store.clone(),
            bus: self.bus.clone(),
            addrs: addrs.clone(),
            secret: self.config.internal_secret.as_str().into(),
            data_dir: self.config.data_dir.clone(),
            cancel: self.cancel.clone(),
            executor,
        }
    }

    /// The executor of this deployment: in the embedded deployment the runner in this process; in the
    /// distributed one a runner process per session, on this machine or as a Slurm job.
    fn executor(&self, addrs: &ServiceAddrs) -> anyhow::Result<Arc<dyn Executor>> {
        let clients = Clients::new(addrs, &self.config.internal_secret, "runner")?;
        let r = &self.config.runner;
        Ok(match (&self.config.executor, &self.config.source) {
            (ExecutorSection::Local, None) => {
                let cfg = r.local(self.config.data_dir.join("runs"), r.gpu_source()?)?;
                nsml_runner::LocalExecutor::new(cfg, clients)
            }
            (ExecutorSection::Local, Some(config)) => {
                let cfg = nsml_runner::ProcessConfig {
                    command: std::env::current_exe().context("cannot find this binary's path")?,
                    runner_config: config.clone(),
                    state_dir: self.config.data_dir.join("runners"),
                    gpus: nsml_runner::GpuInventory::from_source(&r.gpu_source()?),
                    cpus: r.cpus,
                };
                nsml_runner::ProcessExecutor::new(cfg).map_err(anyhow::Error::msg)?
            }
            (ExecutorSection::Slurm(slurm), _) => {
                nsml_runner::SlurmExecutor::new(slurm.config()?, clients)
            }
        })
    }

    async fn start(&self, service: Service, ctx: ServiceContext) -> anyhow::Result<Started> {
        Ok(match service {
            Service::Auth => nsml_auth::start(ctx).await?,
            Service::Storage => nsml_storage::start(ctx).await?,
            Service::Session => nsml_session::start(ctx).await?,
            Service::Quota => nsml_quota::start(ctx).await?,
            Service::Submission => {
                nsml_submission::start(ctx, self.config.runner.python.clone()).await?
            }
            Service::Leaderboard => nsml_leaderboard::start(ctx).await?,
        })
    }

    fn spawn_shutdown_on_signal(&self) {
        let cancel = self.cancel.clone();
        tokio::spawn(async move {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down");
            cancel.cancel();
        });
    }

    /// Runs every service in this process, applies the competitions and serves until a signal.
    pub async fn run_embedded(self, competitions: Vec<PathBuf>) -> anyhow::Result<()> {
        self.spawn_shutdown_on_signal();
        let internal = TcpListener::bind("127.0.0.1:0").await?;
        let iaddr = http(internal.local_addr()?);
        // Services, the gateway and the runner call each other in-process; the internal port stays for
        // tools that reach a service directly.
        let local = LocalRoutes::default();
        let addrs = ServiceAddrs {
            local: Some(local.clone()),
            ..ServiceAddrs::all_at(&iaddr)
        };
        let public = TcpListener::bind(self.config.public_listen)
            .await
            .with_context(|| format!("cannot listen on {}", self.config.public_listen))?;
        let public_addr = public.local_addr()?;
        let executor = self.executor(&addrs)?;
        let secret: Arc<str> = self.config.internal_secret.as_str().into();
        // The internal port answers health (NOT_SERVING) while the services start.
        let (port, serving) = Port::open(internal, secret.clone(), self.cancel.clone()).await;
        let internal_server = tokio::spawn(serving);
        let mut routes = tonic::service::Routes::default();
        let mut names = Vec::new();
        let mut tasks = Vec::new();
        let mut ready = Vec::new();
        // The services start together: each catches up with the log on its own (what a long log costs at
        // start-up), and none needs another to have started first.
        let long = self.before_catch_up().await;
        let starting = Service::ALL.map(|service| {
            let exec = (service == Service::Session).then(|| executor.clone());
            self.start(service, self.context(&addrs, exec))
        });
        for started in futures::future::try_join_all(starting).await? {
            routes = (started.routes)(routes);
            names.extend(started.names);
            tasks.extend(started.tasks);
            ready.extend(started.ready);
        }
        // In-process callers (the gateway among them) see the services' health as the port reports it.
        local.set(
            routes.clone().add_service(port.health_service()),
            secret.clone(),
        );
        let ready = self.after_catch_up(ready, long);
        port.started(routes, &names, ready).await;
        let gw_cancel = self.cancel.clone();
        let gw_addrs = addrs.clone();
        let gw_secret = self.config.internal_secret.clone();
        let gateway = tokio::spawn(async move {
            nsml_gateway::serve(public, &gw_addrs, &gw_secret, gw_cancel).await
        });
        let url = http(public_addr);
        let competitions = if competitions.is_empty() {
            match find_beside_binary("examples/competition.toml") {
                Some(p) => vec![p],
                None => {
                    tracing::warn!(
                        "no competition given, and no examples/competition.toml in the working directory or \
                         beside the binary: the platform starts without one; pass --competition FILE, or apply \
                         one later with `nsml admin competition apply FILE`"
                    );
                    vec![]
                }
            }
        } else {
            competitions
        };
        let token = std::fs::read_to_string(self.config.data_dir.join("admin.token"))?;
        let channel = nsml_common::clients::channel("gateway", &url)?;
        for path in competitions {
            let manifest = nsml_manifest::load(&path)?;
            for warning in manifest.warnings() {
                tracing::warn!(competition = %path.display(), "{warning}");
            }
            let c = nsml_manifest::apply(channel.clone(), token.trim(), &manifest)
                .await
                .with_context(|| format!("cannot apply the competition {}", path.display()))?;
            tracing::info!(competition = %c.id, "competition applied");
        }
        println!("nsmld ready at {url}");
        println!(
            "host token in {} (export NSML_TOKEN=$(cat {}))",
            self.config.data_dir.join("admin.token").display(),
            self.config.data_dir.join("admin.token").display()
        );
        let (a, b) = tokio::join!(internal_server, gateway);
        a??;
        b??;
        for t in tasks {
            let _ = t.await;
        }
        let _ = self.relay.await;
        Ok(())
    }

    /// Runs the named services of a distributed deployment until a signal; with the gateway among them,
    /// applies `competitions` once the platform behind it answers.
    pub async fn run_services(
        self,
        services: &[ServiceName],
        competitions: Vec<crate::competitions::Competition>,
    ) -> anyhow::Result<()> {
        self.spawn_shutdown_on_signal();
        let listen = self
            .config
            .services
            .clone()
            .context("a distributed deployment needs a [services] table")?;
        let addrs = ServiceAddrs {
            tls: self.config.tls.clone(),
            ..ServiceAddrs::from_fn(|service| self.config.internal_url(listen.get(service)))
        };
        let mut servers = Vec::new();
        let mut tasks = Vec::new();
        let mut gateway_url = None;
        for &name in services {
            let ServiceName::Platform(service) = name else {
                let public = TcpListener::bind(self.config.public_listen).await?;
                let url = http(public.local_addr()?);
                gateway_url = Some(url.clone());
                let (a, s, c) = (
                    addrs.clone(),
                    self.config.internal_secret.clone(),
                    self.cancel.clone(),
                );
                servers.push(tokio::spawn(async move {
                    nsml_gateway::serve(public, &a, &s, c)
                        .await
                        .map_err(anyhow::Error::from)
                }));
                println!("nsmld ready at {url}");
                continue;
            };
            let addr = listen.get(service);
            if let Some(tls) = &self.config.tls {
                tls.check_serves(&addr.ip().to_string(), &format!("the {service} service"))?;
            }
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            // The port answers health (NOT_SERVING) while the service starts.
            let secret: Arc<str> = self.config.internal_secret.as_str().into();
            let (port, serving) = Port::open_tls(
                listener,
                secret,
                self.config.tls.as_ref(),
                self.cancel.clone(),
            )
            .await;
            servers.push(tokio::spawn(async move {
                serving.await.map_err(anyhow::Error::from)
            }));
            let exec = if service == Service::Session {
                Some(self.executor(&addrs)?)
            } else {
                None
            };
            let started = self.start(service, self.context(&addrs, exec)).await?;
            tasks.extend(started.tasks);
            let routes = (started.routes)(tonic::service::Routes::default());
            let ready = self.after_catch_up(started.ready, false);
            port.started(routes, &started.names, ready).await;
            println!(
                "nsmld serving {service} at {}",
                self.config.internal_url(addr)
            );
        }
        // The auth service writes the host token into this process's data directory.
        let token_path = std::path::absolute(self.config.data_dir.join("admin.token"))?;
        if services.contains(&ServiceName::Platform(Service::Auth)) {
            let path = token_path.display();
            println!("host token in {path} (export NSML_TOKEN=$(cat {path}))");
        }
        if let Some(url) = gateway_url {
            tokio::select! {
                applied = crate::competitions::apply_when_ready(&url, &token_path, &competitions) => applied?,
                // Stopped while waiting for the platform: nothing is left to apply to.
                () = self.cancel.cancelled() => {}
            }
        }
        for s in servers {
            s.await??;
        }
        for t in tasks {
            let _ = t.await;
        }
        let _ = self.relay.await;
        Ok(())
    }
}

#[cfg(test)]
mod store_url_tests {
    use super::redact_password;

    #[test]
    fn a_printed_store_url_keeps_no_password() {
        assert_eq!(
            redact_password("postgres://nsml:s3cret@db:5432/nsml"),
            "postgres://nsml@db:5432/nsml"
        );
        assert_eq!(
            redact_password("postgres://postgres@127.0.0.1:5432/nsml"),
            "postgres://postgres@127.0.0.1:5432/nsml"
        );
        assert_eq!(redact_password("postgres://db/nsml"), "postgres://db/nsml");
    }
}

#[cfg(test)]
mod tls_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

    use std::net::SocketAddr;

    use nsml_common::tls::testing::TestCa;

    use super::Config;

    fn config(dir: &std::path::Path, tls: &str) -> std::path::PathBuf {
        let path = dir.join("nsmld.toml");
        std::fs::write(
            &path,
            format!(
                r#"data_dir = "{}"
store = "postgres://postgres@127.0.0.1:5432/nsml"
bus = "nats://127.0.0.1:4222"
internal_secret = "0123456789abcdef0123"
public_listen = "127.0.0.1:7100"

[services]
auth = "127.0.0.1:7101"
storage = "127.0.0.1:7102"
session = "127.0.0.1:7103"
quota = "127.0.0.1:7104"
submission = "127.0.0.1:7105"
leaderboard = "127.0.0.1:7106"
{tls}"#,
                dir.join("data").display()
            ),
        )
        .unwrap();
        path
    }

    #[test]
    fn a_tls_table_makes_internal_addresses_https() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("pki")).unwrap();
        TestCa::new("nsml test CA")
            .unwrap()
            .write(&dir.path().join("pki"), &["127.0.0.1"])
            .unwrap();
        let path = config(
            dir.path(),
            "[tls]\ncert = \"pki/cert.pem\"\nkey = \"pki/key.pem\"\nca = \"pki/ca.pem\"\nmutual = true\n",
        );
        let c = Config::load(&path).unwrap();
        let tls = c.tls.as_ref().expect("the [tls] files are loaded");
        assert!(tls.mutual());
        let addr: SocketAddr = "127.0.0.1:7101".parse().unwrap();
        assert_eq!(c.internal_url(addr), "https://127.0.0.1:7101");
        tls.check_serves("127.0.0.1", "the auth service").unwrap();

        let plain = Config::load(&config(dir.path(), "")).unwrap();
        assert!(plain.tls.is_none());
        assert_eq!(plain.internal_url(addr), "http://127.0.0.1:7101");
    }

    #[test]
    fn a_missing_tls_file_is_named_with_the_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let path = config(
            dir.path(),
            "[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\nca = \"ca.pem\"\n",
        );
        let err = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(err.contains("invalid [tls] table in"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(
            err.contains(&dir.path().join("cert.pem").display().to_string()),
            "{err}"
        );
        assert!(
            err.contains("point `tls.cert` in the [tls] table at a readable PEM file"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_in_the_tls_table_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = config(
            dir.path(),
            "[tls]\ncert = \"c\"\nkey = \"k\"\nca = \"a\"\nrequire_client_cert = true\n",
        );
        let err = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(err.contains("require_client_cert"), "{err}");
    }
}
