//! Reads the images of a source into the content store (every blob verified) and resolves each
//! to one manifest for the wanted platform, its config and its layers.

use std::io::Read;

use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use serde::{Deserialize, Serialize};

use super::platform::Platform;
use super::source::ImageSource;
use super::{
    digest_of, json_err, layer_compression, ImageError, DOCKER_CONFIG, DOCKER_LAYER,
    DOCKER_LAYER_GZIP, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST,
};
use crate::blob::Compression;
use crate::digest::Digest;
use crate::store::ContentStore;

/// A content descriptor, as containerd's `ocispec.Descriptor` (the fields we keep).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desc {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDesc {
    pub desc: Desc,
    pub compression: Compression,
    pub diff_id: Digest,
}

/// One image read from a source, ready to unpack.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub name: String,
    /// The top-level descriptor (an index or a manifest).
    pub target: Desc,
    pub manifest: Desc,
    pub config: Desc,
    pub platform: Platform,
    pub layers: Vec<LayerDesc>,
    /// Every blob the image references.
    pub blobs: Vec<Digest>,
}

/// Progress callbacks while blobs are copied.
pub trait IngestProgress {
    fn start_blob(&mut self, size: u64);
    fn bytes(&mut self, done: u64);
}

/// Remembers the blobs an import added, so a failed import can take them back out.
#[derive(Default)]
pub struct Ingested {
    pub added: Vec<Digest>,
}

struct Ctx<'a> {
    source: &'a dyn ImageSource,
    platform: Option<&'a Platform>,
    store: &'a ContentStore,
    ingested: &'a mut Ingested,
    progress: &'a mut dyn IngestProgress,
}

impl Ctx<'_> {
    /// Copies blob `digest` from the layout's `blobs/` into the store, verified.
    fn ingest(&mut self, desc: &Desc) -> Result<(), ImageError> {
        let path = format!("blobs/sha256/{}", desc.digest.hex());
        self.ingest_from(desc, |s| s.open(&path))
    }

    /// As [`Ctx::ingest`], for a layer (which the source may index as it is read).
    fn ingest_layer(&mut self, layer: &LayerDesc) -> Result<(), ImageError> {
        self.ingest_from(&layer.desc, |s| s.open_layer(layer))
    }

    fn ingest_from<'s>(
        &mut self,
        desc: &Desc,
        open: impl FnOnce(&'s dyn ImageSource) -> Result<(Box<dyn Read + 's>, u64), ImageError>,
    ) -> Result<(), ImageError>
    where
        Self: 's,
    {
        if self.store.contains(&desc.digest) {
            return Ok(());
        }
        let (mut reader, size) = open(self.source).map_err(|e| match e {
            ImageError::Missing(_) => ImageError::Missing(format!(
                "blob {} ({}) named by the image is not in {}",
                desc.digest,
                desc.media_type,
                self.source.describe()
            )),
            other => other,
        })?;
        self.progress.start_blob(size);
        let progress = &mut *self.progress;
        self.store
            .ingest(&desc.digest, Some(desc.size), &mut reader, &mut |n| {
                progress.bytes(n)
            })?;
        self.ingested.added.push(desc.digest.clone());
        Ok(())
    }

    fn read_json(&mut self, desc: &Desc) -> Result<Vec<u8>, ImageError> {
        const MAX_JSON: u64 = 64 << 20;
        if desc.size > MAX_JSON {
            return Err(ImageError::Invalid(format!(
                "{} {} is {} bytes, over the {MAX_JSON}-byte limit for JSON documents",
                desc.media_type, desc.digest, desc.size
            )));
        }
        self.ingest(desc)?;
        Ok(self.store.read_blob(&desc.digest)?)
    }
}

fn desc_of(d: &oci_spec::image::Descriptor) -> Result<Desc, ImageError> {
    Ok(Desc {
        media_type: d.media_type().to_string(),
        digest: digest_of(d)?,
        size: d.size(),
    })
}

pub fn platform_of_config(config: &ImageConfiguration) -> Platform {
    Platform {
        os: config.os().to_string(),
        arch: config.architecture().to_string(),
        variant: config.variant().clone(),
    }
}

/// Reads every image in `source` into the store and resolves it for `platform`.
/// `name` renames the image when the source holds exactly one.
pub fn resolve_images(
    source: &dyn ImageSource,
    store: &ContentStore,
    name: Option<&str>,
    platform: Option<&Platform>,
    default_name: &str,
    ingested: &mut Ingested,
    progress: &mut dyn IngestProgress,
) -> Result<Vec<ResolvedImage>, ImageError> {
    let mut ctx = Ctx {
        source,
        platform,
        store,
        ingested,
        progress,
    };
    let tops = if source.exists("index.json") {
        oci_tops(&mut ctx, default_name)?
    } else if source.exists("manifest.json") {
        docker_tops(&mut ctx, default_name)?
    } else {
        return Err(ImageError::Invalid(format!(
            "{} is neither an OCI layout (no index.json) nor a docker save archive (no manifest.json)",
            source.describe()
        )));
    };
    if tops.is_empty() {
        return Err(ImageError::Invalid(format!(
            "{} holds no image",
            source.describe()
        )));
    }
    if name.is_some() && tops.len() > 1 {
        let names: Vec<&str> = tops.iter().map(|t| t.0.as_str()).collect();
        return Err(ImageError::Invalid(format!(
            "--name needs a source with one image; {} holds {}: {}",
            source.describe(),
            tops.len(),
            names.join(", ")
        )));
    }
    let mut out = Vec::new();
    for (top_name, target) in tops {
        let img_name = name.map(str::to_string).unwrap_or(top_name);
        out.push(resolve_target(&mut ctx, img_name, target, platform)?);
    }
    Ok(out)
}

/// The images an OCI layout names in its index.json: (name, descriptor).
fn oci_tops(ctx: &mut Ctx<'_>, default_name: &str) -> Result<Vec<(String, Desc)>, ImageError> {
    let (mut r, _) = ctx.source.open("index.json")?;
    let mut data = Vec::new();
    r.read_to_end(&mut data).map_err(|e| ImageError::Io {
        context: "reading index.json".into(),
        source: e,
    })?;
    let named = parse_index_json(&data, default_name)?;
    // Several manifests under one name, each with a platform: a multi-platform image listed
    // flat in index.json. Pick one for the platform, as from a nested index.
    let mut out: Vec<(String, Desc)> = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    for (name, _, _) in &named {
        if seen.contains(name) {
            continue;
        }
        seen.push(name.clone());
        let group: Vec<(Desc, Option<Platform>)> = named
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, d, p)| (d.clone(), p.clone()))
            .collect();
        if group.len() == 1 {
            out.push((name.clone(), group[0].0.clone()));
        } else if group.iter().all(|(_, p)| p.is_some()) {
            out.push((name.clone(), pick_platform(&group, ctx.platform)?));
        } else {
            for (d, _) in group {
                out.push((format!("{name}@{}", d.digest), d));
            }
        }
    }
    Ok(out)
}

/// The entries of an OCI layout's index.json: (name, descriptor, platform), names taken from
/// the containerd or OCI ref-name annotation as containerd's import does.
pub fn parse_index_json(
    data: &[u8],
    default_name: &str,
) -> Result<Vec<(String, Desc, Option<Platform>)>, ImageError> {
    let index = parse_index(data, "index.json")?;
    let mut named: Vec<(String, Desc, Option<Platform>)> = Vec::new();
    for m in index.manifests() {
        let desc = desc_of(m)?;
        let ann = m.annotations().clone().unwrap_or_default();
        let name = ann
            .get("io.containerd.image.name")
            .cloned()
            .or_else(|| {
                ann.get("org.opencontainers.image.ref.name").map(|r| {
                    if r.contains('/') || r.contains(':') {
                        r.clone()
                    } else {
                        format!("{default_name}:{r}")
                    }
                })
            })
            .unwrap_or_else(|| {
                if index.manifests().len() == 1 {
                    format!("{default_name}:latest")
                } else {
                    format!("{default_name}@{}", desc.digest)
                }
            });
        named.push((
            name,
            desc,
            m.platform().as_ref().map(platform_of_descriptor),
        ));
    }
    Ok(named)
}

/// An image index (OCI index or docker manifest list).
pub fn parse_index(data: &[u8], what: &str) -> Result<ImageIndex, ImageError> {
    ImageIndex::from_reader(data).map_err(json_err(what))
}

/// An image manifest and its config descriptor.
pub fn parse_manifest(data: &[u8], what: &str) -> Result<(ImageManifest, Desc), ImageError> {
    let manifest = ImageManifest::from_reader(data).map_err(json_err(what))?;
    let config = desc_of(manifest.config())?;
    Ok((manifest, config))
}

/// An image config.
pub fn parse_config(data: &[u8], what: &str) -> Result<ImageConfiguration, ImageError> {
    ImageConfiguration::from_reader(data).map_err(json_err(what))
}

/// The layers of `manifest` with the diff_ids of `config`: counts must agree, media types must
/// be layer types, digests must be sha256.
pub fn manifest_layers(
    manifest: &ImageManifest,
    config: &ImageConfiguration,
    what: &str,
) -> Result<Vec<LayerDesc>, ImageError> {
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != manifest.layers().len() {
        return Err(ImageError::Invalid(format!(
            "{what} has {} layers but its config lists {} diff_ids",
            manifest.layers().len(),
            diff_ids.len()
        )));
    }
    let mut layers = Vec::new();
    for (layer, diff_id) in manifest.layers().iter().zip(diff_ids) {
        let desc = desc_of(layer)?;
        let compression =
            layer_compression(&desc.media_type).ok_or_else(|| ImageError::UnknownMediaType {
                media_type: desc.media_type.clone(),
                what: format!("layer {}", desc.digest),
            })?;
        layers.push(LayerDesc {
            desc,
            compression,
            diff_id: Digest::parse(diff_id)?,
        });
    }
    Ok(layers)
}

/// A `docker save` archive's manifest.json.
pub fn parse_docker_manifest(data: &[u8]) -> Result<Vec<DockerManifestEntry>, ImageError> {
    serde_json::from_slice(data).map_err(|e| ImageError::Json {
        what: "manifest.json".into(),
        why: e.to_string(),
    })
}

fn platform_of_descriptor(p: &oci_spec::image::Platform) -> Platform {
    Platform {
        os: p.os().to_string(),
        arch: p.architecture().to_string(),
        variant: p.variant().clone(),
    }
}

/// One image of a `docker save` manifest.json.
#[derive(Debug, Deserialize)]
pub struct DockerManifestEntry {
    #[serde(rename = "Config")]
    pub config: String,
    #[serde(rename = "RepoTags", default)]
    pub repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    pub layers: Vec<String>,
}

/// `docker save` archives: the layer files and config are stored by path; we ingest them,
/// then write the docker schema-2 manifest the archive implies (as containerd's import does).
fn docker_tops(ctx: &mut Ctx<'_>, default_name: &str) -> Result<Vec<(String, Desc)>, ImageError> {
    let (mut r, _) = ctx.source.open("manifest.json")?;
    let mut data = Vec::new();
    r.read_to_end(&mut data).map_err(|e| ImageError::Io {
        context: "reading manifest.json".into(),
        source: e,
    })?;
    let entries = parse_docker_manifest(&data)?;
    let mut out = Vec::new();
    for entry in entries {
        let config = ingest_path(ctx, &entry.config, DOCKER_CONFIG)?;
        let mut layers = Vec::new();
        for path in &entry.layers {
            let mut d = ingest_path(ctx, path, DOCKER_LAYER)?;
            let mut magic = [0u8; 4];
            let n = ctx
                .store
                .open_blob(&d.digest)?
                .read(&mut magic)
                .map_err(|e| ImageError::Io {
                    context: format!("reading layer {path}"),
                    source: e,
                })?;
            d.media_type = match Compression::sniff(&magic[..n]) {
                Compression::None => DOCKER_LAYER,
                Compression::Gzip => DOCKER_LAYER_GZIP,
                Compression::Zstd => "application/vnd.docker.image.rootfs.diff.tar.zstd",
            }
            .to_string();
            layers.push(d);
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": config,
            "layers": layers,
        });
        let bytes = serde_json::to_vec(&manifest).map_err(|e| ImageError::Json {
            what: "synthesised manifest".into(),
            why: e.to_string(),
        })?;
        let digest = ctx.store.write_bytes(&bytes)?;
        ctx.ingested.added.push(digest.clone());
        let desc = Desc {
            media_type: DOCKER_MANIFEST.to_string(),
            digest,
            size: bytes.len() as u64,
        };
        let tags = entry.repo_tags.unwrap_or_default();
        if tags.is_empty() {
            out.push((format!("{default_name}:latest"), desc));
        } else {
            for tag in tags {
                out.push((tag, desc.clone()));
            }
        }
    }
    Ok(out)
}

fn ingest_path(ctx: &mut Ctx<'_>, path: &str, media_type: &str) -> Result<Desc, ImageError> {
    let (mut reader, size) = ctx.source.open(path)?;
    ctx.progress.start_blob(size);
    let progress = &mut *ctx.progress;
    let (digest, size) = ctx
        .store
        .ingest_computed(&mut reader, &mut |n| progress.bytes(n))?;
    ctx.ingested.added.push(digest.clone());
    Ok(Desc {
        media_type: media_type.to_string(),
        digest,
        size,
    })
}

fn resolve_target(
    ctx: &mut Ctx<'_>,
    name: String,
    target: Desc,
    wanted: Option<&Platform>,
) -> Result<ResolvedImage, ImageError> {
    let mut blobs = vec![target.digest.clone()];
    let mut manifest_desc = target.clone();
    // Follow (possibly nested) indexes down to one manifest.
    for _depth in 0..4 {
        match manifest_desc.media_type.as_str() {
            OCI_INDEX | DOCKER_MANIFEST_LIST => {
                let data = ctx.read_json(&manifest_desc)?;
                let index = parse_index(&data, &format!("index {}", manifest_desc.digest))?;
                manifest_desc = choose_manifest(&index, wanted)?;
                blobs.push(manifest_desc.digest.clone());
            }
            _ => break,
        }
    }
    if !matches!(
        manifest_desc.media_type.as_str(),
        OCI_MANIFEST | DOCKER_MANIFEST
    ) {
        return Err(ImageError::UnknownMediaType {
            media_type: manifest_desc.media_type.clone(),
            what: format!("manifest {}", manifest_desc.digest),
        });
    }
    let data = ctx.read_json(&manifest_desc)?;
    let what = format!("manifest {}", manifest_desc.digest);
    let (manifest, config_desc) = parse_manifest(&data, &what)?;
    blobs.push(config_desc.digest.clone());
    let config_data = ctx.read_json(&config_desc)?;
    let config = parse_config(&config_data, &format!("config {}", config_desc.digest))?;
    let platform = platform_of_config(&config);
    if let Some(w) = wanted {
        if !w.matches(&platform) {
            return Err(ImageError::NoPlatform {
                wanted: w.to_string(),
                present: platform.to_string(),
            });
        }
    }
    let layers = manifest_layers(&manifest, &config, &what)?;
    for layer in &layers {
        if !ctx.source.is_remote(&layer.desc.digest) {
            ctx.ingest_layer(layer)?;
        }
        blobs.push(layer.desc.digest.clone());
    }
    blobs.sort();
    blobs.dedup();
    Ok(ResolvedImage {
        name,
        target,
        manifest: manifest_desc,
        config: config_desc,
        platform,
        layers,
        blobs,
    })
}

/// The manifest of `index` for platform `wanted` (default: this host).
pub fn choose_manifest(index: &ImageIndex, wanted: Option<&Platform>) -> Result<Desc, ImageError> {
    let candidates = index
        .manifests()
        .iter()
        .map(|m| {
            Ok((
                desc_of(m)?,
                m.platform().as_ref().map(platform_of_descriptor),
            ))
        })
        .collect::<Result<Vec<_>, ImageError>>()?;
    pick_platform(&candidates, wanted)
}

/// The first manifest whose platform runs on `wanted` (default: this host).
fn pick_platform(
    candidates: &[(Desc, Option<Platform>)],
    wanted: Option<&Platform>,
) -> Result<Desc, ImageError> {
    let host = Platform::host();
    let wanted = wanted.unwrap_or(&host);
    let mut present = Vec::new();
    for (desc, p) in candidates {
        let Some(p) = p else { continue };
        if p.os == "unknown" {
            // Attestation manifests (buildx) carry platform unknown/unknown.
            continue;
        }
        present.push(p.to_string());
        if wanted.matches(p) {
            return Ok(desc.clone());
        }
    }
    Err(ImageError::NoPlatform {
        wanted: wanted.to_string(),
        present: if present.is_empty() {
            "no platforms".into()
        } else {
            present.join(", ")
        },
    })
}
