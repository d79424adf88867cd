//! A repository on a registry (and its mirrors) seen as an [`ImageSource`], so `pull` runs
//! the import pipeline unchanged: `index.json` is synthesised from the reference's top
//! manifest (named by the reference), `blobs/sha256/<hex>` are manifests fetched (verified)
//! from `/manifests/<digest>` or blobs streamed from `/blobs/<digest>` (verified by the
//! content store as they are ingested). Each request tries the mirrors first, then the origin.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use tracing::{info, info_span, warn};

use super::artifact::{discover, LayerArtifact};
use super::auth::credentials_for;
use super::blob::BlobStream;
use super::client::{Client, Endpoint, Fetched};
use super::lazy::RemoteInfo;
use super::prefetch::Prefetcher;
use super::reference::Reference;
use super::retry::RetryPolicy;
use super::toc::{fetch_toc, manifest_layer_descs, toc_artifact, toc_layers, FetchedToc};
use super::RegistryError;
use crate::digest::Digest;
use crate::image::source::ImageSource;
use crate::image::{
    layer_compression, Desc, ImageError, LayerDesc, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST,
    OCI_INDEX, OCI_MANIFEST,
};
use crate::store::ContentStore;
use crate::tee::tee_index;
use crate::unpack::{Indexed, Limits};

/// How to reach a registry.
#[derive(Debug, Clone, Default)]
pub struct Connect {
    /// Mirrors tried first for pulls (`HOST[:PORT]` or `http(s)://HOST[:PORT]`).
    pub mirrors: Vec<String>,
    /// Plain HTTP for every host (loopback hosts use it anyway).
    pub insecure: bool,
    pub retry: RetryPolicy,
}

impl Connect {
    /// The client of the reference's own registry (credentials from docker's config).
    pub fn origin(&self, r: &Reference) -> Result<Client, RegistryError> {
        Ok(Client::new(
            Endpoint::new(r.api_host(), self.insecure)?,
            &r.repository,
            credentials_for(&r.registry)?,
            self.retry,
        ))
    }

    /// Mirrors first, then the origin.
    pub fn clients(&self, r: &Reference) -> Result<Vec<Client>, RegistryError> {
        let mut out = Vec::new();
        for m in &self.mirrors {
            let ep = Endpoint::new(m, self.insecure)?;
            let creds = credentials_for(&ep.host)?;
            // A mirror has a fallback: one retry, not the full budget.
            let retry = RetryPolicy {
                retries: self.retry.retries.min(1),
                ..self.retry
            };
            out.push(Client::new(ep, &r.repository, creds, retry));
        }
        out.push(self.origin(r)?);
        Ok(out)
    }
}

pub struct RegistrySource {
    reference: Reference,
    clients: Arc<Vec<Client>>,
    index_json: Vec<u8>,
    /// Manifests fetched so far, by digest.
    manifests: RefCell<HashMap<Digest, Vec<u8>>>,
    /// Digests that name manifests (children of the indexes read), not blobs.
    manifest_digests: RefCell<HashSet<Digest>>,
    /// Mirrors that failed other than by not having something: not asked again.
    dead: RefCell<HashSet<usize>>,
    /// Index layers while they download, under this root (see `tee.rs`).
    index_into: Option<PathBuf>,
    /// Layers named by the manifests read, in order.
    layers: RefCell<Vec<Desc>>,
    /// Where prefetched layers go (see `prefetch.rs`); no prefetch without it.
    store: Option<ContentStore>,
    limits: Limits,
    prefetch: RefCell<Option<Prefetcher>>,
    /// Indexers running on downloads, by blob.
    indexing: RefCell<HashMap<Digest, JoinHandle<anyhow::Result<Indexed>>>>,
    /// `pull --lazy`: layers with an index artifact are recorded, not downloaded.
    lazy: Option<Lazy>,
    /// Layer index artifacts found for the manifests read (lazy pulls), by layer blob.
    artifacts: RefCell<HashMap<Digest, LayerArtifact>>,
    /// eStargz TOCs of layers no artifact covers (lazy pulls), by layer blob.
    tocs: RefCell<HashMap<Digest, FetchedToc>>,
}

/// How a lazy pull records its layers.
#[derive(Debug, Clone)]
pub struct Lazy {
    pub connect: Connect,
    /// Download whole blobs in the background once mounted.
    pub background: bool,
    /// Fetch what the layers' access traces name before returning (else the first mount
    /// fetches it, first thing).
    pub prefetch: bool,
}

impl RegistrySource {
    /// Fetches the reference's top manifest or index (mirrors first) and names it `name`.
    pub fn connect(
        reference: &Reference,
        connect: &Connect,
        name: &str,
    ) -> Result<Self, RegistryError> {
        let _span = info_span!("registry_connect", reference = %reference).entered();
        let clients = Arc::new(connect.clients(reference)?);
        let src = Self {
            reference: reference.clone(),
            clients,
            index_json: Vec::new(),
            manifests: RefCell::default(),
            manifest_digests: RefCell::default(),
            dead: RefCell::default(),
            index_into: None,
            layers: RefCell::default(),
            store: None,
            limits: Limits::default(),
            prefetch: RefCell::default(),
            indexing: RefCell::default(),
            lazy: None,
            artifacts: RefCell::default(),
            tocs: RefCell::default(),
        };
        let top = src.fetch_manifest(&reference.manifest_ref())?;
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{
                "mediaType": top.media_type,
                "digest": top.digest,
                "size": top.bytes.len(),
                "annotations": {"io.containerd.image.name": name},
            }],
        });
        let index_json = serde_json::to_vec(&index)
            .map_err(|e| RegistryError::Invalid(format!("synthesising index.json: {e}")))?;
        Ok(Self { index_json, ..src })
    }

    /// A manifest by tag or digest from the first endpoint that has it; remembers it and,
    /// for an index, that its children are manifests.
    fn fetch_manifest(&self, reference: &str) -> Result<Fetched, RegistryError> {
        let fetched = self.first_ok(|c| c.get_manifest(reference))?;
        if matches!(
            fetched.media_type.as_str(),
            OCI_INDEX | DOCKER_MANIFEST_LIST
        ) {
            #[derive(serde::Deserialize)]
            struct Child {
                digest: String,
            }
            #[derive(serde::Deserialize)]
            struct Index {
                #[serde(default)]
                manifests: Vec<Child>,
            }
            if let Ok(ix) = serde_json::from_slice::<Index>(&fetched.bytes) {
                let mut set = self.manifest_digests.borrow_mut();
                set.extend(
                    ix.manifests
                        .iter()
                        .filter_map(|m| Digest::parse(&m.digest).ok()),
                );
            }
        }
        if matches!(fetched.media_type.as_str(), OCI_MANIFEST | DOCKER_MANIFEST) {
            self.discover_artifact(&fetched.digest, &fetched.bytes);
            let mut layers = self.layers.borrow_mut();
            for (desc, _) in manifest_layer_descs(&fetched.bytes) {
                if !layers.iter().any(|x| x.digest == desc.digest) {
                    layers.push(desc);
                }
            }
        }
        self.manifests
            .borrow_mut()
            .insert(fetched.digest.clone(), fetched.bytes.clone());
        Ok(fetched)
    }

    /// Lazy pulls: the index artifact of an image manifest, if the registry has one (else
    /// its layers are downloaded as in a full pull).
    /// eStargz layers it does not cover are read from their TOC.
    fn discover_artifact(&self, manifest: &Digest, bytes: &[u8]) {
        if self.lazy.is_none() {
            return;
        }
        match self.first_ok(|c| discover(c, manifest)) {
            Ok(Some(found)) => {
                info!(manifest = %manifest, layers = found.len(), "found a lazysnap index artifact");
                self.artifacts.borrow_mut().extend(found);
            }
            Ok(None) => info!(manifest = %manifest, "no lazysnap index artifact"),
            Err(e) => {
                warn!(manifest = %manifest, error = %e, "reading the index artifact failed")
            }
        }
        let covered: HashSet<Digest> = self.artifacts.borrow().keys().cloned().collect();
        let tocs = toc_layers(bytes, &covered, |desc, toc| {
            self.first_ok(|c| fetch_toc(c, desc, toc))
        });
        self.tocs.borrow_mut().extend(tocs);
    }

    /// Makes this a lazy pull (call before resolving).
    pub fn set_lazy(&mut self, lazy: Lazy) {
        self.lazy = Some(lazy);
        // The top manifest was read when connecting.
        let fetched: Vec<(Digest, Vec<u8>)> = self
            .manifests
            .borrow()
            .iter()
            .map(|(d, b)| (d.clone(), b.clone()))
            .collect();
        for (digest, bytes) in fetched {
            let is_image = serde_json::from_slice::<serde_json::Value>(&bytes)
                .is_ok_and(|v| v.get("layers").is_some());
            if is_image {
                self.discover_artifact(&digest, &bytes);
            }
        }
    }

    /// Layers recorded from an index artifact or an eStargz TOC (their blobs stay in the
    /// registry).
    pub fn remote_layers(&self) -> Vec<Digest> {
        let mut v: Vec<Digest> = self.artifacts.borrow().keys().cloned().collect();
        v.extend(self.tocs.borrow().keys().cloned());
        v.sort();
        v.dedup();
        v
    }

    /// Runs `f` against each endpoint in order; the first success wins, else the origin's
    /// error (a mirror's failure is only logged). A digest mismatch is not retried elsewhere.
    fn first_ok<'s, T>(
        &'s self,
        f: impl Fn(&'s Client) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let last = self.clients.len() - 1;
        for (i, c) in self.clients.iter().enumerate() {
            if i != last && self.dead.borrow().contains(&i) {
                continue;
            }
            match f(c) {
                Ok(v) => return Ok(v),
                Err(e @ RegistryError::DigestMismatch { .. }) => return Err(e),
                Err(e) if i == last => return Err(e),
                Err(e) => {
                    warn!(mirror = %c.endpoint.base, error = %e, "mirror failed; trying the next endpoint");
                    if !matches!(e, RegistryError::NotFound(_)) {
                        self.dead.borrow_mut().insert(i);
                    }
                }
            }
        }
        Err(RegistryError::Invalid("no registry endpoint".into()))
    }

    /// Index layers while they download, under the store at `root_path`, and download the
    /// other layers of a manifest in parallel into `store` once its first layer is opened.
    pub fn download_into(&mut self, root_path: &Path, store: &ContentStore, limits: Limits) {
        self.index_into = Some(root_path.to_path_buf());
        self.store = Some(store.clone());
        self.limits = limits;
    }

    /// Blobs the prefetcher was given (a failed pull removes those nothing references).
    pub fn prefetched(&self) -> Vec<Digest> {
        self.prefetch
            .borrow()
            .as_ref()
            .map(|p| p.blobs().cloned().collect())
            .unwrap_or_default()
    }

    /// The index made while `layer` downloaded, if it was, or (lazy pulls) from its index
    /// artifact.
    pub fn take_indexed(&self, layer: &LayerDesc) -> Option<anyhow::Result<Indexed>> {
        let blob = &layer.desc.digest;
        if let (Some(lazy), Some(root)) = (&self.lazy, &self.index_into) {
            if let Some(t) = self.tocs.borrow().get(blob) {
                let a = match toc_artifact(t, layer) {
                    Ok(a) => a,
                    Err(e) => return Some(Err(e)),
                };
                self.artifacts.borrow_mut().insert(blob.clone(), a);
            }
            if let Some(a) = self.artifacts.borrow().get(blob) {
                let remote = RemoteInfo {
                    reference: self.reference.to_string(),
                    mirrors: lazy.connect.mirrors.clone(),
                    insecure: lazy.connect.insecure,
                    size: a.blob_size,
                    chunk_size: a.chunk_size,
                    chunk_hashes: a.chunk_hashes.clone(),
                    background: lazy.background,
                    span_digests: a.span_digests.clone(),
                    toc_index: None,
                };
                return Some(a.materialize(root, layer, remote));
            }
        }
        let from_stream = self.indexing.borrow_mut().remove(blob);
        let handle = match from_stream {
            Some(h) => h,
            None => self.prefetch.borrow().as_ref()?.take_index(blob)?,
        };
        Some(
            handle
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("indexing thread of {blob} panicked"))),
        )
    }

    /// Waits for the indexers still running (after a failed pull, before cleaning up).
    pub fn finish(&self) {
        if let Some(p) = self.prefetch.borrow_mut().as_mut() {
            p.finish();
        }
        let handles: Vec<_> = self.indexing.borrow_mut().drain().collect();
        for (_, h) in handles {
            let _ = h.join();
        }
    }

    /// On the first layer opened: the manifest's other layers (not in the store yet) go to
    /// the prefetcher.
    fn start_prefetch(&self, opened: &Digest) {
        let Some(store) = &self.store else { return };
        if self.prefetch.borrow().is_some() {
            return;
        }
        let others: Vec<Desc> = {
            let layers = self.layers.borrow();
            if !layers.iter().any(|l| &l.digest == opened) {
                return;
            }
            layers
                .iter()
                .filter(|l| {
                    &l.digest != opened
                        && !store.contains(&l.digest)
                        && !self.artifacts.borrow().contains_key(&l.digest)
                })
                .cloned()
                .collect()
        };
        if others.is_empty() {
            return;
        }
        *self.prefetch.borrow_mut() = Some(Prefetcher::start(
            self.clients.clone(),
            store.clone(),
            self.index_into.clone(),
            self.limits,
            others,
        ));
    }

    fn err(&self, e: RegistryError) -> ImageError {
        match e {
            RegistryError::NotFound(what) => ImageError::Missing(what),
            other => ImageError::Invalid(format!("{}: {other}", self.reference)),
        }
    }
}

impl ImageSource for RegistrySource {
    fn open(&self, path: &str) -> Result<(Box<dyn Read + '_>, u64), ImageError> {
        if path == "index.json" {
            let data = self.index_json.clone();
            let n = data.len() as u64;
            return Ok((Box::new(std::io::Cursor::new(data)), n));
        }
        let digest = path
            .strip_prefix("blobs/sha256/")
            .and_then(|h| Digest::parse(&format!("sha256:{h}")).ok())
            .ok_or_else(|| ImageError::Missing(format!("{path} (a registry serves blobs only)")))?;
        let cached = self.manifests.borrow().get(&digest).cloned();
        let manifest = match cached {
            Some(m) => Some(m),
            None if self.manifest_digests.borrow().contains(&digest) => Some(
                self.fetch_manifest(digest.as_str())
                    .map_err(|e| self.err(e))?
                    .bytes,
            ),
            None => None,
        };
        if let Some(m) = manifest {
            let n = m.len() as u64;
            return Ok((Box::new(std::io::Cursor::new(m)), n));
        }
        if let Some(p) = self.prefetch.borrow().as_ref() {
            match p.wait(&digest) {
                // In the store: the pipeline's ingest keeps it without reading.
                Some(Ok(handle)) => {
                    if let Some(h) = handle {
                        self.indexing.borrow_mut().insert(digest, h);
                    }
                    return Ok((Box::new(std::io::empty()), 0));
                }
                Some(Err(why)) => {
                    return Err(ImageError::Invalid(format!(
                        "{}: blob {digest}: {why}",
                        self.reference
                    )))
                }
                None => {}
            }
        }
        self.start_prefetch(&digest);
        let stream = self
            .first_ok(|c| BlobStream::open(c, &digest))
            .map_err(|e| self.err(e))?;
        let size = stream.size().unwrap_or(0);
        let media_type = self
            .layers
            .borrow()
            .iter()
            .find(|l| l.digest == digest)
            .map(|l| l.media_type.clone());
        let compression = media_type.as_deref().and_then(layer_compression);
        if let (Some(root), Some(media_type), Some(compression)) =
            (&self.index_into, media_type, compression)
        {
            let layer = LayerDesc {
                desc: Desc {
                    media_type,
                    digest: digest.clone(),
                    size,
                },
                compression,
                // Not known here: checked against the config when the result is used.
                diff_id: digest.clone(),
            };
            let (tee, handle) = tee_index(stream, root.clone(), layer, self.limits);
            if let Some(old) = self.indexing.borrow_mut().insert(digest, handle) {
                let _ = old.join();
            }
            return Ok((Box::new(tee), size));
        }
        Ok((Box::new(stream), size))
    }

    fn exists(&self, path: &str) -> bool {
        path == "index.json"
    }

    fn is_remote(&self, digest: &Digest) -> bool {
        self.artifacts.borrow().contains_key(digest) || self.tocs.borrow().contains_key(digest)
    }

    fn describe(&self) -> String {
        self.reference.to_string()
    }
}
