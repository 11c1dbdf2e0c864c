//! The containment rules every archive of the platform is held to, checked entry by entry as it streams
//! and by name alone (no file system): [`Checker`]. Unpacking ([`crate::unpack()`]) applies them before it
//! writes anything, and checks again on the tree it wrote.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

use crate::error::{ArchiveError, PathFault, Refusal, Special};

/// How much an archive may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most entries (files, directories, links; the root directory counts).
    pub max_entries: u64,
    /// Most bytes of file content once unpacked (a hard link counts as the copy unpacking makes of it).
    pub max_bytes: u64,
}

impl Limits {
    /// No limit: for archives whose size was bounded elsewhere.
    pub const NONE: Self = Self {
        max_entries: u64::MAX,
        max_bytes: u64::MAX,
    };
}

/// What a checked archive holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeSize {
    /// Entries (files, directories, links).
    pub entries: u64,
    /// Bytes of file content once unpacked.
    pub bytes: u64,
}

/// What a checked entry unpacks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A regular file of this many bytes.
    File(u64),
    Dir,
    /// A symlink with its target as written (relative, staying inside the tree by name).
    Symlink(PathBuf),
    /// A copy of the file at this normalized path, unpacked earlier, of this many bytes.
    HardLink(String, u64),
}

/// An entry that passed the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// Normalized `a/b/c` path below the root.
    pub path: String,
    pub kind: Kind,
}

/// Whether an entry is metadata for the reader rather than part of the tree (a PAX global header).
pub fn is_metadata(ty: EntryType) -> bool {
    ty.is_pax_global_extensions()
}

/// Turns an entry's path into a relative `a/b/c` path (dropping `.` components; empty for the root),
/// refusing absolute paths, `..` and names that are not UTF-8.
pub fn normalize(path: &Path) -> Result<String, PathFault> {
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_str().ok_or(PathFault::NotUtf8)?),
            Component::CurDir => {}
            Component::ParentDir => return Err(PathFault::Climbs),
            Component::RootDir | Component::Prefix(_) => return Err(PathFault::Absolute),
        }
    }
    Ok(parts.join("/"))
}

/// [`normalize`] of an entry's own path, refusing with the path as written.
pub fn entry_path<R: Read>(entry: &tar::Entry<'_, R>) -> Result<String, ArchiveError> {
    let raw = entry.path().map_err(ArchiveError::Unreadable)?;
    normalize(&raw).map_err(|fault| {
        Refusal::BadPath {
            entry: raw.display().to_string(),
            fault,
        }
        .into()
    })
}

/// Proper ancestors of `a/b/c`: `a`, `a/b`.
pub(crate) fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/').map(move |(i, _)| &path[..i])
}

/// Resolves a symlink's target against the link's directory by name. Returns the paths the resolution
/// walks through (which must not be links themselves, or the lexical answer would not be the real one)
/// and the path it names; refuses absolute targets and targets above the root.
fn resolve_symlink(link: &str, target: &Path) -> Result<(Vec<String>, String), Refusal> {
    let shown = || target.display().to_string();
    let mut at: Vec<&str> = link.split('/').collect();
    at.pop();
    let mut through = Vec::new();
    let mut last_pushed = false;
    for c in target.components() {
        match c {
            Component::Normal(s) => {
                let s = s.to_str().ok_or_else(|| Refusal::TargetNotUtf8 {
                    entry: link.to_string(),
                })?;
                at.push(s);
                through.push(at.join("/"));
                last_pushed = true;
            }
            Component::CurDir => {}
            Component::ParentDir => {
                if at.pop().is_none() {
                    return Err(Refusal::SymlinkOutside {
                        entry: link.to_string(),
                        target: shown(),
                    });
                }
                last_pushed = false;
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(Refusal::SymlinkAbsolute {
                    entry: link.to_string(),
                    target: shown(),
                });
            }
        }
    }
    if last_pushed {
        // The target itself may be a link (followed on its own); only what lies before it is walked through.
        through.pop();
    }
    Ok((through, at.join("/")))
}

/// Most links one resolution may follow, as the kernel allows (Linux: 40).
const MAX_LINK_HOPS: usize = 40;

/// What a path holds so far, as unpacking in order would leave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    Dir,
    File(u64),
    Symlink,
}

/// Checks an archive's entries in order against the limits and the containment rules: relative paths
/// without `..`, only files, directories and links, no device or pipe, no entry beneath a link or a file,
/// no file replacing a directory, symlinks that stay inside the tree by name and do not walk through
/// other links, hard links to a file placed before them. [`Checker::finish`] applies the rules that need
/// the whole archive.
#[derive(Debug)]
pub struct Checker {
    limits: Limits,
    size: TreeSize,
    nodes: HashMap<String, Node>,
    /// Every path a symlink was ever placed at (unpacking may leave it there).
    symlinks: HashSet<String>,
    placed: Vec<String>,
    /// (link, path its target walks through), checked once every link is known.
    walks: Vec<(String, String)>,
    /// The path each symlink names, followed once every link is known.
    targets: HashMap<String, String>,
    hard_targets: Vec<(String, String)>,
}

impl Checker {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            size: TreeSize::default(),
            nodes: HashMap::new(),
            symlinks: HashSet::new(),
            placed: Vec::new(),
            walks: Vec::new(),
            targets: HashMap::new(),
            hard_targets: Vec::new(),
        }
    }

    /// Checks the next entry. `None` for what unpacks to nothing (a PAX global header, the root directory).
    pub fn entry<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
    ) -> Result<Option<Checked>, ArchiveError> {
        let ty = entry.header().entry_type();
        if is_metadata(ty) {
            return Ok(None);
        }
        self.size.entries += 1;
        if self.size.entries > self.limits.max_entries {
            return Err(ArchiveError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        let path = entry_path(entry)?;
        let kind = self.kind(entry, ty, &path)?;
        if path.is_empty() {
            return match kind {
                Kind::Dir => Ok(None),
                _ => Err(Refusal::EmptyName.into()),
            };
        }
        self.check_place(&path, &kind)?;
        let adding = match kind {
            Kind::File(n) | Kind::HardLink(_, n) => n,
            Kind::Dir | Kind::Symlink(_) => 0,
        };
        self.size.bytes = self.size.bytes.saturating_add(adding);
        if self.size.bytes > self.limits.max_bytes {
            return Err(ArchiveError::TooLarge {
                limit: self.limits.max_bytes,
                reached: self.size.bytes,
            });
        }
        self.record(&path, &kind);
        Ok(Some(Checked { path, kind }))
    }

    /// The entry's kind, refusing kinds no tree holds and links leading outside by name.
    fn kind<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        ty: EntryType,
        path: &str,
    ) -> Result<Kind, ArchiveError> {
        let target = |hard| -> Result<PathBuf, ArchiveError> {
            entry
                .link_name()
                .map_err(ArchiveError::Unreadable)?
                .map(|t| t.into_owned())
                .filter(|t| !t.as_os_str().is_empty())
                .ok_or_else(|| {
                    Refusal::NoTarget {
                        entry: path.to_string(),
                        hard,
                    }
                    .into()
                })
        };
        let refuse = |r: Refusal| Err(r.into());
        match ty {
            EntryType::Regular | EntryType::Continuous => Ok(Kind::File(entry.size())),
            EntryType::Directory => Ok(Kind::Dir),
            EntryType::Symlink => {
                let target = target(false)?;
                let (walks, names) = resolve_symlink(path, &target)?;
                for through in walks {
                    self.walks.push((path.to_string(), through));
                }
                self.targets.insert(path.to_string(), names);
                Ok(Kind::Symlink(target))
            }
            EntryType::Link => {
                let raw = target(true)?;
                let target = normalize(&raw).map_err(|fault| Refusal::HardLinkOutside {
                    entry: path.to_string(),
                    target: raw.display().to_string(),
                    fault,
                })?;
                let size = self.hard_link_source(path, &target)?;
                self.hard_targets.push((path.to_string(), target.clone()));
                Ok(Kind::HardLink(target, size))
            }
            EntryType::Char | EntryType::Block => refuse(Refusal::Special {
                entry: path.to_string(),
                kind: Special::Device,
            }),
            EntryType::Fifo => refuse(Refusal::Special {
                entry: path.to_string(),
                kind: Special::Fifo,
            }),
            other => refuse(Refusal::Unsupported {
                entry: path.to_string(),
                kind: format!("{other:?}"),
            }),
        }
    }

    /// The size of the file a hard link at `path` copies: a file placed earlier, reached through no link.
    fn hard_link_source(&self, path: &str, target: &str) -> Result<u64, Refusal> {
        let entry = path.to_string();
        if self.nodes.get(target) == Some(&Node::Symlink) {
            return Err(Refusal::HardLinkToSymlink {
                entry,
                target: target.to_string(),
            });
        }
        if let Some(link) = ancestors(target).find(|a| self.symlinks.contains(*a)) {
            return Err(Refusal::HardLinkThroughSymlink {
                entry,
                link: link.to_string(),
            });
        }
        match self.nodes.get(target) {
            Some(Node::File(size)) => Ok(*size),
            _ => Err(Refusal::HardLinkNotAFile {
                entry,
                target: target.to_string(),
            }),
        }
    }

    /// Refuses an entry written beneath a link or a file, or a non-directory replacing a directory.
    fn check_place(&self, path: &str, kind: &Kind) -> Result<(), Refusal> {
        let entry = || path.to_string();
        for a in ancestors(path) {
            if self.symlinks.contains(a) {
                return Err(Refusal::BeneathSymlink {
                    entry: entry(),
                    link: a.to_string(),
                });
            }
            if let Some(Node::File(_)) = self.nodes.get(a) {
                return Err(Refusal::BeneathFile {
                    entry: entry(),
                    file: a.to_string(),
                });
            }
        }
        match (self.nodes.get(path), kind) {
            (Some(Node::Dir), Kind::Dir) | (None, _) => Ok(()),
            (Some(Node::Dir), _) => Err(Refusal::ReplacesDirectory { entry: entry() }),
            (Some(Node::Symlink), Kind::Dir) => Err(Refusal::BeneathSymlink {
                entry: entry(),
                link: entry(),
            }),
            (Some(Node::File(_)), Kind::Dir) => Err(Refusal::BeneathFile {
                entry: entry(),
                file: entry(),
            }),
            (Some(_), _) => Ok(()),
        }
    }

    fn record(&mut self, path: &str, kind: &Kind) {
        for a in ancestors(path) {
            self.nodes.entry(a.to_string()).or_insert(Node::Dir);
        }
        let node = match kind {
            Kind::Dir => Node::Dir,
            Kind::File(n) | Kind::HardLink(_, n) => Node::File(*n),
            Kind::Symlink(_) => {
                self.symlinks.insert(path.to_string());
                Node::Symlink
            }
        };
        self.nodes.insert(path.to_string(), node);
        self.placed.push(path.to_string());
    }

    /// Follows the symlink at `link` through the links it names in turn, refusing a loop or a chain
    /// longer than the kernel follows.
    fn follow(&self, link: &str) -> Result<(), Refusal> {
        let mut at = link;
        // The link itself, then each hop to a link it names.
        for _ in 0..MAX_LINK_HOPS + 2 {
            if self.nodes.get(at) != Some(&Node::Symlink) {
                return Ok(());
            }
            match self.targets.get(at) {
                Some(next) => at = next,
                None => return Ok(()),
            }
        }
        Err(Refusal::SymlinkLoop {
            entry: link.to_string(),
        })
    }

    /// The rules that need every entry: nothing lies beneath a link placed later, no symlink's target
    /// walks through another link or loops, no hard link names a link. Returns what the archive holds.
    pub fn finish(self) -> Result<TreeSize, Refusal> {
        let is_link = |p: &str| self.symlinks.contains(p);
        for path in &self.placed {
            if let Some(link) = ancestors(path).find(|a| is_link(a)) {
                return Err(Refusal::BeneathSymlink {
                    entry: path.clone(),
                    link: link.to_string(),
                });
            }
        }
        for (entry, through) in &self.walks {
            if let Some(link) = std::iter::once(through.as_str())
                .chain(ancestors(through))
                .find(|a| is_link(a))
            {
                return Err(Refusal::SymlinkThroughSymlink {
                    entry: entry.clone(),
                    link: link.to_string(),
                });
            }
        }
        let mut links: Vec<&String> = self.targets.keys().collect();
        links.sort();
        for link in links {
            self.follow(link)?;
        }
        for (entry, target) in &self.hard_targets {
            if is_link(target) {
                return Err(Refusal::HardLinkToSymlink {
                    entry: entry.clone(),
                    target: target.clone(),
                });
            }
            if let Some(link) = ancestors(target).find(|a| is_link(a)) {
                return Err(Refusal::HardLinkThroughSymlink {
                    entry: entry.clone(),
                    link: link.to_string(),
                });
            }
        }
        Ok(self.size)
    }
}

/// Most bytes read past the end of an archive's entries to reach the end of its gzip stream (tar writers
/// pad to records of 10 KiB; anything far larger is not padding).
const MAX_TRAILER_BYTES: u64 = 1 << 20;

/// Reads what follows the last entry, so that gzip checks its trailer: a truncated or corrupted stream
/// fails here. More than [`MAX_TRAILER_BYTES`] after the end is refused unread.
pub(crate) fn read_trailer(mut rest: impl Read) -> Result<(), ArchiveError> {
    let read = std::io::copy(
        &mut (&mut rest).take(MAX_TRAILER_BYTES + 1),
        &mut std::io::sink(),
    )
    .map_err(ArchiveError::Unreadable)?;
    if read > MAX_TRAILER_BYTES {
        return Err(ArchiveError::Unreadable(std::io::Error::other(
            "data follows the end of the archive",
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalized() {
        assert_eq!(normalize(Path::new("./a/./b")), Ok("a/b".into()));
        assert_eq!(normalize(Path::new("./")), Ok(String::new()));
        assert_eq!(
            normalize(Path::new("/etc/passwd")),
            Err(PathFault::Absolute)
        );
        assert_eq!(normalize(Path::new("a/../../b")), Err(PathFault::Climbs));
    }

    #[test]
    fn link_targets_are_checked_by_name() {
        let ok = |rel: &str, t: &str| resolve_symlink(rel, Path::new(t)).map(|_| ());
        assert!(ok("a/link", "../b").is_ok());
        assert!(ok("a/link", "../../b").is_err());
        assert!(ok("link", "/etc").is_err());
        assert!(ok("link", "./x/../y").is_ok());
        let (through, names) = resolve_symlink("a/l", Path::new("../b/c/d")).unwrap();
        assert_eq!(
            (through, names),
            (vec!["b".into(), "b/c".into()], "b/c/d".into())
        );
    }
}
