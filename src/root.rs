//! The lazysnap root directory: where the content store, indexes, metadata and snapshots live.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::meta::Meta;
use crate::store::ContentStore;

/// The default root: `$LAZYSNAP_ROOT`, else `/var/lib/lazysnap` for root (of the
/// initial user namespace), else
/// `$XDG_DATA_HOME/lazysnap` (`~/.local/share/lazysnap`).
pub fn default_root() -> PathBuf {
    if let Some(r) = std::env::var_os("LAZYSNAP_ROOT").filter(|r| !r.is_empty()) {
        return PathBuf::from(r);
    }
    // Root of a user namespace (`unshare -r`, rootless containerd) is still the user.
    if lazysnap_fuse::privileged() {
        return PathBuf::from("/var/lib/lazysnap");
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    data.join("lazysnap")
}

pub struct Root {
    pub path: PathBuf,
    pub store: ContentStore,
    pub meta: Meta,
    /// What a layer may expand to when indexed (the CLI's `--max-layer-size`/`--max-layer-ratio`).
    pub limits: crate::unpack::Limits,
    /// The chunk cache of lazily pulled blobs, opened on first use.
    chunks: std::sync::OnceLock<std::sync::Arc<crate::chunks::ChunkCache>>,
}

impl Root {
    /// Opens (creating) the root and removes temp files killed processes left (as
    /// containerd's content store drops stale ingests); temp files live processes are
    /// writing are locked and stay.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let root = Self::open_as_is(path)?;
        match root.clean_temp_files() {
            Ok((0, _)) => {}
            Ok((files, bytes)) => {
                tracing::info!(files, bytes, "removed temp files of interrupted operations")
            }
            Err(e) => tracing::warn!(error = %e, "could not remove stale temp files"),
        }
        Ok(root)
    }

    /// Opens (creating) the root without removing anything (for `check`, which reports
    /// what it finds).
    pub fn open_as_is(path: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(path)
            .with_context(|| format!("creating root {}", path.display()))?;
        for sub in ["index", "snapshots"] {
            std::fs::create_dir_all(path.join(sub))
                .with_context(|| format!("creating {}", path.join(sub).display()))?;
        }
        // The lock file is part of the layout from the start (see `StoreLock`).
        let lock = path.join("gc.lock");
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock)
            .with_context(|| format!("creating {}", lock.display()))?;
        let store = ContentStore::open(path)?;
        let meta = Meta::open(&path.join("meta.db"))
            .with_context(|| format!("opening {}", path.join("meta.db").display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            store,
            meta,
            limits: crate::unpack::Limits::default(),
            chunks: std::sync::OnceLock::new(),
        })
    }

    /// Temp files of writes in progress or interrupted: partial ingests (blobs, commits),
    /// `write_atomic` temp files and local copies being written in `index/`.
    pub fn temp_files(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.store.ingest_dir())? {
            out.push(e?.path());
        }
        for e in std::fs::read_dir(self.index_dir())? {
            let e = e?;
            if is_temp_name(&e.file_name().to_string_lossy()) {
                out.push(e.path());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes the temp files no live process holds. Returns (files, bytes) removed.
    pub fn clean_temp_files(&self) -> std::io::Result<(usize, u64)> {
        let (mut files, mut bytes) = (0, 0);
        for p in self.temp_files()? {
            if let Some(n) = crate::store::remove_if_stale(&p)? {
                files += 1;
                bytes += n;
            }
        }
        Ok((files, bytes))
    }

    /// The chunk cache of lazily pulled blobs (one per process and root).
    pub fn chunk_cache(&self) -> anyhow::Result<std::sync::Arc<crate::chunks::ChunkCache>> {
        if let Some(c) = self.chunks.get() {
            return Ok(c.clone());
        }
        let c = crate::chunks::ChunkCache::open(&self.path)
            .with_context(|| format!("opening the chunk cache under {}", self.path.display()))?;
        Ok(self.chunks.get_or_init(|| std::sync::Arc::new(c)).clone())
    }

    pub fn index_dir(&self) -> PathBuf {
        self.path.join("index")
    }

    /// Paths are stored relative to the root so a root can be moved.
    pub fn abs(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }
}

/// Names of temp files beside their destination in `index/`.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with(crate::store::ATOMIC_TEMP_PREFIX)
        || name.starts_with(crate::blob::COPY_TEMP_PREFIX)
}

/// Garbage collection against writers, across processes: an import, commit or apply holds the
/// root's `gc.lock` shared while it has blobs or index files on disk that no row references
/// yet; `gc` and the cleanup of a failed import hold it exclusive, so they never take what a
/// concurrent writer is about to record (containerd protects such content with leases).
pub struct StoreLock {
    _file: std::fs::File,
}

impl Root {
    /// Shared: writers run side by side.
    pub fn writer_lock(&self) -> anyhow::Result<StoreLock> {
        self.store_lock(libc::LOCK_SH)
    }

    /// Exclusive: waits for the writers in flight.
    pub fn gc_lock(&self) -> anyhow::Result<StoreLock> {
        self.store_lock(libc::LOCK_EX)
    }

    fn store_lock(&self, op: i32) -> anyhow::Result<StoreLock> {
        lock_file(&self.path.join("gc.lock"), op)
    }
}

/// `flock(op)` on `path` (created if missing), held until the result is dropped.
pub fn lock_file(path: &Path, op: i32) -> anyhow::Result<StoreLock> {
    use std::os::fd::AsRawFd as _;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    loop {
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(StoreLock { _file: file });
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
}
