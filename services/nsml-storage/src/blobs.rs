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
        while let Some(chunk) = data.next().await {
            let chunk = chunk?;
            size += chunk.len() as u64;
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
        let fed: Result<(), StorageError> = async {
            while let Some(chunk) = data.next().await {
                let chunk = bytes::Bytes::from(chunk?);
                size += chunk.len() as u64;
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
        Ok((Staged { path, sha256, size }, checked))
    }
}

/// Writes the chunks received to `file`, hashing them, and syncs it; returns the hex SHA-256 and the bytes
/// written. Writeback is started every [`WRITEBACK_EVERY`] bytes by a thread of its own, so that the disk
/// works while the upload still arrives.
fn write_hashed(
    mut file: std::fs::File,
    mut rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    let mut since_sync = 0u64;
    let mut syncing: Option<std::thread::JoinHandle<io::Result<()>>> = None;
    while let Some(chunk) = rx.blocking_recv() {
        file.write_all(&chunk)?;
        hasher.update(&chunk);
        written += chunk.len() as u64;
        since_sync += chunk.len() as u64;
        if since_sync >= WRITEBACK_EVERY && syncing.as_ref().is_none_or(|t| t.is_finished()) {
            if let Some(done) = syncing.take() {
                done.join()
                    .map_err(|_| io::Error::other("writeback stopped"))??;
            }
            let handle = file.try_clone()?;
            syncing = Some(std::thread::spawn(move || handle.sync_data()));
            since_sync = 0;
        }
    }
    if let Some(done) = syncing.take() {
        done.join()
            .map_err(|_| io::Error::other("writeback stopped"))??;
    }
    file.sync_all()?;
    Ok((hex::encode(hasher.finalize()), written))
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

/// Reads a file in full chunks of [`CHUNK_BYTES`].
fn chunks(file: tokio::fs::File, id: String) -> ByteStream {
    Box::pin(futures::stream::try_unfold(Some(file), move |file| {
        let id = id.clone();
        async move {
            let Some(mut file) = file else {
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
            match filled {
                0 => Ok(None),
                n if n < CHUNK_BYTES => Ok(Some((buf, None))),
                _ => Ok(Some((buf, Some(file)))),
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
