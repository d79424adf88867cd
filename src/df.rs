//! `lazysnap df`: where the root's disk space goes — the content store, layer indexes and span
//! maps, local seekable copies, the upper directories of active snapshots, temp files — and
//! how much of it `gc` would give back. Sizes are apparent file sizes; a file with several
//! hardlinks counts once. Knows the root's layout; nothing of FUSE or tar.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use serde::Serialize;
use tracing::info_span;

use crate::check::{CheckError, Reclaimable};
use crate::root::Root;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Count {
    pub files: u64,
    pub bytes: u64,
}

impl Count {
    fn add(&mut self, bytes: u64) {
        self.files += 1;
        self.bytes += bytes;
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotUsage {
    pub key: String,
    pub kind: String,
    pub files: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DiskUsage {
    /// `content/blobs`.
    pub blobs: Count,
    /// Layer index files (`index/<diffid>`).
    pub indexes: Count,
    /// Span maps (`index/<blob>.spans`).
    pub span_maps: Count,
    /// Local seekable copies (`index/<blob>.seekable.zst`): re-compressed regions a read
    /// cannot enter in the blob (zstd frames with a window past the cap, over-long deflate
    /// blocks).
    pub local_copies: Count,
    /// Resume-point dictionaries of single-frame zstd blobs (the same file name, holding only
    /// dictionaries), and the uncompressed bytes of the blobs they serve.
    pub zstd_resume_points: Count,
    pub zstd_resume_serves: u64,
    /// Remote records of lazily pulled blobs (`index/<blob>.remote`).
    pub remote_records: Count,
    /// Chunks of lazily pulled blobs fetched so far (`chunks/`).
    pub chunk_cache: Count,
    /// Upper directories of active snapshots (and views), all together.
    pub uppers: Count,
    /// Per snapshot with an upper directory.
    pub snapshots: Vec<SnapshotUsage>,
    /// Partial ingests and temp files (live or left by killed processes).
    pub temp: Count,
    /// The metadata database with its WAL.
    pub metadata: Count,
    pub reclaimable: Reclaimable,
    pub total_bytes: u64,
}

fn file_len(p: &Path) -> u64 {
    std::fs::symlink_metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Measures the root. Takes the write lock briefly (to compute what gc would keep).
pub fn disk_usage(root: &mut Root) -> Result<DiskUsage, CheckError> {
    let _span = info_span!("df", root = %root.path.display()).entered();
    let mut du = DiskUsage::default();
    for d in root.store.list().map_err(|e| CheckError::Io {
        context: "listing blobs".into(),
        source: std::io::Error::other(e.to_string()),
    })? {
        du.blobs.add(file_len(&root.store.blob_path(&d)));
    }
    if let Ok(rd) = std::fs::read_dir(root.index_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            if crate::root::is_temp_name(&name) {
                du.temp.add(len);
            } else if let Some(hex) = name.strip_suffix(".seekable.zst") {
                let map =
                    crate::blob::SpanMap::load(&root.index_dir().join(format!("{hex}.spans")));
                match map
                    .ok()
                    .filter(|m| m.resume_points() > 0 && m.copied_spans() == 0)
                {
                    Some(m) => {
                        du.zstd_resume_points.add(len);
                        du.zstd_resume_serves += m.uncompressed_size;
                    }
                    None => du.local_copies.add(len),
                }
            } else if name.ends_with(".spans") {
                du.span_maps.add(len);
            } else if name.ends_with(".remote") {
                du.remote_records.add(len);
            } else {
                du.indexes.add(len);
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(root.store.ingest_dir()) {
        for e in rd.flatten() {
            du.temp.add(e.metadata().map(|m| m.len()).unwrap_or(0));
        }
    }
    let chunks = tree_size(&root.path.join(crate::chunks::DIR));
    du.chunk_cache.files = chunks.files;
    du.chunk_cache.bytes = chunks.bytes;
    for name in ["meta.db", "meta.db-wal", "meta.db-shm"] {
        let p = root.path.join(name);
        if p.exists() {
            du.metadata.add(file_len(&p));
        }
    }
    for row in root.meta.snapshots()? {
        if row.kind == "committed" {
            continue;
        }
        let upper = root
            .path
            .join("snapshots")
            .join(row.id.to_string())
            .join("upper");
        let c = tree_size(&upper);
        du.uppers.files += c.files;
        du.uppers.bytes += c.bytes;
        du.snapshots.push(SnapshotUsage {
            key: row.key,
            kind: row.kind,
            files: c.files,
            bytes: c.bytes,
        });
    }
    du.reclaimable = crate::check::reclaimable(root)?;
    du.total_bytes = [
        du.blobs,
        du.indexes,
        du.span_maps,
        du.local_copies,
        du.zstd_resume_points,
        du.remote_records,
        du.chunk_cache,
        du.uppers,
        du.temp,
        du.metadata,
    ]
    .iter()
    .map(|c| c.bytes)
    .sum();
    Ok(du)
}

/// Entries and bytes under `dir`, not following symlinks, one count per inode; a directory
/// that cannot be read counts as empty (a snapshot can be removed meanwhile).
fn tree_size(dir: &Path) -> Count {
    let mut c = Count::default();
    let mut seen = HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            if md.is_dir() {
                stack.push(e.path());
            } else if seen.insert((md.dev(), md.ino())) {
                c.add(md.len());
            }
        }
    }
    c
}

impl DiskUsage {
    /// A table for people; per-snapshot lines with `verbose`.
    pub fn to_text(&self, verbose: bool) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let line = |s: &mut String, what: &str, c: &Count| {
            let _ = writeln!(s, "{what:<28} {:>8} {:>12}", c.files, human(c.bytes));
        };
        let _ = writeln!(s, "{:<28} {:>8} {:>12}", "WHAT", "FILES", "SIZE");
        line(&mut s, "blobs (content store)", &self.blobs);
        line(&mut s, "layer indexes", &self.indexes);
        line(&mut s, "span maps", &self.span_maps);
        line(&mut s, "local seekable copies", &self.local_copies);
        line(&mut s, "zstd resume points", &self.zstd_resume_points);
        if self.zstd_resume_serves > 0 {
            let pct = 100.0 * self.zstd_resume_points.bytes as f64 / self.zstd_resume_serves as f64;
            let _ = writeln!(
                s,
                "  ({pct:.1}% of the {} they serve uncompressed)",
                human(self.zstd_resume_serves)
            );
        }
        line(&mut s, "remote blob records", &self.remote_records);
        line(&mut s, "chunk cache (lazy pulls)", &self.chunk_cache);
        line(&mut s, "snapshot upper dirs", &self.uppers);
        if verbose {
            for u in &self.snapshots {
                let _ = writeln!(
                    s,
                    "  {:<26} {:>8} {:>12}  ({})",
                    u.key,
                    u.files,
                    human(u.bytes),
                    u.kind
                );
            }
        }
        line(&mut s, "temp files", &self.temp);
        line(&mut s, "metadata (meta.db, WAL)", &self.metadata);
        let _ = writeln!(
            s,
            "{:<28} {:>8} {:>12}",
            "total",
            "",
            human(self.total_bytes)
        );
        let _ = writeln!(
            s,
            "{:<28} {:>8} {:>12}",
            "reclaimable by gc",
            self.reclaimable.blobs + self.reclaimable.index_files,
            human(self.reclaimable.bytes())
        );
        s
    }
}

/// 1536 → "1.5 KiB".
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
