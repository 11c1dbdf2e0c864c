//! The manifest as written: serde structures that mirror the TOML exactly, unknown keys refused.
//!
//! Nothing here is checked beyond types; [`crate::manifest`] validates and resolves these into a
//! [`crate::Manifest`].

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawManifest {
    pub id: String,
    pub title: String,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub policy: RawPolicy,
    #[serde(default)]
    pub datasets: Vec<RawDataset>,
    #[serde(default)]
    pub teams: Vec<RawTeam>,
    #[serde(default)]
    pub users: Vec<RawUser>,
    #[serde(default)]
    pub environments: Vec<RawEnvironment>,
    #[serde(default)]
    pub rounds: Vec<RawRound>,
}

/// A round (`[[rounds]]`): a name, some of the competition's datasets, its dates and the submit rules it sets
/// for them, with the keys `[policy]` uses.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRound {
    pub name: String,
    #[serde(default)]
    pub datasets: Vec<String>,
    pub opens: Option<String>,
    pub closes: Option<String>,
    pub submit_interval: Option<RawDuration>,
    pub submit_time_limit: Option<RawDuration>,
    pub submit_max_cpus: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEnvironment {
    pub name: String,
    pub python: String,
    #[serde(default)]
    pub description: String,
}

/// A byte size written either as a string with a unit (`"170G"`) or as a plain number of bytes.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawSize {
    Bytes(u64),
    Text(String),
}

/// A duration written either as a string (`"1h"`) or as a plain number of seconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawDuration {
    Secs(u64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    pub team_gpus: Option<u32>,
    pub team_cpus: Option<u32>,
    pub team_memory: Option<RawSize>,
    pub team_sessions: Option<u32>,
    pub team_storage: Option<RawSize>,
    pub submit_interval: Option<RawDuration>,
    pub submit_time_limit: Option<RawDuration>,
    pub submit_max_cpus: Option<u32>,
    /// When runs and submits open: an RFC 3339 time (`2026-12-01T09:00:00Z`).
    pub opens: Option<String>,
    /// When submits close and the boards freeze: an RFC 3339 time.
    pub closes: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDataset {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub path: String,
    pub metric: String,
    pub direction: Option<String>,
    pub private_fraction: Option<f64>,
    pub split_seed: Option<u64>,
    pub private_keys_file: Option<String>,
    pub eval_script: Option<String>,
    #[serde(default)]
    pub tag: String,
    pub train: Option<String>,
    pub test_data: Option<String>,
    pub test_label: Option<String>,
    pub trial_data: Option<String>,
    pub trial_label: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTeam {
    pub name: String,
    #[serde(default)]
    pub members: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUser {
    pub name: String,
    pub password: Option<String>,
}
