//! eStargz layers read before download: the footer (last 51 bytes) names where the TOC's gzip
//! member starts; that member (a tar holding `stargz.index.json`) is fetched by one Range
//! request and checked against the layer's `containerd.io/snapshot/stargz/toc.digest`
//! annotation (without it the TOC is not trusted and the layer is downloaded). The index is
//! laid out from it by `index::toc`.

use std::io::Read;

use std::collections::{HashMap, HashSet};

use tracing::{info, info_span, warn};

use super::client::Client;
use super::RegistryError;
use crate::digest::Digest;
use crate::image::{layer_compression, Desc, LayerDesc};
use crate::registry::artifact::LayerArtifact;

pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";
const FOOTER_SIZE: u64 = 51;
/// Largest TOC accepted, compressed and uncompressed.
const MAX_TOC: u64 = 256 << 20;

/// A TOC as fetched: its JSON, the uncompressed bytes of its member and where that starts.
#[derive(Debug, Clone)]
pub struct FetchedToc {
    pub json: Vec<u8>,
    pub member: Vec<u8>,
    pub toc_offset: u64,
    pub blob_size: u64,
    pub uncompressed_size: u64,
}

/// The TOC offset from an eStargz footer: an empty gzip member whose extra field is
/// `SG` + LE16 22 + `%016x` offset + `STARGZ`.
pub fn parse_footer(footer: &[u8]) -> Option<u64> {
    if footer.len() != FOOTER_SIZE as usize || footer[..3] != [0x1f, 0x8b, 8] {
        return None;
    }
    if footer[3] & 4 == 0 {
        return None;
    }
    let xlen = u16::from_le_bytes([footer[10], footer[11]]) as usize;
    let extra = footer.get(12..12 + xlen)?;
    if xlen != 26 || &extra[..2] != b"SG" || u16::from_le_bytes([extra[2], extra[3]]) != 22 {
        return None;
    }
    let sub = &extra[4..];
    if &sub[16..] != b"STARGZ" {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(&sub[..16]).ok()?, 16).ok()
}

/// Fetches and checks the TOC of eStargz layer `layer` (two Range requests; again if what
/// came does not check out, as a flipped bit on the way would).
pub fn fetch_toc(
    client: &Client,
    layer: &Desc,
    toc_digest: &Digest,
    uncompressed_size: u64,
) -> Result<FetchedToc, RegistryError> {
    let _span = info_span!("fetch_toc", blob = %layer.digest).entered();
    let mut attempt = 0;
    loop {
        match fetch_toc_once(client, layer, toc_digest, uncompressed_size) {
            // Footer and TOC each get a second chance.
            Err(e @ (RegistryError::Invalid(_) | RegistryError::DigestMismatch { .. }))
                if attempt < 2 =>
            {
                warn!(error = %e, "fetching the TOC again");
                attempt += 1;
            }
            other => return other,
        }
    }
}

fn fetch_toc_once(
    client: &Client,
    layer: &Desc,
    toc_digest: &Digest,
    uncompressed_size: u64,
) -> Result<FetchedToc, RegistryError> {
    let bad = |m: String| RegistryError::Invalid(format!("eStargz layer {}: {m}", layer.digest));
    let size = layer.size;
    if size < FOOTER_SIZE {
        return Err(bad("too small for a footer".into()));
    }
    let footer = client.read_range(&layer.digest, size - FOOTER_SIZE, FOOTER_SIZE)?;
    let toc_offset = parse_footer(&footer).ok_or_else(|| bad("no eStargz footer".into()))?;
    let len = (size - FOOTER_SIZE)
        .checked_sub(toc_offset)
        .filter(|&l| l > 0 && l <= MAX_TOC)
        .ok_or_else(|| bad(format!("TOC offset {toc_offset} out of range")))?;
    let compressed = client.read_range(&layer.digest, toc_offset, len)?;
    let mut member = Vec::new();
    flate2::read::GzDecoder::new(&compressed[..])
        .take(MAX_TOC + 1)
        .read_to_end(&mut member)
        .map_err(|e| bad(format!("TOC member: {e}")))?;
    if member.len() as u64 > MAX_TOC {
        return Err(bad("TOC too large".into()));
    }
    let mut tar = crate::index::tar::TarReader::new(&member[..]);
    let entry = tar
        .next_entry()
        .map_err(|e| bad(format!("TOC member: {e}")))?
        .ok_or_else(|| bad("empty TOC member".into()))?;
    let start = entry.data_offset as usize;
    let json = member
        .get(start..start + entry.stored_size as usize)
        .ok_or_else(|| bad("TOC member is truncated".into()))?
        .to_vec();
    let actual = Digest::sha256_of(&json);
    if &actual != toc_digest {
        return Err(RegistryError::DigestMismatch {
            what: format!("TOC of eStargz layer {}", layer.digest),
            expected: toc_digest.clone(),
            actual,
        });
    }
    Ok(FetchedToc {
        json,
        member,
        toc_offset,
        blob_size: size,
        uncompressed_size,
    })
}

/// The layer descriptors of an image manifest with their annotations (unparseable ones left
/// out: the manifest is resolved strictly elsewhere).
pub fn manifest_layer_descs(manifest: &[u8]) -> Vec<(Desc, HashMap<String, String>)> {
    #[derive(serde::Deserialize)]
    struct Layer {
        #[serde(rename = "mediaType")]
        media_type: String,
        digest: String,
        size: u64,
        #[serde(default)]
        annotations: HashMap<String, String>,
    }
    #[derive(serde::Deserialize)]
    struct Manifest {
        #[serde(default)]
        layers: Vec<Layer>,
    }
    let Ok(m) = serde_json::from_slice::<Manifest>(manifest) else {
        return Vec::new();
    };
    m.layers
        .into_iter()
        .filter_map(|l| {
            let digest = Digest::parse(&l.digest).ok()?;
            let desc = Desc {
                media_type: l.media_type,
                digest,
                size: l.size,
            };
            Some((desc, l.annotations))
        })
        .collect()
}

/// The TOCs of a manifest's eStargz layers (gzip, with a `toc.digest` annotation) other than
/// `covered`, fetched with `fetch`; a layer whose TOC cannot be had is left out (downloaded).
pub fn estargz_tocs(
    manifest: &[u8],
    covered: &HashSet<Digest>,
    fetch: impl Fn(&Desc, &Digest, u64) -> Result<FetchedToc, RegistryError>,
) -> HashMap<Digest, FetchedToc> {
    let mut out = HashMap::new();
    for (desc, annotations) in manifest_layer_descs(manifest) {
        let Some(toc_digest) = annotations
            .get(TOC_DIGEST_ANNOTATION)
            .and_then(|d| Digest::parse(d).ok())
        else {
            continue;
        };
        if covered.contains(&desc.digest)
            || layer_compression(&desc.media_type) != Some(crate::blob::Compression::Gzip)
        {
            continue;
        }
        let unc = annotations
            .get(UNCOMPRESSED_SIZE_ANNOTATION)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let digest = desc.digest.clone();
        match fetch(&desc, &toc_digest, unc) {
            Ok(t) => {
                info!(layer = %digest, toc_bytes = t.json.len(), "eStargz layer: read by its TOC");
                out.insert(digest, t);
            }
            Err(e) => {
                warn!(layer = %digest, error = %e, "eStargz TOC unusable; the layer is downloaded")
            }
        }
    }
    out
}

/// The layer artifact an eStargz TOC amounts to (index and span map laid out on its members).
pub fn toc_artifact(t: &FetchedToc, layer: &LayerDesc) -> anyhow::Result<LayerArtifact> {
    use anyhow::Context as _;
    let toc = crate::index::toc::Toc {
        json: &t.json,
        blob_size: t.blob_size,
        toc_offset: t.toc_offset,
        toc_member: &t.member,
    };
    let laid = crate::index::toc::layout(&toc, layer.diff_id.as_str(), t.uncompressed_size)
        .with_context(|| format!("eStargz TOC of layer {}", layer.desc.digest))?;
    Ok(LayerArtifact {
        version: 1,
        blob: layer.desc.digest.to_string(),
        blob_size: layer.desc.size,
        diff_id: layer.diff_id.to_string(),
        index: laid.index.to_bytes(),
        spans: postcard::to_stdvec(&laid.map)?,
        chunk_size: super::lazy::CHUNK_SIZE,
        chunk_hashes: Vec::new(),
        trace: Vec::new(),
        span_digests: laid.span_digests,
        toc: true,
    })
}
