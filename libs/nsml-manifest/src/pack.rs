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

use nsml_archive::{ArchiveError, Reproducible};

use crate::{Manifest, ManifestError};

impl Manifest {
    /// Packs the dataset `name` into a gzip'd tar in the canonical layout.
    pub fn pack_dataset(&self, name: &str) -> Result<Vec<u8>, ManifestError> {
        let dataset = self.dataset(name)?;
        self.check_files()?;
        let failed = |e: ArchiveError| match e {
            ArchiveError::Io { path, source, .. } => ManifestError::Pack {
                dataset: dataset.name.clone(),
                path,
                source,
            },
            other => ManifestError::Pack {
                dataset: dataset.name.clone(),
                path: dataset.root.clone(),
                source: std::io::Error::other(other.to_string()),
            },
        };
        let mut packer = Reproducible::new(Vec::new());
        packer.add_path(&dataset.train, "train").map_err(failed)?;
        packer
            .add_path(&dataset.test_data, "test/test_data")
            .map_err(failed)?;
        packer
            .add_path(&dataset.test_label, "test/test_label")
            .map_err(failed)?;
        if dataset.has_trial() {
            packer
                .add_path(&dataset.trial_data, "test_submit/test_data")
                .map_err(failed)?;
            packer
                .add_path(&dataset.trial_label, "test_submit/test_label")
                .map_err(failed)?;
        }
        if let (Some(script), Some(file_name)) = (&dataset.eval_script, dataset.eval_script_name())
        {
            packer
                .add_path(script, &format!("eval/{file_name}"))
                .map_err(failed)?;
        }
        if dataset.private_keys_file.is_some() {
            let mut text = dataset.private_keys.join("\n");
            text.push('\n');
            packer
                .add_bytes(text.as_bytes(), "private_keys.txt")
                .map_err(failed)?;
        }
        packer.finish().map_err(failed)
    }
}
