//! `push`: an image of the store (imported, pulled or committed) to a registry: layer blobs
//! and config (HEAD first; POST + one monolithic PUT for what is missing), then the manifest
//! under the reference's tag. An image imported from a multi-platform index is pushed as its
//! one platform manifest (the other platforms' blobs are not in the store).

use anyhow::{bail, Context as _};
use serde::Serialize;
use tracing::info_span;

use super::source::Connect;
use super::Reference;
use crate::digest::Digest;
use crate::root::Root;

#[derive(Debug, Serialize)]
pub struct Pushed {
    pub reference: String,
    pub manifest: Digest,
    pub blobs_uploaded: usize,
    pub blobs_present: usize,
    pub bytes_uploaded: u64,
}

pub fn push(root: &Root, name: &str, reference: &str, connect: &Connect) -> anyhow::Result<Pushed> {
    let r = Reference::parse(reference)?;
    let _span = info_span!("push", image = name, reference = %r).entered();
    let img = root
        .meta
        .image(name)?
        .with_context(|| format!("image {name:?} not found"))?;
    let manifest = Digest::parse(&img.manifest_digest)?;
    if let Some(d) = &r.digest {
        if d != &manifest {
            bail!("{reference} names digest {d}, but image {name}'s manifest is {manifest}");
        }
    }
    let client = connect.origin(&r)?;
    let mut blobs: Vec<(Digest, u64)> = Vec::new();
    for l in &img.layers {
        blobs.push((Digest::parse(&l.blob_digest)?, l.size));
    }
    blobs.push((Digest::parse(&img.config_digest)?, img.config_size));
    let (mut uploaded, mut present, mut bytes) = (0, 0, 0);
    for (d, size) in &blobs {
        let path = root.store.blob_path(d);
        super::lazy::ensure_local(root, d)?;
        if !path.is_file() {
            bail!("blob {d} of image {name} is not in the content store");
        }
        if client
            .upload_blob(d, &path)
            .with_context(|| format!("pushing blob {d} to {r}"))?
        {
            uploaded += 1;
            bytes += size;
        } else {
            present += 1;
        }
    }
    let data = root.store.read_blob(&manifest)?;
    let tag = r.tag.clone().unwrap_or_else(|| manifest.to_string());
    let pushed = client
        .put_manifest(&tag, &data, &img.manifest_media_type)
        .with_context(|| format!("pushing the manifest of {name} to {r}"))?;
    Ok(Pushed {
        reference: r.to_string(),
        manifest: pushed,
        blobs_uploaded: uploaded,
        blobs_present: present,
        bytes_uploaded: bytes,
    })
}
