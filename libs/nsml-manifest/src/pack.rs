//! Packs a dataset into the canonical archive the storage service keeps: a gzip'd tar whose layout does not
//! depend on where the host keeps the parts on disk.
//!
//! ```text
//! train/...                  the training directory's contents (train_data, train_label, ...)
//! test/test_data             file or directory
//! test/test_label
//! test_submit/test_data      only when the dataset has a trial set
//! test_submit/test_label
//! eval/<script>              only with an eval_script
//! private_keys.txt           only with a private_keys_file
//! ```
//!
//! Archives are reproducible: entries are sorted, owners and timestamps zeroed, and only the executable bit of
//! the mode is kept, so packing the same files twice gives the same bytes.

use std::fs;
use std::io::Write;
use std::path::Path;

use flate2::Compression;
use flate2::write::GzEncoder;

use crate::manifest::DatasetSpec;
use crate::{Manifest, ManifestError};

impl Manifest {
    /// Packs the dataset `name` into a gzip'd tar in the canonical layout.
    pub fn pack_dataset(&self, name: &str) -> Result<Vec<u8>, ManifestError> {
        let dataset = self.dataset(name)?;
        self.check_files()?;
        let mut packer = Packer {
            dataset,
            builder: tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default())),
        };
        packer.path(&dataset.train, "train")?;
        packer.path(&dataset.test_data, "test/test_data")?;
        packer.path(&dataset.test_label, "test/test_label")?;
        if dataset.has_trial() {
            packer.path(&dataset.trial_data, "test_submit/test_data")?;
            packer.path(&dataset.trial_label, "test_submit/test_label")?;
        }
        if let (Some(script), Some(file_name)) = (&dataset.eval_script, dataset.eval_script_name())
        {
            packer.path(script, &format!("eval/{file_name}"))?;
        }
        if dataset.private_keys_file.is_some() {
            let mut text = dataset.private_keys.join("\n");
            text.push('\n');
            packer.bytes(text.as_bytes(), "private_keys.txt")?;
        }
        packer.finish()
    }
}

struct Packer<'a> {
    dataset: &'a DatasetSpec,
    builder: tar::Builder<GzEncoder<Vec<u8>>>,
}

impl Packer<'_> {
    fn io_error(&self, path: &Path, source: std::io::Error) -> ManifestError {
        ManifestError::Pack {
            dataset: self.dataset.name.clone(),
            path: path.to_path_buf(),
            source,
        }
    }

    /// Adds a file, or a directory and everything below it, under `name`.
    fn path(&mut self, source: &Path, name: &str) -> Result<(), ManifestError> {
        // Follows symlinks: a host may link large data into the dataset directory.
        let meta = fs::metadata(source).map_err(|e| self.io_error(source, e))?;
        if meta.is_dir() {
            self.dir_entry(name)?;
            self.dir_contents(source, name)
        } else {
            let mut header = header(tar::EntryType::Regular, mode_of(&meta, 0o644));
            header.set_size(meta.len());
            let file = fs::File::open(source).map_err(|e| self.io_error(source, e))?;
            self.builder
                .append_data(&mut header, name, file)
                .map_err(|e| self.io_error(source, e))
        }
    }

    /// Adds the contents of `dir` below `name`, sorted by name.
    fn dir_contents(&mut self, dir: &Path, name: &str) -> Result<(), ManifestError> {
        let mut entries = fs::read_dir(dir)
            .map_err(|e| self.io_error(dir, e))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.io_error(dir, e))?;
        entries.sort();
        for entry in entries {
            let Some(file_name) = entry.file_name() else {
                continue;
            };
            let child = format!("{name}/{}", file_name.to_string_lossy());
            self.path(&entry, &child)?;
        }
        Ok(())
    }

    fn dir_entry(&mut self, name: &str) -> Result<(), ManifestError> {
        let mut header = header(tar::EntryType::Directory, 0o755);
        header.set_size(0);
        self.builder
            .append_data(&mut header, format!("{name}/"), std::io::empty())
            .map_err(|e| self.io_error(Path::new(name), e))
    }

    fn bytes(&mut self, data: &[u8], name: &str) -> Result<(), ManifestError> {
        let mut header = header(tar::EntryType::Regular, 0o644);
        header.set_size(data.len() as u64);
        self.builder
            .append_data(&mut header, name, data)
            .map_err(|e| self.io_error(Path::new(name), e))
    }

    fn finish(self) -> Result<Vec<u8>, ManifestError> {
        let root = self.dataset.root.clone();
        let name = self.dataset.name.clone();
        let fail = |source| ManifestError::Pack {
            dataset: name.clone(),
            path: root.clone(),
            source,
        };
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

#[cfg(unix)]
fn mode_of(meta: &fs::Metadata, default: u32) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    if meta.permissions().mode() & 0o111 != 0 {
        0o755
    } else {
        default
    }
}

#[cfg(not(unix))]
fn mode_of(_meta: &fs::Metadata, default: u32) -> u32 {
    default
}
