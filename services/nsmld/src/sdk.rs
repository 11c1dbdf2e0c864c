//! The Python SDK (`import nsml`, `clients/python/nsml`) shipped inside the binary, so that an `nsmld` copied
//! anywhere runs sessions without the repository beside it.
//!
//! A runner writes the SDK out under its work directory, into a folder named after a hash of the files: a
//! binary of another version writes its own folder rather than reading a stale one, and removes the others.

use std::fs::Permissions;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use sha2::{Digest as _, Sha256};

/// The package's files, by their names in `clients/python/nsml`. A test checks that every `.py` file of the
/// package is here.
const FILES: &[(&str, &str)] = &[
    (
        "__init__.py",
        include_str!("../../../clients/python/nsml/__init__.py"),
    ),
    (
        "_api.py",
        include_str!("../../../clients/python/nsml/_api.py"),
    ),
    (
        "_jsonify.py",
        include_str!("../../../clients/python/nsml/_jsonify.py"),
    ),
    (
        "_runner.py",
        include_str!("../../../clients/python/nsml/_runner.py"),
    ),
    (
        "constants.py",
        include_str!("../../../clients/python/nsml/constants.py"),
    ),
];

/// The shipped SDK's version: 16 hex digits of the SHA-256 of its files' names and contents.
fn version() -> String {
    let mut hash = Sha256::new();
    for (name, text) in FILES {
        hash.update(name.as_bytes());
        hash.update([0]);
        hash.update(text.len().to_le_bytes());
        hash.update(text.as_bytes());
    }
    hex::encode(&hash.finalize()[..8])
}

/// Whether `root/nsml` holds every file of the shipped SDK as shipped.
fn is_intact(root: &Path) -> bool {
    FILES.iter().all(|(name, text)| {
        std::fs::read(root.join("nsml").join(name)).is_ok_and(|found| found == text.as_bytes())
    })
}

/// Writes the shipped SDK under `dir` unless an intact copy of this version is there, removes the copies of
/// other versions, and returns the directory to put on `PYTHONPATH` (the one holding `nsml/`).
pub fn install(dir: &Path) -> anyhow::Result<PathBuf> {
    let version = version();
    let root = dir.join(&version);
    if !is_intact(&root) {
        write(dir, &root, &version).with_context(|| {
            format!(
                "cannot write the Python SDK to {}: make the directory writable, or point the runner's \
                 sdk_path (or NSML_SDK_PATH) at a copy of clients/python",
                root.display()
            )
        })?;
    }
    remove_other_versions(dir, &version);
    Ok(root)
}

/// Writes the SDK into a staging folder and renames it to `root`, so that `root` is complete or absent.
fn write(dir: &Path, root: &Path, version: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let staging = dir.join(format!(".{version}.{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    let package = staging.join("nsml");
    std::fs::create_dir_all(&package)?;
    // Sessions run under another, unprivileged uid inside the sandbox: whatever the runner's umask, every
    // user may read the SDK, and none but the runner's may change it.
    let mode = |path: &Path, mode| std::fs::set_permissions(path, Permissions::from_mode(mode));
    for (name, text) in FILES {
        let file = package.join(name);
        std::fs::write(&file, text)?;
        mode(&file, 0o644)?;
    }
    for folder in [dir, &staging, &package] {
        mode(folder, 0o755)?;
    }
    // A damaged copy (a file edited or removed) is replaced whole.
    if root.exists() {
        std::fs::remove_dir_all(root)?;
    }
    match std::fs::rename(&staging, root) {
        Ok(()) => Ok(()),
        // Another runner sharing the directory put the same version in place first.
        Err(_) if is_intact(root) => std::fs::remove_dir_all(&staging),
        Err(e) => Err(e),
    }
}

/// Removes what other versions (and interrupted writes) left in `dir`; what cannot be removed stays, unused.
fn remove_other_versions(dir: &Path, version: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // A staging folder of a write in progress ends in its process's id; ours is gone by now.
        let in_progress = name.starts_with(&format!(".{version}."));
        if name != version
            && !in_progress
            && let Err(e) = std::fs::remove_dir_all(entry.path())
        {
            tracing::debug!(path = %entry.path().display(), error = %e, "cannot remove an old copy of the Python SDK");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_of_the_package_is_shipped() {
        let package = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../clients/python/nsml");
        let mut on_disk: Vec<String> = std::fs::read_dir(&package)
            .expect("the SDK's package directory")
            .map(|e| {
                e.expect("an entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .filter(|name| name.ends_with(".py"))
            .collect();
        on_disk.sort();
        let mut shipped: Vec<String> = FILES.iter().map(|(name, _)| name.to_string()).collect();
        shipped.sort();
        assert_eq!(shipped, on_disk, "add the package's new files to FILES");
    }

    #[test]
    fn installs_once_and_replaces_a_damaged_or_older_copy() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let sdk = dir.path().join("sdk");
        std::fs::create_dir_all(sdk.join("0123456789abcdef/nsml")).expect("an older copy");
        // A runner whose umask lets no one else read what it writes still shares the SDK with sessions.
        // SAFETY: umask only swaps the process's file-creation mask; it is put back right after.
        #[allow(unsafe_code)]
        let umask = unsafe { libc::umask(0o077) };
        let installed = install(&sdk);
        // SAFETY: as above.
        #[allow(unsafe_code)]
        unsafe {
            libc::umask(umask)
        };
        let root = installed.expect("installing");
        assert_eq!(root, sdk.join(version()));
        assert!(is_intact(&root));
        assert!(
            !sdk.join("0123456789abcdef").exists(),
            "the older copy stays"
        );
        let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode(&root.join("nsml/_api.py")), 0o644);
        assert_eq!(mode(&root.join("nsml")), 0o755);
        assert_eq!(mode(&sdk), 0o755);

        std::fs::write(root.join("nsml/_api.py"), "raise SystemExit(1)\n").expect("damaging");
        assert_eq!(install(&sdk).expect("installing again"), root);
        assert!(is_intact(&root), "a damaged copy is not replaced");
        let left: Vec<_> = std::fs::read_dir(&sdk)
            .expect("the SDK directory")
            .collect();
        assert_eq!(left.len(), 1, "staging folders are left behind");
    }
}
