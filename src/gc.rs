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
    root.store.clean_ingest()?;
    Ok(stats)
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
