//! `pull`: a registry image through the import pipeline (the same code path as `import`, so
//! the recorded image and its indexes are identical): manifests and config first, then each
//! layer blob streamed into the content store (digest checked) and indexed from the same
//! stream as it downloads (`tee.rs`); the index is kept once the digest and diffID check.
//!
//! `pull --lazy`: layers that have a lazysnap index artifact (`artifact.rs`) are recorded from
//! it and left in the registry (read by range on demand, `lazy.rs`); the bytes their access
//! traces name are fetched before the pull returns, in one batch of range requests.

use std::sync::Arc;

use anyhow::Context as _;
use tracing::{info, info_span, warn};

use super::lazy::{RemoteBlob, PREFETCH_PARALLEL};
use super::source::{Connect, Lazy, RegistrySource};
use super::Reference;
use crate::image::Platform;
use crate::import::{import_source, Imported, Reporter};
use crate::layer::LayerFiles;
use crate::root::Root;
use crate::trace::Trace;

/// What a lazy pull left in the registry and fetched ahead.
#[derive(Debug, Default, Clone)]
pub struct LazyReport {
    /// Layers recorded from an index artifact (not downloaded).
    pub remote_layers: usize,
    /// Chunks the access traces named, fetched before returning.
    pub prefetched_chunks: usize,
    pub prefetched_bytes: u64,
}

pub fn pull(
    root: &mut Root,
    reference: &str,
    name: Option<&str>,
    platform: Option<&Platform>,
    connect: &Connect,
    lazy: Option<Lazy>,
    reporter: &mut dyn Reporter,
) -> anyhow::Result<(Imported, LazyReport)> {
    let prefetch = lazy.as_ref().is_some_and(|l| l.prefetch);
    let r = Reference::parse(reference)?;
    let _span = info_span!("pull", reference = %r, lazy = lazy.is_some()).entered();
    let canonical = r.to_string();
    let name = name.unwrap_or(&canonical);
    let mut source = RegistrySource::connect(&r, connect, name)
        .with_context(|| format!("pulling {canonical}"))?;
    source.download_into(&root.path.clone(), &root.store.clone(), root.limits);
    if let Some(l) = lazy {
        source.set_lazy(l);
    }
    let result = import_source(
        root,
        &source,
        Some(name),
        platform,
        name,
        reporter,
        &|layer| source.take_indexed(layer),
    );
    // Indexers of a failed pull may still be writing: wait, then drop what they wrote.
    source.finish();
    if result.is_err() {
        if let Ok(referenced) = root.meta.referenced_blobs() {
            for d in source.prefetched() {
                if !referenced.contains(d.as_str()) {
                    let _ = root.store.remove(&d);
                }
            }
        }
        let _ = crate::gc::remove_unreferenced_index_files(root);
    }
    let mut images = result.with_context(|| format!("pulling {canonical}"))?;
    let img = images
        .pop()
        .with_context(|| format!("{canonical} resolved to no image"))?;
    let mut report = LazyReport {
        remote_layers: source.remote_layers().len(),
        ..LazyReport::default()
    };
    if report.remote_layers > 0 && prefetch {
        let (chunks, bytes) = prefetch_traces(root, &img.name);
        report.prefetched_chunks = chunks;
        report.prefetched_bytes = bytes;
    }
    Ok((img, report))
}

/// Fetches what the access traces of the image's remote layers name (all layers at once,
/// [`PREFETCH_PARALLEL`] range requests at a time per layer). Best effort: a failure only
/// means those reads fetch on demand. Returns (chunks, bytes) fetched.
pub fn prefetch_traces(root: &Root, image: &str) -> (usize, u64) {
    let _span = info_span!("prefetch_traces", image).entered();
    let jobs = match traced_remote_layers(root, image) {
        Ok(j) => j,
        Err(e) => {
            warn!(error = %e, "cannot prefetch");
            return (0, 0);
        }
    };
    let (mut n, mut bytes) = (0, 0);
    std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|(blob, chunks)| s.spawn(move || blob.prefetch(chunks, PREFETCH_PARALLEL)))
            .collect();
        for h in handles {
            if let Ok((c, b)) = h.join() {
                n += c;
                bytes += b;
            }
        }
    });
    info!(chunks = n, bytes, "prefetched the traced ranges");
    (n, bytes)
}

/// The image's layers still in the registry that have an access trace, with the chunks the
/// trace names (in order of first need).
fn traced_remote_layers(
    root: &Root,
    image: &str,
) -> anyhow::Result<Vec<(Arc<RemoteBlob>, Vec<u64>)>> {
    let img = root
        .meta
        .image(image)?
        .with_context(|| format!("image {image:?} not found"))?;
    let mut out = Vec::new();
    for l in &img.layers {
        let files = LayerFiles::of(root, &l.blob_digest)?;
        let (Some(source), Some(trace)) = (
            files.remote_blob(root)?,
            Trace::load(&root.path, &files.digest),
        ) else {
            continue;
        };
        let chunks = source.chunks_for_trace(&trace, &files.index()?, &files.span_map(root)?);
        out.push((source, chunks));
    }
    Ok(out)
}
