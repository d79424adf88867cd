use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Barrier, OnceLock};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use super::*;

const SMALL_SPAN: u64 = 256 << 10;

/// ~24 MiB of real files from this machine, with tar-like 512-byte headers between them.
fn corpus() -> &'static [u8] {
    static CORPUS: OnceLock<Vec<u8>> = OnceLock::new();
    CORPUS.get_or_init(|| {
        const BUDGET: usize = 24 << 20;
        let mut out = Vec::with_capacity(BUDGET + (1 << 20));
        let mut stack: Vec<PathBuf> = vec!["/usr/lib".into(), "/usr/share".into()];
        while let Some(dir) = stack.pop() {
            if out.len() >= BUDGET {
                break;
            }
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut entries: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
            entries.sort();
            for p in entries {
                let Ok(md) = std::fs::symlink_metadata(&p) else {
                    continue;
                };
                if md.is_dir() {
                    stack.push(p);
                } else if md.is_file() && md.len() < (4 << 20) && out.len() < BUDGET {
                    if let Ok(data) = std::fs::read(&p) {
                        let mut hdr = [0u8; 512];
                        let name = p.to_string_lossy();
                        let n = name.len().min(100);
                        hdr[..n].copy_from_slice(&name.as_bytes()[..n]);
                        let size = format!("{:011o}\0", data.len());
                        hdr[124..136].copy_from_slice(size.as_bytes());
                        out.extend_from_slice(&hdr);
                        out.extend_from_slice(&data);
                        out.resize(out.len().next_multiple_of(512), 0);
                    }
                }
            }
        }
        // A machine with little under /usr still gets a mixed, compressible corpus.
        let mut rng = StdRng::seed_from_u64(7);
        while out.len() < (4 << 20) {
            let word = format!(
                "line {} of some text {}\n",
                rng.random::<u16>(),
                out.len() % 97
            );
            out.extend_from_slice(word.as_bytes());
        }
        out
    })
}

/// `size` bytes: slices of the corpus at random offsets, with ~10% random (incompressible) data.
fn make_data(size: usize, seed: u64) -> Vec<u8> {
    let c = corpus();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(size);
    while out.len() < size {
        let n = rng.random_range(1..(256 << 10)).min(size - out.len());
        if rng.random_range(0..10) == 0 {
            let start = out.len();
            out.resize(start + n, 0);
            rng.fill_bytes(&mut out[start..]);
        } else {
            let n = n.min(c.len());
            let off = rng.random_range(0..=c.len() - n);
            out.extend_from_slice(&c[off..off + n]);
        }
    }
    out
}

fn gzip(data: &[u8], level: u32) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

/// Concatenated gzip members (what pigz --independent / `cat a.gz b.gz` give).
fn gzip_members(data: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut prev = 0;
    for &c in cuts.iter().chain(std::iter::once(&data.len())) {
        out.extend(gzip(&data[prev..c], 6));
        prev = c;
    }
    out
}

/// One frame, as the `zstd` CLI writes.
fn zstd_single(data: &[u8]) -> Vec<u8> {
    let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("zstd");
    e.include_checksum(true).expect("zstd");
    e.write_all(data).expect("zstd");
    e.finish().expect("zstd")
}

fn skippable(payload: &[u8]) -> Vec<u8> {
    let mut v = 0x184D_2A53u32.to_le_bytes().to_vec();
    v.extend((payload.len() as u32).to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// Independent frames of the given sizes (cycled), with a skippable frame now and then.
fn zstd_frames(data: &[u8], sizes: &[usize]) -> Vec<u8> {
    zstd_frames_with(data, sizes, true)
}

fn zstd_frames_with(data: &[u8], sizes: &[usize], skippables: bool) -> Vec<u8> {
    let mut out = if skippables {
        skippable(b"leading skippable frame")
    } else {
        Vec::new()
    };
    let mut off = 0;
    let mut i = 0;
    while off < data.len() {
        let n = sizes[i % sizes.len()].min(data.len() - off);
        let mut c = zstd::bulk::Compressor::new(1).expect("zstd");
        c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
            .expect("zstd");
        out.extend(c.compress(&data[off..off + n]).expect("zstd"));
        if skippables && i % 7 == 3 {
            out.extend(skippable(&vec![0xab; 300_000]));
        }
        off += n;
        i += 1;
    }
    out
}

/// Runs the pass with a mix of small and large reads; returns the output and the map.
fn index(
    c: Compression,
    blob: &[u8],
    opts: SpanOptions,
) -> std::result::Result<(Vec<u8>, SpanMap), String> {
    let mut r = IndexingReader::new(c, blob, opts).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut i = 0usize;
    loop {
        let want = if i % 3 == 0 { 512 } else { buf.len() };
        i += 1;
        let n = r.read(&mut buf[..want]).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    let map = r.finish().map_err(|e| e.to_string())?;
    Ok((out, map))
}

struct Fixture {
    _dir: tempfile::TempDir,
    blob: PathBuf,
    copy: PathBuf,
}

fn write_blob(blob: &[u8]) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("blob");
    std::fs::write(&path, blob).expect("write blob");
    let copy = dir.path().join("blob.copy");
    Fixture {
        _dir: dir,
        blob: path,
        copy,
    }
}

fn open(fx: &Fixture, map: SpanMap, cache_bytes: u64) -> BlobReader {
    let local = map.has_local_copy().then_some(fx.copy.as_path());
    BlobReader::open(&fx.blob, Arc::new(map), local, SpanCache::new(cache_bytes)).expect("open")
}

fn check_read(r: &BlobReader, data: &[u8], off: u64, len: usize) {
    let mut buf = vec![0xeeu8; len];
    let n = r.read_at(off, &mut buf).expect("read_at");
    let end = (off as usize).saturating_add(len).min(data.len());
    let expect = if (off as usize) < data.len() {
        &data[off as usize..end]
    } else {
        &[][..]
    };
    assert_eq!(n, expect.len(), "length at {off}+{len}");
    assert!(buf[..n] == *expect, "bytes differ at {off}+{len}");
}

/// Full round trip: pass output, map serialisation, then many random reads.
fn round_trip(c: Compression, data: &[u8], blob: &[u8], opts: SpanOptions) -> SpanMap {
    assert_eq!(Compression::sniff(blob), c);
    let fx = write_blob(blob);
    // Any local_copy given by the caller means "use one", at the fixture's path.
    let opts = SpanOptions {
        local_copy: opts.local_copy.map(|_| fx.copy.clone()),
        ..opts
    };
    let span = opts.span_size;
    let (out, map) = index(c, blob, opts).expect("pass");
    assert!(out == data, "pass output differs from the original");
    assert_eq!(map.uncompressed_size, data.len() as u64);
    assert_eq!(map.compressed_size, blob.len() as u64);
    let bytes = postcard::to_stdvec(&map).expect("serialise");
    let map: SpanMap = postcard::from_bytes(&bytes).expect("deserialise");
    let r = open(&fx, map.clone(), 64 << 20);
    let mut rng = StdRng::seed_from_u64(data.len() as u64);
    let size = data.len() as u64;
    for _ in 0..300 {
        let off = rng.random_range(0..size + 10);
        let len = rng.random_range(0..(3 * span as usize));
        check_read(&r, data, off, len);
    }
    // Around every span boundary, and the very end.
    for i in 0..map.span_count() {
        let (s, _) = map.span_range(i);
        check_read(&r, data, s.saturating_sub(3), 7);
    }
    check_read(&r, data, size.saturating_sub(1), 100);
    check_read(&r, data, size, 100);
    check_read(&r, data, 0, data.len() + 10);
    map
}

#[test]
fn sniff() {
    assert_eq!(Compression::sniff(&[0x1f, 0x8b, 8, 0]), Compression::Gzip);
    assert_eq!(
        Compression::sniff(&[0x28, 0xb5, 0x2f, 0xfd, 4]),
        Compression::Zstd
    );
    assert_eq!(Compression::sniff(b"etc/passwd\0\0"), Compression::None);
    assert_eq!(Compression::sniff(&[0x1f]), Compression::None);
    assert_eq!(Compression::sniff(&[]), Compression::None);
}

#[test]
fn plain_round_trip() {
    let data = make_data(3 << 20, 1);
    let map = round_trip(Compression::None, &data, &data, SpanOptions::default());
    assert_eq!(map.span_count(), 0);
}

#[test]
fn gzip_single_member_round_trip() {
    let data = make_data(12 << 20, 2);
    let blob = gzip(&data, 6);
    let opts = SpanOptions {
        span_size: SMALL_SPAN,
        local_copy: None,
        fine: None,
    };
    let map = round_trip(Compression::Gzip, &data, &blob, opts);
    let spans = map.span_count();
    assert!(spans as u64 >= (12 << 20) / SMALL_SPAN, "{spans} spans");
    // A span exceeds span_size only when one deflate block does (zero-padded tar regions).
    let over = (0..spans)
        .filter(|&i| {
            let (a, b) = map.span_range(i);
            b - a > SMALL_SPAN
        })
        .count();
    assert!(
        over * 10 <= spans,
        "{over} of {spans} spans are over span_size"
    );
}

/// In a fine region (a big file's data, announced by unpack) checkpoints are
/// `FINE_SPAN_SIZE` apart; elsewhere `span_size`. Reads anywhere still return the data.
#[test]
fn gzip_fine_region_has_closer_checkpoints() {
    let data = make_data(24 << 20, 12);
    let blob = gzip(&data, 6);
    let (a, b) = (6u64 << 20, 18u64 << 20);
    let fine = Arc::new(FineRegion::default());
    fine.set(a, b);
    let opts = SpanOptions {
        span_size: DEFAULT_SPAN_SIZE,
        local_copy: None,
        fine: Some(fine),
    };
    let map = round_trip(Compression::Gzip, &data, &blob, opts);
    let (mut inside, mut outside) = (0, 0);
    for i in 0..map.span_count() {
        let (x, y) = map.span_range(i);
        if x >= a && y <= b {
            inside += 1;
            assert!(
                y - x <= FINE_SPAN_SIZE,
                "span {i} in the region is {} bytes",
                y - x
            );
        } else if y <= a || x >= b {
            outside += 1;
        }
    }
    // 12 MiB at 1 MiB; the 12 MiB outside at 4 MiB (each span ends at the block boundary
    // before 4 MiB, so a few more).
    assert!(inside >= 11, "{inside} spans in the fine region");
    assert!(outside <= 6, "{outside} spans outside it");
}

#[test]
fn gzip_multi_member_round_trip() {
    let data = make_data(10 << 20, 3);
    // Two big members (pigz-style concatenation), then many small ones and an empty one.
    let mut cuts = vec![4 << 20, 4 << 20];
    let mut at = 4 << 20;
    for k in 0..40 {
        at += 7_000 + k * 1_500;
        cuts.push(at);
    }
    let blob = gzip_members(&data, &cuts);
    let opts = SpanOptions {
        span_size: SMALL_SPAN,
        local_copy: None,
        fine: None,
    };
    round_trip(Compression::Gzip, &data, &blob, opts);
}

#[test]
fn gzip_empty_stream() {
    let blob = gzip(b"", 6);
    let (out, map) = index(Compression::Gzip, &blob, SpanOptions::default()).expect("pass");
    assert!(out.is_empty());
    let fx = write_blob(&blob);
    let r = open(&fx, map, 1 << 20);
    check_read(&r, &[], 0, 10);
}

#[test]
fn zstd_single_frame_local_copy_round_trip() {
    let data = make_data(12 << 20, 4);
    let blob = zstd_single(&data);
    let opts = SpanOptions {
        span_size: SMALL_SPAN,
        local_copy: Some(PathBuf::new()),
        fine: None,
    };
    let map = round_trip(Compression::Zstd, &data, &blob, opts);
    assert!(map.has_local_copy());
    let limit = span_limit(Compression::Zstd, &blob, SMALL_SPAN);
    assert!(map.span_count() >= 2, "resume points in a 12 MiB frame");
    for i in 0..map.span_count() {
        let (a, b) = map.span_range(i);
        assert!(b - a <= limit, "span {i} is {} bytes", b - a);
    }
}

#[test]
fn zstd_single_frame_without_copy_round_trip() {
    let data = make_data(3 << 20, 5);
    let blob = zstd_single(&data);
    let opts = SpanOptions {
        span_size: SMALL_SPAN,
        local_copy: None,
        fine: None,
    };
    let map = round_trip(Compression::Zstd, &data, &blob, opts);
    assert!(!map.has_local_copy());
}

#[test]
fn zstd_multi_frame_round_trip() {
    let data = make_data(16 << 20, 6);
    let s = SMALL_SPAN as usize;
    // Small frames that group, frames between 1 and 2 spans, and one frame to copy.
    let blob = zstd_frames(
        &data,
        &[20_000, 50_000, s / 3, s * 3 / 2, 1, s * 5, 100_000],
    );
    let opts = SpanOptions {
        span_size: SMALL_SPAN,
        local_copy: Some(PathBuf::new()),
        fine: None,
    };
    let map = round_trip(Compression::Zstd, &data, &blob, opts);
    assert!(map.has_local_copy());
    for i in 0..map.span_count() {
        let (a, b) = map.span_range(i);
        assert!(b - a <= 2 * SMALL_SPAN, "span {i} is {} bytes", b - a);
    }
}

#[test]
fn zstd_small_frames_need_no_copy() {
    let data = make_data(4 << 20, 8);
    let blob = zstd_frames(&data, &[30_000, 70_000]);
    let opts = SpanOptions {
        span_size: SMALL_SPAN,
        local_copy: Some(PathBuf::new()),
        fine: None,
    };
    let map = round_trip(Compression::Zstd, &data, &blob, opts);
    assert!(!map.has_local_copy());
    assert!(map.span_count() >= (4 << 20) / SMALL_SPAN as usize);
}

/// The bound: a 4 KiB read in the middle of ~200 MiB decompresses at most one span, and one
/// crossing a span boundary at most two.
fn check_bound(c: Compression, data: &[u8], blob: &[u8], copy: bool) {
    let fx = write_blob(blob);
    let opts = SpanOptions {
        span_size: DEFAULT_SPAN_SIZE,
        local_copy: copy.then(|| fx.copy.clone()),
        fine: None,
    };
    let (out, map) = index(c, blob, opts).expect("pass");
    assert!(out == data);
    drop(out);
    let limit = span_limit(c, blob, DEFAULT_SPAN_SIZE);
    assert!(
        map.largest_span() <= limit,
        "{c:?}: a span of {}",
        map.largest_span()
    );
    let mid = map.uncompressed_size / 2;
    let r = open(&fx, map.clone(), 256 << 20);
    check_read(&r, data, mid, 4096);
    assert!(
        r.decompressed_bytes() <= limit,
        "{c:?}: one 4 KiB read decompressed {} bytes",
        r.decompressed_bytes()
    );
    let i = map.span_of(mid) + 3;
    let (b, _) = map.span_range(i);
    let r = open(&fx, map, 256 << 20);
    check_read(&r, data, b - 2048, 4096);
    assert!(
        r.decompressed_bytes() <= 2 * limit,
        "{c:?}: a 4 KiB read across a boundary decompressed {} bytes",
        r.decompressed_bytes()
    );
}

/// The most a span may hold: `span`, or for a single zstd frame entered at resume points one
/// point per 4 windows (see zst.rs).
fn span_limit(c: Compression, blob: &[u8], span: u64) -> u64 {
    if c != Compression::Zstd || blob.get(..4) != Some(&0xFD2F_B528u32.to_le_bytes()[..]) {
        return span;
    }
    match super::zst::format::frame_header(blob) {
        Ok(Some(h)) if h.window <= super::zst::RESUME_WINDOW_MAX => {
            span.max(4 * h.window + (128 << 10))
        }
        _ => span,
    }
}

fn big_data() -> &'static [u8] {
    static DATA: OnceLock<Vec<u8>> = OnceLock::new();
    DATA.get_or_init(|| make_data(200 << 20, 9))
}

#[test]
fn bound_gzip_200mib() {
    let data = big_data();
    // Level 6: zlib-ng/zlib-rs level 1 writes one fixed-Huffman block per stream, which has no
    // inner restart points (see gz.rs).
    check_bound(Compression::Gzip, data, &gzip(data, 6), false);
}

#[test]
fn bound_zstd_single_frame_200mib() {
    let data = big_data();
    let blob = zstd::bulk::compress(data, 1).expect("zstd");
    check_bound(Compression::Zstd, data, &blob, true);
}

#[test]
fn bound_zstd_multi_frame_200mib() {
    let data = big_data();
    let blob = zstd_frames(data, &[1 << 20, 3 << 20, 300_000]);
    check_bound(Compression::Zstd, data, &blob, true);
}

fn expect_pass_error(c: Compression, blob: &[u8], what: &str) -> String {
    match index(c, blob, SpanOptions::default()) {
        Ok(_) => panic!("{what}: corrupt {c:?} input was accepted"),
        Err(e) => e,
    }
}

#[test]
fn corrupt_gzip_pass() {
    let data = make_data(2 << 20, 10);
    let blob = gzip(&data, 6);
    let e = expect_pass_error(Compression::Gzip, &blob[..blob.len() / 2], "truncated");
    assert!(e.contains("truncated"), "{e}");
    let e = expect_pass_error(Compression::Gzip, &blob[..blob.len() - 3], "no trailer");
    assert!(e.contains("truncated"), "{e}");
    let mut bad = blob.clone();
    let n = bad.len();
    bad[n - 6] ^= 0x55; // the length trailer
    let e = expect_pass_error(Compression::Gzip, &bad, "bad length");
    assert!(e.contains("corrupt gzip"), "{e}");
    let mut bad = blob.clone();
    for b in &mut bad[n / 2..n / 2 + 64] {
        *b = 0xff;
    }
    let e = expect_pass_error(Compression::Gzip, &bad, "junk in the middle");
    assert!(e.contains("offset"), "{e}");
    let mut bad = blob.clone();
    bad.extend_from_slice(b"trailing garbage");
    expect_pass_error(Compression::Gzip, &bad, "trailing garbage");
    expect_pass_error(Compression::Gzip, b"\x1f\x8b", "header only");
    expect_pass_error(Compression::Gzip, b"", "empty");
    // As an io::Error: InvalidData.
    let mut r = IndexingReader::new(
        Compression::Gzip,
        &bad[..n / 2 + 100],
        SpanOptions::default(),
    )
    .expect("new");
    let err = std::io::copy(&mut r, &mut std::io::sink()).expect_err("must fail");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
}

#[test]
fn corrupt_zstd_pass() {
    let data = make_data(2 << 20, 11);
    for blob in [
        zstd_single(&data),
        zstd_frames_with(&data, &[100_000], false),
    ] {
        let n = blob.len();
        let e = expect_pass_error(Compression::Zstd, &blob[..n / 2], "truncated");
        assert!(e.contains("truncated") || e.contains("corrupt"), "{e}");
        expect_pass_error(Compression::Zstd, &blob[..n - 1], "last byte missing");
        let mut bad = blob.clone();
        for b in &mut bad[n / 2..n / 2 + 64] {
            *b = 0xff;
        }
        let e = expect_pass_error(Compression::Zstd, &bad, "junk in the middle");
        assert!(e.contains("offset"), "{e}");
        let mut bad = blob.clone();
        bad.extend_from_slice(b"trailing garbage");
        let e = expect_pass_error(Compression::Zstd, &bad, "trailing garbage");
        assert!(e.contains(&format!("offset {n}")), "{e}");
    }
}

/// Damage a blob after indexing: the damaged span errors, naming blob and offset; others read.
fn corrupt_after_index(c: Compression, data: &[u8], blob: &[u8]) {
    let fx = write_blob(blob);
    let opts = SpanOptions {
        span_size: SMALL_SPAN,
        local_copy: Some(fx.copy.clone()),
        fine: None,
    };
    let (_, map) = index(c, blob, opts).expect("pass");
    let mut bad = blob.to_vec();
    // Raw deflate has no checksum, so junk inside a block may decode silently; junk at a
    // checkpoint (block start) reads as block type 3, which inflate must reject.
    let mid = match &map.index {
        SpanIndex::Gzip(points) => {
            let p = &points[points.len() / 2];
            p.c_off as usize - usize::from(p.bits > 0)
        }
        _ => bad.len() / 2,
    };
    for b in &mut bad[mid..mid + 256] {
        *b = 0xff;
    }
    std::fs::write(&fx.blob, &bad).expect("rewrite");
    let r = open(&fx, map.clone(), 64 << 20);
    let fresh = open(&fx, map, 64 << 20);
    let mut buf = vec![0u8; 1 << 20];
    let mut errors = 0;
    let mut ok = 0;
    let mut off = 0;
    while off < data.len() as u64 {
        match r.read_at(off, &mut buf[..SMALL_SPAN as usize]) {
            Ok(n) => {
                if buf[..n] == data[off as usize..off as usize + n] {
                    ok += 1;
                }
            }
            Err(e) => {
                let s = e.to_string();
                assert!(s.contains(&fx.blob.display().to_string()), "{s}");
                assert!(s.contains("offset"), "{s}");
                errors += 1;
            }
        }
        off += SMALL_SPAN;
    }
    assert!(errors >= 1, "{c:?}: damage went unnoticed");
    assert!(ok >= 4, "{c:?}: undamaged spans must still read ({ok})");
    // Truncated under the reader: an error, not a panic.
    std::fs::write(&fx.blob, &bad[..mid]).expect("truncate");
    let last = data.len() as u64 - 10;
    assert!(fresh.read_at(last, &mut buf[..10]).is_err());
}

#[test]
fn corrupt_gzip_read_at() {
    let data = make_data(4 << 20, 12);
    corrupt_after_index(Compression::Gzip, &data, &gzip(&data, 6));
}

#[test]
fn corrupt_zstd_read_at() {
    let data = make_data(4 << 20, 13);
    let blob = zstd_frames_with(&data, &[60_000], false);
    corrupt_after_index(Compression::Zstd, &data, &blob);
}

#[test]
fn concurrent_readers() {
    let data = Arc::new(make_data(8 << 20, 14));
    let blobs = [
        (Compression::Gzip, gzip(&data, 6)),
        (Compression::Zstd, zstd_single(&data)),
    ];
    for (c, blob) in blobs {
        let fx = write_blob(&blob);
        let opts = SpanOptions {
            span_size: SMALL_SPAN,
            local_copy: Some(fx.copy.clone()),
            fine: None,
        };
        let (_, map) = index(c, &blob, opts).expect("pass");
        // A cache smaller than the data, so spans get evicted and reloaded.
        let r = Arc::new(open(&fx, map, 6 * SMALL_SPAN));
        let threads: Vec<_> = (0..6)
            .map(|t| {
                let r = r.clone();
                let data = data.clone();
                std::thread::spawn(move || {
                    let mut rng = StdRng::seed_from_u64(t);
                    for _ in 0..150 {
                        let off = rng.random_range(0..data.len() as u64);
                        let len = rng.random_range(1..(300 << 10));
                        check_read(&r, &data, off, len);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("reader thread");
        }
    }
}

#[test]
fn concurrent_readers_of_one_span_decompress_it_once() {
    let data = make_data(4 << 20, 15);
    let blob = gzip(&data, 6);
    let fx = write_blob(&blob);
    let opts = SpanOptions {
        span_size: SMALL_SPAN,
        local_copy: None,
        fine: None,
    };
    let (_, map) = index(Compression::Gzip, &blob, opts).expect("pass");
    let (start, end) = map.span_range(5);
    let r = Arc::new(open(&fx, map, 64 << 20));
    let barrier = Arc::new(Barrier::new(8));
    let data = Arc::new(data);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (r, b, data) = (r.clone(), barrier.clone(), data.clone());
            std::thread::spawn(move || {
                b.wait();
                check_read(&r, &data, start + 100, 1000);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("reader thread");
    }
    assert_eq!(r.decompressed_bytes(), end - start);
}

#[test]
fn cache_is_bounded_and_shared() {
    let data = make_data(4 << 20, 16);
    let blob = zstd_frames(&data, &[SMALL_SPAN as usize]);
    let fx = write_blob(&blob);
    let opts = SpanOptions {
        span_size: SMALL_SPAN,
        local_copy: None,
        fine: None,
    };
    let (_, map) = index(Compression::Zstd, &blob, opts).expect("pass");
    let cache = SpanCache::new(3 * SMALL_SPAN);
    let map = Arc::new(map);
    let r1 = BlobReader::open(&fx.blob, map.clone(), None, cache.clone()).expect("open");
    let r2 = BlobReader::open(&fx.blob, map, None, cache.clone()).expect("open");
    for off in (0..data.len() as u64).step_by(100_000) {
        check_read(&r1, &data, off, 10);
        check_read(&r2, &data, off, 10);
        assert!(cache.used_bytes() <= 3 * SMALL_SPAN);
    }
    assert!(!cache.is_empty());
    drop(r1);
    drop(r2);
    assert!(cache.is_empty(), "dropping readers frees their spans");
}

#[test]
fn finish_before_eof_is_an_error() {
    let data = make_data(1 << 20, 17);
    let blob = gzip(&data, 6);
    let mut r =
        IndexingReader::new(Compression::Gzip, &blob[..], SpanOptions::default()).expect("new");
    let mut buf = [0u8; 1000];
    r.read_exact(&mut buf).expect("read");
    assert!(matches!(r.finish(), Err(BlobError::NotFinished)));
}

#[test]
fn map_checks() {
    let data = make_data(10 << 20, 18);
    let blob = zstd_single(&data);
    let fx = write_blob(&blob);
    let copy = fx._dir.path().join("new/dir/blob.copy");
    let opts = SpanOptions {
        span_size: SMALL_SPAN,
        local_copy: Some(copy.clone()),
        fine: None,
    };
    let (_, map) = index(Compression::Zstd, &blob, opts).expect("pass");
    assert!(copy.exists(), "local copy renamed into place");
    let leftovers = std::fs::read_dir(copy.parent().expect("parent"))
        .expect("read_dir")
        .count();
    assert_eq!(leftovers, 1, "no temp files left beside the copy");
    let map = Arc::new(map);
    let cache = SpanCache::new(1 << 20);
    let e = BlobReader::open(&fx.blob, map.clone(), None, cache.clone()).expect_err("no copy");
    assert!(matches!(e, BlobError::MissingLocalCopy { .. }), "{e}");
    // A map of another blob is refused.
    let other = write_blob(&blob[..blob.len() - 1]);
    assert!(BlobReader::open(&other.blob, map.clone(), Some(&copy), cache.clone()).is_err());
    let r = BlobReader::open(&fx.blob, map, Some(&copy), cache).expect("open");
    check_read(&r, &data, 1000, 500_000);
    let bad = SpanOptions {
        span_size: 0,
        local_copy: None,
        fine: None,
    };
    assert!(IndexingReader::new(Compression::Gzip, &blob[..], bad).is_err());
    // Garbage map bytes fail to decode or to validate, never panic.
    let bytes = postcard::to_stdvec(&*Arc::new(SpanMap {
        compression: Compression::Gzip,
        compressed_size: 10,
        uncompressed_size: 100,
        span_size: 4096,
        index: SpanIndex::Gzip(vec![]),
    }))
    .expect("serialise");
    let m: SpanMap = postcard::from_bytes(&bytes).expect("deserialise");
    assert!(m.validate("x").is_err());
}

#[test]
fn shared_types_are_send_and_sync() {
    fn is<T: Send + Sync>() {}
    is::<BlobReader>();
    is::<SpanCache>();
    is::<SpanMap>();
    // The indexer runs the pass on its own thread.
    fn send<T: Send + 'static>() {}
    send::<IndexingReader<std::fs::File>>();
}

/// Slack for the small last block zlib-rs level 1 closes its stream with.
const TAIL_BLOCK: u64 = 64 << 10;

/// zlib-rs level 1 ("quick") writes one fixed-Huffman deflate block per gzip stream (and a
/// tiny one at the end).
fn gzip_one_block(data: &[u8]) -> Vec<u8> {
    let blob = gzip(data, 1);
    let opts = SpanOptions {
        span_size: MIN_SPAN_SIZE,
        local_copy: None,
        fine: None,
    };
    let (_, map) = index(Compression::Gzip, &blob, opts).expect("pass");
    let (a, b) = map.span_range(0);
    assert!(
        a == 0 && b + TAIL_BLOCK >= data.len() as u64 && map.span_count() <= 2,
        "level 1 wrote more than one big deflate block: {} spans",
        map.span_count()
    );
    blob
}

#[test]
fn bound_gzip_one_giant_block_200mib() {
    let data = big_data();
    let blob = gzip_one_block(data);
    check_bound(Compression::Gzip, data, &blob, true);
}

#[test]
fn gzip_long_blocks_spill_into_local_copy() {
    // Members: normal blocks, one long block, normal blocks, and a long block at the very end.
    let data = make_data(12 << 20, 19);
    let cuts = [3 << 20, 6 << 20, 8 << 20, data.len()];
    let mut blob = gzip(&data[..cuts[0]], 6);
    blob.extend(gzip_one_block(&data[cuts[0]..cuts[1]]));
    blob.extend(gzip(&data[cuts[1]..cuts[2]], 6));
    blob.extend(gzip_one_block(&data[cuts[2]..cuts[3]]));
    let opts = SpanOptions {
        span_size: SMALL_SPAN,
        local_copy: Some(PathBuf::new()),
        fine: None,
    };
    let map = round_trip(Compression::Gzip, &data, &blob, opts);
    assert!(map.has_local_copy());
    let SpanIndex::GzipCopy(g) = &map.index else {
        panic!("no local copy spans in the map");
    };
    let copies: Vec<(u64, u64)> = (0..map.span_count())
        .filter(|&i| matches!(g.spans[i], gz::GzSpan::Copy { .. }))
        .map(|i| map.span_range(i))
        .collect();
    assert!(copies.iter().all(|(a, b)| b - a <= SMALL_SPAN));
    let covered: u64 = copies.iter().map(|(a, b)| b - a).sum();
    let long = (cuts[1] - cuts[0] + cuts[3] - cuts[2]) as u64;
    assert!(
        covered <= long && covered + 2 * TAIL_BLOCK >= long,
        "the long blocks (and nothing else) come from the copy: {covered} of {long}"
    );
    // The copy starts at each long block; checkpoints resume at the block after it.
    assert!(copies.iter().any(|&(a, _)| a == cuts[0] as u64));
    assert!(copies.iter().any(|&(a, _)| a == cuts[2] as u64));
    let resumes = (0..map.span_count())
        .map(|i| map.span_range(i).0)
        .any(|a| a < cuts[1] as u64 && a + TAIL_BLOCK >= cuts[1] as u64);
    assert!(resumes, "no checkpoint right after the first long block");
}

#[test]
fn gzip_long_block_without_local_copy_still_reads() {
    let data = make_data(3 << 20, 20);
    let blob = gzip_one_block(&data);
    let opts = SpanOptions {
        span_size: SMALL_SPAN,
        local_copy: None,
        fine: None,
    };
    let map = round_trip(Compression::Gzip, &data, &blob, opts);
    assert!(!map.has_local_copy());
}

#[test]
fn gzip_long_block_copy_needs_the_copy_file() {
    let data = make_data(2 << 20, 21);
    let blob = gzip_one_block(&data);
    let fx = write_blob(&blob);
    let opts = SpanOptions {
        span_size: SMALL_SPAN,
        local_copy: Some(fx.copy.clone()),
        fine: None,
    };
    let (_, map) = index(Compression::Gzip, &blob, opts).expect("pass");
    assert!(map.has_local_copy() && fx.copy.exists());
    let e = BlobReader::open(&fx.blob, Arc::new(map), None, SpanCache::new(1 << 20))
        .expect_err("no copy");
    assert!(matches!(e, BlobError::MissingLocalCopy { .. }), "{e}");
}

#[test]
fn sequential_reads_prefetch_the_next_spans() {
    let data = make_data(4 << 20, 22);
    let blob = zstd_frames(&data, &[SMALL_SPAN as usize]);
    let fx = write_blob(&blob);
    let opts = SpanOptions {
        span_size: SMALL_SPAN,
        local_copy: None,
        fine: None,
    };
    let (_, map) = index(Compression::Zstd, &blob, opts).expect("pass");
    let cache = SpanCache::new(64 << 20);
    let r = BlobReader::open(&fx.blob, Arc::new(map.clone()), None, cache.clone()).expect("open");
    check_read(&r, &data, 0, 1000);
    check_read(&r, &data, 1500, 1000);
    let ahead = map.span_of(2500) + PREFETCH_AHEAD;
    let key = (r.inner.id, ahead);
    let t0 = std::time::Instant::now();
    // Read-ahead is best effort (dropped while the process's read-ahead slots are busy, e.g.
    // with other tests running): keep reading sequentially within the span until it happens.
    let mut next = 2500u64;
    while !cache.has(key) && t0.elapsed().as_secs() < 30 {
        std::thread::sleep(std::time::Duration::from_millis(20));
        if next + 100 < map.span_range(map.span_of(2500)).1 {
            check_read(&r, &data, next, 100);
            next += 100;
        }
    }
    assert!(cache.has(key), "span {ahead} was not read ahead");
    // Random reads do not read ahead.
    let mut off = r.inner.map.span_range(8).0 + 10;
    let mut r = BlobReader::open(&fx.blob, Arc::new(map), None, cache.clone()).expect("open");
    r.set_prefetch(true);
    for _ in 0..3 {
        check_read(&r, &data, off, 100);
        off -= 5000;
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(!cache.has((r.inner.id, 9)));
    // And round trips hold with read-ahead racing the readers.
    for off in (0..data.len() as u64).step_by(70_000) {
        check_read(&r, &data, off, 70_000);
    }
}
