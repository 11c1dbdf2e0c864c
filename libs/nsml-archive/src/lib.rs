//! Tar archives as the platform moves them: code uploads and dataset parts (gzip'd), checkpoints (plain,
//! since weights do not compress; [`Encoding`]).
//!
//! Archives come from participants (code, checkpoints their programs write) and hosts (datasets), and are
//! unpacked by the runner, the scorer and the CLI, so every reader here holds them to one set of rules
//! ([`Checker`]): no absolute paths, no `..`, no device files or pipes, no links that lead out of the tree
//! (directly or through another link), nothing written beneath a link, and limits on entries and on the
//! bytes they expand to, counted while the archive streams.
//!
//! - [`measure`] checks an archive without unpacking it; [`unpack()`] writes one into a directory;
//!   [`first_file`] reads the one file a small archive holds.
//! - Readers take plain and gzip'd tars alike, told apart by their first bytes ([`Decoded`]).
//! - [`pack_dir`] packs a tree as it is; [`collect()`] and [`pack_collected`] pack an upload under
//!   [`IgnoreRules`] (`.nsmlignore`), and [`write_collected`] writes that tar, plain or gzip'd, into any
//!   writer; [`Reproducible`] packs the same files into the same bytes.
//!
//! Everything here blocks: run it on a blocking thread. Errors are one closed enum, [`ArchiveError`].

pub mod collect;
pub mod error;
pub mod format;
pub mod ignore;
pub mod pack;
pub mod rules;
pub mod unpack;

pub use collect::{
    Collected, CollectedEntry, collect, pack_collected, pack_collected_teed, write_collected,
};
pub use error::{ArchiveError, PathFault, Refusal, Special};
pub use format::{Decoded, Encoding};
pub use ignore::IgnoreRules;
pub use pack::{Reproducible, pack_dir};
pub use rules::{Checked, Checker, Kind, Limits, TreeSize, entry_path, is_metadata, normalize};
pub use unpack::{Links, Unpacked, first_file, measure, unpack};
