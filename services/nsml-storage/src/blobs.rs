//! Content-addressed blobs: uploads are staged on local disk (hashed while written), then handed to a
//! [`BlobStore`] under their SHA-256. The embedded deployment keeps blobs in a local directory
//! ([`LocalBlobStore`]); an S3-compatible object store can slot in behind the same trait.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;

use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tempfile::TempPath;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::StorageError;

/// Size of the chunks downloads are streamed in: few enough per gigabyte that their cost does not count,
/// and far under every gRPC message limit on the way (4 MiB by default, 64 MiB between services).
pub const CHUNK_BYTES: usize = 1 << 20;

/// Chunks of an upload queued for each reader of it before the upload waits.
const QUEUED_CHUNKS: usize = 8;

/// How much of a spooled upload may be waiting to be written to disk before its writeback is started:
/// a large upload is on disk by the time it ends, and the final sync waits for little.
const WRITEBACK_EVERY: u64 = 64 << 20;

/// A blob's content, in chunks of [`CHUNK_BYTES`] (the last one shorter).
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Vec<u8>, StorageError>> + Send>>;

/// A file written to the staging area, with its digest and size; removed when dropped unless stored.
#[derive(Debug)]
pub struct Staged {
    path: TempPath,
    sha256: String,
    size: u64,
}

impl Staged {
    /// Hex SHA-256 of the content: the id it will have as a blob.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where the content lies, for reading it before it is stored.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Where blobs are kept.
#[async_trait::async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Stores a staged file under its SHA-256 and returns that id. Storing the same content twice is
    /// harmless. Once this returns, the blob survives a crash.
    async fn put(&self, staged: Staged) -> Result<String, StorageError>;

    /// Streams a blob's content.
    async fn get(&self, id: &str) -> Result<ByteStream, StorageError>;
}

/// The staging area: a directory for uploads in flight, emptied at start-up (what a crash left there was
/// never referenced by the log).
#[derive(Debug, Clone)]
pub struct Staging {
    dir: PathBuf,
}

impl Staging {
    /// Creates (or empties) the staging directory.
    pub async fn new(dir: PathBuf) -> Result<Self, StorageError> {
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StorageError::io(format!("emptying {}", dir.display()), e)),
        }
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| StorageError::io(format!("creating {}", dir.display()), e))?;
        Ok(Self { dir })
    }

    /// Opens a new staged file for synchronous writing (archive rewriting runs on a blocking thread).
    pub fn writer(&self) -> Result<StagedWriter, StorageError> {
        let file = tempfile::NamedTempFile::new_in(&self.dir)
            .map_err(|e| StorageError::io("creating a staging file", e))?;
        let (file, path) = file.into_parts();
        Ok(StagedWriter {
            file: io::BufWriter::with_capacity(CHUNK_BYTES, file),
            path,
            hasher: Sha256::new(),
            size: 0,
        })
    }

    /// Writes an upload's data chunks to a staged file. More than `limit` bytes fail with `too_large(n)`
    /// (`n` = the bytes received so far), as soon as the limit is passed.
    pub async fn spool<S>(
        &self,
        mut data: S,
        limit: u64,
        too_large: impl FnOnce(u64) -> StorageError,
    ) -> Result<Staged, StorageError>
    where
        S: Stream<Item = Result<Vec<u8>, StorageError>> + Unpin,
    {
        let file = tempfile::NamedTempFile::new_in(&self.dir)
            .map_err(|e| StorageError::io("creating a staging file", e))?;
        let (file, path) = file.into_parts();
        let mut file =
            tokio::io::BufWriter::with_capacity(CHUNK_BYTES, tokio::fs::File::from_std(file));
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut meter = nsml_common::bulk::Meter::default();
        while let Some(chunk) = data.next().await {
            let chunk = chunk?;
            size += chunk.len() as u64;
            meter.moved(chunk.len());
            if size > limit {
                return Err(too_large(size));
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| StorageError::io("writing an upload to staging", e))?;
        }
        file.flush()
            .await
            .map_err(|e| StorageError::io("writing an upload to staging", e))?;
        file.into_inner()
            .sync_all()
            .await
            .map_err(|e| StorageError::io("syncing an upload to staging", e))?;
        Ok(Staged {
            path,
            sha256: hex::encode(hasher.finalize()),
            size,
        })
    }
}

/// A chunk of an upload for a blocking reader, or the news that the upload ended early.
type Fed = Result<bytes::Bytes, io::Error>;

/// A blocking reader of the chunks an upload task feeds it.
struct FedReader {
    rx: tokio::sync::mpsc::Receiver<Fed>,
    chunk: bytes::Bytes,
}

impl io::Read for FedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.chunk = chunk?,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        bytes::Buf::advance(&mut self.chunk, n);
        Ok(n)
    }
}

impl Staging {
    /// Writes an upload's data chunks to a staged file, hashing them as they arrive, while `check` reads
    /// the same bytes as they arrive (an archive's entries, say): one pass over the upload, and nothing
    /// read back from disk. The file, its hash and the check's answer come back once all three are done.
    ///
    /// More than `limit` bytes fail with `too_large(n)` as soon as the limit is passed. A check that fails
    /// stops the upload there, with its error; whatever failed, nothing is left staged.
    pub async fn spool_checked<S, T>(
        &self,
        mut data: S,
        limit: u64,
        too_large: impl FnOnce(u64) -> StorageError,
        check: impl FnOnce(&mut dyn io::Read) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<(Staged, T), StorageError>
    where
        S: Stream<Item = Result<Vec<u8>, StorageError>> + Unpin,
        T: Send + 'static,
    {
        let file = tempfile::NamedTempFile::new_in(&self.dir)
            .map_err(|e| StorageError::io("creating a staging file", e))?;
        let (file, path) = file.into_parts();
        let (to_check, rx) = tokio::sync::mpsc::channel::<Fed>(QUEUED_CHUNKS);
        let checker = tokio::task::spawn_blocking(move || {
            let mut reader = FedReader {
                rx,
                chunk: bytes::Bytes::new(),
            };
            check(&mut reader)
        });
        let (to_disk, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(QUEUED_CHUNKS);
        let writer = tokio::task::spawn_blocking(move || write_hashed(file, rx));
        let mut size = 0u64;
        let mut checking = Some(to_check);
        // Announced as a bulk transfer once large, until every part of the spool has ended.
        let mut meter = nsml_common::bulk::Meter::default();
        let fed: Result<(), StorageError> = async {
            while let Some(chunk) = data.next().await {
                let chunk = bytes::Bytes::from(chunk?);
                size += chunk.len() as u64;
                meter.moved(chunk.len());
                if size > limit {
                    return Err(too_large(size));
                }
                if let Some(tx) = &checking
                    && tx.send(Ok(chunk.clone())).await.is_err()
                {
                    // The check ended before the upload did: it refused what it read.
                    checking = None;
                    break;
                }
                if to_disk.send(chunk).await.is_err() {
                    break;
                }
            }
            Ok(())
        }
        .await;
        match fed {
            Ok(()) => drop(checking),
            Err(e) => {
                // Neither reader takes what was sent for the end of the upload.
                if let Some(tx) = checking {
                    let _ = tx.send(Err(io::Error::other("the upload broke off"))).await;
                }
                drop(to_disk);
                let _ = checker.await;
                let _ = writer.await;
                return Err(e);
            }
        }
        let checked = checker
            .await
            .map_err(|e| StorageError::io("checking an upload", io::Error::other(e)))?;
        let checked = match checked {
            Ok(checked) => checked,
            Err(e) => {
                drop(to_disk);
                let _ = writer.await;
                return Err(e);
            }
        };
        drop(to_disk);
        let (sha256, written) = writer
            .await
            .map_err(|e| StorageError::io("writing an upload to staging", io::Error::other(e)))?
            .map_err(|e| StorageError::io("writing an upload to staging", e))?;
        if written != size {
            return Err(StorageError::io(
                "writing an upload to staging",
                io::Error::other(format!("{written} of {size} bytes written")),
            ));
        }
        drop(meter);
        Ok((Staged { path, sha256, size }, checked))
    }
}

/// Writes the chunks received to `file` ([`write_synced`]), hashing them, and syncs it; returns the hex SHA-256
/// and the bytes written. The chunks are hashed by a thread of their own while they are written, so that the
/// two passes over a large upload run on two cores.
fn write_hashed(
    file: std::fs::File,
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
) -> io::Result<(String, u64)> {
    let (to_hash, hash) = std::sync::mpsc::sync_channel::<bytes::Bytes>(QUEUED_CHUNKS);
    let hashing = std::thread::spawn(move || {
        let mut hasher = Sha256::new();
        for chunk in hash {
            hasher.update(&chunk);
        }
        hex::encode(hasher.finalize())
    });
    let written = write_synced(file, rx, &to_hash);
    drop(to_hash);
    let sha256 = hashing
        .join()
        .map_err(|_| io::Error::other("hashing stopped"))?;
    Ok((sha256, written?))
}

/// Writes the chunks received to `file`, passing each on to `hashed` once written, and syncs the file;
/// returns the bytes written.
///
/// Where the file system allows it, the content goes to the disk straight from a buffer of this thread
/// (`O_DIRECT`), not through the page cache: a blob is written once and read seldom, and filling the cache
/// with it costs a fresh page of memory per 4 KiB written. On the 2-core development machine (a VM whose
/// freed memory goes back to its host), `dd` of 1 GiB through the cache and synced took 1.4–2.8 s, written
/// directly 0.4–0.6 s. Elsewhere (tmpfs, say) it is written through the cache, its writeback started every
/// [`WRITEBACK_EVERY`] bytes by a thread of its own so that the disk works while the upload still arrives.
fn write_synced(
    file: std::fs::File,
    mut rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    hashed: &std::sync::mpsc::SyncSender<bytes::Bytes>,
) -> io::Result<u64> {
    let mut out = match Direct::new(file) {
        Ok(direct) => Out::Direct(direct),
        Err(file) => Out::Cached(Cached::new(file)),
    };
    let mut written = 0u64;
    while let Some(chunk) = rx.blocking_recv() {
        out = out.write(&chunk)?;
        written += chunk.len() as u64;
        hashed
            .send(chunk)
            .map_err(|_| io::Error::other("hashing stopped"))?;
    }
    out.finish()?;
    Ok(written)
}

/// The size of the buffer a direct write goes from: a few upload chunks, so that a write waits on the disk
/// seldom while chunks keep arriving.
const DIRECT_BUF: usize = 4 << 20;

/// What the file offset and length of a direct write must be a multiple of, and its buffer aligned to.
const DIRECT_ALIGN: usize = 4096;

/// Where a staged file is being written.
enum Out {
    Direct(Direct),
    Cached(Cached),
}

impl Out {
    /// Writes `data`; a file that refuses a direct write is written through the cache from there on.
    fn write(self, data: &[u8]) -> io::Result<Out> {
        match self {
            Out::Direct(direct) => direct.write(data),
            Out::Cached(mut cached) => {
                cached.write(data)?;
                Ok(Out::Cached(cached))
            }
        }
    }

    /// Writes what is still buffered and syncs the file.
    fn finish(self) -> io::Result<()> {
        match self {
            Out::Direct(direct) => direct.finish(),
            Out::Cached(cached) => cached.finish(),
        }
    }
}

/// Whether a write failed because the file system does not take direct writes.
fn refused_direct(e: &io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error())
}

/// A file written with `O_DIRECT` from an aligned buffer, in whole blocks; the last partial block goes
/// through the cache.
struct Direct {
    file: std::fs::File,
    /// The buffer's allocation: [`DIRECT_BUF`] bytes from `start` on are aligned to [`DIRECT_ALIGN`].
    buf: Vec<u8>,
    start: usize,
    filled: usize,
    /// Bytes on disk before the buffer's.
    flushed: u64,
}

impl Direct {
    /// Switches `file` (empty, just created) to direct writes; gives it back where that is refused.
    fn new(file: std::fs::File) -> Result<Direct, std::fs::File> {
        let buf = vec![0u8; DIRECT_BUF + DIRECT_ALIGN];
        let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
        if start >= DIRECT_ALIGN || set_direct(&file, true).is_err() {
            return Err(file);
        }
        Ok(Direct {
            file,
            buf,
            start,
            filled: 0,
            flushed: 0,
        })
    }

    /// Copies `data` into the buffer, writing each full buffer to the disk.
    fn write(mut self, mut data: &[u8]) -> io::Result<Out> {
        while !data.is_empty() {
            let n = data.len().min(DIRECT_BUF - self.filled);
            let at = self.start + self.filled;
            self.buf[at..at + n].copy_from_slice(&data[..n]);
            self.filled += n;
            data = &data[n..];
            if self.filled == DIRECT_BUF {
                match (&self.file).write_all(&self.buf[self.start..self.start + DIRECT_BUF]) {
                    Ok(()) => {
                        self.flushed += DIRECT_BUF as u64;
                        self.filled = 0;
                    }
                    Err(e) if refused_direct(&e) => {
                        let mut cached = self.fall_back()?;
                        cached.write(data)?;
                        return Ok(Out::Cached(cached));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(Out::Direct(self))
    }

    /// Goes on through the cache after a refused direct write: from the end of what is on disk, with what
    /// is buffered.
    fn fall_back(self) -> io::Result<Cached> {
        use std::io::Seek;
        let mut file = self.file;
        set_direct(&file, false)?;
        file.set_len(self.flushed)?;
        file.seek(io::SeekFrom::Start(self.flushed))?;
        let mut cached = Cached::new(file);
        cached.write(&self.buf[self.start..self.start + self.filled])?;
        Ok(cached)
    }

    /// Writes the whole blocks buffered directly and the last partial one through the cache, then syncs.
    fn finish(mut self) -> io::Result<()> {
        let whole = self.filled / DIRECT_ALIGN * DIRECT_ALIGN;
        if whole > 0 {
            match (&self.file).write_all(&self.buf[self.start..self.start + whole]) {
                Ok(()) => {
                    self.buf
                        .copy_within(self.start + whole..self.start + self.filled, self.start);
                    self.filled -= whole;
                }
                Err(e) if refused_direct(&e) => return self.fall_back()?.finish(),
                Err(e) => return Err(e),
            }
        }
        set_direct(&self.file, false)?;
        (&self.file).write_all(&self.buf[self.start..self.start + self.filled])?;
        self.file.sync_all()
    }
}

/// Turns direct writes on or off for `file`.
fn set_direct(file: &std::fs::File, on: bool) -> io::Result<()> {
    use rustix::fs::OFlags;
    let flags = rustix::fs::fcntl_getfl(file)?;
    let flags = if on {
        flags | OFlags::DIRECT
    } else {
        flags - OFlags::DIRECT
    };
    rustix::fs::fcntl_setfl(file, flags)?;
    Ok(())
}

/// A file written through the page cache, its writeback started every [`WRITEBACK_EVERY`] bytes.
struct Cached {
    file: std::fs::File,
    since_sync: u64,
    syncing: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl Cached {
    fn new(file: std::fs::File) -> Cached {
        Cached {
            file,
            since_sync: 0,
            syncing: None,
        }
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all(data)?;
        self.since_sync += data.len() as u64;
        if self.since_sync >= WRITEBACK_EVERY
            && self.syncing.as_ref().is_none_or(|t| t.is_finished())
        {
            self.wait_writeback()?;
            let handle = self.file.try_clone()?;
            self.syncing = Some(std::thread::spawn(move || handle.sync_data()));
            self.since_sync = 0;
        }
        Ok(())
    }

    fn wait_writeback(&mut self) -> io::Result<()> {
        match self.syncing.take() {
            Some(done) => done
                .join()
                .map_err(|_| io::Error::other("writeback stopped"))?,
            None => Ok(()),
        }
    }

    fn finish(mut self) -> io::Result<()> {
        self.wait_writeback()?;
        self.file.sync_all()
    }
}

/// A staged file being written synchronously, hashed as it goes.
pub struct StagedWriter {
    file: io::BufWriter<std::fs::File>,
    path: TempPath,
    hasher: Sha256,
    size: u64,
}

impl StagedWriter {
    /// Flushes the file to disk and returns it as staged.
    pub fn finish(self) -> io::Result<Staged> {
        let file = self.file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(Staged {
            path: self.path,
            sha256: hex::encode(self.hasher.finalize()),
            size: self.size,
        })
    }
}

impl Write for StagedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Blobs in a local directory: `ROOT/ab/abcdef…` (the first two hex digits fan the files out).
#[derive(Debug, Clone)]
pub struct LocalBlobStore {
    root: PathBuf,
}

impl LocalBlobStore {
    /// Uses (creating if needed) `root`. The staging area must be on the same file system, so that storing
    /// a blob is a rename.
    pub async fn new(root: PathBuf) -> Result<Self, StorageError> {
        tokio::fs::create_dir_all(&root)
            .await
            .map_err(|e| StorageError::io(format!("creating {}", root.display()), e))?;
        Ok(Self { root })
    }

    fn path_of(&self, id: &str) -> Result<PathBuf, StorageError> {
        // Ids come from the log; refuse anything but a digest so that no id can name a path elsewhere.
        if id.len() != 64
            || !id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(StorageError::BlobMissing { id: id.to_string() });
        }
        Ok(self.root.join(&id[..2]).join(id))
    }
}

#[async_trait::async_trait]
impl BlobStore for LocalBlobStore {
    async fn put(&self, staged: Staged) -> Result<String, StorageError> {
        let id = staged.sha256.clone();
        let target = self.path_of(&id)?;
        let dir = target.parent().map(Path::to_path_buf).unwrap_or_default();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            std::fs::create_dir_all(&dir)?;
            // The staged file was synced; the rename is atomic, and replacing an existing blob with the same
            // content changes nothing. Syncing the directory makes the new name durable.
            staged.path.persist(&target).map_err(|e| e.error)?;
            std::fs::File::open(&dir)?.sync_all()
        })
        .await
        .map_err(|e| StorageError::io("storing a blob", io::Error::other(e)))?
        .map_err(|e| StorageError::io(format!("storing blob `{id}`"), e))?;
        Ok(id)
    }

    async fn get(&self, id: &str) -> Result<ByteStream, StorageError> {
        let path = self.path_of(id)?;
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StorageError::BlobMissing { id: id.to_string() });
            }
            Err(e) => return Err(StorageError::io(format!("opening blob `{id}`"), e)),
        };
        Ok(chunks(file, id.to_string()))
    }
}

/// Reads a file in full chunks of [`CHUNK_BYTES`], announced as a bulk transfer once large.
fn chunks(file: tokio::fs::File, id: String) -> ByteStream {
    let reading = Some((file, nsml_common::bulk::Meter::default()));
    Box::pin(futures::stream::try_unfold(reading, move |reading| {
        let id = id.clone();
        async move {
            let Some((mut file, mut meter)) = reading else {
                return Ok(None);
            };
            let mut buf = vec![0u8; CHUNK_BYTES];
            let mut filled = 0;
            while filled < CHUNK_BYTES {
                let n = file
                    .read(&mut buf[filled..])
                    .await
                    .map_err(|e| StorageError::io(format!("reading blob `{id}`"), e))?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            buf.truncate(filled);
            meter.moved(filled);
            match filled {
                0 => Ok(None),
                n if n < CHUNK_BYTES => Ok(Some((buf, None))),
                _ => Ok(Some((buf, Some((file, meter))))),
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stores_by_digest_and_streams_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging::new(dir.path().join("tmp")).await.unwrap();
        let store = LocalBlobStore::new(dir.path().join("blobs")).await.unwrap();
        let data: Vec<u8> = (0..CHUNK_BYTES * 2 + 10).map(|i| (i % 251) as u8).collect();
        let input = futures::stream::iter(
            data.chunks(1000)
                .map(|c| Ok(c.to_vec()))
                .collect::<Vec<_>>(),
        );
        let staged = staging
            .spool(input, u64::MAX, |_| {
                StorageError::BadRequest("too large".into())
            })
            .await
            .unwrap();
        let expected = hex::encode(Sha256::digest(&data));
        assert_eq!(staged.sha256(), expected);
        let id = store.put(staged).await.unwrap();
        assert_eq!(id, expected);
        let sizes: Vec<usize> = store
            .get(&id)
            .await
            .unwrap()
            .map(|c| c.unwrap().len())
            .collect()
            .await;
        assert_eq!(sizes, vec![CHUNK_BYTES, CHUNK_BYTES, 10]);
        // Nothing is left in staging once stored.
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        assert!(matches!(
            store.get("../../etc/passwd").await,
            Err(StorageError::BlobMissing { .. })
        ));
    }

    /// Bytes that differ from block to block, so that a block written twice or out of place shows.
    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8 ^ (i / 4096) as u8).collect()
    }

    /// Writes `data` as `write_hashed` receives an upload, in chunks of `chunk` bytes; returns what it
    /// answered.
    fn write_in_chunks(file: std::fs::File, data: &[u8], chunk: usize) -> (String, u64) {
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUED_CHUNKS);
        let chunks: Vec<bytes::Bytes> = data
            .chunks(chunk)
            .map(bytes::Bytes::copy_from_slice)
            .collect();
        let feeding = std::thread::spawn(move || {
            for c in chunks {
                tx.blocking_send(c).unwrap();
            }
        });
        let answer = write_hashed(file, rx).unwrap();
        feeding.join().unwrap();
        answer
    }

    #[test]
    fn staged_files_of_every_size_are_written_whole_and_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let sizes = [
            0,
            1,
            DIRECT_ALIGN - 1,
            DIRECT_ALIGN,
            DIRECT_ALIGN + 1,
            DIRECT_BUF - 1,
            DIRECT_BUF,
            2 * DIRECT_BUF + 12_345,
        ];
        for (i, size) in sizes.into_iter().enumerate() {
            let data = pattern(size);
            let path = dir.path().join(format!("staged-{i}"));
            let file = std::fs::File::create(&path).unwrap();
            // Chunks that do not divide the buffer, as an upload's need not.
            let (sha256, written) = write_in_chunks(file, &data, 1_000_003);
            assert_eq!(written, size as u64);
            assert_eq!(sha256, hex::encode(Sha256::digest(&data)), "size {size}");
            assert!(std::fs::read(&path).unwrap() == data, "size {size}");
        }
    }

    #[test]
    fn a_file_system_that_refuses_direct_writes_gets_the_rest_through_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("staged");
        let Ok(direct) = Direct::new(std::fs::File::create(&path).unwrap()) else {
            // This file system takes no direct writes at all: the cache is all there is.
            return;
        };
        let data = pattern(DIRECT_BUF + 3 * DIRECT_ALIGN + 17);
        let Out::Direct(direct) = direct.write(&data[..DIRECT_BUF + 5_000]).unwrap() else {
            panic!("the direct write was refused");
        };
        assert_eq!(direct.flushed, DIRECT_BUF as u64);
        // As a refused write goes on: from what is on disk, with what is buffered.
        let mut cached = direct.fall_back().unwrap();
        cached.write(&data[DIRECT_BUF + 5_000..]).unwrap();
        cached.finish().unwrap();
        assert!(std::fs::read(&path).unwrap() == data);
    }

    #[tokio::test]
    async fn an_upload_over_the_limit_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging::new(dir.path().join("tmp")).await.unwrap();
        let input = futures::stream::iter(vec![Ok(vec![0u8; 600]), Ok(vec![0u8; 600])]);
        let err = staging
            .spool(input, 1000, |_| {
                StorageError::BadRequest("too large".into())
            })
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "too large");
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }
}
