//! Checking an archive without unpacking it: the containment rules by name, and the measuring of what it
//! expands to while it streams.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

#[path = "support/raw.rs"]
mod raw;

use nsml_archive::{ArchiveError, Limits, Refusal, TreeSize, measure};
use raw::{Raw, dir, entry, file, hard_link, symlink, tar_gz};
use tar::EntryType;

fn check(entries: &[Raw]) -> Result<u64, String> {
    let limits = Limits {
        max_entries: 100,
        max_bytes: u64::MAX,
    };
    measure(&tar_gz(entries)[..], limits)
        .map(|t| t.entries)
        .map_err(|e| e.to_string())
}

fn measured(entries: &[Raw], max_bytes: u64) -> Result<TreeSize, String> {
    let limits = Limits {
        max_entries: 100,
        max_bytes,
    };
    measure(&tar_gz(entries)[..], limits).map_err(|e| match e {
        ArchiveError::TooLarge { reached, .. } => format!("over at {reached}"),
        other => other.to_string(),
    })
}

#[test]
fn a_tree_is_measured_by_its_unpacked_content_and_stopped_at_the_cap() {
    let tree = [
        dir("d"),
        file("d/a", &[7; 300]),
        symlink("l", "d/a"),
        hard_link("h", "d/a"),
        file("b", &[1; 50]),
    ];
    // A hard link unpacks to a copy; directories and symlinks hold no content.
    assert_eq!(
        measured(&tree, 650),
        Ok(TreeSize {
            entries: 5,
            bytes: 650
        })
    );
    // The entry that crosses the cap stops the reading, with the total so far.
    assert_eq!(measured(&tree, 649), Err("over at 650".into()));
    assert_eq!(measured(&tree, 599), Err("over at 600".into()));
    assert_eq!(measured(&tree, 299), Err("over at 300".into()));
    // The safety rules still come first for the entries read.
    assert!(
        measured(&[file("../x", b"1")], 10)
            .unwrap_err()
            .contains("`..`")
    );
}

#[test]
fn plain_trees_and_inside_links_pass() {
    assert_eq!(
        check(&[
            dir("./"),
            file("main.py", b"print(1)"),
            file("lib/a.py", b""),
            symlink("lib/b.py", "a.py"),
            symlink("lib/c.py", "../main.py"),
            symlink("up.py", "lib/../main.py"),
            hard_link("c.py", "lib/a.py"),
        ]),
        Ok(7)
    );
}

#[test]
fn escapes_are_refused_with_the_entry_named() {
    let err = check(&[file("/etc/passwd", b"x")]).unwrap_err();
    assert_eq!(err, "entry `/etc/passwd` has an absolute path");
    let err = check(&[file("a/../../x", b"x")]).unwrap_err();
    assert!(
        err.contains("entry `a/../../x` leaves the archive through `..`"),
        "{err}"
    );
    let err = check(&[symlink("lib", "/usr/lib")]).unwrap_err();
    assert!(
        err.contains("symlink `lib` points to an absolute path"),
        "{err}"
    );
    let err = check(&[symlink("cfg", "../x/cfg.py")]).unwrap_err();
    assert!(
        err.contains("symlink `cfg` points outside the archive"),
        "{err}"
    );
    let err = check(&[symlink("a/b", "../../etc")]).unwrap_err();
    assert!(
        err.contains("symlink `a/b` points outside the archive"),
        "{err}"
    );
    let err = check(&[hard_link("h", "../secret")]).unwrap_err();
    assert!(
        err.contains("hard link `h` points outside the archive"),
        "{err}"
    );
    let err = check(&[entry("p", EntryType::Fifo)]).unwrap_err();
    assert!(err.contains("entry `p` is a device file or pipe"), "{err}");
    let err = check(&[entry("null", EntryType::Char)]).unwrap_err();
    assert!(
        err.contains("entry `null` is a device file or pipe"),
        "{err}"
    );
    let err = check(&[entry("sda", EntryType::Block)]).unwrap_err();
    assert!(
        err.contains("entry `sda` is a device file or pipe"),
        "{err}"
    );
    let err = check(&[entry("s", EntryType::new(b'9'))]).unwrap_err();
    assert!(err.contains("entry `s` has an unsupported type"), "{err}");
    let err = check(&[file("./", b"x")]).unwrap_err();
    assert_eq!(err, "an entry has an empty name");
}

#[test]
fn links_cannot_be_chained_out_of_the_tree() {
    // `y -> .` and `z -> y/..`: each looks inside alone, together `z` is the root's parent.
    let err = check(&[symlink("y", "."), symlink("z", "y/..")]).unwrap_err();
    assert!(
        err.contains("symlink `z` resolves through symlink `y`"),
        "{err}"
    );
    // Writing through a link: `d -> sub`, then `d/x` would land wherever `d` points.
    let err = check(&[dir("sub/"), symlink("d", "sub"), file("d/x", b"")]).unwrap_err();
    assert!(
        err.contains("entry `d/x` lies beneath symlink `d`"),
        "{err}"
    );
    // Declared after what it would capture.
    let err = check(&[file("e/x", b""), symlink("e", "sub")]).unwrap_err();
    assert!(err.contains("entry `e` would replace a directory"), "{err}");
    let err = check(&[file("f", b""), symlink("g", "sub"), file("g2/x", b"")]).map(|_| ());
    assert_eq!(err, Ok(()));
    // A link to itself, or a ring of links, is a loop, which unpacking could not resolve either.
    let err = check(&[symlink("c", "a/../c")]).unwrap_err();
    assert!(
        err.contains("symlink `c` is part of a loop of links"),
        "{err}"
    );
    let err = check(&[symlink("a", "b"), symlink("b", "a")]).unwrap_err();
    assert!(err.contains("is part of a loop of links"), "{err}");
    let chain: Vec<String> = (0..=42).map(|i| format!("l{i}")).collect();
    let mut entries: Vec<Raw> = chain.windows(2).map(|w| symlink(&w[0], &w[1])).collect();
    assert!(check(&entries).unwrap_err().contains("loop of links"));
    entries.remove(0);
    assert_eq!(check(&entries), Ok(41), "a link and 40 hops are followed");
    let err = check(&[symlink("s", "a"), hard_link("h", "s")]).unwrap_err();
    assert!(err.contains("hard link `h` points to symlink `s`"), "{err}");
}

#[test]
fn entries_cannot_land_beneath_files_or_replace_directories() {
    let err = check(&[file("f", b"1"), file("f/x", b"2")]).unwrap_err();
    assert!(err.contains("entry `f/x` lies beneath file `f`"), "{err}");
    let err = check(&[dir("d/"), file("d", b"1")]).unwrap_err();
    assert!(err.contains("entry `d` would replace a directory"), "{err}");
    // A file or link replaced by another of the same name is what unpacking in order does.
    assert_eq!(check(&[file("f", b"1"), file("f", b"2")]), Ok(2));
    assert_eq!(check(&[symlink("f", "g"), file("f", b"2")]), Ok(2));
}

#[test]
fn hard_links_copy_a_file_placed_before_them() {
    let err = check(&[hard_link("h", "missing")]).unwrap_err();
    assert!(err.contains("hard link `h` points to `missing`"), "{err}");
    let err = check(&[hard_link("h", "later"), file("later", b"")]).unwrap_err();
    assert!(err.contains("hard link `h` points to `later`"), "{err}");
    let err = check(&[dir("d/"), hard_link("h", "d")]).unwrap_err();
    assert!(err.contains("hard link `h` points to `d`"), "{err}");
    let err = check(&[hard_link("h", "/etc/passwd")]).unwrap_err();
    assert!(
        err.contains(
            "hard link `h` points outside the archive: entry `/etc/passwd` has an absolute path"
        ),
        "{err}"
    );
    let err = check(&[symlink("l", "."), hard_link("h", "l/anything")]).unwrap_err();
    assert!(
        err.contains("hard link `h` resolves through symlink `l`"),
        "{err}"
    );
    // A copy of a copy is a file too.
    assert_eq!(
        check(&[file("a", b"1"), hard_link("b", "a"), hard_link("c", "b")]),
        Ok(3)
    );
}

#[test]
fn too_many_entries_are_refused() {
    let names: Vec<String> = (0..101).map(|i| format!("f{i}")).collect();
    let entries: Vec<Raw> = names.iter().map(|n| file(n, b"")).collect();
    let err = measure(
        &tar_gz(&entries)[..],
        Limits {
            max_entries: 100,
            max_bytes: u64::MAX,
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, ArchiveError::TooManyEntries { limit: 100 }),
        "{err}"
    );
    assert_eq!(err.to_string(), "it has more than 100 entries");
}

#[test]
fn garbage_is_not_an_archive() {
    let err = measure(&b"definitely not gzip"[..], Limits::NONE)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("it is not a readable gzip'd tar"), "{err}");
    // A stream cut short, or with much more than padding after its end, is refused too.
    let whole = tar_gz(&[file("a", &[7u8; 100_000])]);
    assert!(measure(&whole[..whole.len() - 20], Limits::NONE).is_err());
    let mut tar = tar::Builder::new(Vec::new());
    tar.finish().unwrap();
    let mut body = tar.into_inner().unwrap();
    body.extend(std::iter::repeat_n(0u8, 2 << 20));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &body).unwrap();
    let padded = gz.finish().unwrap();
    let err = measure(&padded[..], Limits::NONE).unwrap_err().to_string();
    assert!(err.contains("data follows the end of the archive"), "{err}");
}

#[test]
fn refusals_name_their_entry() {
    let refusal = Refusal::BeneathSymlink {
        entry: "d/x".into(),
        link: "d".into(),
    };
    assert_eq!(refusal.entry(), "d/x");
    assert_eq!(Refusal::EmptyName.entry(), "");
}
