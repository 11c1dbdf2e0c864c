//! `nsmld`: the NSML server.
//!
//! - `nsmld up --data-dir DIR` runs every service in one process on the embedded default (a SQLite file in
//!   DIR, the in-process bus, the local runner) and loads the example competition.
//! - `nsmld serve SERVICE… --config FILE` runs the named services of a distributed deployment (Postgres,
//!   NATS JetStream), each reaching the others by the addresses in the config.

mod deployment;

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
    Serve {
        /// Services to run: auth, storage, session, quota, submission, leaderboard, gateway.
        #[arg(required = true)]
        services: Vec<ServiceName>,
        /// The deployment's configuration file (TOML); `NSML_…` environment variables override it.
        #[arg(long, env = "NSML_CONFIG")]
        config: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    tune_allocator();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

/// Option numbers of the bundled mimalloc 3 (`mi_option_arena_eager_commit`, `mi_option_purge_delay` in
/// mimalloc.h); the crate names neither. A test checks their defaults, so a renumbering shows up on upgrade.
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Makes the allocator give freed memory back to the system at once and commit its arenas only as they are
/// used, so an idle server stays small, unless mimalloc's own environment variables (`MIMALLOC_PURGE_DELAY`,
/// `MIMALLOC_ARENA_EAGER_COMMIT`) say otherwise. Set before the runtime starts its threads.
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
    nsml_common::telemetry::init("nsmld");
    match cli.command {
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
        Command::Serve { services, config } => {
            let config = Config::load(&config)?;
            let dep = Deployment::open(config).await?;
            dep.run_services(&services).await
        }
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
}
