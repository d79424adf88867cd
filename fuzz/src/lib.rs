//! Shared harness code of the fuzz targets: each target feeds its bytes to the library the way
//! `lazysnap import` does and checks invariants a reader relies on. The rule under test: no
//! panic, no unbounded allocation, no hang on any input; a clear error instead.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lazysnap::blob::{BlobReader, Compression, IndexingReader, SpanCache, SpanMap, SpanOptions};
use lazysnap::index::{build_index, Kind, LayerIndex};
use lazysnap::layer::IndexedLayer;
use lazysnap_fuse::LayerTree;

/// Most uncompressed bytes a target decodes per input (a bomb is not a bug here; the
/// import-level limit is tested in tests/bad_input.rs).
pub const MAX_OUT: usize = 64 << 20;

/// A scratch directory on tmpfs when there is one (fsyncs are cheap there).
pub fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().expect("creating a scratch directory")
}

/// Reads `r` to the end in chunks of varying size; `None` on error or past `MAX_OUT`.
fn read_all(r: &mut impl Read, sizes: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 18];
    let mut i = 0usize;
    loop {
        // Small and large reads: the pass buffers small caller reads differently.
        let want = match sizes.get(i % sizes.len().max(1)).copied().unwrap_or(0) {
            0..=63 => 1 << 18,
            n => usize::from(n) * 17,
        };
        i += 1;
        match r.read(&mut buf[..want]) {
            Ok(0) => return Some(out),
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.len() > MAX_OUT {
                    return None;
                }
            }
            Err(_) => return None,
        }
    }
}

/// Small deterministic PRNG over the input, for read offsets.
struct Picks(u64);
impl Picks {
    fn new(data: &[u8]) -> Self {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for &b in data.iter().take(4096) {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        Picks(h | 1)
    }
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        if below == 0 {
            0
        } else {
            self.0 % below
        }
    }
}

/// The compressed-blob path of import: one indexing pass with small spans and a local copy,
/// then random `read_at`s through a `BlobReader`, each checked against the pass's output.
pub fn random_access(compression: Compression, data: &[u8]) {
    let dir = scratch();
    let blob = dir.path().join("blob");
    let local = dir.path().join("copy");
    std::fs::write(&blob, data).expect("writing the blob");
    // Closer restart points over part of the stream, so the pass also crosses into and out
    // of a fine region.
    let fine = std::sync::Arc::new(lazysnap::blob::FineRegion::default());
    fine.set(64 << 10, 4 << 20);
    let opts = SpanOptions {
        span_size: lazysnap::blob::MIN_SPAN_SIZE,
        local_copy: Some(local.clone()),
        fine: Some(fine),
    };
    let Ok(mut pass) = IndexingReader::new(compression, data, opts) else {
        return;
    };
    let Some(out) = read_all(&mut pass, data) else {
        return;
    };
    let Ok(map) = pass.finish() else {
        return;
    };
    assert_eq!(
        map.uncompressed_size,
        out.len() as u64,
        "map size vs pass output"
    );
    assert_eq!(
        map.compressed_size,
        data.len() as u64,
        "map compressed size"
    );
    // As unpack stores it and mount loads it.
    let bytes = postcard::to_stdvec(&map).expect("serialising a span map");
    let map: SpanMap = postcard::from_bytes(&bytes).expect("a span map round-trips");
    let local = map.has_local_copy().then_some(local);
    let mut reader = BlobReader::open(
        &blob,
        Arc::new(map),
        local.as_deref(),
        SpanCache::new(8 << 20),
    )
    .expect("the map of a blob that indexed cleanly must open");
    reader.set_prefetch(false);
    check_reads(&reader, &out, data);
}

fn check_reads(reader: &BlobReader, out: &[u8], data: &[u8]) {
    let total = out.len() as u64;
    let mut picks = Picks::new(data);
    let mut offsets = vec![0, total.saturating_sub(1), total / 2, total];
    for _ in 0..12 {
        offsets.push(picks.next(total + 1));
    }
    for off in offsets {
        let len = 1 + picks.next(3 * lazysnap::blob::MIN_SPAN_SIZE) as usize;
        let mut buf = vec![0u8; len];
        let n = reader
            .read_at(off, &mut buf)
            .unwrap_or_else(|e| panic!("read_at({off}, {len}) of a good blob failed: {e}"));
        let expect = (total.saturating_sub(off) as usize).min(len);
        assert_eq!(n, expect, "read_at({off}, {len}) length");
        let start = off.min(total) as usize;
        assert_eq!(
            &buf[..n],
            &out[start..start + n],
            "read_at({off}, {len}) bytes"
        );
    }
}

/// The tar path of import: an uncompressed layer through the indexing pass into the index
/// builder; a built index must round-trip, stay inside the stream, and serve reads through
/// the layer tree exactly as the tar bytes say.
pub fn tar_index(data: &[u8]) {
    // Arbitrary bytes as an index file must load or fail, never panic.
    let _ = LayerIndex::from_bytes(data, Path::new("fuzz-index"));

    let Ok(mut pass) = IndexingReader::new(Compression::None, data, SpanOptions::default()) else {
        return;
    };
    let Ok(built) = build_index(&mut pass) else {
        return;
    };
    let Ok(map) = pass.finish() else {
        return;
    };
    let index = built.index;
    assert_eq!(index.stats.uncompressed_size, data.len() as u64);
    let back = LayerIndex::from_bytes(&index.to_bytes(), Path::new("fuzz-index"))
        .expect("an index the builder made must load");
    assert_eq!(back, index, "index round-trip");
    for node in &index.nodes {
        if node.kind == Kind::File {
            let stored: u64 = if node.sparse.len == 0 {
                node.size
            } else {
                index.sparse[node.sparse.as_range()]
                    .iter()
                    .map(|e| e.1)
                    .sum()
            };
            assert!(
                node.data_offset + stored <= data.len() as u64,
                "file data past the end of the stream"
            );
        }
    }
    let dir = scratch();
    let blob: PathBuf = dir.path().join("layer.tar");
    std::fs::write(&blob, data).expect("writing the layer");
    let reader = BlobReader::open(&blob, Arc::new(map), None, SpanCache::new(1 << 20))
        .expect("a plain map must open");
    let layer = IndexedLayer::new(index, reader, "fuzz".into());
    walk(&layer, data);
}

/// Visits every node the way FUSE would: lookups, attrs, links, xattrs, reads.
fn walk(layer: &IndexedLayer, data: &[u8]) {
    let n = layer.index().nodes.len() as u32;
    let mut picks = Picks::new(data);
    let root = layer.root();
    let mut names = Vec::new();
    layer.for_each_child(root, &mut |name, e| names.push((name.to_vec(), e)));
    for (name, e) in names {
        assert_eq!(
            layer.lookup(root, &name),
            Some(e),
            "lookup of a listed name"
        );
    }
    for id in 0..n {
        let attr = layer.attr(id);
        let _ = layer.parent(id);
        let _ = layer.links(id);
        let _ = layer.xattrs(id);
        let _ = layer.is_opaque(id);
        let _ = layer.readlink(id);
        layer.for_each_child(id, &mut |_, _| {});
        let mut buf = vec![0u8; 1 + picks.next(8192) as usize];
        let off = picks.next(attr.size + 1);
        if let Ok(got) = layer.read_at(id, off, &mut buf) {
            assert!(
                got as u64 <= attr.size.saturating_sub(off),
                "read past the file size"
            );
        }
    }
}
