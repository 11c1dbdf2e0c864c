//! The snapshot ids of code this machine packed, by the digest of the code's plain tar, so that an unchanged
//! directory is named without being compressed again.
//!
//! A code snapshot's id is the SHA-256 of the gzip'd tar `nsml run` uploads; storage computes it of the bytes
//! it keeps. Compressing is most of what packing costs, and the gzip'd bytes follow from the tar's bytes alone,
//! so the SHA-256 of the plain tar, which costs no compression, stands for the id: this file maps the one to
//! the other. An entry never goes stale: a tree that changed in anything the archive records (a file's content,
//! name, mode or modification time) has another digest, hence no entry. The id is still only a name: the
//! platform answers whether the team has that snapshot, and `Run` checks it is the team's.
//!
//! The file is `code-ids` in the credentials' directory, one `DIGEST ID` line per tree, newest last. It is a
//! cache: a missing, damaged or unwritable file only costs the next run one compression.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// How many trees are remembered; the oldest is forgotten first.
const KEPT: usize = 256;

/// The remembered ids, in a directory.
#[derive(Debug, Clone)]
pub struct KnownCode {
    dir: PathBuf,
}

impl KnownCode {
    /// The ids remembered in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("code-ids")
    }

    /// Returns the snapshot id of the tree whose plain tar has `digest`, if it was remembered.
    pub fn get(&self, digest: &str) -> Option<String> {
        let text = fs::read_to_string(self.path()).ok()?;
        entries(&text)
            .filter(|(d, _)| *d == digest)
            .last()
            .map(|(_, id)| id.to_string())
    }

    /// Remembers that the tree whose plain tar has `digest` is snapshot `id`. Best effort: a cache that cannot
    /// be written is left as it was.
    pub fn remember(&self, digest: &str, id: &str) {
        if !is_digest(digest) || !is_digest(id) {
            return;
        }
        let text = fs::read_to_string(self.path()).unwrap_or_default();
        let mut kept: Vec<(&str, &str)> = entries(&text).filter(|(d, _)| *d != digest).collect();
        kept.push((digest, id));
        let start = kept.len().saturating_sub(KEPT);
        let mut out = String::with_capacity((kept.len() - start) * 130);
        for (d, i) in &kept[start..] {
            out.push_str(d);
            out.push(' ');
            out.push_str(i);
            out.push('\n');
        }
        let _ = self.replace(&out);
    }

    /// Replaces the file atomically: a concurrent `nsml run` reads the old entries or the new, never half.
    fn replace(&self, text: &str) -> std::io::Result<()> {
        crate::config::create_private_dir(&self.dir)?;
        let temp = self
            .dir
            .join(format!(".code-ids.{}.tmp", std::process::id()));
        let written = fs::File::create(&temp)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .and_then(|()| fs::rename(&temp, self.path()));
        if written.is_err() {
            let _ = fs::remove_file(&temp);
        }
        written
    }
}

/// The well-formed `DIGEST ID` lines of the file; anything else is skipped.
fn entries(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.lines().filter_map(|line| {
        let (digest, id) = line.split_once(' ')?;
        (is_digest(digest) && is_digest(id)).then_some((digest, id))
    })
}

/// Whether `s` is a SHA-256 in lowercase hex.
fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(n: usize) -> String {
        format!("{n:064x}")
    }

    #[test]
    fn ids_are_remembered_by_digest_and_the_oldest_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let known = KnownCode::in_dir(&dir.path().join("cfg"));
        assert_eq!(known.get(&hex(1)), None);
        known.remember(&hex(1), &hex(100));
        known.remember(&hex(2), &hex(200));
        assert_eq!(known.get(&hex(1)), Some(hex(100)));
        assert_eq!(known.get(&hex(2)), Some(hex(200)));
        // A digest remembered again takes its new id and becomes the newest.
        known.remember(&hex(1), &hex(101));
        assert_eq!(known.get(&hex(1)), Some(hex(101)));
        for n in 3..=KEPT + 1 {
            known.remember(&hex(n), &hex(n + 1000));
        }
        assert_eq!(known.get(&hex(2)), None, "the oldest is forgotten");
        assert_eq!(known.get(&hex(1)), Some(hex(101)));
        assert_eq!(known.get(&hex(KEPT + 1)), Some(hex(KEPT + 1001)));
    }

    #[test]
    fn a_damaged_file_names_nothing_and_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let known = KnownCode::in_dir(dir.path());
        fs::write(
            dir.path().join("code-ids"),
            format!("garbage\n{} short\n{} {}\n", hex(1), hex(2), hex(3)),
        )
        .unwrap();
        assert_eq!(known.get(&hex(1)), None);
        assert_eq!(known.get(&hex(2)), Some(hex(3)));
        known.remember(&hex(4), &hex(5));
        let text = fs::read_to_string(dir.path().join("code-ids")).unwrap();
        assert_eq!(
            text,
            format!("{} {}\n{} {}\n", hex(2), hex(3), hex(4), hex(5))
        );
        // Nothing that is not a digest gets in.
        known.remember("../etc", &hex(6));
        assert_eq!(known.get("../etc"), None);
    }
}
