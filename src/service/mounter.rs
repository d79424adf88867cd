//! `InProcessMounter`: serves snapshot filesystems from the `serve` process itself (FUSE
//! sessions on background threads) instead of one daemon per mount.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lazysnap_fuse::{LayerStack, MountHandle, MountOptions};
use tracing::{info, warn};

use crate::blob::SpanCache;
use crate::layer::IndexedLayer;
use crate::root::Root;
use crate::snapshot::{MountSpec, Mounter};

/// Keeps the [`MountHandle`] of every filesystem it mounted, by mountpoint.
pub struct InProcessMounter {
    cache: Arc<SpanCache>,
    threads: Option<usize>,
    mounts: Mutex<HashMap<PathBuf, MountHandle>>,
    /// Opened layers by blob digest, shared by the mounts that stack them (layers are
    /// immutable), and kept [`LAYER_LINGER`] after their last use: containerd's unpack of a
    /// deep chain (prepare, apply, commit, next prepare) opens each layer once.
    layers: Mutex<HashMap<String, (Arc<IndexedLayer>, Instant)>>,
}

/// How long an opened layer no mount uses stays open.
const LAYER_LINGER: Duration = Duration::from_secs(60);

impl InProcessMounter {
    /// `cache_bytes` of decompressed spans are shared by all mounts; `threads` FUSE workers
    /// per mount (None: the fuse crate's default).
    pub fn new(cache_bytes: u64, threads: Option<usize>) -> Self {
        Self {
            cache: SpanCache::new(cache_bytes),
            threads,
            mounts: Mutex::new(HashMap::new()),
            layers: Mutex::new(HashMap::new()),
        }
    }

    /// The layer stack of `chain` (bottom first), reusing layers other mounts opened.
    fn open_stack(&self, root: &Root, chain: &str) -> anyhow::Result<LayerStack> {
        let rows = root.meta.chain_stack(chain)?;
        let now = Instant::now();
        let mut layers = self.layers.lock().unwrap_or_else(|e| e.into_inner());
        layers.retain(|_, (l, used)| {
            Arc::strong_count(l) > 1 || now.duration_since(*used) < LAYER_LINGER
        });
        let mut stack: LayerStack = Vec::with_capacity(rows.len());
        for row in &rows {
            let layer = match layers.get_mut(&row.blob_digest) {
                Some((l, used)) => {
                    *used = now;
                    l.clone()
                }
                None => {
                    let l = Arc::new(IndexedLayer::open(root, row, self.cache.clone())?);
                    layers.insert(row.blob_digest.clone(), (l.clone(), now));
                    l
                }
            };
            stack.push(layer);
        }
        Ok(stack)
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, MountHandle>> {
        // A panic elsewhere must not take every mount down with it: the map stays usable.
        self.mounts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Mountpoints this process serves.
    pub fn mounted(&self) -> Vec<PathBuf> {
        self.map().keys().cloned().collect()
    }

    /// Waits in the background for the serving threads of an unmounted filesystem to stop
    /// (they run on until the last bind mount of it is gone), so an unmount never blocks a
    /// request.
    fn reap(mountpoint: PathBuf, handle: MountHandle) {
        let spawned = std::thread::Builder::new()
            .name("fuse-reap".into())
            .spawn(move || {
                if let Err(e) = handle.join() {
                    warn!(mountpoint = %mountpoint.display(), error = %e, "FUSE session ended with an error");
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "no thread to reap a FUSE session; leaving it");
        }
    }
}

impl Mounter for InProcessMounter {
    fn mount(&self, root: &Root, spec: &MountSpec) -> anyhow::Result<()> {
        let mp = &spec.mountpoint;
        std::fs::create_dir_all(mp).with_context(|| format!("creating {}", mp.display()))?;
        if let Some(old) = self.map().remove(mp) {
            // Not expected (the snapshotter asks is_mounted first); replace it cleanly.
            lazysnap_fuse::unmount(mp)
                .with_context(|| format!("unmounting the old mount at {}", mp.display()))?;
            Self::reap(mp.clone(), old);
        }
        let stack = match &spec.chain_id {
            Some(chain) => self
                .open_stack(root, chain)
                .with_context(|| format!("opening the layers of {}", spec.key))?,
            None => Vec::new(),
        };
        let mut opts = MountOptions {
            fsname: format!("lazysnap:{}", spec.key.chars().take(48).collect::<String>()),
            upper: spec.upper.clone(),
            ..MountOptions::default()
        };
        if let Some(t) = self.threads {
            opts.threads = t.max(1);
        }
        let handle = lazysnap_fuse::mount(stack, mp, &opts)
            .with_context(|| format!("mounting {} at {}", spec.key, mp.display()))?;
        info!(key = %spec.key, mountpoint = %mp.display(), rw = spec.upper.is_some(), "mounted");
        self.map().insert(mp.clone(), handle);
        Ok(())
    }

    fn unmount(&self, mountpoint: &Path) -> anyhow::Result<()> {
        let handle = self.map().remove(mountpoint);
        if let Err(e) = lazysnap_fuse::unmount(mountpoint) {
            if let Some(h) = handle {
                self.map().insert(mountpoint.to_path_buf(), h);
            }
            return Err(
                anyhow::Error::new(e).context(format!("unmounting {}", mountpoint.display()))
            );
        }
        if let Some(h) = handle {
            Self::reap(mountpoint.to_path_buf(), h);
        }
        info!(mountpoint = %mountpoint.display(), "unmounted");
        Ok(())
    }

    fn is_mounted(&self, mountpoint: &Path) -> bool {
        // Ours, or a live mount of another process (a CLI daemon on the same root); a handle
        // whose filesystem was unmounted from outside does not count.
        lazysnap_fuse::is_mountpoint(mountpoint) && !lazysnap_fuse::is_stale_mount(mountpoint)
    }
}
