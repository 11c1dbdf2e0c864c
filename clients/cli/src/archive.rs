//! Code uploads and checkpoint downloads as gzip'd tars: collecting a directory under `.nsmlignore`, packing it,
//! and extracting an archive without letting it write outside its target directory.

use std::fs;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;

use crate::ignore::IgnoreRules;

/// What `nsml run` uploads: directories and regular files, relative to the uploaded directory, sorted.
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
        let wanted = normalize(file);
        self.entries.iter().any(|e| !e.is_dir && e.path == wanted)
    }
}

/// Normalizes a relative path as the user typed it: `./src//main.py` → `src/main.py`.
fn normalize(path: &str) -> String {
    path.split(['/', '\\'])
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// Walks `root`, leaving out what `rules` ignore, symlinks and special files.
pub fn collect(root: &Path, rules: &IgnoreRules) -> Result<Collected> {
    let mut collected = Collected::default();
    walk(root, "", rules, &mut collected)?;
    Ok(collected)
}

fn walk(dir: &Path, prefix: &str, rules: &IgnoreRules, out: &mut Collected) -> Result<()> {
    let mut children = fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("cannot read {}", dir.display()))?;
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
            .with_context(|| format!("cannot read {}", child.path().display()))?;
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
pub fn pack(root: &Path, collected: &Collected) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
    builder.follow_symlinks(false);
    for entry in &collected.entries {
        let source = root.join(&entry.path);
        if entry.is_dir {
            builder.append_dir(&entry.path, &source)
        } else {
            builder.append_path_with_name(&source, &entry.path)
        }
        .with_context(|| format!("cannot pack {}", source.display()))?;
    }
    let encoder = builder.into_inner().context("cannot pack the upload")?;
    encoder.finish().context("cannot pack the upload")
}

/// What an extraction wrote.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Extracted {
    pub files: usize,
    /// Entries left out because they are links or special files.
    pub skipped: Vec<String>,
}

/// Extracts a gzip'd tar into `dest` (created if needed). Paths that are absolute or climb out with `..` make
/// the whole extraction fail; links and special files are skipped.
pub fn extract(reader: impl Read, dest: &Path) -> Result<Extracted> {
    fs::create_dir_all(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    let mut archive = tar::Archive::new(GzDecoder::new(reader));
    archive.set_overwrite(true);
    let mut extracted = Extracted::default();
    for entry in archive.entries().context("cannot read the archive")? {
        let mut entry = entry.context("cannot read the archive")?;
        let path: PathBuf = entry
            .path()
            .context("cannot read the archive")?
            .into_owned();
        check_path(&path)?;
        let kind = entry.header().entry_type();
        if !(kind.is_dir() || kind.is_file()) {
            extracted.skipped.push(path.display().to_string());
            continue;
        }
        // `unpack_in` checks again that the target stays inside `dest`, symlinked parents included.
        let written = entry
            .unpack_in(dest)
            .with_context(|| format!("cannot extract {}", path.display()))?;
        if !written {
            bail!(
                "refusing to extract `{}`: it leaves the target directory",
                path.display()
            );
        }
        if kind.is_file() {
            extracted.files += 1;
        }
    }
    Ok(extracted)
}

fn check_path(path: &Path) -> Result<()> {
    for component in path.components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                bail!(
                    "refusing to extract `{}`: it leaves the target directory",
                    path.display()
                )
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn tree(root: &Path, files: &[&str]) {
        for file in files {
            let path = root.join(file);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, format!("contents of {file}")).unwrap();
        }
    }

    fn unpack(archive: &[u8]) -> BTreeMap<String, String> {
        let dir = tempfile::tempdir().unwrap();
        extract(archive, dir.path()).unwrap();
        let mut out = BTreeMap::new();
        let mut stack = vec![dir.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = p
                        .strip_prefix(dir.path())
                        .unwrap()
                        .to_string_lossy()
                        .into_owned();
                    out.insert(rel, fs::read_to_string(&p).unwrap());
                }
            }
        }
        out
    }

    #[test]
    fn uploads_honour_nsmlignore_and_skip_git_and_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        tree(
            root,
            &[
                "main.py",
                "model/net.py",
                "data/big.bin",
                ".git/HEAD",
                "a.pyc",
                "model/b.pyc",
                ".nsmlignore",
            ],
        );
        fs::write(root.join(".nsmlignore"), "*.pyc\ndata/\n").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink("main.py", root.join("link.py")).unwrap();
        let rules =
            IgnoreRules::parse(&fs::read_to_string(root.join(".nsmlignore")).unwrap()).unwrap();

        let collected = collect(root, &rules).unwrap();
        let paths: Vec<_> = collected.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, [".nsmlignore", "main.py", "model", "model/net.py"]);
        #[cfg(unix)]
        assert_eq!(collected.skipped, [("link.py".to_string(), "symlink")]);
        assert!(collected.contains_file("main.py"));
        assert!(collected.contains_file("./model//net.py"));
        assert!(!collected.contains_file("model"));
        assert!(!collected.contains_file("data/big.bin"));

        let files = unpack(&pack(root, &collected).unwrap());
        let names: Vec<_> = files.keys().map(String::as_str).collect();
        assert_eq!(names, [".nsmlignore", "main.py", "model/net.py"]);
        assert_eq!(files["model/net.py"], "contents of model/net.py");
    }

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
}
