//! Packing directories into gzip'd tars: a tree as it is on disk ([`pack_dir`]), and reproducible archives
//! whose bytes depend on the files' contents only ([`Reproducible`]).

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use flate2::Compression;
use flate2::write::GzEncoder;

use crate::error::ArchiveError;

/// Writes `dir`'s tree as a gzip'd tar into `writer`, names relative to `dir`, and returns the writer.
///
/// Symlinks are stored as links, never followed (a link to a file outside is not packed as that file's
/// content); sockets, FIFOs and devices are left out.
pub fn pack_dir<W: Write>(dir: &Path, writer: W) -> Result<W, ArchiveError> {
    let mut builder = tar::Builder::new(GzEncoder::new(writer, Compression::fast()));
    builder.follow_symlinks(false);
    pack_tree(&mut builder, dir, Path::new(""))?;
    let gz = builder
        .into_inner()
        .map_err(|e| ArchiveError::io("cannot finish the archive of", dir, e))?;
    gz.finish()
        .map_err(|e| ArchiveError::io("cannot finish the archive of", dir, e))
}

fn pack_tree<W: Write>(
    builder: &mut tar::Builder<W>,
    root: &Path,
    rel: &Path,
) -> Result<(), ArchiveError> {
    let dir = root.join(rel);
    let mut entries: Vec<_> = fs::read_dir(&dir)
        .and_then(|d| d.collect::<io::Result<Vec<_>>>())
        .map_err(|e| ArchiveError::io("cannot list", &dir, e))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = rel.join(e.file_name());
        let path = e.path();
        let meta = fs::symlink_metadata(&path)
            .map_err(|err| ArchiveError::io("cannot inspect", &path, err))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            builder
                .append_dir(&name, &path)
                .map_err(|err| ArchiveError::io("cannot pack", &path, err))?;
            pack_tree(builder, root, &name)?;
        } else if ft.is_file() || ft.is_symlink() {
            builder
                .append_path_with_name(&path, &name)
                .map_err(|err| ArchiveError::io("cannot pack", &path, err))?;
        }
    }
    Ok(())
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
