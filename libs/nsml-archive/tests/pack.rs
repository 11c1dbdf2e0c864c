//! Packing: uploads under `.nsmlignore`, trees as they are, reproducible archives.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nsml_archive::{
    Encoding, IgnoreRules, Limits, Links, Reproducible, collect, pack_collected,
    pack_collected_teed, pack_dir, unpack, write_collected,
};

fn tree(root: &Path, files: &[&str]) {
    for file in files {
        let path = root.join(file);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, format!("contents of {file}")).unwrap();
    }
}

/// Every regular file of an archive, by name, with its text.
fn files_of(archive: &[u8]) -> BTreeMap<String, String> {
    let mut ar = tar::Archive::new(nsml_archive::Decoded::new(archive).unwrap());
    let mut out = BTreeMap::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.header().entry_type().is_file() {
            let mut body = String::new();
            std::io::Read::read_to_string(&mut e, &mut body).unwrap();
            out.insert(e.path().unwrap().display().to_string(), body);
        }
    }
    out
}

fn names_of(archive: &[u8]) -> Vec<String> {
    let mut ar = tar::Archive::new(nsml_archive::Decoded::new(archive).unwrap());
    ar.entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect()
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
    std::os::unix::fs::symlink("main.py", root.join("link.py")).unwrap();
    let rules = IgnoreRules::parse(&fs::read_to_string(root.join(".nsmlignore")).unwrap()).unwrap();

    let collected = collect(root, &rules).unwrap();
    let paths: Vec<_> = collected.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, [".nsmlignore", "main.py", "model", "model/net.py"]);
    assert_eq!(collected.skipped, [("link.py".to_string(), "symlink")]);
    assert!(collected.contains_file("main.py"));
    assert!(collected.contains_file("./model//net.py"));
    assert!(!collected.contains_file("model"));
    assert!(!collected.contains_file("data/big.bin"));

    let files = files_of(&pack_collected(root, &collected).unwrap());
    let names: Vec<_> = files.keys().map(String::as_str).collect();
    assert_eq!(names, [".nsmlignore", "main.py", "model/net.py"]);
    assert_eq!(files["model/net.py"], "contents of model/net.py");
}

#[test]
fn the_plain_collected_tar_is_the_one_the_gzip_pack_holds() {
    use std::io::Read as _;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::create_dir(root.join("model")).unwrap();
    fs::write(root.join("main.py"), "print('hi')\n").unwrap();
    fs::write(root.join("model/net.py"), [b'x'; 3000]).unwrap();
    let collected = collect(root, &IgnoreRules::default()).unwrap();

    let plain = write_collected(root, &collected, Vec::new(), Encoding::Plain).unwrap();
    let gzip = pack_collected(root, &collected).unwrap();
    assert_eq!(&gzip[..2], [0x1f, 0x8b]);
    let mut inflated = Vec::new();
    flate2::read::GzDecoder::new(&gzip[..])
        .read_to_end(&mut inflated)
        .unwrap();
    assert_eq!(plain, inflated);
    // The same tree packs to the same bytes, so either names the snapshot.
    assert_eq!(gzip, pack_collected(root, &collected).unwrap());
    // Packed with its plain tar alongside: the same archive, and the tar it holds.
    let (teed, tar) = pack_collected_teed(root, &collected, Vec::new()).unwrap();
    assert_eq!(teed, gzip);
    assert_eq!(tar, plain);
}

#[test]
fn packs_without_following_symlinks_and_round_trips() {
    packs_without_following_symlinks_and_round_trips_as(Encoding::Plain);
    packs_without_following_symlinks_and_round_trips_as(Encoding::Gzip);
}

#[test]
fn a_plain_pack_is_a_tar_as_it_is_and_a_gzip_one_is_gzip() {
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("model.bin"), [7u8; 5000]).unwrap();
    let plain = pack_dir(src.path(), Vec::new(), Encoding::Plain).unwrap();
    // A header, the content padded to whole blocks, and the end of the archive.
    assert_eq!(plain.len() % 512, 0);
    assert!(plain.len() >= 512 + 5000);
    assert_eq!(&plain[..9], b"model.bin");
    let gz = pack_dir(src.path(), Vec::new(), Encoding::Gzip).unwrap();
    assert_eq!(&gz[..2], [0x1f, 0x8b]);
    assert_eq!(files_of(&plain), files_of(&gz));
}

/// Files of every size around a tar block and around the packer's reads, one with a name longer than a tar
/// header holds, come back whole, in an archive `tar` itself reads.
#[test]
fn files_of_every_size_pack_and_come_back_whole() {
    let src = tempfile::tempdir().unwrap();
    let sizes = [
        0usize,
        1,
        511,
        512,
        513,
        5_000,
        (1 << 20) - 1,
        1 << 20,
        (3 << 20) + 7,
    ];
    let content = |size: usize| -> Vec<u8> { (0..size).map(|i| (i % 253) as u8).collect() };
    for size in sizes {
        fs::write(src.path().join(format!("f{size}")), content(size)).unwrap();
    }
    let long = format!("{}.bin", "n".repeat(150));
    fs::write(src.path().join(&long), content(700)).unwrap();
    for encoding in [Encoding::Plain, Encoding::Gzip] {
        let packed = pack_dir(src.path(), Vec::new(), encoding).unwrap();
        let dest = tempfile::tempdir().unwrap();
        unpack(&packed[..], dest.path(), Limits::NONE, Links::Keep).unwrap();
        for size in sizes {
            let got = fs::read(dest.path().join(format!("f{size}"))).unwrap();
            assert!(got == content(size), "{size} bytes, {encoding:?}");
        }
        assert_eq!(fs::read(dest.path().join(&long)).unwrap(), content(700));
    }
    let plain = pack_dir(src.path(), Vec::new(), Encoding::Plain).unwrap();
    let mut read = 0;
    for entry in tar::Archive::new(&plain[..]).entries().unwrap() {
        let mut entry = entry.unwrap();
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut body).unwrap();
        assert_eq!(body.len() as u64, entry.header().size().unwrap());
        read += 1;
    }
    assert_eq!(read, sizes.len() + 1);
}

fn packs_without_following_symlinks_and_round_trips_as(encoding: Encoding) {
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

    let packed = pack_dir(src.path(), Vec::new(), encoding).unwrap();
    assert!(
        files_of(&packed)
            .values()
            .all(|b| !b.contains("do not pack me")),
        "a symlink was followed"
    );
    let mut names = names_of(&packed);
    names.sort();
    assert_eq!(names, ["alias", "leak", "run.sh", "sub", "sub/model.bin"]);

    // Unpacking refuses the link that points outside, and takes the rest.
    let dest = tempfile::tempdir().unwrap();
    let err = unpack(&packed[..], dest.path(), Limits::NONE, Links::Keep).unwrap_err();
    assert!(
        err.to_string().contains("points to an absolute path"),
        "{err}"
    );
    fs::remove_file(src.path().join("leak")).unwrap();
    let packed = pack_dir(src.path(), Vec::new(), encoding).unwrap();
    let dest = tempfile::tempdir().unwrap();
    unpack(&packed[..], dest.path(), Limits::NONE, Links::Keep).unwrap();
    assert_eq!(fs::read(dest.path().join("alias")).unwrap(), [1, 2, 3]);
    let mode = fs::metadata(dest.path().join("run.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o111, 0o111);
}

#[test]
fn reproducible_archives_depend_on_contents_only() {
    let pack = |root: &Path| {
        let mut r = Reproducible::new(Vec::new());
        r.add_path(&root.join("train"), "train").unwrap();
        r.add_path(&root.join("label.csv"), "test/test_label")
            .unwrap();
        r.add_bytes(b"k1\n", "private_keys.txt").unwrap();
        r.finish().unwrap()
    };
    let make = || {
        let dir = tempfile::tempdir().unwrap();
        tree(
            dir.path(),
            &["train/b.csv", "train/a.csv", "train/x/y.csv", "label.csv"],
        );
        fs::set_permissions(
            dir.path().join("train/a.csv"),
            fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        dir
    };
    let (one, two) = (make(), make());
    let first = pack(one.path());
    assert_eq!(first, pack(two.path()), "same files, same bytes");
    assert_eq!(
        names_of(&first),
        [
            "train/",
            "train/a.csv",
            "train/b.csv",
            "train/x/",
            "train/x/y.csv",
            "test/test_label",
            "private_keys.txt"
        ]
    );
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&first[..]));
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        let h = e.header();
        assert_eq!(
            (h.mtime().unwrap(), h.uid().unwrap(), h.gid().unwrap()),
            (0, 0, 0)
        );
        let mode = h.mode().unwrap();
        assert!(mode == 0o644 || mode == 0o755, "{mode:o}");
    }
    let err = Reproducible::new(Vec::new())
        .add_path(&one.path().join("missing"), "x")
        .unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}
