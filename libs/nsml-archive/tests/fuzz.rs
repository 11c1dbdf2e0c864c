//! Property tests of the archive checker, the first code that reads what participants upload: whatever bytes
//! or entries an archive holds (random names with `..`, absolute paths and empty components, links with
//! random targets, device files, GNU long-name and PAX records), checking it never panics, and an archive it
//! accepts never unpacks anything outside its directory.
//!
//! "Outside" is decided by a model written apart from the checker: it resolves every link the way the
//! kernel would, through the other links of the archive, with no lexical shortcut. Cases per property:
//! `NSML_FUZZ_CASES` (256 unless set), so CI stays fast and a longer run is one variable away.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use flate2::Compression;
use flate2::write::GzEncoder;
use nsml_archive::{Limits, Links, measure, unpack};
use proptest::prelude::*;
use tar::{EntryType, Header};

fn config() -> ProptestConfig {
    let cases = std::env::var("NSML_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// One archive entry as written, raw: the builder of the tar crate refuses the hostile names this needs.
#[derive(Debug, Clone)]
struct Raw {
    name: String,
    kind: u8,
    link: String,
    data: Vec<u8>,
}

/// A path component: a name, `..`, `.` or empty, `..` being `climb` times as likely as each of the others.
fn component(climb: u32) -> impl Strategy<Value = String> {
    prop_oneof![
        12 => "[abc]".prop_map(String::from),
        climb => Just("..".to_string()),
        1 => Just(".".to_string()),
        1 => Just(String::new()),
    ]
}

/// A path of one to four components, absolute with probability `absolute`.
fn path_with(climb: u32, absolute: f64) -> impl Strategy<Value = String> {
    (
        prop::bool::weighted(absolute),
        prop::collection::vec(component(climb), 1..5),
    )
        .prop_map(|(absolute, parts)| {
            let p = parts.join("/");
            if absolute { format!("/{p}") } else { p }
        })
}

/// An entry's name: mostly plain, so that archives of several entries get accepted and their links matter.
fn name() -> impl Strategy<Value = String> {
    path_with(1, 0.03)
}

/// A link target or a name hidden in a long-name or PAX record: often climbing, sometimes absolute.
fn path() -> impl Strategy<Value = String> {
    path_with(6, 0.1)
}

fn entry() -> impl Strategy<Value = Raw> {
    let kind = prop_oneof![
        10 => Just(b'0'),                                               // regular file
        4 => Just(b'5'),                                                // directory
        10 => Just(b'2'),                                               // symlink
        4 => Just(b'1'),                                                // hard link
        1 => prop::sample::select(vec![b'3', b'4', b'6', b'7']),        // devices, FIFO, contiguous
        1 => prop::sample::select(vec![b'L', b'K', b'x', b'g']),        // GNU long names, PAX records
        1 => any::<u8>(),
    ];
    let data = prop_oneof![
        3 => prop::collection::vec(any::<u8>(), 0..8),
        // Long-name and PAX bodies that name hostile paths.
        1 => path().prop_map(|p| p.into_bytes()),
        1 => path().prop_map(|p| pax("path", &p)),
        1 => path().prop_map(|p| pax("linkpath", &p)),
    ];
    (name(), kind, path(), data).prop_map(|(name, kind, link, data)| Raw {
        name,
        kind,
        link,
        data,
    })
}

/// One PAX record, `LEN key=value\n`, whose length counts its own digits.
fn pax(key: &str, value: &str) -> Vec<u8> {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while len.to_string().len() + body.len() != len {
        len = len.to_string().len() + body.len();
    }
    format!("{len}{body}").into_bytes()
}

fn tar_bytes(entries: &[Raw]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::new(e.kind));
        h.set_size(e.data.len() as u64);
        h.set_mode(0o644);
        if let Some(gnu) = h.as_gnu_mut() {
            let n = e.name.len().min(gnu.name.len());
            gnu.name[..n].copy_from_slice(&e.name.as_bytes()[..n]);
            let l = e.link.len().min(gnu.linkname.len());
            gnu.linkname[..l].copy_from_slice(&e.link.as_bytes()[..l]);
        }
        h.set_cksum();
        // Appending raw bytes cannot fail on a Vec.
        b.append(&h, e.data.as_slice())
            .expect("appending to memory");
    }
    b.into_inner().expect("finishing in memory")
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
    enc.write_all(bytes).expect("compressing in memory");
    enc.finish().expect("compressing in memory")
}

fn staged(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("a temporary file");
    f.write_all(bytes).expect("writing a temporary file");
    f
}

/// What an entry unpacks to.
#[derive(Debug, Clone)]
enum Node {
    Dir,
    File,
    Symlink(String),
    HardLink(String),
}

/// The entries as the unpacker reads them (the same tar parser, long names and PAX records applied).
fn read_entries(archive: &Path) -> Result<Vec<(String, EntryType, Option<String>)>, String> {
    let file = std::fs::File::open(archive).map_err(|e| e.to_string())?;
    let mut ar = tar::Archive::new(nsml_archive::Decoded::new(file).map_err(|e| e.to_string())?);
    let mut out = Vec::new();
    for e in ar.entries().map_err(|e| e.to_string())? {
        let e = e.map_err(|e| e.to_string())?;
        let ty = e.header().entry_type();
        let path = e.path().map_err(|e| e.to_string())?;
        let link = e.link_name().map_err(|e| e.to_string())?;
        out.push((
            path.to_string_lossy().into_owned(),
            ty,
            link.map(|l| l.to_string_lossy().into_owned()),
        ));
    }
    Ok(out)
}

/// The tree an archive unpacks to, and whether anything in it reaches outside the directory.
struct Model {
    /// Every entry, in order.
    entries: Vec<(String, Node)>,
    /// What a path is when a walk passes it: a link if any entry put one there (the unpacker may leave it).
    nodes: HashMap<String, Node>,
}

impl Model {
    fn new(entries: Vec<(String, Node)>) -> Self {
        let mut nodes: HashMap<String, Node> = HashMap::new();
        for (path, node) in &entries {
            let keep_link = matches!(nodes.get(path), Some(Node::Symlink(_)))
                && !matches!(node, Node::Symlink(_));
            if !keep_link {
                nodes.insert(path.clone(), node.clone());
            }
        }
        Self { entries, nodes }
    }

    /// Resolves `target` from directory `from` (components below the root), following every link of the
    /// tree as the kernel would; `Err` when the walk leaves the root. A loop ends the walk (the kernel
    /// answers ELOOP: nothing is reached).
    fn resolve(&self, from: &[String], target: &str, depth: usize) -> Result<Vec<String>, String> {
        if target.starts_with('/') {
            return Err(format!("absolute `{target}`"));
        }
        let mut at = from.to_vec();
        for c in target.split('/') {
            match c {
                "" | "." => {}
                ".." => {
                    if at.pop().is_none() {
                        return Err(format!("`{target}` climbs above the root"));
                    }
                }
                name => {
                    at.push(name.to_string());
                    if let Some(Node::Symlink(t)) = self.nodes.get(&at.join("/")) {
                        if depth > 40 {
                            return Ok(at);
                        }
                        let parent = at[..at.len() - 1].to_vec();
                        at = self.resolve(&parent, t, depth + 1)?;
                    }
                }
            }
        }
        Ok(at)
    }

    /// Why the tree reaches outside its directory, if it does.
    fn escape(&self) -> Option<String> {
        for (path, node) in &self.entries {
            let parts: Vec<String> = path.split('/').map(String::from).collect();
            let parent = &parts[..parts.len() - 1];
            // Writing the entry walks its parent directories, following links.
            if let Err(e) = self.resolve(&[], &parent.join("/"), 0) {
                return Some(format!("`{path}` is written through a link: {e}"));
            }
            match node {
                Node::Symlink(t) => {
                    if let Err(e) = self.resolve(parent, t, 0) {
                        return Some(format!("symlink `{path}` → `{t}`: {e}"));
                    }
                }
                Node::HardLink(t) => {
                    if let Err(e) = self.resolve(&[], t, 0) {
                        return Some(format!("hard link `{path}` → `{t}`: {e}"));
                    }
                    // A hard link to a symlink is that symlink again, read from the new place.
                    let tparts: Vec<&str> = t
                        .split('/')
                        .filter(|c| !c.is_empty() && *c != ".")
                        .collect();
                    if let Some((last, dirs)) = tparts.split_last()
                        && let Ok(mut dir) = self.resolve(&[], &dirs.join("/"), 0)
                    {
                        dir.push(last.to_string());
                        if let Some(Node::Symlink(st)) = self.nodes.get(&dir.join("/"))
                            && let Err(e) = self.resolve(parent, st, 0)
                        {
                            return Some(format!(
                                "hard link `{path}` → symlink `{t}` → `{st}`: {e}"
                            ));
                        }
                    }
                }
                Node::Dir | Node::File => {}
            }
        }
        None
    }
}

/// Checks an archive the checker accepted: every entry of a type that unpacks to a plain file, directory or
/// link, at a relative path without `..`, and the whole tree inside its directory.
fn accepted_is_safe(archive: &Path, count: usize) -> Result<(), String> {
    let entries = read_entries(archive)?;
    let counted = entries
        .iter()
        .filter(|(_, ty, _)| !ty.is_pax_global_extensions())
        .count();
    if counted != count {
        return Err(format!("{count} entries reported, {counted} read"));
    }
    let mut nodes = Vec::new();
    for (path, ty, link) in entries {
        if ty.is_pax_global_extensions() {
            continue;
        }
        if path.starts_with('/') || path.split('/').any(|c| c == "..") {
            return Err(format!("accepted entry `{path}`"));
        }
        let clean: Vec<&str> = path
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        let node = match ty {
            EntryType::Regular | EntryType::Continuous => Node::File,
            EntryType::Directory => Node::Dir,
            EntryType::Symlink => Node::Symlink(link.clone().ok_or("symlink without target")?),
            EntryType::Link => Node::HardLink(link.clone().ok_or("hard link without target")?),
            other => return Err(format!("accepted entry `{path}` of type {other:?}")),
        };
        if clean.is_empty() {
            if !matches!(node, Node::Dir) {
                return Err(format!("accepted a {node:?} at the root itself"));
            }
            continue;
        }
        nodes.push((clean.join("/"), node));
    }
    match Model::new(nodes).escape() {
        Some(why) => Err(format!("accepted an archive that escapes: {why}")),
        None => Ok(()),
    }
}

/// The entries an archive holds, as `measure` counts them.
fn count(bytes: &[u8], max_entries: usize) -> Option<usize> {
    let limits = Limits {
        max_entries: max_entries as u64,
        max_bytes: u64::MAX,
    };
    measure(bytes, limits).ok().map(|t| t.entries as usize)
}

fn check(bytes: &[u8], max_entries: usize) -> Result<(), TestCaseError> {
    let f = staged(bytes);
    if let Some(count) = count(bytes, max_entries) {
        prop_assert!(count <= max_entries, "{count} entries over {max_entries}");
        if let Err(why) = accepted_is_safe(f.path(), count) {
            return Err(TestCaseError::fail(why));
        }
    }
    Ok(())
}

/// Unpacks an archive into `root/dest` beside an empty `root/outside`: whatever it holds, nothing lands
/// outside `dest`, no symlink left in `dest` leads out of it, and unpacking accepts exactly what checking
/// by name accepts (storage checks at upload what the runner will unpack).
fn unpacks_inside(bytes: &[u8]) -> Result<(), TestCaseError> {
    let root = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let dest = root.path().join("dest");
    let outside = root.path().join("outside");
    std::fs::create_dir(&dest).unwrap();
    std::fs::create_dir(&outside).unwrap();
    let unpacked = unpack(bytes, &dest, Limits::NONE, Links::Keep);
    let mut beside: Vec<_> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    beside.sort();
    prop_assert_eq!(beside, ["dest", "outside"]);
    prop_assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    let real_dest = std::fs::canonicalize(&dest).unwrap();
    let mut stack = vec![dest.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                stack.push(path);
            } else if meta.file_type().is_symlink()
                && let Ok(real) = std::fs::canonicalize(&path)
            {
                prop_assert!(
                    real.starts_with(&real_dest),
                    "`{}` leads to `{}`",
                    path.display(),
                    real.display()
                );
            }
        }
    }
    let measured = measure(bytes, Limits::NONE);
    prop_assert_eq!(
        unpacked.is_ok(),
        measured.is_ok(),
        "unpacking: {:?}, checking: {:?}",
        unpacked.as_ref().err(),
        measured.as_ref().err()
    );
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_bytes_are_refused_or_safe(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        check(&bytes, 64)?;
        check(&gz(&bytes), 64)?;
    }

    #[test]
    fn hostile_entries_never_escape(entries in prop::collection::vec(entry(), 1..8)) {
        // Checkpoints arrive as plain tars, everything else gzip'd: both are held to the same rules.
        check(&tar_bytes(&entries), 64)?;
        unpacks_inside(&tar_bytes(&entries))?;
        check(&gz(&tar_bytes(&entries)), 64)?;
        unpacks_inside(&gz(&tar_bytes(&entries)))?;
    }

    #[test]
    fn too_many_entries_are_refused(entries in prop::collection::vec(entry(), 1..12), max in 1usize..6) {
        for archive in [tar_bytes(&entries), gz(&tar_bytes(&entries))] {
            if let Some(count) = count(&archive, max) {
                prop_assert!(count <= max);
            }
            check(&archive, max)?;
        }
    }

    #[test]
    fn damaged_archives_are_refused_or_safe(
        entries in prop::collection::vec(entry(), 1..6),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut tar = tar_bytes(&entries);
        for (at, byte) in flips {
            let i = at.index(tar.len());
            tar[i] = byte;
        }
        check(&tar, 64)?;
        unpacks_inside(&tar)?;
        check(&gz(&tar), 64)?;
        unpacks_inside(&gz(&tar))?;
    }
}

/// The model flags what it must, so the properties above can fail.
#[test]
fn the_model_sees_escapes() {
    let model = |entries: &[(&str, Node)]| {
        Model::new(
            entries
                .iter()
                .map(|(p, n)| (p.to_string(), n.clone()))
                .collect(),
        )
    };
    assert!(
        model(&[("a", Node::Symlink("../x".into()))])
            .escape()
            .is_some()
    );
    assert!(
        model(&[
            ("d", Node::Symlink("e/..".into())),
            ("e", Node::Symlink("..".into())),
        ])
        .escape()
        .is_some()
    );
    assert!(
        model(&[
            ("d/s", Node::Symlink("../x".into())),
            ("h", Node::HardLink("d/s".into())),
        ])
        .escape()
        .is_some()
    );
    assert!(
        model(&[("l", Node::Symlink("/tmp".into())), ("l/f", Node::File),])
            .escape()
            .is_some()
    );
    assert!(
        model(&[
            ("d", Node::Dir),
            ("d/s", Node::Symlink("../f".into())),
            ("f", Node::File),
            ("h", Node::HardLink("f".into())),
        ])
        .escape()
        .is_none()
    );
}
