//! Property tests of the dataset splitter: whatever bytes or entries a dataset archive holds (random names
//! with `..`, absolute paths and empty components, links with random targets, device files, GNU long-name
//! and PAX records), it never panics, and the parts it stores hold plain files and directories at clean
//! paths only. (The rules of code and checkpoint archives are `nsml_archive`'s, fuzzed in that crate.)
//! Cases per property: `NSML_FUZZ_CASES` (256 unless set), so CI stays fast and a longer run is one
//! variable away.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::io::{Read, Write};

use flate2::Compression;
use flate2::write::GzEncoder;
use nsml_proto::v1::DatasetMeta;
use nsml_storage::archive::split_dataset;
use nsml_storage::blobs::Staging;
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

fn staging() -> &'static (tempfile::TempDir, Staging) {
    static STAGING: std::sync::OnceLock<(tempfile::TempDir, Staging)> = std::sync::OnceLock::new();
    STAGING.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let staging = rt
            .block_on(Staging::new(dir.path().join("tmp")))
            .expect("a staging area");
        (dir, staging)
    })
}

/// A dataset archive is split into parts that hold plain files and directories at clean paths only.
fn split_is_safe(bytes: &[u8]) -> Result<(), TestCaseError> {
    let f = staged(bytes);
    let meta = DatasetMeta {
        name: "fuzz".into(),
        competition: "c".into(),
        metric: "accuracy".into(),
        ..Default::default()
    };
    let Ok(split) = split_dataset(f.path(), &meta, &staging().1) else {
        return Ok(());
    };
    for (part, blob) in &split.parts {
        let mut raw = Vec::new();
        std::fs::File::open(blob.path())
            .and_then(|mut f| f.read_to_end(&mut raw))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(raw.as_slice()));
        for e in ar
            .entries()
            .map_err(|e| TestCaseError::fail(e.to_string()))?
        {
            let e = e.map_err(|e| TestCaseError::fail(e.to_string()))?;
            let ty = e.header().entry_type();
            let path = e.path().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let shown = path.display().to_string();
            prop_assert!(
                matches!(ty, EntryType::Regular | EntryType::Directory),
                "part {part:?} holds `{shown}` of type {ty:?}"
            );
            prop_assert!(
                path.is_relative()
                    && path
                        .components()
                        .all(|c| matches!(c, std::path::Component::Normal(_))),
                "part {part:?} holds `{shown}`"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_bytes_are_refused_or_safe(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        split_is_safe(&bytes)?;
        split_is_safe(&gz(&bytes))?;
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
        split_is_safe(&gz(&tar))?;
    }

    #[test]
    fn dataset_archives_split_into_clean_parts(
        entries in prop::collection::vec(
            (
                prop::sample::select(vec![
                    "train/train_data/a", "train/train_label", "test/test_data/x",
                    "test/test_label", "test_submit/test_data/y", "test_submit/test_label",
                    "eval/e.py", "private_keys.txt", "train/../../x", "/train/a", "test/./test_label",
                ]),
                entry(),
            ),
            1..8,
        ),
    ) {
        let entries: Vec<Raw> = entries
            .into_iter()
            .map(|(name, mut e)| {
                if !e.name.starts_with('/') {
                    e.name = name.to_string();
                }
                e
            })
            .collect();
        split_is_safe(&gz(&tar_bytes(&entries)))?;
    }
}
