//! `pull`: a registry image through the import pipeline (the same code path as `import`, so
//! the recorded image and its indexes are identical): manifests and config first, then each
//! layer blob streamed into the content store (digest checked) and indexed from the same
//! stream as it downloads (`tee.rs`); the index is kept once the digest and diffID check.

use anyhow::Context as _;
use tracing::info_span;

use super::source::{Connect, RegistrySource};
use super::Reference;
use crate::image::Platform;
use crate::import::{import_source, Imported, Reporter};
use crate::root::Root;

pub fn pull(
    root: &mut Root,
    reference: &str,
    name: Option<&str>,
    platform: Option<&Platform>,
    connect: &Connect,
    reporter: &mut dyn Reporter,
) -> anyhow::Result<Imported> {
    let r = Reference::parse(reference)?;
    let _span = info_span!("pull", reference = %r).entered();
    let canonical = r.to_string();
    let name = name.unwrap_or(&canonical);
    let mut source = RegistrySource::connect(&r, connect, name)
        .with_context(|| format!("pulling {canonical}"))?;
    source.download_into(&root.path.clone(), &root.store.clone(), root.limits);
    let result = import_source(
        root,
        &source,
        Some(name),
        platform,
        name,
        reporter,
        &|blob| source.take_indexed(blob),
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
    images
        .pop()
        .with_context(|| format!("{canonical} resolved to no image"))
}
