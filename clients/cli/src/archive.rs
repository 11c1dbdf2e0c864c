//! Code uploads and checkpoint downloads as gzip'd tars: collecting a directory under `.nsmlignore`, packing it,
//! and extracting an archive without letting it write outside its target directory. The rules are
//! `nsml_archive`'s; this module words them for the command line.

use std::fs;
use std::io::Read;
use std::path::Path;

use anyhow::{Context as _, Result, anyhow};
use nsml_archive::{ArchiveError, Encoding, Limits, Links, Refusal};

use crate::ignore::IgnoreRules;

pub use nsml_archive::Collected;

/// Walks `root`, leaving out what `rules` ignore, symlinks and special files.
pub fn collect(root: &Path, rules: &IgnoreRules) -> Result<Collected> {
    Ok(nsml_archive::collect(root, rules.inner())?)
}

/// Packs the collected entries of `root` into a gzip'd tar, keeping modes and modification times, and returns
/// it with the [`digest`] of the plain tar it holds, taken of the same bytes.
pub fn pack(root: &Path, collected: &Collected) -> Result<(String, Vec<u8>)> {
    use sha2::{Digest as _, Sha256};
    let (archive, hasher) = nsml_archive::pack_collected_teed(root, collected, Sha256::new())
        .context("cannot pack the upload")?;
    Ok((hex::encode(hasher.finalize()), archive))
}

/// Returns the SHA-256 (hex) of the plain tar that [`pack`] compresses, computed without compressing it or
/// holding it in memory.
pub fn digest(root: &Path, collected: &Collected) -> Result<String> {
    use sha2::{Digest as _, Sha256};
    let hasher = nsml_archive::write_collected(root, collected, Sha256::new(), Encoding::Plain)
        .context("cannot pack the upload")?;
    Ok(hex::encode(hasher.finalize()))
}

/// What an extraction wrote.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Extracted {
    pub files: usize,
    /// Entries left out because they are links.
    pub skipped: Vec<String>,
}

/// Extracts a gzip'd tar into `dest` (created if needed). An entry that would land outside `dest` (an absolute
/// path, `..`, a path through a link), a device file or a pipe makes the whole extraction fail; links are
/// skipped.
pub fn extract(reader: impl Read, dest: &Path) -> Result<Extracted> {
    fs::create_dir_all(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    let done = nsml_archive::unpack(reader, dest, Limits::NONE, Links::Skip).map_err(worded)?;
    Ok(Extracted {
        files: usize::try_from(done.files).unwrap_or(usize::MAX),
        skipped: done.skipped,
    })
}

/// An archive error in the command line's words.
fn worded(err: ArchiveError) -> anyhow::Error {
    match err {
        ArchiveError::Refused(Refusal::BadPath { entry, .. }) => {
            anyhow!("refusing to extract `{entry}`: it leaves the target directory")
        }
        ArchiveError::Refused(refusal) => anyhow!("refusing to extract the archive: {refusal}"),
        ArchiveError::Unreadable(e) => anyhow::Error::new(e).context("cannot read the archive"),
        other => anyhow::Error::new(other).context("cannot extract the archive"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::GzEncoder;

    /// Builds a gzip'd tar holding one file at `path`, written raw so that unsafe paths get through.
    fn archive_with(path: &str) -> Vec<u8> {
        let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
        let mut header = tar::Header::new_old();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(2);
        header.set_mode(0o644);
        let bytes = path.as_bytes();
        header.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        header.set_cksum();
        builder.append(&header, &b"hi"[..]).unwrap();
        builder.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn extraction_refuses_paths_that_leave_the_target() {
        for bad in ["../escape.txt", "/etc/escape.txt", "ok/../../escape.txt"] {
            let dir = tempfile::tempdir().unwrap();
            let dest = dir.path().join("dest");
            let err = extract(&archive_with(bad)[..], &dest)
                .unwrap_err()
                .to_string();
            assert!(err.contains("leaves the target directory"), "{bad}: {err}");
            assert!(!dir.path().join("escape.txt").exists());
        }
        let dir = tempfile::tempdir().unwrap();
        let done = extract(&archive_with("./fine/ok.txt")[..], dir.path()).unwrap();
        assert_eq!(done.files, 1);
        assert_eq!(
            fs::read_to_string(dir.path().join("fine/ok.txt")).unwrap(),
            "hi"
        );
    }

    #[test]
    fn extraction_skips_links() {
        let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        builder
            .append_link(&mut header, "link", "/etc/passwd")
            .unwrap();
        let archive = builder.into_inner().unwrap().finish().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let done = extract(&archive[..], dir.path()).unwrap();
        assert_eq!(done.skipped, ["link"]);
        assert!(!dir.path().join("link").exists());
    }

    #[test]
    fn extraction_refuses_devices_and_names_the_rule() {
        let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Fifo);
        header.set_size(0);
        builder
            .append_data(&mut header, "pipe", std::io::empty())
            .unwrap();
        let archive = builder.into_inner().unwrap().finish().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let err = extract(&archive[..], dir.path()).unwrap_err().to_string();
        assert_eq!(
            err,
            "refusing to extract the archive: entry `pipe` is a device file or pipe"
        );
    }
}
