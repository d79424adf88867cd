//! Export: an image, or a committed snapshot's chain, as an OCI image layout directory or an
//! OCI archive (a tar of the layout) that `lazysnap import`, umoci and skopeo read.

use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context as _};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use tracing::info_span;

use crate::blob::Compression;
use crate::digest::Digest;
use crate::image::{Desc, OCI_CONFIG, OCI_MANIFEST};
use crate::meta::{ImageLayerRow, ImageRow};
use crate::root::Root;

/// An image built for a chain: its manifest and config are in the content store.
pub struct BuiltImage {
    pub manifest: Desc,
    pub config: Desc,
    pub layers: Vec<ImageLayerRow>,
    pub platform: String,
}

/// Writes config + manifest blobs for the layer chain `chain_id`. The config starts from the
/// config of the image the chain grew from (so Env, Cmd… carry over), else a minimal one.
pub fn build_image_for_chain(root: &Root, chain_id: &str) -> anyhow::Result<BuiltImage> {
    let chain = root.meta.chain_stack(chain_id)?;
    let mut layers = Vec::new();
    for c in &chain {
        let blob = root
            .meta
            .blob(&c.blob_digest)?
            .with_context(|| format!("blob {} not recorded", c.blob_digest))?;
        layers.push(ImageLayerRow {
            blob_digest: blob.digest,
            media_type: blob.media_type,
            size: blob.size,
            diff_id: c.diff_id.clone(),
        });
    }
    // The deepest image whose chain is a prefix of ours.
    let mut base: Option<ImageRow> = None;
    for name in root.meta.image_names()? {
        if let Some(img) = root.meta.image(&name)? {
            if let Some(ic) = &img.chain_id {
                if let Some(pos) = chain.iter().position(|c| &c.chain_id == ic) {
                    if base.as_ref().is_none_or(|b| b.layers.len() < pos + 1) {
                        base = Some(img);
                    }
                }
            }
        }
    }
    let host = crate::image::Platform::host();
    let mut config: serde_json::Value = match &base {
        Some(img) => {
            let data = root.store.read_blob(&Digest::parse(&img.config_digest)?)?;
            serde_json::from_slice(&data).context("parsing the base image's config")?
        }
        None => json!({"architecture": host.arch, "os": host.os, "config": {}}),
    };
    let base_layers = base.as_ref().map_or(0, |b| b.layers.len());
    let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
    config["rootfs"] = json!({"type": "layers", "diff_ids": diff_ids});
    let now = chrono_like_now();
    let history = config
        .get("history")
        .and_then(|h| h.as_array())
        .cloned()
        .unwrap_or_default();
    let mut history = history;
    for _ in base_layers..layers.len() {
        history.push(json!({"created": now, "created_by": "lazysnap commit"}));
    }
    config["history"] = serde_json::Value::Array(history);
    config["created"] = json!(now);
    let platform = format!(
        "{}/{}",
        config["os"].as_str().unwrap_or("linux"),
        config["architecture"].as_str().unwrap_or("amd64")
    );
    let config_bytes = serde_json::to_vec(&config)?;
    let config_digest = root.store.write_bytes(&config_bytes)?;
    let config_desc = Desc {
        media_type: OCI_CONFIG.to_string(),
        digest: config_digest,
        size: config_bytes.len() as u64,
    };
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_desc,
        "layers": layers.iter().map(|l| json!({
            "mediaType": l.media_type, "digest": l.blob_digest, "size": l.size
        })).collect::<Vec<_>>(),
    });
    let manifest_bytes = serde_json::to_vec(&manifest)?;
    let manifest_digest = root.store.write_bytes(&manifest_bytes)?;
    Ok(BuiltImage {
        manifest: Desc {
            media_type: OCI_MANIFEST.to_string(),
            digest: manifest_digest,
            size: manifest_bytes.len() as u64,
        },
        config: config_desc,
        layers,
        platform,
    })
}

/// Records image `name` for the layer chain `chain_id` (manifest and config written by
/// [`build_image_for_chain`]), as import records the images it reads.
pub fn record_image(root: &mut Root, name: &str, chain_id: &str) -> anyhow::Result<()> {
    let built = build_image_for_chain(root, chain_id)?;
    let mut blobs: Vec<String> = built.layers.iter().map(|l| l.blob_digest.clone()).collect();
    blobs.push(built.manifest.digest.to_string());
    blobs.push(built.config.digest.to_string());
    root.meta.put_image(&ImageRow {
        name: name.to_string(),
        target_digest: built.manifest.digest.to_string(),
        target_media_type: built.manifest.media_type.clone(),
        target_size: built.manifest.size,
        manifest_digest: built.manifest.digest.to_string(),
        manifest_media_type: built.manifest.media_type.clone(),
        manifest_size: built.manifest.size,
        config_digest: built.config.digest.to_string(),
        config_media_type: built.config.media_type,
        config_size: built.config.size,
        platform: built.platform,
        chain_id: Some(chain_id.to_string()),
        created_at: crate::meta::now_unix(),
        layers: built.layers,
        blobs,
    })?;
    Ok(())
}

/// RFC 3339 UTC time of now, without a date crate.
fn chrono_like_now() -> String {
    let secs = crate::meta::now_unix();
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// What [`export`] wrote.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Exported {
    pub manifest: String,
    /// Layer compressions in the output, bottom first.
    pub layers: Vec<&'static str>,
    /// Layers written again in another compression, and their new size.
    pub recompressed: usize,
    pub recompressed_bytes: u64,
}

/// Exports image or committed snapshot `name` to `out` (a directory, or `*.tar` for an OCI
/// archive). The reference name inside is `tag` (default: the part after the last `:`).
/// With `compression`, layers in another one are re-compressed on the way out (see
/// [`crate::recompress`]); without it the blobs are exported as stored.
pub fn export(
    root: &Root,
    name: &str,
    out: &Path,
    compression: Option<Compression>,
) -> anyhow::Result<Exported> {
    let _span = info_span!("export", image = name, out = %out.display()).entered();
    let (manifest, config, layers) = if let Some(img) = root.meta.image(name)? {
        (
            Desc {
                media_type: img.manifest_media_type.clone(),
                digest: Digest::parse(&img.manifest_digest)?,
                size: img.manifest_size,
            },
            Digest::parse(&img.config_digest)?,
            img.layers,
        )
    } else if let Some(snap) = root.meta.snapshot(name)? {
        if snap.kind != "committed" {
            bail!(
                "snapshot {name} is {}: only committed snapshots can be exported",
                snap.kind
            );
        }
        let chain = snap
            .chain_id
            .with_context(|| format!("snapshot {name} has no layers"))?;
        let built = build_image_for_chain(root, &chain)?;
        (built.manifest, built.config.digest, built.layers)
    } else {
        bail!("no image or committed snapshot named {name:?}");
    };
    let tag = name.rsplit_once(':').map_or(name, |(_, t)| t);
    let tag = if tag.contains('/') { "latest" } else { tag };
    let is_archive = out.extension().is_some_and(|e| e == "tar");
    let layout = if is_archive {
        tempfile::Builder::new()
            .prefix(".lazysnap-export-")
            .tempdir_in(
                out.parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new(".")),
            )?
            .keep()
    } else {
        out.to_path_buf()
    };
    let result = write_layout(
        root,
        &layout,
        &Outgoing {
            manifest,
            config,
            layers,
            compression,
        },
        name,
        tag,
    );
    if is_archive {
        let r = result.and_then(|e| tar_dir(&layout, out).map(|()| e));
        let _ = fs::remove_dir_all(&layout);
        r
    } else {
        result
    }
}

/// The image as it is in the store, and the compression wanted outside.
struct Outgoing {
    manifest: Desc,
    config: Digest,
    layers: Vec<ImageLayerRow>,
    compression: Option<Compression>,
}

fn write_layout(
    root: &Root,
    dir: &Path,
    image: &Outgoing,
    name: &str,
    tag: &str,
) -> anyhow::Result<Exported> {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
    let link_from_store = |d: &Digest| -> anyhow::Result<()> {
        let dst = blobs.join(d.hex());
        if dst.exists() {
            return Ok(());
        }
        crate::registry::lazy::ensure_local(root, d)?;
        let src = root.store.blob_path(d);
        // A hardlink when on the same filesystem, else a copy.
        if fs::hard_link(&src, &dst).is_err() {
            fs::copy(&src, &dst).with_context(|| format!("copying blob {d}"))?;
        }
        Ok(())
    };
    let recompressed = match image.compression {
        Some(to) => crate::recompress::recompress_layers(
            &image.layers,
            to,
            |d| {
                crate::registry::lazy::ensure_local(root, d)?;
                Ok(root.store.blob_path(d))
            },
            || {
                Ok(tempfile::Builder::new()
                    .prefix(".tmp-")
                    .tempfile_in(&blobs)?)
            },
        )?,
        None => image.layers.iter().map(|_| None).collect(),
    };
    let mut exported = Exported::default();
    let mut new_layers = Vec::new();
    for (l, r) in image.layers.iter().zip(recompressed) {
        match r {
            Some((tmp, r)) => {
                tmp.as_file().sync_all()?;
                tmp.persist(blobs.join(r.digest.hex()))
                    .with_context(|| format!("writing blob {}", r.digest))?;
                exported.recompressed += 1;
                exported.recompressed_bytes += r.size;
                exported.layers.push(compression_of(r.media_type));
                new_layers.push(Some(r));
            }
            None => {
                link_from_store(&Digest::parse(&l.blob_digest)?)?;
                exported.layers.push(compression_of(&l.media_type));
                new_layers.push(None);
            }
        }
    }
    link_from_store(&image.config)?;
    let manifest = if new_layers.iter().any(Option::is_some) {
        let old = root.store.read_blob(&image.manifest.digest)?;
        let bytes = crate::recompress::rewrite_manifest(&old, &new_layers)?;
        let digest = Digest::sha256_from_bytes(Sha256::digest(&bytes).into());
        fs::write(blobs.join(digest.hex()), &bytes)?;
        Desc {
            media_type: OCI_MANIFEST.to_string(),
            digest,
            size: bytes.len() as u64,
        }
    } else {
        link_from_store(&image.manifest.digest)?;
        image.manifest.clone()
    };
    exported.manifest = manifest.digest.to_string();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": manifest.media_type,
            "digest": manifest.digest,
            "size": manifest.size,
            "annotations": {
                "org.opencontainers.image.ref.name": tag,
                "io.containerd.image.name": name,
            }
        }]
    });
    let mut f = fs::File::create(dir.join("index.json"))?;
    f.write_all(&serde_json::to_vec_pretty(&index)?)?;
    f.sync_all()?;
    Ok(exported)
}

fn compression_of(media_type: &str) -> &'static str {
    crate::image::layer_compression(media_type).map_or("other", crate::image::compression_name)
}

fn tar_dir(dir: &Path, out: &Path) -> anyhow::Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix(".lazysnap-export-")
        .tempfile_in(
            out.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new(".")),
        )?;
    let mut b = tar::Builder::new(tmp);
    b.follow_symlinks(false);
    b.append_dir_all(".", dir)?;
    let tmp = b.into_inner()?;
    tmp.as_file().sync_all()?;
    tmp.persist(out)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}
