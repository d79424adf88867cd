//! The lazysnap index artifact: what a node needs to mount an image's layers before their
//! blobs are downloaded — per layer the tree index, the span map, the sha256 of every chunk
//! of the blob, and the access trace if one was recorded — pushed next to an unchanged image
//! as an OCI artifact whose `subject` is the image manifest (as SOCI does), found through the
//! referrers API or, on registries without it, the `sha256-<hex>` tag of the OCI 1.1 spec.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};
use tracing::{info_span, warn};

use super::client::Client;
use super::lazy::{chunk_hashes, remote_rel_path, RemoteInfo, CHUNK_SIZE};
use super::source::Connect;
use super::{Reference, RegistryError};
use crate::blob::SpanMap;
use crate::chunks::ChunkHash;
use crate::digest::Digest;
use crate::image::{LayerDesc, OCI_INDEX, OCI_MANIFEST};
use crate::index::LayerIndex;
use crate::meta::{BlobRow, LayerRow};
use crate::root::Root;
use crate::store::write_atomic;
use crate::trace::{Access, Trace};
use crate::unpack::{index_rel_path, spans_rel_path, Indexed};

/// Where the index of a TOC-laid-out blob lives (see [`LayerArtifact::toc`]).
pub fn toc_index_rel_path(blob: &Digest) -> String {
    format!("index/{}.tocindex", blob.hex())
}

pub const ARTIFACT_TYPE: &str = "application/vnd.lazysnap.index.v1";
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.lazysnap.layer-index.v1+postcard+zstd";
/// On each layer descriptor of the artifact: the image layer blob it indexes.
pub const LAYER_ANNOTATION: &str = "io.lazysnap.layer.digest";
const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY_JSON: &[u8] = b"{}";
const FORMAT_VERSION: u32 = 1;
/// Largest artifact blob accepted (decompressed too).
const MAX_BLOB: u64 = 512 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerArtifact {
    pub version: u32,
    pub blob: String,
    pub blob_size: u64,
    pub diff_id: String,
    pub index: Vec<u8>,
    pub spans: Vec<u8>,
    pub chunk_size: u64,
    pub chunk_hashes: Vec<ChunkHash>,
    pub trace: Vec<Access>,
    /// sha256 of each span's uncompressed bytes, where known (eStargz chunk digests).
    pub span_digests: Vec<Option<ChunkHash>>,
    /// The index and span map are laid out on the blob's gzip members (from an eStargz
    /// TOC), not on the tar stream: the index belongs to this blob alone.
    pub toc: bool,
}

impl LayerArtifact {
    /// The artifact of a locally indexed blob; `None` when its span map needs a local
    /// seekable copy (a single big zstd frame, an over-long deflate block): such a layer can
    /// only be read after it is downloaded.
    pub fn build(root: &Root, blob: &BlobRow) -> anyhow::Result<Option<Self>> {
        if blob.local_copy.is_some() {
            return Ok(None);
        }
        let files = crate::layer::LayerFiles::of(root, &blob.digest)?;
        let (digest, remote) = (&files.digest, &files.remote);
        let index = std::fs::read(&files.index_path)
            .with_context(|| format!("reading the index of {}", blob.diff_id))?;
        let path = root.store.blob_path(digest);
        let toc = remote.as_ref().is_some_and(|r| r.toc_index.is_some());
        let spans = if toc {
            std::fs::read(root.abs(&blob.spans_path))
                .with_context(|| format!("reading the span map of {}", blob.digest))?
        } else {
            match remote_span_map(&path, &blob.compression)
                .with_context(|| format!("mapping {} for remote reads", blob.digest))?
            {
                Some(map) => postcard::to_stdvec(&map)?,
                None => return Ok(None),
            }
        };
        let hashes = chunk_hashes(&path, CHUNK_SIZE)
            .with_context(|| format!("hashing {}", path.display()))?;
        Ok(Some(Self {
            version: FORMAT_VERSION,
            blob: blob.digest.clone(),
            blob_size: blob.size,
            diff_id: blob.diff_id.clone(),
            index,
            spans,
            chunk_size: CHUNK_SIZE,
            chunk_hashes: hashes,
            trace: Trace::load(&root.path, digest)
                .map(|t| t.files)
                .unwrap_or_default(),
            span_digests: remote
                .as_ref()
                .map(|r| r.span_digests.clone())
                .unwrap_or_default(),
            toc,
        }))
    }

    pub fn to_blob(&self) -> anyhow::Result<Vec<u8>> {
        let raw = postcard::to_stdvec(self)?;
        Ok(zstd::encode_all(&raw[..], 3)?)
    }

    pub fn from_blob(data: &[u8]) -> anyhow::Result<Self> {
        let mut raw = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(zstd::Decoder::new(data)?, MAX_BLOB + 1),
            &mut raw,
        )?;
        if raw.len() as u64 > MAX_BLOB {
            bail!("layer index artifact expands past {MAX_BLOB} bytes");
        }
        let a: LayerArtifact = postcard::from_bytes(&raw).context("malformed layer index")?;
        if a.version != FORMAT_VERSION {
            bail!(
                "layer index format {} (this lazysnap reads {FORMAT_VERSION})",
                a.version
            );
        }
        Ok(a)
    }

    /// Writes the index, span map and remote file of the layer `layer` under `root_path`
    /// after checking they fit the image's descriptor; the result is recorded like an index
    /// made from the blob.
    pub fn materialize(
        &self,
        root_path: &Path,
        layer: &LayerDesc,
        mut remote: RemoteInfo,
    ) -> anyhow::Result<Indexed> {
        let digest = &layer.desc.digest;
        if self.blob != digest.as_str() || self.blob_size != layer.desc.size {
            bail!(
                "the index artifact describes {} ({} bytes), not layer {digest} ({} bytes)",
                self.blob,
                self.blob_size,
                layer.desc.size
            );
        }
        let index_rel = if self.toc {
            toc_index_rel_path(digest)
        } else {
            index_rel_path(&layer.diff_id)
        };
        let index_abs = root_path.join(&index_rel);
        let index = LayerIndex::from_bytes(&self.index, &index_abs)?;
        if index.stats.diff_id != layer.diff_id.as_str() {
            bail!(
                "the index artifact of layer {digest} is for diffID {}, the image config says {}",
                index.stats.diff_id,
                layer.diff_id
            );
        }
        let map: SpanMap = postcard::from_bytes(&self.spans).context("malformed span map")?;
        map.validate(digest.as_str())?;
        if map.compressed_size != layer.desc.size || map.compression != layer.compression {
            bail!("the span map of the index artifact does not fit layer {digest}");
        }
        if map.has_local_copy() {
            bail!("the span map of layer {digest} needs a local copy; it cannot be read remotely");
        }
        if self.toc {
            remote.toc_index = Some(index_rel.clone());
            if self.span_digests.len() != map.span_count() {
                bail!(
                    "layer {digest}: {} span digests for {} spans",
                    self.span_digests.len(),
                    map.span_count()
                );
            }
        }
        remote.validate(digest)?;
        if self.toc || !index_abs.is_file() {
            write_atomic(&index_abs, &self.index)?;
        }
        let spans_rel = spans_rel_path(digest);
        write_atomic(&root_path.join(&spans_rel), &self.spans)?;
        let remote_rel = remote_rel_path(digest);
        write_atomic(&root_path.join(&remote_rel), &remote.to_bytes())?;
        if !self.trace.is_empty() && Trace::load(root_path, digest).is_none() {
            let t = Trace {
                files: self.trace.clone(),
                paths: Vec::new(),
            };
            if let Err(e) = t.save(root_path, digest) {
                warn!(error = %e, "could not keep the artifact's access trace");
            }
        }
        Ok(Indexed {
            layer: LayerRow {
                diff_id: index.stats.diff_id.clone(),
                uncompressed_size: index.stats.uncompressed_size,
                entries: index.stats.entries,
                index_path: index_rel,
            },
            blob: BlobRow {
                digest: digest.to_string(),
                diff_id: index.stats.diff_id.clone(),
                media_type: layer.desc.media_type.clone(),
                compression: crate::image::compression_name(layer.compression).to_string(),
                size: layer.desc.size,
                spans_path: spans_rel,
                local_copy: None,
                remote: Some(remote_rel),
            },
        })
    }
}

/// Uncompressed bytes per span in a pushed index: finer than a local index's, because over a
/// network a read costs the compressed bytes of every span it touches (gzip checkpoints are
/// 32 KiB each, so the artifact grows; it is fetched once).
pub const ARTIFACT_SPAN_SIZE: u64 = 1 << 20;

/// The span map remote reads use: one more pass over the local blob with
/// [`ARTIFACT_SPAN_SIZE`]; `None` when some span would still be far larger (a single-frame zstd
/// layer, an over-long deflate block: only readable after download).
fn remote_span_map(path: &Path, compression: &str) -> anyhow::Result<Option<SpanMap>> {
    let compression = crate::image::parse_compression(compression)
        .with_context(|| format!("unknown compression {compression}"))?;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut pass = crate::blob::IndexingReader::new(
        compression,
        std::io::BufReader::with_capacity(1 << 20, file),
        crate::blob::SpanOptions {
            span_size: ARTIFACT_SPAN_SIZE,
            local_copy: None,
            fine: None,
        },
    )?;
    std::io::copy(&mut pass, &mut std::io::sink())?;
    let map = pass.finish()?;
    if map.has_local_copy() || map.largest_span() > 16 * ARTIFACT_SPAN_SIZE {
        return Ok(None);
    }
    Ok(Some(map))
}

#[derive(Debug, Serialize)]
pub struct PushedIndex {
    pub reference: String,
    pub subject: Digest,
    pub artifact: Digest,
    pub layers_indexed: usize,
    /// Layers that can only be read after download (see [`LayerArtifact::build`]).
    pub layers_skipped: usize,
    pub bytes: u64,
}

/// `index push`: the artifact of a local image (the one `reference` names on the registry:
/// same manifest digest) pushed with the image manifest as its subject.
pub fn push_index(
    root: &Root,
    name: &str,
    reference: &str,
    connect: &Connect,
) -> anyhow::Result<PushedIndex> {
    let r = Reference::parse(reference)?;
    let _span = info_span!("index_push", image = name, reference = %r).entered();
    let img = root
        .meta
        .image(name)?
        .with_context(|| format!("image {name:?} not found (pull it first)"))?;
    let client = connect.origin(&r)?;
    let subject = client
        .get_manifest(&r.manifest_ref())
        .with_context(|| format!("reading the manifest of {r}"))?;
    let manifest_digest = Digest::parse(&img.manifest_digest)?;
    // The reference may name an index: the subject is this image's platform manifest.
    let (subject_digest, subject_type, subject_size) = if subject.digest == manifest_digest {
        (
            subject.digest,
            subject.media_type,
            subject.bytes.len() as u64,
        )
    } else {
        let m = client
            .get_manifest(manifest_digest.as_str())
            .with_context(|| {
                format!("{r} does not hold image {name}'s manifest {manifest_digest}")
            })?;
        (m.digest, m.media_type, m.bytes.len() as u64)
    };
    let mut layers = Vec::new();
    let (mut skipped, mut bytes) = (0, 0);
    for l in &img.layers {
        let blob = root
            .meta
            .blob(&l.blob_digest)?
            .with_context(|| format!("layer {} is not indexed", l.blob_digest))?;
        let Some(a) = LayerArtifact::build(root, &blob)? else {
            skipped += 1;
            continue;
        };
        let data = a.to_blob()?;
        let d = root.store.write_bytes(&data)?;
        client
            .upload_blob(&d, &root.store.blob_path(&d))
            .with_context(|| format!("pushing the index of layer {}", l.blob_digest))?;
        bytes += data.len() as u64;
        layers.push(serde_json::json!({
            "mediaType": LAYER_MEDIA_TYPE,
            "digest": d,
            "size": data.len(),
            "annotations": {LAYER_ANNOTATION: l.blob_digest},
        }));
    }
    let empty = root.store.write_bytes(EMPTY_JSON)?;
    client.upload_blob(&empty, &root.store.blob_path(&empty))?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_MEDIA_TYPE, "digest": empty, "size": EMPTY_JSON.len()},
        "layers": layers,
        "subject": {"mediaType": subject_type, "digest": subject_digest, "size": subject_size},
    });
    let bytes_m = serde_json::to_vec(&manifest)?;
    let artifact = Digest::sha256_of(&bytes_m);
    client
        .put_manifest(artifact.as_str(), &bytes_m, OCI_MANIFEST)
        .context("pushing the index artifact")?;
    add_to_referrers_tag(&client, &subject_digest, &artifact, bytes_m.len() as u64)?;
    Ok(PushedIndex {
        reference: r.to_string(),
        subject: subject_digest,
        artifact,
        layers_indexed: layers.len(),
        layers_skipped: skipped,
        bytes,
    })
}

/// The referrers tag schema (OCI distribution 1.1, for registries without the referrers
/// API): the index under tag `sha256-<hex>` lists the subject's referrers.
fn fallback_tag(subject: &Digest) -> String {
    format!("sha256-{}", subject.hex())
}

fn add_to_referrers_tag(
    client: &Client,
    subject: &Digest,
    artifact: &Digest,
    size: u64,
) -> anyhow::Result<()> {
    let tag = fallback_tag(subject);
    let mut manifests: Vec<serde_json::Value> = match client.get_manifest(&tag) {
        Ok(f) => serde_json::from_slice::<serde_json::Value>(&f.bytes)
            .ok()
            .and_then(|v| v.get("manifests").cloned())
            .and_then(|m| serde_json::from_value(m).ok())
            .unwrap_or_default(),
        Err(RegistryError::NotFound(_)) => Vec::new(),
        Err(e) => return Err(e).context("reading the referrers tag"),
    };
    // Older lazysnap indexes of the same image are replaced, other tools' referrers kept.
    manifests.retain(|m| m.get("artifactType").and_then(|t| t.as_str()) != Some(ARTIFACT_TYPE));
    manifests.push(serde_json::json!({
        "mediaType": OCI_MANIFEST,
        "digest": artifact,
        "size": size,
        "artifactType": ARTIFACT_TYPE,
    }));
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests,
    });
    client
        .put_manifest(&tag, &serde_json::to_vec(&index)?, OCI_INDEX)
        .context("updating the referrers tag")?;
    Ok(())
}

/// The lazysnap index artifact of `manifest`, if the registry has one: per image layer blob,
/// its layer artifact (each downloaded and digest checked).
pub fn discover(
    client: &Client,
    manifest: &Digest,
) -> Result<Option<HashMap<Digest, LayerArtifact>>, RegistryError> {
    let _span = info_span!("discover_index", manifest = %manifest).entered();
    let listing = match client.get_referrers(manifest, ARTIFACT_TYPE)? {
        Some(b) => b,
        None => match client.get_manifest(&fallback_tag(manifest)) {
            Ok(f) => f.bytes,
            Err(RegistryError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        },
    };
    #[derive(Deserialize)]
    struct Desc {
        digest: String,
        #[serde(rename = "artifactType", default)]
        artifact_type: Option<String>,
        #[serde(default)]
        annotations: HashMap<String, String>,
        #[serde(rename = "mediaType", default)]
        media_type: String,
    }
    #[derive(Deserialize)]
    struct List {
        #[serde(default)]
        manifests: Vec<Desc>,
    }
    #[derive(Deserialize)]
    struct Manifest {
        #[serde(rename = "artifactType", default)]
        artifact_type: Option<String>,
        #[serde(default)]
        layers: Vec<Desc>,
        subject: Option<Desc>,
    }
    let bad = |m: String| RegistryError::Invalid(format!("index artifact of {manifest}: {m}"));
    let list: List = serde_json::from_slice(&listing).map_err(|e| bad(e.to_string()))?;
    // The newest lazysnap artifact is listed last.
    let Some(found) = list
        .manifests
        .iter()
        .rev()
        .find(|m| m.artifact_type.as_deref() == Some(ARTIFACT_TYPE))
    else {
        return Ok(None);
    };
    let fetched = client.get_manifest(&found.digest)?;
    let m: Manifest = serde_json::from_slice(&fetched.bytes).map_err(|e| bad(e.to_string()))?;
    if m.artifact_type.as_deref() != Some(ARTIFACT_TYPE)
        || m.subject.as_ref().map(|s| s.digest.as_str()) != Some(manifest.as_str())
    {
        return Err(bad(
            "the artifact's type or subject is not this image".into()
        ));
    }
    let mut out = HashMap::new();
    for l in m.layers.iter().filter(|l| l.media_type == LAYER_MEDIA_TYPE) {
        let (Some(layer), Ok(d)) = (
            l.annotations
                .get(LAYER_ANNOTATION)
                .and_then(|s| Digest::parse(s).ok()),
            Digest::parse(&l.digest),
        ) else {
            continue;
        };
        let data = client.get_small_blob(&d, MAX_BLOB)?;
        match LayerArtifact::from_blob(&data) {
            Ok(a) if a.blob == layer.as_str() => {
                out.insert(layer, a);
            }
            Ok(_) => warn!(layer = %layer, "index artifact layer names another blob; ignored"),
            Err(e) => {
                warn!(layer = %layer, error = %e, "unreadable layer index; the layer is downloaded instead")
            }
        }
    }
    Ok(Some(out))
}
