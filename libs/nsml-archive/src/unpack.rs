//! Checking and unpacking the tars, plain or gzip'd ([`Decoded`]), that participants and hosts send.
//!
//! [`measure`] reads an archive as a stream and keeps nothing but names: it checks every rule of
//! [`Checker`] and counts what the archive expands to, stopping at the first entry past the limits, so a
//! gzip bomb is refused after reading only as much of it as the limits allow.
//!
//! [`unpack`] writes an archive into a directory, holding it to the same rules before anything is written,
//! and trusting nothing on the disk either: every directory on the way to an entry must be a real
//! directory, files are created with `O_EXCL` and the mode `0o755` or `0o644` (no set-uid bits), hard
//! links become copies of a file unpacked earlier, and once the whole archive is out every symlink is
//! followed through the others (a later entry cannot re-aim an earlier link). Any refusal fails the whole
//! archive: the caller removes the half-written directory.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

use crate::error::{ArchiveError, Refusal};
use crate::format::Decoded;
use crate::rules::{Checker, Kind, Limits, TreeSize, entry_path, read_trailer};

/// Checks a tar (plain or gzip'd) read from `reader` without unpacking it, and returns what it expands
/// to. The whole input is read: whatever follows the archive's end is refused.
pub fn measure(reader: impl Read, limits: Limits) -> Result<TreeSize, ArchiveError> {
    let mut archive = tar::Archive::new(Decoded::new(reader)?);
    let mut checker = Checker::new(limits);
    for entry in archive.entries().map_err(ArchiveError::Unreadable)? {
        let entry = entry.map_err(ArchiveError::Unreadable)?;
        checker.entry(&entry)?;
    }
    let size = checker.finish()?;
    read_trailer(archive.into_inner())?;
    Ok(size)
}

/// What unpacking does with links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Links {
    /// Symlinks that stay inside the tree are made; hard links become copies.
    Keep,
    /// Links are left out (listed in [`Unpacked::skipped`]); their names are still checked.
    Skip,
}

/// What an unpacking wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unpacked {
    /// Entries (files, directories, links), the root directory included.
    pub entries: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    /// Regular files written (hard links' copies included).
    pub files: u64,
    /// Links left out under [`Links::Skip`], as named in the archive.
    pub skipped: Vec<String>,
}

/// Unpacks the tar (plain or gzip'd) read from `reader` into `dest`, an existing directory that nothing else writes
/// to meanwhile. See the module documentation for what is refused.
pub fn unpack(
    reader: impl Read,
    dest: &Path,
    limits: Limits,
    links: Links,
) -> Result<Unpacked, ArchiveError> {
    let mut archive = tar::Archive::new(Decoded::new(reader)?);
    let mut checker = Checker::new(limits);
    let mut out = Unpacked::default();
    let mut symlinks = Vec::new();
    for entry in archive.entries().map_err(ArchiveError::Unreadable)? {
        let mut entry = entry.map_err(ArchiveError::Unreadable)?;
        let ty = entry.header().entry_type();
        if links == Links::Skip && matches!(ty, EntryType::Symlink | EntryType::Link) {
            entry_path(&entry)?;
            let raw = entry.path().map_err(ArchiveError::Unreadable)?;
            out.skipped.push(raw.display().to_string());
            continue;
        }
        let Some(checked) = checker.entry(&entry)? else {
            continue;
        };
        let rel = Path::new(&checked.path);
        match checked.kind {
            Kind::Dir => real_dirs(dest, rel, &checked.path)?,
            Kind::File(size) => {
                let executable = entry.header().mode().is_ok_and(|m| m & 0o111 != 0);
                out.bytes += write_file(dest, rel, &checked.path, &mut entry, size, executable)?;
                out.files += 1;
            }
            Kind::Symlink(target) => {
                let dst = place(dest, rel, &checked.path)?;
                std::os::unix::fs::symlink(&target, &dst)
                    .map_err(|e| ArchiveError::io("cannot create link", &dst, e))?;
                symlinks.push(checked.path);
            }
            Kind::HardLink(target, _) => {
                out.bytes += copy_earlier(dest, rel, &checked.path, &target)?;
                out.files += 1;
            }
        }
    }
    for link in &symlinks {
        resolves_inside(dest, link)?;
    }
    out.entries = checker.finish()?.entries;
    read_trailer(archive.into_inner())?;
    Ok(out)
}

/// The most file content read and written at once: large enough that a checkpoint of weights is written
/// in few calls.
const WRITE_BUF: usize = 1 << 20;

/// Writes a regular file of `size` bytes at `root/rel` from `from`; returns the bytes written.
fn write_file(
    root: &Path,
    rel: &Path,
    entry: &str,
    from: &mut impl Read,
    size: u64,
    executable: bool,
) -> Result<u64, ArchiveError> {
    let dst = place(root, rel, entry)?;
    let mode = if executable { 0o755 } else { 0o644 };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&dst)
        .map_err(|e| ArchiveError::io("cannot create", &dst, e))?;
    let mut body = from.take(size);
    // A read that fails is the archive's fault, a write the disk's.
    let mut buf = vec![0u8; size.clamp(1, WRITE_BUF as u64) as usize];
    let mut written = 0u64;
    loop {
        let n = body.read(&mut buf).map_err(ArchiveError::Unreadable)?;
        if n == 0 {
            break;
        }
        io::Write::write_all(&mut file, &buf[..n])
            .map_err(|e| ArchiveError::io("cannot write", &dst, e))?;
        written += n as u64;
    }
    Ok(written)
}

/// Copies the file unpacked earlier at `root/target` to `root/rel`, refusing a source that is not a regular
/// file reached through real directories.
fn copy_earlier(root: &Path, rel: &Path, entry: &str, target: &str) -> Result<u64, ArchiveError> {
    let src_rel = Path::new(target);
    let parent_ok = src_rel.parent().is_none_or(|p| {
        let mut cur = root.to_path_buf();
        p.components().all(|c| {
            cur.push(c);
            fs::symlink_metadata(&cur).is_ok_and(|m| m.is_dir())
        })
    });
    let src = root.join(src_rel);
    let is_file = fs::symlink_metadata(&src).is_ok_and(|m| m.is_file());
    if !(parent_ok && is_file) {
        return Err(Refusal::HardLinkNotAFile {
            entry: entry.to_string(),
            target: target.to_string(),
        }
        .into());
    }
    let dst = place(root, rel, entry)?;
    // A copy, not a link: the two names must not share an inode that one could write through.
    fs::copy(&src, &dst).map_err(|e| ArchiveError::io("cannot copy to", &dst, e))
}

/// Makes every directory of `rel` under `root`, refusing to pass through anything but a real directory.
fn real_dirs(root: &Path, rel: &Path, entry: &str) -> Result<(), ArchiveError> {
    let mut cur = root.to_path_buf();
    let mut walked = PathBuf::new();
    for c in rel.components() {
        cur.push(c);
        walked.push(c);
        let here = || walked.display().to_string();
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(Refusal::BeneathSymlink {
                    entry: entry.to_string(),
                    link: here(),
                }
                .into());
            }
            Ok(_) => {
                return Err(Refusal::BeneathFile {
                    entry: entry.to_string(),
                    file: here(),
                }
                .into());
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&cur).map_err(|e| ArchiveError::io("cannot create", &cur, e))?
            }
            Err(e) => return Err(ArchiveError::io("cannot inspect", &cur, e)),
        }
    }
    Ok(())
}

/// Prepares `root/rel` for a new non-directory entry: its parents real directories, nothing at the path
/// itself (an earlier file or link of the same name is replaced; a directory is not).
fn place(root: &Path, rel: &Path, entry: &str) -> Result<PathBuf, ArchiveError> {
    if let Some(parent) = rel.parent() {
        real_dirs(root, parent, entry)?;
    }
    let dst = root.join(rel);
    match fs::symlink_metadata(&dst) {
        Ok(m) if m.is_dir() => Err(Refusal::ReplacesDirectory {
            entry: entry.to_string(),
        }
        .into()),
        Ok(_) => fs::remove_file(&dst)
            .map_err(|e| ArchiveError::io("cannot replace", &dst, e))
            .map(|()| dst),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(dst),
        Err(e) => Err(ArchiveError::io("cannot inspect", &dst, e)),
    }
}

/// Resolves the symlink at `root/rel` step by step, following links found on the way, and fails when the
/// resolution ever leaves `root` (e.g. `a -> .` then `b -> a/../x`, which names alone miss).
fn resolves_inside(root: &Path, rel: &str) -> Result<(), ArchiveError> {
    enum Step {
        Up,
        Name(OsString),
    }
    let outside = || Refusal::ResolvesOutside {
        entry: rel.to_string(),
    };
    let steps = |p: &Path| -> Result<Vec<Step>, Refusal> {
        let mut out = Vec::new();
        for c in p.components() {
            match c {
                Component::Normal(n) => out.push(Step::Name(n.to_os_string())),
                Component::ParentDir => out.push(Step::Up),
                Component::CurDir => {}
                Component::RootDir | Component::Prefix(_) => return Err(outside()),
            }
        }
        Ok(out)
    };
    let read_link =
        |p: &Path| fs::read_link(p).map_err(|e| ArchiveError::io("cannot read link", p, e));
    let rel = Path::new(rel);
    if !fs::symlink_metadata(root.join(rel)).is_ok_and(|m| m.file_type().is_symlink()) {
        // A later entry of the same name replaced the link.
        return Ok(());
    }
    let mut at: Vec<OsString> = rel
        .parent()
        .map(|p| p.iter().map(|c| c.to_os_string()).collect())
        .unwrap_or_default();
    let mut todo: VecDeque<Step> = steps(&read_link(&root.join(rel))?)?.into();
    let mut hops = 0;
    while let Some(step) = todo.pop_front() {
        match step {
            Step::Up => {
                if at.pop().is_none() {
                    return Err(outside().into());
                }
            }
            Step::Name(n) => {
                at.push(n);
                let here: PathBuf = std::iter::once(root.as_os_str().to_os_string())
                    .chain(at.iter().cloned())
                    .collect();
                if fs::symlink_metadata(&here).is_ok_and(|m| m.file_type().is_symlink()) {
                    hops += 1;
                    if hops > 40 {
                        return Err(Refusal::SymlinkLoop {
                            entry: rel.display().to_string(),
                        }
                        .into());
                    }
                    at.pop();
                    for s in steps(&read_link(&here)?)?.into_iter().rev() {
                        todo.push_front(s);
                    }
                }
            }
        }
    }
    Ok(())
}

/// The text of the first regular file in the tar (plain or gzip'd) read from `reader`, refused past
/// `max_bytes`.
pub fn first_file(reader: impl Read, max_bytes: u64) -> Result<String, ArchiveError> {
    let mut archive = tar::Archive::new(Decoded::new(reader)?);
    for entry in archive.entries().map_err(ArchiveError::Unreadable)? {
        let mut entry = entry.map_err(ArchiveError::Unreadable)?;
        if entry.header().entry_type().is_file() {
            let path = entry_path(&entry)?;
            if entry.size() > max_bytes {
                return Err(ArchiveError::FileTooLarge {
                    entry: path,
                    limit: max_bytes,
                });
            }
            let mut text = String::new();
            entry
                .read_to_string(&mut text)
                .map_err(ArchiveError::Unreadable)?;
            return Ok(text);
        }
    }
    Err(ArchiveError::NoFile)
}
