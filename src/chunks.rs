//! The chunk cache of lazily pulled blobs: fixed-size pieces of compressed blobs fetched from
//! a registry, kept on disk under `chunks/<blob hex>/<index>` so they outlive a mount and a
//! restart. Bounded: past its budget the least recently used chunks (by mtime, which a hit
//! refreshes) are removed, whichever process wrote them. Every chunk is checked against the
//! sha256 recorded for it when it is read back, so a damaged file is a miss, never bad data.

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use sha2::{Digest as _, Sha256};

use crate::digest::Digest;

/// Default budget: `LAZYSNAP_CHUNK_CACHE_BYTES` overrides it.
pub const DEFAULT_BUDGET: u64 = 4 << 30;
/// Directory under the root.
pub const DIR: &str = "chunks";
/// Prefix of chunk files being written (not yet renamed into place).
const TEMP_PREFIX: &str = ".tmp-";

pub type ChunkHash = [u8; 32];

pub fn sha256(data: &[u8]) -> ChunkHash {
    Sha256::digest(data).into()
}

pub struct ChunkCache {
    dir: PathBuf,
    budget: u64,
    /// Bytes under `dir` as this process last counted them (other processes add theirs; an
    /// eviction pass recounts).
    used: AtomicU64,
    evicting: Mutex<()>,
}

impl ChunkCache {
    /// Opens (creating) the cache under `root` with the budget from the environment.
    pub fn open(root: &Path) -> io::Result<Self> {
        let budget = std::env::var("LAZYSNAP_CHUNK_CACHE_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_BUDGET);
        Self::with_budget(&root.join(DIR), budget)
    }

    pub fn with_budget(dir: &Path, budget: u64) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let used = list(dir)?.iter().map(|c| c.size).sum();
        Ok(Self {
            dir: dir.to_path_buf(),
            budget,
            used: AtomicU64::new(used),
            evicting: Mutex::new(()),
        })
    }

    fn path(&self, blob: &Digest, idx: u64) -> PathBuf {
        self.dir.join(blob.hex()).join(idx.to_string())
    }

    /// The chunk if it is cached and hashes to `expect`; a chunk that does not is removed.
    /// (Without a hash, the caller checks what it decodes from the chunk.)
    pub fn get(&self, blob: &Digest, idx: u64, expect: Option<&ChunkHash>) -> Option<Vec<u8>> {
        let path = self.path(blob, idx);
        let data = fs::read(&path).ok()?;
        if expect.is_some_and(|e| &sha256(&data) != e) {
            tracing::warn!(path = %path.display(), "cached chunk is damaged; fetching it again");
            let _ = fs::remove_file(&path);
            return None;
        }
        // A hit makes the chunk recent (best effort: mtime is the LRU clock).
        if let Ok(f) = fs::File::options().write(true).open(&path) {
            let _ = f.set_modified(SystemTime::now());
        }
        Some(data)
    }

    /// Drops one chunk (it turned out bad).
    pub fn remove(&self, blob: &Digest, idx: u64) {
        let _ = fs::remove_file(self.path(blob, idx));
    }

    pub fn contains(&self, blob: &Digest, idx: u64) -> bool {
        self.path(blob, idx).is_file()
    }

    /// Stores a chunk (already checked by the caller), then evicts if over budget. No fsync:
    /// a chunk torn by a crash fails its hash and is fetched again.
    pub fn put(&self, blob: &Digest, idx: u64, data: &[u8]) -> io::Result<()> {
        let dir = self.dir.join(blob.hex());
        fs::create_dir_all(&dir)?;
        let mut tmp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(&dir)?;
        tmp.write_all(data)?;
        tmp.persist(dir.join(idx.to_string()))
            .map_err(|e| e.error)?;
        let used = self.used.fetch_add(data.len() as u64, Ordering::Relaxed) + data.len() as u64;
        if used > self.budget {
            self.evict();
        }
        Ok(())
    }

    /// Removes the oldest chunks until the cache is at 90% of its budget.
    pub fn evict(&self) {
        let _one = self.evicting.lock().unwrap_or_else(|p| p.into_inner());
        // Another thread may have evicted while this one waited.
        if self.used.load(Ordering::Relaxed) <= self.budget {
            return;
        }
        let _span = tracing::debug_span!("chunk_evict", dir = %self.dir.display()).entered();
        let Ok(mut chunks) = list(&self.dir) else {
            return;
        };
        let mut used: u64 = chunks.iter().map(|c| c.size).sum();
        let target = self.budget / 10 * 9;
        chunks.sort_by_key(|c| c.mtime);
        let mut removed = 0u64;
        for c in chunks {
            if used <= target {
                break;
            }
            if fs::remove_file(&c.path).is_ok() {
                used = used.saturating_sub(c.size);
                removed += 1;
            }
        }
        tracing::debug!(removed, used, "evicted chunks");
        self.used.store(used, Ordering::Relaxed);
    }

    /// Drops every chunk of `blob` (it is local now, or gone).
    pub fn remove_blob(&self, blob: &Digest) {
        let dir = self.dir.join(blob.hex());
        if let Ok(chunks) = list_dir(&dir) {
            let bytes: u64 = chunks.iter().map(|c| c.size).sum();
            let _ = self
                .used
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                    Some(u.saturating_sub(bytes))
                });
        }
        let _ = fs::remove_dir_all(dir);
    }

    /// Bytes the cache holds now (recounted).
    #[cfg(test)]
    fn bytes(&self) -> u64 {
        list(&self.dir).map_or(0, |c| c.iter().map(|c| c.size).sum())
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }
}

struct Chunk {
    path: PathBuf,
    size: u64,
    mtime: SystemTime,
}

/// Every chunk file under `dir` (one level of blob directories).
fn list(dir: &Path) -> io::Result<Vec<Chunk>> {
    let mut out = Vec::new();
    for blob in fs::read_dir(dir)? {
        let blob = blob?;
        if blob.file_type()?.is_dir() {
            out.extend(list_dir(&blob.path()).unwrap_or_default());
        }
    }
    Ok(out)
}

fn list_dir(dir: &Path) -> io::Result<Vec<Chunk>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let Ok(md) = e.metadata() else { continue };
        if !md.is_file() {
            continue;
        }
        out.push(Chunk {
            path: e.path(),
            size: md.len(),
            mtime: md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        });
    }
    Ok(out)
}

/// Blob directories in the cache (for gc and `df`).
pub fn cached_blobs(root: &Path) -> Vec<(String, u64)> {
    let Ok(rd) = fs::read_dir(root.join(DIR)) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| {
            let bytes = list_dir(&e.path()).map_or(0, |c| c.iter().map(|c| c.size).sum());
            (e.file_name().to_string_lossy().into_owned(), bytes)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(n: u8) -> Digest {
        Digest::parse(&format!("sha256:{}", format!("{n:02x}").repeat(32))).expect("digest")
    }

    #[test]
    fn stores_checks_and_evicts_the_oldest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ChunkCache::with_budget(dir.path(), 10_000).expect("open");
        let b = blob(1);
        let chunk = |i: u8| vec![i; 3000];
        for i in 0..3u8 {
            cache.put(&b, i as u64, &chunk(i)).expect("put");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // A hit refreshes chunk 0, so chunk 1 is the oldest.
        assert_eq!(cache.get(&b, 0, Some(&sha256(&chunk(0)))), Some(chunk(0)));
        std::thread::sleep(std::time::Duration::from_millis(20));
        cache.put(&b, 3, &chunk(3)).expect("put");
        assert!(cache.contains(&b, 0));
        assert!(!cache.contains(&b, 1), "least recently used chunk evicted");
        assert!(cache.contains(&b, 3));
        assert!(cache.bytes() <= 9_000);
        // A wrong hash is a miss and removes the file.
        assert_eq!(cache.get(&b, 3, Some(&sha256(b"other"))), None);
        assert!(!cache.contains(&b, 3));
        // Survives reopening.
        let again = ChunkCache::with_budget(dir.path(), 10_000).expect("reopen");
        assert_eq!(again.get(&b, 2, Some(&sha256(&chunk(2)))), Some(chunk(2)));
        again.remove_blob(&b);
        assert!(!again.contains(&b, 2));
    }
}
