//! Unpacking: what hostile archives try, and that nothing lands outside the destination.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

#[path = "support/raw.rs"]
mod raw;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use flate2::Compression;
use flate2::write::GzEncoder;
use nsml_archive::{ArchiveError, Limits, Links, PathFault, Refusal, Special, first_file, unpack};
use raw::{Raw, dir, entry, file, hard_link, symlink, tar_gz};
use tar::{EntryType, Header};

const LIMITS: Limits = Limits {
    max_entries: 1000,
    max_bytes: 1 << 20,
};

/// Unpacks into `root/dest`; `root/outside` is a sibling that must stay empty.
fn unpack_with(
    entries: &[Raw],
    limits: Limits,
    links: Links,
) -> (
    tempfile::TempDir,
    Result<nsml_archive::Unpacked, ArchiveError>,
) {
    let root = tempfile::tempdir().unwrap();
    fs::create_dir(root.path().join("dest")).unwrap();
    fs::create_dir(root.path().join("outside")).unwrap();
    let bytes = tar_gz(entries);
    let res = unpack(&bytes[..], &root.path().join("dest"), limits, links);
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

fn refused(entries: &[Raw]) -> Refusal {
    let (_root, res) = unpack_with(entries, LIMITS, Links::Keep);
    match res {
        Err(ArchiveError::Refused(r)) => r,
        other => panic!("a hostile archive was not refused: {other:?}"),
    }
}

#[test]
fn unpacks_an_ordinary_archive() {
    let (root, res) = unpack_with(
        &[
            dir("./"),
            dir("./pkg/"),
            file("./main.py", b"print('hi')\n"),
            Raw {
                mode: 0o4755,
                ..file("pkg/run.sh", b"#!/bin/sh\n")
            },
            symlink("pkg/link", "../main.py"),
            hard_link("pkg/copy.py", "main.py"),
        ],
        LIMITS,
        Links::Keep,
    );
    let done = res.unwrap();
    assert_eq!((done.entries, done.files, done.bytes), (6, 3, 34));
    let dest = root.path().join("dest");
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
    let mode = fs::metadata(dest.join("main.py"))
        .unwrap()
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o644);
    // The hard link became a copy: writing one does not change the other.
    fs::write(dest.join("pkg/copy.py"), "changed").unwrap();
    assert_eq!(
        fs::read_to_string(dest.join("main.py")).unwrap(),
        "print('hi')\n"
    );
}

#[test]
fn refuses_paths_outside() {
    let bad = |r: Refusal, f: PathFault| matches!(r, Refusal::BadPath { fault, .. } if fault == f);
    assert!(bad(refused(&[file("/evil", b"x")]), PathFault::Absolute));
    assert!(bad(refused(&[file("../evil", b"x")]), PathFault::Climbs));
    assert!(bad(
        refused(&[file("a/../../evil", b"x")]),
        PathFault::Climbs
    ));
    assert!(bad(
        refused(&[file("./../outside/x", b"x")]),
        PathFault::Climbs
    ));
    assert_eq!(refused(&[file(".", b"x")]), Refusal::EmptyName);
}

#[test]
fn refuses_symlinks_pointing_outside() {
    let r = refused(&[symlink("l", "/etc/passwd")]);
    assert!(matches!(r, Refusal::SymlinkAbsolute { .. }), "{r}");
    let r = refused(&[symlink("l", "../outside")]);
    assert!(matches!(r, Refusal::SymlinkOutside { .. }), "{r}");
    let r = refused(&[symlink("a/b/l", "../../../outside")]);
    assert!(matches!(r, Refusal::SymlinkOutside { .. }), "{r}");
}

#[test]
fn refuses_writing_through_a_symlink_or_a_file() {
    // The link itself stays inside, but a later entry must not be written through it.
    let r = refused(&[dir("sub/"), symlink("l", "sub"), file("l/x", b"x")]);
    assert!(matches!(r, Refusal::BeneathSymlink { .. }), "{r}");
    let r = refused(&[symlink("up", "."), file("up/up/x", b"x")]);
    assert!(matches!(r, Refusal::BeneathSymlink { .. }), "{r}");
    let r = refused(&[symlink("up", "."), dir("up/")]);
    assert!(matches!(r, Refusal::BeneathSymlink { .. }), "{r}");
    let r = refused(&[file("f", b"x"), file("f/x", b"x")]);
    assert!(matches!(r, Refusal::BeneathFile { .. }), "{r}");
    let r = refused(&[dir("d/"), file("d", b"x")]);
    assert!(matches!(r, Refusal::ReplacesDirectory { .. }), "{r}");
}

#[test]
fn refuses_symlink_chains_that_escape() {
    // `a -> .` and `b -> a/..` look harmless by name but `b` resolves to the parent of the root.
    let r = refused(&[symlink("a", "."), symlink("b", "a/../outside")]);
    assert!(matches!(r, Refusal::ResolvesOutside { .. }), "{r}");
    // A link re-aimed by a later entry is checked after the whole archive.
    let r = refused(&[
        dir("d/"),
        dir("d/e/"),
        symlink("x", "d/e"),
        symlink("y", "x/../../.."),
    ]);
    assert!(matches!(r, Refusal::SymlinkOutside { .. }), "{r}");
    // A loop, and a chain longer than the kernel follows, are refused as unpacking finds them.
    let r = refused(&[symlink("c", "a/../c")]);
    assert!(matches!(r, Refusal::SymlinkLoop { .. }), "{r}");
    let names: Vec<String> = (0..=42).map(|i| format!("l{i}")).collect();
    let chain: Vec<Raw> = names.windows(2).map(|w| symlink(&w[0], &w[1])).collect();
    let r = refused(&chain);
    assert!(matches!(r, Refusal::SymlinkLoop { .. }), "{r}");
    let (_root, res) = unpack_with(&chain[1..], LIMITS, Links::Keep);
    assert!(res.is_ok(), "{res:?}");
    // Walking through another link is refused even where it would stay inside.
    let r = refused(&[dir("d/"), symlink("x", "d"), symlink("y", "x/f")]);
    assert!(matches!(r, Refusal::SymlinkThroughSymlink { .. }), "{r}");
}

#[test]
fn refuses_hard_links_outside_or_to_nothing() {
    let r = refused(&[hard_link("h", "/etc/passwd")]);
    assert!(
        matches!(
            r,
            Refusal::HardLinkOutside {
                fault: PathFault::Absolute,
                ..
            }
        ),
        "{r}"
    );
    let r = refused(&[hard_link("h", "../outside/x")]);
    assert!(
        matches!(
            r,
            Refusal::HardLinkOutside {
                fault: PathFault::Climbs,
                ..
            }
        ),
        "{r}"
    );
    let r = refused(&[hard_link("h", "missing")]);
    assert!(matches!(r, Refusal::HardLinkNotAFile { .. }), "{r}");
    // A hard link through a symlink would read outside: refused.
    let r = refused(&[symlink("l", "."), hard_link("h", "l/anything")]);
    assert!(matches!(r, Refusal::HardLinkThroughSymlink { .. }), "{r}");
}

#[test]
fn refuses_devices_and_fifos() {
    let special = |r: Refusal, k: Special| matches!(r, Refusal::Special { kind, .. } if kind == k);
    assert!(special(
        refused(&[entry("null", EntryType::Char)]),
        Special::Device
    ));
    assert!(special(
        refused(&[entry("sda", EntryType::Block)]),
        Special::Device
    ));
    assert!(special(
        refused(&[entry("pipe", EntryType::Fifo)]),
        Special::Fifo
    ));
}

#[test]
fn refuses_archives_past_the_limits() {
    let limits = Limits {
        max_bytes: 10,
        max_entries: 100,
    };
    let (_r, res) = unpack_with(
        &[file("a", b"123456"), file("b", b"123456")],
        limits,
        Links::Keep,
    );
    assert!(matches!(
        res,
        Err(ArchiveError::TooLarge {
            limit: 10,
            reached: 12
        })
    ));
    let (_r, res) = unpack_with(
        &[file("a", b"123456"), hard_link("b", "a")],
        limits,
        Links::Keep,
    );
    assert!(matches!(res, Err(ArchiveError::TooLarge { limit: 10, .. })));
    let limits = Limits {
        max_bytes: 1000,
        max_entries: 2,
    };
    let (_r, res) = unpack_with(
        &[file("a", b"1"), file("b", b"2"), file("c", b"3")],
        limits,
        Links::Keep,
    );
    assert!(matches!(
        res,
        Err(ArchiveError::TooManyEntries { limit: 2 })
    ));
}

#[test]
fn refuses_a_truncated_stream() {
    let bytes = tar_gz(&[file("a", &[7u8; 100_000])]);
    let dest = tempfile::tempdir().unwrap();
    let cut = &bytes[..bytes.len() / 2];
    assert!(matches!(
        unpack(cut, dest.path(), LIMITS, Links::Keep),
        Err(ArchiveError::Unreadable(_))
    ));
    // Cut in the gzip trailer only: every entry reads, the checksum does not.
    let dest = tempfile::tempdir().unwrap();
    let cut = &bytes[..bytes.len() - 4];
    assert!(unpack(cut, dest.path(), LIMITS, Links::Keep).is_err());
}

#[test]
fn a_gnu_long_name_still_gets_checked() {
    // Paths longer than 100 bytes travel in an extra GNU entry; the check applies to the full name.
    let long = format!("{}/../../evil", "d/".repeat(60));
    let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    let mut h = Header::new_gnu();
    h.set_size(1);
    h.set_entry_type(EntryType::Regular);
    // `append_data` writes a GNU long-name entry but refuses `..`: write it by hand.
    let mut ln = Header::new_gnu();
    ln.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
    ln.set_entry_type(EntryType::GNULongName);
    ln.set_size(long.len() as u64 + 1);
    ln.set_cksum();
    let mut name = long.clone().into_bytes();
    name.push(0);
    b.append(&ln, &name[..]).unwrap();
    h.as_gnu_mut().unwrap().name[..5].copy_from_slice(b"short");
    h.set_cksum();
    b.append(&h, &b"x"[..]).unwrap();
    let bytes = b.into_inner().unwrap().finish().unwrap();
    let dest = tempfile::tempdir().unwrap();
    let err = unpack(&bytes[..], dest.path(), LIMITS, Links::Keep).unwrap_err();
    assert!(err.to_string().contains("`..`"), "{err}");
}

#[test]
fn links_can_be_left_out_by_name() {
    let (root, res) = unpack_with(
        &[
            file("a", b"1"),
            symlink("link", "/etc/passwd"),
            hard_link("copy", "a"),
        ],
        LIMITS,
        Links::Skip,
    );
    let done = res.unwrap();
    assert_eq!(done.skipped, ["link", "copy"]);
    assert_eq!(done.files, 1);
    assert!(fs::symlink_metadata(root.path().join("dest/link")).is_err());
    // Their own names are still held to the rules.
    let (_root, res) = unpack_with(&[symlink("../link", "a")], LIMITS, Links::Skip);
    assert!(matches!(
        res,
        Err(ArchiveError::Refused(Refusal::BadPath {
            fault: PathFault::Climbs,
            ..
        }))
    ));
}

#[test]
fn an_earlier_file_of_the_same_name_is_replaced() {
    let (root, res) = unpack_with(
        &[
            file("a", b"old"),
            symlink("b", "a"),
            file("b", b"new"),
            file("a", b"newer"),
        ],
        LIMITS,
        Links::Keep,
    );
    res.unwrap();
    let dest = root.path().join("dest");
    assert_eq!(fs::read_to_string(dest.join("a")).unwrap(), "newer");
    assert!(fs::symlink_metadata(dest.join("b")).unwrap().is_file());
}

#[test]
fn the_first_file_is_read_within_a_cap() {
    let bytes = tar_gz(&[
        dir("d/"),
        file("d/labels.csv", b"id,label\n1,0\n"),
        file("x", b"y"),
    ]);
    assert_eq!(first_file(&bytes[..], 100).unwrap(), "id,label\n1,0\n");
    assert!(matches!(
        first_file(&bytes[..], 4),
        Err(ArchiveError::FileTooLarge { limit: 4, .. })
    ));
    let empty = tar_gz(&[dir("d/")]);
    assert!(matches!(
        first_file(&empty[..], 100),
        Err(ArchiveError::NoFile)
    ));
}
