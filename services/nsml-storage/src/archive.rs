//! Reading uploaded tars safely: checking code and checkpoint archives (plain or gzip'd, told apart by
//! their first bytes), and splitting a (gzip'd) dataset archive into its stored parts.
//!
//! Archives come from participants (code, checkpoints written by their programs) and hosts (datasets), and
//! are unpacked later by the runner and the scorer, so every entry must stay inside the directory it is
//! unpacked into; the rules are `nsml_archive`'s, and this module phrases its refusals for the uploader.
//! These functions block; run them on a blocking thread.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use nsml_archive::{ArchiveError, Limits};
use nsml_proto::v1::{DatasetMeta, DatasetPart};
use tar::{EntryType, Header};

use crate::blobs::{Staged, StagedWriter, Staging};
use crate::error::StorageError;

/// Largest `private_keys.txt` a dataset archive may hold.
const MAX_PRIVATE_KEYS_BYTES: u64 = 64 * 1024 * 1024;

fn open_file(path: &Path) -> Result<BufReader<File>, StorageError> {
    let file = File::open(path).map_err(|e| StorageError::io("opening a staged upload", e))?;
    Ok(BufReader::with_capacity(256 * 1024, file))
}

type Reader = tar::Archive<GzDecoder<BufReader<File>>>;

fn open(path: &Path) -> Result<Reader, StorageError> {
    Ok(tar::Archive::new(GzDecoder::new(open_file(path)?)))
}

/// Refusals of one archive, phrased with what the archive is (``dataset `t1-cls` ``, `code`).
struct Refuse<'a>(&'a str);

impl Refuse<'_> {
    fn because(&self, reason: impl Into<String>) -> StorageError {
        StorageError::BadArchive {
            what: self.0.to_string(),
            reason: reason.into(),
        }
    }

    fn unreadable(&self, err: io::Error) -> StorageError {
        self.because(format!("it is not a readable gzip'd tar ({err})"))
    }

    /// An archive error, except a limit crossed, in the uploader's words.
    fn archive(&self, err: ArchiveError) -> StorageError {
        match err {
            ArchiveError::Unreadable(e) => self.unreadable(e),
            ArchiveError::Io { source, .. } => StorageError::io("reading a staged upload", source),
            other => self.because(other.to_string()),
        }
    }
}

/// Checks a code or checkpoint archive: every entry a file, directory or link that stays inside the tree,
/// at most `max_entries` entries. Returns the number of entries. [`measure_tree`] also caps and returns
/// what the archive expands to.
pub fn check_tree(
    path: &Path,
    what: &str,
    max_entries: usize,
    too_many_hint: &str,
) -> Result<usize, StorageError> {
    let limits = TreeLimits {
        max_entries,
        too_many_hint,
        max_bytes: u64::MAX,
    };
    measure_tree(path, what, &limits, |_| unreachable_over()).map(|t| t.entries)
}

/// The error for a byte budget of `u64::MAX` crossed, which a sum that saturates cannot do.
fn unreachable_over() -> StorageError {
    StorageError::BadRequest("an archive expands past 2^64 bytes".into())
}

/// What a code or checkpoint archive may hold.
#[derive(Debug, Clone, Copy)]
pub struct TreeLimits<'a> {
    /// Most entries (files, directories, links).
    pub max_entries: usize,
    /// What the caller can do about too many entries, starting with `; ` (or empty).
    pub too_many_hint: &'a str,
    /// Most bytes of file content once unpacked.
    pub max_bytes: u64,
}

/// What a checked archive holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeSize {
    /// Entries (files, directories, links).
    pub entries: usize,
    /// Bytes of file content once unpacked (a hard link counts as the copy the runner makes of it).
    pub bytes: u64,
}

/// [`check_tree`] that also counts what a gzip'd archive (as code is uploaded) expands to, decompressing
/// it as a stream (nothing but names is kept), and stops at the first entry that takes the total past `limits.max_bytes`, with
/// the error `over` makes of the total so far. A gzip bomb is refused after reading as much of it as
/// the cap allows, never expanded in full.
pub fn measure_tree(
    path: &Path,
    what: &str,
    limits: &TreeLimits<'_>,
    over: impl FnOnce(u64) -> StorageError,
) -> Result<TreeSize, StorageError> {
    // Code is uploaded gzip'd, as the CLI packs it; only checkpoints come as plain tars.
    let mut reader = open_file(path)?;
    let head = reader
        .fill_buf()
        .map_err(|e| StorageError::io("reading a staged upload", e))?;
    if !head.starts_with(&[0x1f, 0x8b]) {
        return Err(Refuse(what).unreadable(io::Error::new(
            io::ErrorKind::InvalidData,
            "invalid gzip header",
        )));
    }
    measure(reader, what, limits, over).map_err(|e| match e {
        Unreadable::Tar(e) => Refuse(what).unreadable(e),
        Unreadable::No(e) => e,
    })
}

/// An archive refused, or one that could not be read as a tar at all.
enum Unreadable {
    Tar(io::Error),
    No(StorageError),
}

/// [`measure_tree`] of an archive read from `reader`, a plain tar or a gzip'd one, as it arrives: every
/// byte is read, and whatever follows the archive's end is refused.
pub fn measure_reader(
    reader: impl Read,
    what: &str,
    limits: &TreeLimits<'_>,
    over: impl FnOnce(u64) -> StorageError,
) -> Result<TreeSize, StorageError> {
    measure(reader, what, limits, over).map_err(|e| match e {
        Unreadable::Tar(e) => Refuse(what).because(format!("it is not a readable tar ({e})")),
        Unreadable::No(e) => e,
    })
}

fn measure(
    reader: impl Read,
    what: &str,
    limits: &TreeLimits<'_>,
    over: impl FnOnce(u64) -> StorageError,
) -> Result<TreeSize, Unreadable> {
    let refuse = Refuse(what);
    let caps = Limits {
        max_entries: u64::try_from(limits.max_entries).unwrap_or(u64::MAX),
        max_bytes: limits.max_bytes,
    };
    match nsml_archive::measure(reader, caps) {
        Ok(size) => Ok(TreeSize {
            entries: usize::try_from(size.entries).unwrap_or(usize::MAX),
            bytes: size.bytes,
        }),
        Err(ArchiveError::TooLarge { reached, .. }) => Err(Unreadable::No(over(reached))),
        Err(ArchiveError::TooManyEntries { .. }) => Err(Unreadable::No(refuse.because(format!(
            "it has more than {} entries{}",
            limits.max_entries, limits.too_many_hint
        )))),
        Err(ArchiveError::Unreadable(e)) => Err(Unreadable::Tar(e)),
        Err(e) => Err(Unreadable::No(refuse.archive(e))),
    }
}

/// A dataset archive split into its stored parts.
#[derive(Debug)]
pub struct SplitDataset {
    pub parts: Vec<(DatasetPart, Staged)>,
    /// Rows of `test/test_label`, less its header line.
    pub test_items: u64,
    /// Keys listed in `private_keys.txt`, if the archive has one.
    pub private_keys: Option<Vec<String>>,
}

enum Route {
    /// Goes into a part, under this path.
    Part(DatasetPart, String),
    PrivateKeys,
    /// Refused: a label path that is not a file.
    LabelNotFile(&'static str),
    /// Not part of the layout (a README, `test/` itself): not stored.
    Skip,
}

fn route(path: &str) -> Route {
    let under = |root: &str| {
        path == root || (path.starts_with(root) && path.as_bytes().get(root.len()) == Some(&b'/'))
    };
    if under("train") {
        Route::Part(DatasetPart::Train, path.to_string())
    } else if under("test/test_data") {
        Route::Part(DatasetPart::TestData, path.to_string())
    } else if path == "test/test_label" {
        Route::Part(DatasetPart::TestLabel, path.to_string())
    } else if under("test/test_label") {
        Route::LabelNotFile("test/test_label")
    } else if under("test_submit/test_data") {
        // The trial set stands in for the test set at a trial submit: it is stored where the test set lies.
        Route::Part(
            DatasetPart::TrialData,
            format!("test/{}", &path["test_submit/".len()..]),
        )
    } else if path == "test_submit/test_label" {
        Route::Part(DatasetPart::TrialLabel, "test/test_label".to_string())
    } else if under("test_submit/test_label") {
        Route::LabelNotFile("test_submit/test_label")
    } else if under("eval") {
        Route::Part(DatasetPart::EvalScript, path.to_string())
    } else if path == "private_keys.txt" {
        Route::PrivateKeys
    } else {
        Route::Skip
    }
}

/// Reads through an entry, remembering whether reading failed (a broken archive, not a broken disk) and
/// counting its non-empty lines.
struct Source<R> {
    inner: R,
    failed: bool,
    lines: u64,
    line_has_content: bool,
}

impl<R: Read> Source<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            failed: false,
            lines: 0,
            line_has_content: false,
        }
    }

    fn lines(&self) -> u64 {
        self.lines + u64::from(self.line_has_content)
    }
}

impl<R: Read> Read for Source<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf).inspect_err(|_| self.failed = true)?;
        for &b in &buf[..n] {
            if b == b'\n' {
                self.lines += u64::from(self.line_has_content);
                self.line_has_content = false;
            } else if !b.is_ascii_whitespace() {
                self.line_has_content = true;
            }
        }
        Ok(n)
    }
}

fn new_part(staging: &Staging) -> Result<tar::Builder<GzEncoder<StagedWriter>>, StorageError> {
    Ok(tar::Builder::new(GzEncoder::new(
        staging.writer()?,
        Compression::default(),
    )))
}

/// Splits a dataset archive into its parts, each written to the staging area as a gzip'd tar (see
/// [`crate::domain::DatasetBlobs`] for their layout). Links, device files and entries outside the layout's
/// paths are refused or left out; missing required parts are refused, naming the part.
pub fn split_dataset(
    path: &Path,
    meta: &DatasetMeta,
    staging: &Staging,
) -> Result<SplitDataset, StorageError> {
    let what = format!("dataset `{}`", meta.name);
    let mut splitter = Splitter {
        meta,
        staging,
        refuse: Refuse(&what),
        checker: nsml_archive::Checker::new(Limits::NONE),
        parts: HashMap::new(),
        files: HashMap::new(),
        eval_files: HashSet::new(),
        test_items: 0,
        private_keys: None,
    };
    let mut archive = open(path)?;
    let entries = archive
        .entries()
        .map_err(|e| splitter.refuse.unreadable(e))?;
    for entry in entries {
        let entry = entry.map_err(|e| splitter.refuse.unreadable(e))?;
        splitter.entry(entry)?;
    }
    splitter.finish()
}

/// A dataset archive being split, entry by entry.
struct Splitter<'a> {
    meta: &'a DatasetMeta,
    staging: &'a Staging,
    refuse: Refuse<'a>,
    /// The containment rules every archive is held to (no links reach it: they are refused first).
    checker: nsml_archive::Checker,
    parts: HashMap<DatasetPart, tar::Builder<GzEncoder<StagedWriter>>>,
    /// Regular files per part.
    files: HashMap<DatasetPart, u64>,
    eval_files: HashSet<String>,
    test_items: u64,
    private_keys: Option<Vec<String>>,
}

impl Splitter<'_> {
    /// Routes one entry: refused, left out, read as the private keys, or appended to its part.
    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), StorageError> {
        let ty = entry.header().entry_type();
        if nsml_archive::is_metadata(ty) {
            return Ok(());
        }
        let path = nsml_archive::entry_path(&entry).map_err(|e| self.refuse.archive(e))?;
        let is_file = self.is_file(ty, &path)?;
        self.checker
            .entry(&entry)
            .map_err(|e| self.refuse.archive(e))?;
        let (part, inner) = match route(&path) {
            Route::Skip => return Ok(()),
            Route::LabelNotFile(label) => {
                return Err(self.refuse.because(format!(
                    "`{label}` must be a file with a header line and one row per test item"
                )));
            }
            Route::PrivateKeys => {
                if !is_file {
                    return Err(self.refuse.because("`private_keys.txt` must be a file"));
                }
                self.private_keys = Some(self.read_private_keys(&mut entry)?);
                return Ok(());
            }
            Route::Part(part, inner) => (part, inner),
        };
        if !is_file && matches!(part, DatasetPart::TestLabel | DatasetPart::TrialLabel) {
            return Err(self.refuse.because(format!(
                "`{path}` must be a file with a header line and one row per test item"
            )));
        }
        let lines = self.append(part, &inner, is_file, &mut entry)?;
        if is_file {
            *self.files.entry(part).or_default() += 1;
            if part == DatasetPart::TestLabel {
                self.test_items = lines.saturating_sub(1);
            }
            if part == DatasetPart::EvalScript {
                self.eval_files.insert(path);
            }
        }
        Ok(())
    }

    /// Whether an entry of type `ty` is a file (else a directory), refusing every other type.
    fn is_file(&self, ty: EntryType, path: &str) -> Result<bool, StorageError> {
        match ty {
            EntryType::Regular | EntryType::Continuous => Ok(true),
            EntryType::Directory => Ok(false),
            EntryType::Symlink | EntryType::Link => Err(self.refuse.because(format!(
                "entry `{path}` is a link; a dataset holds plain files and directories only"
            ))),
            EntryType::Char | EntryType::Block | EntryType::Fifo => Err(self
                .refuse
                .because(format!("entry `{path}` is a device file or pipe"))),
            other => Err(self.refuse.because(format!(
                "entry `{path}` has an unsupported type ({other:?}); use plain files and directories"
            ))),
        }
    }

    fn read_private_keys(&self, entry: &mut impl Read) -> Result<Vec<String>, StorageError> {
        let mut text = String::new();
        let mut src = Source::new(entry.take(MAX_PRIVATE_KEYS_BYTES + 1));
        src.read_to_string(&mut text).map_err(|e| {
            self.refuse.because(format!(
                "`private_keys.txt` is unreadable or not UTF-8 ({e})"
            ))
        })?;
        if text.len() as u64 > MAX_PRIVATE_KEYS_BYTES {
            return Err(self
                .refuse
                .because("`private_keys.txt` is larger than 64 MB"));
        }
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }

    /// Appends an entry to its part under `inner`; returns the non-empty lines of its content.
    fn append<R: Read>(
        &mut self,
        part: DatasetPart,
        inner: &str,
        is_file: bool,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<u64, StorageError> {
        let builder = match self.parts.entry(part) {
            std::collections::hash_map::Entry::Occupied(b) => b.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(new_part(self.staging)?),
        };
        let mut header = Header::new_gnu();
        header.set_entry_type(if is_file {
            EntryType::Regular
        } else {
            EntryType::Directory
        });
        header.set_size(if is_file { entry.size() } else { 0 });
        let default_mode = if is_file { 0o644 } else { 0o755 };
        // Keep permission bits only: no set-uid, set-gid or sticky bits in what the runner unpacks.
        header.set_mode(entry.header().mode().unwrap_or(default_mode) & 0o777);
        header.set_mtime(entry.header().mtime().unwrap_or(0));
        let mut src = Source::new(entry);
        if let Err(e) = builder.append_data(&mut header, inner, &mut src) {
            return Err(if src.failed {
                self.refuse.unreadable(e)
            } else {
                StorageError::io(format!("writing dataset `{}` part", self.meta.name), e)
            });
        }
        Ok(src.lines())
    }

    fn has(&self, part: DatasetPart) -> bool {
        self.files.get(&part).copied().unwrap_or(0) > 0
    }

    /// Refuses a dataset lacking a required part, naming it.
    fn check_complete(&self) -> Result<(), StorageError> {
        let missing = |part: &str| StorageError::MissingPart {
            dataset: self.meta.name.clone(),
            part: part.to_string(),
        };
        if !self.has(DatasetPart::Train) {
            return Err(missing("train/"));
        }
        if !self.has(DatasetPart::TestData) {
            return Err(missing("test/test_data"));
        }
        if !self.has(DatasetPart::TestLabel) {
            return Err(missing("test/test_label"));
        }
        match (
            self.has(DatasetPart::TrialData),
            self.has(DatasetPart::TrialLabel),
        ) {
            (true, false) => return Err(missing("test_submit/test_label")),
            (false, true) => return Err(missing("test_submit/test_data")),
            _ => {}
        }
        if !self.meta.eval_script.is_empty() {
            let script = format!("eval/{}", self.meta.eval_script);
            if !self.eval_files.contains(&script) {
                return Err(missing(&script));
            }
        }
        Ok(())
    }

    /// Checks the whole archive and ends every part's archive.
    fn finish(mut self) -> Result<SplitDataset, StorageError> {
        let checker =
            std::mem::replace(&mut self.checker, nsml_archive::Checker::new(Limits::NONE));
        checker
            .finish()
            .map_err(|r| self.refuse.because(r.to_string()))?;
        self.check_complete()?;
        let no_trial = !self.has(DatasetPart::TrialData);
        let mut stored = Vec::with_capacity(self.parts.len());
        for (part, builder) in self.parts {
            if part == DatasetPart::TrialData && no_trial {
                // Only directories under test_submit/test_data: no trial set.
                continue;
            }
            let staged = builder
                .into_inner()
                .and_then(GzEncoder::finish)
                .and_then(StagedWriter::finish)
                .map_err(|e| {
                    StorageError::io(format!("writing dataset `{}` part", self.meta.name), e)
                })?;
            stored.push((part, staged));
        }
        stored.sort_by_key(|(part, _)| *part);
        Ok(SplitDataset {
            parts: stored,
            test_items: self.test_items,
            private_keys: self.private_keys,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// An archive entry for tests.
    enum E<'a> {
        File(&'a str, &'a [u8]),
        Dir(&'a str),
        Symlink(&'a str, &'a str),
        HardLink(&'a str, &'a str),
        Fifo(&'a str),
    }

    /// Writes a gzip'd tar with raw names (the tar crate's builder refuses `..` and absolute paths, which
    /// is what these tests need to send).
    fn targz(entries: &[E]) -> tempfile::NamedTempFile {
        let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
        for e in entries {
            let mut h = Header::new_gnu();
            let (name, ty, data, link): (&str, EntryType, &[u8], Option<&str>) = match e {
                E::File(n, d) => (n, EntryType::Regular, d, None),
                E::Dir(n) => (n, EntryType::Directory, b"", None),
                E::Symlink(n, t) => (n, EntryType::Symlink, b"", Some(t)),
                E::HardLink(n, t) => (n, EntryType::Link, b"", Some(t)),
                E::Fifo(n) => (n, EntryType::Fifo, b"", None),
            };
            h.set_entry_type(ty);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            {
                let gnu = h.as_gnu_mut().unwrap();
                gnu.name[..name.len()].copy_from_slice(name.as_bytes());
                if let Some(t) = link {
                    gnu.linkname[..t.len()].copy_from_slice(t.as_bytes());
                }
            }
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        let bytes = b.into_inner().unwrap().finish().unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&bytes).unwrap();
        f
    }

    fn check(entries: &[E]) -> Result<usize, String> {
        let f = targz(entries);
        check_tree(f.path(), "code", 100, "").map_err(|e| e.to_string())
    }

    fn measure(entries: &[E], max_bytes: u64) -> Result<TreeSize, String> {
        let f = targz(entries);
        let limits = TreeLimits {
            max_entries: 100,
            too_many_hint: "",
            max_bytes,
        };
        measure_tree(f.path(), "code", &limits, |at| {
            StorageError::BadRequest(format!("over at {at}"))
        })
        .map_err(|e| e.to_string())
    }

    #[test]
    fn a_tree_is_measured_by_its_unpacked_content_and_stopped_at_the_cap() {
        let tree = [
            E::Dir("d"),
            E::File("d/a", &[7; 300]),
            E::Symlink("l", "d/a"),
            E::HardLink("h", "d/a"),
            E::File("b", &[1; 50]),
        ];
        // A hard link unpacks to a copy; directories and symlinks hold no content.
        assert_eq!(
            measure(&tree, 650),
            Ok(TreeSize {
                entries: 5,
                bytes: 650
            })
        );
        // The entry that crosses the cap stops the reading, with the total so far.
        assert_eq!(measure(&tree, 649), Err("over at 650".into()));
        assert_eq!(measure(&tree, 599), Err("over at 600".into()));
        assert_eq!(measure(&tree, 299), Err("over at 300".into()));
        // The safety rules still come first for the entries read.
        assert!(
            measure(&[E::File("../x", b"1")], 10)
                .unwrap_err()
                .contains("`..`")
        );
    }

    #[test]
    fn escapes_are_refused_with_the_entry_named() {
        let err = check(&[E::File("/etc/passwd", b"x")]).unwrap_err();
        assert_eq!(
            err,
            "code archive refused: entry `/etc/passwd` has an absolute path"
        );
        let err = check(&[E::File("a/../../x", b"x")]).unwrap_err();
        assert!(
            err.contains("entry `a/../../x` leaves the archive through `..`"),
            "{err}"
        );
        let err = check(&[E::Symlink("lib", "/usr/lib")]).unwrap_err();
        assert!(
            err.contains("symlink `lib` points to an absolute path"),
            "{err}"
        );
        let err = check(&[E::Symlink("cfg", "../x/cfg.py")]).unwrap_err();
        assert!(
            err.contains("symlink `cfg` points outside the archive"),
            "{err}"
        );
        let err = check(&[E::Symlink("a/b", "../../etc")]).unwrap_err();
        assert!(
            err.contains("symlink `a/b` points outside the archive"),
            "{err}"
        );
        let err = check(&[E::HardLink("h", "../secret")]).unwrap_err();
        assert!(
            err.contains("hard link `h` points outside the archive"),
            "{err}"
        );
        let err = check(&[E::Fifo("p")]).unwrap_err();
        assert!(err.contains("entry `p` is a device file or pipe"), "{err}");
    }

    #[test]
    fn too_many_entries_are_refused() {
        let names: Vec<String> = (0..101).map(|i| format!("f{i}")).collect();
        let entries: Vec<E> = names.iter().map(|n| E::File(n, b"")).collect();
        let f = targz(&entries);
        let err = check_tree(f.path(), "code", 100, "; use .nsmlignore").unwrap_err();
        assert_eq!(
            err.to_string(),
            "code archive refused: it has more than 100 entries; use .nsmlignore"
        );
    }

    #[test]
    fn garbage_is_not_an_archive() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"definitely not gzip").unwrap();
        let err = check_tree(f.path(), "code", 100, "")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("code archive refused: it is not a readable gzip'd tar"),
            "{err}"
        );
    }

    fn meta() -> DatasetMeta {
        DatasetMeta {
            name: "t1-cls".into(),
            ..Default::default()
        }
    }

    fn unpack(staged: &Staged) -> Vec<(String, Vec<u8>)> {
        let mut a = tar::Archive::new(GzDecoder::new(File::open(staged.path()).unwrap()));
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let p = e
                    .path()
                    .unwrap()
                    .to_string_lossy()
                    .trim_end_matches('/')
                    .to_string();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (p, data)
            })
            .collect()
    }

    #[test]
    fn a_dataset_splits_into_its_parts() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let staging = rt.block_on(Staging::new(dir.path().join("tmp"))).unwrap();
        let f = targz(&[
            E::Dir("./train/"),
            E::File("./train/train_data/data.csv", b"id,f1\n1,0.5\n"),
            E::File("./train/train_label", b"id,label\n1,0\n"),
            E::File("test/test_data/data.csv", b"id,f1\n2,0.1\n3,0.2\n"),
            E::File("test/test_label", b"id,label\n2,1\n3,0\n\n"),
            E::File("test_submit/test_data/data.csv", b"id,f1\n4,0.3\n"),
            E::File("test_submit/test_label", b"id,label\n4,1"),
            E::File("private_keys.txt", b"3\n"),
            E::File("README.md", b"not stored"),
        ]);
        let split = split_dataset(f.path(), &meta(), &staging).unwrap();
        assert_eq!(split.test_items, 2);
        assert_eq!(split.private_keys, Some(vec!["3".to_string()]));
        let parts: HashMap<DatasetPart, Vec<(String, Vec<u8>)>> =
            split.parts.iter().map(|(p, s)| (*p, unpack(s))).collect();
        let names = |p| parts[&p].iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(DatasetPart::Train),
            ["train", "train/train_data/data.csv", "train/train_label"]
        );
        assert_eq!(names(DatasetPart::TestData), ["test/test_data/data.csv"]);
        assert_eq!(names(DatasetPart::TestLabel), ["test/test_label"]);
        assert_eq!(names(DatasetPart::TrialData), ["test/test_data/data.csv"]);
        assert_eq!(parts[&DatasetPart::TrialLabel][0].1, b"id,label\n4,1");
        assert!(!parts.contains_key(&DatasetPart::EvalScript));
    }

    #[test]
    fn a_dataset_lacking_a_part_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let staging = rt.block_on(Staging::new(dir.path().join("tmp"))).unwrap();
        let f = targz(&[
            E::File("train/train_label", b"id,label\n"),
            E::File("test/test_data/x", b""),
        ]);
        let err = split_dataset(f.path(), &meta(), &staging).unwrap_err();
        assert!(
            matches!(&err, StorageError::MissingPart { part, .. } if part == "test/test_label"),
            "{err}"
        );
        let f = targz(&[
            E::File("train/train_label", b"id,label\n"),
            E::File("test/test_data/x", b""),
            E::File("test/test_label", b"id\n"),
            E::File("test_submit/test_data/x", b""),
        ]);
        let err = split_dataset(f.path(), &meta(), &staging).unwrap_err();
        assert!(
            matches!(&err, StorageError::MissingPart { part, .. } if part == "test_submit/test_label"),
            "{err}"
        );
        let f = targz(&[
            E::File("train/a", b""),
            E::Symlink("test/test_data", "/data"),
        ]);
        let err = split_dataset(f.path(), &meta(), &staging)
            .unwrap_err()
            .to_string();
        assert!(err.contains("entry `test/test_data` is a link"), "{err}");
        // Failed splits leave nothing staged.
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[test]
    fn a_dataset_is_held_to_the_containment_rules() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let staging = rt.block_on(Staging::new(dir.path().join("tmp"))).unwrap();
        let f = targz(&[
            E::File("train/a", b""),
            E::File("train/a/b", b""),
            E::File("test/test_data/x", b""),
            E::File("test/test_label", b"id\n"),
        ]);
        let err = split_dataset(f.path(), &meta(), &staging)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "dataset `t1-cls` archive refused: entry `train/a/b` lies beneath file `train/a`"
        );
        let f = targz(&[E::File("../train/a", b"")]);
        let err = split_dataset(f.path(), &meta(), &staging)
            .unwrap_err()
            .to_string();
        assert!(err.contains("leaves the archive through `..`"), "{err}");
    }

    #[test]
    fn a_custom_metric_needs_its_script_in_the_archive() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let staging = rt.block_on(Staging::new(dir.path().join("tmp"))).unwrap();
        let meta = DatasetMeta {
            name: "speech".into(),
            metric: "custom".into(),
            eval_script: "score.py".into(),
            ..Default::default()
        };
        let base = [
            E::File("train/train_label", b"id,text\n"),
            // A single file as the test inputs is a layout NSML allowed too.
            E::File("test/test_data", b"id\n1\n"),
            E::File("test/test_label", b"id,text\n1,hi\n"),
        ];
        let f = targz(&base);
        let err = split_dataset(f.path(), &meta, &staging).unwrap_err();
        assert!(
            matches!(&err, StorageError::MissingPart { part, .. } if part == "eval/score.py"),
            "{err}"
        );
        let f = targz(&[
            E::File("train/train_label", b"id,text\n"),
            E::File("test/test_data", b"id\n1\n"),
            E::File("test/test_label", b"id,text\n1,hi\n"),
            E::File("eval/score.py", b"print(1.0)\n"),
        ]);
        let split = split_dataset(f.path(), &meta, &staging).unwrap();
        let parts: HashMap<DatasetPart, Vec<(String, Vec<u8>)>> =
            split.parts.iter().map(|(p, s)| (*p, unpack(s))).collect();
        assert_eq!(parts[&DatasetPart::EvalScript][0].0, "eval/score.py");
        assert_eq!(parts[&DatasetPart::TestData][0].0, "test/test_data");
        assert_eq!(split.test_items, 1);
    }
}
