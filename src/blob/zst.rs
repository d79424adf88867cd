//! zstd: frame-based random access, with a local seekable copy for frames too big to enter.
//!
//! A zstd frame can only be decoded from its start. The pass records every data frame's
//! compressed and uncompressed extent; consecutive frames are grouped into spans of at most
//! `span_size` uncompressed bytes (a lone frame up to 2 × `span_size` is its own span) and read
//! straight from the blob. Skippable frames are stepped over and never inside a span.
//!
//! A frame larger than 2 × `span_size` (what `zstd` and most image builders write: one frame
//! for the whole layer) cannot be entered in the middle. For those, the same pass re-compresses
//! the frame's output in `span_size` chunks, each an independent zstd frame (level 1, with
//! checksum), into a local copy file whose frame table goes into the map. Cost: one extra
//! file on local disk about the size of the compressed frame, written once per layer, and the
//! CPU of a level-1 compression, done on a second thread so the pass stays near decompression
//! speed on two cores. A frame is only known to be big once it passes the threshold, so up to
//! 2 × `span_size` of each frame is buffered; past that the rest streams into the copy (memory
//! stays at a few spans: the buffer, the chunk being filled and two queued for the compressor).
//!
//! Without `SpanOptions::local_copy`, big frames are split into virtual spans that are decoded
//! from the frame start and skip ahead: correct but with unbounded work per read.

use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use zstd::zstd_safe::{self, DCtx, InBuffer, OutBuffer};

use super::copy::LocalCopy;
use super::{BlobError, Decode, PreadInput, Result, SpanIndex, SpanMap, SpanOptions};

const ZSTD_MAGIC: u32 = 0xFD2F_B528;
const SKIPPABLE_MASK: u32 = 0xFFFF_FFF0;
const SKIPPABLE_MAGIC: u32 = 0x184D_2A50;
const PASS_NAME: &str = "<indexing stream>";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Source {
    /// Whole frames from the blob.
    Blob,
    /// Whole frames from the local seekable copy.
    LocalCopy,
    /// One frame from the blob, decoded from its start, dropping this many bytes first.
    BlobSkip(u64),
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
            Source::Blob | Source::BlobSkip(_) => Some((s.c_off, s.c_off.saturating_add(s.c_len))),
        }
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
        let (file, name, skip) = match s.src {
            Source::Blob => (blob_file, blob.to_string(), 0),
            Source::BlobSkip(skip) => (blob_file, blob.to_string(), skip),
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

/// Decodes the frames in `[start, end)` of `file`, drops `skip` bytes, fills `out` exactly.
pub(super) fn decode_range(
    file: &dyn super::BlobBytes,
    name: &str,
    start: u64,
    end: u64,
    mut skip: u64,
    out: &mut [u8],
    counter: &AtomicU64,
) -> Result<()> {
    let mut dctx = DCtx::create();
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

struct Frame {
    c_off: u64,
    u_off: u64,
    u_len: u64,
    /// Output kept while the frame might still be small enough to read from the blob.
    pending: Vec<u8>,
    /// Past 2 × span_size: output goes to the local copy (or, without one, nowhere).
    big: bool,
}

enum State {
    FrameStart,
    InFrame(Frame),
    Done,
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
    group: Option<Group>,
    copy_path: Option<PathBuf>,
    copy: Option<LocalCopy>,
}

impl<R: Read> ZstdIndexer<R> {
    pub(super) fn new(inner: R, opts: SpanOptions) -> Result<Self> {
        Ok(ZstdIndexer {
            inner,
            input: vec![0; zstd_safe::DCtx::in_size().max(128 << 10)],
            in_pos: 0,
            in_len: 0,
            in_eof: false,
            consumed: 0,
            total_out: 0,
            dctx: DCtx::create(),
            state: State::FrameStart,
            span_size: opts.span_size,
            spans: Vec::new(),
            group: None,
            copy_path: opts.local_copy,
            copy: None,
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

    /// Output of the current frame: keep it while the frame may be small, else copy it.
    fn frame_output(&mut self, data: &[u8]) -> Result<()> {
        let State::InFrame(f) = &mut self.state else {
            return Ok(());
        };
        f.u_len += data.len() as u64;
        if f.big {
            if let Some(c) = &mut self.copy {
                c.push(data)?;
            }
            return Ok(());
        }
        if self.copy_path.is_some() {
            f.pending.extend_from_slice(data);
        }
        if f.u_len > 2 * self.span_size {
            f.big = true;
            let pending = std::mem::take(&mut f.pending);
            let u_off = f.u_off;
            if let Some(path) = &self.copy_path {
                if self.copy.is_none() {
                    self.copy = Some(LocalCopy::create(path.clone(), self.span_size)?);
                }
            }
            self.close_group();
            if let Some(c) = &mut self.copy {
                c.start_frame(u_off);
                c.push(&pending)?;
            }
        }
        Ok(())
    }

    fn end_frame(&mut self, f: Frame) -> Result<()> {
        let c_end = self.consumed;
        if f.big {
            match &mut self.copy {
                Some(c) => c.end_frame()?,
                None => {
                    // No local copy: virtual spans decoded from the frame start.
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

    pub(super) fn finish(mut self, total_out: u64) -> Result<SpanMap> {
        if !matches!(self.state, State::Done) {
            return Err(BlobError::NotFinished);
        }
        debug_assert_eq!(total_out, self.total_out);
        self.close_group();
        let mut spans = std::mem::take(&mut self.spans);
        let mut local_copy_size = 0;
        if let Some(c) = self.copy.take() {
            let (table, size) = c.finish()?;
            local_copy_size = size;
            spans.extend(table.into_iter().map(|f| ZSpan {
                u_off: f.u_off,
                c_off: f.c_off,
                c_len: f.c_len,
                src: Source::LocalCopy,
            }));
            spans.sort_by_key(|s| s.u_off);
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
            match &mut self.state {
                State::Done => return Ok(0),
                State::FrameStart => {
                    let have = self.ensure(8)?;
                    if have == 0 {
                        self.state = State::Done;
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
                    } else if magic == ZSTD_MAGIC {
                        self.state = State::InFrame(Frame {
                            c_off: self.consumed,
                            u_off: self.total_out,
                            u_len: 0,
                            pending: Vec::new(),
                            big: false,
                        });
                    } else {
                        return Err(self.corrupt(format!("bad frame magic {magic:#010x}")));
                    }
                }
                State::InFrame(_) => {
                    if self.in_pos == self.in_len {
                        self.ensure(1)?;
                    }
                    let avail = self.in_len - self.in_pos;
                    let mut inb = InBuffer::around(&self.input[self.in_pos..self.in_len]);
                    let mut ob = OutBuffer::around(&mut *out);
                    let ret = self.dctx.decompress_stream(&mut ob, &mut inb);
                    let used = inb.pos();
                    let produced = ob.pos();
                    let hint = match ret {
                        Ok(h) => h,
                        Err(code) => {
                            let offset = self.consumed;
                            return Err(zerr(PASS_NAME, offset, code));
                        }
                    };
                    self.advance(used);
                    self.total_out += produced as u64;
                    self.frame_output(&out[..produced])?;
                    if hint == 0 {
                        let State::InFrame(f) =
                            std::mem::replace(&mut self.state, State::FrameStart)
                        else {
                            return Err(BlobError::Internal("zstd pass state lost".into()));
                        };
                        self.end_frame(f)?;
                    } else if used == 0 && produced == 0 && avail == 0 && self.in_eof {
                        return Err(self.truncated());
                    }
                    if produced > 0 {
                        return Ok(produced);
                    }
                }
            }
        }
    }
}
