//! Differential tests of zstd resume points (src/blob/zst.rs): layers written by the zstd CLI
//! at levels 1, 3, 9 and 19, with `--long=27` (a window past the cap: the local seekable copy),
//! as several frames, with raw and RLE blocks, tiny and empty, and by klauspost/compress (the
//! Go encoder buildkit and containerd use: tools/zstd-klauspost). For each: the pass decodes
//! the same bytes as `zstd -dc`; every span read on its own (from its resume point, decoding
//! exactly that span) equals those bytes; random `read_at`s equal them; points are 4 windows
//! apart (resume data within 25% of the output), 2 windows in a fine region (a big file's data);
//! and damaged or cut resume data fails the read, never returns wrong bytes. The data is real files of this machine.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};

use lazysnap::blob::{
    BlobReader, Compression, FineRegion, IndexingReader, SpanCache, SpanMap, SpanOptions,
    FINE_SPAN_SIZE, FINE_WINDOWS,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SPAN: u64 = 256 << 10;
const MIB: usize = 1 << 20;

/// Runs `cmd` with `input` on stdin; its stdout.
fn pipe(cmd: &Path, args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", cmd.display()));
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("wait");
    writer.join().expect("writer").expect("write stdin");
    assert!(out.status.success(), "{} {args:?} failed", cmd.display());
    out.stdout
}

fn zstd(args: &[&str], data: &[u8]) -> Vec<u8> {
    pipe(Path::new("zstd"), &[&["-q", "-c"], args].concat(), data)
}

/// tools/zstd-klauspost, built once per test run.
fn klauspost() -> Option<PathBuf> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(|| {
        if !common::require(common::have_cmd("go"), "go (builds tools/zstd-klauspost)") {
            return None;
        }
        let bin = common::repo_root().join("target/tools/zstd-klauspost");
        common::go_build_tool("zstd-klauspost", &bin);
        Some(bin)
    })
    .clone()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Entered at resume points only.
    Resume,
    /// A window past the cap: re-compressed into the local copy.
    Copy,
    /// Small enough to read whole: no local file.
    Whole,
}

/// The window of the first frame (`zstd -lv`).
fn window(blob: &Path) -> u64 {
    let out = Command::new("zstd")
        .arg("-lv")
        .arg(blob)
        .output()
        .expect("zstd -lv");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let rest = l.trim().strip_prefix("Window Size:")?;
            let bytes = rest.split('(').nth(1)?.split(' ').next()?;
            bytes.parse().ok()
        })
        .unwrap_or(0)
}

struct Indexed {
    _dir: tempfile::TempDir,
    blob: PathBuf,
    copy: PathBuf,
    map: Arc<SpanMap>,
}

fn index(blob: &[u8], data: &[u8], span: u64, fine: Option<Arc<FineRegion>>) -> Indexed {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("blob");
    std::fs::write(&path, blob).expect("write blob");
    let copy = dir.path().join("copy");
    let opts = SpanOptions {
        span_size: span,
        local_copy: Some(copy.clone()),
        fine,
    };
    let mut pass = IndexingReader::new(Compression::Zstd, blob, opts).expect("pass");
    let mut out = Vec::with_capacity(data.len());
    pass.read_to_end(&mut out).expect("indexing pass");
    assert!(out == data, "the pass decodes other bytes than zstd -d");
    let map = Arc::new(pass.finish().expect("finish"));
    Indexed {
        _dir: dir,
        blob: path,
        copy,
        map,
    }
}

fn reader(ix: &Indexed, cache: u64) -> BlobReader {
    let mut r = BlobReader::open(
        &ix.blob,
        ix.map.clone(),
        ix.map.has_local_copy().then_some(ix.copy.as_path()),
        SpanCache::new(cache),
    )
    .expect("open");
    r.set_prefetch(false);
    r
}

fn check(name: &str, blob: Vec<u8>, data: &[u8], expect: Expect) -> Indexed {
    check_fine(name, blob, data, expect, None)
}

/// As [`check`], with closer points over `fine` (stream offsets `[start, end)`).
fn check_fine(
    name: &str,
    blob: Vec<u8>,
    data: &[u8],
    expect: Expect,
    fine: Option<(u64, u64)>,
) -> Indexed {
    let region = fine.map(|(a, b)| {
        let r = FineRegion::default();
        r.set(a, b);
        Arc::new(r)
    });
    let ix = index(&blob, data, SPAN, region);
    let map = &ix.map;
    let (points, copied) = (map.resume_points(), map.copied_spans());
    eprintln!(
        "{name}: {} -> {} bytes, {} spans, {points} resume points, {copied} copied, local file {} bytes",
        blob.len(),
        data.len(),
        map.span_count(),
        std::fs::metadata(&ix.copy).map_or(0, |m| m.len())
    );
    match expect {
        Expect::Resume => assert!(
            points > 0 && copied == 0,
            "{name}: {points} points, {copied} copied"
        ),
        Expect::Copy => assert!(
            points == 0 && copied > 0,
            "{name}: {points} points, {copied} copied"
        ),
        Expect::Whole => assert!(
            !map.has_local_copy(),
            "{name}: a local file for a small layer"
        ),
    }
    if expect == Expect::Resume {
        // One point per 4 windows: the dictionaries stay within 25% of the output.
        let w = window(&ix.blob);
        let limit = SPAN.max(4 * w + (128 << 10));
        assert!(
            map.largest_span() <= limit,
            "{name}: a span of {}",
            map.largest_span()
        );
        let extra = std::fs::metadata(&ix.copy).expect("copy").len();
        let (fine_len, allowed) = match fine {
            None => (0, data.len() as u64 / 4),
            Some((a, b)) => {
                // In the region: points FINE_WINDOWS windows apart, once the pass has a
                // window of output since the region began.
                let fine_limit = FINE_SPAN_SIZE.max(FINE_WINDOWS * w + (128 << 10));
                let settled = a + w + limit;
                let mut inside = 0;
                for i in 0..map.span_count() {
                    let (x, y) = map.span_extent(i);
                    if x >= settled && y <= b {
                        inside += 1;
                        assert!(
                            y - x <= fine_limit,
                            "{name}: span {i} in the fine region is {} bytes",
                            y - x
                        );
                    }
                }
                let want = (b - settled) / fine_limit;
                assert!(
                    inside + 1 >= want,
                    "{name}: {inside} spans in the fine region, want {want}"
                );
                (
                    b - a,
                    (data.len() as u64 - (b - a)) / 4 + (b - a) / FINE_WINDOWS + w,
                )
            }
        };
        assert!(
            extra <= allowed + (1 << 16),
            "{name}: {extra} bytes of resume data for {} ({fine_len} of it fine)",
            data.len()
        );
    }
    // Each span alone, from a cold cache: the bytes, and only that span decoded.
    for i in 0..map.span_count() {
        let (a, b) = map.span_extent(i);
        let r = reader(&ix, 64 << 20);
        let mut buf = vec![0u8; (b - a) as usize];
        let n = r
            .read_at(a, &mut buf)
            .unwrap_or_else(|e| panic!("{name}: span {i}: {e}"));
        assert_eq!(n, buf.len(), "{name}: span {i} short");
        assert!(
            buf == data[a as usize..b as usize],
            "{name}: span {i} differs"
        );
        assert_eq!(
            r.decompressed_bytes(),
            b - a,
            "{name}: span {i} decoded more than itself"
        );
    }
    // Random reads through a cache of two spans.
    let r = reader(&ix, 2 * map.largest_span().max(1));
    let mut rng = StdRng::seed_from_u64(data.len() as u64);
    for _ in 0..200 {
        if data.is_empty() {
            break;
        }
        let off = rng.random_range(0..data.len());
        let len = rng.random_range(1..=(64 << 10)).min(data.len() - off);
        let mut buf = vec![0u8; len];
        let n = r.read_at(off as u64, &mut buf).expect("read_at");
        assert!(
            n == len && buf == data[off..off + len],
            "{name}: read_at {off}+{len}"
        );
    }
    ix
}

#[test]
fn zstd_cli_levels_resume_to_the_same_bytes() {
    let data = common::machine_corpus(40 * MIB);
    for level in ["-1", "-3", "-9"] {
        check(
            &format!("zstd {level}"),
            zstd(&[level], &data),
            &data,
            Expect::Resume,
        );
    }
    // Level 19 on 16 MiB, its window held at 2 MiB so points fit (level 19's strategies).
    let small = common::machine_corpus(16 * MIB);
    check(
        "zstd -19",
        zstd(&["-19", "--zstd=wlog=21"], &small),
        &small,
        Expect::Resume,
    );
    // A 128 MiB window is past the cap: the seekable copy.
    check(
        "zstd --long=27",
        zstd(&["-3", "--long=27"], &data),
        &data,
        Expect::Copy,
    );
}

/// A big file's stretch of the stream (`FineRegion`, set by unpack from the tar headers) gets
/// points 2 windows apart, each still decoding exactly its span; the rest keeps 4 windows.
#[test]
fn a_fine_region_gets_closer_resume_points() {
    let data = common::machine_corpus(40 * MIB);
    let region = (8 * MIB as u64, 32 * MIB as u64);
    for level in ["-3", "-9"] {
        check_fine(
            &format!("zstd {level}, fine region"),
            zstd(&[level], &data),
            &data,
            Expect::Resume,
            Some(region),
        );
    }
}

#[test]
fn several_frames_raw_and_rle_blocks_tiny_and_empty_layers() {
    let data = common::machine_corpus(36 * MIB);
    let mut frames = Vec::new();
    for part in data.chunks(12 * MIB) {
        frames.extend(zstd(&["-3"], part));
    }
    check("3 frames", frames, &data, Expect::Resume);

    // Incompressible bytes make raw blocks, runs of one byte RLE blocks; points land on both.
    let mut rng = StdRng::seed_from_u64(7);
    let mut mixed = common::machine_corpus(MIB);
    mixed.extend((0..5 * MIB).map(|_| rng.random::<u8>()));
    mixed.extend(std::iter::repeat_n(0u8, 5 * MIB));
    mixed.extend(std::iter::repeat_n(b'x', 3 * MIB));
    mixed.extend(common::machine_corpus(8 * MIB));
    check(
        "raw and RLE blocks",
        zstd(&["-3"], &mixed),
        &mixed,
        Expect::Resume,
    );

    let tiny = common::machine_corpus(100);
    check("tiny", zstd(&["-3"], &tiny), &tiny, Expect::Whole);
    check("empty", zstd(&["-3"], &[]), &[], Expect::Whole);
}

#[test]
fn klauspost_layers_resume_to_the_same_bytes() {
    let Some(bin) = klauspost() else { return };
    let data = common::machine_corpus(48 * MIB);
    // Its defaults (what containerd and buildkit write): 8 MiB window, one point per 32 MiB.
    check(
        "klauspost default",
        pipe(&bin, &[], &data),
        &data,
        Expect::Resume,
    );
    check(
        "klauspost fastest, 1 MiB window",
        pipe(&bin, &["-level", "1", "-window", "1048576"], &data),
        &data,
        Expect::Resume,
    );
    check(
        "klauspost best, 2 MiB window",
        pipe(
            &bin,
            &["-level", "4", "-window", "2097152", "-crc=false"],
            &data,
        ),
        &data,
        Expect::Resume,
    );
}

#[test]
fn damaged_or_cut_resume_data_fails_the_read() {
    let data = common::machine_corpus(40 * MIB);
    let ix = check("zstd -1", zstd(&["-1"], &data), &data, Expect::Resume);
    let good = std::fs::read(&ix.copy).expect("copy");
    let read_all = |what: &str| {
        let mut failed = 0;
        for i in 0..ix.map.span_count() {
            let (a, b) = ix.map.span_extent(i);
            let r = reader(&ix, 64 << 20);
            let mut buf = vec![0u8; (b - a) as usize];
            match r.read_at(a, &mut buf) {
                Ok(n) => assert!(
                    n == buf.len() && buf == data[a as usize..b as usize],
                    "{what}: span {i} read wrong bytes"
                ),
                Err(e) => {
                    assert!(e.to_string().contains("resume point"), "{what}: {e}");
                    failed += 1;
                }
            }
        }
        failed
    };
    for at in [1, good.len() / 3, good.len() / 2, good.len() - 1] {
        let mut bad = good.clone();
        bad[at] ^= 0x40;
        std::fs::write(&ix.copy, &bad).expect("write");
        assert_eq!(
            read_all(&format!("byte {at} flipped")),
            1,
            "byte {at} flipped"
        );
    }
    std::fs::write(&ix.copy, &good[..good.len() / 2]).expect("truncate");
    assert!(read_all("cut in half") >= 1);
    std::fs::write(&ix.copy, &good).expect("restore");
    assert_eq!(read_all("restored"), 0);
}
