//! Writing layer blobs: one encoder per [`Compression`], each a `Write` whose `finish` returns
//! the sink. zstd is cut into independent frames (lazysnap enters a blob at every frame, so
//! it needs no local seekable copy); gzip is compressed on every core as a series of gzip
//! members (valid gzip that every reader takes — RFC 1952 allows members back to back, Go's
//! and zlib's readers read them as one stream — and each member start is an entry point for
//! lazysnap's reader too).

use std::io::{self, Write};

use rayon::prelude::*;

use super::Compression;

/// zstd level lazysnap writes (the `zstd` CLI's default).
pub const ZSTD_LEVEL: i32 = 3;
/// gzip level lazysnap writes (gzip's and Go's default).
pub const GZIP_LEVEL: u32 = 6;
/// Uncompressed bytes per gzip member of [`ParallelGzip`]: large enough that starting each
/// member with an empty window costs well under 1% of the size.
pub const GZIP_MEMBER_SIZE: usize = 1 << 20;

/// A layer blob encoder for any compression.
pub enum LayerEncoder<W: Write> {
    None(W),
    Gzip(ParallelGzip<W>),
    Zstd(FramedZstd<W>),
}

impl<W: Write> LayerEncoder<W> {
    /// The encoder lazysnap uses for `compression`; zstd frames of `frame_size` bytes.
    pub fn new(w: W, compression: Compression, frame_size: u64) -> io::Result<Self> {
        Ok(match compression {
            Compression::None => LayerEncoder::None(w),
            Compression::Gzip => LayerEncoder::Gzip(ParallelGzip::new(
                w,
                GZIP_LEVEL,
                GZIP_MEMBER_SIZE,
                rayon::current_num_threads(),
            )),
            Compression::Zstd => LayerEncoder::Zstd(FramedZstd::new(w, ZSTD_LEVEL, frame_size)?),
        })
    }

    pub fn finish(self) -> io::Result<W> {
        match self {
            LayerEncoder::None(mut w) => {
                w.flush()?;
                Ok(w)
            }
            LayerEncoder::Gzip(g) => g.finish(),
            LayerEncoder::Zstd(z) => z.finish(),
        }
    }
}

impl<W: Write> Write for LayerEncoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            LayerEncoder::None(w) => w.write(buf),
            LayerEncoder::Gzip(g) => g.write(buf),
            LayerEncoder::Zstd(z) => z.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            LayerEncoder::None(w) => w.flush(),
            LayerEncoder::Gzip(g) => g.flush(),
            LayerEncoder::Zstd(z) => z.flush(),
        }
    }
}

/// A zstd stream cut into independent frames of `frame_size` uncompressed bytes: any zstd
/// reader reads it as one stream, and lazysnap's reader enters it at every frame, so the
/// layer needs no local seekable copy (a single frame would).
pub struct FramedZstd<W: Write> {
    enc: Option<zstd::Encoder<'static, W>>,
    level: i32,
    frame_size: u64,
    in_frame: u64,
}

impl<W: Write> FramedZstd<W> {
    pub fn new(w: W, level: i32, frame_size: u64) -> io::Result<Self> {
        Ok(FramedZstd {
            enc: Some(zstd::Encoder::new(w, level)?),
            level,
            frame_size: frame_size.max(1),
            in_frame: 0,
        })
    }

    fn encoder(&mut self) -> io::Result<&mut zstd::Encoder<'static, W>> {
        self.enc
            .as_mut()
            .ok_or_else(|| io::Error::other("zstd writer already finished"))
    }

    pub fn finish(mut self) -> io::Result<W> {
        match self.enc.take() {
            Some(e) => e.finish(),
            None => Err(io::Error::other("zstd writer already finished")),
        }
    }
}

impl<W: Write> Write for FramedZstd<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.in_frame >= self.frame_size {
            let w = self
                .enc
                .take()
                .ok_or_else(|| io::Error::other("zstd writer already finished"))?
                .finish()?;
            self.enc = Some(zstd::Encoder::new(w, self.level)?);
            self.in_frame = 0;
        }
        let room = (self.frame_size - self.in_frame).min(buf.len() as u64) as usize;
        let n = self.encoder()?.write(&buf[..room])?;
        self.in_frame += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.encoder()?.flush()
    }
}

/// gzip on every core: the input is cut into `member_size` pieces, `threads` pieces at a time
/// are compressed in parallel (rayon), each as a complete gzip member, and written in order.
/// With one thread, or input smaller than one member, it is plain single-member gzip.
pub struct ParallelGzip<W: Write> {
    out: W,
    level: u32,
    member_size: usize,
    /// Pieces compressed together (2 per thread, so one slow piece does not idle the rest).
    batch: usize,
    pending: Vec<Vec<u8>>,
    current: Vec<u8>,
    members_written: u64,
}

impl<W: Write> ParallelGzip<W> {
    pub fn new(out: W, level: u32, member_size: usize, threads: usize) -> Self {
        let member_size = member_size.max(1);
        ParallelGzip {
            out,
            level,
            member_size,
            batch: threads.max(1) * 2,
            pending: Vec::new(),
            current: Vec::with_capacity(member_size),
            members_written: 0,
        }
    }

    fn compress_pending(&mut self) -> io::Result<()> {
        let level = flate2::Compression::new(self.level);
        let members: Vec<Vec<u8>> = if self.pending.len() == 1 {
            vec![gzip_member(&self.pending[0], level)?]
        } else {
            self.pending
                .par_iter()
                .map(|piece| gzip_member(piece, level))
                .collect::<io::Result<_>>()?
        };
        for m in &members {
            self.out.write_all(m)?;
        }
        self.members_written += members.len() as u64;
        self.pending.clear();
        Ok(())
    }

    /// Writes what is buffered (an empty input still makes one empty member: a gzip file of
    /// zero bytes is not valid gzip).
    pub fn finish(mut self) -> io::Result<W> {
        if !self.current.is_empty() || (self.pending.is_empty() && self.members_written == 0) {
            self.pending.push(std::mem::take(&mut self.current));
        }
        if !self.pending.is_empty() {
            self.compress_pending()?;
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

fn gzip_member(data: &[u8], level: flate2::Compression) -> io::Result<Vec<u8>> {
    let mut e = flate2::write::GzEncoder::new(Vec::with_capacity(data.len() / 3 + 64), level);
    e.write_all(data)?;
    e.finish()
}

impl<W: Write> Write for ParallelGzip<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.member_size - self.current.len();
        let n = room.min(buf.len());
        self.current.extend_from_slice(&buf[..n]);
        if self.current.len() == self.member_size {
            let full = std::mem::replace(&mut self.current, Vec::with_capacity(self.member_size));
            self.pending.push(full);
            if self.pending.len() >= self.batch {
                self.compress_pending()?;
            }
        }
        Ok(n)
    }

    /// Buffered pieces stay buffered: a flush mid-stream would cut members short for nothing.
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod encode_tests {
    use std::io::Read;

    use super::*;

    fn gunzip(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(data)
            .read_to_end(&mut out)
            .expect("valid gzip");
        out
    }

    #[test]
    fn parallel_gzip_is_gzip_of_the_same_bytes_at_any_size() {
        let mut data = Vec::new();
        for i in 0..300_000u32 {
            data.extend_from_slice(format!("line {i} {}\n", i % 97).as_bytes());
        }
        for (len, member, threads) in [
            (0, 1024, 4),
            (1, 1024, 4),
            (1024, 1024, 4),
            (1025, 1024, 4),
            (data.len(), 64 << 10, 1),
            (data.len(), 64 << 10, 3),
        ] {
            let mut g = ParallelGzip::new(Vec::new(), 6, member, threads);
            // Odd write sizes cross member boundaries.
            for piece in data[..len].chunks(7777) {
                g.write_all(piece).unwrap();
            }
            let out = g.finish().unwrap();
            assert_eq!(gunzip(&out), &data[..len], "len {len} member {member}");
            let members = out.windows(3).filter(|w| w == &[0x1f, 0x8b, 8]).count();
            assert!(
                members >= len.div_ceil(member).max(1),
                "len {len}: {members}"
            );
        }
    }

    #[test]
    fn framed_zstd_reads_as_one_stream() {
        let data: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let mut z = FramedZstd::new(Vec::new(), 3, 100_000).unwrap();
        z.write_all(&data).unwrap();
        let out = z.finish().unwrap();
        let mut back = Vec::new();
        zstd::stream::read::Decoder::new(&out[..])
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
    }
}
