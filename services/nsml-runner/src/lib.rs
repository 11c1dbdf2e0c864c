//! The NSML runner: the only part of the platform that touches participant code.
//!
//! Given a session, the [`LocalExecutor`] fetches the code snapshot (and for a submit the checkpoint)
//! from storage, lays out the session directory with the dataset part the session may see, takes the
//! session's GPUs, starts `python -u ENTRY ARGS` with a clean environment, streams its output to the
//! session service, serves the Python SDK on a Unix socket (`report`, `save`, `load`, `predictions`),
//! and reports the exit. Participant code runs only inside a sandbox (bubblewrap namespaces, an
//! unprivileged uid, a cgroup with the session's memory, CPU and process limits); the runner refuses
//! to start a session where it cannot build one.
//!
//! The crate reads top-down:
//! - [`executor`]: the [`Executor`](nsml_common::executor::Executor) implementation and session layout;
//! - [`process`]: running one process (exit status, time limit, stop), testable without services;
//! - [`launch`]: the child's environment and the one function that builds its command (the sandbox seam);
//! - [`sandbox`]: what the sandbox shows and hides, and the command that enters it (which [`launch`]
//!   builds on, never the other way round); [`cgroup`]: the session's limits and accounting;
//!   [`limits`]: the runner's own limits (processes, disk, log volume) and how limits read;
//! - [`sdk`]: the SDK socket protocol; [`platform`]: what the process asks of the services;
//! - [`logs`]: output lines and their batched stream; [`archive`]: safe tar extraction and packing;
//! - [`environment`]: Python environments built from a session's `requirements.txt`, cached;
//! - [`dataset`]: which dataset part a session sees and its layout; [`gpu`]: the GPU inventory;
//!   [`args`]: shell-style argument splitting;
//! - [`oneshot`]: one session's runner as a process of its own (what a cluster job runs);
//!   [`processes`]: the executor that starts such a process per session on this machine;
//!   [`slurm`]: the executor that runs each session as a Slurm job.

pub mod archive;
pub mod args;
pub mod cgroup;
pub mod dataset;
pub mod environment;
pub mod error;
pub mod executor;
pub mod gpu;
pub mod launch;
pub mod limits;
pub mod logs;
pub mod oneshot;
pub mod platform;
pub mod process;
pub mod processes;
pub mod sandbox;
pub mod sdk;
pub mod slurm;

pub use error::RunnerError;
pub use executor::{LocalExecutor, RunnerConfig};
pub use gpu::{GpuInfo, GpuInventory, GpuLease, GpuSource};
pub use limits::LimitsConfig;
pub use process::{ProcessOutcome, ProcessSpec, run_process};
pub use processes::{ProcessConfig, ProcessExecutor};
pub use slurm::{SlurmConfig, SlurmExecutor};
