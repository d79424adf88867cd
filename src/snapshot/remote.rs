//! The lazy side of containerd's remote-snapshot labels: when a Prepare names the image
//! (`cri.image-ref`), its manifest (`cri.manifest-digest`) and the layer (`cri.layer-digest`)
//! and the layer blob is nowhere on this machine, the layer is set up from its lazysnap index
//! artifact (`registry::artifact`) instead of being fetched: the registry keeps the blob and
//! mounts read it by range (`registry::lazy`). Per image manifest this reads the manifest, the
//! config (the layer's diffID) and the artifact once, and keeps them for the image's other
//! layers (containerd prepares them one after the other).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tracing::{info, info_span, warn};

use crate::digest::Digest;
use crate::image::resolve::{manifest_layers, parse_config, parse_manifest};
use crate::image::LayerDesc;
use crate::registry::artifact::{discover, LayerArtifact};
use crate::registry::lazy::RemoteInfo;
use crate::registry::retry::RetryPolicy;
use crate::registry::source::Connect;
use crate::registry::toc::{fetch_toc, toc_artifact, toc_layers};
use crate::registry::{Client, Reference, RegistryError};

/// containerd's labels naming the image a layer belongs to (`snapshotters.AppendInfoHandlerWrapper`).
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const LABEL_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";

/// Largest image config read.
const MAX_CONFIG: u64 = 16 << 20;
/// Images resolved and kept (their artifacts hold every layer's index).
const KEEP_IMAGES: usize = 4;
/// How long "this image has no index artifact" (or "its registry failed") is believed: an
/// artifact may be pushed later.
const NEGATIVE_TTL: Duration = Duration::from_secs(60);

/// How `serve` reaches registries for lazy layers.
#[derive(Debug, Clone, Default)]
pub struct RemoteConfig {
    /// Mirrors tried first (`HOST[:PORT]` or `http(s)://HOST[:PORT]`).
    pub mirrors: Vec<String>,
    /// Registries (`HOST[:PORT]`) spoken to over plain HTTP (loopback ones are anyway).
    pub insecure_registries: Vec<String>,
    /// Whether mounts download whole blobs in the background.
    pub background: bool,
}

impl RemoteConfig {
    fn connect(&self, r: &Reference) -> Connect {
        Connect {
            mirrors: self.mirrors.clone(),
            insecure: self
                .insecure_registries
                .iter()
                .any(|h| h == &r.registry || h == r.api_host()),
            ..Connect::default()
        }
    }
}

/// An image's layers and the index artifacts found for them.
struct ImageArtifacts {
    reference: Reference,
    connect: Connect,
    layers: Vec<LayerDesc>,
    artifacts: HashMap<Digest, LayerArtifact>,
    /// Layers whose artifact was handed out.
    used: HashSet<Digest>,
}

/// A layer that can be mounted before its blob is here.
pub struct LazyLayer {
    pub layer: LayerDesc,
    pub artifact: LayerArtifact,
    pub remote: RemoteInfo,
}

pub struct Resolver {
    pub config: RemoteConfig,
    /// By image manifest digest: when resolved, and what (None: the image has no artifact).
    images: HashMap<Digest, (Instant, Option<ImageArtifacts>)>,
}

impl Resolver {
    pub fn new(config: RemoteConfig) -> Self {
        Self {
            config,
            images: HashMap::new(),
        }
    }

    /// Layer `layer` of the image `image_ref` whose manifest is `manifest`, with its index
    /// artifact; `None` when the registry has no artifact for it.
    pub fn layer(
        &mut self,
        image_ref: &str,
        manifest: &Digest,
        layer: &Digest,
    ) -> anyhow::Result<Option<LazyLayer>> {
        let fresh = match self.images.get(manifest) {
            Some((_, Some(_))) => true,
            Some((at, None)) => at.elapsed() < NEGATIVE_TTL,
            None => false,
        };
        if !fresh {
            // A failure is remembered like a missing artifact: containerd fetches the image's
            // layers, and its other layers do not wait for the registry again.
            let resolved = self.resolve(image_ref, manifest);
            if self.images.len() >= KEEP_IMAGES {
                // The oldest goes.
                if let Some(old) = self
                    .images
                    .iter()
                    .min_by_key(|(_, (at, _))| *at)
                    .map(|(d, _)| d.clone())
                {
                    self.images.remove(&old);
                }
            }
            let (kept, result) = match resolved {
                Ok(r) => (r, Ok(())),
                Err(e) => (None, Err(e)),
            };
            self.images.insert(manifest.clone(), (Instant::now(), kept));
            result?;
        }
        let Some((_, Some(img))) = self.images.get_mut(manifest) else {
            return Ok(None);
        };
        let Some(desc) = img.layers.iter().find(|l| &l.desc.digest == layer).cloned() else {
            bail!("image manifest {manifest} has no layer {layer}");
        };
        let Some(artifact) = img.artifacts.get(layer).cloned() else {
            return Ok(None);
        };
        let remote = RemoteInfo {
            reference: img.reference.to_string(),
            mirrors: img.connect.mirrors.clone(),
            insecure: img.connect.insecure,
            size: artifact.blob_size,
            chunk_size: artifact.chunk_size,
            chunk_hashes: artifact.chunk_hashes.clone(),
            background: self.config.background,
            span_digests: artifact.span_digests.clone(),
            toc_index: None,
        };
        img.used.insert(layer.clone());
        if img.used.len() == img.artifacts.len() {
            // Every layer with an artifact was asked for: drop the indexes held in memory (a
            // later pull of the image reads them again).
            self.images.remove(manifest);
        }
        Ok(Some(LazyLayer {
            layer: desc,
            artifact,
            remote,
        }))
    }

    /// The image's manifest, config and index artifact from its registry (mirrors first).
    fn resolve(
        &self,
        image_ref: &str,
        manifest: &Digest,
    ) -> anyhow::Result<Option<ImageArtifacts>> {
        let reference = Reference::parse(image_ref)?;
        let _span =
            info_span!("resolve_lazy", reference = %reference, manifest = %manifest).entered();
        let connect = self.config.connect(&reference);
        // containerd's fetch is the fallback: one retry, not the full budget.
        let clients = Connect {
            retry: RetryPolicy {
                retries: connect.retry.retries.min(1),
                ..connect.retry
            },
            ..connect.clone()
        }
        .clients(&reference)?;
        let fetched = first_ok(&clients, |c| c.get_manifest(manifest.as_str()))
            .with_context(|| format!("reading manifest {manifest} of {reference}"))?;
        let what = format!("manifest {manifest} of {reference}");
        let (m, config_desc) = parse_manifest(&fetched.bytes, &what)?;
        let mut artifacts = first_ok(&clients, |c| discover(c, manifest))
            .with_context(|| format!("looking for the lazysnap index of {reference}"))?
            .unwrap_or_default();
        let covered = artifacts.keys().cloned().collect();
        let tocs = toc_layers(&fetched.bytes, &covered, |desc, toc| {
            first_ok(&clients, |c| fetch_toc(c, desc, toc))
        });
        if artifacts.is_empty() && tocs.is_empty() {
            info!("no lazysnap index artifact and no eStargz layer: containerd fetches the layers");
            return Ok(None);
        }
        let config = first_ok(&clients, |c| {
            c.get_small_blob(&config_desc.digest, MAX_CONFIG)
        })
        .with_context(|| format!("reading the config of {reference}"))?;
        let config = parse_config(&config, &format!("config of {reference}"))?;
        let layers = manifest_layers(&m, &config, &what)?;
        for l in &layers {
            if let Some(t) = tocs.get(&l.desc.digest) {
                match toc_artifact(t, l) {
                    Ok(a) => {
                        artifacts.insert(l.desc.digest.clone(), a);
                    }
                    Err(e) => warn!(layer = %l.desc.digest, error = %e, "eStargz TOC unusable"),
                }
            }
        }
        info!(
            layers = layers.len(),
            indexed = artifacts.len(),
            "found a lazysnap index artifact"
        );
        Ok(Some(ImageArtifacts {
            reference,
            connect,
            layers,
            artifacts,
            used: HashSet::new(),
        }))
    }
}

/// `f` against each endpoint in order (mirrors, then the origin): the first success, else
/// the origin's error.
fn first_ok<T>(
    clients: &[Client],
    f: impl Fn(&Client) -> Result<T, RegistryError>,
) -> Result<T, RegistryError> {
    let mut last = None;
    for c in clients {
        match f(c) {
            Ok(v) => return Ok(v),
            Err(e @ RegistryError::DigestMismatch { .. }) => return Err(e),
            Err(e) => {
                tracing::debug!(endpoint = %c.endpoint.base, error = %e, "endpoint failed");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| RegistryError::Invalid("no registry endpoint".into())))
}
