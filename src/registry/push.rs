//! `push`: an image of the store (imported, pulled or committed) to a registry: layer blobs
//! and config (HEAD first; POST + one monolithic PUT for what is missing), then the manifest
//! under the reference's tag. An image imported from a multi-platform index is pushed as its
//! one platform manifest (the other platforms' blobs are not in the store).

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tracing::info_span;

use super::source::Connect;
use super::Reference;
use crate::blob::Compression;
use crate::digest::Digest;
use crate::root::Root;

#[derive(Debug, Serialize)]
pub struct Pushed {
    pub reference: String,
    pub manifest: Digest,
    pub blobs_uploaded: usize,
    pub blobs_present: usize,
    pub bytes_uploaded: u64,
    /// Layers re-compressed for the push.
    pub recompressed: usize,
}

/// Pushes image `name` to `reference`. With `compression`, layers in another compression are
/// re-compressed on the way (into locked temp files of the store's ingest directory, removed
/// once uploaded; see [`crate::recompress`]) and a rewritten manifest is pushed.
pub fn push(
    root: &Root,
    name: &str,
    reference: &str,
    connect: &Connect,
    compression: Option<Compression>,
) -> anyhow::Result<Pushed> {
    let r = Reference::parse(reference)?;
    let _span = info_span!("push", image = name, reference = %r).entered();
    let img = root
        .meta
        .image(name)?
        .with_context(|| format!("image {name:?} not found"))?;
    let stored_manifest = Digest::parse(&img.manifest_digest)?;
    let client = connect.origin(&r)?;
    let recompressed = match compression {
        Some(to) => crate::recompress::recompress_layers(
            &img.layers,
            to,
            |d| {
                super::lazy::ensure_local(root, d)?;
                Ok(root.store.blob_path(d))
            },
            || {
                Ok(crate::store::locked_tempfile(
                    tempfile::Builder::new().prefix("push."),
                    root.store.ingest_dir(),
                )?)
            },
        )?,
        None => img.layers.iter().map(|_| None).collect(),
    };
    // (digest, size, file to upload); the temp files live until the end of the push.
    let mut blobs: Vec<(Digest, u64, PathBuf)> = Vec::new();
    let mut temps = Vec::new();
    let mut new_layers = Vec::new();
    for (l, rc) in img.layers.iter().zip(recompressed) {
        match rc {
            Some((tmp, rc)) => {
                blobs.push((rc.digest.clone(), rc.size, tmp.path().to_path_buf()));
                temps.push(tmp);
                new_layers.push(Some(rc));
            }
            None => {
                let d = Digest::parse(&l.blob_digest)?;
                super::lazy::ensure_local(root, &d)?;
                let path = root.store.blob_path(&d);
                blobs.push((d, l.size, path));
                new_layers.push(None);
            }
        }
    }
    let config = Digest::parse(&img.config_digest)?;
    blobs.push((
        config.clone(),
        img.config_size,
        root.store.blob_path(&config),
    ));
    let (mut manifest, mut media_type) = (
        root.store.read_blob(&stored_manifest)?,
        img.manifest_media_type.clone(),
    );
    if new_layers.iter().any(Option::is_some) {
        manifest = crate::recompress::rewrite_manifest(&manifest, &new_layers)?;
        media_type = crate::image::OCI_MANIFEST.to_string();
    }
    let manifest_digest = Digest::sha256_from_bytes(Sha256::digest(&manifest).into());
    if let Some(d) = &r.digest {
        if d != &manifest_digest {
            bail!("{reference} names digest {d}, but image {name}'s manifest is {manifest_digest}");
        }
    }
    let (mut uploaded, mut present, mut bytes) = (0, 0, 0);
    for (d, size, path) in &blobs {
        if !path.is_file() {
            bail!("blob {d} of image {name} is not in the content store");
        }
        if client
            .upload_blob(d, path)
            .with_context(|| format!("pushing blob {d} to {r}"))?
        {
            uploaded += 1;
            bytes += size;
        } else {
            present += 1;
        }
    }
    drop(temps);
    let tag = r.tag.clone().unwrap_or_else(|| manifest_digest.to_string());
    let pushed = client
        .put_manifest(&tag, &manifest, &media_type)
        .with_context(|| format!("pushing the manifest of {name} to {r}"))?;
    Ok(Pushed {
        reference: r.to_string(),
        manifest: pushed,
        blobs_uploaded: uploaded,
        blobs_present: present,
        bytes_uploaded: bytes,
        recompressed: new_layers.iter().flatten().count(),
    })
}
