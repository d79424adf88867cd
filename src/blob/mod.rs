//! Random access into container layer blobs (tar, tar+gzip, tar+zstd) without decompressing
//! from the start.
//!
//! One streaming pass ([`IndexingReader`]) decompresses a blob for the layer indexer and, on the
//! side, records a [`SpanMap`]: where the uncompressed stream can be entered again, at most about
//! `span_size` uncompressed bytes apart. A [`BlobReader`] then serves `read_at` by decompressing
//! only the spans a read touches, through a process-wide [`SpanCache`].
//!
//! - plain tar: `pread` on the blob; the kernel page cache is the cache.
//! - gzip: zran-style checkpoints at deflate block boundaries (compressed offset, unused bits,
//!   32 KiB window), see [`gz`].
//!   Deflate blocks longer than two spans are spilled into a local seekable copy.
//! - zstd: groups of frames read straight from the blob; frames too large to enter are
//!   re-compressed into a local seekable copy during the pass, see [`zst`] and [`copy`].

mod cache;
mod copy;
pub mod encode;
pub use copy::COPY_TEMP_PREFIX;
mod gz;
mod zst;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

pub use cache::SpanCache;
use cache::SpanData;

/// Default for [`SpanOptions::span_size`]: 4 MiB.
pub const DEFAULT_SPAN_SIZE: u64 = 4 << 20;
/// Smallest accepted span size; below this the map is mostly overhead.
pub const MIN_SPAN_SIZE: u64 = 4 << 10;
/// Largest accepted span size; every span is one allocation at read time.
pub const MAX_SPAN_SIZE: u64 = 256 << 20;

/// Spacing of restart points inside a [`FineRegion`]: a random read there decompresses at
/// most this much (gzip), or from a zstd resume point at most
/// `max(FINE_SPAN_SIZE, FINE_WINDOWS × window + a block)`.
pub const FINE_SPAN_SIZE: u64 = 1 << 20;
/// zstd resume points in a fine region are this many windows apart: each stores a window, so
/// they cost up to 1 / `FINE_WINDOWS` of that region in local disk (elsewhere: a quarter).
pub const FINE_WINDOWS: u64 = 2;

/// Refuse maps whose spans would need allocations larger than this.
const MAX_DECODED_SPAN: u64 = 1 << 30;

/// Compressed bytes read from a blob per `pread` while decompressing a span.
const READ_CHUNK: usize = 256 << 10;

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// From the first bytes of a blob (gzip 1f 8b, zstd 28 b5 2f fd or a skippable frame, else
    /// None if it looks like tar/anything).
    pub fn sniff(magic: &[u8]) -> Compression {
        if magic.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
            || (magic.len() >= 4 && magic[0] & 0xf0 == 0x50 && magic[1..4] == [0x2a, 0x4d, 0x18])
        {
            // A zstd frame, or a zstd skippable frame (0x184D2A5?) leading the stream.
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// Errors of the blob reader. Corruption errors name the blob and the compressed offset.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("corrupt gzip data in {blob} at compressed offset {offset}: {msg}")]
    CorruptGzip {
        blob: String,
        offset: u64,
        msg: String,
    },
    #[error("corrupt zstd data in {blob} at compressed offset {offset}: {msg}")]
    CorruptZstd {
        blob: String,
        offset: u64,
        msg: String,
    },
    #[error("truncated {format} data in {blob}: input ends at compressed offset {offset}")]
    Truncated {
        format: &'static str,
        blob: String,
        offset: u64,
    },
    #[error("invalid span map for {blob}: {msg}")]
    BadMap { blob: String, msg: String },
    #[error("resume point of span {span} of {blob} in its local copy is damaged: {msg}")]
    CorruptResumePoint {
        blob: String,
        span: usize,
        msg: String,
    },
    #[error("span map for {blob} needs a local seekable copy, but none was given")]
    MissingLocalCopy { blob: String },
    #[error("invalid span options: {0}")]
    BadOptions(String),
    #[error("indexing pass finished before the end of the compressed stream")]
    NotFinished,
    #[error("{0}")]
    Internal(String),
}

impl BlobError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        BlobError::Io {
            context: context.into(),
            source,
        }
    }

    /// Maps to an `io::Error` for the `Read` impl: bad input is `InvalidData`.
    fn into_io(self) -> io::Error {
        match self {
            BlobError::Io { ref source, .. } => io::Error::new(source.kind(), self),
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

pub type Result<T> = std::result::Result<T, BlobError>;

/// Options of the indexing pass.
#[derive(Debug, Clone)]
pub struct SpanOptions {
    /// Max uncompressed bytes one `read_at` decompresses per span it touches (default 4 MiB).
    pub span_size: u64,
    /// Where to write a seekable local copy for zstd frames too big to enter and gzip deflate
    /// blocks longer than 2 × `span_size`. Without it such regions are served by decompressing
    /// from their start (correct, but unbounded).
    pub local_copy: Option<PathBuf>,
    /// Where the pass places restart points [`FINE_SPAN_SIZE`] apart (None: nowhere).
    pub fine: Option<Arc<FineRegion>>,
}

impl Default for SpanOptions {
    fn default() -> Self {
        SpanOptions {
            span_size: DEFAULT_SPAN_SIZE,
            local_copy: None,
            fine: None,
        }
    }
}

/// The stretch of the uncompressed stream that gets finer restart points: the data of a file
/// big enough to be read at random (a database, model weights, a big binary), announced by
/// whoever parses the stream when it reaches that file's header, while the pass decompresses
/// ahead on another thread. Only a hint: the points the pass places are correct either way.
#[derive(Debug, Default)]
pub struct FineRegion {
    start: AtomicU64,
    end: AtomicU64,
}

impl FineRegion {
    /// Uncompressed `[start, end)` from now on (replacing the last one).
    pub fn set(&self, start: u64, end: u64) {
        // `end` goes first and last, so a reader never pairs a new start with an old end
        // that lies past it.
        self.end.store(0, Ordering::Release);
        self.start.store(start, Ordering::Release);
        self.end.store(end, Ordering::Release);
    }

    /// Whether uncompressed offset `u` is in the region.
    pub fn covers(&self, u: u64) -> bool {
        let end = self.end.load(Ordering::Acquire);
        u < end && u >= self.start.load(Ordering::Acquire)
    }
}

/// Restart point spacing at uncompressed offset `u`: `closer` where `fine` covers it (never
/// wider than `usual`), else `usual`.
fn spacing_at(fine: &Option<Arc<FineRegion>>, u: u64, usual: u64, closer: u64) -> u64 {
    if fine.as_ref().is_some_and(|f| f.covers(u)) {
        closer.min(usual)
    } else {
        usual
    }
}

/// Serializable random-access map of one blob.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpanMap {
    pub compression: Compression,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    span_size: u64,
    index: SpanIndex,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum SpanIndex {
    Plain,
    Gzip(Vec<gz::Checkpoint>),
    Zstd(zst::ZstdIndex),
    /// gzip with over-long deflate blocks served from the local copy. Last, so maps written
    /// before it existed still decode.
    GzipCopy(gz::GzCopyIndex),
}

impl SpanMap {
    /// Reads the span map stored at `path` (the one loader for mounts, `inspect` and `df`).
    pub fn load(path: &std::path::Path) -> Result<SpanMap> {
        let bytes = std::fs::read(path)
            .map_err(|e| BlobError::io(format!("reading {}", path.display()), e))?;
        postcard::from_bytes(&bytes).map_err(|e| BlobError::BadMap {
            blob: path.display().to_string(),
            msg: format!("does not decode: {e}"),
        })
    }

    /// Whether reading needs the local seekable copy written during the pass.
    pub fn has_local_copy(&self) -> bool {
        match &self.index {
            SpanIndex::Zstd(z) => z.has_local_copy(),
            SpanIndex::GzipCopy(g) => g.local_copy_size > 0,
            _ => false,
        }
    }

    /// Uncompressed bytes of the largest span (a read decodes at least one whole span).
    pub fn largest_span(&self) -> u64 {
        (0..self.span_count())
            .map(|i| {
                let (a, b) = self.span_range(i);
                b - a
            })
            .max()
            .unwrap_or(0)
    }

    /// Uncompressed range `[start, end)` of span `i` (a read inside it decodes all of it).
    pub fn span_extent(&self, i: usize) -> (u64, u64) {
        self.span_range(i)
    }

    /// Spans entered at a zstd resume point (their dictionaries are in the local copy).
    pub fn resume_points(&self) -> usize {
        match &self.index {
            SpanIndex::Zstd(z) => z.resume_points(),
            _ => 0,
        }
    }

    /// Spans served from re-compressed data in the local copy (regions with no way in).
    pub fn copied_spans(&self) -> usize {
        match &self.index {
            SpanIndex::Zstd(z) => z.copied_spans(),
            SpanIndex::GzipCopy(g) => g
                .spans
                .iter()
                .filter(|s| matches!(s, gz::GzSpan::Copy { .. }))
                .count(),
            _ => 0,
        }
    }

    /// The span size the map was built with.
    pub fn span_size(&self) -> u64 {
        self.span_size
    }

    /// Number of independently decompressible spans (0 for plain blobs).
    pub fn span_count(&self) -> usize {
        match &self.index {
            SpanIndex::Plain => 0,
            SpanIndex::Gzip(p) => p.len(),
            SpanIndex::Zstd(z) => z.spans.len(),
            SpanIndex::GzipCopy(g) => g.spans.len(),
        }
    }

    fn span_start(&self, i: usize) -> u64 {
        match &self.index {
            SpanIndex::Plain => 0,
            SpanIndex::Gzip(p) => p.get(i).map_or(self.uncompressed_size, |c| c.u_off),
            SpanIndex::Zstd(z) => z.spans.get(i).map_or(self.uncompressed_size, |s| s.u_off),
            SpanIndex::GzipCopy(g) => g
                .spans
                .get(i)
                .map_or(self.uncompressed_size, gz::GzSpan::u_off),
        }
    }

    /// The blob bytes span `i` is decoded from (`None` for spans in the local copy and for
    /// plain blobs, read as they are).
    pub fn compressed_range(&self, i: usize) -> Option<(u64, u64)> {
        // Inflate may look a few bytes past the next checkpoint's byte; harmless to include.
        const GZ_SLACK: u64 = 64;
        let size = self.compressed_size;
        match &self.index {
            SpanIndex::Plain => None,
            SpanIndex::Gzip(p) => {
                let c = p.get(i)?;
                let end = p
                    .get(i + 1)
                    .map_or(size, |n| n.c_off.saturating_add(GZ_SLACK));
                Some((c.c_off.saturating_sub(1), end.min(size)))
            }
            SpanIndex::GzipCopy(g) => match g.spans.get(i)? {
                gz::GzSpan::Point(c) => {
                    let end = g.spans[i + 1..]
                        .iter()
                        .find_map(|s| match s {
                            gz::GzSpan::Point(n) => Some(n.c_off.saturating_add(GZ_SLACK)),
                            gz::GzSpan::Copy { .. } => None,
                        })
                        .unwrap_or(size);
                    Some((c.c_off.saturating_sub(1), end.min(size)))
                }
                gz::GzSpan::Copy { .. } => None,
            },
            SpanIndex::Zstd(z) => z.blob_range(i),
        }
    }

    /// The blob byte ranges to read for uncompressed stream bytes `[start, end)`: the
    /// compressed ranges of the spans holding them (the same range for plain blobs).
    pub fn stream_to_blob(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let end = end.min(self.uncompressed_size);
        if start >= end {
            return Vec::new();
        }
        if self.compression == Compression::None {
            return vec![(start, end)];
        }
        (self.span_of(start)..=self.span_of(end - 1))
            .filter_map(|i| self.compressed_range(i))
            .collect()
    }

    /// The map of a multi-member gzip blob entered at member starts: `points` are (uncompressed
    /// offset, offset of the member's raw deflate data), ascending, as an eStargz TOC gives
    /// them. The uncompressed offsets may be a layout of the caller's choosing as long as the
    /// layer index uses the same one.
    pub fn gzip_members(
        compressed_size: u64,
        uncompressed_size: u64,
        points: &[(u64, u64)],
        span_size: u64,
    ) -> SpanMap {
        SpanMap {
            compression: Compression::Gzip,
            compressed_size,
            uncompressed_size,
            span_size,
            index: SpanIndex::Gzip(
                points
                    .iter()
                    .map(|&(u_off, c_off)| gz::Checkpoint {
                        u_off,
                        c_off,
                        bits: 0,
                        window: Vec::new(),
                    })
                    .collect(),
            ),
        }
    }

    /// The map of a multi-frame zstd blob whose spans are given as (uncompressed offset,
    /// compressed offset, compressed length) of whole frames, ascending (a zstd:chunked TOC).
    /// As with [`SpanMap::gzip_members`], the uncompressed layout may be the caller's.
    pub fn zstd_frames(
        compressed_size: u64,
        uncompressed_size: u64,
        spans: &[(u64, u64, u64)],
        span_size: u64,
    ) -> SpanMap {
        SpanMap {
            compression: Compression::Zstd,
            compressed_size,
            uncompressed_size,
            span_size,
            index: SpanIndex::Zstd(zst::ZstdIndex::from_frames(spans)),
        }
    }

    /// Uncompressed range of span `i`.
    fn span_range(&self, i: usize) -> (u64, u64) {
        (self.span_start(i), self.span_start(i + 1))
    }

    /// Index of the span holding uncompressed offset `off` (< uncompressed_size).
    fn span_of(&self, off: u64) -> usize {
        let pp = match &self.index {
            SpanIndex::Plain => 0,
            SpanIndex::Gzip(p) => p.partition_point(|c| c.u_off <= off),
            SpanIndex::Zstd(z) => z.spans.partition_point(|s| s.u_off <= off),
            SpanIndex::GzipCopy(g) => g.spans.partition_point(|s| s.u_off() <= off),
        };
        pp.saturating_sub(1)
    }

    /// Checks what a reader relies on, so a damaged map file gives an error, not a panic.
    pub fn validate(&self, blob: &str) -> Result<()> {
        let bad = |msg: String| BlobError::BadMap {
            blob: blob.to_string(),
            msg,
        };
        let expected = match &self.index {
            SpanIndex::Plain => Compression::None,
            SpanIndex::Gzip(_) | SpanIndex::GzipCopy(_) => Compression::Gzip,
            SpanIndex::Zstd(_) => Compression::Zstd,
        };
        if expected != self.compression {
            return Err(bad(format!(
                "compression {:?} does not match its index",
                self.compression
            )));
        }
        let n = self.span_count();
        if self.compression != Compression::None && self.uncompressed_size > 0 {
            if n == 0 || self.span_start(0) != 0 {
                return Err(bad("first span does not start at offset 0".into()));
            }
            for i in 0..n {
                let (a, b) = self.span_range(i);
                if b <= a && i + 1 < n {
                    return Err(bad(format!("span {i} is empty or out of order")));
                }
                if b.saturating_sub(a) > MAX_DECODED_SPAN {
                    return Err(bad(format!(
                        "span {i} is implausibly large ({} bytes)",
                        b - a
                    )));
                }
            }
            if self.span_start(n - 1) >= self.uncompressed_size {
                return Err(bad("last span starts past the end".into()));
            }
        }
        match &self.index {
            SpanIndex::Gzip(p) => gz::validate(p, self.compressed_size).map_err(bad),
            SpanIndex::Zstd(z) => z.validate(self.compressed_size).map_err(bad),
            SpanIndex::GzipCopy(g) => g.validate(self.compressed_size).map_err(bad),
            SpanIndex::Plain => {
                if self.compressed_size != self.uncompressed_size {
                    Err(bad("plain blob with different compressed size".into()))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// Something that decodes a compressed stream into `out`, 0 meaning end of stream.
trait Decode {
    fn decode(&mut self, out: &mut [u8]) -> Result<usize>;
    /// Compressed bytes read from the input so far.
    fn compressed_read(&self) -> u64;
}

/// Decoders run faster on big output buffers; small caller reads are served from this one.
struct Buffered<D> {
    dec: D,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    total_out: u64,
    eof: bool,
    failed: bool,
}

const OUT_BUF: usize = 256 << 10;

impl<D: Decode> Buffered<D> {
    fn new(dec: D) -> Self {
        Buffered {
            dec,
            buf: Vec::new(),
            pos: 0,
            len: 0,
            total_out: 0,
            eof: false,
            failed: false,
        }
    }

    fn read(&mut self, out: &mut [u8]) -> Result<usize> {
        if self.failed {
            return Err(BlobError::Internal("indexing reader already failed".into()));
        }
        let r = self.read_inner(out);
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    fn read_inner(&mut self, out: &mut [u8]) -> Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if self.pos == self.len {
            if self.eof {
                return Ok(0);
            }
            if out.len() >= OUT_BUF / 4 {
                let n = self.dec.decode(out)?;
                self.eof = n == 0;
                self.total_out += n as u64;
                return Ok(n);
            }
            if self.buf.is_empty() {
                self.buf = vec![0; OUT_BUF];
            }
            self.len = self.dec.decode(&mut self.buf)?;
            self.pos = 0;
            self.eof = self.len == 0;
            self.total_out += self.len as u64;
        }
        let n = out.len().min(self.len - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// One streaming pass: decompresses `inner` (the compressed blob) and, as a side effect,
/// records the span map. The indexer reads the uncompressed tar stream through it.
pub struct IndexingReader<R: Read> {
    inner: Pass<R>,
}

enum Pass<R: Read> {
    Plain { r: R, n: u64, eof: bool, span: u64 },
    Gzip(Box<Buffered<gz::GzIndexer<R>>>),
    Zstd(Box<Buffered<zst::ZstdIndexer<R>>>),
}

impl<R: Read> IndexingReader<R> {
    pub fn new(compression: Compression, inner: R, opts: SpanOptions) -> Result<Self> {
        if !(MIN_SPAN_SIZE..=MAX_SPAN_SIZE).contains(&opts.span_size) {
            return Err(BlobError::BadOptions(format!(
                "span_size {} is outside {MIN_SPAN_SIZE}..={MAX_SPAN_SIZE}",
                opts.span_size
            )));
        }
        let inner = match compression {
            Compression::None => Pass::Plain {
                r: inner,
                n: 0,
                eof: false,
                span: opts.span_size,
            },
            Compression::Gzip => {
                Pass::Gzip(Box::new(Buffered::new(gz::GzIndexer::new(inner, &opts)?)))
            }
            Compression::Zstd => {
                Pass::Zstd(Box::new(Buffered::new(zst::ZstdIndexer::new(inner, opts)?)))
            }
        };
        Ok(IndexingReader { inner })
    }

    /// Uncompressed bytes produced so far.
    pub fn uncompressed_read(&self) -> u64 {
        match &self.inner {
            Pass::Plain { n, .. } => *n,
            Pass::Gzip(b) => b.total_out,
            Pass::Zstd(b) => b.total_out,
        }
    }

    /// Compressed bytes consumed so far.
    pub fn compressed_read(&self) -> u64 {
        match &self.inner {
            Pass::Plain { n, .. } => *n,
            Pass::Gzip(b) => b.dec.compressed_read(),
            Pass::Zstd(b) => b.dec.compressed_read(),
        }
    }

    /// Call after reading to EOF. Returns the map; for zstd with a local copy, fsyncs it and
    /// renames it into place at `opts.local_copy`.
    pub fn finish(self) -> Result<SpanMap> {
        let map = match self.inner {
            Pass::Plain { n, eof, span, .. } => {
                if !eof {
                    return Err(BlobError::NotFinished);
                }
                SpanMap {
                    compression: Compression::None,
                    compressed_size: n,
                    uncompressed_size: n,
                    span_size: span,
                    index: SpanIndex::Plain,
                }
            }
            Pass::Gzip(b) => {
                if !b.eof {
                    return Err(BlobError::NotFinished);
                }
                b.dec.finish(b.total_out)?
            }
            Pass::Zstd(b) => {
                if !b.eof {
                    return Err(BlobError::NotFinished);
                }
                b.dec.finish(b.total_out)?
            }
        };
        tracing::debug!(
            compression = ?map.compression,
            compressed = map.compressed_size,
            uncompressed = map.uncompressed_size,
            spans = map.span_count(),
            local_copy = map.has_local_copy(),
            "span map built"
        );
        Ok(map)
    }
}

impl<R: Read> Read for IndexingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.inner {
            Pass::Plain { r, n, eof, .. } => {
                let got = r.read(buf)?;
                if got == 0 && !buf.is_empty() {
                    *eof = true;
                }
                *n += got as u64;
                Ok(got)
            }
            Pass::Gzip(b) => b.read(buf).map_err(BlobError::into_io),
            Pass::Zstd(b) => b.read(buf).map_err(BlobError::into_io),
        }
    }
}

/// Where a blob's compressed bytes come from: a local file, or (a lazily pulled layer) a
/// registry behind a chunk cache. The reader only ever asks for byte ranges.
pub trait BlobBytes: Send + Sync {
    /// Reads `buf.len()` bytes at `off` unless the blob ends first; returns the count.
    fn read_full_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    /// Whether reading costs a network round trip (read-ahead then stays inside the file
    /// being read instead of guessing at the next one).
    fn is_remote(&self) -> bool {
        false
    }
    /// The bytes `[start, end)` turned out bad (a span failed its digest): drop any cached
    /// copy so the next read fetches them again.
    fn invalidate(&self, _start: u64, _end: u64) {}
    /// Hint: the bytes `[start, end)` are about to be read (a remote source fetches what it
    /// lacks of them in one request instead of one per read).
    fn will_need(&self, _start: u64, _end: u64) {}
}

impl BlobBytes for File {
    fn read_full_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        pread_full(self, off, buf)
    }
}

/// Reads `buf.len()` bytes at `off` unless the file ends first; returns the count.
pub fn pread_full(file: &File, mut off: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                off += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Sequential compressed input from a file region, fed to a decoder in chunks.
struct PreadInput<'a> {
    file: &'a dyn BlobBytes,
    blob: &'a str,
    /// Absolute offset of `buf[start]`.
    pos: u64,
    /// Absolute offset where the region ends.
    limit: u64,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl<'a> PreadInput<'a> {
    fn new(file: &'a dyn BlobBytes, blob: &'a str, pos: u64, limit: u64) -> Self {
        let want = limit.saturating_sub(pos).min(READ_CHUNK as u64) as usize;
        PreadInput {
            file,
            blob,
            pos,
            limit,
            buf: vec![0; want.max(1)],
            start: 0,
            end: 0,
        }
    }

    /// Buffered bytes, reading more if none are left; empty at the end of the region.
    fn fill(&mut self) -> Result<&[u8]> {
        if self.start == self.end {
            let want = self
                .limit
                .saturating_sub(self.pos)
                .min(self.buf.len() as u64) as usize;
            let n = self
                .file
                .read_full_at(&mut self.buf[..want], self.pos)
                .map_err(|e| {
                    BlobError::io(format!("reading {} at offset {}", self.blob, self.pos), e)
                })?;
            self.start = 0;
            self.end = n;
        }
        Ok(&self.buf[self.start..self.end])
    }

    fn consume(&mut self, n: usize) {
        let n = n.min(self.end - self.start);
        self.start += n;
        self.pos += n as u64;
    }

    fn skip(&mut self, n: u64) {
        let in_buf = n.min((self.end - self.start) as u64) as usize;
        self.consume(in_buf);
        if (in_buf as u64) < n {
            self.pos += n - in_buf as u64;
            self.start = self.end;
        }
    }
}

static NEXT_READER_ID: AtomicU64 = AtomicU64::new(1);

/// Spans decompressed ahead of a sequential reader.
const PREFETCH_AHEAD: usize = 2;
/// A read starting at most this far after the previous one's end counts as sequential.
const SEQUENTIAL_GAP: u64 = 1 << 20;

/// Prefetches queued or running, process-wide; bounded to the core count so read-ahead
/// never starves the readers that wait for a span now.
static PREFETCHING: AtomicUsize = AtomicUsize::new(0);

fn prefetch_limit() -> usize {
    static LIMIT: OnceLock<usize> = OnceLock::new();
    *LIMIT.get_or_init(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
}

/// Random access to one blob. Thread-safe: `read_at` takes `&self`.
///
/// When reads move forward through the spans, the next [`PREFETCH_AHEAD`] spans are
/// decompressed in the background (on rayon's pool, at most one per core at a time), so
/// decompression overlaps the caller's copy out of the span.
pub struct BlobReader {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    file: Arc<dyn BlobBytes>,
    local: Option<File>,
    map: Arc<SpanMap>,
    cache: Arc<SpanCache>,
    /// Cache identity: unique per reader, so a reused inode can never alias stale spans.
    id: u64,
    decompressed: AtomicU64,
    /// Where the last read ended (`u64::MAX`: none yet), to spot sequential reads.
    last_end: AtomicU64,
    /// Set when the `BlobReader` is dropped: read-ahead still running caches nothing more.
    closed: AtomicBool,
    prefetch: bool,
    /// sha256 of each span's uncompressed bytes, where known (eStargz chunk digests): a
    /// span that does not match is read again once, then an error.
    span_digests: Option<Arc<Vec<Option<[u8; 32]>>>>,
}

impl std::fmt::Debug for BlobReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobReader")
            .field("blob", &self.inner.name)
            .field("compression", &self.inner.map.compression)
            .field("spans", &self.inner.map.span_count())
            .finish()
    }
}

impl BlobReader {
    pub fn open(
        blob: &Path,
        map: Arc<SpanMap>,
        local_copy: Option<&Path>,
        cache: Arc<SpanCache>,
    ) -> Result<Self> {
        let name = blob.display().to_string();
        let file = File::open(blob).map_err(|e| BlobError::io(format!("opening {name}"), e))?;
        let len = file
            .metadata()
            .map_err(|e| BlobError::io(format!("stat {name}"), e))?
            .len();
        Self::open_bytes(Arc::new(file), len, name, map, local_copy, cache)
    }

    /// As [`BlobReader::open`], over any source of the blob's bytes (`len` of them).
    pub fn open_bytes(
        file: Arc<dyn BlobBytes>,
        len: u64,
        name: String,
        map: Arc<SpanMap>,
        local_copy: Option<&Path>,
        cache: Arc<SpanCache>,
    ) -> Result<Self> {
        map.validate(&name)?;
        if len != map.compressed_size {
            return Err(BlobError::BadMap {
                blob: name,
                msg: format!(
                    "blob is {len} bytes but the map was made from {} bytes",
                    map.compressed_size
                ),
            });
        }
        let local = if map.has_local_copy() {
            let p = local_copy.ok_or_else(|| BlobError::MissingLocalCopy { blob: name.clone() })?;
            let f = File::open(p)
                .map_err(|e| BlobError::io(format!("opening local copy {}", p.display()), e))?;
            Some(f)
        } else {
            None
        };
        Ok(BlobReader {
            inner: Arc::new(Inner {
                name,
                file,
                local,
                map,
                cache,
                id: NEXT_READER_ID.fetch_add(1, Ordering::Relaxed),
                decompressed: AtomicU64::new(0),
                last_end: AtomicU64::new(u64::MAX),
                closed: AtomicBool::new(false),
                prefetch: true,
                span_digests: None,
            }),
        })
    }

    /// Checks every span with a digest against it after decoding.
    pub fn set_span_digests(&mut self, digests: Arc<Vec<Option<[u8; 32]>>>) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.span_digests = Some(digests);
        }
    }

    /// Turns background read-ahead of spans on or off (on by default). Off, a read
    /// decompresses only the spans it touches.
    pub fn set_prefetch(&mut self, on: bool) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.prefetch = on;
        }
    }

    pub fn map(&self) -> &SpanMap {
        &self.inner.map
    }

    /// Uncompressed size of the blob.
    pub fn len(&self) -> u64 {
        self.inner.map.uncompressed_size
    }

    pub fn is_empty(&self) -> bool {
        self.inner.map.uncompressed_size == 0
    }

    /// Reads uncompressed bytes `[offset, offset+buf.len())` (short only at end of stream).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        self.read_within(offset, buf, u64::MAX)
    }

    /// As [`BlobReader::read_at`], for a read inside an entry that ends at stream offset
    /// `entry_end`: on a remote blob, read-ahead does not go past it.
    pub fn read_within(&self, offset: u64, buf: &mut [u8], entry_end: u64) -> Result<usize> {
        let inner = &self.inner;
        let _span =
            tracing::trace_span!("blob_read_at", blob = %inner.name, offset, len = buf.len())
                .entered();
        let map = &inner.map;
        let size = map.uncompressed_size;
        if offset >= size || buf.is_empty() {
            return Ok(0);
        }
        let want = (size - offset).min(buf.len() as u64) as usize;
        let buf = &mut buf[..want];
        if map.compression == Compression::None {
            return inner.file.read_full_at(buf, offset).map_err(|e| {
                BlobError::io(format!("reading {} at offset {offset}", inner.name), e)
            });
        }
        let first = map.span_of(offset);
        if inner.prefetch {
            let end = offset + want as u64;
            let prev = inner.last_end.swap(end, Ordering::Relaxed);
            // Forward from where the previous read ended (past tar headers and small files
            // nobody read): read ahead.
            if offset >= prev && offset - prev <= SEQUENTIAL_GAP {
                let last = map.span_of(end - 1);
                let mut ahead = last + 1..last + 1 + PREFETCH_AHEAD;
                if inner.file.is_remote() {
                    let limit = if entry_end > end {
                        map.span_of(entry_end.min(size) - 1) + 1
                    } else {
                        0
                    };
                    ahead.end = ahead.end.min(limit);
                }
                Inner::prefetch(inner, ahead);
            }
        }
        let mut done = 0;
        let mut idx = first;
        while done < want {
            let pos = offset + done as u64;
            let (start, end) = map.span_range(idx);
            if !(start..end).contains(&pos) {
                return Err(BlobError::BadMap {
                    blob: inner.name.clone(),
                    msg: format!("no span holds offset {pos}"),
                });
            }
            let data = inner.span(idx)?;
            let from = (pos - start) as usize;
            if data.len() < from {
                return Err(BlobError::Internal(format!(
                    "span {idx} of {} decoded short",
                    inner.name
                )));
            }
            let n = (data.len() - from).min(want - done);
            buf[done..done + n].copy_from_slice(&data[from..from + n]);
            done += n;
            idx += 1;
        }
        Ok(done)
    }

    /// Total uncompressed bytes this reader has decompressed so far (prefetches included).
    pub fn decompressed_bytes(&self) -> u64 {
        self.inner.decompressed.load(Ordering::Relaxed)
    }
}

impl Inner {
    fn span(&self, idx: usize) -> Result<SpanData> {
        self.cache
            .get_or_load((self.id, idx), &self.closed, || self.load_checked_span(idx))
    }

    /// [`Inner::load_span`], checked against the span's digest while the bytes come from a
    /// remote source (a digest-checked local blob needs no second check). Bytes that do not
    /// decode or do not match are dropped from the source's cache and fetched again.
    fn load_checked_span(&self, idx: usize) -> Result<SpanData> {
        let want = self
            .span_digests
            .as_ref()
            .and_then(|d| d.get(idx).copied().flatten());
        // A local blob was checked whole against its digest; only fetched bytes need this.
        if want.is_none() || !self.file.is_remote() {
            return self.load_span(idx);
        }
        use sha2::Digest as _;
        let mut last = None;
        // Three tries: a refetch may be split into other ranges than the bad answer was.
        for attempt in 0..3 {
            let err = match self.load_span(idx) {
                Ok(data) if want == Some(sha2::Sha256::digest(&data[..]).into()) => {
                    return Ok(data)
                }
                Ok(_) => BlobError::BadMap {
                    blob: self.name.clone(),
                    msg: format!("span {idx} does not match its recorded sha256"),
                },
                Err(
                    e @ (BlobError::CorruptGzip { .. }
                    | BlobError::CorruptZstd { .. }
                    | BlobError::Truncated { .. }),
                ) => e,
                Err(e) => return Err(e),
            };
            tracing::warn!(blob = %self.name, idx, attempt, error = %err, "bad span; reading it again");
            if let Some((a, b)) = self.map.compressed_range(idx) {
                self.file.invalidate(a, b);
            }
            last = Some(err);
        }
        Err(last.unwrap_or_else(|| BlobError::Internal("no attempt".into())))
    }

    /// Queues background decompression of the spans in `range` not cached or loading yet.
    fn prefetch(this: &Arc<Inner>, range: std::ops::Range<usize>) {
        let n = this.map.span_count();
        for idx in range.start..range.end.min(n) {
            if this.cache.has((this.id, idx)) {
                continue;
            }
            if PREFETCHING.fetch_add(1, Ordering::AcqRel) >= prefetch_limit() {
                PREFETCHING.fetch_sub(1, Ordering::AcqRel);
                return;
            }
            let weak = Arc::downgrade(this);
            rayon::spawn(move || {
                if let Some(r) = weak.upgrade().filter(|r| !r.closed.load(Ordering::Acquire)) {
                    if let Err(e) = r.span(idx) {
                        tracing::debug!(blob = %r.name, idx, error = %e, "prefetch failed");
                    }
                }
                PREFETCHING.fetch_sub(1, Ordering::AcqRel);
            });
        }
    }

    fn load_span(&self, idx: usize) -> Result<SpanData> {
        let (start, end) = self.map.span_range(idx);
        let _span =
            tracing::debug_span!("decompress_span", blob = %self.name, idx, start, end).entered();
        let len = usize::try_from(end - start)
            .map_err(|_| BlobError::Internal(format!("span {idx} does not fit in memory")))?;
        let mut out = vec![0u8; len];
        let csize = self.map.compressed_size;
        let range = self.map.compressed_range(idx);
        if let Some((a, b)) = range {
            self.file.will_need(a, b);
        }
        // Decoding stops at the span's end; reading no further keeps a remote source from
        // fetching bytes of the next span.
        let limit = range.map_or(csize, |(_, b)| b);
        match &self.map.index {
            SpanIndex::Plain => {
                return Err(BlobError::Internal("plain blobs have no spans".into()));
            }
            SpanIndex::Gzip(points) => {
                let p = points.get(idx).ok_or_else(|| {
                    BlobError::Internal(format!("no checkpoint {idx} in {}", self.name))
                })?;
                gz::decode_span(
                    &*self.file,
                    &self.name,
                    p,
                    &mut out,
                    limit,
                    &self.decompressed,
                )?
            }
            SpanIndex::GzipCopy(g) => match g.spans.get(idx) {
                Some(gz::GzSpan::Point(p)) => gz::decode_span(
                    &*self.file,
                    &self.name,
                    p,
                    &mut out,
                    csize,
                    &self.decompressed,
                )?,
                Some(gz::GzSpan::Copy { c_off, c_len, .. }) => {
                    let local = self
                        .local
                        .as_ref()
                        .ok_or_else(|| BlobError::MissingLocalCopy {
                            blob: self.name.clone(),
                        })?;
                    zst::decode_range(
                        local,
                        &format!("local copy of {}", self.name),
                        *c_off,
                        c_off.saturating_add(*c_len),
                        0,
                        &mut out,
                        &self.decompressed,
                    )?
                }
                None => {
                    return Err(BlobError::Internal(format!(
                        "no span {idx} in {}",
                        self.name
                    )))
                }
            },
            SpanIndex::Zstd(z) => z.decode_span(
                &*self.file,
                self.local.as_ref(),
                &self.name,
                idx,
                &mut out,
                &self.decompressed,
            )?,
        }
        Ok(Arc::new(out))
    }
}

impl Drop for BlobReader {
    fn drop(&mut self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.cache.forget_blob(self.inner.id);
    }
}

/// serde for `Vec<u8>` as one byte string rather than a sequence of numbers.
mod serde_bytes_vec {
    use serde::de::{Deserializer, SeqAccess, Visitor};
    use serde::Serializer;
    use std::fmt;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(BytesVisitor)
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
            while let Some(b) = seq.next_element()? {
                v.push(b);
            }
            Ok(v)
        }
    }
}
