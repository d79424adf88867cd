//! Images: OCI index / manifest / config (parsed with oci-spec), platform choice, diff_ids and
//! chain IDs, and reading images out of OCI layouts, OCI archives and `docker save` archives.
//! Knows nothing of FUSE.

pub mod platform;
pub mod resolve;
pub mod source;
pub mod view;

use std::io;

use crate::blob::Compression;
use crate::digest::{Digest, InvalidDigest};
use crate::store::StoreError;

pub use platform::Platform;
pub use resolve::{resolve_images, Desc, LayerDesc, ResolvedImage};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("missing: {0}")]
    Missing(String),
    #[error("invalid image: {0}")]
    Invalid(String),
    #[error("malformed JSON in {what}: {why}")]
    Json { what: String, why: String },
    #[error("unknown media type {media_type:?} for {what}")]
    UnknownMediaType { media_type: String, what: String },
    #[error("no manifest for platform {wanted}; the image has: {present}")]
    NoPlatform { wanted: String, present: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Digest(#[from] InvalidDigest),
}

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// The compression a layer media type announces; `None` for media types that are not layers.
pub fn layer_compression(media_type: &str) -> Option<Compression> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | DOCKER_LAYER => Some(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | DOCKER_LAYER_GZIP
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(Compression::Zstd),
        _ => None,
    }
}

/// The OCI media type of a layer blob with compression `c`.
pub fn layer_media_type(c: Compression) -> &'static str {
    match c {
        Compression::None => "application/vnd.oci.image.layer.v1.tar",
        Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
        Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
    }
}

pub fn compression_name(c: Compression) -> &'static str {
    match c {
        Compression::None => "none",
        Compression::Gzip => "gzip",
        Compression::Zstd => "zstd",
    }
}

pub fn parse_compression(s: &str) -> Option<Compression> {
    match s {
        "none" => Some(Compression::None),
        "gzip" => Some(Compression::Gzip),
        "zstd" => Some(Compression::Zstd),
        _ => None,
    }
}

/// Parses a descriptor digest into ours (sha256 only, strictly).
pub fn digest_of(d: &oci_spec::image::Descriptor) -> Result<Digest, ImageError> {
    Ok(Digest::parse(d.digest().as_ref())?)
}

pub fn json_err(what: impl Into<String>) -> impl FnOnce(oci_spec::OciSpecError) -> ImageError {
    let what = what.into();
    move |e| ImageError::Json {
        what,
        why: e.to_string(),
    }
}
