//! Layer indexes from eStargz TOCs (`stargz.index.json`) and zstd:chunked manifests (the same
//! TOC format, with `endOffset`), for layers read before they are downloaded. An eStargz blob is an ordinary gzip'd tar in which every regular file's data
//! (in chunks) starts a new gzip member; the TOC gives each chunk's member offset, size and
//! sha256, but not where its bytes sit in the uncompressed tar stream (tar headers between
//! them are not described). So the index and span map are laid out on the members instead:
//! span `i` is data chunk `i`, at offset `sum of the chunks before it`; a file's chunks are
//! consecutive there, which is all the read path needs. Such an index belongs to its blob
//! alone (see `RemoteInfo::toc_index`). The TOC member itself is read with our tar reader to
//! place `stargz.index.json`, which `tar -x` of the layer extracts like any file.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::builder::{build_index_from_entries, BuildError};
use super::tar::{EntryType, TarEntry, TarReader, Time};
use super::{LayerIndex, LayerStats};
use crate::blob::SpanMap;

/// Bytes of the gzip header Go's `gzip.Writer` puts before each member's deflate data (no
/// name, comment or extra field: what the eStargz writer emits for data members).
pub const MEMBER_HEADER: u64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum TocError {
    #[error("malformed TOC: {0}")]
    Malformed(String),
    #[error("TOC entry {name:?}: {why}")]
    Entry { name: String, why: String },
    #[error(transparent)]
    Build(#[from] BuildError),
}

#[derive(Deserialize)]
struct Jtoc {
    #[serde(default)]
    entries: Vec<TocEntry>,
}

#[derive(Deserialize)]
struct TocEntry {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    modtime: Option<String>,
    #[serde(default, rename = "linkName")]
    link_name: String,
    #[serde(default)]
    mode: i64,
    #[serde(default)]
    uid: u64,
    #[serde(default)]
    gid: u64,
    #[serde(default)]
    offset: u64,
    #[serde(default, rename = "devMajor")]
    dev_major: u32,
    #[serde(default, rename = "devMinor")]
    dev_minor: u32,
    /// Values are base64 (Go's `[]byte` in JSON).
    #[serde(default)]
    xattrs: BTreeMap<String, String>,
    #[serde(default, rename = "chunkOffset")]
    chunk_offset: u64,
    #[serde(default, rename = "chunkSize")]
    chunk_size: u64,
    #[serde(default, rename = "chunkDigest")]
    chunk_digest: Option<String>,
    /// zstd:chunked: where a regular file's last frame ends.
    #[serde(default, rename = "endOffset")]
    end_offset: u64,
    /// The whole file's sha256 (the span's, when the file is one chunk).
    #[serde(default)]
    digest: Option<String>,
}

/// What a TOC lays out: the index, the span map over the blob's members or frames and each
/// span's expected sha256.
pub struct TocLayout {
    pub index: LayerIndex,
    pub map: SpanMap,
    pub span_digests: Vec<Option<[u8; 32]>>,
}

/// Which kind of blob a TOC describes.
pub enum TocFormat<'a> {
    /// eStargz (gzip): where the TOC's member starts and that member's uncompressed bytes
    /// (a tar holding `stargz.index.json`, which is part of the layer).
    Estargz {
        toc_offset: u64,
        toc_member: &'a [u8],
    },
    /// zstd:chunked: every file's data (chunk) is whole zstd frames from `offset` to the next
    /// chunk's `offset` or the file's `endOffset`; the TOC sits in a skippable frame, outside
    /// the tar stream.
    ZstdChunked,
}

/// The TOC of one blob.
pub struct Toc<'a> {
    pub json: &'a [u8],
    pub blob_size: u64,
    pub format: TocFormat<'a>,
}

fn sha256_hex_to_bytes(s: &str) -> Option<[u8; 32]> {
    let hex = s.strip_prefix("sha256:")?;
    let v = hex::decode(hex).ok()?;
    v.try_into().ok()
}

/// Seconds and nanoseconds since the epoch of an RFC 3339 time (`2006-01-02T15:04:05Z`,
/// fractions and `±hh:mm` offsets allowed).
pub fn parse_rfc3339(s: &str) -> Option<(i64, u32)> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    let mut nsec = 0u32;
    if let Some(f) = rest.strip_prefix('.') {
        let digits = f.bytes().take_while(u8::is_ascii_digit).count();
        let frac = &f[..digits];
        for (i, c) in frac.bytes().take(9).enumerate() {
            nsec += u32::from(c - b'0') * 10u32.pow(8 - i as u32);
        }
        rest = &f[digits..];
    }
    let offset = match rest.as_bytes().first()? {
        b'Z' | b'z' => 0,
        sign @ (b'+' | b'-') => {
            let oh: i64 = rest.get(1..3)?.parse().ok()?;
            let om: i64 = rest.get(4..6)?.parse().ok()?;
            let o = oh * 3600 + om * 60;
            if *sign == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + mi * 60 + sec - offset, nsec))
}

fn entry(e: &TocEntry, kind: EntryType, data_offset: u64) -> Result<TarEntry, TocError> {
    let bad = |why: String| TocError::Entry {
        name: e.name.clone(),
        why,
    };
    let mtime = match e.modtime.as_deref() {
        Some(t) if !t.is_empty() => {
            parse_rfc3339(t).ok_or_else(|| bad(format!("bad modtime {t:?}")))?
        }
        _ => (0, 0),
    };
    let mut xattrs = Vec::new();
    for (k, v) in &e.xattrs {
        use base64::Engine as _;
        let value = base64::engine::general_purpose::STANDARD
            .decode(v)
            .map_err(|_| bad(format!("xattr {k} is not base64")))?;
        // An empty PAX record sets nothing (see the tar reader); the TOC keeps it as "".
        if !value.is_empty() {
            xattrs.push((k.as_bytes().to_vec(), value));
        }
    }
    Ok(TarEntry {
        path: e.name.as_bytes().to_vec(),
        link: e.link_name.as_bytes().to_vec(),
        kind,
        mode: (e.mode & 0o7777) as u32,
        uid: e.uid,
        gid: e.gid,
        size: if kind == EntryType::Regular {
            e.size
        } else {
            0
        },
        mtime: Time {
            sec: mtime.0,
            nsec: mtime.1,
        },
        atime: None,
        ctime: None,
        devmajor: e.dev_major,
        devminor: e.dev_minor,
        xattrs,
        data_offset,
        stored_size: if kind == EntryType::Regular {
            e.size
        } else {
            0
        },
        sparse: None,
    })
}

/// One data chunk of a regular file as the TOC gives it.
struct DataChunk {
    len: u64,
    c_start: u64,
    digest: [u8; 32],
}

/// The regular file whose chunks are being collected.
struct OpenFile {
    name: String,
    size: u64,
    covered: u64,
    end_offset: u64,
    chunks: Vec<DataChunk>,
}

/// Lays out the index and span map of an eStargz or zstd:chunked blob from its TOC. Every
/// data chunk must carry its sha256 (`chunkDigest`, or the file's `digest` when it is one
/// chunk), so every span read can be checked.
pub fn layout(toc: &Toc<'_>, diff_id: &str, uncompressed_size: u64) -> Result<TocLayout, TocError> {
    let jtoc: Jtoc =
        serde_json::from_slice(toc.json).map_err(|e| TocError::Malformed(e.to_string()))?;
    let zstd = matches!(toc.format, TocFormat::ZstdChunked);
    let data_limit = match toc.format {
        TocFormat::Estargz { toc_offset, .. } => toc_offset,
        TocFormat::ZstdChunked => toc.blob_size,
    };
    let mut entries: Vec<TarEntry> = Vec::new();
    let mut gz_points: Vec<(u64, u64)> = Vec::new();
    let mut zst_spans: Vec<(u64, u64, u64)> = Vec::new();
    let mut digests: Vec<Option<[u8; 32]>> = Vec::new();
    let mut u = 0u64;
    let mut last_c = 0u64;
    let mut open: Option<OpenFile> = None;
    let bad = |name: &str, why: String| TocError::Entry {
        name: name.to_string(),
        why,
    };
    // Emits the spans of a finished file, its chunks laid out one after the other.
    let mut close = |open: &mut Option<OpenFile>, u: &mut u64| -> Result<(), TocError> {
        let Some(f) = open.take() else {
            return Ok(());
        };
        if f.covered != f.size {
            return Err(bad(
                &f.name,
                format!("chunks cover {} of {} bytes", f.covered, f.size),
            ));
        }
        for (k, c) in f.chunks.iter().enumerate() {
            if c.c_start < last_c || c.c_start >= data_limit {
                return Err(bad(
                    &f.name,
                    format!("data offset {} out of order or range", c.c_start),
                ));
            }
            last_c = c.c_start;
            if zstd {
                let end = f.chunks.get(k + 1).map_or(f.end_offset, |n| n.c_start);
                if end <= c.c_start || end > data_limit {
                    return Err(bad(&f.name, format!("chunk end {end} out of range")));
                }
                zst_spans.push((*u, c.c_start, end - c.c_start));
            } else {
                gz_points.push((*u, c.c_start + MEMBER_HEADER));
            }
            digests.push(Some(c.digest));
            *u += c.len;
        }
        Ok(())
    };
    let digest_of = |e: &TocEntry, whole_file: bool| -> Result<[u8; 32], TocError> {
        e.chunk_digest
            .as_deref()
            .or(if whole_file {
                e.digest.as_deref()
            } else {
                None
            })
            .and_then(sha256_hex_to_bytes)
            .ok_or_else(|| bad(&e.name, "no sha256 chunkDigest".into()))
    };
    for e in &jtoc.entries {
        if e.kind == "chunk" {
            let Some(f) = open.as_mut().filter(|f| f.name == e.name) else {
                return Err(bad(&e.name, "chunk without its file".into()));
            };
            if e.chunk_offset != f.covered {
                return Err(bad(
                    &e.name,
                    format!(
                        "chunk at {} does not continue at {}",
                        e.chunk_offset, f.covered
                    ),
                ));
            }
            let rest = f.size - f.covered;
            let len = if e.chunk_size > 0 {
                e.chunk_size.min(rest)
            } else {
                rest
            };
            f.covered += len;
            f.chunks.push(DataChunk {
                len,
                c_start: e.offset,
                digest: digest_of(e, false)?,
            });
            continue;
        }
        close(&mut open, &mut u)?;
        let kind = match e.kind.as_str() {
            "reg" => EntryType::Regular,
            "dir" => EntryType::Dir,
            "symlink" => EntryType::Symlink,
            "hardlink" => EntryType::HardLink,
            "char" => EntryType::CharDev,
            "block" => EntryType::BlockDev,
            "fifo" => EntryType::Fifo,
            other => return Err(bad(&e.name, format!("unknown type {other:?}"))),
        };
        entries.push(entry(e, kind, u)?);
        if kind == EntryType::Regular && e.size > 0 {
            let first = if e.chunk_size > 0 {
                e.chunk_size.min(e.size)
            } else {
                e.size
            };
            open = Some(OpenFile {
                name: e.name.clone(),
                size: e.size,
                covered: first,
                end_offset: e.end_offset,
                chunks: vec![DataChunk {
                    len: first,
                    c_start: e.offset,
                    digest: digest_of(e, first == e.size)?,
                }],
            });
        }
    }
    close(&mut open, &mut u)?;
    let map = match toc.format {
        TocFormat::ZstdChunked => {
            SpanMap::zstd_frames(toc.blob_size, u, &zst_spans, crate::blob::DEFAULT_SPAN_SIZE)
        }
        TocFormat::Estargz {
            toc_offset,
            toc_member,
        } => {
            // `stargz.index.json`, as the TOC member's tar has it (our reader places its data).
            let mut tar = TarReader::new(toc_member);
            let toc_file = tar
                .next_entry()
                .map_err(|e| TocError::Malformed(format!("TOC member: {e}")))?
                .ok_or_else(|| TocError::Malformed("TOC member holds no file".into()))?;
            let toc_len = toc_file.data_offset + toc_file.stored_size;
            let span = toc_member
                .get(..toc_len as usize)
                .ok_or_else(|| TocError::Malformed("TOC member is shorter than its file".into()))?;
            if toc_file.kind != EntryType::Regular || toc_file.stored_size != toc.json.len() as u64
            {
                return Err(TocError::Malformed(
                    "the TOC member's file is not the TOC".into(),
                ));
            }
            gz_points.push((u, toc_offset + MEMBER_HEADER));
            {
                use sha2::Digest as _;
                digests.push(Some(sha2::Sha256::digest(span).into()));
            }
            let mut toc_entry = toc_file;
            toc_entry.data_offset += u;
            u += toc_len;
            entries.push(toc_entry);
            SpanMap::gzip_members(toc.blob_size, u, &gz_points, crate::blob::DEFAULT_SPAN_SIZE)
        }
    };
    let built = build_index_from_entries(
        entries.iter().cloned(),
        LayerStats {
            diff_id: diff_id.to_string(),
            uncompressed_size,
            entries: entries.len() as u64,
        },
    )?;
    Ok(TocLayout {
        index: built.index,
        map,
        span_digests: digests,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some((0, 0)));
        assert_eq!(
            parse_rfc3339("2023-04-09T12:34:56Z"),
            Some((1_681_043_696, 0))
        );
        assert_eq!(
            parse_rfc3339("2023-04-09T14:34:56.5+02:00"),
            Some((1_681_043_696, 500_000_000))
        );
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59Z"), Some((-1, 0)));
        assert_eq!(parse_rfc3339("2023-13-09T12:34:56Z"), None);
        assert_eq!(parse_rfc3339("garbage"), None);
    }
}
