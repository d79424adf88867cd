//! Garbage collection: drops metadata nothing needs, then the files behind it.

use std::collections::HashSet;

use crate::digest::Digest;
use crate::root::Root;

#[derive(Debug, Default)]
pub struct GcStats {
    pub blobs_removed: usize,
    pub bytes_freed: u64,
    pub index_files_removed: usize,
}

/// Removes unreferenced metadata, blobs, index files and ingest leftovers.
/// `keep` are blobs an operation in progress still needs.
pub fn collect(root: &mut Root, keep: &[Digest]) -> anyhow::Result<GcStats> {
    let result = root.meta.collect_garbage()?;
    let mut stats = GcStats::default();
    let live: HashSet<String> = result
        .live_blobs
        .into_iter()
        .chain(keep.iter().map(|d| d.to_string()))
        .collect();
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
    // Index files: keep exactly what the metadata references.
    let mut referenced: HashSet<String> = HashSet::new();
    {
        let conn = root.meta.conn();
        let mut stmt = conn.prepare(
            "SELECT index_path FROM layers UNION SELECT spans_path FROM blobs
             UNION SELECT local_copy FROM blobs WHERE local_copy IS NOT NULL",
        )?;
        for row in stmt.query_map([], |r| r.get::<_, String>(0))? {
            referenced.insert(row?);
        }
    }
    for entry in std::fs::read_dir(root.index_dir())? {
        let entry = entry?;
        let rel = format!("index/{}", entry.file_name().to_string_lossy());
        if !referenced.contains(&rel) {
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            std::fs::remove_file(entry.path())?;
            stats.index_files_removed += 1;
            stats.bytes_freed += size;
        }
    }
    root.store.clean_ingest()?;
    Ok(stats)
}
