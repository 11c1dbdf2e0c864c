//! Tar archives in and out of the runner: safe extraction (of plain and gzip'd tars alike) and packing
//! of checkpoints (plain tars: weights do not compress), and the removal of trees that sessions wrote.
//!
//! Archives come from participants (code snapshots, checkpoints), so extraction trusts nothing in them:
//! it holds them to `nsml_archive`'s rules (no absolute paths or `..`, no devices, FIFOs or sparse files,
//! no writing through a symlink or beneath a file, symlinks that stay inside the destination even through
//! other links, hard links turned into copies of a file extracted earlier, no set-uid bits) and stops at a
//! byte and entry limit against archive bombs. Any refusal fails the whole archive: the caller removes the
//! half-written destination.
//!
//! Packing never follows symlinks (a link to a file outside a checkpoint is stored as a link, not as that
//! file's content) and skips sockets, FIFOs and devices.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use futures::{Stream, StreamExt};
use nsml_archive::{ArchiveError, Links, PathFault, Refusal, Special};
use tokio::sync::mpsc;

use crate::error::{Result, RunnerError};

/// How much an archive may expand to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtractLimits {
    /// Total bytes of file content.
    pub max_bytes: u64,
    /// Number of entries (files, directories, links).
    pub max_entries: u64,
}

impl ExtractLimits {
    /// Limits for a code snapshot: code is small (the CLI warns past 10 MB).
    pub const CODE: Self = Self {
        max_bytes: 4 << 30,
        max_entries: 1_000_000,
    };
    /// Limits for a checkpoint (a team's whole storage quota is about 450 GB).
    pub const CHECKPOINT: Self = Self {
        max_bytes: 1 << 40,
        max_entries: 10_000_000,
    };
    /// Limits for a dataset part, which comes from a competition host.
    pub const DATASET: Self = Self {
        max_bytes: u64::MAX,
        max_entries: u64::MAX,
    };
}

/// What an extraction wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExtractStats {
    pub entries: u64,
    pub bytes: u64,
}

/// What the runner says of a refused entry.
fn why(refusal: &Refusal) -> String {
    let path = |fault: &PathFault| match fault {
        PathFault::Absolute => "absolute path",
        PathFault::Climbs => "path contains `..`",
        PathFault::NotUtf8 => "name is not UTF-8",
    };
    match refusal {
        Refusal::BadPath { fault, .. } | Refusal::HardLinkOutside { fault, .. } => {
            path(fault).into()
        }
        Refusal::EmptyName => "non-directory entry at the archive root".into(),
        Refusal::Special {
            kind: Special::Device,
            ..
        } => "device file".into(),
        Refusal::Special {
            kind: Special::Fifo,
            ..
        } => "FIFO".into(),
        Refusal::Unsupported { kind, .. } => format!("unsupported entry type {kind}"),
        Refusal::NoTarget { hard: true, .. } => "hard link without a target".into(),
        Refusal::NoTarget { hard: false, .. } => "symlink without a target".into(),
        Refusal::TargetNotUtf8 { .. } => "symlink target is not UTF-8".into(),
        Refusal::SymlinkAbsolute { .. } => "symlink with an absolute target".into(),
        Refusal::SymlinkOutside { .. } => "symlink points outside the archive".into(),
        Refusal::SymlinkThroughSymlink { link, .. } => {
            format!("symlink resolves through symlink `{link}`")
        }
        Refusal::ResolvesOutside { .. } => "symlink resolves outside the archive".into(),
        Refusal::SymlinkLoop { .. } => "symlink loop".into(),
        Refusal::HardLinkToSymlink { .. }
        | Refusal::HardLinkThroughSymlink { .. }
        | Refusal::HardLinkNotAFile { .. } => {
            "hard link to something that is not a file extracted earlier".into()
        }
        Refusal::BeneathSymlink { .. } => "path passes through a symlink".into(),
        Refusal::BeneathFile { .. } => "path passes through a file".into(),
        Refusal::ReplacesDirectory { .. } => "would replace a directory".into(),
    }
}

/// An archive error in the runner's words.
fn archive_error(err: ArchiveError) -> RunnerError {
    match err {
        ArchiveError::Refused(r) => RunnerError::UnsafeArchive {
            path: r.entry().to_string(),
            why: why(&r),
        },
        ArchiveError::TooManyEntries { limit } => RunnerError::ArchiveTooLarge {
            limit,
            what: "entries",
        },
        ArchiveError::TooLarge { limit, .. } => RunnerError::ArchiveTooLarge {
            limit,
            what: "bytes",
        },
        ArchiveError::Io {
            action,
            path,
            source,
        } => RunnerError::io(format!("{action} {}", path.display()), source),
        ArchiveError::Unreadable(e) => RunnerError::io("cannot read archive", e),
        other => RunnerError::io("cannot read archive", io::Error::other(other.to_string())),
    }
}

/// Extracts the tar, plain or gzip'd, read from `reader` into `dest` (an existing, empty directory that nothing
/// else writes to meanwhile). See the module documentation for what is refused.
pub fn extract_archive<R: Read>(
    reader: R,
    dest: &Path,
    limits: ExtractLimits,
) -> Result<ExtractStats> {
    let limits = nsml_archive::Limits {
        max_entries: limits.max_entries,
        max_bytes: limits.max_bytes,
    };
    let done = nsml_archive::unpack(reader, dest, limits, Links::Keep).map_err(archive_error)?;
    Ok(ExtractStats {
        entries: done.entries,
        bytes: done.bytes,
    })
}

/// Writes `dir`'s tree as a plain tar into `writer`, names relative to `dir`, and returns the writer: how
/// a checkpoint is sent. The tree is read by descriptor, never through a link (see
/// [`nsml_archive::pack_dir`]), so it may be a directory the session handed over rather than a copy.
pub fn pack_dir<W: Write>(dir: &Path, writer: W) -> Result<W> {
    nsml_archive::pack_dir(dir, writer, nsml_archive::Encoding::Plain).map_err(archive_error)
}

/// Feeds a blocking reader from an async channel of chunks (the bridge from a gRPC stream to `tar`).
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Extracts a tar (plain or gzip'd) arriving as a stream of byte chunks (a gRPC download) into `dest`, which is
/// created and must not exist yet. On failure `dest` is removed.
pub async fn extract_stream<S>(
    stream: S,
    dest: &Path,
    limits: ExtractLimits,
) -> Result<ExtractStats>
where
    S: Stream<Item = Result<Vec<u8>>> + Send,
{
    fs::create_dir_all(dest.parent().unwrap_or(Path::new("/")))
        .map_err(|e| RunnerError::io(format!("cannot create {}", dest.display()), e))?;
    fs::create_dir(dest)
        .map_err(|e| RunnerError::io(format!("cannot create {}", dest.display()), e))?;
    let (tx, rx) = mpsc::channel(16);
    let target = dest.to_path_buf();
    let extract = tokio::task::spawn_blocking(move || {
        let reader = ChannelReader {
            rx,
            chunk: Vec::new(),
            pos: 0,
        };
        extract_archive(reader, &target, limits)
    });
    // A large download is announced as a bulk transfer until it is extracted.
    let mut metered = nsml_common::bulk::Meter::default();
    let meter = &mut metered;
    // Errors of the download itself are kept here: the reader sees them only as a broken stream.
    let feed = async move {
        futures::pin_mut!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(chunk) => {
                    meter.moved(chunk.len());
                    if tx.send(Ok(chunk)).await.is_err() {
                        return Ok(());
                    }
                }
                Err(e) => {
                    let _ = tx
                        .send(Err(io::Error::other("the download broke off")))
                        .await;
                    return Err(e);
                }
            }
        }
        Ok(())
    };
    let (fed, extracted) = tokio::join!(feed, extract);
    let result = match (fed, extracted) {
        (Err(e), _) => Err(e),
        (Ok(()), Ok(r)) => r,
        (Ok(()), Err(join)) => Err(RunnerError::io(
            "archive extraction stopped",
            io::Error::other(join),
        )),
    };
    drop(metered);
    if result.is_err() {
        remove_tree(dest).await;
    }
    result
}

/// Removes a directory tree, ignoring a tree that is already gone; a failure is logged (what is
/// left is removed by `nsml rm` or the runner's next start).
pub async fn remove_tree(path: &Path) {
    let p = path.to_path_buf();
    let res = tokio::task::spawn_blocking(move || remove_tree_now(&p)).await;
    match res {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove directory")
        }
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "directory removal stopped"),
    }
}

/// Removes `path` (blocking): a directory with everything under it, or a file, socket or link
/// itself. Succeeds when nothing is there.
///
/// Participant code wrote the tree, so removal trusts nothing in it: a symlink is removed, never
/// followed (a link to `/` takes nothing outside with it), and a directory the session made
/// read-only or unsearchable (it runs as the runner's own uid when the runner is not root) is
/// opened up to its owner first, through a descriptor opened with `O_NOFOLLOW`, so that no link
/// swapped in for a directory can point the change of mode elsewhere.
pub fn remove_tree_now(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return ignore_gone(fs::remove_file(path));
    }
    // std's removal walks by descriptor and never follows a link; it stops only at a directory it
    // may not read or write into.
    if ignore_gone(fs::remove_dir_all(path)).is_ok() {
        return Ok(());
    }
    open_up(path)?;
    ignore_gone(fs::remove_dir_all(path))
}

fn ignore_gone(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Gives the owner read, write and search rights on the directory `path` and every directory
/// below it, without following any symlink.
fn open_up(path: &Path) -> io::Result<()> {
    use rustix::fs::{CWD, Mode, OFlags};
    let pinned = rustix::fs::openat(
        CWD,
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    open_up_pinned(pinned)
}

/// [`open_up`] for a directory held by an `O_PATH` descriptor.
fn open_up_pinned(pinned: std::os::fd::OwnedFd) -> io::Result<()> {
    use rustix::fs::{FileType, Mode, OFlags};
    use std::os::fd::AsRawFd;
    // `fchmod` refuses an `O_PATH` descriptor, and `chmodat` would follow a link: the descriptor's
    // `/proc` entry names exactly the directory it holds.
    rustix::fs::chmod(format!("/proc/self/fd/{}", pinned.as_raw_fd()), Mode::RWXU)?;
    let dir = rustix::fs::openat(
        &pinned,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    drop(pinned);
    let mut children = Vec::new();
    for entry in rustix::fs::Dir::read_from(&dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        let is_dir = match entry.file_type() {
            FileType::Directory => true,
            FileType::Unknown => {
                rustix::fs::statat(&dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| FileType::from_raw_mode(st.st_mode).is_dir())
            }
            _ => false,
        };
        if is_dir {
            children.push(name.to_owned());
        }
    }
    for name in children {
        let child = rustix::fs::openat(
            &dir,
            name.as_c_str(),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        open_up_pinned(child)?;
    }
    Ok(())
}

/// Copies a directory tree (directories, regular files, symlinks as links); the copy shares no inode
/// with the source, so a session cannot write through it into a cache.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<u64> {
    let mut bytes = 0;
    fs::create_dir_all(dst)
        .map_err(|e| RunnerError::io(format!("cannot create {}", dst.display()), e))?;
    let entries = fs::read_dir(src)
        .map_err(|e| RunnerError::io(format!("cannot list {}", src.display()), e))?;
    for e in entries {
        let e = e.map_err(|e| RunnerError::io(format!("cannot list {}", src.display()), e))?;
        let (from, to) = (e.path(), dst.join(e.file_name()));
        let ft = e
            .file_type()
            .map_err(|err| RunnerError::io(format!("cannot inspect {}", from.display()), err))?;
        if ft.is_dir() {
            bytes += copy_tree(&from, &to)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&from).map_err(|err| {
                RunnerError::io(format!("cannot read link {}", from.display()), err)
            })?;
            std::os::unix::fs::symlink(target, &to).map_err(|err| {
                RunnerError::io(format!("cannot create link {}", to.display()), err)
            })?;
        } else if ft.is_file() {
            bytes += fs::copy(&from, &to)
                .map_err(|err| RunnerError::io(format!("cannot copy {}", from.display()), err))?;
            let mode = fs::metadata(&to)
                .map(|m| m.permissions().mode())
                .unwrap_or(0o644);
            let _ = fs::set_permissions(&to, fs::Permissions::from_mode(mode | 0o600));
        }
    }
    Ok(bytes)
}
