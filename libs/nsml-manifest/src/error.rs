//! The one error type of the crate.

use std::path::PathBuf;

/// Everything that can go wrong while loading, packing or applying a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The manifest file could not be read.
    #[error("cannot read `{}`: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The manifest is not valid TOML or does not fit the schema (an unknown key, a wrong type).
    #[error("`{}`: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    /// A key holds a value the schema accepts but the platform does not.
    #[error("`{}`: `{key}`: {reason}", path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        reason: String,
    },
    /// A byte size such as `24G` could not be parsed.
    #[error(
        "invalid size `{input}`: expected a number with an optional binary unit K, M, G or T \
         (e.g. 24G, 512M, 1.5G, 100K) or a plain number of bytes"
    )]
    InvalidSize { input: String },
    /// A duration such as `1h` could not be parsed.
    #[error("invalid duration `{input}`: {reason} (e.g. 1h, 30m, 90s)")]
    InvalidDuration { input: String, reason: String },
    /// The manifest has no dataset of that name.
    #[error("dataset `{name}` is not in the manifest")]
    UnknownDataset { name: String },
    /// A file or directory a dataset needs is missing.
    #[error("dataset `{dataset}`: {what} `{}` does not exist", path.display())]
    MissingPart {
        dataset: String,
        what: &'static str,
        path: PathBuf,
    },
    /// Reading a dataset's files into its archive failed.
    #[error("dataset `{dataset}`: cannot pack `{}`: {source}", path.display())]
    Pack {
        dataset: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The bearer token cannot be sent as gRPC metadata.
    #[error("the token holds characters that cannot be sent in a header")]
    InvalidToken,
    /// The server refused or failed a call.
    #[error("{action}: {}", .source.message())]
    Rpc {
        action: String,
        #[source]
        source: tonic::Status,
    },
}
