//! Layers that carry their own table of contents, read before download:
//! - eStargz: the footer (last 51 bytes) names where the TOC's gzip member starts; that member
//!   (a tar holding `stargz.index.json`) is fetched by one Range request and checked against
//!   the layer's `containerd.io/snapshot/stargz/toc.digest` annotation;
//! - zstd:chunked: the layer's `…zstd-chunked.manifest-position` annotation names where the
//!   zstd-compressed TOC is; it is fetched by one Range request and checked against
//!   `…zstd-chunked.manifest-checksum`.
//!
//! Without those annotations the TOC is not trusted and the layer is downloaded. The index is
//! laid out from the TOC by `index::toc`.

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
/// zstd:chunked annotations, under both prefixes containers/storage has used.
const ZSTD_CHUNKED_PREFIXES: [&str; 2] = [
    "io.github.containers.zstd-chunked.",
    "io.containers.zstd-chunked.",
];
/// The `type` field of a manifest position naming the TOC (JSON).
const ZSTD_CHUNKED_MANIFEST_JSON: u64 = 1;
const FOOTER_SIZE: u64 = 51;
/// Largest TOC accepted, compressed and uncompressed.
const MAX_TOC: u64 = 256 << 20;

/// Where a layer's TOC is and what it must hash to, from the layer's annotations.
#[derive(Debug, Clone)]
pub enum TocRef {
    Estargz {
        toc_digest: Digest,
        uncompressed_size: u64,
    },
    /// sha256 of the compressed TOC, its offset, compressed and uncompressed length.
    ZstdChunked {
        checksum: Digest,
        offset: u64,
        length: u64,
        uncompressed: u64,
    },
}

impl TocRef {
    /// The TOC a layer descriptor announces, if any.
    pub fn of(desc: &Desc, annotations: &HashMap<String, String>) -> Option<TocRef> {
        match layer_compression(&desc.media_type)? {
            crate::blob::Compression::Gzip => Some(TocRef::Estargz {
                toc_digest: Digest::parse(annotations.get(TOC_DIGEST_ANNOTATION)?).ok()?,
                uncompressed_size: annotations
                    .get(UNCOMPRESSED_SIZE_ANNOTATION)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0),
            }),
            crate::blob::Compression::Zstd => {
                let get = |key: &str| {
                    ZSTD_CHUNKED_PREFIXES
                        .iter()
                        .find_map(|p| annotations.get(&format!("{p}{key}")))
                };
                let checksum = Digest::parse(get("manifest-checksum")?).ok()?;
                let pos: Vec<u64> = get("manifest-position")?
                    .split(':')
                    .map(|n| n.parse().ok())
                    .collect::<Option<_>>()?;
                match pos[..] {
                    [offset, length, uncompressed, ZSTD_CHUNKED_MANIFEST_JSON] => {
                        Some(TocRef::ZstdChunked {
                            checksum,
                            offset,
                            length,
                            uncompressed,
                        })
                    }
                    _ => None,
                }
            }
            crate::blob::Compression::None => None,
        }
    }
}

/// A TOC as fetched: its JSON and, for eStargz, where its member starts and that member's
/// uncompressed bytes.
#[derive(Debug, Clone)]
pub struct FetchedToc {
    pub json: Vec<u8>,
    pub estargz: Option<(u64, Vec<u8>)>,
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

/// Fetches and checks the TOC `toc` of layer `layer` (one or two Range requests; again if what
/// came does not check out, as a flipped bit on the way would).
pub fn fetch_toc(client: &Client, layer: &Desc, toc: &TocRef) -> Result<FetchedToc, RegistryError> {
    let _span = info_span!("fetch_toc", blob = %layer.digest).entered();
    let mut attempt = 0;
    loop {
        let r = match toc {
            TocRef::Estargz {
                toc_digest,
                uncompressed_size,
            } => fetch_estargz_toc(client, layer, toc_digest, *uncompressed_size),
            TocRef::ZstdChunked {
                checksum,
                offset,
                length,
                uncompressed,
            } => fetch_zstd_chunked_toc(client, layer, checksum, *offset, *length, *uncompressed),
        };
        match r {
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

fn fetch_zstd_chunked_toc(
    client: &Client,
    layer: &Desc,
    checksum: &Digest,
    offset: u64,
    length: u64,
    uncompressed: u64,
) -> Result<FetchedToc, RegistryError> {
    let bad =
        |m: String| RegistryError::Invalid(format!("zstd:chunked layer {}: {m}", layer.digest));
    if length == 0
        || length > MAX_TOC
        || uncompressed > MAX_TOC
        || offset.checked_add(length).is_none_or(|e| e > layer.size)
    {
        return Err(bad(format!("TOC position {offset}+{length} out of range")));
    }
    let compressed = client.read_range(&layer.digest, offset, length)?;
    let actual = Digest::sha256_of(&compressed);
    if &actual != checksum {
        return Err(RegistryError::DigestMismatch {
            what: format!("TOC of zstd:chunked layer {}", layer.digest),
            expected: checksum.clone(),
            actual,
        });
    }
    let mut json = Vec::new();
    zstd::stream::read::Decoder::new(&compressed[..])
        .map_err(|e| bad(format!("TOC: {e}")))?
        .take(uncompressed + 1)
        .read_to_end(&mut json)
        .map_err(|e| bad(format!("TOC: {e}")))?;
    if json.len() as u64 != uncompressed {
        return Err(bad(format!(
            "TOC is {} bytes, not {uncompressed}",
            json.len()
        )));
    }
    Ok(FetchedToc {
        json,
        estargz: None,
        blob_size: layer.size,
        uncompressed_size: 0,
    })
}

fn fetch_estargz_toc(
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
        estargz: Some((toc_offset, member)),
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

/// The TOCs of a manifest's layers that announce one (eStargz, zstd:chunked) other than
/// `covered`, fetched with `fetch`; a layer whose TOC cannot be had is left out (downloaded).
pub fn toc_layers(
    manifest: &[u8],
    covered: &HashSet<Digest>,
    fetch: impl Fn(&Desc, &TocRef) -> Result<FetchedToc, RegistryError>,
) -> HashMap<Digest, FetchedToc> {
    let mut out = HashMap::new();
    for (desc, annotations) in manifest_layer_descs(manifest) {
        if covered.contains(&desc.digest) {
            continue;
        }
        let Some(toc) = TocRef::of(&desc, &annotations) else {
            continue;
        };
        match fetch(&desc, &toc) {
            Ok(t) => {
                info!(layer = %desc.digest, toc_bytes = t.json.len(), "layer read by its TOC");
                out.insert(desc.digest, t);
            }
            Err(e) => {
                warn!(layer = %desc.digest, error = %e, "TOC unusable; the layer is downloaded")
            }
        }
    }
    out
}

/// The layer artifact a TOC amounts to (index and span map laid out on its members/frames).
pub fn toc_artifact(t: &FetchedToc, layer: &LayerDesc) -> anyhow::Result<LayerArtifact> {
    use anyhow::Context as _;
    let format = match &t.estargz {
        Some((toc_offset, member)) => crate::index::toc::TocFormat::Estargz {
            toc_offset: *toc_offset,
            toc_member: member,
        },
        None => crate::index::toc::TocFormat::ZstdChunked,
    };
    let toc = crate::index::toc::Toc {
        json: &t.json,
        blob_size: t.blob_size,
        format,
    };
    let laid = crate::index::toc::layout(&toc, layer.diff_id.as_str(), t.uncompressed_size)
        .with_context(|| format!("TOC of layer {}", layer.desc.digest))?;
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
