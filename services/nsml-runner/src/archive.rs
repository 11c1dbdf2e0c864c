//! Gzip'd tar archives in and out of the runner: safe extraction and packing of directories.
//!
//! Archives come from participants (code snapshots, checkpoints), so extraction trusts nothing in
//! them. It refuses absolute paths and `..`; refuses device files, FIFOs and sparse files; never
//! writes through a symlink (every directory on the way to an entry must be a real directory, and
//! files are created with `O_EXCL`); accepts a symlink only when its target stays inside the
//! destination, checked again after the whole archive is out (so a later entry cannot re-aim an
//! earlier link); turns hard links into copies of a file already extracted; drops set-uid bits;
//! and stops at a byte and entry limit against archive bombs. Any refusal fails the whole archive:
//! the caller removes the half-written destination.
//!
//! Packing never follows symlinks (a link to a file outside a checkpoint is stored as a link, not
//! as that file's content) and skips sockets, FIFOs and devices.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use futures::{Stream, StreamExt};
use tar::EntryType;
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

fn unsafe_entry(path: &Path, why: impl Into<String>) -> RunnerError {
    RunnerError::UnsafeArchive {
        path: path.display().to_string(),
        why: why.into(),
    }
}

/// Turns an entry's path into a relative path of plain names; `None` for the archive root (`.`).
fn clean_relative(path: &Path) -> Result<Option<PathBuf>> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err(unsafe_entry(path, "path contains `..`")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(unsafe_entry(path, "absolute path"));
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Makes every directory of `rel` under `root`, refusing to pass through anything but a real directory.
fn real_dirs(root: &Path, rel: &Path, entry: &Path) -> Result<()> {
    let mut cur = root.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(unsafe_entry(entry, "path passes through a symlink"));
            }
            Ok(_) => return Err(unsafe_entry(entry, "path passes through a file")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(&cur)
                .map_err(|e| RunnerError::io(format!("cannot create {}", cur.display()), e))?,
            Err(e) => {
                return Err(RunnerError::io(
                    format!("cannot inspect {}", cur.display()),
                    e,
                ));
            }
        }
    }
    Ok(())
}

/// Prepares `root/rel` for a new non-directory entry: its parents real directories, nothing at the path
/// itself (an earlier file or link of the same name is replaced; a directory is not).
fn place(root: &Path, rel: &Path, entry: &Path) -> Result<PathBuf> {
    if let Some(parent) = rel.parent() {
        real_dirs(root, parent, entry)?;
    }
    let dst = root.join(rel);
    match fs::symlink_metadata(&dst) {
        Ok(m) if m.is_dir() => Err(unsafe_entry(entry, "would replace a directory")),
        Ok(_) => fs::remove_file(&dst)
            .map_err(|e| RunnerError::io(format!("cannot replace {}", dst.display()), e))
            .map(|()| dst),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(dst),
        Err(e) => Err(RunnerError::io(
            format!("cannot inspect {}", dst.display()),
            e,
        )),
    }
}

/// Checks, by name only, that a link at `rel` aiming at `target` stays inside the root.
fn check_link_target(rel: &Path, target: &Path, entry: &Path) -> Result<()> {
    if target.as_os_str().is_empty() {
        return Err(unsafe_entry(entry, "symlink with an empty target"));
    }
    let mut depth = rel.components().count() as i64 - 1;
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return Err(unsafe_entry(entry, "symlink points outside the archive"));
                }
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(unsafe_entry(entry, "symlink with an absolute target"));
            }
        }
    }
    Ok(())
}

/// Resolves the symlink at `root/rel` step by step, following links found on the way, and fails when
/// the resolution ever leaves `root` (e.g. `a -> .` then `b -> a/../x`, which names alone miss).
fn check_link_resolves_inside(root: &Path, rel: &Path) -> Result<()> {
    enum Step {
        Up,
        Name(OsString),
    }
    fn steps(p: &Path, entry: &Path) -> Result<Vec<Step>> {
        let mut out = Vec::new();
        for c in p.components() {
            match c {
                Component::Normal(n) => out.push(Step::Name(n.to_os_string())),
                Component::ParentDir => out.push(Step::Up),
                Component::CurDir => {}
                Component::RootDir | Component::Prefix(_) => {
                    return Err(unsafe_entry(
                        entry,
                        "symlink chain reaches an absolute target",
                    ));
                }
            }
        }
        Ok(out)
    }
    let read_link = |p: &Path| {
        fs::read_link(p)
            .map_err(|e| RunnerError::io(format!("cannot read link {}", p.display()), e))
    };
    let mut at: Vec<OsString> = rel
        .parent()
        .map(|p| {
            p.components()
                .map(|c| c.as_os_str().to_os_string())
                .collect()
        })
        .unwrap_or_default();
    let mut todo: VecDeque<Step> = steps(&read_link(&root.join(rel))?, rel)?.into();
    let mut hops = 0;
    while let Some(step) = todo.pop_front() {
        match step {
            Step::Up => {
                if at.pop().is_none() {
                    return Err(unsafe_entry(rel, "symlink resolves outside the archive"));
                }
            }
            Step::Name(n) => {
                at.push(n);
                let here: PathBuf = std::iter::once(root.as_os_str().to_os_string())
                    .chain(at.iter().cloned())
                    .collect();
                let is_link = fs::symlink_metadata(&here).is_ok_and(|m| m.file_type().is_symlink());
                if is_link {
                    hops += 1;
                    if hops > 40 {
                        return Err(unsafe_entry(rel, "symlink loop"));
                    }
                    at.pop();
                    for s in steps(&read_link(&here)?, rel)?.into_iter().rev() {
                        todo.push_front(s);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Extracts the gzip'd tar read from `reader` into `dest` (an existing, empty directory that nothing
/// else writes to meanwhile). See the module documentation for what is refused.
pub fn extract_tar_gz<R: Read>(
    reader: R,
    dest: &Path,
    limits: ExtractLimits,
) -> Result<ExtractStats> {
    let bad_archive = |e: io::Error| RunnerError::io("cannot read archive", e);
    let mut archive = tar::Archive::new(GzDecoder::new(reader));
    let mut stats = ExtractStats::default();
    let mut links = Vec::new();
    for entry in archive.entries().map_err(bad_archive)? {
        let mut entry = entry.map_err(bad_archive)?;
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            continue;
        }
        stats.entries += 1;
        if stats.entries > limits.max_entries {
            return Err(RunnerError::ArchiveTooLarge {
                limit: limits.max_entries,
                what: "entries",
            });
        }
        let raw = entry.path().map_err(bad_archive)?.into_owned();
        let Some(rel) = clean_relative(&raw)? else {
            if kind.is_dir() {
                continue;
            }
            return Err(unsafe_entry(
                &raw,
                "non-directory entry at the archive root",
            ));
        };
        match kind {
            EntryType::Directory => real_dirs(dest, &rel, &raw)?,
            EntryType::Regular | EntryType::Continuous => {
                let size = entry.size();
                if size > limits.max_bytes.saturating_sub(stats.bytes) {
                    return Err(RunnerError::ArchiveTooLarge {
                        limit: limits.max_bytes,
                        what: "bytes",
                    });
                }
                let dst = place(dest, &rel, &raw)?;
                let executable = entry.header().mode().is_ok_and(|m| m & 0o111 != 0);
                let mode = if executable { 0o755 } else { 0o644 };
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(&dst)
                    .map_err(|e| RunnerError::io(format!("cannot create {}", dst.display()), e))?;
                let written = io::copy(&mut (&mut entry).take(size), &mut file)
                    .map_err(|e| RunnerError::io(format!("cannot write {}", dst.display()), e))?;
                stats.bytes += written;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(bad_archive)?
                    .ok_or_else(|| unsafe_entry(&raw, "symlink without a target"))?
                    .into_owned();
                check_link_target(&rel, &target, &raw)?;
                let dst = place(dest, &rel, &raw)?;
                std::os::unix::fs::symlink(&target, &dst).map_err(|e| {
                    RunnerError::io(format!("cannot create link {}", dst.display()), e)
                })?;
                links.push(rel);
            }
            EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(bad_archive)?
                    .ok_or_else(|| unsafe_entry(&raw, "hard link without a target"))?
                    .into_owned();
                let src_rel = clean_relative(&target)?
                    .ok_or_else(|| unsafe_entry(&raw, "hard link to the archive root"))?;
                let src = dest.join(&src_rel);
                let parent_ok = src_rel.parent().is_none_or(|p| {
                    let mut cur = dest.to_path_buf();
                    p.components().all(|c| {
                        cur.push(c);
                        fs::symlink_metadata(&cur).is_ok_and(|m| m.is_dir())
                    })
                });
                let src_meta = fs::symlink_metadata(&src).ok().filter(|m| m.is_file());
                let Some(src_meta) = src_meta.filter(|_| parent_ok) else {
                    return Err(unsafe_entry(
                        &raw,
                        "hard link to something that is not a file extracted earlier",
                    ));
                };
                if src_meta.len() > limits.max_bytes.saturating_sub(stats.bytes) {
                    return Err(RunnerError::ArchiveTooLarge {
                        limit: limits.max_bytes,
                        what: "bytes",
                    });
                }
                let dst = place(dest, &rel, &raw)?;
                // A copy, not a link: the two names must not share an inode the session could write through.
                stats.bytes += fs::copy(&src, &dst)
                    .map_err(|e| RunnerError::io(format!("cannot copy to {}", dst.display()), e))?;
            }
            EntryType::Char | EntryType::Block => {
                return Err(unsafe_entry(&raw, "device file"));
            }
            EntryType::Fifo => return Err(unsafe_entry(&raw, "FIFO")),
            other => {
                return Err(unsafe_entry(
                    &raw,
                    format!("unsupported entry type {other:?}"),
                ));
            }
        }
    }
    for rel in &links {
        check_link_resolves_inside(dest, rel)?;
    }
    // Read to the end so that gzip checks its trailer: a truncated or corrupted stream fails here.
    io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(bad_archive)?;
    Ok(stats)
}

/// Writes `dir`'s tree as a gzip'd tar into `writer`, names relative to `dir`, and returns the writer.
pub fn pack_dir<W: Write>(dir: &Path, writer: W) -> Result<W> {
    let mut builder = tar::Builder::new(GzEncoder::new(writer, Compression::fast()));
    builder.follow_symlinks(false);
    pack_tree(&mut builder, dir, Path::new(""))?;
    let gz = builder
        .into_inner()
        .map_err(|e| RunnerError::io("cannot finish archive", e))?;
    gz.finish()
        .map_err(|e| RunnerError::io("cannot finish archive", e))
}

fn pack_tree<W: Write>(builder: &mut tar::Builder<W>, root: &Path, rel: &Path) -> Result<()> {
    let dir = root.join(rel);
    let mut entries: Vec<_> = fs::read_dir(&dir)
        .map_err(|e| RunnerError::io(format!("cannot list {}", dir.display()), e))?
        .collect::<io::Result<_>>()
        .map_err(|e| RunnerError::io(format!("cannot list {}", dir.display()), e))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = rel.join(e.file_name());
        let path = e.path();
        let meta = fs::symlink_metadata(&path)
            .map_err(|err| RunnerError::io(format!("cannot inspect {}", path.display()), err))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            builder
                .append_dir(&name, &path)
                .map_err(|err| RunnerError::io(format!("cannot pack {}", path.display()), err))?;
            pack_tree(builder, root, &name)?;
        } else if ft.is_file() || ft.is_symlink() {
            builder
                .append_path_with_name(&path, &name)
                .map_err(|err| RunnerError::io(format!("cannot pack {}", path.display()), err))?;
        } else {
            tracing::debug!(path = %path.display(), "not packing a socket, FIFO or device");
        }
    }
    Ok(())
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

/// Extracts a gzip'd tar arriving as a stream of byte chunks (a gRPC download) into `dest`, which is
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
        extract_tar_gz(reader, &target, limits)
    });
    // Errors of the download itself are kept here: the reader sees them only as a broken stream.
    let feed = async move {
        futures::pin_mut!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(chunk) => {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_relative_paths() {
        assert_eq!(
            clean_relative(Path::new("./a/./b")).unwrap(),
            Some(PathBuf::from("a/b"))
        );
        assert_eq!(clean_relative(Path::new("./")).unwrap(), None);
        assert!(clean_relative(Path::new("/etc/passwd")).is_err());
        assert!(clean_relative(Path::new("a/../../b")).is_err());
    }

    #[test]
    fn link_targets_are_checked_by_name() {
        let ok =
            |rel: &str, t: &str| check_link_target(Path::new(rel), Path::new(t), Path::new(rel));
        assert!(ok("a/link", "../b").is_ok());
        assert!(ok("a/link", "../../b").is_err());
        assert!(ok("link", "/etc").is_err());
        assert!(ok("link", "").is_err());
        assert!(ok("link", "./x/../y").is_ok());
    }
}
