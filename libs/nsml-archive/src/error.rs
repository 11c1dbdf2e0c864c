//! What can go wrong with an archive: one closed enum, [`ArchiveError`], which callers map into their own
//! errors; a broken safety rule is a [`Refusal`], naming the entry and the rule.

use std::io;
use std::path::PathBuf;

/// Why an entry's path (or a hard link's target) does not name a place inside the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathFault {
    /// `/etc/passwd`.
    Absolute,
    /// `a/../../x`: a `..` component.
    Climbs,
    /// A name that is not UTF-8.
    NotUtf8,
}

/// The kind of entry that no tree may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Special {
    /// A character or block device.
    Device,
    /// A named pipe.
    Fifo,
}

/// A safety rule an archive breaks. `entry` is the entry's path as written in the archive when that path is
/// itself at fault, else as normalized (`a/b`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("entry `{entry}` {}", describe_fault(*fault))]
    BadPath { entry: String, fault: PathFault },
    #[error("an entry has an empty name")]
    EmptyName,
    #[error("entry `{entry}` is a device file or pipe")]
    Special { entry: String, kind: Special },
    #[error(
        "entry `{entry}` has an unsupported type ({kind}); use plain files, directories and links"
    )]
    Unsupported { entry: String, kind: String },
    #[error("{} `{entry}` has no target", if *hard { "hard link" } else { "symlink" })]
    NoTarget { entry: String, hard: bool },
    #[error("symlink `{entry}` has a target that is not UTF-8")]
    TargetNotUtf8 { entry: String },
    #[error("symlink `{entry}` points to an absolute path (`{target}`)")]
    SymlinkAbsolute { entry: String, target: String },
    #[error("symlink `{entry}` points outside the archive (`{target}`)")]
    SymlinkOutside { entry: String, target: String },
    #[error("symlink `{entry}` resolves through symlink `{link}`")]
    SymlinkThroughSymlink { entry: String, link: String },
    /// Found by following the links of an unpacked tree (names alone may miss it).
    #[error("symlink `{entry}` resolves outside the archive")]
    ResolvesOutside { entry: String },
    #[error("symlink `{entry}` is part of a loop of links")]
    SymlinkLoop { entry: String },
    #[error("hard link `{entry}` points outside the archive: entry `{target}` {}", describe_fault(*fault))]
    HardLinkOutside {
        entry: String,
        target: String,
        fault: PathFault,
    },
    #[error("hard link `{entry}` points to symlink `{target}`")]
    HardLinkToSymlink { entry: String, target: String },
    #[error("hard link `{entry}` resolves through symlink `{link}`")]
    HardLinkThroughSymlink { entry: String, link: String },
    #[error(
        "hard link `{entry}` points to `{target}`, which is not a file of the archive before it"
    )]
    HardLinkNotAFile { entry: String, target: String },
    #[error("entry `{entry}` lies beneath symlink `{link}`")]
    BeneathSymlink { entry: String, link: String },
    #[error("entry `{entry}` lies beneath file `{file}`")]
    BeneathFile { entry: String, file: String },
    #[error("entry `{entry}` would replace a directory")]
    ReplacesDirectory { entry: String },
}

fn describe_fault(fault: PathFault) -> &'static str {
    match fault {
        PathFault::Absolute => "has an absolute path",
        PathFault::Climbs => "leaves the archive through `..`",
        PathFault::NotUtf8 => "has a name that is not UTF-8",
    }
}

impl Refusal {
    /// The entry the refusal is about (empty for [`Refusal::EmptyName`]).
    pub fn entry(&self) -> &str {
        match self {
            Refusal::EmptyName => "",
            Refusal::BadPath { entry, .. }
            | Refusal::Special { entry, .. }
            | Refusal::Unsupported { entry, .. }
            | Refusal::NoTarget { entry, .. }
            | Refusal::TargetNotUtf8 { entry }
            | Refusal::SymlinkAbsolute { entry, .. }
            | Refusal::SymlinkOutside { entry, .. }
            | Refusal::SymlinkThroughSymlink { entry, .. }
            | Refusal::ResolvesOutside { entry }
            | Refusal::SymlinkLoop { entry }
            | Refusal::HardLinkOutside { entry, .. }
            | Refusal::HardLinkToSymlink { entry, .. }
            | Refusal::HardLinkThroughSymlink { entry, .. }
            | Refusal::HardLinkNotAFile { entry, .. }
            | Refusal::BeneathSymlink { entry, .. }
            | Refusal::BeneathFile { entry, .. }
            | Refusal::ReplacesDirectory { entry } => entry,
        }
    }
}

/// Everything reading, checking, unpacking or packing an archive can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The bytes are not a gzip'd tar, or it breaks off.
    #[error("it is not a readable gzip'd tar ({0})")]
    Unreadable(#[source] io::Error),
    /// An entry breaks a safety rule.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// More entries than the limit.
    #[error("it has more than {limit} entries")]
    TooManyEntries { limit: u64 },
    /// More bytes of file content than the limit; `reached` counts up to the entry that crossed it.
    #[error("it expands past the limit of {limit} bytes")]
    TooLarge { limit: u64, reached: u64 },
    /// The archive holds no regular file where one was wanted.
    #[error("the archive holds no file")]
    NoFile,
    /// A file the archive wants is larger than the caller takes.
    #[error("`{entry}` is larger than {limit} bytes")]
    FileTooLarge { entry: String, limit: u64 },
    /// An `.nsmlignore` pattern does not parse.
    #[error(".nsmlignore line {line}: invalid pattern `{pattern}`: {reason}")]
    BadPattern {
        line: usize,
        pattern: String,
        reason: String,
    },
    /// The local file system failed (reading what is packed, writing what is unpacked).
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ArchiveError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        ArchiveError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
