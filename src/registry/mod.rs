//! The OCI distribution API: references, a blocking HTTP(S) client (manifests, blobs, range
//! reads, uploads) with retries and auth, a registry as an [`ImageSource`] so `pull` runs the
//! import pipeline unchanged, and `push`.
//!
//! [`ImageSource`]: crate::image::source::ImageSource

pub mod artifact;
pub mod auth;
pub mod blob;
pub mod client;
pub mod lazy;
pub mod prefetch;
pub mod pull;
pub mod push;
pub mod reference;
pub mod retry;
pub mod source;
pub mod tls;
pub mod toc;

pub use client::{Client, Endpoint};
pub use reference::Reference;

use crate::digest::Digest;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid image reference {reference:?}: {why}")]
    BadReference { reference: String, why: String },
    #[error("docker config: {0}")]
    Config(String),
    #[error("{what}: {source}")]
    Http {
        what: String,
        #[source]
        source: ureq::Error,
    },
    #[error("{what}: HTTP {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Status {
        what: String,
        status: u16,
        body: String,
    },
    #[error("not found: {0}")]
    NotFound(String),
    #[error("{registry} requires authentication and no credentials were found for it (docker config.json `auths.{registry}.auth`)")]
    AuthRequired { registry: String },
    #[error("authentication to {registry} failed{}: {detail}", user.as_ref().map(|u| format!(" for user {u:?}")).unwrap_or_default())]
    AuthFailed {
        registry: String,
        user: Option<String>,
        detail: String,
    },
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}
