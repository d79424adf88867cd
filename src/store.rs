//! The content store: immutable blobs by sha256 under `content/blobs/sha256/<hex>`.
//!
//! Blobs are streamed into `content/ingest/` while being hashed, checked against the expected
//! digest, fsynced and renamed into place, so a blob is either whole and verified or absent.
//! Knows nothing of images or FUSE.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::digest::Digest;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("blob digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("blob size mismatch for {digest}: descriptor says {expected} bytes, got {actual}")]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("blob {0} is not in the content store")]
    NotFound(Digest),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

pub type Result<T> = std::result::Result<T, StoreError>;

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}

/// Handle on the content store under `root/content`.
#[derive(Debug, Clone)]
pub struct ContentStore {
    blobs: PathBuf,
    ingest: PathBuf,
}

impl ContentStore {
    pub fn open(root: &Path) -> Result<Self> {
        let blobs = root.join("content/blobs/sha256");
        let ingest = root.join("content/ingest");
        for dir in [&blobs, &ingest] {
            fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        }
        Ok(Self { blobs, ingest })
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.hex())
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    pub fn open_blob(&self, digest: &Digest) -> Result<File> {
        File::open(self.blob_path(digest)).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                StoreError::NotFound(digest.clone())
            } else {
                StoreError::Io {
                    context: format!("opening blob {digest}"),
                    source: e,
                }
            }
        })
    }

    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        let mut data = Vec::new();
        self.open_blob(digest)?
            .read_to_end(&mut data)
            .map_err(io_err(format!("reading blob {digest}")))?;
        Ok(data)
    }

    /// Streams `src` into the store as the blob `expected`. An existing blob is kept (its
    /// bytes are the same by construction); the source is then not read at all.
    /// `progress` is called with the number of bytes copied so far.
    pub fn ingest(
        &self,
        expected: &Digest,
        expected_size: Option<u64>,
        src: &mut dyn Read,
        progress: &mut dyn FnMut(u64),
    ) -> Result<PathBuf> {
        let target = self.blob_path(expected);
        if target.is_file() {
            return Ok(target);
        }
        let mut tmp = locked_tempfile(
            tempfile::Builder::new().prefix(&format!("{}.", expected.hex())),
            &self.ingest,
        )
        .map_err(io_err("creating ingest file"))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        let mut writeback = Writeback::default();
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(format!("reading source of blob {expected}"))(e)),
            };
            hasher.update(&buf[..n]);
            tmp.write_all(&buf[..n])
                .map_err(io_err("writing ingest file"))?;
            writeback.wrote(tmp.as_file(), n);
            total += n as u64;
            progress(total);
        }
        let actual = Digest::sha256_from_bytes(hasher.finalize().into());
        if &actual != expected {
            return Err(StoreError::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        if let Some(size) = expected_size {
            if size != total {
                return Err(StoreError::SizeMismatch {
                    digest: expected.clone(),
                    expected: size,
                    actual: total,
                });
            }
        }
        self.commit_temp(tmp, &target)?;
        Ok(target)
    }

    /// Streams `src` into the store under the digest it hashes to (for sources that do not
    /// name their blobs by digest, like `docker save` layer files).
    pub fn ingest_computed(
        &self,
        src: &mut dyn Read,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(Digest, u64)> {
        let mut tmp = locked_tempfile(tempfile::Builder::new().prefix("unknown."), &self.ingest)
            .map_err(io_err("creating ingest file"))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err("reading blob source")(e)),
            };
            hasher.update(&buf[..n]);
            tmp.write_all(&buf[..n])
                .map_err(io_err("writing ingest file"))?;
            total += n as u64;
            progress(total);
        }
        let digest = Digest::sha256_from_bytes(hasher.finalize().into());
        let target = self.blob_path(&digest);
        if !target.is_file() {
            self.commit_temp(tmp, &target)?;
        }
        Ok((digest, total))
    }

    /// A writer that becomes a blob named by its digest on [`BlobWriter::commit`] (and
    /// disappears if dropped before).
    pub fn writer(&self) -> Result<BlobWriter> {
        let tmp = locked_tempfile(tempfile::Builder::new().prefix("write."), &self.ingest)
            .map_err(io_err("creating ingest file"))?;
        Ok(BlobWriter {
            store: self.clone(),
            tmp,
            hasher: Sha256::new(),
            size: 0,
        })
    }

    /// Writes `data` as a blob and returns its digest.
    pub fn write_bytes(&self, data: &[u8]) -> Result<Digest> {
        let digest = Digest::sha256_of(data);
        self.ingest(
            &digest,
            Some(data.len() as u64),
            &mut &data[..],
            &mut |_| {},
        )?;
        Ok(digest)
    }

    fn commit_temp(&self, tmp: tempfile::NamedTempFile, target: &Path) -> Result<()> {
        tmp.as_file()
            .sync_all()
            .map_err(io_err("fsyncing ingest file"))?;
        let mut perms = tmp
            .as_file()
            .metadata()
            .map_err(io_err("stat ingest file"))?
            .permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o444);
        tmp.as_file()
            .set_permissions(perms)
            .map_err(io_err("chmod ingest file"))?;
        tmp.persist(target).map_err(|e| StoreError::Io {
            context: format!("renaming blob into {}", target.display()),
            source: e.error,
        })?;
        sync_dir(&self.blobs)
    }

    /// Removes a blob; a missing blob is not an error.
    pub fn remove(&self, digest: &Digest) -> Result<()> {
        match fs::remove_file(self.blob_path(digest)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(format!("removing blob {digest}"))(e)),
        }
    }

    /// All blobs present, for garbage collection.
    pub fn list(&self) -> Result<Vec<Digest>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.blobs).map_err(io_err("listing blobs"))? {
            let entry = entry.map_err(io_err("listing blobs"))?;
            if let Some(name) = entry.file_name().to_str() {
                if let Ok(d) = Digest::parse(&format!("sha256:{name}")) {
                    out.push(d);
                }
            }
        }
        Ok(out)
    }

    /// The directory of partial ingests.
    pub fn ingest_dir(&self) -> &Path {
        &self.ingest
    }

    /// The directory of blobs.
    pub fn blobs_dir(&self) -> &Path {
        &self.blobs
    }

    /// Removes leftovers of interrupted ingests: files no live process holds (an ingest in
    /// progress, in this process or another, keeps its temp file locked). Returns (files,
    /// bytes) removed.
    pub fn clean_ingest(&self) -> Result<(usize, u64)> {
        let (mut files, mut bytes) = (0, 0);
        for entry in fs::read_dir(&self.ingest).map_err(io_err("listing ingest"))? {
            let entry = entry.map_err(io_err("listing ingest"))?;
            if let Ok(Some(n)) = remove_if_stale(&entry.path()) {
                files += 1;
                bytes += n;
            }
        }
        Ok((files, bytes))
    }
}

/// See [`ContentStore::writer`].
pub struct BlobWriter {
    store: ContentStore,
    tmp: tempfile::NamedTempFile,
    hasher: Sha256,
    size: u64,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.tmp.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tmp.flush()
    }
}

impl BlobWriter {
    /// Verifies nothing (the content defines the name): fsyncs and renames into place.
    pub fn commit(self) -> Result<(Digest, u64)> {
        let digest = Digest::sha256_from_bytes(self.hasher.finalize().into());
        let target = self.store.blob_path(&digest);
        if !target.is_file() {
            self.store.commit_temp(self.tmp, &target)?;
        }
        Ok((digest, self.size))
    }
}

/// fsyncs a directory so a rename into it survives a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(format!("fsyncing {}", dir.display())))
}

/// Prefix of [`write_atomic`]'s temp files.
pub const ATOMIC_TEMP_PREFIX: &str = ".tmp-";

/// Writes are handed to the disk every this many bytes (see [`Writeback`]).
const WRITEBACK_EVERY: u64 = 8 << 20;

/// Starts writeback of a file being written every [`WRITEBACK_EVERY`] bytes
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so the final fsync waits for the last few
/// megabytes instead of the whole file: the disk works while the writer goes on.
#[derive(Debug, Default)]
pub struct Writeback {
    written: u64,
    started: u64,
}

impl Writeback {
    pub fn wrote(&mut self, file: &File, n: usize) {
        self.written += n as u64;
        if self.written - self.started >= WRITEBACK_EVERY {
            use std::os::fd::AsRawFd as _;
            // SAFETY: a plain syscall on an fd `file` keeps open; it only starts I/O, and a
            // failure is harmless (the fsync at the end still writes everything).
            unsafe {
                libc::sync_file_range(
                    file.as_raw_fd(),
                    self.started as libc::off64_t,
                    (self.written - self.started) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            self.started = self.written;
        }
    }
}

/// Creates a temp file in `dir` and takes an exclusive `flock` on it for as long as it is
/// open. Flocks die with their process, so [`remove_if_stale`] in another process can tell a
/// temp file being written from one a killed process left. Should a cleaner take the lock and
/// unlink the file in the instant between creation and locking, a fresh one is made.
pub fn locked_tempfile(
    builder: &tempfile::Builder<'_, '_>,
    dir: &Path,
) -> io::Result<tempfile::NamedTempFile> {
    use std::os::unix::fs::MetadataExt as _;
    for _ in 0..16 {
        let tmp = builder.tempfile_in(dir)?;
        if try_lock(tmp.as_file())? && tmp.as_file().metadata()?.nlink() > 0 {
            return Ok(tmp);
        }
    }
    Err(io::Error::other(format!(
        "could not create a locked temp file in {}",
        dir.display()
    )))
}

/// `flock(LOCK_EX | LOCK_NB)`: false when another open file holds the lock.
fn try_lock(f: &File) -> io::Result<bool> {
    use std::os::fd::AsRawFd as _;
    loop {
        // SAFETY: flock on a valid, open descriptor.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// True when no live process holds the temp file at `path` (see [`locked_tempfile`]).
pub fn is_stale_temp(path: &Path) -> io::Result<bool> {
    let f = File::open(path)?;
    try_lock(&f)
}

/// Removes the temp file at `path` unless a live process holds it; returns its size when
/// removed. A file already gone is `Ok(None)`.
pub fn remove_if_stale(path: &Path) -> io::Result<Option<u64>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !try_lock(&f)? {
        return Ok(None);
    }
    let size = f.metadata()?.len();
    match fs::remove_file(path) {
        Ok(()) => Ok(Some(size)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes `data` to `path` atomically: temp file beside it, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = locked_tempfile(tempfile::Builder::new().prefix(ATOMIC_TEMP_PREFIX), dir)
        .map_err(io_err(format!("creating temp file in {}", dir.display())))?;
    tmp.write_all(data)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(io_err(format!("writing {}", path.display())))?;
    tmp.persist(path).map_err(|e| StoreError::Io {
        context: format!("renaming into {}", path.display()),
        source: e.error,
    })?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_files_held_by_a_writer_are_not_stale() {
        let dir = tempfile::tempdir().unwrap();
        let live = locked_tempfile(tempfile::Builder::new().prefix("w."), dir.path()).unwrap();
        // Another open file description (as another process would have) cannot take it.
        assert!(!is_stale_temp(live.path()).unwrap());
        assert_eq!(remove_if_stale(live.path()).unwrap(), None);
        assert!(live.path().exists());
        // Unlocked (its writer died): stale, and removed.
        let dead = dir.path().join("w.dead");
        fs::write(&dead, b"12345").unwrap();
        assert!(is_stale_temp(&dead).unwrap());
        assert_eq!(remove_if_stale(&dead).unwrap(), Some(5));
        assert!(!dead.exists());
        assert_eq!(remove_if_stale(&dead).unwrap(), None);
        // Once the writer is done the lock goes with it.
        let path = live.path().to_path_buf();
        let (_f, kept) = live.keep().unwrap();
        drop(_f);
        assert!(is_stale_temp(&kept).unwrap());
        assert_eq!(kept, path);
    }

    #[test]
    fn ingest_verifies_digest_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let d = store.write_bytes(b"hello").unwrap();
        assert_eq!(store.read_blob(&d).unwrap(), b"hello");
        assert!(store.write_bytes(b"hello").is_ok());
        let wrong = Digest::sha256_of(b"other");
        let err = store
            .ingest(&wrong, None, &mut &b"hello"[..], &mut |_| {})
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&wrong.to_string()) && msg.contains(&d.to_string()),
            "{msg}"
        );
        assert!(!store.contains(&wrong));
        assert_eq!(
            fs::read_dir(dir.path().join("content/ingest"))
                .unwrap()
                .count(),
            0
        );
    }
}
