//! Every configuration file in `deploy/` is one `nsmld` accepts: the deployments' configurations, the
//! runner's, and the command lines of the systemd units. (The Slurm configuration in `deploy/slurm/` is
//! loaded by slurmctld and slurmd in the Slurm integration test.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::path::{Path, PathBuf};

use clap::Parser as _;

use crate::deployment::{Config, ExecutorSection};
use crate::runner::RunnerHost;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    found.sort();
    found
}

#[test]
fn every_deployment_configuration_loads() {
    let mut kinds = Vec::new();
    for path in files(&deploy(), "toml") {
        let text = std::fs::read_to_string(&path).unwrap();
        if path.file_name().is_some_and(|n| n == "runner.toml") {
            let host: RunnerHost =
                toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(host.internal_secret.len() >= 16, "{}", path.display());
            continue;
        }
        let config: Config =
            toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(config.services.is_some(), "{}", path.display());
        if let ExecutorSection::Slurm(slurm) = &config.executor {
            let cfg = slurm.config().unwrap();
            assert_eq!(cfg.partition.as_deref(), Some("nsml"), "{}", path.display());
        }
        kinds.push(format!("{:?}", std::mem::discriminant(&config.executor)));
    }
    // The local and the Slurm executor both have an example.
    kinds.sort();
    kinds.dedup();
    assert_eq!(kinds.len(), 2, "{kinds:?}");
}

#[test]
fn the_systemd_units_run_commands_nsmld_accepts() {
    let units = files(&deploy().join("systemd"), "service");
    assert!(!units.is_empty());
    for unit in units {
        let text = std::fs::read_to_string(&unit).unwrap();
        for exec in text.lines().filter_map(|l| l.strip_prefix("ExecStart=")) {
            let words: Vec<String> = exec
                .split_whitespace()
                .map(|w| w.replace("%i", "session"))
                .collect();
            if words[0].ends_with("/nsmld") {
                crate::Cli::try_parse_from(&words)
                    .unwrap_or_else(|e| panic!("{}: `{exec}`: {e}", unit.display()));
            }
        }
    }
}
