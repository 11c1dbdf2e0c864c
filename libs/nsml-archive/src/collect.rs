//! Uploads of a directory: collecting what `.nsmlignore` leaves in, and packing it.

use std::fs;
use std::io::Write;
use std::path::Path;

use flate2::Compression;
use flate2::write::GzEncoder;

use crate::error::ArchiveError;
use crate::format::Encoding;
use crate::ignore::IgnoreRules;

/// What an upload holds: directories and regular files, relative to the uploaded directory, sorted.
#[derive(Debug, Default)]
pub struct Collected {
    pub entries: Vec<CollectedEntry>,
    /// Relative paths left out, with what they are: `symlink` or `special file`.
    pub skipped: Vec<(String, &'static str)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectedEntry {
    /// `/`-separated path relative to the uploaded directory.
    pub path: String,
    pub is_dir: bool,
}

impl Collected {
    /// Returns whether `file` (relative, `./` allowed) is among the regular files.
    pub fn contains_file(&self, file: &str) -> bool {
        let wanted = normalize_typed(file);
        self.entries.iter().any(|e| !e.is_dir && e.path == wanted)
    }
}

/// Normalizes a relative path as a user typed it: `./src//main.py` → `src/main.py`.
fn normalize_typed(path: &str) -> String {
    path.split(['/', '\\'])
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// Walks `root`, leaving out what `rules` ignore, symlinks and special files.
pub fn collect(root: &Path, rules: &IgnoreRules) -> Result<Collected, ArchiveError> {
    let mut collected = Collected::default();
    walk(root, "", rules, &mut collected)?;
    Ok(collected)
}

fn walk(
    dir: &Path,
    prefix: &str,
    rules: &IgnoreRules,
    out: &mut Collected,
) -> Result<(), ArchiveError> {
    let mut children = fs::read_dir(dir)
        .and_then(|d| d.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ArchiveError::io("cannot read", dir, e))?;
    children.sort_by_key(|c| c.file_name());
    for child in children {
        let name = child.file_name().to_string_lossy().into_owned();
        let path = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let kind = child
            .file_type()
            .map_err(|e| ArchiveError::io("cannot read", child.path(), e))?;
        if kind.is_dir() {
            if rules.is_ignored(&path, true) {
                continue;
            }
            out.entries.push(CollectedEntry {
                path: path.clone(),
                is_dir: true,
            });
            walk(&child.path(), &path, rules, out)?;
        } else if rules.is_ignored(&path, false) {
            continue;
        } else if kind.is_file() {
            out.entries.push(CollectedEntry {
                path,
                is_dir: false,
            });
        } else if kind.is_symlink() {
            out.skipped.push((path, "symlink"));
        } else {
            out.skipped.push((path, "special file"));
        }
    }
    Ok(())
}

/// Packs the collected entries of `root` into a gzip'd tar, keeping modes and modification times.
pub fn pack_collected(root: &Path, collected: &Collected) -> Result<Vec<u8>, ArchiveError> {
    write_collected(root, collected, Vec::new(), Encoding::Gzip)
}

/// Packs as [`pack_collected`] does, and writes the plain tar it compresses into `plain` too (a hasher, say):
/// both come of the same reading of the files, so they agree even when a file changes meanwhile.
pub fn pack_collected_teed<T: Write>(
    root: &Path,
    collected: &Collected,
    plain: T,
) -> Result<(Vec<u8>, T), ArchiveError> {
    let tee = Tee {
        plain,
        gzip: GzEncoder::new(Vec::new(), Compression::default()),
    };
    let tee = write_collected(root, collected, tee, Encoding::Plain)?;
    let archive = tee
        .gzip
        .finish()
        .map_err(|e| ArchiveError::io("cannot pack", root, e))?;
    Ok((archive, tee.plain))
}

/// The same bytes to a writer as they are and to a gzip encoder.
struct Tee<T: Write> {
    plain: T,
    gzip: GzEncoder<Vec<u8>>,
}

impl<T: Write> Write for Tee<T> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.gzip.write(buf)?;
        self.plain.write_all(&buf[..n])?;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.gzip.flush()?;
        self.plain.flush()
    }
}

/// Writes the collected entries of `root` as a tar encoded as `encoding` into `writer`, and returns the
/// writer. The tar's bytes are the same whatever the writer, so a plain tar written into a hasher names the
/// tar that [`pack_collected`] compresses, without compressing anything.
pub fn write_collected<W: Write>(
    root: &Path,
    collected: &Collected,
    writer: W,
    encoding: Encoding,
) -> Result<W, ArchiveError> {
    let fail = |e| ArchiveError::io("cannot pack", root, e);
    match encoding {
        Encoding::Plain => {
            let mut builder = tar::Builder::new(writer);
            append_collected(&mut builder, root, collected)?;
            builder.into_inner().map_err(fail)
        }
        Encoding::Gzip => {
            let mut builder = tar::Builder::new(GzEncoder::new(writer, Compression::default()));
            append_collected(&mut builder, root, collected)?;
            builder
                .into_inner()
                .and_then(GzEncoder::finish)
                .map_err(fail)
        }
    }
}

fn append_collected<W: Write>(
    builder: &mut tar::Builder<W>,
    root: &Path,
    collected: &Collected,
) -> Result<(), ArchiveError> {
    builder.follow_symlinks(false);
    for entry in &collected.entries {
        let source = root.join(&entry.path);
        if entry.is_dir {
            builder.append_dir(&entry.path, &source)
        } else {
            builder.append_path_with_name(&source, &entry.path)
        }
        .map_err(|e| ArchiveError::io("cannot pack", &source, e))?;
    }
    Ok(())
}
