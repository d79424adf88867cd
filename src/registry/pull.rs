//! `pull`: a registry image through the import pipeline (the same code path as `import`, so
//! the recorded image and its indexes are identical): manifests and config first, then each
//! layer blob streamed into the content store (digest checked), then indexed.

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
    let source = RegistrySource::connect(&r, connect, name)
        .with_context(|| format!("pulling {canonical}"))?;
    let mut images = import_source(root, &source, Some(name), platform, name, reporter)
        .with_context(|| format!("pulling {canonical}"))?;
    images
        .pop()
        .with_context(|| format!("{canonical} resolved to no image"))
}
