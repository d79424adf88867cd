//! The parts of the zstd format (RFC 8878) a resume point needs: frame and block headers, the
//! literals and sequences section headers, FSE table descriptions, and the sequences' offsets
//! (for the repeat-offset history). No literal is decoded and no match copied: libzstd does
//! the decoding; this only follows the state a block hands to the next one.

use std::collections::VecDeque;

pub(crate) const BLOCK_MAX: usize = 128 << 10;
/// Largest frame header: magic, descriptor, window, 4-byte dictionary ID, 8-byte content size.
pub(crate) const FRAME_HEADER_MAX: usize = 18;
const DICT_MAGIC: u32 = 0xEC30_A437;
/// Dictionary ID of the dictionaries written for resume points (any value works: resumed
/// frames carry no dictionary ID, so libzstd checks none).
const RESUME_DICT_ID: u32 = 0x4C5A_5350;

pub(crate) type FormatResult<T> = std::result::Result<T, String>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FrameHeader {
    /// Length of the header, magic included.
    pub(crate) len: usize,
    pub(crate) window: u64,
    pub(crate) checksum: bool,
    pub(crate) dict_id: u32,
    pub(crate) content_size: Option<u64>,
}

/// Parses a frame header at the start of `b` (magic included); `Ok(None)` if `b` is too short.
pub(crate) fn frame_header(b: &[u8]) -> FormatResult<Option<FrameHeader>> {
    let Some(&fhd) = b.get(4) else {
        return Ok(None);
    };
    if fhd & 0x08 != 0 {
        return Err("reserved bit set in the frame header".into());
    }
    let single = fhd & 0x20 != 0;
    let dict_len = [0, 1, 2, 4][usize::from(fhd & 3)];
    let fcs_len = match fhd >> 6 {
        0 if single => 1,
        0 => 0,
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let len = 5 + usize::from(!single) + dict_len + fcs_len;
    if b.len() < len {
        return Ok(None);
    }
    let mut at = 5;
    let mut window = 0;
    if !single {
        let wd = b[at];
        let base = 1u64 << (10 + (wd >> 3));
        window = base + (base / 8) * u64::from(wd & 7);
        at += 1;
    }
    let dict_id = le(&b[at..at + dict_len]) as u32;
    at += dict_len;
    let content_size = (fcs_len > 0).then(|| {
        let fcs = le(&b[at..at + fcs_len]);
        if fcs_len == 2 {
            fcs + 256
        } else {
            fcs
        }
    });
    if single {
        window = content_size.unwrap_or(0);
    }
    Ok(Some(FrameHeader {
        len,
        window,
        checksum: fhd & 0x04 != 0,
        dict_id,
        content_size,
    }))
}

fn le(b: &[u8]) -> u64 {
    b.iter().rev().fold(0, |v, &x| (v << 8) | u64::from(x))
}

/// The header of a frame that resumes with a dictionary: no content size, no checksum, no
/// dictionary ID, the smallest window descriptor at least `window` (and 1 KiB).
pub(crate) fn resume_frame_header(window: u64) -> FormatResult<[u8; 6]> {
    for exp in 0u8..=31 {
        let base = 1u64 << (10 + exp);
        for mant in 0u8..8 {
            if base + (base / 8) * u64::from(mant) >= window {
                let m = super::ZSTD_MAGIC.to_le_bytes();
                return Ok([m[0], m[1], m[2], m[3], 0, (exp << 3) | mant]);
            }
        }
    }
    Err(format!("window of {window} bytes is too large"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockKind {
    Raw,
    Rle,
    Compressed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlockHeader {
    pub(crate) last: bool,
    pub(crate) kind: BlockKind,
    /// Block_Size: content bytes for raw and compressed blocks, output bytes for RLE.
    pub(crate) size: usize,
}

impl BlockHeader {
    pub(crate) fn parse(b: [u8; 3]) -> FormatResult<BlockHeader> {
        let v = u32::from(b[0]) | (u32::from(b[1]) << 8) | (u32::from(b[2]) << 16);
        let kind = match (v >> 1) & 3 {
            0 => BlockKind::Raw,
            1 => BlockKind::Rle,
            2 => BlockKind::Compressed,
            _ => return Err("reserved block type".into()),
        };
        let size = (v >> 3) as usize;
        if size > BLOCK_MAX {
            return Err(format!("block of {size} bytes exceeds the 128 KiB maximum"));
        }
        Ok(BlockHeader {
            last: v & 1 != 0,
            kind,
            size,
        })
    }

    /// Bytes of block content after the 3-byte header.
    pub(crate) fn content_len(&self) -> usize {
        match self.kind {
            BlockKind::Rle => 1,
            _ => self.size,
        }
    }
}

/// How a block's sequences section gets one of its three FSE tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FseDesc {
    Predefined,
    Rle(u8),
    /// An FSE table description (normalized counts), as it appears in the block.
    Fse(Vec<u8>),
}

/// The entropy state one compressed block leaves to the next: the last Huffman tree
/// description and the last literal-length, offset and match-length tables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Tables {
    pub(crate) huf: Option<Vec<u8>>,
    /// Literal lengths, offsets, match lengths (the order of the sequences section).
    pub(crate) fse: [Option<FseDesc>; 3],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LitKind {
    Raw,
    Rle,
    Compressed,
    Treeless,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Predefined,
    Rle,
    Fse,
    Repeat,
}

/// What a compressed block's headers say.
struct BlockLayout<'a> {
    lit_kind: LitKind,
    huf_desc: Option<&'a [u8]>,
    nb_seq: usize,
    modes: [Mode; 3],
    descs: [Option<FseDesc>; 3],
    /// The sequences' bitstream.
    bitstream: &'a [u8],
}

const LL: usize = 0;
const OF: usize = 1;
const ML: usize = 2;
const MAX_SYMBOL: [usize; 3] = [35, 31, 52];
const MAX_LOG: [u32; 3] = [9, 8, 9];

fn layout(block: &[u8]) -> FormatResult<BlockLayout<'_>> {
    let short = || "compressed block is too short".to_string();
    let b0 = *block.first().ok_or_else(short)?;
    let lit_kind = match b0 & 3 {
        0 => LitKind::Raw,
        1 => LitKind::Rle,
        2 => LitKind::Compressed,
        _ => LitKind::Treeless,
    };
    let sf = (b0 >> 2) & 3;
    let (hlen, lit_len) = match lit_kind {
        LitKind::Raw | LitKind::Rle => {
            let (hlen, regen) = match sf {
                0 | 2 => (1, usize::from(b0 >> 3)),
                1 => (2, le(block.get(..2).ok_or_else(short)?) as usize >> 4),
                _ => (3, le(block.get(..3).ok_or_else(short)?) as usize >> 4),
            };
            (hlen, if lit_kind == LitKind::Raw { regen } else { 1 })
        }
        _ => {
            let (hlen, bits) = match sf {
                0 | 1 => (3, 10),
                2 => (4, 14),
                _ => (5, 18),
            };
            let h = le(block.get(..hlen).ok_or_else(short)?);
            (hlen, ((h >> (4 + bits)) & ((1 << bits) - 1)) as usize)
        }
    };
    let seq_at = hlen + lit_len;
    let huf_desc = if lit_kind == LitKind::Compressed {
        let hb = usize::from(*block.get(hlen).ok_or_else(short)?);
        let n = 1 + if hb < 128 { hb } else { (hb - 127).div_ceil(2) };
        if n > lit_len {
            return Err("Huffman tree description overruns the literals".into());
        }
        Some(&block[hlen..hlen + n])
    } else {
        None
    };
    let s = block.get(seq_at..).ok_or_else(short)?;
    let b = *s.first().ok_or_else(short)?;
    let (nb_seq, mut at) = match b {
        0 => (0, 1),
        1..=127 => (usize::from(b), 1),
        128..=254 => (
            ((usize::from(b) - 128) << 8) + usize::from(*s.get(1).ok_or_else(short)?),
            2,
        ),
        255 => (le(s.get(1..3).ok_or_else(short)?) as usize + 0x7F00, 3),
    };
    let mut modes = [Mode::Repeat; 3];
    let mut descs: [Option<FseDesc>; 3] = [None, None, None];
    if nb_seq > 0 {
        let m = *s.get(at).ok_or_else(short)?;
        if m & 3 != 0 {
            return Err("reserved bits set in the symbol compression modes".into());
        }
        at += 1;
        for (t, shift) in [(LL, 6), (OF, 4), (ML, 2)] {
            modes[t] = match (m >> shift) & 3 {
                0 => {
                    descs[t] = Some(FseDesc::Predefined);
                    Mode::Predefined
                }
                1 => {
                    descs[t] = Some(FseDesc::Rle(*s.get(at).ok_or_else(short)?));
                    at += 1;
                    Mode::Rle
                }
                2 => {
                    let rest = s.get(at..).ok_or_else(short)?;
                    let (_, _, n) = read_ncount(rest, MAX_SYMBOL[t], MAX_LOG[t])?;
                    descs[t] = Some(FseDesc::Fse(rest[..n].to_vec()));
                    at += n;
                    Mode::Fse
                }
                _ => Mode::Repeat,
            };
        }
    }
    Ok(BlockLayout {
        lit_kind,
        huf_desc,
        nb_seq,
        modes,
        descs,
        bitstream: s.get(at..).ok_or_else(short)?,
    })
}

/// What the first block after a resume point takes from the state before it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Needs {
    pub(crate) huf: bool,
    pub(crate) fse: [bool; 3],
}

impl Needs {
    /// Everything: for a block that defines nothing (raw, RLE, no sequences), after which any
    /// later block may repeat the tables.
    pub(crate) const ALL: Needs = Needs {
        huf: true,
        fse: [true; 3],
    };

    /// What compressed `block` repeats from before it; tables it leaves alone count as needed,
    /// since a later block may repeat them.
    pub(crate) fn of_block(block: &[u8]) -> FormatResult<Needs> {
        let l = layout(block)?;
        let mut needs = Needs::ALL;
        needs.huf = l.lit_kind != LitKind::Compressed;
        if l.nb_seq > 0 {
            for t in 0..3 {
                needs.fse[t] = l.modes[t] == Mode::Repeat;
            }
        }
        Ok(needs)
    }
}

impl Tables {
    /// Takes the tables a compressed block defines; returns its number of sequences.
    pub(crate) fn apply(&mut self, block: &[u8]) -> FormatResult<usize> {
        let l = layout(block)?;
        if let Some(h) = l.huf_desc {
            self.huf = Some(h.to_vec());
        } else if l.lit_kind == LitKind::Treeless && self.huf.is_none() {
            return Err("treeless literals without a previous Huffman table".into());
        }
        for (t, d) in l.descs.into_iter().enumerate() {
            if let Some(d) = d {
                self.fse[t] = Some(d);
            } else if l.nb_seq > 0 && self.fse[t].is_none() {
                return Err("repeated sequence table without a previous one".into());
            }
        }
        Ok(l.nb_seq)
    }

    /// The start of the dictionary that hands this state and `reps` to libzstd (the window
    /// follows it as the dictionary's content), or `None` if a table `needs` names cannot be
    /// written in a dictionary (an RLE table, which has accuracy 0 where a dictionary's tables
    /// start at 5).
    pub(crate) fn dictionary_prefix(&self, needs: Needs, reps: [u32; 3]) -> Option<Vec<u8>> {
        let mut d = Vec::with_capacity(512);
        d.extend_from_slice(&DICT_MAGIC.to_le_bytes());
        d.extend_from_slice(&RESUME_DICT_ID.to_le_bytes());
        match &self.huf {
            Some(h) => d.extend_from_slice(h),
            None if needs.huf => return None,
            // Any valid tree: two symbols of one bit.
            None => d.extend_from_slice(&[128, 0x10]),
        }
        // A dictionary lists offsets, match lengths, literal lengths.
        for t in [OF, ML, LL] {
            match &self.fse[t] {
                Some(FseDesc::Fse(b)) => d.extend_from_slice(b),
                Some(FseDesc::Predefined) => d.extend_from_slice(&predefined_ncount(t)),
                Some(FseDesc::Rle(_)) | None if needs.fse[t] => return None,
                Some(FseDesc::Rle(_)) | None => d.extend_from_slice(&predefined_ncount(t)),
            }
        }
        for r in reps {
            d.extend_from_slice(&r.to_le_bytes());
        }
        Some(d)
    }
}

const LL_DEFAULT: [i16; 36] = [
    4, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 2, 1, 1, 1, 1, 1,
    -1, -1, -1, -1,
];
const ML_DEFAULT: [i16; 53] = [
    1, 4, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1,
];
const OF_DEFAULT: [i16; 29] = [
    1, 1, 1, 1, 1, 1, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1,
];

fn predefined(t: usize) -> (&'static [i16], u32) {
    match t {
        LL => (&LL_DEFAULT, 6),
        OF => (&OF_DEFAULT, 5),
        _ => (&ML_DEFAULT, 6),
    }
}

fn predefined_ncount(t: usize) -> Vec<u8> {
    let (counts, log) = predefined(t);
    write_ncount(counts, log)
}

/// Forward bit reader of an FSE table description.
struct Bits<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Bits<'_> {
    fn peek(&self, n: u32) -> u32 {
        let mut v = 0u64;
        let first = self.pos / 8;
        for i in 0..5 {
            v |= u64::from(self.b.get(first + i).copied().unwrap_or(0)) << (8 * i);
        }
        ((v >> (self.pos % 8)) & ((1u64 << n) - 1)) as u32
    }
}

/// Reads an FSE table description: (normalized counts, accuracy log, bytes used).
pub(crate) fn read_ncount(
    b: &[u8],
    max_symbol: usize,
    max_log: u32,
) -> FormatResult<(Vec<i16>, u32, usize)> {
    let mut r = Bits { b, pos: 0 };
    let log = r.peek(4) + 5;
    r.pos = 4;
    if log > max_log {
        return Err(format!("FSE accuracy log {log} above {max_log}"));
    }
    let mut remaining: i32 = (1 << log) + 1;
    let mut threshold: i32 = 1 << log;
    let mut nb_bits = log + 1;
    let mut counts = Vec::new();
    while remaining > 1 {
        if counts.len() > max_symbol {
            return Err("FSE table description has too many symbols".into());
        }
        let max = (2 * threshold - 1) - remaining;
        let low = r.peek(nb_bits - 1) as i32;
        let value = if low < max {
            r.pos += (nb_bits - 1) as usize;
            low
        } else {
            let mut v = r.peek(nb_bits) as i32;
            if v >= threshold {
                v -= max;
            }
            r.pos += nb_bits as usize;
            v
        };
        let count = value - 1;
        remaining -= count.abs();
        counts.push(count as i16);
        if count == 0 {
            loop {
                let rep = r.peek(2);
                r.pos += 2;
                counts.extend(std::iter::repeat_n(0, rep as usize));
                if rep != 3 {
                    break;
                }
            }
        }
        while remaining < threshold && threshold > 1 {
            nb_bits -= 1;
            threshold >>= 1;
        }
    }
    let used = r.pos.div_ceil(8);
    if remaining != 1 || counts.len() > max_symbol + 1 || used > b.len() {
        return Err("corrupt FSE table description".into());
    }
    Ok((counts, log, used))
}

/// Writes an FSE table description (after libzstd's FSE_writeNCount).
pub(crate) fn write_ncount(counts: &[i16], log: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut acc: u64 = u64::from(log - 5);
    let mut n: u32 = 4;
    let mut put = |acc: &mut u64, n: &mut u32, v: u64, bits: u32| {
        *acc |= v << *n;
        *n += bits;
        while *n >= 8 {
            out.push(*acc as u8);
            *acc >>= 8;
            *n -= 8;
        }
    };
    let mut remaining: i32 = (1 << log) + 1;
    let mut threshold: i32 = 1 << log;
    let mut nb_bits = log + 1;
    let mut symbol = 0;
    let mut previous0 = false;
    while symbol < counts.len() && remaining > 1 {
        if previous0 {
            let mut start = symbol;
            while symbol < counts.len() && counts[symbol] == 0 {
                symbol += 1;
            }
            while symbol >= start + 3 {
                start += 3;
                put(&mut acc, &mut n, 3, 2);
            }
            put(&mut acc, &mut n, (symbol - start) as u64, 2);
        }
        let c = i32::from(counts[symbol]);
        symbol += 1;
        let max = (2 * threshold - 1) - remaining;
        remaining -= c.abs();
        let mut v = c + 1;
        if v >= threshold {
            v += max;
        }
        let bits = if v < max { nb_bits - 1 } else { nb_bits };
        put(&mut acc, &mut n, v as u64, bits);
        previous0 = v == 1;
        while remaining < threshold && threshold > 1 {
            nb_bits -= 1;
            threshold >>= 1;
        }
    }
    if n > 0 {
        out.push(acc as u8);
    }
    out
}

/// An FSE decoding table: (symbol, bits to read, base of the next state) per state.
struct Fse {
    log: u32,
    states: Vec<(u8, u8, u16)>,
}

impl Fse {
    fn build(desc: &FseDesc, t: usize) -> FormatResult<Fse> {
        let (counts, log) = match desc {
            FseDesc::Rle(s) => {
                return Ok(Fse {
                    log: 0,
                    states: vec![(*s, 0, 0)],
                })
            }
            FseDesc::Predefined => {
                let (c, l) = predefined(t);
                (c.to_vec(), l)
            }
            FseDesc::Fse(b) => {
                let (c, l, _) = read_ncount(b, MAX_SYMBOL[t], MAX_LOG[t])?;
                (c, l)
            }
        };
        let size = 1usize << log;
        let mut sym = vec![0u8; size];
        let mut next = vec![0u32; counts.len()];
        let mut high = size - 1;
        for (s, &c) in counts.iter().enumerate() {
            if c == -1 {
                sym[high] = s as u8;
                high = high.wrapping_sub(1);
                next[s] = 1;
            } else {
                next[s] = c.max(0) as u32;
            }
        }
        let step = (size >> 1) + (size >> 3) + 3;
        let mask = size - 1;
        let mut pos = 0usize;
        for (s, &c) in counts.iter().enumerate() {
            for _ in 0..c.max(0) {
                sym[pos] = s as u8;
                loop {
                    pos = (pos + step) & mask;
                    if high == usize::MAX || pos <= high {
                        break;
                    }
                }
            }
        }
        if pos != 0 {
            return Err("FSE table does not fill its states".into());
        }
        let states = sym
            .iter()
            .map(|&s| {
                let x = next[usize::from(s)];
                next[usize::from(s)] += 1;
                let nb = log - (31 - x.leading_zeros());
                (s, nb as u8, ((x << nb) - size as u32) as u16)
            })
            .collect();
        Ok(Fse { log, states })
    }
}

/// Backward bit reader of a sequences bitstream.
struct BackBits<'a> {
    b: &'a [u8],
    /// Bits not yet read, counted from the start of `b`.
    left: i64,
}

impl<'a> BackBits<'a> {
    fn new(b: &'a [u8]) -> FormatResult<Self> {
        let last = *b.last().ok_or("empty sequences bitstream")?;
        if last == 0 {
            return Err("sequences bitstream has no end mark".into());
        }
        Ok(BackBits {
            b,
            left: b.len() as i64 * 8 - i64::from(last.leading_zeros()) - 1,
        })
    }

    fn read(&mut self, n: u32) -> FormatResult<u32> {
        if n == 0 {
            return Ok(0);
        }
        self.left -= i64::from(n);
        if self.left < 0 {
            return Err("sequences bitstream overrun".into());
        }
        let pos = self.left as usize;
        let mut v = 0u64;
        for i in 0..5 {
            v |= u64::from(self.b.get(pos / 8 + i).copied().unwrap_or(0)) << (8 * i);
        }
        Ok(((v >> (pos % 8)) & ((1u64 << n) - 1)) as u32)
    }
}

const LL_EXTRA: [u8; 36] = [
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 4, 6, 7, 8, 9, 10, 11,
    12, 13, 14, 15, 16,
];
const ML_EXTRA: [u8; 53] = [
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    1, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
];

/// Repeat offsets as far as known: `None` is a value from before the blocks followed.
pub(crate) type Reps = [Option<u32>; 3];

/// Follows compressed `block`'s sequences from `reps` and returns the repeat offsets after
/// it. `tables` is the state before the block.
pub(crate) fn follow_reps(block: &[u8], tables: &Tables, mut reps: Reps) -> FormatResult<Reps> {
    let l = layout(block)?;
    if l.nb_seq == 0 {
        return Ok(reps);
    }
    let mut fse = Vec::with_capacity(3);
    for t in 0..3 {
        let desc = l.descs[t]
            .as_ref()
            .or(tables.fse[t].as_ref())
            .ok_or("repeated sequence table without a previous one")?;
        fse.push(Fse::build(desc, t)?);
    }
    let mut bits = BackBits::new(l.bitstream)?;
    let mut state = [0usize; 3];
    for t in [LL, OF, ML] {
        state[t] = bits.read(fse[t].log)? as usize;
    }
    for i in 0..l.nb_seq {
        let code = |t: usize| fse[t].states.get(state[t]).map(|s| s.0);
        let (Some(ll), Some(of), Some(ml)) = (code(LL), code(OF), code(ML)) else {
            return Err("FSE state out of its table".into());
        };
        if usize::from(ll) > MAX_SYMBOL[LL] || usize::from(ml) > MAX_SYMBOL[ML] || of > 31 {
            return Err("sequence code out of range".into());
        }
        let offset_value = (1u64 << of) + u64::from(bits.read(u32::from(of))?);
        bits.read(u32::from(ML_EXTRA[usize::from(ml)]))?;
        let ll_zero = ll == 0;
        bits.read(u32::from(LL_EXTRA[usize::from(ll)]))?;
        reps = next_reps(reps, offset_value, ll_zero);
        if i + 1 < l.nb_seq {
            for t in [LL, ML, OF] {
                let (_, nb, base) = fse[t].states[state[t]];
                state[t] = usize::from(base) + bits.read(u32::from(nb))? as usize;
            }
        }
    }
    if bits.left != 0 {
        return Err("sequences bitstream has bits left over".into());
    }
    Ok(reps)
}

/// The repeat-offset history after one sequence (RFC 8878, 3.1.2.5).
fn next_reps(r: Reps, offset_value: u64, ll_zero: bool) -> Reps {
    if offset_value > 3 {
        return [Some((offset_value - 3) as u32), r[0], r[1]];
    }
    // 1..=3 pick rep1..rep3, or with a zero literal length rep2, rep3, rep1 - 1.
    match offset_value + u64::from(ll_zero) {
        1 => r,
        2 => [r[1], r[0], r[2]],
        3 => [r[2], r[0], r[1]],
        _ => [r[0].map(|v| v.wrapping_sub(1)), r[0], r[1]],
    }
}

/// The compressed blocks since a frame start (or the last few), each with the tables before
/// it, to follow the repeat offsets up to a resume point.
#[derive(Debug, Default)]
pub(crate) struct History {
    blocks: VecDeque<(Tables, Vec<u8>)>,
    /// Blocks were dropped from the front: the history does not reach the frame start.
    dropped: bool,
}

/// Blocks kept: a resume point is skipped when the offsets of this many are not enough.
const HISTORY_BLOCKS: usize = 4;

impl History {
    pub(crate) fn push(&mut self, before: &Tables, block: &[u8]) {
        let mut buf = if self.blocks.len() == HISTORY_BLOCKS {
            self.dropped = true;
            self.blocks.pop_front().map(|(_, b)| b).unwrap_or_default()
        } else {
            Vec::new()
        };
        buf.clear();
        buf.extend_from_slice(block);
        self.blocks.push_back((before.clone(), buf));
    }

    /// The repeat offsets after the last block pushed, if the blocks kept determine them.
    pub(crate) fn reps(&self) -> FormatResult<Option<[u32; 3]>> {
        let n = self.blocks.len();
        for from in (0..n).rev() {
            let start: Reps = if from == 0 && !self.dropped {
                [Some(1), Some(4), Some(8)]
            } else {
                [None; 3]
            };
            let mut reps = start;
            for (tables, block) in self.blocks.range(from..) {
                reps = follow_reps(block, tables, reps)?;
            }
            if let [Some(a), Some(b), Some(c)] = reps {
                return Ok(Some([a, b, c]));
            }
        }
        if n == 0 && !self.dropped {
            return Ok(Some([1, 4, 8]));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predefined_distributions_fill_their_tables_and_round_trip() {
        for t in [LL, OF, ML] {
            let (counts, log) = predefined(t);
            let total: i32 = counts.iter().map(|&c| i32::from(c).abs()).sum();
            assert_eq!(total, 1 << log);
            let bytes = write_ncount(counts, log);
            let (back, l, used) = read_ncount(&bytes, MAX_SYMBOL[t], MAX_LOG[t]).unwrap();
            assert_eq!((back.as_slice(), l, used), (counts, log, bytes.len()));
            Fse::build(&FseDesc::Predefined, t).unwrap();
        }
    }

    #[test]
    fn ncount_with_zero_runs_round_trips() {
        let mut counts = vec![0i16; 40];
        counts[0] = 10;
        counts[7] = -1;
        counts[39] = 21;
        let bytes = write_ncount(&counts, 5);
        let (back, _, used) = read_ncount(&bytes, 52, 9).unwrap();
        assert_eq!(back, counts);
        assert_eq!(used, bytes.len());
    }

    #[test]
    fn resume_headers_cover_the_window() {
        for w in [1u64, 1024, 1025, 2 << 20, (2 << 20) + 1, 8 << 20, 3 << 20] {
            let h = resume_frame_header(w).unwrap();
            let parsed = frame_header(&h).unwrap().unwrap();
            assert!(parsed.window >= w && parsed.window >= 1024, "{w}");
            assert!(parsed.window <= (w * 9 / 8).max(1024), "{w}");
            assert!(!parsed.checksum);
        }
    }
}
