//! Unpack without extraction: index each layer blob once (in parallel), check its diffID, and
//! record layer, blob, chain and the committed snapshot of each chain level — one transaction
//! per layer.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;

use anyhow::{bail, Context as _};
use rayon::prelude::*;
use tracing::{debug, info_span};

use crate::blob::{Compression, FineRegion, IndexingReader, SpanMap, SpanOptions};
use crate::digest::Digest;
use crate::image::{compression_name, LayerDesc};
use crate::index::{build_index_observed, LayerIndex};
use crate::meta::{BlobRow, ChainRow, LayerRow};
use crate::root::Root;
use crate::store::write_atomic;

/// Span size of the random-access map: the most a read ever decompresses.
pub const SPAN_SIZE: u64 = 4 << 20;

/// Files at least this big get restart points [`crate::blob::FINE_SPAN_SIZE`] apart: big
/// files are the ones read at random (databases, model weights, big binaries), so a 4 KiB read
/// there should not decompress a whole span; smaller files are mostly read whole.
pub const FINE_FILE_MIN: u64 = 32 << 20;

/// Default [`Limits::max_layer_size`]: 256 GiB uncompressed.
pub const DEFAULT_MAX_LAYER_SIZE: u64 = 256 << 30;
/// Default [`Limits::max_ratio`]: gzip cannot pass ~1032:1, so this only stops zstd bombs.
pub const DEFAULT_MAX_RATIO: u64 = 10_000;
/// Uncompressed bytes a layer may always have, whatever its compression ratio.
pub const RATIO_FLOOR: u64 = 1 << 30;

/// What one layer may expand to: a decompression bomb is refused with an error, not indexed
/// until the disk or the night runs out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most uncompressed bytes one layer may have.
    pub max_layer_size: u64,
    /// Most uncompressed bytes per compressed byte of the blob, once a layer passes
    /// [`RATIO_FLOOR`] (0: no ratio limit).
    pub max_ratio: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_layer_size: DEFAULT_MAX_LAYER_SIZE,
            max_ratio: DEFAULT_MAX_RATIO,
        }
    }
}

impl Limits {
    /// The most uncompressed bytes a blob of `compressed` bytes may expand to, and why.
    pub fn cap(&self, compressed: u64) -> (u64, String) {
        let by_size = (
            self.max_layer_size,
            format!(
                "the maximum layer size of {} bytes (--max-layer-size)",
                self.max_layer_size
            ),
        );
        if self.max_ratio == 0 {
            return by_size;
        }
        let by_ratio = compressed.saturating_mul(self.max_ratio).max(RATIO_FLOOR);
        if by_ratio < self.max_layer_size {
            (
                by_ratio,
                format!(
                    "{by_ratio} bytes, {} times the {compressed}-byte blob (at least \
                     {RATIO_FLOOR}; --max-layer-ratio)",
                    self.max_ratio
                ),
            )
        } else {
            by_size
        }
    }
}

/// A layer expanded past its [`Limits`].
#[derive(Debug, thiserror::Error)]
#[error("uncompressed layer data exceeds {why}: refusing a likely decompression bomb")]
pub struct LayerTooLarge {
    pub why: String,
}

/// The limit error inside an indexing error, if that is what stopped it.
fn too_large(e: &crate::index::BuildError) -> Option<&LayerTooLarge> {
    match e {
        crate::index::BuildError::Tar(crate::index::tar::TarError::Io { source, .. }) => {
            source.get_ref()?.downcast_ref()
        }
        _ => None,
    }
}

/// Fails a read once more than `limit` bytes came through.
struct LimitedReader<R> {
    inner: R,
    limit: u64,
    why: String,
    n: u64,
}

impl<R: Read> Read for LimitedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let got = self.inner.read(buf)?;
        self.n += got as u64;
        if self.n > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                LayerTooLarge {
                    why: self.why.clone(),
                },
            ));
        }
        Ok(got)
    }
}

/// Bytes of compressed input consumed, for progress bars.
#[derive(Default)]
pub struct UnpackProgress {
    pub compressed_bytes: AtomicU64,
    pub layers_done: AtomicU64,
}

/// What indexing one blob produced, before it is recorded.
pub struct Indexed {
    pub layer: LayerRow,
    pub blob: BlobRow,
}

pub fn index_rel_path(diff_id: &Digest) -> String {
    format!("index/{}", diff_id.hex())
}
pub fn spans_rel_path(blob: &Digest) -> String {
    format!("index/{}.spans", blob.hex())
}
pub fn local_copy_rel_path(blob: &Digest) -> String {
    format!("index/{}.seekable.zst", blob.hex())
}

/// Counts bytes read from the compressed blob.
struct CountingReader<R> {
    inner: R,
    counter: Arc<UnpackProgress>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter
            .compressed_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Decompresses on its own thread so hashing and tar parsing overlap with inflate (the pass
/// then runs at decompression speed on two cores). Hands the inner reader back at the end.
/// Chunks go back to the decompressing thread once read, so it reuses them instead of
/// allocating (and faulting in) a fresh megabyte each time.
struct ThreadedReader<R: Read + Send + 'static> {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    free: mpsc::SyncSender<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
    handle: Option<thread::JoinHandle<R>>,
    done: bool,
}

/// Size of the chunks between the two threads.
const CHUNK: usize = 1 << 20;
/// A chunk is sent once less room than this is left: zstd decodes whole blocks (128 KiB) into
/// the chunk when they fit, and goes through a buffer when they do not.
const CHUNK_SLACK: usize = 128 << 10;

impl<R: Read + Send + 'static> ThreadedReader<R> {
    fn spawn(mut inner: R) -> Self {
        let (tx, rx) = mpsc::sync_channel::<io::Result<Vec<u8>>>(8);
        let (free, free_rx) = mpsc::sync_channel::<Vec<u8>>(10);
        let handle = thread::spawn(move || loop {
            let mut buf = free_rx.try_recv().unwrap_or_default();
            buf.resize(CHUNK, 0);
            let mut filled = 0;
            let result = loop {
                match inner.read(&mut buf[filled..]) {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        filled += n;
                        if filled + CHUNK_SLACK > buf.len() {
                            break Ok(());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            };
            match result {
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return inner;
                }
                Ok(()) if filled == 0 => return inner,
                Ok(()) => {
                    buf.truncate(filled);
                    if tx.send(Ok(buf)).is_err() {
                        return inner;
                    }
                }
            }
        });
        Self {
            rx,
            free,
            current: Vec::new(),
            pos: 0,
            handle: Some(handle),
            done: false,
        }
    }

    fn into_inner(mut self) -> io::Result<R> {
        drop(std::mem::replace(&mut self.rx, mpsc::sync_channel(1).1));
        self.handle
            .take()
            .ok_or_else(|| io::Error::other("reader already taken"))?
            .join()
            .map_err(|_| io::Error::other("decompression thread panicked"))
    }
}

impl<R: Read + Send + 'static> Read for &mut ThreadedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    let used = std::mem::replace(&mut self.current, chunk);
                    // Full (or the thread has enough): dropped.
                    let _ = self.free.try_send(used);
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => {
                    self.done = true;
                    return Ok(0);
                }
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Indexes one blob: one streaming pass, nothing extracted. The diffID must be
/// `layer.diff_id`.
pub fn index_blob(
    root_path: &Path,
    blob_path: &Path,
    layer: &LayerDesc,
    progress: Arc<UnpackProgress>,
    limits: &Limits,
) -> anyhow::Result<Indexed> {
    index_blob_inner(root_path, blob_path, layer, progress, limits, true)
}

/// As [`index_blob`], for blobs whose diffID is not known in advance (the diff service's
/// Apply: containerd checks the returned diffID itself).
pub fn index_blob_unchecked(
    root_path: &Path,
    blob_path: &Path,
    layer: &LayerDesc,
    progress: Arc<UnpackProgress>,
    limits: &Limits,
) -> anyhow::Result<Indexed> {
    index_blob_inner(root_path, blob_path, layer, progress, limits, false)
}

fn index_blob_inner(
    root_path: &Path,
    blob_path: &Path,
    layer: &LayerDesc,
    progress: Arc<UnpackProgress>,
    limits: &Limits,
    check_diff_id: bool,
) -> anyhow::Result<Indexed> {
    let _span = info_span!("index_layer", blob = %layer.desc.digest).entered();
    let mut file =
        File::open(blob_path).with_context(|| format!("opening blob {}", layer.desc.digest))?;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic)?;
    let sniffed = Compression::sniff(&magic[..n]);
    if sniffed != layer.compression {
        bail!(
            "layer {} is labelled {} ({}) but its data is {}",
            layer.desc.digest,
            compression_name(layer.compression),
            layer.desc.media_type,
            compression_name(sniffed)
        );
    }
    let file = File::open(blob_path)?;
    let compressed = file.metadata()?.len();
    index_stream(
        root_path,
        file,
        layer,
        progress,
        limits,
        compressed,
        check_diff_id,
    )
}

/// Indexes a layer from a stream of its (compressed) bytes, e.g. while it downloads: the
/// caller must make sure the bytes are the blob's (the content store checks the digest of the
/// same stream) before recording the result. The diffID is checked when `check_diff_id`;
/// `compressed` is the blob's size (for the expansion limit).
pub fn index_stream<R: Read + Send + 'static>(
    root_path: &Path,
    reader: R,
    layer: &LayerDesc,
    progress: Arc<UnpackProgress>,
    limits: &Limits,
    compressed: u64,
    check_diff_id: bool,
) -> anyhow::Result<Indexed> {
    let file = reader;
    let local_copy_rel = local_copy_rel_path(&layer.desc.digest);
    let fine = Arc::new(FineRegion::default());
    let opts = SpanOptions {
        span_size: SPAN_SIZE,
        local_copy: Some(root_path.join(&local_copy_rel)),
        fine: Some(fine.clone()),
    };
    let counting = CountingReader {
        inner: file,
        counter: progress,
    };
    let indexing = IndexingReader::new(layer.compression, counting, opts)
        .with_context(|| format!("reading layer {}", layer.desc.digest))?;
    let (limit, why) = limits.cap(compressed);
    let limited = LimitedReader {
        inner: indexing,
        limit,
        why,
        n: 0,
    };
    let mut threaded = ThreadedReader::spawn(limited);
    // The pass decompresses ahead of this parser (ThreadedReader's queue): a big file's
    // first few MiB may get the usual spacing.
    let built = build_index_observed(
        &mut threaded,
        Some(Box::new(move |at, len| {
            if len >= FINE_FILE_MIN {
                fine.set(at, at + len);
            }
        })),
    );
    let indexing = threaded.into_inner()?.inner;
    if let Err(e) = &built {
        if let Some(t) = too_large(e) {
            bail!("layer {}: {t}", layer.desc.digest);
        }
    }
    let built = built.with_context(|| format!("indexing layer {}", layer.desc.digest))?;
    let map: SpanMap = indexing
        .finish()
        .with_context(|| format!("finishing layer {}", layer.desc.digest))?;
    let index: LayerIndex = built.index;
    if check_diff_id && index.stats.diff_id != layer.diff_id.as_str() {
        bail!(
            "layer {}: diffID mismatch: the image config says {}, the uncompressed data hashes to {}",
            layer.desc.digest,
            layer.diff_id,
            index.stats.diff_id
        );
    }
    let diff_id = Digest::parse(&index.stats.diff_id)?;
    let index_rel = index_rel_path(&diff_id);
    let index_abs = root_path.join(&index_rel);
    if !index_abs.is_file() {
        write_atomic(&index_abs, &index.to_bytes())?;
    }
    let spans_rel = spans_rel_path(&layer.desc.digest);
    let spans = postcard::to_stdvec(&map).context("serialising span map")?;
    write_atomic(&root_path.join(&spans_rel), &spans)?;
    debug!(
        entries = index.stats.entries,
        size = index.stats.uncompressed_size,
        "indexed"
    );
    Ok(Indexed {
        layer: LayerRow {
            diff_id: diff_id.to_string(),
            uncompressed_size: index.stats.uncompressed_size,
            entries: index.stats.entries,
            index_path: index_rel,
        },
        blob: BlobRow {
            digest: layer.desc.digest.to_string(),
            diff_id: diff_id.to_string(),
            media_type: layer.desc.media_type.clone(),
            compression: compression_name(layer.compression).to_string(),
            size: layer.desc.size,
            spans_path: spans_rel,
            local_copy: map.has_local_copy().then_some(local_copy_rel),
            remote: None,
        },
    })
}

/// Whether a blob's index, span map (and local copy) are all recorded and present.
fn already_indexed(root: &Root, layer: &LayerDesc) -> anyhow::Result<bool> {
    let Some(blob) = root.meta.blob(layer.desc.digest.as_str())? else {
        return Ok(false);
    };
    let Some(row) = root.meta.layer(&blob.diff_id)? else {
        return Ok(false);
    };
    Ok(blob.diff_id == layer.diff_id.as_str()
        && root.abs(&row.index_path).is_file()
        && root.abs(&blob.spans_path).is_file()
        && blob
            .local_copy
            .as_deref()
            .is_none_or(|p| root.abs(p).is_file()))
}

/// Unpacks `layers` (bottom first): indexes what is not indexed yet, records chains and the
/// committed snapshot of every chain level. Returns the top chain ID.
pub fn unpack(
    root: &mut Root,
    layers: &[LayerDesc],
    progress: Arc<UnpackProgress>,
) -> anyhow::Result<Option<Digest>> {
    unpack_with(root, layers, progress, &|_| None)
}

/// Where a layer was already indexed (e.g. while it downloaded): the result for a blob, if
/// any. A result whose diffID is not the config's is an error; a failed one is redone here.
pub type PreIndexed<'a> = dyn Fn(&LayerDesc) -> Option<anyhow::Result<Indexed>> + 'a;

/// As [`unpack`], taking the indexes `pre` already made instead of reading those blobs again.
pub fn unpack_with(
    root: &mut Root,
    layers: &[LayerDesc],
    progress: Arc<UnpackProgress>,
    pre: &PreIndexed<'_>,
) -> anyhow::Result<Option<Digest>> {
    let diff_ids: Vec<Digest> = layers.iter().map(|l| l.diff_id.clone()).collect();
    let chain_ids = Digest::chain_ids(&diff_ids);
    let mut todo: Vec<usize> = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        if already_indexed(root, layer)? {
            progress
                .compressed_bytes
                .fetch_add(layer.desc.size, Ordering::Relaxed);
            progress.layers_done.fetch_add(1, Ordering::Relaxed);
        } else if !todo
            .iter()
            .any(|&j: &usize| layers[j].desc.digest == layer.desc.digest)
        {
            todo.push(i);
        }
    }
    let mut done_before: Vec<(usize, anyhow::Result<Indexed>)> = Vec::new();
    todo.retain(|&i| {
        let layer = &layers[i];
        match pre(layer) {
            Some(Ok(ix)) => {
                debug!(blob = %layer.desc.digest, "indexed while downloading");
                let r = if ix.layer.diff_id == layer.diff_id.as_str() {
                    Ok(ix)
                } else {
                    Err(anyhow::anyhow!(
                        "layer {}: diffID mismatch: the image config says {}, the uncompressed data hashes to {}",
                        layer.desc.digest,
                        layer.diff_id,
                        ix.layer.diff_id
                    ))
                };
                progress
                    .compressed_bytes
                    .fetch_add(layer.desc.size, Ordering::Relaxed);
                progress.layers_done.fetch_add(1, Ordering::Relaxed);
                done_before.push((i, r));
                false
            }
            Some(Err(e)) => {
                debug!(blob = %layer.desc.digest, error = %e, "indexing while downloading failed; indexing the blob");
                true
            }
            None => true,
        }
    });
    let root_path = root.path.clone();
    let store = root.store.clone();
    let limits = root.limits;
    let mut results: Vec<(usize, anyhow::Result<Indexed>)> = todo
        .par_iter()
        .map(|&i| {
            let layer = &layers[i];
            let result = index_blob(
                &root_path,
                &store.blob_path(&layer.desc.digest),
                layer,
                progress.clone(),
                &limits,
            );
            progress.layers_done.fetch_add(1, Ordering::Relaxed);
            (i, result)
        })
        .collect();
    results.extend(done_before);
    let mut indexed: Vec<Option<Indexed>> = (0..layers.len()).map(|_| None).collect();
    for (i, r) in results {
        indexed[i] = Some(r?);
    }
    for (i, layer) in layers.iter().enumerate() {
        let chain = ChainRow {
            chain_id: chain_ids[i].to_string(),
            parent: (i > 0).then(|| chain_ids[i - 1].to_string()),
            diff_id: layer.diff_id.to_string(),
            blob_digest: layer.desc.digest.to_string(),
            depth: i as u32 + 1,
        };
        let (layer_row, blob_row) = match indexed[i].take() {
            Some(ix) => (ix.layer, ix.blob),
            None => {
                let blob = root
                    .meta
                    .blob(layer.desc.digest.as_str())?
                    .context("indexed blob vanished from metadata")?;
                let layer_row = root
                    .meta
                    .layer(&blob.diff_id)?
                    .context("indexed layer vanished from metadata")?;
                (layer_row, blob)
            }
        };
        root.meta.record_layer(&layer_row, &blob_row, &chain)?;
    }
    Ok(chain_ids.last().cloned())
}

/// The reading end of a bounded channel of byte chunks (a pipe between two threads of this
/// process): end of stream when the sender is dropped.
pub struct ChannelReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.rx.recv() {
                Ok(c) => {
                    self.chunk = c;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl ChannelReader {
    pub fn new(rx: std::sync::mpsc::Receiver<Vec<u8>>) -> Self {
        ChannelReader {
            rx,
            chunk: Vec::new(),
            pos: 0,
        }
    }
}
