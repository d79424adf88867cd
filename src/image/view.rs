//! The `Image` interface's view of an imported image (Name, Target, RootFS, Size, Config) plus
//! its chain, as `inspect` prints it.

use anyhow::Context as _;
use serde::Serialize;

use super::Desc;
use crate::digest::Digest;
use crate::root::Root;

#[derive(Debug, Serialize)]
pub struct ChainLevel {
    pub chain_id: String,
    pub parent: Option<String>,
    pub diff_id: String,
    pub blob: String,
    pub media_type: String,
    pub compression: String,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub entries: u64,
    pub index: String,
    /// How a read enters the blob: gzip checkpoints, zstd frames, zstd resume points, or a
    /// local seekable copy (re-compressed: regions with no way in), with its span count.
    pub random_access: String,
    /// Local bytes kept beside the blob for that (resume-point dictionaries or the copy).
    pub local_copy_size: u64,
}

/// `random_access` and `local_copy_size` of a blob.
fn random_access(root: &Root, blob: &crate::meta::BlobRow) -> (String, u64) {
    let local = blob
        .local_copy
        .as_deref()
        .and_then(|p| std::fs::metadata(root.abs(p)).ok())
        .map_or(0, |m| m.len());
    let Ok(map) = crate::blob::SpanMap::load(&root.abs(&blob.spans_path)) else {
        return ("span map missing".into(), local);
    };
    let spans = map.span_count();
    let how = if map.copied_spans() > 0 {
        format!(
            "local seekable copy for {} of {spans} spans (a zstd window past 8 MiB or over-long deflate blocks)",
            map.copied_spans()
        )
    } else if map.resume_points() > 0 {
        format!(
            "zstd resume points: {} in {spans} spans",
            map.resume_points()
        )
    } else {
        match map.compression {
            crate::blob::Compression::Gzip => format!("gzip checkpoints: {spans} spans"),
            crate::blob::Compression::Zstd => format!("zstd frames: {spans} spans"),
            crate::blob::Compression::None => "uncompressed".into(),
        }
    };
    (how, local)
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageView {
    pub name: String,
    pub target: Desc,
    /// The manifest chosen for the platform.
    pub manifest: Desc,
    pub platform: String,
    #[serde(rename = "RootFS")]
    pub rootfs: Vec<String>,
    /// Bytes of all blobs the image references (as containerd's Image.Size).
    pub size: u64,
    pub uncompressed_size: u64,
    pub config: Desc,
    /// The committed snapshot of the top chain.
    pub snapshot: Option<String>,
    pub chain: Vec<ChainLevel>,
}

pub fn image_view(root: &Root, name: &str) -> anyhow::Result<ImageView> {
    let img = root
        .meta
        .image(name)?
        .with_context(|| format!("image {name:?} not found"))?;
    let mut size = 0;
    for b in &img.blobs {
        let d = Digest::parse(b)?;
        // A lazily pulled layer counts with the size its descriptor gives, as containerd's.
        let recorded = img
            .layers
            .iter()
            .find(|l| &l.blob_digest == b)
            .map(|l| l.size);
        size += std::fs::metadata(root.store.blob_path(&d))
            .map(|m| m.len())
            .ok()
            .or(recorded)
            .unwrap_or(0);
    }
    let mut chain = Vec::new();
    let mut uncompressed = 0;
    if let Some(top) = &img.chain_id {
        for c in root.meta.chain_stack(top)? {
            let blob = root
                .meta
                .blob(&c.blob_digest)?
                .with_context(|| format!("blob {} not recorded", c.blob_digest))?;
            let layer = root
                .meta
                .layer(&c.diff_id)?
                .with_context(|| format!("layer {} not recorded", c.diff_id))?;
            uncompressed += layer.uncompressed_size;
            let (random_access, local_copy_size) = random_access(root, &blob);
            chain.push(ChainLevel {
                chain_id: c.chain_id,
                parent: c.parent,
                diff_id: c.diff_id,
                blob: c.blob_digest,
                media_type: blob.media_type,
                compression: blob.compression,
                compressed_size: blob.size,
                uncompressed_size: layer.uncompressed_size,
                entries: layer.entries,
                index: layer.index_path,
                random_access,
                local_copy_size,
            });
        }
    }
    Ok(ImageView {
        name: img.name,
        target: Desc {
            media_type: img.target_media_type,
            digest: Digest::parse(&img.target_digest)?,
            size: img.target_size,
        },
        manifest: Desc {
            media_type: img.manifest_media_type,
            digest: Digest::parse(&img.manifest_digest)?,
            size: img.manifest_size,
        },
        platform: img.platform,
        rootfs: img.layers.iter().map(|l| l.diff_id.clone()).collect(),
        size,
        uncompressed_size: uncompressed,
        config: Desc {
            media_type: img.config_media_type,
            digest: Digest::parse(&img.config_digest)?,
            size: img.config_size,
        },
        snapshot: img.chain_id,
        chain,
    })
}
