//! The competition manifest: the TOML file in which a host describes a competition (its datasets, policy, teams
//! and users), and everything done with it.
//!
//! [`load`] parses and validates a manifest; [`Manifest`] converts it to API messages and packs each dataset into
//! the canonical archive layout; [`apply`] registers the datasets and the competition on a server. The size and
//! duration syntax of the manifest lives in [`units`] so that the command-line client parses `--memory 24G` the
//! same way.

mod apply;
mod error;
mod manifest;
mod pack;
mod schema;
pub mod units;

pub use apply::{CHUNK_SIZE, apply};
pub use error::ManifestError;
pub use manifest::{
    DatasetSpec, EnvironmentSpec, METRICS, Manifest, PolicySpec, RoundSpec, TeamSpec, UserSpec,
    load,
};
pub use units::{format_size, parse_duration, parse_size, short_size};
