//! containerd's `Snapshotter` contract over the metadata store: key space, kinds, parent rules,
//! commit, remove, walk with filters, usage, labels, cleanup. It only orchestrates: metadata
//! lives in [`crate::meta`], layers are made by [`commit`], filesystems are mounted by a
//! [`Mounter`] (daemons for the CLI, in-process for `serve`).

pub mod commit;
pub mod content_scan;
pub mod filter;
pub mod overlay;
pub mod remote;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Serialize;
use tracing::{info_span, warn};

use crate::blob::Compression;
use crate::meta::{MetaError, SnapshotRow};
use crate::root::Root;

pub use filter::Filter;
pub use overlay::UpperMode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    View,
    Active,
    Committed,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }

    fn from_meta(s: &str) -> Kind {
        match s {
            "view" => Kind::View,
            "active" => Kind::Active,
            _ => Kind::Committed,
        }
    }
}

/// containerd's `snapshots.Info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Info {
    pub name: String,
    /// "" when the snapshot has no parent.
    pub parent: String,
    pub kind: Kind,
    pub labels: BTreeMap<String, String>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl From<&SnapshotRow> for Info {
    fn from(r: &SnapshotRow) -> Self {
        Info {
            name: r.key.clone(),
            parent: r.parent.clone().unwrap_or_default(),
            kind: Kind::from_meta(&r.kind),
            labels: r.labels.clone(),
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// containerd's `mount.Mount`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mount {
    #[serde(rename = "type")]
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// containerd's `snapshots.Usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct Usage {
    pub size: i64,
    pub inodes: i64,
}

/// Errors that map onto containerd's errdefs.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{0:#}")]
    Internal(#[from] anyhow::Error),
}

impl From<MetaError> for SnapshotError {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::NotFound(s) => SnapshotError::NotFound(s),
            MetaError::AlreadyExists(s) => SnapshotError::AlreadyExists(s),
            MetaError::FailedPrecondition(s) => SnapshotError::FailedPrecondition(s),
            MetaError::InvalidArgument(s) => SnapshotError::InvalidArgument(s),
            other => SnapshotError::Internal(other.into()),
        }
    }
}

impl From<filter::FilterError> for SnapshotError {
    fn from(e: filter::FilterError) -> Self {
        SnapshotError::InvalidArgument(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, SnapshotError>;

/// What a mounter needs to serve one snapshot's filesystem.
#[derive(Debug, Clone)]
pub struct MountSpec {
    pub key: String,
    /// The chain of read-only layers (None = no layers).
    pub chain_id: Option<String>,
    /// The writable upper directory (None = read-only view).
    pub upper: Option<PathBuf>,
    pub mountpoint: PathBuf,
    /// `key` is a chain ID served read-only with no snapshot row behind it: the shared lower
    /// of overlay-mode snapshots.
    pub shared_lower: bool,
}

/// Serves snapshot filesystems. The CLI starts a daemon per mount; `serve` mounts in-process.
pub trait Mounter: Send + Sync {
    fn mount(&self, root: &Root, spec: &MountSpec) -> anyhow::Result<()>;
    fn unmount(&self, mountpoint: &Path) -> anyhow::Result<()>;
    /// A live mount (not a stale one of a dead daemon) is at `mountpoint`.
    fn is_mounted(&self, mountpoint: &Path) -> bool;
}

fn snapshot_dir(root: &Root, row: &SnapshotRow) -> PathBuf {
    root.path.join("snapshots").join(row.id.to_string())
}

fn mountpoint_of(root: &Root, row: &SnapshotRow) -> PathBuf {
    match &row.mountpoint {
        Some(m) => PathBuf::from(m),
        None => snapshot_dir(root, row).join("mnt"),
    }
}

/// What serving snapshot `key` takes: its layer chain, its upper (active only), its mountpoint.
pub fn spec_for(root: &Root, key: &str) -> Result<MountSpec> {
    let row = root
        .meta
        .snapshot(key)?
        .ok_or_else(|| SnapshotError::NotFound(format!("snapshot {key}")))?;
    if row.kind == "committed" {
        return Err(SnapshotError::FailedPrecondition(format!(
            "snapshot {key} is committed: only active snapshots have mounts"
        )));
    }
    Ok(MountSpec {
        key: key.to_string(),
        chain_id: row.chain_id.clone(),
        upper: (row.kind == "active").then(|| snapshot_dir(root, &row).join("upper")),
        mountpoint: mountpoint_of(root, &row),
        shared_lower: false,
    })
}

/// An overlay-mode snapshot has a `work` directory beside its upper (made with the row): its
/// upper is in overlay's form (whiteouts are 0/0 devices) and its filesystem is the kernel's.
pub fn is_overlay_dir(snapshot_dir: &Path) -> bool {
    snapshot_dir.join("work").is_dir()
}

/// The chains whose shared lower some overlay-mode active snapshot or view of `rows` uses:
/// any such snapshot handed to a client (containerd mounts it when it likes), but one with a
/// mountpoint of its own (`mount --rw DIR`) only while it is mounted there, so `umount DIR`
/// lets the lower go (a later `mount --rw DIR` or commit mounts it again).
pub fn lowers_in_use(root: &Root, rows: &[SnapshotRow]) -> std::collections::HashSet<String> {
    let mounted = lazysnap_fuse::mountpoints();
    rows.iter()
        .filter(|r| r.kind != "committed" && is_overlay_dir(&snapshot_dir(root, r)))
        .filter(|r| {
            r.mountpoint
                .as_deref()
                .is_none_or(|m| mounted.contains(Path::new(m)))
        })
        .filter_map(|r| r.chain_id.clone())
        .collect()
}

/// The shared lowers under the root (mounted or left as directories) that none of `rows`
/// uses, as (chain, directory): what `cleanup` and `check --repair` remove.
pub fn unused_lowers(root: &Root, rows: &[SnapshotRow]) -> Vec<(String, PathBuf)> {
    let used = lowers_in_use(root, rows);
    let Ok(entries) = std::fs::read_dir(root.path.join("lowers")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| Some((overlay::chain_of_lower(&e.path())?, e.path())))
        .filter(|(c, _)| !used.contains(c))
        .collect()
}

/// Gives a new upper directory the attributes of the parent's root (mode, owner, times,
/// xattrs): the upper root stands for the merged root, and a commit writes it as `./`. The
/// merged view decides which layer's root that is (implicit roots defer to lower layers).
/// The parent's root attributes are read before the snapshot is recorded
/// ([`upper_root_attrs`]) and applied while its row is being inserted ([`init_upper_root`]),
/// so a crash never leaves a recorded snapshot with an uninitialised upper.
struct UpperRoot {
    attr: lazysnap_fuse::NodeAttr,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn upper_root_attrs(root: &Root, chain: &str) -> anyhow::Result<Option<UpperRoot>> {
    let stack = crate::layer::open_stack(root, chain, crate::blob::SpanCache::new(1 << 20))?;
    let merged = lazysnap_fuse::Merged::new(stack);
    let Some(attr) = merged.attr(lazysnap_fuse::ROOT_INO) else {
        return Ok(None);
    };
    let xattrs = merged
        .xattrs(lazysnap_fuse::ROOT_INO)
        .map_err(|e| anyhow::anyhow!("reading the root's xattrs: {e:?}"))?;
    Ok(Some(UpperRoot { attr, xattrs }))
}

fn init_upper_root(upper_root: &UpperRoot, upper: &Path) -> anyhow::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let UpperRoot { attr, xattrs } = upper_root;
    let c = std::ffi::CString::new(upper.as_os_str().as_bytes())?;
    // SAFETY: plain syscalls on a path we just created.
    unsafe {
        if libc::chown(c.as_ptr(), attr.uid, attr.gid) != 0 && lazysnap_fuse::privileged() {
            return Err(std::io::Error::last_os_error().into());
        }
        if libc::chmod(c.as_ptr(), attr.perm & 0o7777) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    if !lazysnap_fuse::privileged() {
        // The owner cannot be set: record it as the mount records every unprivileged change.
        let o = lazysnap_fuse::Override {
            uid: attr.uid,
            gid: attr.gid,
            mode: libc::S_IFDIR | (attr.perm & 0o7777),
            rdev: 0,
        };
        let dir = std::fs::File::open(upper)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", upper.display()))?;
        lazysnap_fuse::ownership::write_override_fd(std::os::fd::AsFd::as_fd(&dir), &o)
            .map_err(|e| anyhow::anyhow!("recording the owner of {}: {e}", upper.display()))?;
    }
    for (name, value) in xattrs {
        let n = std::ffi::CString::new(name.clone())?;
        // SAFETY: name and value outlive the call.
        unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            );
        }
    }
    let ts = |t: lazysnap_fuse::Timestamp| libc::timespec {
        tv_sec: t.sec,
        tv_nsec: i64::from(t.nsec),
    };
    let times = [ts(attr.atime), ts(attr.mtime)];
    // SAFETY: times is a valid two-element array.
    if unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// Removes the directory of a snapshot no row owns, unmounting a filesystem a daemon may
/// still serve on its `mnt` first (never descending into a live mount).
pub fn remove_orphan_dir(mounter: &dyn Mounter, dir: &Path) -> anyhow::Result<()> {
    let mnt = dir.join("mnt");
    if lazysnap_fuse::is_stale_mount(&mnt) || mounter.is_mounted(&mnt) {
        mounter
            .unmount(&mnt)
            .map_err(|e| e.context(format!("unmounting {}", mnt.display())))?;
    }
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

/// containerd's remote-snapshot labels: the committed name the unpacker aims at, and the
/// layer blob (set by CRI / nerdctl pulls).
/// The source of the tmpfs a Prepare hands containerd's differ when it indexed the layer
/// already; followed by the snapshot's id.
pub const INDEXED_AT_PREPARE: &str = "lazysnap-indexed-";

pub const LABEL_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
pub const LABEL_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
pub const LABEL_LAYER_MEDIA_TYPE: &str = "containerd.io/snapshot/cri.layer-media-type";

pub struct Snapshotter {
    root: Root,
    mounter: Box<dyn Mounter>,
    pub compression: Compression,
    /// containerd's content store (`.../io.containerd.content.v1.content`), where layer blobs
    /// named by remote-snapshot labels are found.
    pub containerd_content: Option<PathBuf>,
    scan: content_scan::ContentScan,
    /// Lazy layers from lazysnap index artifacts for the remote-snapshot labels (`serve`).
    pub remote: Option<remote::Resolver>,
    /// Who holds new active snapshots' writes; None: what works here ([`UpperMode::detect`]).
    pub upper_mode: Option<UpperMode>,
}

impl Snapshotter {
    pub fn new(root: Root, mounter: Box<dyn Mounter>) -> Self {
        Self {
            root,
            mounter,
            compression: Compression::Zstd,
            containerd_content: None,
            scan: content_scan::ContentScan::default(),
            remote: None,
            upper_mode: None,
        }
    }

    /// The upper mode new snapshots get, and why.
    pub fn upper_mode(&self) -> (UpperMode, &'static str) {
        match self.upper_mode {
            Some(m) => (m, "chosen with --upper"),
            None => UpperMode::detect(),
        }
    }

    /// The upper mode of an existing snapshot.
    pub fn mode_of(&self, row: &SnapshotRow) -> UpperMode {
        if is_overlay_dir(&self.dir(row)) {
            UpperMode::Overlay
        } else {
            UpperMode::Fuse
        }
    }

    fn lower_mountpoint(&self, chain: &str) -> PathBuf {
        overlay::lower_mountpoint(&self.root.path, chain)
    }

    /// Mounts the shared read-only lower of `chain` unless it is mounted; returns where.
    /// `_held`: the lowers lock, held by the caller until the lower is in use (mounted over,
    /// or read by a commit), so no release in between unmounts it.
    fn ensure_lower(&self, chain: &str, _held: &crate::root::StoreLock) -> Result<PathBuf> {
        let mp = self.lower_mountpoint(chain);
        if self.mounter.is_mounted(&mp) {
            return Ok(mp);
        }
        let _span = info_span!("mount_lower", chain).entered();
        self.serve_spec(&MountSpec {
            key: chain.to_string(),
            chain_id: Some(chain.to_string()),
            upper: None,
            mountpoint: mp.clone(),
            shared_lower: true,
        })?;
        tracing::info!(chain, mountpoint = %mp.display(), "shared lower mounted");
        Ok(mp)
    }

    /// After `umount DIR` of a `mount --rw DIR` snapshot in overlay mode: its shared lower
    /// goes unless another snapshot uses it (the snapshot and its upper stay for a later
    /// `mount --rw DIR` or commit, which mount the lower again).
    pub fn unmounted(&self, dir: &Path) -> Result<()> {
        let Some(row) = self.active_at(dir)? else {
            return Ok(());
        };
        match (self.mode_of(&row), row.chain_id.as_deref()) {
            (UpperMode::Overlay, Some(chain)) => self.release_lower(chain),
            _ => Ok(()),
        }
    }

    /// Unmounts the shared lower of `chain` when no snapshot uses it any more.
    fn release_lower(&self, chain: &str) -> Result<()> {
        let _lock = overlay::lock_lowers(&self.root.path)?;
        if lowers_in_use(&self.root, &self.root.meta.snapshots()?).contains(chain) {
            return Ok(());
        }
        let mp = self.lower_mountpoint(chain);
        if self.mounter.is_mounted(&mp) || lazysnap_fuse::is_stale_mount(&mp) {
            self.mounter.unmount(&mp)?;
            tracing::info!(chain, "shared lower unmounted: no snapshot uses it");
        }
        let _ = std::fs::remove_dir(&mp);
        Ok(())
    }

    /// The mounts of overlay-mode snapshot `row`, its lower mounted.
    fn overlay_mounts(
        &self,
        row: &SnapshotRow,
        held: &crate::root::StoreLock,
    ) -> Result<Vec<Mount>> {
        let lower = match &row.chain_id {
            Some(chain) => Some(self.ensure_lower(chain, held)?),
            None => None,
        };
        let dir = self.dir(row);
        Ok(overlay::mounts(
            lower.as_deref(),
            &dir.join("upper"),
            &dir.join("work"),
            row.kind == "view",
        ))
    }

    pub fn root(&self) -> &Root {
        &self.root
    }

    pub fn root_mut(&mut self) -> &mut Root {
        &mut self.root
    }

    fn dir(&self, row: &SnapshotRow) -> PathBuf {
        snapshot_dir(&self.root, row)
    }

    pub fn upper_dir(&self, row: &SnapshotRow) -> PathBuf {
        self.dir(row).join("upper")
    }

    pub fn mountpoint(&self, row: &SnapshotRow) -> PathBuf {
        mountpoint_of(&self.root, row)
    }

    /// The layer indexed at Prepare into the snapshot whose throwaway tmpfs has `source`
    /// (see `prepare_extraction`): (blob digest, diffID, uncompressed size).
    pub fn indexed_at_prepare(&self, source: &str) -> Result<Option<(String, String, u64)>> {
        let Some(id) = source
            .strip_prefix(INDEXED_AT_PREPARE)
            .and_then(|n| n.parse::<i64>().ok())
        else {
            return Ok(None);
        };
        let meta = &self.root.meta;
        let Some(row) = meta.snapshots()?.into_iter().find(|r| r.id == id) else {
            return Ok(None);
        };
        let Some(blob) = row
            .applied_blob
            .as_deref()
            .map(|b| meta.blob(b))
            .transpose()?
            .flatten()
        else {
            return Ok(None);
        };
        let Some(layer) = meta.layer(&blob.diff_id)? else {
            return Ok(None);
        };
        Ok(Some((blob.digest, blob.diff_id, layer.uncompressed_size)))
    }

    /// The active snapshot mounted at `dir` (for `mount --rw` / `commit DIR`), or whose upper
    /// directory `dir` is (an overlay's `upperdir`, the bind of an overlay-mode snapshot on no
    /// parent: what the diff service is handed).
    pub fn active_at(&self, dir: &Path) -> Result<Option<SnapshotRow>> {
        Ok(self.root.meta.snapshots()?.into_iter().find(|r| {
            r.kind == "active"
                && (self.mountpoint(r) == dir
                    || (self.upper_dir(r) == dir && self.mode_of(r) == UpperMode::Overlay))
        }))
    }

    fn row(&self, key: &str) -> Result<SnapshotRow> {
        self.root
            .meta
            .snapshot(key)?
            .ok_or_else(|| SnapshotError::NotFound(format!("snapshot {key}")))
    }

    pub fn stat(&self, key: &str) -> Result<Info> {
        Ok(Info::from(&self.row(key)?))
    }

    /// The spec to serve an active snapshot or view.
    pub fn mount_spec(&self, key: &str) -> Result<MountSpec> {
        spec_for(&self.root, key)
    }

    fn mounts_of(&self, row: &SnapshotRow) -> Vec<Mount> {
        let ro = row.kind == "view";
        vec![Mount {
            kind: "bind".into(),
            source: self.mountpoint(row).display().to_string(),
            options: vec!["rbind".into(), if ro { "ro" } else { "rw" }.into()],
        }]
    }

    /// Mounts of an active snapshot or view; re-attaches its filesystem if it is gone.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let _span = info_span!("mounts", key).entered();
        let row = self.row(key)?;
        if row.kind == "committed" {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key} is committed: only active snapshots have mounts"
            )));
        }
        self.attach(&row)
    }

    /// Serves `spec` unless it is served: a stale mount of a dead server or daemon (which
    /// cannot even be stat'ed until unmounted) is cleaned first.
    fn serve_spec(&self, spec: &MountSpec) -> Result<()> {
        if self.mounter.is_mounted(&spec.mountpoint) {
            return Ok(());
        }
        if lazysnap_fuse::is_stale_mount(&spec.mountpoint) {
            warn!(
                key = spec.key,
                "the filesystem's daemon is gone; mounting it again"
            );
            lazysnap_fuse::unmount(&spec.mountpoint).map_err(|e| {
                SnapshotError::Internal(anyhow::Error::new(e).context(format!(
                    "cleaning the stale mount at {}",
                    spec.mountpoint.display()
                )))
            })?;
        }
        self.mounter
            .mount(&self.root, spec)
            .map_err(|e| SnapshotError::Internal(e.context(format!("mounting {}", spec.key))))
    }

    /// Makes sure the filesystem of active snapshot or view `row` is served, and mounted at
    /// its own mountpoint when it has one (`mount --rw`); returns its mounts.
    fn attach(&self, row: &SnapshotRow) -> Result<Vec<Mount>> {
        if self.mode_of(row) == UpperMode::Fuse {
            self.serve_spec(&spec_for(&self.root, &row.key)?)?;
            return Ok(self.mounts_of(row));
        }
        let lock = overlay::lock_lowers(&self.root.path)?;
        let mounts = self.overlay_mounts(row, &lock)?;
        let Some(mp) = row.mountpoint.as_deref().map(Path::new) else {
            return Ok(mounts);
        };
        if !lazysnap_fuse::is_mountpoint(mp) {
            overlay::mount(&mounts[0], mp).map_err(SnapshotError::Internal)?;
        }
        drop(lock);
        Ok(self.mounts_of(row))
    }

    pub fn prepare(
        &mut self,
        key: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        if let Some(target) = self.remote_layer(parent, labels)? {
            // The remote-snapshot protocol: the layer is prepared from the content store and
            // committed under the name the unpacker wants; AlreadyExists tells containerd to
            // skip fetching and applying it.
            return Err(SnapshotError::AlreadyExists(format!(
                "snapshot {target} (prepared without fetching its layer)"
            )));
        }
        if let Some(mounts) = self.prepare_extraction(key, parent, labels)? {
            return Ok(mounts);
        }
        self.create(key, parent, labels, false, None)
    }

    /// containerd 1.6 unpacks by Prepare("extract-… <chainID>"), the walking differ untarring
    /// into the mounts, then Commit. When the layer blob behind that chain is in containerd's
    /// content store, index it now (nothing is extracted into the snapshot) and hand the differ
    /// a throwaway tmpfs: its copy is discarded and Commit records the indexed layer.
    fn prepare_extraction(
        &mut self,
        key: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Option<Vec<Mount>>> {
        let (Some(content), Some(chain)) = (
            self.containerd_content.clone(),
            content_scan::chain_of_extract_key(key),
        ) else {
            return Ok(None);
        };
        let Some(blob) = self.scan.find(&content, chain) else {
            return Ok(None);
        };
        if !blob.path.is_file() {
            // client.Pull's unpacker (CRI, nerdctl) prepares before it fetches the layer.
            return Ok(None);
        }
        // The parent must be the chain below, or the layer would land on the wrong stack.
        let parent_chain = if parent.is_empty() {
            None
        } else {
            self.root.meta.snapshot(parent)?.and_then(|p| p.chain_id)
        };
        let expected = match &parent_chain {
            None => blob.diff_id.clone(),
            Some(p) => {
                let p = crate::digest::Digest::parse(p)
                    .map_err(|e| SnapshotError::Internal(e.into()))?;
                crate::digest::Digest::chain_ids(&[p, blob.diff_id.clone()])[1].clone()
            }
        };
        if expected.as_str() != chain {
            return Ok(None);
        }
        // Nothing is mounted: the differ gets the tmpfs below, Commit records the index.
        let row = self.record(key, parent, labels, false, None)?;
        if let Err(e) = self.apply_layer(key, &blob.path, &blob.digest, &blob.media_type) {
            let _ = self.remove(key);
            return Err(e);
        }
        Ok(Some(vec![Mount {
            kind: "tmpfs".into(),
            // Names the snapshot, so lazysnap's own differ (containerd >= 1.7, which also
            // takes this path when the blob is already in its store) answers without copying.
            source: format!("{INDEXED_AT_PREPARE}{}", row.id),
            options: vec!["mode=755".into()],
        }]))
    }

    /// containerd's remote-snapshot protocol: `labels` name the committed snapshot the
    /// unpacker is about to make (`containerd.io/snapshot.ref` = its chain ID) and, from
    /// `AppendInfoHandlerWrapper` (CRI, nerdctl, `tools/rpull`), the image, manifest and layer.
    /// When that snapshot can be made here without containerd fetching the layer, it is made
    /// (committed on `parent`, labelled with the ref so containerd's Walk finds it) and its
    /// name returned; the caller answers AlreadyExists. In order: a snapshot made earlier for
    /// this ref and parent; the chain already known to lazysnap (pulled, imported, unpacked
    /// before); the layer blob in containerd's content store (indexed); the layer's lazysnap
    /// index artifact in the registry (recorded lazily: the blob stays there). Otherwise
    /// `None`: containerd fetches and applies the layer as usual.
    fn remote_layer(
        &mut self,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Option<String>> {
        let Some(target) = labels.get(LABEL_SNAPSHOT_REF) else {
            return Ok(None);
        };
        if crate::digest::Digest::parse(target).is_err() {
            return Ok(None);
        }
        let _span = info_span!("remote_layer", target, parent).entered();
        if let Some(name) = self.snapshot_for_ref(target, parent)? {
            return Ok(Some(name));
        }
        let parent_chain = if parent.is_empty() {
            None
        } else {
            match self.root.meta.snapshot(parent)? {
                Some(p) if p.kind == "committed" => p.chain_id,
                _ => return Ok(None),
            }
        };
        let mut inherited: BTreeMap<String, String> = labels
            .iter()
            .filter(|(k, _)| crate::meta::inheritable_label(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // containerd finds the snapshot by Walk with labels."containerd.io/snapshot.ref".
        inherited.insert(LABEL_SNAPSHOT_REF.to_string(), target.clone());
        if let Some(made) = self.known_chain(target, parent_chain.as_deref())? {
            return self.commit_ref(target, parent, &made, &inherited).map(Some);
        }
        let Some(layer) = labels
            .get(LABEL_LAYER_DIGEST)
            .and_then(|l| crate::digest::Digest::parse(l).ok())
        else {
            return Ok(None);
        };
        if let Some(content) = self.containerd_content.clone() {
            let blob = content.join("blobs/sha256").join(layer.hex());
            if blob.is_file() {
                let media_type = labels
                    .get(LABEL_LAYER_MEDIA_TYPE)
                    .cloned()
                    .unwrap_or_default();
                let _writing = self.root.writer_lock()?;
                let indexed =
                    commit::index_external_blob(&mut self.root, &blob, &layer, &media_type)?;
                let made =
                    commit::chain_from_indexed(&self.root, indexed, parent_chain.as_deref())?;
                if made.chain.chain_id != *target {
                    warn!(blob = %layer, chain = made.chain.chain_id, "the layer blob does not make the chain containerd expects; leaving it to containerd");
                    return Ok(None);
                }
                return self.commit_ref(target, parent, &made, &inherited).map(Some);
            }
        }
        let (Some(image_ref), Some(manifest)) = (
            labels.get(remote::LABEL_IMAGE_REF),
            labels
                .get(remote::LABEL_MANIFEST_DIGEST)
                .and_then(|m| crate::digest::Digest::parse(m).ok()),
        ) else {
            return Ok(None);
        };
        match self.lazy_layer(
            target,
            parent,
            parent_chain.as_deref(),
            image_ref,
            &manifest,
            &layer,
            &inherited,
        ) {
            Ok(made) => Ok(made),
            Err(e) => {
                warn!(image = image_ref, layer = %layer, error = %format!("{e:#}"), "cannot set the layer up lazily; containerd fetches it");
                Ok(None)
            }
        }
    }

    /// A committed snapshot made earlier for remote-snapshot ref `target` on `parent`.
    fn snapshot_for_ref(&self, target: &str, parent: &str) -> Result<Option<String>> {
        Ok(self
            .root
            .meta
            .snapshots()?
            .into_iter()
            .find(|r| {
                r.kind == "committed"
                    && r.parent.as_deref().unwrap_or("") == parent
                    && r.labels.get(LABEL_SNAPSHOT_REF).map(String::as_str) == Some(target)
            })
            .map(|r| r.key))
    }

    /// Chain `chain` on `parent_chain` as lazysnap has it recorded, when its layer can be
    /// read (index and span map present, the blob in the store or remote).
    fn known_chain(&self, chain: &str, parent_chain: Option<&str>) -> Result<Option<commit::Made>> {
        let meta = &self.root.meta;
        let Some(c) = meta.chain(chain)? else {
            return Ok(None);
        };
        if c.parent.as_deref() != parent_chain {
            return Ok(None);
        }
        let (Some(layer), Some(blob)) = (meta.layer(&c.diff_id)?, meta.blob(&c.blob_digest)?)
        else {
            return Ok(None);
        };
        let readable = self.root.abs(&layer.index_path).is_file()
            && self.root.abs(&blob.spans_path).is_file()
            && match crate::digest::Digest::parse(&blob.digest) {
                Ok(d) if self.root.store.contains(&d) => true,
                Ok(_) => blob
                    .remote
                    .as_deref()
                    .is_some_and(|r| self.root.abs(r).is_file()),
                Err(_) => false,
            };
        Ok(readable.then_some(commit::Made {
            layer,
            blob,
            chain: c,
        }))
    }

    /// The layer from its lazysnap index artifact: index and span map written, the blob left
    /// in the registry (mounts read it by range), committed as `target`'s snapshot.
    #[allow(clippy::too_many_arguments)]
    fn lazy_layer(
        &mut self,
        target: &str,
        parent: &str,
        parent_chain: Option<&str>,
        image_ref: &str,
        manifest: &crate::digest::Digest,
        layer: &crate::digest::Digest,
        labels: &BTreeMap<String, String>,
    ) -> anyhow::Result<Option<String>> {
        let Some(resolver) = self.remote.as_mut() else {
            return Ok(None);
        };
        let Some(lazy) = resolver.layer(image_ref, manifest, layer)? else {
            return Ok(None);
        };
        // The chain the layer makes must be the one containerd asks for (its diffID is the
        // image config's, which the artifact's index is checked against).
        let ids = match parent_chain {
            None => vec![lazy.layer.diff_id.clone()],
            Some(p) => vec![crate::digest::Digest::parse(p)?, lazy.layer.diff_id.clone()],
        };
        let chain = crate::digest::Digest::chain_ids(&ids).pop();
        if chain.as_ref().map(|c| c.as_str()) != Some(target) {
            anyhow::bail!("layer {layer} on {parent:?} does not make chain {target}");
        }
        let _writing = self.root.writer_lock()?;
        let indexed = lazy
            .artifact
            .materialize(&self.root.path, &lazy.layer, lazy.remote)?;
        let made = commit::chain_from_indexed(&self.root, indexed, parent_chain)?;
        let name = self.commit_ref(target, parent, &made, labels)?;
        tracing::info!(layer = %layer, snapshot = name, "layer recorded from its index artifact; the blob stays in the registry");
        Ok(Some(name))
    }

    /// Records `made` and the committed snapshot for remote-snapshot ref `target` on
    /// `parent`: named `target` when that name is free (containerd finds it by label and
    /// parent, not by name). Returns its name.
    fn commit_ref(
        &mut self,
        target: &str,
        parent: &str,
        made: &commit::Made,
        labels: &BTreeMap<String, String>,
    ) -> Result<String> {
        let mut name = target.to_string();
        let mut n = 1;
        while self.root.meta.snapshot(&name)?.is_some() {
            name = format!("{target}~{n}");
            n += 1;
        }
        let record = crate::meta::CommitRecord {
            layer: &made.layer,
            blob: &made.blob,
            chain: &made.chain,
        };
        self.root.meta.commit_layer(
            &name,
            (!parent.is_empty()).then_some(parent),
            labels,
            &record,
        )?;
        Ok(name)
    }

    pub fn view(
        &mut self,
        key: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(key, parent, labels, true, None)
    }

    /// Records active snapshot or view `key` and makes its directory (`upper`, and `work` in
    /// overlay mode or `mnt` for a FUSE upper without a mountpoint of its own), mounting nothing.
    fn record(
        &mut self,
        key: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
        view: bool,
        mountpoint: Option<&Path>,
    ) -> Result<SnapshotRow> {
        let mp = mountpoint.map(|m| m.display().to_string());
        // The parent's root attributes, for the upper's root (the parent is checked again
        // in the transaction below; a committed parent never changes).
        let parent_chain = match parent {
            "" => None,
            p => self.root.meta.snapshot(p)?.and_then(|r| r.chain_id),
        };
        let upper_root = match &parent_chain {
            Some(chain) => upper_root_attrs(&self.root, chain)?,
            None => None,
        };
        // The directory is made inside the transaction that records the snapshot: a crash
        // leaves either both or an orphan directory `cleanup`/`check --repair` remove.
        let snapshots = self.root.path.join("snapshots");
        let (mode, why) = self.upper_mode();
        let overlay_mode = mode == UpperMode::Overlay;
        let mounter = &self.mounter;
        let row = self.root.meta.create_active_with(
            key,
            parent,
            view,
            labels,
            mp.as_deref(),
            &mut |row| {
                let dir = snapshots.join(row.id.to_string());
                (|| -> anyhow::Result<()> {
                    if dir.exists() {
                        // No row owns this id (the write lock is held): an interrupted
                        // prepare's leftover.
                        remove_orphan_dir(mounter.as_ref(), &dir)?;
                    }
                    std::fs::create_dir_all(dir.join("upper"))?;
                    if let Some(u) = &upper_root {
                        init_upper_root(u, &dir.join("upper"))?;
                    }
                    if overlay_mode {
                        std::fs::create_dir_all(dir.join("work"))?;
                    } else if row.mountpoint.is_none() {
                        std::fs::create_dir_all(dir.join("mnt"))?;
                    }
                    crate::store::sync_dir(&snapshots)?;
                    Ok(())
                })()
                .map_err(|e| {
                    let _ = std::fs::remove_dir_all(&dir);
                    format!("creating {}: {e:#}", dir.display())
                })
            },
        )?;
        tracing::info!(key, upper = mode.as_str(), why, "snapshot recorded");
        Ok(row)
    }

    /// Prepare/View with the filesystem mounted at `mountpoint` instead of the root's place.
    pub fn create(
        &mut self,
        key: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
        view: bool,
        mountpoint: Option<&Path>,
    ) -> Result<Vec<Mount>> {
        let _span = info_span!("prepare", key, parent, view).entered();
        let row = self.record(key, parent, labels, view, mountpoint)?;
        let attached = self.attach(&row);
        if let Err(e) = &attached {
            // Nothing half-made stays: the row, its directory, a lower only it would use.
            warn!(key, error = %e, "prepare failed; removing the snapshot");
            let _ = self.remove(key);
        }
        attached
    }

    /// Captures the changes of active `key` as a new layer and the committed snapshot `name`.
    pub fn commit(
        &mut self,
        name: &str,
        key: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Info> {
        let _span = info_span!("commit", name, key).entered();
        if name.is_empty() {
            return Err(SnapshotError::InvalidArgument(
                "commit name is empty".into(),
            ));
        }
        let row = self.row(key)?;
        // Checked again inside the recording transaction; here it spares a useless tar.
        crate::meta::check_committable(&row, key)?;
        if self.root.meta.snapshot(name)?.is_some() {
            return Err(SnapshotError::AlreadyExists(format!("snapshot {name}")));
        }
        let upper = self.upper_dir(&row);
        let format = match self.mode_of(&row) {
            UpperMode::Overlay => commit::UpperFormat::Overlay,
            UpperMode::Fuse => commit::UpperFormat::OciDir,
        };
        // A directory the kernel renamed is written out from the chain's lower: it must be
        // the mounted lower, not the empty directory under it (after a reboot, say).
        // Held to the end: the lower stays mounted while the commit reads it.
        let _lowers_lock = match (self.mode_of(&row), row.chain_id.as_deref()) {
            (UpperMode::Overlay, Some(chain)) => {
                let lock = overlay::lock_lowers(&self.root.path)?;
                self.ensure_lower(chain, &lock)?;
                Some(lock)
            }
            _ => None,
        };
        let _writing = self.root.writer_lock()?;
        let made = match &row.applied_blob {
            // The diff service applied a layer by indexing it: that layer is the change.
            Some(blob) if commit::upper_is_empty(&upper)? => {
                commit::chain_for_blob(&self.root, blob, row.chain_id.as_deref())?
            }
            _ => commit::commit_upper(
                &mut self.root,
                &upper,
                format,
                row.chain_id.as_deref(),
                self.compression,
            )?,
        };
        let record = crate::meta::CommitRecord {
            layer: &made.layer,
            blob: &made.blob,
            chain: &made.chain,
        };
        let committed = self.root.meta.commit_snapshot(name, key, labels, &record)?;
        Ok(Info::from(&committed))
    }

    /// containerd's diff Apply onto active `key`, without extraction: the layer blob (from
    /// containerd's content store; hardlinked when on the same filesystem) is indexed and
    /// becomes the snapshot's change; Commit then records it. Returns (diffID, uncompressed
    /// size) for the Apply response.
    pub fn apply_layer(
        &mut self,
        key: &str,
        blob: &Path,
        blob_digest: &crate::digest::Digest,
        media_type: &str,
    ) -> Result<(crate::digest::Digest, u64)> {
        let _span = info_span!("apply", key, blob = %blob_digest).entered();
        let row = self.row(key)?;
        if row.kind != "active" {
            return Err(SnapshotError::FailedPrecondition(format!(
                "cannot apply a layer to {} snapshot {key}",
                row.kind
            )));
        }
        let _writing = self.root.writer_lock()?;
        let indexed = commit::index_external_blob(&mut self.root, blob, blob_digest, media_type)?;
        self.root
            .meta
            .set_applied(key, &indexed.layer, &indexed.blob)?;
        let diff = crate::digest::Digest::parse(&indexed.layer.diff_id)
            .map_err(|e| SnapshotError::Internal(e.into()))?;
        Ok((diff, indexed.layer.uncompressed_size))
    }

    pub fn remove(&mut self, key: &str) -> Result<()> {
        let _span = info_span!("remove", key).entered();
        // The row goes first, in one transaction that also refuses a parent with children; a
        // crash before the unmount below leaves a directory and mount `cleanup` removes.
        let row = self.root.meta.remove_snapshot(key)?;
        let overlay_mode = self.mode_of(&row) == UpperMode::Overlay;
        if row.kind != "committed" {
            let mp = self.mountpoint(&row);
            if overlay_mode {
                if row.mountpoint.is_some() && lazysnap_fuse::is_mountpoint(&mp) {
                    lazysnap_fuse::unmount(&mp).map_err(|e| SnapshotError::Internal(e.into()))?;
                }
            } else if self.mounter.is_mounted(&mp) || lazysnap_fuse::is_stale_mount(&mp) {
                self.mounter.unmount(&mp)?;
            }
        }
        let dir = self.dir(&row);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| {
                SnapshotError::Internal(anyhow::anyhow!("removing {}: {e}", dir.display()))
            })?;
        }
        if let (true, Some(chain)) = (overlay_mode && row.kind != "committed", &row.chain_id) {
            self.release_lower(chain)?;
        }
        Ok(())
    }

    pub fn update(
        &mut self,
        key: &str,
        labels: &BTreeMap<String, String>,
        fieldpaths: &[String],
    ) -> Result<Info> {
        Ok(Info::from(
            &self.root.meta.update_labels(key, labels, fieldpaths)?,
        ))
    }

    /// Disk use of the snapshot's own changes: the upper directory of an active snapshot, the
    /// layer of a committed one.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let row = self.row(key)?;
        if row.kind == "committed" {
            let Some(chain) = row.chain_id.as_deref() else {
                return Ok(Usage::default());
            };
            let c = self
                .root
                .meta
                .chain(chain)?
                .ok_or_else(|| SnapshotError::NotFound(format!("chain {chain}")))?;
            let layer = self
                .root
                .meta
                .layer(&c.diff_id)?
                .ok_or_else(|| SnapshotError::NotFound(format!("layer {}", c.diff_id)))?;
            return Ok(Usage {
                size: layer.uncompressed_size as i64,
                inodes: layer.entries as i64,
            });
        }
        let mut usage = Usage::default();
        let upper = self.upper_dir(&row);
        if upper.exists() {
            let mut seen = std::collections::HashSet::new();
            let mut stack = vec![upper];
            while let Some(d) = stack.pop() {
                let entries = std::fs::read_dir(&d).map_err(|e| {
                    SnapshotError::Internal(anyhow::anyhow!("{}: {e}", d.display()))
                })?;
                for e in entries.flatten() {
                    let Ok(md) = e.path().symlink_metadata() else {
                        continue;
                    };
                    use std::os::unix::fs::MetadataExt;
                    if seen.insert((md.dev(), md.ino())) {
                        usage.inodes += 1;
                        usage.size += (md.blocks() * 512) as i64;
                    }
                    if md.is_dir() {
                        stack.push(e.path());
                    }
                }
            }
        }
        Ok(usage)
    }

    pub fn walk(&self, filters: &[String], f: &mut dyn FnMut(&Info)) -> Result<()> {
        let filter = Filter::parse(filters)?;
        for row in self.root.meta.snapshots()? {
            let info = Info::from(&row);
            if filter.matches(&info) {
                f(&info);
            }
        }
        Ok(())
    }

    /// Removes snapshot directories no snapshot owns (left by a crash) and stale mounts.
    pub fn cleanup(&mut self) -> Result<()> {
        // Under the write lock: a prepare in another process makes its directory inside the
        // transaction that records it, so a directory without a row is never one in the making.
        let dir = self.root.path.join("snapshots");
        let mounter = &self.mounter;
        self.root.meta.with_write_lock(|rows| {
            let known: std::collections::HashSet<String> =
                rows.iter().map(|r| r.id.to_string()).collect();
            let Ok(entries) = std::fs::read_dir(&dir) else {
                return;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if known.contains(&name) {
                    continue;
                }
                if let Err(err) = remove_orphan_dir(mounter.as_ref(), &e.path()) {
                    warn!(path = %e.path().display(), error = %format!("{err:#}"), "cleanup could not remove");
                }
            }
        })?;
        for (chain, _) in unused_lowers(&self.root, &self.root.meta.snapshots()?) {
            self.release_lower(&chain)?;
        }
        Ok(())
    }

    /// Unmounts every mount of active snapshots (for a clean shutdown of `serve`).
    pub fn close(&mut self) -> Result<()> {
        for row in self.root.meta.snapshots()? {
            if row.kind != "committed" && self.mode_of(&row) == UpperMode::Fuse {
                let mp = self.mountpoint(&row);
                if self.mounter.is_mounted(&mp) {
                    self.mounter.unmount(&mp)?;
                }
            }
        }
        for chain in lowers_in_use(&self.root, &self.root.meta.snapshots()?) {
            let mp = self.lower_mountpoint(&chain);
            if self.mounter.is_mounted(&mp) {
                self.mounter.unmount(&mp)?;
            }
        }
        Ok(())
    }
}
