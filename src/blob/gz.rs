//! gzip: zran-style random access (after zlib's examples/zran.c).
//!
//! The indexing pass inflates with `Z_BLOCK`, which returns at every deflate block boundary.
//! At a boundary the decoder needs only the compressed position (byte offset plus the unused
//! bits of the last byte) and the 32 KiB of output before it to start again, so a checkpoint
//! stores exactly that. Checkpoints are placed at the last boundary before a span would exceed
//! `span_size`, so a span is never longer than `span_size` unless one deflate block is. The start
//! of every gzip member is a boundary too, with an empty window. In a [`super::FineRegion`]
//! (a file big enough to be read at random) checkpoints are [`super::FINE_SPAN_SIZE`] apart. Member CRC and length trailers
//! are verified during the pass (zlib does it in gzip mode); at read time a span that runs into
//! the next member switches to gzip mode to parse its header.
//!
//! There is no restart point inside a deflate block. zlib's levels 2-9 (and Go's, pigz's) close
//! a block every 16K-64K symbols (at most ~4 MiB of output, for runs of zeros), but zlib-ng's and
//! zlib-rs's level 1 ("quick") write a single fixed-Huffman block per stream, and some encoders
//! write very long blocks. So when the output passes 2 × `span_size` since the last block
//! boundary, the pass spills the region from that boundary on into the local seekable copy
//! (see [`super::copy`]: `span_size` zstd frames, compressed on a second thread) until the next
//! boundary, where checkpoints resume. The map then lists checkpoints and copy frames in one
//! sorted list ([`GzSpan`]). Cost: up to 2 × `span_size` of output buffered since the last
//! boundary (one memcpy of the output while a local copy is allowed). Without
//! `SpanOptions::local_copy` a long block stays one long span, read from its start.

use std::ffi::CStr;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use libz_rs_sys::{
    inflate, inflateEnd, inflateGetDictionary, inflateInit2_, inflatePrime, inflateReset2,
    inflateSetDictionary, z_stream, zlibVersion, Z_BLOCK, Z_BUF_ERROR, Z_NO_FLUSH, Z_OK,
    Z_STREAM_END,
};
use serde::{Deserialize, Serialize};

use super::copy::LocalCopy;
use super::{BlobError, Decode, PreadInput, Result, SpanIndex, SpanMap, SpanOptions};

const WINDOW: usize = 32 << 10;
/// zlib window bits: raw deflate, and gzip-only (with header and trailer checks).
const RAW: i32 = -15;
const GZIP: i32 = 15 + 16;
const PASS_NAME: &str = "<indexing stream>";

/// A place where inflation can restart.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Checkpoint {
    /// Uncompressed offset.
    pub(super) u_off: u64,
    /// Offset of the first compressed byte not fully consumed.
    pub(super) c_off: u64,
    /// Unused bits (0..=7) in the byte before `c_off` that still belong to the stream.
    pub(super) bits: u8,
    /// Up to 32 KiB of uncompressed data before `u_off` in the same member.
    #[serde(with = "super::serde_bytes_vec")]
    pub(super) window: Vec<u8>,
}

/// One span of a gzip map that has a local copy: a checkpoint in the blob, or one frame of the
/// local copy (the uncompressed range of a deflate block too long to read from its start).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) enum GzSpan {
    Point(Checkpoint),
    Copy { u_off: u64, c_off: u64, c_len: u64 },
}

impl GzSpan {
    pub(super) fn u_off(&self) -> u64 {
        match self {
            GzSpan::Point(p) => p.u_off,
            GzSpan::Copy { u_off, .. } => *u_off,
        }
    }
}

/// Map of a gzip blob with regions served from the local copy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct GzCopyIndex {
    pub(super) spans: Vec<GzSpan>,
    /// Size of the local copy file.
    pub(super) local_copy_size: u64,
}

impl GzCopyIndex {
    pub(super) fn validate(&self, compressed_size: u64) -> std::result::Result<(), String> {
        for (i, s) in self.spans.iter().enumerate() {
            match s {
                GzSpan::Point(p) => check_point(i, p, compressed_size)?,
                GzSpan::Copy { c_off, c_len, .. } => {
                    if c_off
                        .checked_add(*c_len)
                        .is_none_or(|e| e > self.local_copy_size)
                    {
                        return Err(format!("span {i} points past the end of the local copy"));
                    }
                }
            }
        }
        Ok(())
    }
}

fn check_point(i: usize, p: &Checkpoint, compressed_size: u64) -> std::result::Result<(), String> {
    if p.bits > 7 || p.window.len() > WINDOW {
        return Err(format!("checkpoint {i} has bad bits or window"));
    }
    if p.c_off > compressed_size || (p.bits > 0 && p.c_off == 0) {
        return Err(format!("checkpoint {i} points past the blob"));
    }
    Ok(())
}

pub(super) fn validate(
    points: &[Checkpoint],
    compressed_size: u64,
) -> std::result::Result<(), String> {
    for (i, p) in points.iter().enumerate() {
        check_point(i, p, compressed_size)?;
    }
    Ok(())
}

/// Owns an initialised zlib inflate stream. Boxed: zlib's state points back at the stream.
struct Inflater {
    strm: Box<z_stream>,
}

// SAFETY: the stream is only reached through &mut self; zlib-rs keeps no thread-local state.
unsafe impl Send for Inflater {}

impl Inflater {
    fn new(window_bits: i32) -> std::result::Result<Self, String> {
        let mut strm = Box::new(z_stream::default());
        // SAFETY: strm is a valid, default-initialised z_stream with the Rust allocator set.
        let ret = unsafe {
            inflateInit2_(
                &mut *strm,
                window_bits,
                zlibVersion(),
                std::mem::size_of::<z_stream>() as i32,
            )
        };
        if ret != Z_OK {
            return Err(format!("inflateInit2 failed ({ret})"));
        }
        Ok(Inflater { strm })
    }

    /// Inflates from `input` into `output`; returns (zlib code, bytes consumed, bytes produced).
    fn inflate(&mut self, input: &[u8], output: &mut [u8], flush: i32) -> (i32, usize, usize) {
        let in_len = input.len().min(u32::MAX as usize);
        let out_len = output.len().min(u32::MAX as usize);
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = in_len as u32;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = out_len as u32;
        // SAFETY: next_in/next_out point into live slices of the given lengths for this call.
        let ret = unsafe { inflate(&mut *self.strm, flush) };
        let used = in_len - self.strm.avail_in as usize;
        let produced = out_len - self.strm.avail_out as usize;
        self.strm.next_in = std::ptr::null();
        self.strm.avail_in = 0;
        self.strm.next_out = std::ptr::null_mut();
        self.strm.avail_out = 0;
        (ret, used, produced)
    }

    fn data_type(&self) -> i32 {
        self.strm.data_type
    }

    fn reset(&mut self, window_bits: i32) -> std::result::Result<(), String> {
        // SAFETY: the stream was initialised by inflateInit2_.
        match unsafe { inflateReset2(&mut *self.strm, window_bits) } {
            Z_OK => Ok(()),
            r => Err(format!("inflateReset2 failed ({r})")),
        }
    }

    fn prime(&mut self, bits: u8, value: u8) -> std::result::Result<(), String> {
        // SAFETY: as above.
        match unsafe { inflatePrime(&mut *self.strm, i32::from(bits), i32::from(value)) } {
            Z_OK => Ok(()),
            r => Err(format!("inflatePrime failed ({r})")),
        }
    }

    fn set_dictionary(&mut self, dict: &[u8]) -> std::result::Result<(), String> {
        // SAFETY: dict is a live slice of at most 32 KiB (validated).
        match unsafe { inflateSetDictionary(&mut *self.strm, dict.as_ptr(), dict.len() as u32) } {
            Z_OK => Ok(()),
            r => Err(format!("inflateSetDictionary failed ({r})")),
        }
    }

    /// The (up to) 32 KiB of output preceding the current position.
    fn dictionary(&mut self, out: &mut Vec<u8>) -> std::result::Result<(), String> {
        out.resize(WINDOW, 0);
        let mut len: u32 = 0;
        // SAFETY: out has room for the maximum window size zlib can return.
        let r = unsafe { inflateGetDictionary(&*self.strm, out.as_mut_ptr(), &mut len) };
        if r != Z_OK {
            return Err(format!("inflateGetDictionary failed ({r})"));
        }
        out.truncate((len as usize).min(WINDOW));
        Ok(())
    }

    fn msg(&self, code: i32) -> String {
        if self.strm.msg.is_null() {
            return format!("zlib error {code}");
        }
        // SAFETY: zlib sets msg to a static NUL-terminated string.
        unsafe { CStr::from_ptr(self.strm.msg) }
            .to_string_lossy()
            .into_owned()
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: initialised in new(); ended exactly once.
        unsafe {
            inflateEnd(&mut *self.strm);
        }
    }
}

/// The indexing pass over a gzip stream.
pub(super) struct GzIndexer<R> {
    inner: R,
    input: Vec<u8>,
    in_pos: usize,
    in_len: usize,
    in_eof: bool,
    /// Compressed offset of `input[in_pos]`.
    consumed: u64,
    total_out: u64,
    z: Inflater,
    span_size: u64,
    /// Where checkpoints are [`super::FINE_SPAN_SIZE`] apart instead.
    fine: Option<std::sync::Arc<super::FineRegion>>,
    points: Vec<Checkpoint>,
    /// Latest boundary within `span_size` of the last checkpoint.
    candidate: Option<Checkpoint>,
    last_boundary: Option<(u64, u64)>,
    done: bool,
    stalls: u32,
    /// Where over-long blocks are spilled (None: they stay long spans).
    copy_path: Option<PathBuf>,
    copy: Option<LocalCopy>,
    /// Uncompressed offset of the latest block boundary.
    boundary_u: u64,
    /// Output since `boundary_u`, kept while a local copy is allowed and not yet being written.
    tail: Vec<u8>,
    /// In a block that passed 2 × `span_size`: output goes to the local copy.
    copying: bool,
}

impl<R: Read> GzIndexer<R> {
    pub(super) fn new(inner: R, opts: &SpanOptions) -> Result<Self> {
        Ok(GzIndexer {
            inner,
            input: vec![0; 256 << 10],
            in_pos: 0,
            in_len: 0,
            in_eof: false,
            consumed: 0,
            total_out: 0,
            z: Inflater::new(GZIP).map_err(BlobError::Internal)?,
            span_size: opts.span_size,
            fine: opts.fine.clone(),
            points: Vec::new(),
            candidate: None,
            last_boundary: None,
            done: false,
            stalls: 0,
            copy_path: opts.local_copy.clone(),
            copy: None,
            boundary_u: 0,
            tail: Vec::new(),
            copying: false,
        })
    }

    /// New output (already counted in `total_out`): spill it, or keep it while the current
    /// block may still turn out too long.
    fn track(&mut self, data: &[u8]) -> Result<()> {
        if data.is_empty() || self.copy_path.is_none() {
            return Ok(());
        }
        if self.copying {
            if let Some(c) = &mut self.copy {
                c.push(data)?;
            }
            return Ok(());
        }
        self.tail.extend_from_slice(data);
        if self.total_out - self.boundary_u > 2 * self.span_size {
            self.start_copy()?;
        }
        Ok(())
    }

    /// The block since `boundary_u` is too long: serve `[boundary_u, next boundary)` from the
    /// local copy instead of a checkpoint at `boundary_u`.
    fn start_copy(&mut self) -> Result<()> {
        let b = self.boundary_u;
        if let Some(c) = self.candidate.take() {
            let last = self.points.last().map_or(0, |p| p.u_off);
            if c.u_off < b && (c.u_off > last || self.points.is_empty()) {
                self.points.push(c);
            }
        }
        if self.points.last().is_some_and(|p| p.u_off >= b) {
            self.points.pop();
        }
        if self.copy.is_none() {
            let Some(path) = &self.copy_path else {
                return Err(BlobError::Internal("local copy without a path".into()));
            };
            tracing::debug!(
                at = b,
                "deflate block longer than 2 spans: spilling it into the local copy"
            );
            self.copy = Some(LocalCopy::create(path.clone(), self.span_size)?);
        }
        if let Some(c) = &mut self.copy {
            c.start_frame(b);
            c.push(&self.tail)?;
        }
        self.tail = Vec::new();
        self.copying = true;
        Ok(())
    }

    fn refill(&mut self) -> Result<()> {
        if self.in_pos < self.in_len || self.in_eof {
            return Ok(());
        }
        loop {
            match self.inner.read(&mut self.input) {
                Ok(n) => {
                    self.in_pos = 0;
                    self.in_len = n;
                    self.in_eof = n == 0;
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(BlobError::io(
                        format!("reading gzip blob at compressed offset {}", self.consumed),
                        e,
                    ))
                }
            }
        }
    }

    fn corrupt(&self, msg: String) -> BlobError {
        BlobError::CorruptGzip {
            blob: PASS_NAME.into(),
            offset: self.consumed,
            msg,
        }
    }

    /// At a deflate block boundary (or just after a member header): maybe record a checkpoint.
    fn boundary(&mut self, bits: u8) -> Result<()> {
        let here = (self.total_out, self.consumed);
        if self.last_boundary == Some(here) {
            return Ok(());
        }
        self.last_boundary = Some(here);
        let mut window = Vec::new();
        self.z
            .dictionary(&mut window)
            .map_err(BlobError::Internal)?;
        let cp = Checkpoint {
            u_off: self.total_out,
            c_off: self.consumed,
            bits,
            window,
        };
        self.boundary_u = self.total_out;
        self.tail.clear();
        if self.copying {
            // The long block ended: the copy region stops here, checkpoints resume.
            self.copying = false;
            if let Some(c) = &mut self.copy {
                c.end_frame()?;
            }
            self.candidate = None;
            self.points.push(cp);
            return Ok(());
        }
        let Some(last) = self.points.last().map(|p| p.u_off) else {
            self.points.push(cp);
            return Ok(());
        };
        let spacing =
            super::spacing_at(&self.fine, cp.u_off, self.span_size, super::FINE_SPAN_SIZE);
        if cp.u_off - last <= spacing {
            self.candidate = Some(cp);
            return Ok(());
        }
        if let Some(c) = self.candidate.take() {
            if c.u_off > last {
                self.points.push(c);
            }
        }
        let last = self.points.last().map_or(0, |p| p.u_off);
        if cp.u_off - last > spacing {
            // One deflate block longer than a span: the best we can do is to start here.
            self.points.push(cp);
        } else {
            self.candidate = Some(cp);
        }
        Ok(())
    }

    pub(super) fn finish(mut self, total_out: u64) -> Result<SpanMap> {
        if !self.done {
            return Err(BlobError::NotFinished);
        }
        debug_assert_eq!(total_out, self.total_out);
        let mut points = std::mem::take(&mut self.points);
        if self.total_out == 0 {
            points.clear();
        }
        let index = match self.copy.take() {
            None => SpanIndex::Gzip(points),
            Some(mut c) => {
                if self.copying {
                    c.end_frame()?;
                }
                let table = c.finish()?;
                let local_copy_size = table.size;
                let mut spans: Vec<GzSpan> = points.into_iter().map(GzSpan::Point).collect();
                spans.extend(table.frames.into_iter().map(|f| GzSpan::Copy {
                    u_off: f.u_off,
                    c_off: f.c_off,
                    c_len: f.c_len,
                }));
                spans.sort_by_key(GzSpan::u_off);
                SpanIndex::GzipCopy(GzCopyIndex {
                    spans,
                    local_copy_size,
                })
            }
        };
        Ok(SpanMap {
            compression: super::Compression::Gzip,
            compressed_size: self.consumed,
            uncompressed_size: self.total_out,
            span_size: self.span_size,
            index,
        })
    }
}

impl<R: Read> Decode for GzIndexer<R> {
    fn compressed_read(&self) -> u64 {
        self.consumed
    }

    fn decode(&mut self, out: &mut [u8]) -> Result<usize> {
        if self.done || out.is_empty() {
            return Ok(0);
        }
        loop {
            self.refill()?;
            let (ret, used, produced) =
                self.z
                    .inflate(&self.input[self.in_pos..self.in_len], out, Z_BLOCK);
            self.in_pos += used;
            self.consumed += used as u64;
            self.total_out += produced as u64;
            self.track(&out[..produced])?;
            match ret {
                Z_OK | Z_BUF_ERROR => {
                    let dt = self.z.data_type();
                    // 128: at a block boundary or right after the header; 64: in the last block.
                    if dt & 128 != 0 && dt & 64 == 0 {
                        self.boundary((dt & 7) as u8)?;
                    }
                    if produced > 0 {
                        self.stalls = 0;
                        return Ok(produced);
                    }
                    if used == 0 {
                        if self.in_pos == self.in_len && self.in_eof {
                            return Err(BlobError::Truncated {
                                format: "gzip",
                                blob: PASS_NAME.into(),
                                offset: self.consumed,
                            });
                        }
                        // Z_BLOCK returns once at each boundary without progress; more means a bug.
                        self.stalls += 1;
                        if self.stalls > 4 {
                            return Err(self.corrupt("inflate makes no progress".into()));
                        }
                    } else {
                        self.stalls = 0;
                    }
                }
                Z_STREAM_END => {
                    // The member's trailer was checked; another member may follow.
                    self.refill()?;
                    if self.in_pos == self.in_len && self.in_eof {
                        self.done = true;
                        return Ok(produced);
                    }
                    self.z.reset(GZIP).map_err(BlobError::Internal)?;
                    if produced > 0 {
                        return Ok(produced);
                    }
                }
                code => return Err(self.corrupt(self.z.msg(code))),
            }
        }
    }
}

/// Decompresses `out.len()` bytes starting from checkpoint `p`.
pub(super) fn decode_span(
    file: &dyn super::BlobBytes,
    blob: &str,
    p: &Checkpoint,
    out: &mut [u8],
    compressed_size: u64,
    counter: &AtomicU64,
) -> Result<()> {
    let len = out.len();
    let internal = |m: String| BlobError::Internal(format!("{blob}: {m}"));
    let mut z = Inflater::new(RAW).map_err(internal)?;
    let start = p.c_off - u64::from(p.bits > 0);
    let mut src = PreadInput::new(file, blob, start, compressed_size);
    let truncated = |offset| BlobError::Truncated {
        format: "gzip",
        blob: blob.to_string(),
        offset,
    };
    if p.bits > 0 {
        let b = *src.fill()?.first().ok_or_else(|| truncated(start))?;
        src.consume(1);
        z.prime(p.bits, b >> (8 - p.bits)).map_err(internal)?;
    }
    if !p.window.is_empty() {
        z.set_dictionary(&p.window).map_err(internal)?;
    }
    let mut filled = 0;
    let mut gzip_mode = false;
    let mut stalls = 0;
    while filled < len {
        let input = src.fill()?;
        let avail = input.len();
        let (ret, used, produced) = z.inflate(input, &mut out[filled..], Z_NO_FLUSH);
        src.consume(used);
        filled += produced;
        counter.fetch_add(produced as u64, Ordering::Relaxed);
        match ret {
            Z_OK | Z_BUF_ERROR => {
                if used == 0 && produced == 0 {
                    if avail == 0 {
                        return Err(truncated(src.pos));
                    }
                    stalls += 1;
                    if stalls > 4 {
                        return Err(BlobError::CorruptGzip {
                            blob: blob.to_string(),
                            offset: src.pos,
                            msg: "inflate makes no progress".into(),
                        });
                    }
                }
            }
            Z_STREAM_END => {
                // Raw mode stops before the member trailer; gzip mode has consumed it.
                if !gzip_mode {
                    src.skip(8);
                }
                if filled < len {
                    z.reset(GZIP).map_err(internal)?;
                    gzip_mode = true;
                }
            }
            code => {
                return Err(BlobError::CorruptGzip {
                    blob: blob.to_string(),
                    offset: src.pos,
                    msg: z.msg(code),
                })
            }
        }
    }
    Ok(())
}
