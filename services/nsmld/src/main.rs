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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
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
