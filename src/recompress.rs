//! Re-compressing an image's layers on the way out (`export`/`push --compression`): each layer
//! blob not already in the wanted compression is decompressed and compressed again in one
//! streaming pass (gzip on every core, see [`crate::blob::encode`]), its uncompressed bytes
//! checked against the layer's diffID, which does not change; the manifest is rewritten with
//! the new digests, sizes and media types. Knows blobs and manifests, nothing of where the
//! result goes (a layout directory, a registry upload).

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::Path;

use anyhow::{bail, Context as _};
use sha2::{Digest as _, Sha256};
use tracing::info_span;

use crate::blob::encode::LayerEncoder;
use crate::blob::Compression;
use crate::digest::{Digest, HashWriter};
use crate::image::{layer_compression, layer_media_type, OCI_CONFIG, OCI_MANIFEST};
use crate::meta::ImageLayerRow;

/// A layer blob written again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recompressed {
    pub digest: Digest,
    pub size: u64,
    pub media_type: &'static str,
}

/// Whether a layer with media type `media_type` must be re-compressed to be `to`. Layers of
/// media types that are not plain layers (foreign, unknown) are left as they are.
pub fn needs_recompression(media_type: &str, to: Compression) -> bool {
    layer_compression(media_type).is_some_and(|c| c != to)
}

/// Decompresses the blob at `src` (its compression read from its first bytes) and writes it
/// compressed as `to` into `out`. Fails if the uncompressed bytes are not `diff_id`.
pub fn recompress_layer<W: Write>(
    src: &Path,
    to: Compression,
    diff_id: &Digest,
    out: W,
) -> anyhow::Result<(W, Recompressed)> {
    let _span = info_span!("recompress", blob = %src.display(), to = ?to).entered();
    let mut file = BufReader::with_capacity(
        1 << 20,
        File::open(src).with_context(|| format!("opening {}", src.display()))?,
    );
    let mut magic = [0u8; 4];
    let n = read_up_to(&mut file, &mut magic)?;
    let head = io::Cursor::new(magic[..n].to_vec()).chain(file);
    let from = Compression::sniff(&magic[..n]);
    let mut decoded: Box<dyn Read> = match from {
        Compression::None => Box::new(head),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(head)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(head)?),
    };
    let hashed = HashWriter::new(out);
    let mut enc = LayerEncoder::new(hashed, to, crate::blob::DEFAULT_SPAN_SIZE)?;
    let mut diff = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match decoded.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("decompressing {}", src.display()));
            }
        };
        diff.update(&buf[..n]);
        enc.write_all(&buf[..n])?;
    }
    let got = Digest::sha256_from_bytes(diff.finalize().into());
    if &got != diff_id {
        bail!(
            "{} decompresses to {got}, not its layer's diffID {diff_id}",
            src.display()
        );
    }
    let hashed = enc.finish()?;
    let (out, digest, size) = hashed.finish();
    Ok((
        out,
        Recompressed {
            digest,
            size,
            media_type: layer_media_type(to),
        },
    ))
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// `manifest` with the layers that were written again (`new[i]` for layer `i`) named by
/// their new digests, sizes and media types; their annotations (an eStargz TOC digest, a
/// SOCI or zstd:chunked position) described the old bytes and are dropped. A Docker
/// manifest becomes an OCI one (Docker's media types have no zstd); its config, the same
/// JSON, is then announced as an OCI config.
pub fn rewrite_manifest(manifest: &[u8], new: &[Option<Recompressed>]) -> anyhow::Result<Vec<u8>> {
    let mut m: serde_json::Value =
        serde_json::from_slice(manifest).context("parsing the image manifest")?;
    let layers = m
        .get_mut("layers")
        .and_then(|l| l.as_array_mut())
        .context("the manifest has no layers array")?;
    if layers.len() != new.len() {
        bail!(
            "the manifest has {} layers, the image {}",
            layers.len(),
            new.len()
        );
    }
    let mut changed = false;
    for (layer, r) in layers.iter_mut().zip(new) {
        let Some(r) = r else { continue };
        let obj = layer
            .as_object_mut()
            .context("a manifest layer is not an object")?;
        obj.insert("mediaType".into(), r.media_type.into());
        obj.insert("digest".into(), r.digest.to_string().into());
        obj.insert("size".into(), r.size.into());
        obj.remove("annotations");
        obj.remove("urls");
        changed = true;
    }
    if changed {
        m["mediaType"] = OCI_MANIFEST.into();
        if let Some(c) = m.get_mut("config").and_then(|c| c.as_object_mut()) {
            c.insert("mediaType".into(), OCI_CONFIG.into());
        }
    }
    Ok(serde_json::to_vec(&m)?)
}

/// The layers of an image re-compressed as `to` into sinks `make_sink` provides (one per
/// layer that needs it); `local_blob` gives a layer blob's path in the content store.
/// Returns, per layer, what it became (`None`: left as it was) and the sinks.
pub fn recompress_layers<W: Write>(
    layers: &[ImageLayerRow],
    to: Compression,
    mut local_blob: impl FnMut(&Digest) -> anyhow::Result<std::path::PathBuf>,
    mut make_sink: impl FnMut() -> anyhow::Result<W>,
) -> anyhow::Result<Vec<Option<(W, Recompressed)>>> {
    let mut out = Vec::with_capacity(layers.len());
    for l in layers {
        if !needs_recompression(&l.media_type, to) {
            out.push(None);
            continue;
        }
        let digest = Digest::parse(&l.blob_digest)?;
        let diff_id = Digest::parse(&l.diff_id)?;
        let src = local_blob(&digest)?;
        let (sink, r) = recompress_layer(&src, to, &diff_id, make_sink()?)
            .with_context(|| format!("re-compressing layer {digest}"))?;
        out.push(Some((sink, r)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn compress(data: &[u8], c: Compression) -> Vec<u8> {
        let mut e = LayerEncoder::new(Vec::new(), c, 1 << 16).unwrap();
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn every_compression_to_every_other_keeps_the_diff_id() {
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let tar = tar_of(&[("a", b"hello"), ("big", &big)]);
        let diff = Digest::sha256_from_bytes(Sha256::digest(&tar).into());
        let dir = tempfile::tempdir().unwrap();
        for from in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let src = dir.path().join("src");
            std::fs::write(&src, compress(&tar, from)).unwrap();
            for to in [Compression::None, Compression::Gzip, Compression::Zstd] {
                let (out, r) = recompress_layer(&src, to, &diff, Vec::new()).unwrap();
                assert_eq!(r.size, out.len() as u64);
                assert_eq!(
                    r.digest,
                    Digest::sha256_from_bytes(Sha256::digest(&out).into())
                );
                assert_eq!(Compression::sniff(&out), to, "{from:?} -> {to:?}");
                let back = dir.path().join("back");
                std::fs::write(&back, &out).unwrap();
                let (plain, _) =
                    recompress_layer(&back, Compression::None, &diff, Vec::new()).unwrap();
                assert_eq!(plain, tar, "{from:?} -> {to:?}");
            }
        }
        // Bytes that are not the layer are refused.
        let other = Digest::sha256_from_bytes(Sha256::digest(b"other").into());
        let src = dir.path().join("src");
        let err = recompress_layer(&src, Compression::Gzip, &other, Vec::new()).unwrap_err();
        assert!(
            format!("{err:#}").contains("not its layer's diffID"),
            "{err:#}"
        );
    }

    #[test]
    fn the_manifest_names_the_new_blobs() {
        let old = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": crate::image::DOCKER_MANIFEST,
            "config": {"mediaType": crate::image::DOCKER_CONFIG, "digest": "sha256:c", "size": 1},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd", "digest": "sha256:a",
                 "size": 10, "annotations": {"containerd.io/snapshot/stargz/toc.digest": "x"}},
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:b",
                 "size": 20},
            ],
            "annotations": {"keep": "me"},
        });
        let d = Digest::sha256_from_bytes(Sha256::digest(b"new").into());
        let new = vec![
            Some(Recompressed {
                digest: d.clone(),
                size: 7,
                media_type: layer_media_type(Compression::Gzip),
            }),
            None,
        ];
        let m: serde_json::Value = serde_json::from_slice(
            &rewrite_manifest(&serde_json::to_vec(&old).unwrap(), &new).unwrap(),
        )
        .unwrap();
        assert_eq!(m["mediaType"], OCI_MANIFEST);
        assert_eq!(m["config"]["mediaType"], OCI_CONFIG);
        assert_eq!(m["config"]["digest"], "sha256:c");
        assert_eq!(m["layers"][0]["digest"], d.to_string());
        assert_eq!(m["layers"][0]["size"], 7);
        assert_eq!(
            m["layers"][0]["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        assert!(m["layers"][0].get("annotations").is_none());
        assert_eq!(m["layers"][1], old["layers"][1]);
        assert_eq!(m["annotations"]["keep"], "me");
        assert!(rewrite_manifest(&serde_json::to_vec(&old).unwrap(), &new[..1]).is_err());
    }
}
