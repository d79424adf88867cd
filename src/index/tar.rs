//! A streaming tar reader: one forward pass, never seeks, yields each entry's metadata with the
//! position of its data in the (uncompressed) stream.
//!
//! Written here rather than taken from the `tar` crate because the index needs what that crate
//! keeps private or lacks: the sparse maps of GNU and PAX (0.0, 0.1, 1.0) sparse files, raw PAX
//! records (binary xattr values, sub-second times, `LIBARCHIVE.xattr.*`), and hard limits on
//! header sizes for hostile input. The formats: POSIX ustar + pax (IEEE 1003.1-2001), GNU
//! (`@LongLink`, base-256 numbers, old sparse headers).

use std::io::{self, Read};

pub const BLOCK: u64 = 512;
/// Largest PAX or GNU long-name header accepted: real ones are a few KiB.
pub const MAX_EXT_HEADER: u64 = 1 << 20;
/// Most sparse-map entries a file may have.
const MAX_SPARSE_ENTRIES: usize = 1 << 20;
/// Most extension-header bytes (PAX, GNU long names) one entry may collect, and most bytes of
/// PAX global records kept: a stream of headers without a file must not grow memory.
pub const MAX_EXT_TOTAL: u64 = 4 * MAX_EXT_HEADER;

#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("reading tar stream at offset {offset}: {source}")]
    Io {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("truncated tar stream: ended inside {what} at offset {offset}")]
    Truncated { what: &'static str, offset: u64 },
    #[error("bad tar header at offset {offset}: {why}")]
    BadHeader { offset: u64, why: String },
}

pub type Result<T> = std::result::Result<T, TarError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryType {
    Regular,
    HardLink,
    Symlink,
    CharDev,
    BlockDev,
    Dir,
    Fifo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Time {
    pub sec: i64,
    pub nsec: u32,
}

/// One tar entry after its extension headers were applied.
#[derive(Debug, Clone)]
pub struct TarEntry {
    /// Raw path bytes as recorded (not yet normalised).
    pub path: Vec<u8>,
    pub link: Vec<u8>,
    pub kind: EntryType,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// Logical file size (for sparse files including holes).
    pub size: u64,
    pub mtime: Time,
    pub atime: Option<Time>,
    pub ctime: Option<Time>,
    pub devmajor: u32,
    pub devminor: u32,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Offset in the stream of the first stored data byte.
    pub data_offset: u64,
    /// Bytes stored in the archive for this entry's data.
    pub stored_size: u64,
    /// For sparse files: (logical offset, length) of each data extent, stored back to back.
    pub sparse: Option<Vec<(u64, u64)>>,
}

/// Reads entries one by one from a tar stream.
pub struct TarReader<R: Read> {
    inner: R,
    pos: u64,
    global_pax: Vec<(Vec<u8>, Vec<u8>)>,
    done: bool,
    scratch: Vec<u8>,
    before_data: Option<DataHook>,
}

/// Told `(stream offset, stored length)` of a regular file's data before it is read.
pub type DataHook = Box<dyn FnMut(u64, u64) + Send>;

impl<R: Read> TarReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            pos: 0,
            global_pax: Vec::new(),
            done: false,
            scratch: vec![0u8; 256 * 1024],
            before_data: None,
        }
    }

    /// Calls `hook` with each regular file's data extent as its header is parsed, before the
    /// data is read (an entry is returned only after it).
    pub fn before_data(&mut self, hook: DataHook) {
        self.before_data = Some(hook);
    }

    /// Position in the stream (bytes consumed).
    pub fn position(&self) -> u64 {
        self.pos
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    fn read_exact_at(&mut self, buf: &mut [u8], what: &'static str) -> Result<()> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.inner.read(&mut buf[filled..]) {
                Ok(0) => {
                    return Err(TarError::Truncated {
                        what,
                        offset: self.pos + filled as u64,
                    })
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(TarError::Io {
                        offset: self.pos + filled as u64,
                        source,
                    })
                }
            }
        }
        self.pos += buf.len() as u64;
        Ok(())
    }

    /// Reads a block; `Ok(false)` at a clean end of stream.
    fn read_block(&mut self, block: &mut [u8; 512]) -> Result<bool> {
        let mut filled = 0;
        while filled < 512 {
            match self.inner.read(&mut block[filled..]) {
                Ok(0) if filled == 0 => return Ok(false),
                Ok(0) => {
                    return Err(TarError::Truncated {
                        what: "a header block",
                        offset: self.pos + filled as u64,
                    })
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(TarError::Io {
                        offset: self.pos,
                        source,
                    })
                }
            }
        }
        self.pos += 512;
        Ok(true)
    }

    fn skip(&mut self, mut n: u64, what: &'static str) -> Result<()> {
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = (|| {
            while n > 0 {
                let chunk = n.min(scratch.len() as u64) as usize;
                self.read_exact_at(&mut scratch[..chunk], what)?;
                n -= chunk as u64;
            }
            Ok(())
        })();
        self.scratch = scratch;
        result
    }

    fn read_ext(&mut self, size: u64, offset: u64, what: &'static str) -> Result<Vec<u8>> {
        if size > MAX_EXT_HEADER {
            return Err(TarError::BadHeader {
                offset,
                why: format!("{what} of {size} bytes exceeds the limit of {MAX_EXT_HEADER}"),
            });
        }
        let mut data = vec![0u8; size as usize];
        self.read_exact_at(&mut data, what)?;
        self.skip(padding(size), what)?;
        Ok(data)
    }

    /// Skips the rest of the stream after the end-of-archive marker (so a digest of the
    /// stream covers every byte).
    pub fn drain(&mut self) -> Result<u64> {
        let mut total = 0;
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = loop {
            match self.inner.read(&mut scratch) {
                Ok(0) => break Ok(total),
                Ok(n) => {
                    total += n as u64;
                    self.pos += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    break Err(TarError::Io {
                        offset: self.pos,
                        source,
                    })
                }
            }
        };
        self.scratch = scratch;
        result
    }

    /// The next entry, or `None` at the end of the archive.
    pub fn next_entry(&mut self) -> Result<Option<TarEntry>> {
        if self.done {
            return Ok(None);
        }
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut ext_total = 0u64;
        let mut block = [0u8; 512];
        loop {
            let offset = self.pos;
            if !self.read_block(&mut block)? {
                // No end-of-archive marker: accept, as GNU tar does with a warning.
                self.done = true;
                return Ok(None);
            }
            if block.iter().all(|&b| b == 0) {
                self.done = true;
                return Ok(None);
            }
            verify_checksum(&block, offset)?;
            let typeflag = block[156];
            let size = parse_number(&block[124..136], offset, "size")?;
            // (One header over MAX_EXT_HEADER is reported by read_ext, by its own size.)
            if matches!(typeflag, b'x' | b'L' | b'K') && size <= MAX_EXT_HEADER {
                ext_total = ext_total.saturating_add(size);
                if ext_total > MAX_EXT_TOTAL {
                    return Err(bad(
                        offset,
                        &format!("extension headers of one entry exceed {MAX_EXT_TOTAL} bytes"),
                    ));
                }
            }
            match typeflag {
                b'x' => {
                    let data = self.read_ext(size, offset, "a pax header")?;
                    pax.extend(parse_pax(&data, offset)?);
                    continue;
                }
                b'g' => {
                    let data = self.read_ext(size, offset, "a pax global header")?;
                    for (key, value) in parse_pax(&data, offset)? {
                        // A later global record replaces an earlier one of the same keyword.
                        self.global_pax.retain(|(k, _)| *k != key);
                        self.global_pax.push((key, value));
                    }
                    let kept: usize = self.global_pax.iter().map(|(k, v)| k.len() + v.len()).sum();
                    if kept as u64 > MAX_EXT_TOTAL {
                        return Err(bad(
                            offset,
                            &format!("pax global records exceed {MAX_EXT_TOTAL} bytes"),
                        ));
                    }
                    continue;
                }
                b'L' => {
                    long_name = Some(trim_nul(&self.read_ext(size, offset, "a GNU long name")?));
                    continue;
                }
                b'K' => {
                    long_link = Some(trim_nul(&self.read_ext(size, offset, "a GNU long link")?));
                    continue;
                }
                b'V' | b'N' => {
                    // Volume labels and old GNU rename records carry no file.
                    self.skip(size + padding(size), "a skipped entry")?;
                    continue;
                }
                b'M' => {
                    return Err(TarError::BadHeader {
                        offset,
                        why: "multi-volume archives are not supported".into(),
                    })
                }
                _ => {}
            }
            let entry = self.finish_entry(&block, offset, size, long_name, long_link, pax)?;
            return Ok(Some(entry));
        }
    }

    fn finish_entry(
        &mut self,
        block: &[u8; 512],
        offset: u64,
        header_size: u64,
        long_name: Option<Vec<u8>>,
        long_link: Option<Vec<u8>>,
        local_pax: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<TarEntry> {
        let typeflag = block[156];
        let is_ustar = &block[257..262] == b"ustar";
        let is_gnu = &block[257..265] == b"ustar  \0";
        let mut path = match long_name {
            Some(n) => n,
            None => {
                let name = trim_nul(&block[0..100]);
                let prefix = if is_ustar && !is_gnu {
                    trim_nul(&block[345..500])
                } else {
                    Vec::new()
                };
                if prefix.is_empty() {
                    name
                } else {
                    let mut p = prefix;
                    p.push(b'/');
                    p.extend_from_slice(&name);
                    p
                }
            }
        };
        let mut link = long_link.unwrap_or_else(|| trim_nul(&block[157..257]));
        let mut kind = match typeflag {
            b'0' | 0 | b'7' | b'S' => EntryType::Regular,
            b'1' => EntryType::HardLink,
            b'2' => EntryType::Symlink,
            b'3' => EntryType::CharDev,
            b'4' => EntryType::BlockDev,
            b'5' | b'D' => EntryType::Dir,
            b'6' => EntryType::Fifo,
            other => {
                return Err(TarError::BadHeader {
                    offset,
                    why: format!("unknown entry type {:?}", other as char),
                })
            }
        };
        // Old tars mark directories by a trailing slash on a regular entry.
        if kind == EntryType::Regular && typeflag == 0 && path.ends_with(b"/") {
            kind = EntryType::Dir;
        }
        let mode = parse_number(&block[100..108], offset, "mode")? as u32 & 0o7777;
        let mut uid = parse_number(&block[108..116], offset, "uid")?;
        let mut gid = parse_number(&block[116..124], offset, "gid")?;
        let mut mtime = Time {
            sec: parse_signed(&block[136..148], offset, "mtime")?,
            nsec: 0,
        };
        let mut atime = None;
        let mut ctime = None;
        let mut devmajor = 0u32;
        let mut devminor = 0u32;
        if is_ustar {
            devmajor = parse_number(&block[329..337], offset, "devmajor")? as u32;
            devminor = parse_number(&block[337..345], offset, "devminor")? as u32;
        }
        if is_gnu {
            let a = parse_signed(&block[345..357], offset, "atime")?;
            let c = parse_signed(&block[357..369], offset, "ctime")?;
            if a != 0 {
                atime = Some(Time { sec: a, nsec: 0 });
            }
            if c != 0 {
                ctime = Some(Time { sec: c, nsec: 0 });
            }
        }
        let mut stored_size = header_size;
        let mut size = header_size;
        let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut sparse: Option<Vec<(u64, u64)>> = None;
        let mut sparse_major: Option<u64> = None;
        let mut sparse_realsize: Option<u64> = None;
        let mut sparse_pairs: Vec<u64> = Vec::new();
        let mut sparse_map_str: Option<Vec<u8>> = None;

        // GNU old-style sparse header: map in the header plus extension blocks.
        if typeflag == b'S' {
            let mut pairs = Vec::new();
            read_gnu_sparse_entries(&block[386..482], 4, &mut pairs, offset)?;
            size = parse_number(&block[483..495], offset, "realsize")?;
            let mut extended = block[482] != 0;
            while extended {
                let mut ext = [0u8; 512];
                let ext_off = self.pos;
                if !self.read_block(&mut ext)? {
                    return Err(TarError::Truncated {
                        what: "a GNU sparse extension",
                        offset: ext_off,
                    });
                }
                read_gnu_sparse_entries(&ext[0..504], 21, &mut pairs, ext_off)?;
                if pairs.len() > MAX_SPARSE_ENTRIES {
                    return Err(bad(ext_off, "too many sparse map entries"));
                }
                extended = ext[504] != 0;
            }
            check_extents(&pairs, offset)?;
            sparse = Some(pairs);
        }

        let pax_iter = self.global_pax.clone().into_iter().chain(local_pax);
        for (key, value) in pax_iter {
            if value.is_empty() {
                // POSIX: an empty value deletes the keyword (as Go's archive/tar reads it, so
                // an empty xattr record sets no xattr).
                continue;
            }
            let v = || String::from_utf8_lossy(&value).into_owned();
            match key.as_slice() {
                b"path" => path = value,
                b"linkpath" => link = value,
                b"size" => {
                    stored_size = parse_decimal(&v(), offset, "pax size")?;
                    size = stored_size;
                }
                b"uid" => uid = parse_decimal(&v(), offset, "pax uid")?,
                b"gid" => gid = parse_decimal(&v(), offset, "pax gid")?,
                b"mtime" => mtime = parse_pax_time(&v(), offset)?,
                b"atime" => atime = Some(parse_pax_time(&v(), offset)?),
                b"ctime" => ctime = Some(parse_pax_time(&v(), offset)?),
                b"SCHILY.devmajor" => devmajor = parse_decimal(&v(), offset, "devmajor")? as u32,
                b"SCHILY.devminor" => devminor = parse_decimal(&v(), offset, "devminor")? as u32,
                b"GNU.sparse.major" => sparse_major = Some(parse_decimal(&v(), offset, "sparse")?),
                b"GNU.sparse.name" => path = value,
                b"GNU.sparse.realsize" | b"GNU.sparse.size" => {
                    sparse_realsize = Some(parse_decimal(&v(), offset, "sparse size")?)
                }
                b"GNU.sparse.offset" | b"GNU.sparse.numbytes" => {
                    sparse_pairs.push(parse_decimal(&v(), offset, "sparse map")?);
                    if sparse_pairs.len() > 2 * MAX_SPARSE_ENTRIES {
                        return Err(bad(offset, "too many sparse map entries"));
                    }
                }
                b"GNU.sparse.map" => sparse_map_str = Some(value),
                k if k.starts_with(b"SCHILY.xattr.") => {
                    xattrs.push((k[b"SCHILY.xattr.".len()..].to_vec(), value));
                }
                k if k.starts_with(b"LIBARCHIVE.xattr.") => {
                    let name = percent_decode(&k[b"LIBARCHIVE.xattr.".len()..]);
                    if !xattrs.iter().any(|(n, _)| *n == name) {
                        let decoded = base64_decode(&value)
                            .ok_or_else(|| bad(offset, "bad base64 in LIBARCHIVE.xattr"))?;
                        xattrs.push((name, decoded));
                    }
                }
                _ => {}
            }
        }

        let header_end = self.pos;
        let mut data_offset = header_end;
        if let Some(map) = sparse_map_str {
            let nums = parse_number_list(&map, offset)?;
            sparse = Some(pairs_of(&nums, offset)?);
        } else if !sparse_pairs.is_empty() && sparse_major.is_none() {
            sparse = Some(pairs_of(&sparse_pairs, offset)?);
        }
        if kind == EntryType::Regular {
            if let Some(hook) = &mut self.before_data {
                hook(data_offset, stored_size);
            }
        }
        if sparse_major == Some(1) {
            // PAX sparse 1.0: the map is a decimal list at the start of the data.
            let (pairs, map_len) = self.read_sparse_1_0_map(stored_size, offset)?;
            data_offset = self.pos;
            stored_size -= map_len;
            sparse = Some(pairs);
            // The map's bytes are consumed; what remains is stored data + padding.
            let remaining_pad = padding(stored_size + map_len);
            self.skip(stored_size, "sparse file data")?;
            self.skip(remaining_pad, "padding")?;
        }
        if let Some(real) = sparse_realsize {
            if sparse.is_some() {
                size = real;
            }
        }
        if let Some(map) = &sparse {
            let stored: u64 = map.iter().map(|&(_, len)| len).sum();
            if stored != stored_size {
                return Err(bad(
                    offset,
                    &format!("sparse map covers {stored} bytes but {stored_size} are stored"),
                ));
            }
            if let Some(&(off, len)) = map.last() {
                if off.checked_add(len).is_none_or(|end| end > size) {
                    return Err(bad(offset, "sparse map reaches past the file size"));
                }
            }
        }
        if kind != EntryType::Regular && sparse.is_none() {
            // Hardlinks, dirs, devices, symlinks: size field is data to skip (normally 0).
            size = 0;
        }
        if sparse_major != Some(1) {
            self.skip(stored_size, "file data")?;
            self.skip(padding(stored_size), "padding")?;
        }
        Ok(TarEntry {
            path,
            link,
            kind,
            mode,
            uid,
            gid,
            size,
            mtime,
            atime,
            ctime,
            devmajor,
            devminor,
            xattrs,
            data_offset,
            stored_size: if kind == EntryType::Regular {
                stored_size
            } else {
                0
            },
            sparse,
        })
    }

    fn read_sparse_1_0_map(&mut self, stored: u64, offset: u64) -> Result<(Vec<(u64, u64)>, u64)> {
        // Read decimal lines block by block: count, then offset/length pairs. Each line is
        // parsed once, when its newline arrives.
        let mut text = Vec::new();
        let mut start = 0;
        let mut consumed = 0u64;
        let mut numbers: Vec<u64> = Vec::new();
        loop {
            if consumed + BLOCK > stored {
                return Err(bad(offset, "sparse 1.0 map runs past the entry's data"));
            }
            let mut blk = [0u8; 512];
            self.read_exact_at(&mut blk, "a sparse map")?;
            consumed += BLOCK;
            let scan_from = text.len();
            text.extend_from_slice(&blk);
            for i in scan_from..text.len() {
                if text[i] != b'\n' {
                    continue;
                }
                let s = std::str::from_utf8(&text[start..i])
                    .map_err(|_| bad(offset, "sparse map is not decimal"))?;
                numbers.push(parse_decimal(s, offset, "sparse map")?);
                start = i + 1;
                let n = numbers[0];
                if n > MAX_SPARSE_ENTRIES as u64 {
                    return Err(bad(offset, "too many sparse map entries"));
                }
                if numbers.len() as u64 == 1 + 2 * n {
                    let pairs = pairs_of(&numbers[1..], offset)?;
                    return Ok((pairs, consumed));
                }
            }
            if text.len() as u64 > MAX_EXT_HEADER {
                return Err(bad(offset, "sparse map too large"));
            }
        }
    }
}

fn bad(offset: u64, why: &str) -> TarError {
    TarError::BadHeader {
        offset,
        why: why.to_string(),
    }
}

pub fn padding(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

fn trim_nul(b: &[u8]) -> Vec<u8> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    b[..end].to_vec()
}

fn verify_checksum(block: &[u8; 512], offset: u64) -> Result<()> {
    let recorded = parse_number(&block[148..156], offset, "checksum")?;
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    if recorded == unsigned || recorded as i64 == signed {
        Ok(())
    } else {
        Err(bad(
            offset,
            &format!("checksum mismatch (recorded {recorded}, computed {unsigned})"),
        ))
    }
}

/// Octal (NUL/space padded) or GNU base-256 numbers.
fn parse_number(field: &[u8], offset: u64, what: &str) -> Result<u64> {
    let v = parse_signed(field, offset, what)?;
    u64::try_from(v).map_err(|_| bad(offset, &format!("negative {what}")))
}

fn parse_signed(field: &[u8], offset: u64, what: &str) -> Result<i64> {
    if let Some(&first) = field.first() {
        if first & 0x80 != 0 {
            // Base-256: two's complement big-endian, first byte's top bit is the marker.
            let negative = first & 0x40 != 0;
            let mut v: i128 = if negative { -1 } else { 0 };
            v = (v << 6) | i128::from(first & 0x3f);
            if negative {
                v |= !0x3f;
            }
            for &b in &field[1..] {
                v = (v << 8) | i128::from(b);
                if !(i128::from(i64::MIN)..=i128::from(i64::MAX)).contains(&v) {
                    return Err(bad(offset, &format!("{what} out of range")));
                }
            }
            return Ok(v as i64);
        }
    }
    let s: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ' || b == 0)
        .take_while(|&b| b != b' ' && b != 0)
        .collect();
    if s.is_empty() {
        return Ok(0);
    }
    let text = std::str::from_utf8(&s).map_err(|_| bad(offset, &format!("bad {what} field")))?;
    i64::from_str_radix(text, 8).map_err(|_| bad(offset, &format!("bad {what} field {text:?}")))
}

fn parse_decimal(s: &str, offset: u64, what: &str) -> Result<u64> {
    s.trim()
        .parse::<u64>()
        .map_err(|_| bad(offset, &format!("bad {what} {s:?}")))
}

fn parse_pax_time(s: &str, offset: u64) -> Result<Time> {
    let s = s.trim();
    let (neg, body) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    let sec: i64 = if int.is_empty() {
        0
    } else {
        int.parse()
            .map_err(|_| bad(offset, &format!("bad pax time {s:?}")))?
    };
    let mut nsec: u32 = 0;
    let digits: String = frac.chars().take(9).collect();
    if !digits.is_empty() {
        if !digits.chars().all(|c| c.is_ascii_digit()) {
            return Err(bad(offset, &format!("bad pax time {s:?}")));
        }
        nsec = format!("{digits:0<9}")
            .parse()
            .map_err(|_| bad(offset, &format!("bad pax time {s:?}")))?;
    }
    if neg {
        // -1.25 means 1.25 s before the epoch: sec -2, nsec 0.75 s.
        let out_of_range = || bad(offset, &format!("pax time {s:?} out of range"));
        if sec < 0 {
            // "--5": a sign inside the number.
            return Err(bad(offset, &format!("bad pax time {s:?}")));
        }
        if nsec == 0 {
            Ok(Time { sec: -sec, nsec: 0 })
        } else {
            Ok(Time {
                sec: (-sec).checked_sub(1).ok_or_else(out_of_range)?,
                nsec: 1_000_000_000 - nsec,
            })
        }
    } else {
        Ok(Time { sec, nsec })
    }
}

/// PAX records: "<len> <key>=<value>\n", len counting the whole record.
fn parse_pax(data: &[u8], offset: u64) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let space = rest
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| bad(offset, "pax record without length"))?;
        let len: usize = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(offset, "bad pax record length"))?;
        if len <= space + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad(offset, "malformed pax record"));
        }
        let record = &rest[space + 1..len - 1];
        let eq = record
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| bad(offset, "pax record without '='"))?;
        out.push((record[..eq].to_vec(), record[eq + 1..].to_vec()));
        rest = &rest[len..];
    }
    Ok(out)
}

fn read_gnu_sparse_entries(
    area: &[u8],
    count: usize,
    out: &mut Vec<(u64, u64)>,
    offset: u64,
) -> Result<()> {
    for i in 0..count {
        let e = &area[i * 24..i * 24 + 24];
        if e[0] == 0 {
            break;
        }
        let off = parse_number(&e[0..12], offset, "sparse offset")?;
        let len = parse_number(&e[12..24], offset, "sparse length")?;
        out.push((off, len));
    }
    Ok(())
}

fn parse_number_list(s: &[u8], offset: u64) -> Result<Vec<u64>> {
    let text = std::str::from_utf8(s).map_err(|_| bad(offset, "bad sparse map"))?;
    text.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| parse_decimal(p, offset, "sparse map"))
        .collect()
}

fn pairs_of(nums: &[u64], offset: u64) -> Result<Vec<(u64, u64)>> {
    if nums.len() % 2 != 0 || nums.len() > 2 * MAX_SPARSE_ENTRIES {
        return Err(bad(offset, "bad sparse map"));
    }
    let pairs: Vec<(u64, u64)> = nums.chunks(2).map(|c| (c[0], c[1])).collect();
    check_extents(&pairs, offset)?;
    Ok(pairs)
}

/// Extents must be in order and not overlap (so their lengths cannot overflow when summed).
fn check_extents(pairs: &[(u64, u64)], offset: u64) -> Result<()> {
    let mut end = 0u64;
    for &(off, len) in pairs {
        if off < end {
            return Err(bad(offset, "sparse map extents overlap"));
        }
        end = off
            .checked_add(len)
            .ok_or_else(|| bad(offset, "sparse extent overflows"))?;
    }
    Ok(())
}

fn percent_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            if let Ok(v) = u8::from_str_radix(&String::from_utf8_lossy(&s[i + 1..i + 3]), 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for &c in s.iter().filter(|&&c| c != b'=' && !c.is_ascii_whitespace()) {
        acc = (acc << 6) | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times_and_numbers() {
        assert_eq!(
            parse_pax_time("1700000000.5", 0).unwrap(),
            Time {
                sec: 1_700_000_000,
                nsec: 500_000_000
            }
        );
        assert_eq!(
            parse_pax_time("-1.25", 0).unwrap(),
            Time {
                sec: -2,
                nsec: 750_000_000
            }
        );
        let mut f = [0u8; 8];
        f[0] = 0x80;
        f[7] = 0x05;
        assert_eq!(parse_number(&f, 0, "x").unwrap(), 5);
        assert_eq!(parse_number(b"0000644\0", 0, "x").unwrap(), 0o644);
        assert_eq!(base64_decode(b"AQID").unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn pax_time_extremes_are_errors_not_overflows() {
        assert!(parse_pax_time("-9223372036854775808.5", 0).is_err());
        assert!(parse_pax_time("--5", 0).is_err());
        // Once a panic: negating i64::MIN.
        assert!(parse_pax_time("--9223372036854775808", 0).is_err());
        assert_eq!(
            parse_pax_time("-9223372036854775807.5", 0).unwrap(),
            Time {
                sec: i64::MIN,
                nsec: 500_000_000
            }
        );
    }

    /// A ustar header with a valid checksum.
    fn header(name: &[u8], typeflag: u8, size: u64) -> [u8; 512] {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name);
        h[100..108].copy_from_slice(b"0000644\0");
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        h[156] = typeflag;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        fix_checksum(&mut h);
        h
    }

    fn fix_checksum(h: &mut [u8; 512]) {
        h[148..156].fill(b' ');
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }

    fn with_data(h: [u8; 512], data: &[u8]) -> Vec<u8> {
        let mut out = h.to_vec();
        out.extend_from_slice(data);
        out.resize(out.len() + padding(data.len() as u64) as usize, 0);
        out
    }

    fn first_entry(data: &[u8]) -> Result<Option<TarEntry>> {
        TarReader::new(data).next_entry()
    }

    #[test]
    fn gnu_sparse_map_whose_lengths_overflow_is_an_error() {
        // Old GNU sparse ('S'): three extents (0, 2^63-1), whose lengths sum past u64::MAX.
        let mut h = header(b"sparse", b'S', 0);
        h[257..265].copy_from_slice(b"ustar  \0");
        let mut len = [0u8; 12];
        len[0] = 0x80;
        len[4] = 0x7f;
        len[5..].fill(0xff);
        for i in 0..3 {
            let e = 386 + 24 * i;
            h[e..e + 12].copy_from_slice(b"00000000000\0");
            h[e + 12..e + 24].copy_from_slice(&len);
        }
        fix_checksum(&mut h);
        let err = first_entry(&with_data(h, b"")).unwrap_err().to_string();
        assert!(err.contains("sparse"), "{err}");
    }

    #[test]
    fn endless_extension_headers_are_bounded() {
        // Five 1 MiB GNU long-name headers for one entry: more than MAX_EXT_TOTAL.
        let name = vec![b'a'; MAX_EXT_HEADER as usize];
        let mut data = Vec::new();
        for _ in 0..5 {
            data.extend(with_data(
                header(b"././@LongLink", b'L', name.len() as u64),
                &name,
            ));
        }
        let err = first_entry(&data).unwrap_err().to_string();
        assert!(
            err.contains("extension headers of one entry exceed"),
            "{err}"
        );
        // Global headers with new keywords each time: kept records are bounded too.
        let mut data = Vec::new();
        for i in 0..5 {
            let value = "v".repeat(MAX_EXT_HEADER as usize - 100);
            let rec = format!(" k{i}={value}\n");
            let len = rec.len() + 7;
            let rec = format!("{len}{rec}");
            assert_eq!(rec.len(), len);
            data.extend(with_data(header(b"g", b'g', len as u64), rec.as_bytes()));
        }
        let err = first_entry(&data).unwrap_err().to_string();
        assert!(err.contains("pax global records exceed"), "{err}");
        // The same keyword again and again replaces, so it does not grow.
        let mut data = Vec::new();
        for _ in 0..8 {
            let rec = "17 comment=again\n";
            data.extend(with_data(
                header(b"g", b'g', rec.len() as u64),
                rec.as_bytes(),
            ));
        }
        data.extend(with_data(header(b"f", b'0', 1), b"x"));
        assert_eq!(first_entry(&data).unwrap().unwrap().path, b"f");
    }

    #[test]
    fn malformed_pax_is_an_error() {
        assert!(parse_pax(b"99 path=x\n", 0).is_err());
        assert!(parse_pax(b"abc", 0).is_err());
        assert_eq!(
            parse_pax(b"11 path=ab\n", 0).unwrap(),
            vec![(b"path".to_vec(), b"ab".to_vec())]
        );
    }
}
