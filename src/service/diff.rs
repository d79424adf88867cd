//! `containerd.services.diff.v1.Diff` as a proxy diff plugin: Apply onto a lazysnap snapshot
//! indexes the layer blob (from containerd's content store directory) instead of extracting
//! it; for any other mounts the answer is `Unimplemented`, which containerd's diff service
//! reads as "try the next differ in the `default` list" (e.g. `walking`).
//!
//! containerd loads proxy diff plugins from 1.7 on; 1.6 knows only snapshot and content proxies.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tonic::{Request, Response, Status};
use tracing::{info, info_span, warn, Instrument as _};

use super::proto::diff as pb;
use super::proto::types;
use super::snapshots::status_of;
use crate::digest::Digest;
use crate::snapshot::Snapshotter;

/// containerd's content store directory when it runs with its default root.
pub const DEFAULT_CONTAINERD_CONTENT: &str = "/var/lib/containerd/io.containerd.content.v1.content";

/// What Apply answers: the uncompressed layer.
pub const MEDIA_TYPE_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// The gRPC service; cheap to clone (the snapshotter is shared with the snapshots service).
#[derive(Clone)]
pub struct DiffService {
    sn: Arc<Mutex<Snapshotter>>,
}

impl DiffService {
    pub fn new(sn: Arc<Mutex<Snapshotter>>) -> Self {
        Self { sn }
    }
}

/// Where a blob lives in a containerd content store directory.
pub fn content_blob_path(content_dir: &Path, digest: &Digest) -> Option<PathBuf> {
    let algo = digest.as_str().split_once(':').map(|(a, _)| a)?;
    Some(content_dir.join("blobs").join(algo).join(digest.hex()))
}

/// The directory that names the snapshot behind `mounts`: a single bind's source (a FUSE
/// mountpoint, or an overlay-mode upper on no parent) or an overlay's `upperdir`.
fn single_bind_source(mounts: &[types::Mount]) -> Option<PathBuf> {
    match mounts {
        [m] if m.r#type == "bind" || m.r#type == "rbind" => Some(PathBuf::from(&m.source)),
        [m] if m.r#type == "overlay" => m
            .options
            .iter()
            .find_map(|o| o.strip_prefix("upperdir="))
            .map(PathBuf::from),
        _ => None,
    }
}

/// Media types Apply can index: plain, gzip and zstd tar layers, OCI and docker. Encrypted
/// or foreign layers go to the next differ.
fn indexable(media_type: &str) -> bool {
    const KNOWN: &[&str] = &[
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.diff.tar.zstd",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    ];
    KNOWN.contains(&media_type)
}

/// Outcome of an Apply request before it becomes a gRPC answer.
enum Applied {
    /// (diffID, uncompressed size)
    Done(Digest, u64),
    /// Not lazysnap's business: the next differ should try.
    NotMine(String),
}

fn apply_blocking(
    sn: &mut Snapshotter,
    desc: &types::Descriptor,
    mounts: &[types::Mount],
) -> Result<Applied, Status> {
    if let [m] = mounts {
        if m.r#type == "tmpfs" {
            if let Some((blob, diff_id, size)) =
                sn.indexed_at_prepare(&m.source).map_err(status_of)?
            {
                if blob != desc.digest {
                    return Err(Status::failed_precondition(format!(
                        "snapshot {} was prepared with layer {blob}, not {}",
                        m.source, desc.digest
                    )));
                }
                let diff_id = Digest::parse(&diff_id)
                    .map_err(|e| Status::internal(format!("diffID {diff_id:?}: {e}")))?;
                return Ok(Applied::Done(diff_id, size));
            }
        }
    }
    let Some(source) = single_bind_source(mounts) else {
        let kinds: Vec<&str> = mounts.iter().map(|m| m.r#type.as_str()).collect();
        return Ok(Applied::NotMine(format!(
            "mounts are not a single bind or overlay ({kinds:?})"
        )));
    };
    // The FUSE mountpoints are canonical paths; the request may name a symlinked spelling.
    let row = match sn.active_at(&source).map_err(status_of)? {
        Some(row) => row,
        None => match source.canonicalize().ok() {
            Some(c) if c != source => match sn.active_at(&c).map_err(status_of)? {
                Some(row) => row,
                None => {
                    return Ok(Applied::NotMine(format!(
                        "{} is not a lazysnap snapshot",
                        source.display()
                    )))
                }
            },
            _ => {
                return Ok(Applied::NotMine(format!(
                    "{} is not a lazysnap snapshot",
                    source.display()
                )))
            }
        },
    };
    if !indexable(&desc.media_type) {
        return Ok(Applied::NotMine(format!(
            "media type {} cannot be indexed",
            desc.media_type
        )));
    }
    let digest = Digest::parse(&desc.digest)
        .map_err(|e| Status::invalid_argument(format!("digest {:?}: {e}", desc.digest)))?;
    let Some(content) = sn.containerd_content.clone() else {
        return Ok(Applied::NotMine(
            "no containerd content directory configured (--containerd-content)".into(),
        ));
    };
    let Some(blob) = content_blob_path(&content, &digest).filter(|p| p.is_file()) else {
        return Ok(Applied::NotMine(format!(
            "blob {digest} is not in {}",
            content.display()
        )));
    };
    if desc.size > 0 {
        let len = std::fs::metadata(&blob)
            .map_err(|e| Status::internal(format!("{}: {e}", blob.display())))?
            .len();
        if len != desc.size as u64 {
            return Err(Status::failed_precondition(format!(
                "blob {digest} in {} has {len} bytes, the descriptor says {}",
                content.display(),
                desc.size
            )));
        }
    }
    let (diff_id, size) = sn
        .apply_layer(&row.key, &blob, &digest, &desc.media_type)
        .map_err(status_of)?;
    Ok(Applied::Done(diff_id, size))
}

#[tonic::async_trait]
impl pb::diff_server::Diff for DiffService {
    async fn apply(
        &self,
        request: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let r = request.into_inner();
        let desc = r
            .diff
            .ok_or_else(|| Status::invalid_argument("ApplyRequest.diff is missing"))?;
        let span = info_span!("Apply", digest = %desc.digest, media_type = %desc.media_type);
        let sn = self.sn.clone();
        let inner = span.clone();
        let started = std::time::Instant::now();
        let outcome = tokio::task::spawn_blocking(move || {
            let _entered = inner.enter();
            let mut guard = sn.lock().unwrap_or_else(|e| e.into_inner());
            apply_blocking(&mut guard, &desc, &r.mounts)
        })
        .instrument(span.clone())
        .await
        .map_err(|e| Status::internal(format!("apply task failed: {e}")))?;
        let _entered = span.enter();
        match outcome {
            Ok(Applied::Done(diff_id, size)) => {
                info!(diff_id = %diff_id, size, elapsed_ms = started.elapsed().as_millis() as u64, "layer indexed, not extracted");
                Ok(Response::new(pb::ApplyResponse {
                    applied: Some(types::Descriptor {
                        media_type: MEDIA_TYPE_LAYER_TAR.into(),
                        digest: diff_id.to_string(),
                        size: size as i64,
                        annotations: Default::default(),
                    }),
                }))
            }
            Ok(Applied::NotMine(why)) => {
                info!(reason = %why, "not applying: the next differ will");
                Err(Status::unimplemented(format!("lazysnap-diff: {why}")))
            }
            Err(status) => {
                warn!(code = ?status.code(), message = status.message(), "apply failed");
                Err(status)
            }
        }
    }

    async fn diff(
        &self,
        _request: Request<pb::DiffRequest>,
    ) -> Result<Response<pb::DiffResponse>, Status> {
        Err(Status::unimplemented(
            "lazysnap-diff does not compare mounts; the next differ will",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(src: &str) -> types::Mount {
        types::Mount {
            r#type: "bind".into(),
            source: src.into(),
            target: String::new(),
            options: vec!["rbind".into(), "rw".into()],
        }
    }

    #[test]
    fn only_a_single_bind_is_ours() {
        assert_eq!(single_bind_source(&[bind("/a")]), Some(PathBuf::from("/a")));
        assert_eq!(single_bind_source(&[bind("/a"), bind("/b")]), None);
        let overlay = types::Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec![],
        };
        assert_eq!(single_bind_source(&[overlay]), None);
        assert_eq!(single_bind_source(&[]), None);
    }

    #[test]
    fn blob_paths_follow_containerds_layout() {
        let d = Digest::parse(&format!("sha256:{}", "ab".repeat(32))).unwrap();
        assert_eq!(
            content_blob_path(Path::new("/c"), &d).unwrap(),
            PathBuf::from(format!("/c/blobs/sha256/{}", "ab".repeat(32)))
        );
    }

    #[test]
    fn encrypted_layers_are_not_indexed() {
        assert!(indexable("application/vnd.oci.image.layer.v1.tar+gzip"));
        assert!(!indexable(
            "application/vnd.oci.image.layer.v1.tar+gzip+encrypted"
        ));
    }
}
