//! A layer blob that is still in the registry, read as if it were local: byte ranges come from
//! the chunk cache or, for chunks not there yet, from HTTP Range requests (each chunk checked
//! against the sha256 recorded when the layer was indexed, so a registry or mirror cannot
//! feed different bytes). In the background the whole blob is downloaded into the content
//! store (digest checked); from then on reads go to the local file.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, info_span, warn};

use super::client::Client;
use super::source::Connect;
use super::{Reference, RegistryError};
use crate::blob::{pread_full, BlobBytes};
use crate::chunks::{sha256, ChunkCache, ChunkHash};
use crate::digest::Digest;
use crate::store::ContentStore;

/// Compressed bytes per chunk of a lazily read blob (the unit fetched, cached and checked):
/// small, so a read fetches little more than the span it decodes.
pub const CHUNK_SIZE: u64 = 256 << 10;
const MIN_CHUNK: u64 = 64 << 10;
const MAX_CHUNK: u64 = 64 << 20;
/// Chunks kept in memory per blob, so consecutive small reads of one chunk do not each read
/// and hash it from disk.
const HOT_CHUNKS: usize = 8;
/// The background download yields to reads: it starts once no read of this process has had to
/// fetch for `IDLE_BEFORE_BACKGROUND`, pauses while one fetched within `YIELD_TO_READS`, and
/// asks for at most `BACKGROUND_REQUEST` bytes at a time, so a read never queues behind much.
const IDLE_BEFORE_BACKGROUND: Duration = Duration::from_millis(1500);
const YIELD_TO_READS: Duration = Duration::from_millis(500);
const BACKGROUND_REQUEST: u64 = 2 << 20;
/// Range requests a trace prefetch keeps in flight per blob.
pub const PREFETCH_PARALLEL: usize = 4;

/// When a read of this process last had to fetch from a registry (any blob).
fn demand_clock() -> &'static Mutex<Option<Instant>> {
    static LAST: OnceLock<Mutex<Option<Instant>>> = OnceLock::new();
    LAST.get_or_init(|| Mutex::new(None))
}

fn note_demand() {
    *demand_clock().lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
}

/// Time since a read last fetched (`None`: never).
fn since_demand() -> Option<Duration> {
    demand_clock()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .map(|t| t.elapsed())
}

pub fn remote_rel_path(blob: &Digest) -> String {
    format!("index/{}.remote", blob.hex())
}

/// Where a lazily pulled blob lives and how to check it (the `.remote` file of a blob row).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteInfo {
    /// The image reference it was pulled by (its registry and repository serve the blob).
    pub reference: String,
    pub mirrors: Vec<String>,
    pub insecure: bool,
    pub size: u64,
    pub chunk_size: u64,
    /// sha256 of every chunk; empty when the spans are checked instead (`span_digests`).
    pub chunk_hashes: Vec<ChunkHash>,
    /// Download the whole blob in the background once it is mounted.
    pub background: bool,
    /// sha256 of each span's uncompressed bytes (eStargz chunk digests), checked on decode.
    #[serde(default)]
    pub span_digests: Vec<Option<ChunkHash>>,
    /// The blob's own layer index (relative to the root) when its span map is laid out on it
    /// rather than on the tar stream (an eStargz TOC), so no other blob may share it.
    #[serde(default)]
    pub toc_index: Option<String>,
}

impl RemoteInfo {
    pub fn validate(&self, blob: &Digest) -> Result<(), RegistryError> {
        let bad = |m: String| RegistryError::Invalid(format!("remote blob {blob}: {m}"));
        if !(MIN_CHUNK..=MAX_CHUNK).contains(&self.chunk_size) {
            return Err(bad(format!("chunk size {} out of range", self.chunk_size)));
        }
        let checked_by_spans = self.chunk_hashes.is_empty() && !self.span_digests.is_empty();
        if !checked_by_spans
            && self.chunk_hashes.len() as u64 != self.size.div_ceil(self.chunk_size)
        {
            return Err(bad(format!(
                "{} chunk hashes for {} bytes in chunks of {}",
                self.chunk_hashes.len(),
                self.size,
                self.chunk_size
            )));
        }
        Reference::parse(&self.reference)?;
        Ok(())
    }

    pub fn load(path: &Path, blob: &Digest) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let info: RemoteInfo = postcard::from_bytes(&data)
            .with_context(|| format!("{} is corrupt", path.display()))?;
        info.validate(blob)?;
        Ok(info)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    pub fn connect(&self) -> Connect {
        Connect {
            mirrors: self.mirrors.clone(),
            insecure: self.insecure,
            ..Connect::default()
        }
    }
}

/// The sha256 of every `chunk_size` piece of a local blob.
pub fn chunk_hashes(path: &Path, chunk_size: u64) -> io::Result<Vec<ChunkHash>> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; chunk_size as usize];
    let mut out = Vec::new();
    loop {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..])? {
                0 => break,
                k => n += k,
            }
        }
        if n == 0 {
            break;
        }
        out.push(sha256(&buf[..n]));
        if n < buf.len() {
            break;
        }
    }
    Ok(out)
}

pub struct RemoteBlob {
    digest: Digest,
    info: RemoteInfo,
    clients: Vec<Client>,
    cache: Arc<ChunkCache>,
    blob_path: PathBuf,
    local: OnceLock<File>,
    /// When the store was last looked at for the blob (ms since `opened`): another process
    /// may download it, but a read must not pay an `open` each time to find out.
    looked: AtomicU64,
    opened: Instant,
    /// Chunks some thread is fetching now (others wait for them instead of fetching too).
    inflight: Mutex<HashSet<u64>>,
    fetched: Condvar,
    hot: Mutex<lru::LruCache<u64, Arc<Vec<u8>>>>,
}

impl std::fmt::Debug for RemoteBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteBlob")
            .field("digest", &self.digest)
            .field("reference", &self.info.reference)
            .finish()
    }
}

fn io_err(e: RegistryError) -> io::Error {
    match e {
        RegistryError::Io { source, .. } => source,
        other => io::Error::other(other.to_string()),
    }
}

impl RemoteBlob {
    pub fn open(
        store: &ContentStore,
        digest: &Digest,
        info: RemoteInfo,
        cache: Arc<ChunkCache>,
    ) -> Result<Arc<Self>, RegistryError> {
        info.validate(digest)?;
        let reference = Reference::parse(&info.reference)?;
        let clients = info.connect().clients(&reference)?;
        Ok(Arc::new(Self {
            digest: digest.clone(),
            clients,
            cache,
            blob_path: store.blob_path(digest),
            local: OnceLock::new(),
            looked: AtomicU64::new(0),
            opened: Instant::now(),
            inflight: Mutex::new(HashSet::new()),
            fetched: Condvar::new(),
            hot: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(HOT_CHUNKS).unwrap_or(NonZeroUsize::MIN),
            )),
            info,
        }))
    }

    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// The local blob once it is in the store (downloaded in the background, by another
    /// process, or by a later full pull).
    fn local(&self) -> Option<&File> {
        if let Some(f) = self.local.get() {
            return Some(f);
        }
        const LOOK_EVERY_MS: u64 = 1000;
        let now = self.opened.elapsed().as_millis() as u64 + LOOK_EVERY_MS;
        let last = self.looked.load(Ordering::Relaxed);
        if now < last + LOOK_EVERY_MS
            || self
                .looked
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return None;
        }
        self.open_local()
    }

    /// Opens the blob in the store, if it is there whole (a download of ours just put it).
    fn open_local(&self) -> Option<&File> {
        if let Some(f) = self.local.get() {
            return Some(f);
        }
        let f = File::open(&self.blob_path).ok()?;
        if f.metadata().ok()?.len() != self.info.size {
            return None;
        }
        Some(self.local.get_or_init(|| f))
    }

    fn chunk_count(&self) -> u64 {
        self.info.size.div_ceil(self.info.chunk_size)
    }

    /// `[start, end)` of chunk `i` in the blob.
    fn chunk_range(&self, i: u64) -> (u64, u64) {
        let start = i * self.info.chunk_size;
        (start, (start + self.info.chunk_size).min(self.info.size))
    }

    /// The chunk's recorded sha256 (none when spans are checked instead).
    fn hash(&self, i: u64) -> Option<&ChunkHash> {
        self.info.chunk_hashes.get(i as usize)
    }

    /// Chunks `first..=last` in one Range request, each checked; mirrors first, then the
    /// origin; a chunk that does not match its hash is asked for at the next endpoint.
    /// `demand`: a read waits for it (the background download yields to such fetches).
    fn fetch_run(
        &self,
        first: u64,
        last: u64,
        demand: bool,
    ) -> Result<Vec<Vec<u8>>, RegistryError> {
        let (start, _) = self.chunk_range(first);
        let (_, end) = self.chunk_range(last);
        let _span = info_span!("fetch_range", blob = %self.digest, start, end, demand).entered();
        if demand {
            note_demand();
        }
        let mut last_err = None;
        // Each endpoint twice: a bad answer may be a one-off (a flipped bit on the way).
        let attempts = self.clients.iter().flat_map(|c| [c, c]);
        for c in attempts {
            let got = c.read_range(&self.digest, start, end - start);
            if demand {
                // The read waited until now: the background download pauses from here on.
                note_demand();
            }
            let data = match got {
                Ok(d) => d,
                Err(e) => {
                    warn!(endpoint = %c.endpoint.base, error = %e, "range request failed");
                    last_err = Some(e);
                    continue;
                }
            };
            let mut out = Vec::new();
            let mut bad = None;
            for i in first..=last {
                let (a, b) = self.chunk_range(i);
                let piece = &data[(a - start) as usize..(b - start) as usize];
                if self.hash(i).is_some_and(|h| &sha256(piece) != h) {
                    bad = Some(i);
                    break;
                }
                out.push(piece.to_vec());
            }
            match bad {
                None => return Ok(out),
                Some(i) => {
                    warn!(endpoint = %c.endpoint.base, chunk = i, "chunk does not match its recorded sha256");
                    last_err = Some(RegistryError::Invalid(format!(
                        "blob {}: chunk {i} from {} does not match its recorded sha256",
                        self.digest, c.endpoint.host
                    )));
                }
            }
        }
        Err(last_err.unwrap_or_else(|| RegistryError::Invalid("no registry endpoint".into())))
    }

    /// Chunks `first..=last`, from memory, the cache, or (missing runs in one request each)
    /// the registry.
    fn chunks(&self, first: u64, last: u64) -> io::Result<Vec<Arc<Vec<u8>>>> {
        self.chunks_as(first, last, true)
    }

    /// [`RemoteBlob::chunks`] for a read (`demand`) or for the background download, which
    /// neither counts as a read (it yields to them) nor fills the memory cache reads use.
    fn chunks_as(&self, first: u64, last: u64, demand: bool) -> io::Result<Vec<Arc<Vec<u8>>>> {
        let mut have: Vec<Option<Arc<Vec<u8>>>> = Vec::new();
        {
            let mut hot = self.hot.lock().unwrap_or_else(|p| p.into_inner());
            for i in first..=last {
                have.push(hot.get(&i).cloned());
            }
        }
        for (k, i) in (first..=last).enumerate() {
            if have[k].is_none() {
                have[k] = self.cache.get(&self.digest, i, self.hash(i)).map(Arc::new);
            }
        }
        // Claim the missing chunks nobody is fetching; wait for the others.
        let mut mine = Vec::new();
        let mut theirs = Vec::new();
        {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            for (k, i) in (first..=last).enumerate() {
                if have[k].is_some() {
                    continue;
                }
                if inflight.insert(i) {
                    mine.push(i);
                } else {
                    theirs.push(i);
                }
            }
        }
        let result = self.fetch_claimed(&mine, first, &mut have, demand);
        {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            for i in &mine {
                inflight.remove(i);
            }
        }
        self.fetched.notify_all();
        result?;
        if !theirs.is_empty() {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            while theirs.iter().any(|i| inflight.contains(i)) {
                inflight = self
                    .fetched
                    .wait(inflight)
                    .unwrap_or_else(|p| p.into_inner());
            }
        }
        // What others fetched (or what was evicted meanwhile) comes from the cache — or from
        // the blob, when the download that fetched it completed (and dropped its chunks) — else
        // again.
        for (k, i) in (first..=last).enumerate() {
            if have[k].is_none() {
                let data = match self.cache.get(&self.digest, i, self.hash(i)) {
                    Some(d) => d,
                    None => match self.local() {
                        Some(f) => {
                            let (a, b) = self.chunk_range(i);
                            let mut buf = vec![0; (b - a) as usize];
                            let n = pread_full(f, a, &mut buf)?;
                            buf.truncate(n);
                            buf
                        }
                        None => self
                            .fetch_run(i, i, demand)
                            .map_err(io_err)?
                            .pop()
                            .unwrap_or_default(),
                    },
                };
                have[k] = Some(Arc::new(data));
            }
        }
        let out: Vec<Arc<Vec<u8>>> = have.into_iter().flatten().collect();
        if demand {
            let mut hot = self.hot.lock().unwrap_or_else(|p| p.into_inner());
            for (k, c) in out.iter().enumerate() {
                hot.put(first + k as u64, c.clone());
            }
        }
        Ok(out)
    }

    /// Fetches the claimed chunks (runs of consecutive ones in one request each) into the
    /// cache and `have` (indexed from `first`).
    fn fetch_claimed(
        &self,
        mine: &[u64],
        first: u64,
        have: &mut [Option<Arc<Vec<u8>>>],
        demand: bool,
    ) -> io::Result<()> {
        let mut k = 0;
        while k < mine.len() {
            let mut j = k;
            while j + 1 < mine.len() && mine[j + 1] == mine[j] + 1 {
                j += 1;
            }
            let run = self.fetch_run(mine[k], mine[j], demand).map_err(io_err)?;
            for (n, data) in run.into_iter().enumerate() {
                let i = mine[k] + n as u64;
                if let Err(e) = self.cache.put(&self.digest, i, &data) {
                    warn!(blob = %self.digest, chunk = i, error = %e, "could not cache a chunk");
                }
                have[(i - first) as usize] = Some(Arc::new(data));
            }
            k = j + 1;
        }
        Ok(())
    }

    /// Fetches the given chunks not cached yet, `parallel` requests at a time, runs of
    /// consecutive chunks in one request each (a trace's prefetch). Returns the chunks and
    /// bytes fetched.
    pub fn prefetch(self: &Arc<Self>, wanted: &[u64], parallel: usize) -> (usize, u64) {
        if self.local().is_some() {
            return (0, 0);
        }
        // In the order given (first need first), each chunk once, neighbours in one request
        // of at most PREFETCH_RUN chunks.
        const PREFETCH_RUN: u64 = 16;
        let mut seen = HashSet::new();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &i in wanted {
            if i >= self.chunk_count() || !seen.insert(i) || self.cache.contains(&self.digest, i) {
                continue;
            }
            match runs.last_mut() {
                Some((a, b)) if *b + 1 == i && i - *a < PREFETCH_RUN => *b = i,
                _ => runs.push((i, i)),
            }
        }
        let runs = Mutex::new(runs.into_iter());
        let (done, bytes) = (AtomicU64::new(0), AtomicU64::new(0));
        std::thread::scope(|s| {
            for _ in 0..parallel.max(1) {
                s.spawn(|| loop {
                    let next = runs.lock().unwrap_or_else(|p| p.into_inner()).next();
                    let Some((a, b)) = next else { break };
                    match self.chunks(a, b) {
                        Ok(c) => {
                            done.fetch_add(c.len() as u64, Ordering::Relaxed);
                            let n: usize = c.iter().map(|c| c.len()).sum();
                            bytes.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(e) => warn!(blob = %self.digest, error = %e, "prefetch failed"),
                    }
                });
            }
        });
        (
            done.load(Ordering::Relaxed) as usize,
            bytes.load(Ordering::Relaxed),
        )
    }

    /// The chunks an access trace needs, in the order of first need.
    pub fn chunks_for_trace(
        &self,
        trace: &crate::trace::Trace,
        index: &crate::index::LayerIndex,
        map: &crate::blob::SpanMap,
    ) -> Vec<u64> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for (a, b) in trace.stream_ranges(index) {
            for (ca, cb) in map.stream_to_blob(a, b) {
                out.extend(self.chunks_of(ca, cb).filter(|c| seen.insert(*c)));
            }
        }
        out
    }

    /// Fetches what `chunks` names in the background, first things first (a trace at mount),
    /// at most half the chunk cache's budget (more would evict what it fetched).
    pub fn prefetch_in_background(self: &Arc<Self>, mut chunks: Vec<u64>) {
        if chunks.is_empty() || self.local().is_some() {
            return;
        }
        let most = (self.cache.budget() / 2 / self.info.chunk_size).max(1) as usize;
        chunks.truncate(most);
        let this = self.clone();
        let spawned = std::thread::Builder::new()
            .name("lazysnap-prefetch".into())
            .spawn(move || {
                let _span = info_span!("trace_prefetch", blob = %this.digest).entered();
                let (n, bytes) = this.prefetch(&chunks, PREFETCH_PARALLEL);
                debug!(chunks = n, bytes, "prefetched the traced chunks");
            });
        if let Err(e) = spawned {
            warn!(error = %e, "could not start the trace prefetch");
        }
    }

    /// The chunks holding blob bytes `[start, end)`.
    pub fn chunks_of(&self, start: u64, end: u64) -> std::ops::RangeInclusive<u64> {
        let last = end.min(self.info.size).saturating_sub(1) / self.info.chunk_size;
        start / self.info.chunk_size..=last
    }

    /// Downloads the whole blob into the store in the background (one process at a time per
    /// blob: a lock file under the chunk cache), yielding to reads that fetch.
    pub fn start_background(self: &Arc<Self>, store: ContentStore, lock_dir: PathBuf) {
        if !self.info.background || self.local().is_some() {
            return;
        }
        // A fresh mount counts as reading: the container's first reads come right after it.
        note_demand();
        let this = self.clone();
        let spawned = std::thread::Builder::new()
            .name("lazysnap-fetch".into())
            .spawn(move || {
                let _span = info_span!("background_fetch", blob = %this.digest).entered();
                // Reads first: the burst of a starting container has the link to itself.
                while since_demand().is_some_and(|d| d < IDLE_BEFORE_BACKGROUND) {
                    std::thread::sleep(IDLE_BEFORE_BACKGROUND / 4);
                }
                match this.download(&store, &lock_dir, false) {
                    Ok(true) => info!("blob downloaded; reads are local from now on"),
                    Ok(false) => debug!("another process is downloading the blob"),
                    Err(e) => {
                        warn!(error = %e, "background download failed; reads keep fetching ranges")
                    }
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "could not start the background download");
        }
    }

    /// Downloads the whole blob into the store unless it is there. With `wait`, waits for a
    /// download another process is running; without, leaves it to that process (false).
    pub fn download(
        &self,
        store: &ContentStore,
        lock_dir: &Path,
        wait: bool,
    ) -> anyhow::Result<bool> {
        use anyhow::Context as _;
        std::fs::create_dir_all(lock_dir)?;
        let lock_path = lock_dir.join(format!("{}.fetch", self.digest.hex()));
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        // SAFETY: flock on a valid fd we own.
        let how = if wait {
            libc::LOCK_EX
        } else {
            libc::LOCK_EX | libc::LOCK_NB
        };
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), how) } != 0 {
            if wait {
                anyhow::bail!(
                    "locking {}: {}",
                    lock_path.display(),
                    io::Error::last_os_error()
                );
            }
            return Ok(false);
        }
        if self.open_local().is_some() {
            return Ok(true);
        }
        let mut assembled = Assembled {
            blob: self,
            next: 0,
            buf: Vec::new(),
            at: 0,
            polite: !wait,
        };
        store
            .ingest(
                &self.digest,
                Some(self.info.size),
                &mut assembled,
                &mut |_| {},
            )
            .with_context(|| format!("downloading {}", self.digest))?;
        if self.open_local().is_none() {
            anyhow::bail!("downloaded {} but cannot open it", self.digest);
        }
        self.cache.remove_blob(&self.digest);
        self.hot.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let _ = std::fs::remove_file(&lock_path);
        Ok(true)
    }
}

/// Makes a lazily pulled blob local (for `push`, `export`, re-indexing): downloads it into the
/// store, digest checked, unless it is there. A blob that is neither local nor remote is left
/// for the caller to report.
pub fn ensure_local(root: &crate::root::Root, digest: &Digest) -> anyhow::Result<()> {
    use anyhow::Context as _;
    if root.store.contains(digest) {
        return Ok(());
    }
    let Some(rel) = root.meta.blob(digest.as_str())?.and_then(|b| b.remote) else {
        return Ok(());
    };
    let _span = info_span!("ensure_local", blob = %digest).entered();
    let info = RemoteInfo::load(&root.abs(&rel), digest)?;
    let blob = RemoteBlob::open(&root.store, digest, info, root.chunk_cache()?)?;
    blob.download(&root.store, &root.path.join(crate::chunks::DIR), true)
        .with_context(|| format!("downloading lazily pulled blob {digest}"))?;
    Ok(())
}

/// A whole blob as a stream for the content store's ingest (which checks its digest): the
/// chunks already cached, the rest by Range requests of at most [`BACKGROUND_REQUEST`], each
/// claimed in flight and cached, so reads meanwhile neither fetch them again nor miss them —
/// nothing fetched twice. Polite (the background download): waits while reads fetch.
struct Assembled<'a> {
    blob: &'a RemoteBlob,
    /// Next chunk to deliver.
    next: u64,
    buf: Vec<u8>,
    at: usize,
    polite: bool,
}

impl Assembled<'_> {
    fn refill(&mut self) -> io::Result<()> {
        let b = self.blob;
        let i = self.next;
        if let Some(c) = b.cache.get(&b.digest, i, b.hash(i)) {
            self.buf = c;
            self.at = 0;
            self.next += 1;
            return Ok(());
        }
        if self.polite {
            while since_demand().is_some_and(|d| d < YIELD_TO_READS) {
                std::thread::sleep(YIELD_TO_READS / 4);
            }
        }
        let per_request = (BACKGROUND_REQUEST / b.info.chunk_size).max(1);
        let mut last = i;
        while last + 1 < b.chunk_count()
            && last + 1 - i < per_request
            && !b.cache.contains(&b.digest, last + 1)
        {
            last += 1;
        }
        // Through the reads' in-flight claims and cache: reads of these chunks wait for this
        // request and find them cached; one a read is fetching is waited for, not fetched again.
        let run = b.chunks_as(i, last, false)?;
        self.buf.clear();
        for c in &run {
            self.buf.extend_from_slice(c);
        }
        self.at = 0;
        self.next = last + 1;
        Ok(())
    }
}

impl Read for Assembled<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.at == self.buf.len() {
            if self.next >= self.blob.chunk_count() {
                return Ok(0);
            }
            self.refill()?;
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl BlobBytes for RemoteBlob {
    fn read_full_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        if let Some(f) = self.local() {
            return pread_full(f, off, buf);
        }
        if off >= self.info.size || buf.is_empty() {
            return Ok(0);
        }
        let want = (self.info.size - off).min(buf.len() as u64) as usize;
        let end = off + want as u64;
        let range = self.chunks_of(off, end);
        let first = *range.start();
        let chunks = self.chunks(first, *range.end())?;
        let mut done = 0;
        for (k, c) in chunks.iter().enumerate() {
            let (a, _) = self.chunk_range(first + k as u64);
            let pos = off + done as u64;
            let from = (pos - a) as usize;
            if from >= c.len() {
                break;
            }
            let n = (c.len() - from).min(want - done);
            buf[done..done + n].copy_from_slice(&c[from..from + n]);
            done += n;
            if done == want {
                break;
            }
        }
        Ok(done)
    }

    fn is_remote(&self) -> bool {
        self.local.get().is_none()
    }

    fn invalidate(&self, start: u64, end: u64) {
        if self.local.get().is_some() || start >= self.info.size {
            return;
        }
        let mut hot = self.hot.lock().unwrap_or_else(|p| p.into_inner());
        for i in self.chunks_of(start, end) {
            hot.pop(&i);
            self.cache.remove(&self.digest, i);
        }
    }

    fn will_need(&self, start: u64, end: u64) {
        if self.local().is_some() || start >= end || start >= self.info.size {
            return;
        }
        let r = self.chunks_of(start, end);
        if let Err(e) = self.chunks(*r.start(), *r.end()) {
            debug!(blob = %self.digest, error = %e, "fetching ahead failed; the read will retry");
        }
    }
}
