//! `import`: image source → content store → unpack (index) → metadata. A failed import takes
//! back what it added, so the store is as it was.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context as _;
use serde::Serialize;
use tracing::info_span;

use crate::digest::Digest;
use crate::image::resolve::{IngestProgress, Ingested};
use crate::image::source::{open_source, ImageSource};
use crate::image::{resolve_images, Desc, ImageError, LayerDesc, Platform, ResolvedImage};
use crate::meta::{ImageLayerRow, ImageRow};
use crate::root::Root;
use crate::unpack::{unpack, unpack_with, Indexed, Limits, PreIndexed, UnpackProgress};

/// Progress reporting for a whole import (the CLI draws bars; tests pass a no-op).
pub trait Reporter: IngestProgress {
    /// Indexing starts for `layers` layers of `bytes` compressed bytes; returns the counters
    /// the unpack step advances.
    fn start_unpack(&mut self, layers: u64, bytes: u64) -> Arc<UnpackProgress>;
    fn finish_unpack(&mut self);
}

pub struct NoProgress;
impl IngestProgress for NoProgress {
    fn start_blob(&mut self, _: u64) {}
    fn bytes(&mut self, _: u64) {}
}
impl Reporter for NoProgress {
    fn start_unpack(&mut self, _: u64, _: u64) -> Arc<UnpackProgress> {
        Arc::new(UnpackProgress::default())
    }
    fn finish_unpack(&mut self) {}
}

#[derive(Debug, Clone, Serialize)]
pub struct Imported {
    pub name: String,
    pub manifest: Digest,
    pub chain_id: Option<Digest>,
    pub layers: usize,
}

pub fn import(
    root: &mut Root,
    path: &Path,
    name: Option<&str>,
    platform: Option<&Platform>,
    reporter: &mut dyn Reporter,
) -> anyhow::Result<Vec<Imported>> {
    let _span = info_span!("import", path = %path.display()).entered();
    let source = open_source(path)?;
    let default_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .map(|n| {
            n.trim_end_matches(".tar")
                .trim_end_matches(".oci")
                .to_string()
        })
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "image".to_string());
    let source = IndexWhileCopying {
        inner: source.as_ref(),
        root: root.path.clone(),
        limits: root.limits,
        indexing: RefCell::default(),
    };
    let result = import_source(
        root,
        &source,
        name,
        platform,
        &default_name,
        reporter,
        &|layer| source.take(layer),
    );
    // Indexers of a failed import may still be writing: wait, then drop what they wrote.
    source.finish();
    if result.is_err() {
        let _ = crate::gc::remove_unreferenced_index_files(root);
    }
    result
}

/// A local source whose layer blobs are indexed from the same bytes as they are copied into
/// the store, as a pull does: one read of each blob, and the copy (with its digest) overlaps
/// the index. `unpack_with` takes the result once the store checked the blob and the diffID
/// matches the config.
struct IndexWhileCopying<'a> {
    inner: &'a dyn ImageSource,
    root: PathBuf,
    limits: Limits,
    indexing: RefCell<HashMap<Digest, JoinHandle<anyhow::Result<Indexed>>>>,
}

impl IndexWhileCopying<'_> {
    fn take(&self, layer: &LayerDesc) -> Option<anyhow::Result<Indexed>> {
        let h = self.indexing.borrow_mut().remove(&layer.desc.digest)?;
        Some(h.join().unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "indexing thread of {} panicked",
                layer.desc.digest
            ))
        }))
    }

    fn finish(&self) {
        let handles: Vec<_> = self.indexing.borrow_mut().drain().collect();
        for (_, h) in handles {
            let _ = h.join();
        }
    }
}

impl ImageSource for IndexWhileCopying<'_> {
    fn open(&self, path: &str) -> Result<(Box<dyn Read + '_>, u64), ImageError> {
        self.inner.open(path)
    }

    fn exists(&self, path: &str) -> bool {
        self.inner.exists(path)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn is_remote(&self, digest: &Digest) -> bool {
        self.inner.is_remote(digest)
    }

    fn open_layer(&self, layer: &LayerDesc) -> Result<(Box<dyn Read + '_>, u64), ImageError> {
        let (reader, size) = self.inner.open_layer(layer)?;
        let (tee, handle) =
            crate::tee::tee_index(reader, self.root.clone(), layer.clone(), self.limits);
        if let Some(old) = self
            .indexing
            .borrow_mut()
            .insert(layer.desc.digest.clone(), handle)
        {
            let _ = old.join();
        }
        Ok((Box::new(tee), size))
    }
}

/// Imports the images of any [`ImageSource`] (a layout, an archive, a registry): every blob
/// into the store (verified), every layer indexed, every image recorded; on failure the store
/// is left as it was.
pub fn import_source(
    root: &mut Root,
    source: &dyn ImageSource,
    name: Option<&str>,
    platform: Option<&Platform>,
    default_name: &str,
    reporter: &mut dyn Reporter,
    pre_indexed: &PreIndexed<'_>,
) -> anyhow::Result<Vec<Imported>> {
    let writing = root.writer_lock()?;
    let mut ingested = Ingested::default();
    let result = (|| {
        let images = resolve_images(
            source,
            &root.store,
            name,
            platform,
            default_name,
            &mut ingested,
            reporter,
        )?;
        let mut out = Vec::new();
        for img in &images {
            out.push(unpack_and_record(root, img, reporter, pre_indexed)?);
        }
        anyhow::Ok(out)
    })();
    if result.is_err() {
        drop(writing);
        cleanup_after_failure(root, &ingested.added);
    }
    result
}

fn unpack_and_record(
    root: &mut Root,
    img: &ResolvedImage,
    reporter: &mut dyn Reporter,
    pre_indexed: &PreIndexed<'_>,
) -> anyhow::Result<Imported> {
    let bytes = img.layers.iter().map(|l| l.desc.size).sum();
    let progress = reporter.start_unpack(img.layers.len() as u64, bytes);
    let chain = unpack_with(root, &img.layers, progress, pre_indexed)
        .with_context(|| format!("unpacking {}", img.name));
    reporter.finish_unpack();
    let chain = chain?;
    let row = ImageRow {
        name: img.name.clone(),
        target_digest: img.target.digest.to_string(),
        target_media_type: img.target.media_type.clone(),
        target_size: img.target.size,
        manifest_digest: img.manifest.digest.to_string(),
        manifest_media_type: img.manifest.media_type.clone(),
        manifest_size: img.manifest.size,
        config_digest: img.config.digest.to_string(),
        config_media_type: img.config.media_type.clone(),
        config_size: img.config.size,
        platform: img.platform.to_string(),
        chain_id: chain.as_ref().map(|c| c.to_string()),
        created_at: crate::meta::now_unix(),
        layers: img
            .layers
            .iter()
            .map(|l| ImageLayerRow {
                blob_digest: l.desc.digest.to_string(),
                media_type: l.desc.media_type.clone(),
                size: l.desc.size,
                diff_id: l.diff_id.to_string(),
            })
            .collect(),
        blobs: img.blobs.iter().map(|d| d.to_string()).collect(),
    };
    root.meta.put_image(&row)?;
    Ok(Imported {
        name: img.name.clone(),
        manifest: img.manifest.digest.clone(),
        chain_id: chain,
        layers: img.layers.len(),
    })
}

/// Re-runs unpack for an imported image (e.g. after its indexes were removed).
pub fn unpack_image(
    root: &mut Root,
    name: &str,
    reporter: &mut dyn Reporter,
) -> anyhow::Result<Imported> {
    let _writing = root.writer_lock()?;
    let img = root
        .meta
        .image(name)?
        .with_context(|| format!("image {name:?} not found"))?;
    let layers = img
        .layers
        .iter()
        .map(|l| {
            let compression = crate::image::layer_compression(&l.media_type)
                .with_context(|| format!("unknown media type {}", l.media_type))?;
            Ok(LayerDesc {
                desc: Desc {
                    media_type: l.media_type.clone(),
                    digest: Digest::parse(&l.blob_digest)?,
                    size: l.size,
                },
                compression,
                diff_id: Digest::parse(&l.diff_id)?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for l in &layers {
        crate::registry::lazy::ensure_local(root, &l.desc.digest)?;
        if !root.store.contains(&l.desc.digest) {
            anyhow::bail!(
                "layer blob {} of {name} is missing from the content store",
                l.desc.digest
            );
        }
    }
    let bytes = layers.iter().map(|l| l.desc.size).sum();
    let progress = reporter.start_unpack(layers.len() as u64, bytes);
    let chain = unpack(root, &layers, progress);
    reporter.finish_unpack();
    let chain = chain?;
    if let Some(c) = &chain {
        root.meta.set_image_chain(name, c.as_str())?;
    }
    Ok(Imported {
        name: name.to_string(),
        manifest: Digest::parse(&img.manifest_digest)?,
        chain_id: chain,
        layers: layers.len(),
    })
}

/// Removes the blobs this import added that nothing recorded references, and index files the
/// metadata does not know. Best effort: what stays behind is garbage `gc` removes.
fn cleanup_after_failure(root: &mut Root, added: &[Digest]) {
    // Exclusive: a concurrent import may be about to record the same blobs.
    let Ok(_lock) = root.gc_lock() else {
        return;
    };
    // If what is referenced cannot be read, keep everything rather than guess.
    if let Ok(referenced) = root.meta.referenced_blobs() {
        for d in added.iter().filter(|d| !referenced.contains(d.as_str())) {
            let _ = root.store.remove(d);
        }
    }
    let _ = crate::gc::remove_unreferenced_index_files(root);
    let _ = root.store.clean_ingest();
}
