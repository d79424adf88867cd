//! zstd: frame-based random access, with resume points inside frames too big to read whole.
//!
//! A zstd frame decodes from its start. The pass records every data frame's compressed and
//! uncompressed extent; consecutive frames are grouped into spans of at most `span_size`
//! uncompressed bytes (a lone frame up to 2 × `span_size` is its own span) and read straight
//! from the blob. Skippable frames are stepped over and never inside a span.
//!
//! A bigger frame (what `zstd` and most image builders write: one frame for the whole layer)
//! is entered at *resume points*: block starts where the pass saved what the next blocks take
//! from before them (RFC 8878): the last window of output, the three repeat offsets, and the
//! last Huffman and FSE tables. That is exactly what a zstd dictionary holds, so a resume point
//! is a dictionary in the local file, and a read decodes a made-up frame header (the frame's
//! window, no checksum) plus the blob's blocks from the point, with that dictionary
//! ([`format`] follows the tables and offsets; libzstd decodes). Points are at least 4 windows
//! and at most `max(span_size, 4 × window + a block)` apart, so the dictionaries cost at most a
//! quarter of the output in local disk (in a [`FineRegion`], a big file that may be read at
//! random: `max(FINE_SPAN_SIZE, FINE_WINDOWS × window + a block)` apart, half of it),
//! and each one is checked at once against the block after it, and by crc32 when read.
//!
//! A frame whose window is larger than [`RESUME_WINDOW_MAX`] (`zstd --long`), or whose state
//! cannot be written (see [`format::Tables::dictionary`]), falls back to the local seekable
//! copy: the pass re-compresses the frame's output in `span_size` chunks, each an independent
//! zstd frame, on a second thread (see [`super::copy`]). A frame is only known to be big once
//! it passes 2 × `span_size`, so that much output (or the resume points' dictionaries) is
//! buffered until then.
//!
//! Without `SpanOptions::local_copy`, big frames are split into virtual spans that are decoded
//! from the frame start and skip ahead: correct but with unbounded work per read.

pub(super) mod format;

use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use zstd::zstd_safe::{self, DCtx, InBuffer, OutBuffer};

use super::copy::{LocalCopy, Record};
use super::{
    BlobError, Decode, FineRegion, PreadInput, Result, SpanIndex, SpanMap, SpanOptions,
    FINE_SPAN_SIZE, FINE_WINDOWS,
};
use format::{BlockHeader, BlockKind, FrameHeader, History, Needs, Tables};

const ZSTD_MAGIC: u32 = 0xFD2F_B528;
const SKIPPABLE_MASK: u32 = 0xFFFF_FFF0;
const SKIPPABLE_MAGIC: u32 = 0x184D_2A50;
const PASS_NAME: &str = "<indexing stream>";
/// Largest window of a frame entered at resume points (klauspost's default is 8 MiB,
/// `zstd -19` 8 MiB); a frame with a larger one goes to the local seekable copy.
pub(super) const RESUME_WINDOW_MAX: u64 = 8 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Source {
    /// Whole frames from the blob.
    Blob,
    /// Whole frames from the local seekable copy.
    LocalCopy,
    /// One frame from the blob, decoded from its start, dropping this many bytes first.
    BlobSkip(u64),
    /// Blocks from the blob, decoded with a resume point's dictionary from the local copy.
    /// Last, so maps written before it existed still decode.
    Resume(ResumePoint),
}

/// Where a resume point's dictionary sits in the local copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct ResumePoint {
    pub(super) dict_off: u64,
    pub(super) dict_len: u64,
    /// crc32 of the dictionary.
    pub(super) crc: u32,
    /// The frame's window size.
    pub(super) window: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct ZSpan {
    pub(super) u_off: u64,
    pub(super) c_off: u64,
    pub(super) c_len: u64,
    pub(super) src: Source,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct ZstdIndex {
    pub(super) spans: Vec<ZSpan>,
    /// Size of the local copy file (0 if none).
    pub(super) local_copy_size: u64,
}

impl ZstdIndex {
    /// Spans of whole frames read from the blob: (uncompressed offset, compressed offset,
    /// compressed length).
    pub(super) fn from_frames(spans: &[(u64, u64, u64)]) -> ZstdIndex {
        ZstdIndex {
            spans: spans
                .iter()
                .map(|&(u_off, c_off, c_len)| ZSpan {
                    u_off,
                    c_off,
                    c_len,
                    src: Source::Blob,
                })
                .collect(),
            local_copy_size: 0,
        }
    }

    /// Blob bytes span `i` decodes from, if it is read from the blob.
    pub(super) fn blob_range(&self, i: usize) -> Option<(u64, u64)> {
        let s = self.spans.get(i)?;
        match s.src {
            Source::LocalCopy => None,
            Source::Blob | Source::BlobSkip(_) | Source::Resume(_) => {
                Some((s.c_off, s.c_off.saturating_add(s.c_len)))
            }
        }
    }

    pub(super) fn resume_points(&self) -> usize {
        self.spans
            .iter()
            .filter(|s| matches!(s.src, Source::Resume(_)))
            .count()
    }

    pub(super) fn copied_spans(&self) -> usize {
        self.spans
            .iter()
            .filter(|s| s.src == Source::LocalCopy)
            .count()
    }

    pub(super) fn has_local_copy(&self) -> bool {
        self.local_copy_size > 0
    }

    pub(super) fn validate(&self, compressed_size: u64) -> std::result::Result<(), String> {
        for (i, s) in self.spans.iter().enumerate() {
            let limit = match s.src {
                Source::LocalCopy => self.local_copy_size,
                _ => compressed_size,
            };
            if s.c_off.checked_add(s.c_len).is_none_or(|e| e > limit) {
                return Err(format!("span {i} points past the end of its file"));
            }
            if let Source::Resume(p) = &s.src {
                let end = p.dict_off.checked_add(p.dict_len);
                if end.is_none_or(|e| e > self.local_copy_size)
                    || p.window > RESUME_WINDOW_MAX
                    || p.dict_len > p.window + (1 << 20)
                {
                    return Err(format!("resume point of span {i} is out of bounds"));
                }
            }
        }
        Ok(())
    }

    pub(super) fn decode_span(
        &self,
        blob_file: &dyn super::BlobBytes,
        local: Option<&File>,
        blob: &str,
        idx: usize,
        out: &mut [u8],
        counter: &AtomicU64,
    ) -> Result<()> {
        let s = self
            .spans
            .get(idx)
            .ok_or_else(|| BlobError::Internal(format!("no span {idx} in {blob}")))?;
        let (file, name, skip) = match &s.src {
            Source::Resume(p) => {
                let local = local.ok_or_else(|| BlobError::MissingLocalCopy {
                    blob: blob.to_string(),
                })?;
                return with_decoder(|dctx, dict| {
                    read_dictionary(local, p, dict).map_err(|msg| {
                        BlobError::CorruptResumePoint {
                            blob: blob.to_string(),
                            span: idx,
                            msg,
                        }
                    })?;
                    decode_resumed(dctx, blob_file, blob, s, p.window, dict, out, counter)
                });
            }
            Source::Blob => (blob_file, blob.to_string(), 0),
            &Source::BlobSkip(skip) => (blob_file, blob.to_string(), skip),
            Source::LocalCopy => (
                local.map(|f| f as &dyn super::BlobBytes).ok_or_else(|| {
                    BlobError::MissingLocalCopy {
                        blob: blob.to_string(),
                    }
                })?,
                format!("local copy of {blob}"),
                0,
            ),
        };
        decode_range(file, &name, s.c_off, s.c_off + s.c_len, skip, out, counter)
    }
}

fn zerr(blob: &str, offset: u64, code: usize) -> BlobError {
    BlobError::CorruptZstd {
        blob: blob.to_string(),
        offset,
        msg: zstd_safe::get_error_name(code).to_string(),
    }
}

/// A decoder and a dictionary buffer, kept between spans: fresh ones cost a read its
/// window's and dictionary's allocations and page faults again (measured: more than decoding
/// a 4 MiB span from a resume point).
type Decoder = (DCtx<'static>, Vec<u8>);

/// Idle decoders, at most one per core (decodes beyond that wait for a core anyway), so the
/// memory they keep stays bounded however many threads read.
static DECODERS: Mutex<Vec<Decoder>> = Mutex::new(Vec::new());

/// Runs `f` with an idle decoder (reset: no parameters, no dictionary) and its dictionary
/// buffer, or new ones.
fn with_decoder<T>(f: impl FnOnce(&mut DCtx<'static>, &mut Vec<u8>) -> Result<T>) -> Result<T> {
    let idle = DECODERS.lock().unwrap_or_else(|e| e.into_inner()).pop();
    let (mut dctx, mut dict) = idle.unwrap_or_else(|| (DCtx::create(), Vec::new()));
    let reset = |d: &mut DCtx<'static>| {
        d.reset(zstd_safe::ResetDirective::SessionAndParameters)
            .map_err(|code| BlobError::Internal(zstd_safe::get_error_name(code).to_string()))
    };
    reset(&mut dctx)?;
    let out = f(&mut dctx, &mut dict);
    // Drops the decoder's copy of the dictionary now, not at its next use.
    if reset(&mut dctx).is_ok() {
        let mut pool = DECODERS.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < super::prefetch_limit() {
            pool.push((dctx, dict));
        }
    }
    out
}

/// Reads a resume point's dictionary into `dict`, checked against its crc32.
fn read_dictionary(
    local: &File,
    p: &ResumePoint,
    dict: &mut Vec<u8>,
) -> std::result::Result<(), String> {
    dict.resize(p.dict_len as usize, 0);
    let n = super::pread_full(local, p.dict_off, dict).map_err(|e| e.to_string())?;
    if n != dict.len() {
        return Err("dictionary cut short".into());
    }
    if crc32fast::hash(dict) != p.crc {
        return Err("dictionary fails its crc32".into());
    }
    Ok(())
}

/// Decodes span `s` (blocks of a frame from a resume point) with the point's dictionary.
#[allow(clippy::too_many_arguments)]
fn decode_resumed(
    dctx: &mut DCtx<'static>,
    file: &dyn super::BlobBytes,
    blob: &str,
    s: &ZSpan,
    window: u64,
    dict: &[u8],
    out: &mut [u8],
    counter: &AtomicU64,
) -> Result<()> {
    let bad = |msg: String| BlobError::CorruptZstd {
        blob: blob.to_string(),
        offset: s.c_off,
        msg,
    };
    let header = format::resume_frame_header(window).map_err(bad)?;
    dctx.load_dictionary(dict).map_err(|code| {
        bad(format!(
            "resume dictionary: {}",
            zstd_safe::get_error_name(code)
        ))
    })?;
    let mut inb = InBuffer::around(&header[..]);
    let mut ob = OutBuffer::around(&mut [][..]);
    while inb.pos() < header.len() {
        let at = inb.pos();
        dctx.decompress_stream(&mut ob, &mut inb)
            .map_err(|code| zerr(blob, s.c_off, code))?;
        if inb.pos() == at {
            return Err(bad("resume header not taken".into()));
        }
    }
    stream_into(
        dctx,
        file,
        blob,
        s.c_off,
        s.c_off + s.c_len,
        0,
        out,
        counter,
    )
}

/// Decodes the frames in `[start, end)` of `file`, drops `skip` bytes, fills `out` exactly.
pub(super) fn decode_range(
    file: &dyn super::BlobBytes,
    name: &str,
    start: u64,
    end: u64,
    skip: u64,
    out: &mut [u8],
    counter: &AtomicU64,
) -> Result<()> {
    with_decoder(|dctx, _| stream_into(dctx, file, name, start, end, skip, out, counter))
}

#[allow(clippy::too_many_arguments)]
fn stream_into(
    dctx: &mut DCtx<'static>,
    file: &dyn super::BlobBytes,
    name: &str,
    start: u64,
    end: u64,
    mut skip: u64,
    out: &mut [u8],
    counter: &AtomicU64,
) -> Result<()> {
    let mut src = PreadInput::new(file, name, start, end);
    let mut scratch = if skip > 0 {
        vec![0u8; 128 << 10]
    } else {
        Vec::new()
    };
    let mut filled = 0;
    while filled < out.len() {
        let input = src.fill()?;
        let avail = input.len();
        let mut inb = InBuffer::around(input);
        let (ret, produced) = if skip > 0 {
            let n = scratch.len().min(skip as usize);
            let mut ob = OutBuffer::around(&mut scratch[..n]);
            let r = dctx.decompress_stream(&mut ob, &mut inb);
            skip -= ob.pos() as u64;
            (r, ob.pos())
        } else {
            let mut ob = OutBuffer::around(&mut out[filled..]);
            let r = dctx.decompress_stream(&mut ob, &mut inb);
            filled += ob.pos();
            (r, ob.pos())
        };
        let used = inb.pos();
        counter.fetch_add(produced as u64, Ordering::Relaxed);
        let at = src.pos;
        src.consume(used);
        match ret {
            Err(code) => return Err(zerr(name, at, code)),
            Ok(_) if used == 0 && produced == 0 && avail == 0 => {
                return Err(BlobError::Truncated {
                    format: "zstd",
                    blob: name.to_string(),
                    offset: src.pos,
                });
            }
            Ok(0) if src.pos >= end && filled < out.len() => {
                return Err(BlobError::CorruptZstd {
                    blob: name.to_string(),
                    offset: src.pos,
                    msg: format!("frames end after {filled} of {} expected bytes", out.len()),
                });
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

/// Group of consecutive small frames being collected into one span.
struct Group {
    u_off: u64,
    u_len: u64,
    c_off: u64,
    c_end: u64,
}

/// The last `cap` bytes of a frame's output: the window a resume point hands on.
struct Ring {
    buf: Vec<u8>,
    cap: usize,
    /// Next write position once `buf` is full.
    pos: usize,
}

impl Ring {
    fn new(cap: usize) -> Ring {
        Ring {
            buf: Vec::new(),
            cap,
            pos: 0,
        }
    }

    fn push(&mut self, mut data: &[u8]) {
        if data.len() >= self.cap {
            data = &data[data.len() - self.cap..];
        }
        if self.buf.len() < self.cap {
            let take = (self.cap - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        while !data.is_empty() {
            let take = (self.cap - self.pos).min(data.len());
            self.buf[self.pos..self.pos + take].copy_from_slice(&data[..take]);
            self.pos = (self.pos + take) % self.cap;
            data = &data[take..];
        }
    }

    /// The last `n` bytes (at most what was pushed), oldest first, in two pieces.
    fn last(&self, n: usize) -> [&[u8]; 2] {
        let n = n.min(self.buf.len());
        if self.buf.len() < self.cap {
            return [&self.buf[self.buf.len() - n..], &[]];
        }
        let start = (self.pos + self.cap - n) % self.cap;
        if start + n <= self.cap {
            [&self.buf[start..start + n], &[]]
        } else {
            [&self.buf[start..], &self.buf[..n - (self.cap - start)]]
        }
    }
}

/// A resume point placed at a block start, until its block is decoded: the dictionary's
/// tables and repeat offsets, and its window.
struct Candidate {
    u_in: u64,
    c_off: u64,
    prefix: Vec<u8>,
    window: Vec<u8>,
}

/// A resume point of the frame: where it enters the blob, and its dictionary (in memory while
/// the frame may still turn out small, else its record in the local copy, checked there
/// against the block after it).
struct Point {
    u_off: u64,
    c_off: u64,
    dict: std::result::Result<usize, Record>,
}

/// What a frame too big to read whole needs for resume points: the entropy state, repeat
/// offsets and window at block starts, every `spacing` bytes of output.
struct Resume {
    window: u64,
    spacing: u64,
    /// Spacing inside the fine region (`fine`, in stream offsets: the frame starts at
    /// `frame_u_off`).
    fine_spacing: u64,
    fine: Option<Arc<FineRegion>>,
    frame_u_off: u64,
    tables: Tables,
    history: History,
    ring: Ring,
    /// The ring holds the output from `ring_from` to `fed_to` (in-frame offsets) without a
    /// gap: only a point with its whole window in there may be taken.
    ring_from: u64,
    fed_to: u64,
    /// In-frame offset of the last point (0: the frame start).
    last_point: u64,
    points: Vec<Point>,
    candidate: Option<Candidate>,
    /// A block could not be followed: no more points in this frame.
    stopped: bool,
}

impl Resume {
    fn new(window: u64, span_size: u64, fine: Option<Arc<FineRegion>>, frame_u_off: u64) -> Resume {
        Resume {
            window,
            // A point stores one window: points at least 4 windows apart keep that within
            // 25% of the output (one is placed up to a block early, see `consider`).
            spacing: span_size.max(4 * window + block_max(window)),
            fine_spacing: FINE_SPAN_SIZE.max(FINE_WINDOWS * window + block_max(window)),
            fine,
            frame_u_off,
            tables: Tables::default(),
            history: History::default(),
            ring: Ring::new(window as usize),
            ring_from: 0,
            fed_to: 0,
            last_point: 0,
            points: Vec::new(),
            candidate: None,
            stopped: false,
        }
    }

    /// Before block `block` (content after its header) at in-frame offset `u_in`: a
    /// candidate point there if one is due and the state can be written as a dictionary.
    fn consider(&mut self, u_in: u64, c_off: u64, kind: BlockKind, block: &[u8]) {
        // A block adds at most BLOCK_MAX: placing the point a block early keeps spans within
        // `spacing`.
        if self.stopped || u_in + block_max(self.window) < self.last_point + self.spacing_at(u_in) {
            return;
        }
        let n = self.window.min(u_in);
        if self.fed_to != u_in || self.ring_from + n > u_in {
            // The ring started late (the spacing just shrank): a later block then.
            return;
        }
        let needs = match kind {
            BlockKind::Compressed => match Needs::of_block(block) {
                Ok(n) => n,
                Err(e) => return self.stop(&e),
            },
            _ => Needs::ALL,
        };
        let reps = match self.history.reps() {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => return self.stop(&e),
        };
        if let Some(prefix) = self.tables.dictionary_prefix(needs, reps) {
            self.candidate = Some(Candidate {
                u_in,
                c_off,
                prefix,
                window: self.ring.last(n as usize).concat(),
            });
        }
    }

    /// In-frame offset from which output must go to the ring: a window before the next point
    /// can be due (copying all output would cost the pass a memcpy of everything).
    fn window_from(&self, u_in: u64) -> u64 {
        (self.last_point + self.spacing_at(u_in))
            .saturating_sub(block_max(self.window) + self.window)
    }

    /// Point spacing at in-frame offset `u_in`.
    fn spacing_at(&self, u_in: u64) -> u64 {
        super::spacing_at(
            &self.fine,
            self.frame_u_off + u_in,
            self.spacing,
            self.fine_spacing,
        )
    }

    /// Output at in-frame offset `u_in` that a window may need.
    fn feed(&mut self, u_in: u64, data: &[u8]) {
        if u_in != self.fed_to {
            self.ring_from = u_in;
        }
        self.ring.push(data);
        self.fed_to = u_in + data.len() as u64;
    }

    /// Follows a compressed block's tables and offsets.
    fn follow(&mut self, block: &[u8]) {
        if self.stopped {
            return;
        }
        let before = self.tables.clone();
        match self.tables.apply(block) {
            Ok(0) => {}
            Ok(_) => self.history.push(&before, block),
            Err(e) => self.stop(&e),
        }
    }

    fn stop(&mut self, why: &str) {
        tracing::warn!(
            why,
            "zstd frame: no further resume points (spans get longer)"
        );
        self.stopped = true;
        self.candidate = None;
    }
}

/// Most output of one block in a frame with this window.
fn block_max(window: u64) -> u64 {
    window.min(format::BLOCK_MAX as u64)
}

/// Whether `dict` + the resume header + `block` (header and content) decode to `expect`.
fn resumes_to(dict: &[u8], window: u64, block: &[u8], expect: &[u8]) -> bool {
    let Ok(header) = format::resume_frame_header(window) else {
        return false;
    };
    let mut d = DCtx::create();
    if d.load_dictionary(dict).is_err() {
        return false;
    }
    let mut got = vec![0u8; expect.len() + 1];
    let mut filled = 0;
    for input in [&header[..], block] {
        let mut inb = InBuffer::around(input);
        while inb.pos() < input.len() {
            let mut ob = OutBuffer::around(&mut got[filled..]);
            if d.decompress_stream(&mut ob, &mut inb).is_err() {
                return false;
            }
            let (p, n) = (inb.pos(), ob.pos());
            filled += n;
            if n == 0 && p == inb.pos() && filled == got.len() {
                return false;
            }
        }
    }
    // Output still buffered inside the decoder.
    loop {
        let mut inb = InBuffer::around(&[][..]);
        let mut ob = OutBuffer::around(&mut got[filled..]);
        if d.decompress_stream(&mut ob, &mut inb).is_err() {
            return false;
        }
        if ob.pos() == 0 {
            break;
        }
        filled += ob.pos();
    }
    got[..filled] == *expect
}

struct Frame {
    c_off: u64,
    u_off: u64,
    u_len: u64,
    header: FrameHeader,
    /// Output kept while the frame might still be small enough to read from the blob.
    pending: Vec<u8>,
    /// Past 2 × span_size: output goes to the local copy (or, without one, nowhere), or the
    /// frame is entered at its resume points.
    big: bool,
    resume: Option<Resume>,
    /// End of the last block (before the checksum), once it was decoded.
    blocks_end: Option<u64>,
}

enum State {
    FrameStart,
    InFrame(Box<Frame>),
    Done,
}

/// A committed resume span, its dictionary's record pending in the local copy.
struct ResumeSpan {
    u_off: u64,
    c_off: u64,
    c_len: u64,
    record: usize,
    window: u64,
    /// The frame's start, to decode from should the record fail its check.
    frame_c_off: u64,
    frame_u_off: u64,
}

/// The indexing pass over a zstd stream.
pub(super) struct ZstdIndexer<R> {
    inner: R,
    input: Vec<u8>,
    in_pos: usize,
    in_len: usize,
    in_eof: bool,
    /// Compressed offset of `input[in_pos]`.
    consumed: u64,
    total_out: u64,
    dctx: DCtx<'static>,
    state: State,
    span_size: u64,
    spans: Vec<ZSpan>,
    resume_spans: Vec<ResumeSpan>,
    group: Option<Group>,
    copy_path: Option<PathBuf>,
    copy: Option<LocalCopy>,
    /// Where resume points are closer (see [`FineRegion`]).
    fine: Option<Arc<FineRegion>>,
    /// Output of the last block when the caller's buffer was too small for a whole block.
    block_out: Vec<u8>,
    out_pos: usize,
    out_len: usize,
}

impl<R: Read> ZstdIndexer<R> {
    pub(super) fn new(inner: R, opts: SpanOptions) -> Result<Self> {
        Ok(ZstdIndexer {
            inner,
            // A whole block with its header and a checksum, plus room to refill in big reads.
            input: vec![0; 2 * format::BLOCK_MAX + 64],
            in_pos: 0,
            in_len: 0,
            in_eof: false,
            consumed: 0,
            total_out: 0,
            dctx: DCtx::create(),
            state: State::FrameStart,
            span_size: opts.span_size,
            spans: Vec::new(),
            resume_spans: Vec::new(),
            group: None,
            copy_path: opts.local_copy,
            copy: None,
            fine: opts.fine,
            block_out: Vec::new(),
            out_pos: 0,
            out_len: 0,
        })
    }

    /// Makes at least `n` bytes available at `in_pos` unless the input ends; returns how many.
    fn ensure(&mut self, n: usize) -> Result<usize> {
        while self.in_len - self.in_pos < n && !self.in_eof {
            if self.in_pos > 0 {
                self.input.copy_within(self.in_pos..self.in_len, 0);
                self.in_len -= self.in_pos;
                self.in_pos = 0;
            }
            match self.inner.read(&mut self.input[self.in_len..]) {
                Ok(0) => self.in_eof = true,
                Ok(k) => self.in_len += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(BlobError::io(
                        format!("reading zstd blob at compressed offset {}", self.consumed),
                        e,
                    ))
                }
            }
        }
        Ok(self.in_len - self.in_pos)
    }

    fn advance(&mut self, n: usize) {
        self.in_pos += n;
        self.consumed += n as u64;
    }

    fn truncated(&self) -> BlobError {
        BlobError::Truncated {
            format: "zstd",
            blob: PASS_NAME.into(),
            offset: self.consumed + (self.in_len - self.in_pos) as u64,
        }
    }

    fn corrupt(&self, msg: String) -> BlobError {
        BlobError::CorruptZstd {
            blob: PASS_NAME.into(),
            offset: self.consumed,
            msg,
        }
    }

    /// Skips a skippable frame's payload, which may be larger than the input buffer.
    fn skip_bytes(&mut self, mut n: u64) -> Result<()> {
        while n > 0 {
            if self.ensure(1)? == 0 {
                return Err(self.truncated());
            }
            let k = ((self.in_len - self.in_pos) as u64).min(n) as usize;
            self.advance(k);
            n -= k as u64;
        }
        Ok(())
    }

    fn close_group(&mut self) {
        if let Some(g) = self.group.take() {
            self.spans.push(ZSpan {
                u_off: g.u_off,
                c_off: g.c_off,
                c_len: g.c_end - g.c_off,
                src: Source::Blob,
            });
        }
    }

    fn local_copy(&mut self) -> Result<Option<&mut LocalCopy>> {
        if self.copy.is_none() {
            if let Some(path) = &self.copy_path {
                self.copy = Some(LocalCopy::create(path.clone(), self.span_size)?);
            }
        }
        Ok(self.copy.as_mut())
    }

    /// Moves a point's dictionary into the local copy.
    fn commit_point(&mut self, p: &mut Point) -> Result<()> {
        let dict = std::mem::replace(&mut p.dict, Ok(usize::MAX));
        p.dict = match dict {
            Ok(n) => Ok(n),
            Err(record) => {
                let copy = self.local_copy()?.ok_or_else(|| {
                    BlobError::Internal("resume point without a local copy".into())
                })?;
                Ok(copy.push_record(record)?)
            }
        };
        Ok(())
    }

    /// Output of the current frame: keep it while the frame may be small, else copy it (or
    /// for a frame with resume points, only keep its window).
    fn frame_output(&mut self, f: &mut Frame, data: &[u8]) -> Result<()> {
        if let Some(r) = &mut f.resume {
            if f.u_len + data.len() as u64 > r.window_from(f.u_len) {
                r.feed(f.u_len, data);
            }
        }
        f.u_len += data.len() as u64;
        if f.big {
            if f.resume.is_none() {
                if let Some(c) = &mut self.copy {
                    c.push(data)?;
                }
            }
            return Ok(());
        }
        if self.copy_path.is_some() && f.resume.is_none() {
            f.pending.extend_from_slice(data);
        }
        if f.u_len > 2 * self.span_size {
            f.big = true;
            self.close_group();
            if let Some(r) = &mut f.resume {
                let mut points = std::mem::take(&mut r.points);
                for p in &mut points {
                    self.commit_point(p)?;
                }
                if let Some(r) = &mut f.resume {
                    r.points = points;
                }
                return Ok(());
            }
            let pending = std::mem::take(&mut f.pending);
            if let Some(c) = self.local_copy()? {
                c.start_frame(f.u_off);
                c.push(&pending)?;
            }
        }
        Ok(())
    }

    /// Takes a candidate as one of the frame's points; `block` (header and content) decodes
    /// to `expect`, which the local copy's thread checks the dictionary against.
    fn accept(
        &mut self,
        f: &mut Frame,
        cand: Candidate,
        block: Vec<u8>,
        expect: &[u8],
    ) -> Result<()> {
        let Some(r) = &mut f.resume else {
            return Ok(());
        };
        r.last_point = cand.u_in;
        let (window, expect) = (r.window, expect.to_vec());
        let record = Record {
            parts: vec![cand.prefix, cand.window],
            check: Some(Box::new(move |dict: &[u8]| {
                resumes_to(dict, window, &block, &expect)
            })),
        };
        let mut p = Point {
            u_off: f.u_off + cand.u_in,
            c_off: cand.c_off,
            dict: Err(record),
        };
        if f.big {
            self.commit_point(&mut p)?;
        }
        if let Some(r) = &mut f.resume {
            r.points.push(p);
        }
        Ok(())
    }

    /// Decodes the next block of the frame into `out` (returns its length) or, when `out`
    /// is too small for a block, into `block_out` (returns 0).
    fn next_block(&mut self, f: &mut Frame, out: &mut [u8]) -> Result<usize> {
        let c_off = self.consumed;
        if self.ensure(3)? < 3 {
            return Err(self.truncated());
        }
        let b = &self.input[self.in_pos..self.in_pos + 3];
        let h = BlockHeader::parse([b[0], b[1], b[2]]).map_err(|m| self.corrupt(m))?;
        let body = 3 + h.content_len();
        let total = body + if h.last && f.header.checksum { 4 } else { 0 };
        if self.ensure(total)? < total {
            return Err(self.truncated());
        }
        let (start, end) = (self.in_pos, self.in_pos + total);
        if let Some(r) = &mut f.resume {
            r.consider(f.u_len, c_off, h.kind, &self.input[start + 3..start + body]);
            if h.kind == BlockKind::Compressed {
                r.follow(&self.input[start + 3..start + body]);
            }
        }
        let mut own = std::mem::take(&mut self.block_out);
        let direct = out.len() >= format::BLOCK_MAX;
        if !direct && own.len() < format::BLOCK_MAX {
            own.resize(format::BLOCK_MAX, 0);
        }
        let dst: &mut [u8] = if direct { out } else { &mut own };
        let mut inb = InBuffer::around(&self.input[start..end]);
        let mut produced = 0;
        let mut ended = false;
        while !ended {
            let before = (inb.pos(), produced);
            let mut ob = OutBuffer::around(&mut dst[produced..]);
            let hint = self
                .dctx
                .decompress_stream(&mut ob, &mut inb)
                .map_err(|code| zerr(PASS_NAME, c_off + before.0 as u64, code))?;
            produced += ob.pos();
            // 0: the frame ended (and a further call would start the next one).
            ended = hint == 0;
            if (inb.pos(), produced) == before {
                break;
            }
        }
        if inb.pos() < total {
            return Err(self.corrupt(format!(
                "a block of {total} bytes decodes past {} bytes of room",
                dst.len()
            )));
        }
        if h.last != ended {
            return Err(self.corrupt("the frame does not end at its last block".into()));
        }
        let data = &dst[..produced];
        // A point at an empty block (the empty last block encoders often write) would
        // start a span at the frame end.
        let cand = f.resume.as_mut().and_then(|r| r.candidate.take());
        if let Some(cand) = cand.filter(|_| produced > 0) {
            let block = self.input[start..start + body].to_vec();
            self.accept(f, cand, block, data)?;
        }
        self.advance(total);
        self.total_out += produced as u64;
        self.frame_output(f, data)?;
        if h.last {
            f.blocks_end = Some(c_off + body as u64);
        }
        self.block_out = own;
        if direct {
            return Ok(produced);
        }
        self.out_pos = 0;
        self.out_len = produced;
        Ok(0)
    }

    fn end_frame(&mut self, mut f: Frame) -> Result<()> {
        let c_end = self.consumed;
        if f.big {
            if let Some(r) = f.resume.take().filter(|r| !r.points.is_empty()) {
                let blocks_end = f.blocks_end.unwrap_or(c_end);
                self.spans.push(ZSpan {
                    u_off: f.u_off,
                    c_off: f.c_off,
                    c_len: r.points[0].c_off - f.c_off,
                    src: Source::Blob,
                });
                for (i, p) in r.points.iter().enumerate() {
                    let next = r.points.get(i + 1).map_or(blocks_end, |n| n.c_off);
                    let record = match p.dict {
                        Ok(n) => n,
                        Err(_) => {
                            return Err(BlobError::Internal("resume point not written".into()))
                        }
                    };
                    self.resume_spans.push(ResumeSpan {
                        u_off: p.u_off,
                        c_off: p.c_off,
                        c_len: next - p.c_off,
                        record,
                        window: r.window,
                        frame_c_off: f.c_off,
                        frame_u_off: f.u_off,
                    });
                }
                return Ok(());
            }
            match &mut self.copy {
                Some(c) if f.resume.is_none() => c.end_frame()?,
                _ => {
                    // No local copy (or no point could be placed): virtual spans decoded
                    // from the frame start.
                    let mut skip = 0;
                    while skip < f.u_len {
                        self.spans.push(ZSpan {
                            u_off: f.u_off + skip,
                            c_off: f.c_off,
                            c_len: c_end - f.c_off,
                            src: Source::BlobSkip(skip),
                        });
                        skip += self.span_size;
                    }
                }
            }
            return Ok(());
        }
        if f.u_len == 0 {
            self.close_group();
            return Ok(());
        }
        match &mut self.group {
            Some(g) if g.c_end == f.c_off && g.u_len + f.u_len <= self.span_size => {
                g.c_end = c_end;
                g.u_len += f.u_len;
            }
            _ => {
                self.close_group();
                self.group = Some(Group {
                    u_off: f.u_off,
                    u_len: f.u_len,
                    c_off: f.c_off,
                    c_end,
                });
            }
        }
        Ok(())
    }

    fn start_frame(&mut self) -> Result<Box<Frame>> {
        self.ensure(format::FRAME_HEADER_MAX)?;
        let header = format::frame_header(&self.input[self.in_pos..self.in_len])
            .map_err(|m| self.corrupt(m))?
            .ok_or_else(|| self.truncated())?;
        let c_off = self.consumed;
        let mut inb = InBuffer::around(&self.input[self.in_pos..self.in_pos + header.len]);
        let mut ob = OutBuffer::around(&mut [][..]);
        while inb.pos() < header.len {
            let at = inb.pos();
            self.dctx
                .decompress_stream(&mut ob, &mut inb)
                .map_err(|code| zerr(PASS_NAME, c_off, code))?;
            if inb.pos() == at {
                return Err(self.corrupt("frame header not taken".into()));
            }
        }
        self.advance(header.len);
        // A frame known to end before its first point would be due (e.g. a single-segment
        // frame, whose window is its whole content) takes the local copy if it is big.
        let resume = Resume::new(
            header.window,
            self.span_size,
            self.fine.clone(),
            self.total_out,
        );
        let resume = (self.copy_path.is_some()
            && header.dict_id == 0
            && header.window <= RESUME_WINDOW_MAX
            && header
                .content_size
                .is_none_or(|n| n > 2 * self.span_size && n > resume.spacing))
        .then_some(resume);
        Ok(Box::new(Frame {
            c_off,
            u_off: self.total_out,
            u_len: 0,
            header,
            pending: Vec::new(),
            big: false,
            resume,
            blocks_end: None,
        }))
    }

    pub(super) fn finish(mut self, total_out: u64) -> Result<SpanMap> {
        if !matches!(self.state, State::Done) {
            return Err(BlobError::NotFinished);
        }
        debug_assert_eq!(total_out, self.total_out);
        self.close_group();
        let mut spans = std::mem::take(&mut self.spans);
        let mut local_copy_size = 0;
        if let Some(c) = self.copy.take() {
            let table = c.finish()?;
            local_copy_size = table.size;
            spans.extend(table.frames.into_iter().map(|f| ZSpan {
                u_off: f.u_off,
                c_off: f.c_off,
                c_len: f.c_len,
                src: Source::LocalCopy,
            }));
            for r in std::mem::take(&mut self.resume_spans) {
                let at = *table.records.get(r.record).ok_or_else(|| {
                    BlobError::Internal("resume point record missing from the local copy".into())
                })?;
                spans.push(match at {
                    Some(at) => ZSpan {
                        u_off: r.u_off,
                        c_off: r.c_off,
                        c_len: r.c_len,
                        src: Source::Resume(ResumePoint {
                            dict_off: at.off,
                            dict_len: at.len,
                            crc: at.crc,
                            window: r.window,
                        }),
                    },
                    None => {
                        // The dictionary did not decode the block after it (a state this
                        // pass cannot follow): that span is decoded from the frame start.
                        tracing::warn!(
                            c_off = r.c_off,
                            "zstd resume point does not decode its block; that span decodes from the frame start"
                        );
                        ZSpan {
                            u_off: r.u_off,
                            c_off: r.frame_c_off,
                            c_len: r.c_off + r.c_len - r.frame_c_off,
                            src: Source::BlobSkip(r.u_off - r.frame_u_off),
                        }
                    }
                });
            }
            spans.sort_by_key(|s| s.u_off);
        }
        if !self.resume_spans.is_empty() {
            return Err(BlobError::Internal(
                "resume points without a local copy".into(),
            ));
        }
        Ok(SpanMap {
            compression: super::Compression::Zstd,
            compressed_size: self.consumed,
            uncompressed_size: self.total_out,
            span_size: self.span_size,
            index: SpanIndex::Zstd(ZstdIndex {
                spans,
                local_copy_size,
            }),
        })
    }
}

impl<R: Read> Decode for ZstdIndexer<R> {
    fn compressed_read(&self) -> u64 {
        self.consumed
    }

    fn decode(&mut self, out: &mut [u8]) -> Result<usize> {
        loop {
            if self.out_pos < self.out_len {
                let n = out.len().min(self.out_len - self.out_pos);
                out[..n].copy_from_slice(&self.block_out[self.out_pos..self.out_pos + n]);
                self.out_pos += n;
                return Ok(n);
            }
            match std::mem::replace(&mut self.state, State::Done) {
                State::Done => return Ok(0),
                State::FrameStart => {
                    let have = self.ensure(8)?;
                    if have == 0 {
                        return Ok(0);
                    }
                    if have < 4 {
                        return Err(self.truncated());
                    }
                    let m = &self.input[self.in_pos..self.in_pos + 4];
                    let magic = u32::from_le_bytes([m[0], m[1], m[2], m[3]]);
                    if magic & SKIPPABLE_MASK == SKIPPABLE_MAGIC {
                        if have < 8 {
                            return Err(self.truncated());
                        }
                        let s = &self.input[self.in_pos + 4..self.in_pos + 8];
                        let size = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                        // A span's compressed range must hold data frames only.
                        self.close_group();
                        self.advance(8);
                        self.skip_bytes(u64::from(size))?;
                        self.state = State::FrameStart;
                    } else if magic == ZSTD_MAGIC {
                        self.state = State::InFrame(self.start_frame()?);
                    } else {
                        return Err(self.corrupt(format!("bad frame magic {magic:#010x}")));
                    }
                }
                State::InFrame(mut f) => {
                    if f.blocks_end.is_some() {
                        self.end_frame(*f)?;
                        self.state = State::FrameStart;
                        continue;
                    }
                    let n = self.next_block(&mut f, out)?;
                    self.state = State::InFrame(f);
                    if n > 0 {
                        return Ok(n);
                    }
                }
            }
        }
    }
}
