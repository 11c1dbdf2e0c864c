//! Safe extraction as the runner does it: what hostile archives try, that nothing lands outside the
//! destination, and the runner's words for each refusal (the rules themselves are `nsml_archive`'s and
//! tested there).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::fs;
use std::os::unix::fs::PermissionsExt;

use flate2::Compression;
use flate2::write::GzEncoder;
use nsml_runner::archive::{ExtractLimits, extract_archive, pack_dir};
use tar::{EntryType, Header};

/// One raw tar entry; names are written byte for byte, bypassing `tar`'s own path checks.
struct Raw<'a> {
    name: &'a str,
    kind: EntryType,
    link: &'a str,
    data: &'a [u8],
    mode: u32,
}

fn entry<'a>(name: &'a str, kind: EntryType) -> Raw<'a> {
    Raw {
        name,
        kind,
        link: "",
        data: b"",
        mode: if kind == EntryType::Directory {
            0o755
        } else {
            0o644
        },
    }
}

fn file<'a>(name: &'a str, data: &'a [u8]) -> Raw<'a> {
    Raw {
        data,
        ..entry(name, EntryType::Regular)
    }
}

fn link<'a>(name: &'a str, kind: EntryType, target: &'a str) -> Raw<'a> {
    Raw {
        link: target,
        ..entry(name, kind)
    }
}

fn tar_gz(entries: &[Raw]) -> Vec<u8> {
    let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    for e in entries {
        let mut h = Header::new_gnu();
        {
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..e.name.len()].copy_from_slice(e.name.as_bytes());
            gnu.linkname[..e.link.len()].copy_from_slice(e.link.as_bytes());
        }
        h.set_entry_type(e.kind);
        h.set_size(e.data.len() as u64);
        h.set_mode(e.mode);
        h.set_cksum();
        b.append(&h, e.data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

/// Extracts into `root/dest`; `root/outside` is a sibling that must stay empty.
fn extract(entries: &[Raw]) -> (tempfile::TempDir, Result<(), String>) {
    extract_with(entries, ExtractLimits::CODE)
}

fn extract_with(entries: &[Raw], limits: ExtractLimits) -> (tempfile::TempDir, Result<(), String>) {
    let root = tempfile::tempdir().unwrap();
    fs::create_dir(root.path().join("dest")).unwrap();
    fs::create_dir(root.path().join("outside")).unwrap();
    let bytes = tar_gz(entries);
    let res = extract_archive(&bytes[..], &root.path().join("dest"), limits)
        .map(|_| ())
        .map_err(|e| e.to_string());
    let outside: Vec<_> = fs::read_dir(root.path().join("outside")).unwrap().collect();
    assert!(
        outside.is_empty(),
        "something was written outside the destination"
    );
    assert!(
        !root.path().join("evil").exists(),
        "something was written next to the destination"
    );
    (root, res)
}

fn refused(entries: &[Raw], why: &str) {
    let (_root, res) = extract(entries);
    let err = res.expect_err("a hostile archive was accepted");
    assert!(err.contains(why), "expected `{why}` in `{err}`");
}

#[test]
fn extracts_an_ordinary_archive() {
    let (root, res) = extract(&[
        entry("./", EntryType::Directory),
        entry("./pkg/", EntryType::Directory),
        file("./main.py", b"print('hi')\n"),
        Raw {
            mode: 0o4755,
            ..file("pkg/run.sh", b"#!/bin/sh\n")
        },
        link("pkg/link", EntryType::Symlink, "../main.py"),
        link("pkg/copy.py", EntryType::Link, "main.py"),
    ]);
    res.unwrap();
    let dest = root.path().join("dest");
    assert_eq!(
        fs::read_to_string(dest.join("main.py")).unwrap(),
        "print('hi')\n"
    );
    assert_eq!(
        fs::read_to_string(dest.join("pkg/link")).unwrap(),
        "print('hi')\n"
    );
    assert_eq!(
        fs::read_to_string(dest.join("pkg/copy.py")).unwrap(),
        "print('hi')\n"
    );
    let mode = fs::metadata(dest.join("pkg/run.sh"))
        .unwrap()
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o755, "executable kept, set-uid dropped");
    // The hard link became a copy: writing one does not change the other.
    fs::write(dest.join("pkg/copy.py"), "changed").unwrap();
    assert_eq!(
        fs::read_to_string(dest.join("main.py")).unwrap(),
        "print('hi')\n"
    );
}

#[test]
fn refuses_absolute_paths() {
    refused(&[file("/evil", b"x")], "absolute path");
}

#[test]
fn refuses_parent_directory_paths() {
    refused(&[file("../evil", b"x")], "`..`");
    refused(&[file("a/../../evil", b"x")], "`..`");
    refused(&[file("./../outside/x", b"x")], "`..`");
}

#[test]
fn refuses_symlinks_pointing_outside() {
    refused(
        &[link("l", EntryType::Symlink, "/etc/passwd")],
        "absolute target",
    );
    refused(
        &[link("l", EntryType::Symlink, "../outside")],
        "outside the archive",
    );
    refused(
        &[link("a/b/l", EntryType::Symlink, "../../../outside")],
        "outside the archive",
    );
}

#[test]
fn refuses_writing_through_a_symlink() {
    // The link itself stays inside, but a later entry must not be written through it.
    refused(
        &[
            entry("sub/", EntryType::Directory),
            link("l", EntryType::Symlink, "sub"),
            file("l/x", b"x"),
        ],
        "passes through a symlink",
    );
    // A link replaced by a file of the same name is fine; a file written through a link is not.
    refused(
        &[link("up", EntryType::Symlink, "."), file("up/up/x", b"x")],
        "passes through a symlink",
    );
}

#[test]
fn refuses_symlink_chains_that_escape() {
    // `a -> .` and `b -> a/..` look harmless by name but `b` resolves to the parent of the root.
    refused(
        &[
            link("a", EntryType::Symlink, "."),
            link("b", EntryType::Symlink, "a/../outside"),
        ],
        "resolves outside",
    );
    // A link re-aimed by a later entry is checked after the whole archive.
    refused(
        &[
            entry("d/", EntryType::Directory),
            entry("d/e/", EntryType::Directory),
            link("x", EntryType::Symlink, "d/e"),
            link("y", EntryType::Symlink, "x/../../.."),
        ],
        "outside",
    );
}

#[test]
fn refuses_hard_links_outside_or_to_nothing() {
    refused(
        &[link("h", EntryType::Link, "/etc/passwd")],
        "absolute path",
    );
    refused(&[link("h", EntryType::Link, "../outside/x")], "`..`");
    refused(
        &[link("h", EntryType::Link, "missing")],
        "not a file extracted earlier",
    );
    // A hard link through a symlink would read outside: refused.
    refused(
        &[
            link("l", EntryType::Symlink, "."),
            link("h", EntryType::Link, "l/anything"),
        ],
        "not a file extracted earlier",
    );
}

#[test]
fn refuses_devices_and_fifos() {
    refused(&[entry("null", EntryType::Char)], "device file");
    refused(&[entry("sda", EntryType::Block)], "device file");
    refused(&[entry("pipe", EntryType::Fifo)], "FIFO");
}

#[test]
fn refuses_archives_past_the_limits() {
    let limits = ExtractLimits {
        max_bytes: 10,
        max_entries: 100,
    };
    let (_r, res) = extract_with(&[file("a", b"123456"), file("b", b"123456")], limits);
    assert!(res.unwrap_err().contains("limit of 10 bytes"));
    let limits = ExtractLimits {
        max_bytes: 1000,
        max_entries: 2,
    };
    let (_r, res) = extract_with(&[file("a", b"1"), file("b", b"2"), file("c", b"3")], limits);
    assert!(res.unwrap_err().contains("limit of 2 entries"));
}

#[test]
fn packs_without_following_symlinks_and_round_trips() {
    let src = tempfile::tempdir().unwrap();
    let secret = tempfile::tempdir().unwrap();
    fs::write(secret.path().join("secret"), "do not pack me").unwrap();
    fs::create_dir(src.path().join("sub")).unwrap();
    fs::write(src.path().join("sub/model.bin"), [1u8, 2, 3]).unwrap();
    fs::write(src.path().join("run.sh"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(src.path().join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(secret.path().join("secret"), src.path().join("leak")).unwrap();
    std::os::unix::fs::symlink("sub/model.bin", src.path().join("alias")).unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(src.path().join("a.sock")).unwrap();

    let packed = pack_dir(src.path(), Vec::new()).unwrap();
    let mut names = Vec::new();
    let mut ar = tar::Archive::new(&packed[..]);
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let mut body = String::new();
        std::io::Read::read_to_string(&mut e, &mut body).ok();
        assert!(!body.contains("do not pack me"), "a symlink was followed");
        names.push(e.path().unwrap().display().to_string());
    }
    names.sort();
    assert_eq!(names, ["alias", "leak", "run.sh", "sub", "sub/model.bin"]);

    // Unpacking refuses the link that points outside, and accepts the rest.
    let dest = tempfile::tempdir().unwrap();
    let err = extract_archive(&packed[..], dest.path(), ExtractLimits::CHECKPOINT).unwrap_err();
    assert!(err.to_string().contains("absolute target"), "{err}");
    fs::remove_file(src.path().join("leak")).unwrap();
    let packed = pack_dir(src.path(), Vec::new()).unwrap();
    let dest = tempfile::tempdir().unwrap();
    extract_archive(&packed[..], dest.path(), ExtractLimits::CHECKPOINT).unwrap();
    assert_eq!(fs::read(dest.path().join("alias")).unwrap(), [1, 2, 3]);
    let mode = fs::metadata(dest.path().join("run.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o111, 0o111);
}

/// Runs `f` on a thread of its own as the unprivileged `nobody` when the test runs as root (the
/// uid is per thread on Linux), so that permissions bind as they do for a runner that is not root.
fn as_unprivileged<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        if rustix::process::geteuid().is_root() {
            use rustix::process::{Gid, Uid};
            rustix::thread::set_thread_res_gid(None, Gid::from_raw(65534), None).unwrap();
            rustix::thread::set_thread_res_uid(None, Uid::from_raw(65534), None).unwrap();
        }
        f()
    })
    .join()
    .unwrap()
}

/// A temporary directory `nobody` may write into, with the tree under `tree/` made by `make` as
/// that user.
fn unprivileged_tree(make: impl FnOnce(&std::path::Path) + Send + 'static) -> tempfile::TempDir {
    let top = tempfile::tempdir().unwrap();
    if rustix::process::geteuid().is_root() {
        use rustix::process::{Gid, Uid};
        rustix::fs::chown(
            top.path(),
            Some(Uid::from_raw(65534)),
            Some(Gid::from_raw(65534)),
        )
        .unwrap();
    }
    let tree = top.path().join("tree");
    as_unprivileged(move || {
        fs::create_dir(&tree).unwrap();
        make(&tree);
    });
    top
}

#[test]
fn a_tree_the_session_made_read_only_is_removed() {
    let top = unprivileged_tree(|tree| {
        fs::create_dir_all(tree.join("out/locked/deep")).unwrap();
        fs::write(tree.join("out/locked/deep/weights.bin"), [0u8; 64]).unwrap();
        fs::write(tree.join("out/locked/ro.txt"), "x").unwrap();
        fs::create_dir(tree.join("sealed")).unwrap();
        fs::write(tree.join("sealed/f"), "x").unwrap();
        for (d, mode) in [
            ("out/locked/deep", 0o500),
            ("out/locked", 0o555),
            ("sealed", 0o000),
            ("", 0o500),
        ] {
            fs::set_permissions(tree.join(d), fs::Permissions::from_mode(mode)).unwrap();
        }
    });
    let tree = top.path().join("tree");
    let gone = tree.clone();
    let removed = as_unprivileged(move || nsml_runner::archive::remove_tree_now(&gone));
    assert!(removed.is_ok(), "{removed:?}");
    assert!(!tree.exists(), "the tree is gone");
    // Removing what is already gone succeeds.
    nsml_runner::archive::remove_tree_now(&tree).unwrap();
}

#[test]
fn removal_never_follows_a_symlink_out_of_the_tree() {
    let outside = tempfile::tempdir().unwrap();
    fs::create_dir(outside.path().join("keep")).unwrap();
    fs::write(outside.path().join("keep/precious"), "x").unwrap();
    fs::set_permissions(
        outside.path().join("keep"),
        fs::Permissions::from_mode(0o555),
    )
    .unwrap();
    let target = outside.path().to_path_buf();
    let top = unprivileged_tree(move |tree| {
        std::os::unix::fs::symlink(&target, tree.join("escape")).unwrap();
        std::os::unix::fs::symlink(target.join("keep"), tree.join("escape-dir")).unwrap();
        fs::create_dir(tree.join("ro")).unwrap();
        std::os::unix::fs::symlink(target.join("keep/precious"), tree.join("ro/file")).unwrap();
        fs::set_permissions(tree.join("ro"), fs::Permissions::from_mode(0o500)).unwrap();
    });
    let tree = top.path().join("tree");
    nsml_runner::archive::remove_tree_now(&tree).unwrap();
    assert!(!tree.exists());
    assert_eq!(
        fs::read_to_string(outside.path().join("keep/precious")).unwrap(),
        "x"
    );
    let mode = fs::metadata(outside.path().join("keep"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o555, "the link's target kept its mode");

    // A link given as the path itself is removed, its target left alone.
    let link = top.path().join("link");
    std::os::unix::fs::symlink(outside.path(), &link).unwrap();
    nsml_runner::archive::remove_tree_now(&link).unwrap();
    assert!(fs::symlink_metadata(&link).is_err());
    assert!(outside.path().join("keep/precious").exists());
}
