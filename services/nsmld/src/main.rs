//! `nsmld`: the NSML server.
//!
//! - `nsmld up --data-dir DIR` runs every service in one process on the embedded default (a SQLite file in
//!   DIR, the in-process bus, the local runner) and loads the example competition.
//! - `nsmld serve SERVICE… --config FILE` runs the named services of a distributed deployment (Postgres,
//!   NATS JetStream), each reaching the others by the addresses in the config.
//! - `nsmld runner --config FILE --session SPEC` runs one session's runner in a process of its own: what
//!   a Slurm job of the Slurm executor runs on its node.

mod competitions;
#[cfg(test)]
mod deploy_files;
mod deployment;
mod runner;
mod sdk;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::deployment::{Config, Deployment, ServiceName};

// Services allocate many small short-lived values per request and per replayed event; mimalloc serves those
// markedly faster than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "nsmld", version, about = "The NSML server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Serves this process's metrics as Prometheus text at `http://ADDR/metrics` (`up` and `serve`; none
    /// when unset).
    #[arg(long, global = true, env = "NSML_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the whole platform in one process (SQLite, in-process bus, local runner).
    Up {
        /// Where the platform keeps its data (log, blobs, logs, session directories, admin.token).
        #[arg(long, env = "NSML_DATA_DIR", default_value = ".nsml-data")]
        data_dir: PathBuf,
        /// The public address of the gateway.
        #[arg(long, env = "NSML_LISTEN", default_value = "127.0.0.1:7100")]
        listen: SocketAddr,
        /// Competition manifests to apply at start-up (default: the example competition).
        #[arg(long = "competition")]
        competitions: Vec<PathBuf>,
        /// GPUs the local runner may hand out: a count, or `auto` to ask nvidia-smi.
        #[arg(long, env = "NSML_GPUS", default_value = "auto")]
        gpus: String,
        /// CPUs all sessions may hold at once; admitted sessions beyond it wait as Queued (default: no limit).
        #[arg(long = "cluster-cpus", env = "NSML_CLUSTER_CPUS")]
        cluster_cpus: Option<u32>,
    },
    /// Runs the named services of a distributed deployment.
    ///
    /// Every process of the deployment shares the configuration's Postgres database and NATS JetStream
    /// stream. A database that does not exist yet is created by the first process to start (the store's user
    /// needs the CREATEDB privilege for that). The process that runs `auth` writes a fresh host token into
    /// its data directory and prints where it is; the one that runs `gateway` applies the `--competition`
    /// manifests once the services behind it answer. Sessions use the Python SDK shipped inside this binary
    /// unless the configuration's `runner.sdk_path` or NSML_SDK_PATH names another.
    Serve {
        /// Services to run: auth, storage, session, quota, submission, leaderboard, gateway.
        #[arg(required = true)]
        services: Vec<ServiceName>,
        /// The deployment's configuration file (TOML); `NSML_…` environment variables override it.
        #[arg(long, env = "NSML_CONFIG")]
        config: PathBuf,
        /// A competition manifest to apply once the platform answers (repeatable), with the host token the
        /// auth service writes (or NSML_TOKEN); only with `gateway`. Every start applies it again, as `up` does.
        #[arg(long = "competition")]
        competitions: Vec<PathBuf>,
    },
    /// Runs one session's runner in this process, as a cluster job does: the executor writes this command.
    Runner {
        /// The runner's configuration file (the platform's addresses, the internal secret, the runner's
        /// settings), readable by its owner only.
        #[arg(long, env = "NSML_RUNNER_CONFIG")]
        config: PathBuf,
        /// The session to run, as the executor encodes it.
        #[arg(long)]
        session: String,
        /// The session's time limit in seconds (0: none).
        #[arg(long, default_value_t = 0)]
        time_limit: u64,
        /// The GPUs the session holds: `none` or indices (`0,1`). Default: those of the Slurm job the
        /// runner runs in, else the configuration's.
        #[arg(long)]
        gpus: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    tune_allocator();
    nsml_common::bulk::on_transfers(transferring);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

/// Option numbers of the bundled mimalloc 3 (`mi_option_arena_eager_commit`, `mi_option_purge_delay` in
/// mimalloc.h); the crate names none. A test checks their defaults, so a renumbering shows up on upgrade.
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long the allocator keeps freed memory before giving it back while a long log is read at start-up.
const PURGE_DELAY_CATCHING_UP_MS: std::ffi::c_long = 1000;

/// How long the allocator keeps freed memory before giving it back while a bulk transfer is in flight
/// ([`nsml_common::bulk`]). A checkpoint moves through 1 MiB chunks, each allocated, filled and freed; given
/// back at once, each is faulted in and zeroed again for the next. On the 2-core development machine (a VM,
/// where a fresh page is dearer still), with this delay for the whole process, `nsml.load` of 1 GiB took a
/// median 0.37 and 0.63 s against 1.33 and 1.11 s without, and `model pull` 0.63 and 0.61 s against 1.17 and
/// 1.15 s (`nsml-bench --checkpoints`, two rounds of three runs).
const PURGE_DELAY_TRANSFERRING_MS: std::ffi::c_long = 100;

/// What the allocator's purge delay is set from: a long log being read at start-up, and bulk transfers in
/// flight.
static ALLOCATOR_USE: std::sync::Mutex<(bool, bool)> = std::sync::Mutex::new((false, false));

/// While `reading` a long log at start-up, has the allocator keep freed memory for a moment
/// ([`PURGE_DELAY_CATCHING_UP_MS`]); afterwards, give it back at once again, and what it kept now. Reading the
/// log allocates and frees much, and memory given back at once is zeroed again by the kernel on its next use:
/// at 6 M events, about a fifth of the start-up. A short log is not worth it: threads that go quiet keep what
/// was freed until they next allocate, which left an idle `nsmld` 17 MB larger. `MIMALLOC_PURGE_DELAY`, when
/// set, stays as it says.
pub(crate) fn reading_long_log(reading: bool) {
    let mut using = ALLOCATOR_USE.lock().unwrap_or_else(|e| e.into_inner());
    using.0 = reading;
    set_purge_delay(*using);
}

/// Told by [`nsml_common::bulk`] when the first bulk transfer starts and the last ends: while any is in
/// flight the allocator keeps freed memory for [`PURGE_DELAY_TRANSFERRING_MS`], as [`reading_long_log`] does.
fn transferring(active: bool) {
    let mut using = ALLOCATOR_USE.lock().unwrap_or_else(|e| e.into_inner());
    using.1 = active;
    set_purge_delay(*using);
}

/// Sets the purge delay for a long log being read and for transfers in flight; once neither, gives back at
/// once again, and what was kept now.
#[allow(unsafe_code)]
fn set_purge_delay((reading, transferring): (bool, bool)) {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    let delay = if reading {
        PURGE_DELAY_CATCHING_UP_MS
    } else if transferring {
        PURGE_DELAY_TRANSFERRING_MS
    } else {
        0
    };
    // SAFETY: as in `tune_allocator`.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, delay) };
    if delay == 0 {
        // SAFETY: collecting is allowed at any time, from any thread.
        unsafe { libmimalloc_sys::mi_collect(true) };
    }
}

/// Makes the allocator give freed memory back to the system at once and commit its arenas only as they are used
/// (so an idle server stays small), unless mimalloc's own environment variables (`MIMALLOC_PURGE_DELAY`,
/// `MIMALLOC_ARENA_EAGER_COMMIT`) say otherwise. Set before the runtime starts its threads.
///
/// It never asks for transparent huge pages: mimalloc is built without that request (its `no_thp` feature,
/// set in the workspace). Asked for, the kernel backed the first arena, mapped before `main`, with a 2 MiB page
/// at its first touch, 3 MB of an idle server's 33; and it zeroes 2 MiB at each first touch, a pause of one to
/// several milliseconds for the thread that touches it and every request waiting on that thread: with them,
/// the p99 of admissions through the gateway was 5.2–5.8 ms against 3.6–4.0 ms without (16 clients, 2-core
/// machine). mimalloc's run-time switch, `PR_SET_THP_DISABLE`, is not used: it holds for the whole process and
/// is inherited by every process the runner starts, participants' code included.
#[allow(unsafe_code)]
fn tune_allocator() {
    for (option, env, value) in [
        (ARENA_EAGER_COMMIT, "MIMALLOC_ARENA_EAGER_COMMIT", 0),
        (PURGE_DELAY, "MIMALLOC_PURGE_DELAY", 0),
    ] {
        if std::env::var_os(env).is_none() {
            // SAFETY: mimalloc's options are plain values it reads on later allocations and frees; setting one
            // is allowed at any time, from any thread.
            unsafe { libmimalloc_sys::mi_option_set(option, value) };
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = nsml_common::telemetry::init(&service_name(&cli.command));
    if let Some(addr) = cli.metrics_listen
        && !matches!(cli.command, Command::Runner { .. })
    {
        // Serves until the process ends; installed before any service records a figure.
        nsml_common::metrics::serve(addr, tokio_util::sync::CancellationToken::new()).await?;
        println!("nsmld metrics at http://{addr}/metrics");
    }
    let result = match cli.command {
        Command::Up {
            data_dir,
            listen,
            competitions,
            gpus,
            cluster_cpus,
        } => {
            let config = Config::embedded(data_dir, listen, &gpus, cluster_cpus)?;
            let dep = Deployment::open(config).await?;
            dep.run_embedded(competitions).await
        }
        Command::Serve {
            services,
            config,
            competitions,
        } => {
            let competitions = competitions::load_for_serve(&services, &competitions)?;
            let config = Config::load(&config)?;
            let dep = Deployment::open(config).await?;
            dep.run_services(&services, competitions).await
        }
        Command::Runner {
            config,
            session,
            time_limit,
            gpus,
        } => runner::run(&config, &session, time_limit, gpus.as_deref()).await,
    };
    // After a signal or the runner's end: the spans still batched go out before the process does.
    telemetry.shutdown().await;
    result
}

/// The service name a process's spans are exported under (unless `OTEL_SERVICE_NAME` says otherwise):
/// `nsmld` for the whole platform, `nsml-session` (or `nsml-session+quota`) for the services one process
/// serves, `nsml-runner` for a session's runner.
fn service_name(command: &Command) -> String {
    match command {
        Command::Up { .. } => "nsmld".into(),
        Command::Serve { services, .. } => {
            let names: Vec<String> = services
                .iter()
                .filter_map(clap::ValueEnum::to_possible_value)
                .map(|v| v.get_name().to_string())
                .collect();
            format!("nsml-{}", names.join("+"))
        }
        Command::Runner { .. } => "nsml-runner".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::{ARENA_EAGER_COMMIT, PURGE_DELAY};

    #[test]
    #[allow(unsafe_code)]
    fn the_tuned_options_are_the_ones_mimalloc_documents() {
        // SAFETY: reading an option has no preconditions.
        let (eager, purge) = unsafe {
            (
                libmimalloc_sys::mi_option_get(ARENA_EAGER_COMMIT),
                libmimalloc_sys::mi_option_get(PURGE_DELAY),
            )
        };
        // Their defaults in mimalloc 3's options.c: commit arenas eagerly where the system overcommits; purge
        // freed memory after a second.
        assert_eq!((eager, purge), (2, 1000));
    }

    /// No mapping of the process is advised to use huge pages: the allocator, built without that request,
    /// makes none, not even for the arena it maps before `main`.
    #[cfg(target_os = "linux")]
    #[test]
    fn no_memory_is_advised_to_use_huge_pages() {
        let advised = std::fs::read_to_string("/proc/self/smaps")
            .expect("smaps")
            .lines()
            .filter(|l| l.starts_with("VmFlags:") && l.split_whitespace().any(|f| f == "hg"))
            .count();
        assert_eq!(advised, 0);
    }
}
