//! Packing directories into tars: a tree as it is on disk ([`pack_dir`]), and reproducible gzip'd archives
//! whose bytes depend on the files' contents only ([`Reproducible`]).

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;
use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags};

use crate::error::ArchiveError;
use crate::format::Encoding;

/// Writes `dir`'s tree as a tar encoded as `encoding` into `writer`, names relative to `dir`, and returns
/// the writer.
///
/// Symlinks are stored as links, never followed (a link to a file outside is not packed as that file's
/// content); sockets, FIFOs and devices are left out. The tree is walked by descriptor, every name opened
/// relative to its directory without following a link, and each file is described by what was opened: a
/// program that still holds the tree (a session whose saved directory is handed over, not copied) can
/// change its own files meanwhile, but never swap in a link that leads the packer elsewhere, nor a FIFO
/// that would hold it. A file that shrinks while it is read fails the packing.
pub fn pack_dir<W: Write>(dir: &Path, writer: W, encoding: Encoding) -> Result<W, ArchiveError> {
    let fail = |e| ArchiveError::io("cannot finish the archive of", dir, e);
    match encoding {
        Encoding::Plain => {
            let mut builder = tar::Builder::new(writer);
            pack_root(&mut builder, dir)?;
            builder.into_inner().map_err(fail)
        }
        Encoding::Gzip => {
            let mut builder = tar::Builder::new(GzEncoder::new(writer, Compression::fast()));
            pack_root(&mut builder, dir)?;
            builder
                .into_inner()
                .and_then(GzEncoder::finish)
                .map_err(fail)
        }
    }
}

fn pack_root<W: Write>(builder: &mut tar::Builder<W>, dir: &Path) -> Result<(), ArchiveError> {
    let root = rustix::fs::openat(CWD, dir, DIR_FLAGS, Mode::empty())
        .map_err(|e| ArchiveError::io("cannot open", dir, e.into()))?;
    pack_tree(builder, &fs::File::from(root), dir, Path::new(""))
}

/// How a directory of the tree is opened: never through a link.
const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// How a file of the tree is opened: never through a link, and without waiting on a FIFO.
const FILE_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::NONBLOCK)
    .union(OFlags::NOCTTY)
    .union(OFlags::CLOEXEC);

/// Packs the entries of the directory open as `dir` (`root/rel`), sorted by name, and everything below.
fn pack_tree<W: Write>(
    builder: &mut tar::Builder<W>,
    dir: &fs::File,
    root: &Path,
    rel: &Path,
) -> Result<(), ArchiveError> {
    let here = root.join(rel);
    let mut names = Vec::new();
    let listing = rustix::fs::Dir::read_from(dir)
        .map_err(|e| ArchiveError::io("cannot list", &here, e.into()))?;
    for entry in listing {
        let entry = entry.map_err(|e| ArchiveError::io("cannot list", &here, e.into()))?;
        let name = entry.file_name();
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            names.push(name.to_owned());
        }
    }
    names.sort();
    for name in names {
        let name_rel = rel.join(OsStr::from_bytes(name.to_bytes()));
        let path = root.join(&name_rel);
        let failed = |action: &'static str| {
            let path = path.clone();
            move |e: rustix::io::Errno| ArchiveError::io(action, &path, e.into())
        };
        let stat = rustix::fs::statat(dir, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(failed("cannot inspect"))?;
        match FileType::from_raw_mode(stat.st_mode) {
            FileType::Directory => {
                let sub = rustix::fs::openat(dir, name.as_c_str(), DIR_FLAGS, Mode::empty())
                    .map_err(failed("cannot open"))?;
                let sub = fs::File::from(sub);
                let meta = sub
                    .metadata()
                    .map_err(|e| ArchiveError::io("cannot inspect", &path, e))?;
                let mut header = tar::Header::new_gnu();
                header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
                builder
                    .append_data(&mut header, &name_rel, io::empty())
                    .map_err(|e| ArchiveError::io("cannot pack", &path, e))?;
                pack_tree(builder, &sub, root, &name_rel)?;
            }
            FileType::RegularFile => {
                let file = rustix::fs::openat(dir, name.as_c_str(), FILE_FLAGS, Mode::empty())
                    .map_err(failed("cannot open"))?;
                let file = fs::File::from(file);
                let meta = file
                    .metadata()
                    .map_err(|e| ArchiveError::io("cannot inspect", &path, e))?;
                if !meta.is_file() {
                    // Swapped for something else since it was listed: left out, as such things are.
                    continue;
                }
                let mut header = tar::Header::new_gnu();
                header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
                let body = Exact {
                    file,
                    left: meta.len(),
                    path: &path,
                };
                append_file(builder, &mut header, &name_rel, body)
                    .map_err(|e| ArchiveError::io("cannot pack", &path, e))?;
            }
            FileType::Symlink => {
                let target = rustix::fs::readlinkat(dir, name.as_c_str(), Vec::new())
                    .map_err(failed("cannot read link"))?;
                let target = PathBuf::from(OsStr::from_bytes(target.to_bytes()));
                let mut header = tar::Header::new_gnu();
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                header.set_mode(stat.st_mode & 0o7777);
                header.set_uid(u64::from(stat.st_uid));
                header.set_gid(u64::from(stat.st_gid));
                header.set_mtime(u64::try_from(stat.st_mtime).unwrap_or(0));
                builder
                    .append_link(&mut header, &name_rel, &target)
                    .map_err(|e| ArchiveError::io("cannot pack", &path, e))?;
            }
            // Sockets, FIFOs and devices are not part of a tree that is saved.
            _ => {}
        }
    }
    Ok(())
}

/// The most file content read at once: a checkpoint of weights is read in few calls (`tar` copies an entry's
/// data 8 KiB at a time).
const READ_BUF: usize = 1 << 20;

/// Appends a regular file: its header (and the long-name entries its path needs) through `tar`, then its
/// content in reads of up to [`READ_BUF`], then the zeros that fill its last 512-byte block.
fn append_file<W: Write>(
    builder: &mut tar::Builder<W>,
    header: &mut tar::Header,
    name: &Path,
    mut body: Exact<'_>,
) -> io::Result<()> {
    let size = body.left;
    // The header says `size`; `tar` writes it with no data and no padding, which follow here.
    builder.append_data(header, name, io::empty())?;
    let out = builder.get_mut();
    let mut buf = vec![0u8; usize::try_from(size).unwrap_or(READ_BUF).clamp(1, READ_BUF)];
    loop {
        let n = body.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
    }
    let tail = (size % 512) as usize;
    if tail > 0 {
        out.write_all(&[0u8; 512][tail..])?;
    }
    Ok(())
}

/// A file's content, exactly as long as the header that precedes it says.
struct Exact<'a> {
    file: fs::File,
    left: u64,
    path: &'a Path,
}

impl Read for Exact<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            // What was appended since it was opened is not packed: the header is written.
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.file.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} shrank while it was packed", self.path.display()),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// A gzip'd tar whose bytes depend only on what is added: owners and timestamps are zeroed and only the
/// executable bit of a mode is kept, so packing the same files twice gives the same bytes. Directories
/// are added sorted by name.
pub struct Reproducible<W: Write> {
    builder: tar::Builder<GzEncoder<W>>,
}

impl<W: Write> Reproducible<W> {
    pub fn new(writer: W) -> Self {
        Self {
            builder: tar::Builder::new(GzEncoder::new(writer, Compression::default())),
        }
    }

    /// Adds a file, or a directory and everything below it, under `name`. Symlinks are followed: what
    /// is packed is the content they lead to.
    pub fn add_path(&mut self, source: &Path, name: &str) -> Result<(), ArchiveError> {
        let meta = fs::metadata(source).map_err(|e| ArchiveError::io("cannot pack", source, e))?;
        if meta.is_dir() {
            self.dir_entry(name, source)?;
            self.dir_contents(source, name)
        } else {
            let mut header = header(tar::EntryType::Regular, mode_of(&meta));
            header.set_size(meta.len());
            let file =
                fs::File::open(source).map_err(|e| ArchiveError::io("cannot pack", source, e))?;
            self.builder
                .append_data(&mut header, name, file)
                .map_err(|e| ArchiveError::io("cannot pack", source, e))
        }
    }

    /// Adds the contents of `dir` below `name`, sorted by name.
    fn dir_contents(&mut self, dir: &Path, name: &str) -> Result<(), ArchiveError> {
        let mut entries = fs::read_dir(dir)
            .and_then(|d| {
                d.map(|e| e.map(|e| e.path()))
                    .collect::<io::Result<Vec<_>>>()
            })
            .map_err(|e| ArchiveError::io("cannot list", dir, e))?;
        entries.sort();
        for entry in entries {
            let Some(file_name) = entry.file_name() else {
                continue;
            };
            let child = format!("{name}/{}", file_name.to_string_lossy());
            self.add_path(&entry, &child)?;
        }
        Ok(())
    }

    fn dir_entry(&mut self, name: &str, source: &Path) -> Result<(), ArchiveError> {
        let mut header = header(tar::EntryType::Directory, 0o755);
        header.set_size(0);
        self.builder
            .append_data(&mut header, format!("{name}/"), io::empty())
            .map_err(|e| ArchiveError::io("cannot pack", source, e))
    }

    /// Adds a file holding `data` under `name`.
    pub fn add_bytes(&mut self, data: &[u8], name: &str) -> Result<(), ArchiveError> {
        let mut header = header(tar::EntryType::Regular, 0o644);
        header.set_size(data.len() as u64);
        self.builder
            .append_data(&mut header, name, data)
            .map_err(|e| ArchiveError::io("cannot pack", name, e))
    }

    /// Ends the archive and returns the writer.
    pub fn finish(self) -> Result<W, ArchiveError> {
        let fail = |e| ArchiveError::io("cannot finish", "the archive", e);
        let mut encoder = self.builder.into_inner().map_err(fail)?;
        encoder.flush().map_err(fail)?;
        encoder.finish().map_err(fail)
    }
}

fn header(kind: tar::EntryType, mode: u32) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header
}

fn mode_of(meta: &fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    if meta.permissions().mode() & 0o111 != 0 {
        0o755
    } else {
        0o644
    }
}
