//! `containerd.services.snapshots.v1.Snapshots` over the [`Snapshotter`]: one mutex around it,
//! every call on the blocking pool, errors mapped to the gRPC codes containerd's errdefs read.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tonic::{Request, Response, Status};
use tracing::{info_span, Instrument as _, Span};

use super::proto::snapshots as pb;
use super::proto::types;
use crate::snapshot::{self, Info, Kind, Mount, SnapshotError, Snapshotter};

/// Infos per `ListSnapshotsResponse` message (containerd's own server sends 100 per batch).
const LIST_BATCH: usize = 100;

/// The gRPC service; cheap to clone (the snapshotter is shared).
#[derive(Clone)]
pub struct SnapshotsService {
    sn: Arc<Mutex<Snapshotter>>,
}

impl SnapshotsService {
    pub fn new(sn: Arc<Mutex<Snapshotter>>) -> Self {
        Self { sn }
    }

    /// Runs `f` on the snapshotter on the blocking pool, inside `span`.
    async fn blocking<T, F>(&self, span: Span, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&mut Snapshotter) -> snapshot::Result<T> + Send + 'static,
    {
        let sn = self.sn.clone();
        let inner = span.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let _entered = inner.enter();
            let start = std::time::Instant::now();
            let mut guard = sn.lock().unwrap_or_else(|e| e.into_inner());
            let waited = start.elapsed();
            let r = f(&mut guard);
            tracing::debug!(
                wait_ms = waited.as_secs_f64() * 1e3,
                ms = (start.elapsed() - waited).as_secs_f64() * 1e3,
                ok = r.is_ok(),
                "done"
            );
            r
        })
        .instrument(span.clone())
        .await;
        let result = match joined {
            Ok(r) => r.map_err(status_of),
            Err(e) => Err(Status::internal(format!("snapshotter task failed: {e}"))),
        };
        if let Err(status) = &result {
            let _entered = span.enter();
            match status.code() {
                tonic::Code::Internal | tonic::Code::Unknown => {
                    tracing::error!(code = ?status.code(), message = status.message(), "request failed")
                }
                _ => {
                    tracing::debug!(code = ?status.code(), message = status.message(), "request refused")
                }
            }
        }
        result
    }
}

/// containerd's errdefs read the gRPC code: NotFound, AlreadyExists, FailedPrecondition and
/// InvalidArgument keep their meaning (containerd relies on AlreadyExists and NotFound).
pub fn status_of(e: SnapshotError) -> Status {
    match e {
        SnapshotError::NotFound(m) => Status::not_found(m),
        SnapshotError::AlreadyExists(m) => Status::already_exists(m),
        SnapshotError::FailedPrecondition(m) => Status::failed_precondition(m),
        SnapshotError::InvalidArgument(m) => Status::invalid_argument(m),
        SnapshotError::Internal(e) => Status::internal(format!("{e:#}")),
    }
}

fn labels_in(labels: HashMap<String, String>) -> BTreeMap<String, String> {
    labels.into_iter().collect()
}

fn mounts_out(mounts: Vec<Mount>) -> Vec<types::Mount> {
    mounts
        .into_iter()
        .map(|m| types::Mount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn kind_out(k: Kind) -> pb::Kind {
    match k {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    }
}

/// Values at or above this are Unix nanoseconds, below it Unix seconds (1e14 s is beyond the
/// year 3 million; 1e14 ns is in 1970): rows written before times were recorded in nanoseconds
/// keep seconds.
const NANOS_THRESHOLD: i64 = 100_000_000_000_000;

/// A snapshot time of the metadata (Unix seconds or nanoseconds, see [`NANOS_THRESHOLD`]) as
/// a protobuf Timestamp.
pub fn timestamp(t: i64) -> prost_types::Timestamp {
    if t.abs() >= NANOS_THRESHOLD {
        prost_types::Timestamp {
            seconds: t.div_euclid(1_000_000_000),
            nanos: t.rem_euclid(1_000_000_000) as i32,
        }
    } else {
        prost_types::Timestamp {
            seconds: t,
            nanos: 0,
        }
    }
}

pub fn info_out(i: &Info) -> pb::Info {
    pb::Info {
        name: i.name.clone(),
        parent: i.parent.clone(),
        kind: kind_out(i.kind) as i32,
        created_at: Some(timestamp(i.created_at)),
        updated_at: Some(timestamp(i.updated_at)),
        labels: i
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

fn require_key(key: &str, what: &str) -> Result<(), Status> {
    if key.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{what} must not be empty"
        )));
    }
    Ok(())
}

type ListStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::snapshots_server::Snapshots for SnapshotsService {
    async fn prepare(
        &self,
        request: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        let span = info_span!("Prepare", key = %r.key, parent = %r.parent);
        require_key(&r.key, "key")?;
        let labels = labels_in(r.labels);
        let mounts = self
            .blocking(span, move |sn| sn.prepare(&r.key, &r.parent, &labels))
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: mounts_out(mounts),
        }))
    }

    async fn view(
        &self,
        request: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        let span = info_span!("View", key = %r.key, parent = %r.parent);
        require_key(&r.key, "key")?;
        let labels = labels_in(r.labels);
        let mounts = self
            .blocking(span, move |sn| sn.view(&r.key, &r.parent, &labels))
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts_out(mounts),
        }))
    }

    async fn mounts(
        &self,
        request: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let r = request.into_inner();
        let span = info_span!("Mounts", key = %r.key);
        let mounts = self.blocking(span, move |sn| sn.mounts(&r.key)).await?;
        Ok(Response::new(pb::MountsResponse {
            mounts: mounts_out(mounts),
        }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        let span = info_span!("Commit", name = %r.name, key = %r.key);
        let labels = labels_in(r.labels);
        self.blocking(span, move |sn| {
            sn.commit(&r.name, &r.key, &labels)?;
            // containerd (since 1.0) removes the active snapshot on commit: its key is free
            // again and its parent can be removed. The commit stands even if this fails.
            if let Err(e) = sn.remove(&r.key) {
                tracing::warn!(key = %r.key, error = %e, "committed, but removing the active snapshot failed");
            }
            Ok(())
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        let span = info_span!("Remove", key = %r.key);
        self.blocking(span, move |sn| sn.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = request.into_inner();
        let span = info_span!("Stat", key = %r.key);
        let info = self.blocking(span, move |sn| sn.stat(&r.key)).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info_out(&info)),
        }))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let info = r
            .info
            .ok_or_else(|| Status::invalid_argument("update without info"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let span = info_span!("Update", key = %info.name, paths = ?paths);
        let labels = labels_in(info.labels);
        let updated = self
            .blocking(span, move |sn| sn.update(&info.name, &labels, &paths))
            .await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info_out(&updated)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = request.into_inner();
        let span = info_span!("List", filters = ?r.filters);
        let infos = self
            .blocking(span, move |sn| {
                let mut all = Vec::new();
                sn.walk(&r.filters, &mut |i| all.push(info_out(i)))?;
                Ok(all)
            })
            .await?;
        let mut batches = Vec::with_capacity(infos.len().div_ceil(LIST_BATCH));
        let mut infos = infos.into_iter().peekable();
        while infos.peek().is_some() {
            batches.push(Ok(pb::ListSnapshotsResponse {
                info: infos.by_ref().take(LIST_BATCH).collect(),
            }));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let r = request.into_inner();
        let span = info_span!("Usage", key = %r.key);
        let u = self.blocking(span, move |sn| sn.usage(&r.key)).await?;
        Ok(Response::new(pb::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(&self, _request: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        let span = info_span!("Cleanup");
        self.blocking(span, |sn| sn.cleanup()).await?;
        Ok(Response::new(()))
    }
}
