//! `lazysnap serve`: containerd's snapshots API on a unix socket. Each snapshot's filesystem is
//! served by a detached `lazysnap mount` daemon of its own, so a restart or crash of the server
//! (an upgrade, a kill -9) leaves running containers' mounts working; with
//! `--in-process-mounts` they are served by this process (one shared cache, but they end with
//! it). On start it re-attaches the active snapshots and views of the root (a filesystem whose
//! daemon died is mounted again); on SIGTERM/SIGINT it stops accepting and returns, unmounting
//! only what it served itself.

use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context as _};
use tracing::{info, info_span, warn};

use super::diff::DiffService;
use super::mounter::InProcessMounter;
use super::proto::diff::diff_server::DiffServer;
use super::proto::snapshots::snapshots_server::SnapshotsServer;
use super::snapshots::SnapshotsService;
use crate::root::Root;
use crate::snapshot::Snapshotter;

pub struct ServeOptions {
    pub root: PathBuf,
    /// The unix socket to listen on.
    pub address: PathBuf,
    /// Memory for decompressed spans, shared by all mounts.
    pub cache_bytes: u64,
    /// FUSE worker threads per mount (None: the fuse crate's default).
    pub threads: Option<usize>,
    /// containerd's content store directory (`.../io.containerd.content.v1.content`): where
    /// the diff plugin and the remote-snapshot labels find layer blobs.
    pub containerd_content: Option<PathBuf>,
    /// Serve filesystems from this process instead of one detached daemon per snapshot.
    pub in_process_mounts: bool,
    /// Who holds active snapshots' writes (None: what works here).
    pub upper_mode: Option<crate::snapshot::UpperMode>,
    /// Lazy layers for remote-snapshot pulls (None: containerd fetches every layer).
    pub remote: Option<crate::snapshot::remote::RemoteConfig>,
}

/// How long a stop waits for clients to close their connections.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs the server until SIGTERM/SIGINT. Builds its own tokio runtime.
pub fn run(opts: ServeOptions) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lazysnap-serve")
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(serve(opts, shutdown_signal()))
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM: shutting down"),
                _ = int.recv() => info!("SIGINT: shutting down"),
            }
        }
        (Err(e), _) | (_, Err(e)) => {
            warn!(error = %e, "no signal handlers; serving until killed");
            std::future::pending::<()>().await;
        }
    }
}

/// Opens the root, re-attaches its snapshots, serves on `opts.address` until `shutdown`
/// resolves, then unmounts everything.
pub async fn serve(
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.root)
        .with_context(|| format!("creating root {}", opts.root.display()))?;
    // Mountpoints are compared with /proc/self/mountinfo: they must be canonical.
    let root_path = opts
        .root
        .canonicalize()
        .with_context(|| format!("root {}", opts.root.display()))?;
    let mounter: Box<dyn crate::snapshot::Mounter> = if opts.in_process_mounts {
        Box::new(InProcessMounter::new(opts.cache_bytes, opts.threads))
    } else {
        Box::new(crate::mount::DaemonMounter {
            root_path: root_path.clone(),
            cache_bytes: opts.cache_bytes,
            threads: opts.threads,
            owners: lazysnap_fuse::Owners::Image,
        })
    };
    let in_process = opts.in_process_mounts;
    let containerd_content = opts.containerd_content.clone();
    let remote = opts.remote.clone();
    let upper_mode = opts.upper_mode;
    let sn = tokio::task::spawn_blocking(move || -> anyhow::Result<Snapshotter> {
        let root = Root::open(&root_path)?;
        let mut sn = Snapshotter::new(root, mounter);
        sn.upper_mode = upper_mode;
        let (mode, why) = sn.upper_mode();
        info!(
            upper = mode.as_str(),
            why, "active snapshots' writable layer"
        );
        sn.containerd_content = containerd_content;
        sn.remote = remote.map(crate::snapshot::remote::Resolver::new);
        reattach(&mut sn);
        // Mounts served by an older build's daemons move to this one.
        match crate::keeper::upgrade_outdated(&sn.root().path) {
            Ok(done) => {
                for u in done {
                    match u.refused {
                        None => info!(mountpoint = %u.mountpoint.display(), old = u.old, new = u.new, ms = u.ms, "mount daemon upgraded to this build"),
                        Some(why) => warn!(mountpoint = %u.mountpoint.display(), daemon = u.old, why, "mount daemon not upgraded to this build; it serves on"),
                    }
                }
            }
            Err(e) => warn!(error = %format!("{e:#}"), "upgrading older mount daemons failed"),
        }
        Ok(sn)
    })
    .await
    .context("opening the root")??;
    let sn = Arc::new(Mutex::new(sn));

    let listener = bind(&opts.address)?;
    info!(address = %opts.address.display(), root = %opts.root.display(), "serving containerd's snapshots API");
    let service = SnapshotsService::new(sn.clone());
    let diff = DiffService::new(sn.clone());
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .trace_fn(|req| info_span!("grpc", path = %req.uri().path()))
        .add_service(SnapshotsServer::new(service))
        .add_service(DiffServer::new(diff))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            async move {
                shutdown.await;
                let _ = signalled_tx.send(());
            },
        );
    // A graceful stop waits for clients to close their connections, and containerd keeps its
    // connection open: after SHUTDOWN_GRACE the remaining connections are dropped. Requests
    // already on the blocking pool still finish (close() below waits for the snapshotter).
    tokio::pin!(server);
    let served = tokio::select! {
        r = &mut server => r,
        _ = async {
            if signalled_rx.await.is_ok() {
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            warn!(grace_s = SHUTDOWN_GRACE.as_secs(), "clients still connected after the grace period; closing their connections");
            Ok(())
        }
    };
    if let Err(e) = &served {
        warn!(error = %e, "the server stopped with an error");
    }
    let _ = std::fs::remove_file(&opts.address);
    if !in_process {
        info!("filesystems stay with their daemons; bye");
        return served.context("serving");
    }
    let closed = tokio::task::spawn_blocking(move || {
        let mut sn = sn.lock().unwrap_or_else(|e| e.into_inner());
        sn.close()
    })
    .await
    .context("unmounting")?;
    closed.context("unmounting the snapshots' filesystems")?;
    info!("all filesystems unmounted; bye");
    served.context("serving")
}

/// Mounts every active snapshot and view whose filesystem is not mounted (a stale mount of a
/// previous server is cleaned first, by the mounter). Failures are logged: the snapshot's
/// `Mounts` call retries.
fn reattach(sn: &mut Snapshotter) {
    let _span = info_span!("reattach").entered();
    let mut keys = Vec::new();
    if let Err(e) = sn.walk(&[], &mut |i| {
        if i.kind != crate::snapshot::Kind::Committed {
            keys.push(i.name.clone());
        }
    }) {
        warn!(error = %e, "listing snapshots to re-attach failed");
        return;
    }
    for key in keys {
        if let Err(e) = sn.mounts(&key) {
            warn!(key, error = %e, "re-attaching the snapshot failed");
        }
    }
}

/// Listens on `path`: a stale socket file is removed first (a live server there is an
/// error); the socket gets mode 0660.
fn bind(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if !md.file_type().is_socket() {
            bail!("{} exists and is not a socket", path.display());
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("{} is in use by a running server", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(listener)
}
