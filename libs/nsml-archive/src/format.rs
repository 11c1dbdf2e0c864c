//! How an archive's bytes are encoded. Checkpoints are plain tars (model weights do not compress, and
//! deflating them cost more than sending them); code uploads, dataset parts and checkpoints stored before
//! are gzip'd. Readers tell the two apart by the gzip magic bytes, so every archive ever stored still reads.

use std::io::{self, Chain, Cursor, Read};

use flate2::read::GzDecoder;

use crate::error::ArchiveError;

/// The bytes every gzip stream starts with (RFC 1952). A tar starting with them would name its first entry
/// with bytes that are not UTF-8, which the rules refuse anyway.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// How an archive is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// A tar as it is: what checkpoints are packed as.
    Plain,
    /// A gzip'd tar: code uploads and dataset parts, and checkpoints stored before they were plain.
    Gzip,
}

/// The bytes read to tell the encoding, put back in front of the rest.
type Rewound<R> = Chain<Cursor<Vec<u8>>, R>;

/// An archive's tar bytes, inflated when the archive is gzip'd.
pub enum Decoded<R: Read> {
    Plain(Rewound<R>),
    Gzip(Box<GzDecoder<Rewound<R>>>),
}

impl<R: Read> Decoded<R> {
    /// Reads the first bytes of `reader` to tell its encoding, and reads on from there. An empty input is
    /// no archive: an upload cut off before its first byte must not pass for an empty tree.
    pub fn new(mut reader: R) -> Result<Self, ArchiveError> {
        let mut head = Vec::with_capacity(GZIP_MAGIC.len());
        (&mut reader)
            .take(GZIP_MAGIC.len() as u64)
            .read_to_end(&mut head)
            .map_err(ArchiveError::Unreadable)?;
        if head.is_empty() {
            return Err(ArchiveError::Unreadable(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive is empty",
            )));
        }
        let gzip = head == GZIP_MAGIC;
        let rewound = Cursor::new(head).chain(reader);
        Ok(if gzip {
            Decoded::Gzip(Box::new(GzDecoder::new(rewound)))
        } else {
            Decoded::Plain(rewound)
        })
    }

    /// How the archive is encoded.
    pub fn encoding(&self) -> Encoding {
        match self {
            Decoded::Plain(_) => Encoding::Plain,
            Decoded::Gzip(_) => Encoding::Gzip,
        }
    }
}

impl<R: Read> Read for Decoded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoded::Plain(r) => r.read(buf),
            Decoded::Gzip(r) => r.read(buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_encoding_is_told_by_the_magic_bytes() {
        let tar = b"model.pt\0 rest of a tar".to_vec();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        for (bytes, encoding) in [(&tar, Encoding::Plain), (&gz, Encoding::Gzip)] {
            let mut d = Decoded::new(&bytes[..]).unwrap();
            assert_eq!(d.encoding(), encoding);
            let mut out = Vec::new();
            d.read_to_end(&mut out).unwrap();
            assert_eq!(out, tar);
        }
        // One byte is a (broken) plain archive, read back whole; nothing at all is no archive.
        let mut out = Vec::new();
        Decoded::new(&b"x"[..])
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"x");
        assert!(matches!(
            Decoded::new(&b""[..]),
            Err(ArchiveError::Unreadable(_))
        ));
    }
}
