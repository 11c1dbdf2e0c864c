//! Archives written byte for byte: the tar crate's builder refuses `..` and absolute paths, which is what
//! these tests need to send.
#![allow(dead_code)]

use flate2::Compression;
use flate2::write::GzEncoder;
use tar::{EntryType, Header};

/// One raw tar entry.
#[derive(Debug, Clone)]
pub struct Raw<'a> {
    pub name: &'a str,
    pub kind: EntryType,
    pub link: &'a str,
    pub data: &'a [u8],
    pub mode: u32,
}

pub fn entry(name: &str, kind: EntryType) -> Raw<'_> {
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

pub fn dir(name: &str) -> Raw<'_> {
    entry(name, EntryType::Directory)
}

pub fn file<'a>(name: &'a str, data: &'a [u8]) -> Raw<'a> {
    Raw {
        data,
        ..entry(name, EntryType::Regular)
    }
}

pub fn symlink<'a>(name: &'a str, target: &'a str) -> Raw<'a> {
    Raw {
        link: target,
        ..entry(name, EntryType::Symlink)
    }
}

pub fn hard_link<'a>(name: &'a str, target: &'a str) -> Raw<'a> {
    Raw {
        link: target,
        ..entry(name, EntryType::Link)
    }
}

pub fn tar_gz(entries: &[Raw]) -> Vec<u8> {
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
