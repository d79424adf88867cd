//! Garbage collection: drops metadata nothing needs, then the files behind it.

use crate::root::Root;

#[derive(Debug, Default)]
pub struct GcStats {
    pub blobs_removed: usize,
    pub bytes_freed: u64,
    pub index_files_removed: usize,
}

/// Removes unreferenced metadata, blobs, index files and ingest leftovers.
pub fn collect(root: &mut Root) -> anyhow::Result<GcStats> {
    // Not while an import, commit or apply has files on disk it has not recorded yet.
    let _lock = root.gc_lock()?;
    root.meta.collect_garbage()?;
    let mut stats = GcStats::default();
    let live = root.meta.referenced_blobs()?;
    for digest in root.store.list()? {
        if !live.contains(digest.as_str()) {
            let size = std::fs::metadata(root.store.blob_path(&digest))
                .map(|m| m.len())
                .unwrap_or(0);
            root.store.remove(&digest)?;
            stats.blobs_removed += 1;
            stats.bytes_freed += size;
        }
    }
    let (files, bytes) = remove_unreferenced_index_files(root)?;
    stats.index_files_removed += files;
    stats.bytes_freed += bytes;
    stats.bytes_freed += remove_unneeded_chunks(root, &live);
    root.store.clean_ingest()?;
    Ok(stats)
}

/// Removes the cached chunks and access traces of blobs that are local now or no longer
/// referenced. Returns bytes freed.
fn remove_unneeded_chunks(root: &Root, live: &std::collections::HashSet<String>) -> u64 {
    let mut freed = 0;
    for (hex, bytes) in crate::chunks::cached_blobs(&root.path) {
        let Ok(d) = crate::digest::Digest::parse(&format!("sha256:{hex}")) else {
            continue;
        };
        let dir = root.path.join(crate::chunks::DIR);
        if (root.store.contains(&d) || !live.contains(d.as_str()))
            && std::fs::remove_dir_all(dir.join(&hex)).is_ok()
        {
            freed += bytes;
            // The background download's lock file (a live download holds its blob's row).
            let _ = std::fs::remove_file(dir.join(format!("{hex}.fetch")));
        }
    }
    if let Ok(rd) = std::fs::read_dir(root.path.join(crate::trace::DIR)) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(hex) = name.strip_suffix(".json") else {
                continue;
            };
            if !live.contains(&format!("sha256:{hex}")) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    freed
}

/// Removes files under `index/` that no metadata row references (left by a failed or
/// interrupted unpack, or by rows gc removed). Returns (files, bytes) removed.
pub fn remove_unreferenced_index_files(root: &Root) -> anyhow::Result<(usize, u64)> {
    let referenced = root.meta.referenced_files()?;
    let (mut files, mut bytes) = (0, 0);
    for entry in std::fs::read_dir(root.index_dir())? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if crate::root::is_temp_name(&name) {
            // A temp file: removed only when no live process is writing it.
            if let Some(n) = crate::store::remove_if_stale(&entry.path())? {
                files += 1;
                bytes += n;
            }
            continue;
        }
        let rel = format!("index/{name}");
        if !referenced.contains(&rel) {
            bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
            std::fs::remove_file(entry.path())?;
            files += 1;
        }
    }
    Ok((files, bytes))
}
