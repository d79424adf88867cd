//! The lazysnap root directory: where the content store, indexes, metadata and snapshots live.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::meta::Meta;
use crate::store::ContentStore;

/// The default root: `$LAZYSNAP_ROOT`, else `/var/lib/lazysnap` for root (of the
/// initial user namespace), else
/// `$XDG_DATA_HOME/lazysnap` (`~/.local/share/lazysnap`).
pub fn default_root() -> PathBuf {
    if let Some(r) = std::env::var_os("LAZYSNAP_ROOT").filter(|r| !r.is_empty()) {
        return PathBuf::from(r);
    }
    // Root of a user namespace (`unshare -r`, rootless containerd) is still the user.
    if lazysnap_fuse::privileged() {
        return PathBuf::from("/var/lib/lazysnap");
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    data.join("lazysnap")
}

pub struct Root {
    pub path: PathBuf,
    pub store: ContentStore,
    pub meta: Meta,
    /// What a layer may expand to when indexed (the CLI's `--max-layer-size`/`--max-layer-ratio`).
    pub limits: crate::unpack::Limits,
}

impl Root {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(path)
            .with_context(|| format!("creating root {}", path.display()))?;
        for sub in ["index", "snapshots"] {
            std::fs::create_dir_all(path.join(sub))
                .with_context(|| format!("creating {}", path.join(sub).display()))?;
        }
        let store = ContentStore::open(path)?;
        let meta = Meta::open(&path.join("meta.db"))
            .with_context(|| format!("opening {}", path.join("meta.db").display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            store,
            meta,
            limits: crate::unpack::Limits::default(),
        })
    }

    pub fn index_dir(&self) -> PathBuf {
        self.path.join("index")
    }

    /// Paths are stored relative to the root so a root can be moved.
    pub fn abs(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }
}
