//! The overlay logic, free of FUSE: the inode table, the per-directory lazy merge and attribute
//! resolution. The rules are those of applying the layers with `tar -x` in order, whiteouts
//! included (as containerd and umoci do):
//!
//! - the topmost layer that has an entry for a name decides it;
//! - a whiteout hides the name in every layer below;
//! - an opaque directory hides everything below it (its own children stay);
//! - a non-directory replaces whatever was below, subtree included;
//! - a directory over a non-directory (or a whiteout) starts fresh;
//! - a directory over a directory merges; its attributes come from the topmost layer where the
//!   directory is not merely implied by the paths of its children.
//!
//! Nothing is merged at construction: a directory is merged on its first lookup or listing and
//! cached, so a mount costs nothing up front. The inode number of a layer node is a pure function of
//! (layer, node) ([`origin_ino`]), so a daemon started again over the same stack answers the
//! numbers the kernel got from an earlier one ([`Merged::inode`] finds such a node again by its
//! path); a node visible through several hardlinks of one layer gets one inode. An upper entry
//! is numbered by [`upper_ino`]: the number it recorded in [`INO_XATTR`] (a copy-up keeps its
//! lower number; a new entry whose host inode number another inode holds gets one from a
//! sequence), else [`UPPER_INO_BASE`] plus its host inode number, so a successor finds it again
//! by walking the upper once. A number is never handed to two entries while the
//! [`Merged`] lives.
//!
//! A writable upper directory (an OCI layer in directory form, see [`mod@write`]) may sit above
//! the layers: its entries win, its `.wh.NAME` files hide lower names and its `.wh..wh..opq`
//! marker hides a directory's lower content. An upper entry is known by its host identity
//! (`st_dev`, `st_ino`), which survives renames and is shared by hardlinks; a lower inode that is
//! copied up keeps its inode number and switches to the upper entry.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::collections::HashSet;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use tracing::warn;

use crate::host::{self, HostId};
use crate::layer::{
    DirEntry, LayerStack, LayerTree, NodeAttr, NodeId, NodeKind, Timestamp, Xattrs,
};
use crate::upper::{self, Upper};
use fd_cache::FdCache;

mod fd_cache;
#[cfg(test)]
mod tests;
pub mod write;

/// A child name resolved: its kind and sources, or `None` when whited out.
type Resolved = Option<(NodeKind, Vec<Origin>)>;

/// Attributes and, for upper entries, the host's block count.
pub type FullAttr = (NodeAttr, Option<u64>);

/// An inode number of the merged view.
pub type Ino = u64;

/// Deepest upper path followed when reopening an entry (a loop in the table is a bug, never a
/// hang).
const MAX_DEPTH: usize = 4096;

/// The root directory's inode number (FUSE's `FUSE_ROOT_ID`).
pub const ROOT_INO: Ino = 1;

/// First inode number of entries only the upper directory has: above every [`origin_ino`]
/// (layers are fewer than 65535).
pub const UPPER_INO_BASE: Ino = 1 << 48;

/// Numbers of upper entries [`upper_ino`] cannot number (a host inode number past 2^47, or one
/// a deleted entry still holds), recorded in the entry ([`INO_XATTR`]): this daemon's pid in
/// bits 25..47 and a sequence below, so that a successor's do not meet them. Every number stays
/// below 2^49, which a file handle holds.
const UPPER_SEQ_BASE: Ino = 3 << 47;

/// The version of how inode numbers are made ([`origin_ino`], [`upper_ino`]). A daemon takes
/// over a mount only from one of the same scheme: the kernel holds the numbers.
pub const INO_SCHEME: u32 = 2;

pub use crate::ownership::INO_XATTR;

/// The number of an upper entry whose recorded number ([`INO_XATTR`]) is `recorded` and whose
/// host inode number is `host_ino`; `None` when neither gives one.
pub fn upper_ino(recorded: Option<Ino>, host_ino: u64) -> Option<Ino> {
    // Outside the layers' and the upper's ranges a recorded number is damaged.
    let recorded = recorded.filter(|r| (1 << 32..1 << 49).contains(r));
    recorded.or_else(|| (host_ino < 1 << 47).then_some(UPPER_INO_BASE | host_ino))
}

/// The inode number of layer node `o`: the same in every daemon serving the stack.
pub fn origin_ino(o: Origin) -> Ino {
    ((u64::from(o.layer) + 1) << 32) | u64::from(o.node)
}

/// The layer node numbered `ino` by [`origin_ino`].
fn ino_origin(ino: Ino) -> Option<Origin> {
    if !(1 << 32..UPPER_INO_BASE).contains(&ino) {
        return None;
    }
    Some(Origin {
        layer: u32::try_from((ino >> 32) - 1).ok()?,
        node: ino as u32,
    })
}

/// A node of one layer: `layer` indexes the stack, bottom = 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Origin {
    pub layer: u32,
    pub node: NodeId,
}

/// One entry of a merged directory.
#[derive(Debug, Clone)]
pub struct Child {
    pub name: Box<[u8]>,
    pub ino: Ino,
    pub kind: NodeKind,
}

/// The visible content of one merged directory, sorted by name (so listing offsets are stable
/// even if the cache is dropped and rebuilt).
#[derive(Debug, Default, Clone)]
pub struct MergedDir {
    children: Vec<Child>,
    subdirs: u32,
}

impl MergedDir {
    pub fn children(&self) -> &[Child] {
        &self.children
    }

    pub fn get(&self, name: &[u8]) -> Option<&Child> {
        self.children
            .binary_search_by(|c| (*c.name).cmp(name))
            .ok()
            .map(|i| &self.children[i])
    }

    /// Number of visible subdirectories (a directory's nlink is 2 + this).
    pub fn subdirs(&self) -> u32 {
        self.subdirs
    }

    /// Removes `name`; returns what it was.
    pub(crate) fn remove(&mut self, name: &[u8]) -> Option<Child> {
        let i = self
            .children
            .binary_search_by(|c| (*c.name).cmp(name))
            .ok()?;
        let c = self.children.remove(i);
        if c.kind == NodeKind::Dir {
            self.subdirs -= 1;
        }
        Some(c)
    }

    /// Inserts `child`, replacing an entry of the same name.
    pub(crate) fn insert(&mut self, child: Child) {
        self.remove(&child.name);
        if child.kind == NodeKind::Dir {
            self.subdirs += 1;
        }
        let i = self
            .children
            .binary_search_by(|c| (*c.name).cmp(&child.name))
            .unwrap_or_else(|i| i);
        self.children.insert(i, child);
    }
}

/// The upper entry behind an inode. Its `O_PATH` fd is kept in [`Merged::fds`] while recently
/// used and opened again from the parent chain otherwise.
#[derive(Debug)]
pub(crate) struct UpperNode {
    pub id: HostId,
    /// An fd held for as long as the kernel references the inode, for the entries no name leads
    /// to: the upper root, a file unlinked while open, a hardlink whose recorded name was
    /// removed (until a lookup names it again). Few at a time: the rest go through the cache.
    pub pinned: Option<Arc<OwnedFd>>,
}

impl UpperNode {
    pub fn new(id: HostId) -> UpperNode {
        UpperNode { id, pinned: None }
    }
}

/// The mutable part of an inode: where it is and what is behind it in the upper.
#[derive(Debug)]
pub(crate) struct State {
    /// The directory it was last seen in and its name there (for a directory, its only place).
    pub parent: Ino,
    pub name: Box<[u8]>,
    pub upper: Option<UpperNode>,
    /// The lower sources no longer show: the upper directory is opaque or the whole directory
    /// was copied up and moved.
    pub lower_gone: bool,
}

/// One inode of the merged view.
#[derive(Debug)]
pub struct Inode {
    pub ino: Ino,
    pub kind: NodeKind,
    /// The layer nodes behind this inode, topmost first. A directory has the directory at its
    /// path in every layer down to a whiteout or a non-directory; anything else has exactly one.
    /// Empty only for the root of an empty stack.
    sources: Box<[Origin]>,
    /// How many of `sources` contribute children: up to the first opaque one. The ones below
    /// still count for metadata (an opaque marker in an implied directory empties it but does
    /// not recreate it).
    merge_len: usize,
    /// The merged children, for directories; built on first use, droppable on forget.
    dir: Mutex<Option<Arc<MergedDir>>>,
    /// Visible hardlink count, for nodes with nlink > 1 in their layer (cleared by changes).
    nlink: Mutex<Option<u32>>,
    /// Kernel references (FUSE lookup count). Only used to free caches, never inode numbers.
    lookups: AtomicU64,
    state: Mutex<State>,
}

impl Inode {
    pub(crate) fn new(
        ino: Ino,
        parent: Ino,
        name: &[u8],
        kind: NodeKind,
        sources: Vec<Origin>,
        merge_len: usize,
        upper: Option<UpperNode>,
    ) -> Inode {
        Inode {
            ino,
            kind,
            sources: sources.into(),
            merge_len,
            dir: Mutex::new(None),
            nlink: Mutex::new(None),
            lookups: AtomicU64::new(0),
            state: Mutex::new(State {
                parent,
                name: name.into(),
                upper,
                lower_gone: false,
            }),
        }
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that an upper entry was just found as `name` in `parent`: a name that leads to
    /// it now (a hardlink's recorded name may have been removed), so no fd needs pinning.
    pub(crate) fn seen_at(&self, parent: Ino, name: &[u8]) {
        if self.ino == ROOT_INO {
            return;
        }
        let mut st = self.state();
        let Some(u) = st.upper.as_mut() else { return };
        u.pinned = None;
        st.parent = parent;
        if *st.name != *name {
            // Lookups repeat the same name: no allocation then.
            st.name = name.into();
        }
    }

    /// The directory this inode was last seen in (`..` for directories, which have one).
    pub fn parent(&self) -> Ino {
        self.state().parent
    }

    /// True when the inode has an entry in the upper directory.
    pub fn is_upper(&self) -> bool {
        self.state().upper.is_some()
    }

    pub(crate) fn clear_nlink(&self) {
        *self.nlink.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    pub fn sources(&self) -> &[Origin] {
        &self.sources
    }

    /// The sources whose children show.
    pub fn merged_sources(&self) -> &[Origin] {
        &self.sources[..self.merge_len]
    }
}

/// Every directory entry of `layer` that names a node, by node: one walk of the whole tree.
fn node_names(layer: &dyn LayerTree) -> NodeNames {
    let mut names = NodeNames::new();
    let mut dirs = vec![layer.root()];
    while let Some(dir) = dirs.pop() {
        layer.for_each_child(dir, &mut |name, e| {
            if let DirEntry::Node(node) = e {
                let seen = names.entry(node).or_default();
                // A directory has one name; one seen again is a loop in a damaged index.
                if seen.is_empty() && layer.attr(node).kind == NodeKind::Dir {
                    dirs.push(node);
                }
                seen.push((dir, name.into()));
            }
        });
    }
    names
}

/// The upper path of each upper entry's number (the first path found for a hardlinked one).
fn walk_upper(upper: &Upper) -> HashMap<Ino, UpperPath> {
    let mut paths = HashMap::new();
    let mut dirs: Vec<(Arc<OwnedFd>, UpperPath)> = vec![(upper.root.clone(), Vec::new())];
    while let Some((fd, path)) = dirs.pop() {
        let scan = match upper::scan_dir(fd.as_fd()) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot list an upper directory while walking the upper");
                continue;
            }
        };
        for e in scan.entries {
            let mut p = path.clone();
            p.push(e.name.clone());
            if e.kind == NodeKind::Dir && p.len() < MAX_DEPTH {
                if let Ok(d) = host::open_dir_path(fd.as_fd(), &e.name) {
                    dirs.push((Arc::new(d), p.clone()));
                }
            }
            if let Some(ino) = upper_ino(e.recorded, e.id.1) {
                paths.entry(ino).or_insert(p);
            }
        }
    }
    paths
}

/// `merge_len` for a directory with `sources`: through the first opaque one.
fn merge_len(layers: &LayerStack, sources: &[Origin]) -> usize {
    sources
        .iter()
        .position(|o| layers[o.layer as usize].is_opaque(o.node))
        .map_or(sources.len(), |i| i + 1)
}

#[derive(Default)]
pub(crate) struct Table {
    pub inodes: HashMap<Ino, Arc<Inode>>,
    /// Inode of a layer node: the topmost source of each inode.
    pub by_origin: HashMap<Origin, Ino>,
    /// Inode of an upper entry.
    pub by_upper: HashMap<HostId, Ino>,
    /// Upper entries numbered from [`UPPER_SEQ_BASE`] so far.
    upper_seq: u64,
}

impl Table {
    /// Records the inode of layer node `origin` (its topmost source), numbered [`origin_ino`].
    /// An upper entry that recorded this number (copied up from it) keeps it.
    pub fn push_origin(&mut self, origin: Origin, make: impl FnOnce(Ino) -> Inode) -> Ino {
        let ino = origin_ino(origin);
        self.inodes
            .entry(ino)
            .or_insert_with(|| Arc::new(make(ino)));
        self.by_origin.insert(origin, ino);
        ino
    }

    /// Records the inode of an upper entry numbered `wanted` ([`upper_ino`]), or the next number
    /// from [`UPPER_SEQ_BASE`] when there is none or another inode has it (a deleted entry whose
    /// host inode number was reused, say).
    pub fn push_upper(&mut self, wanted: Option<Ino>, make: impl FnOnce(Ino) -> Inode) -> Ino {
        let ino = match wanted {
            Some(ino) if !self.inodes.contains_key(&ino) => ino,
            _ => loop {
                self.upper_seq += 1;
                let pid = u64::from(std::process::id()) & ((1 << 22) - 1);
                let ino = UPPER_SEQ_BASE | pid << 25 | (self.upper_seq & ((1 << 25) - 1));
                if !self.inodes.contains_key(&ino) {
                    break ino;
                }
            },
        };
        self.inodes.insert(ino, Arc::new(make(ino)));
        ino
    }
}

/// The merged view of a stack of layers, with an optional writable upper directory on top.
pub struct Merged {
    layers: LayerStack,
    pub(crate) table: RwLock<Table>,
    pub(crate) upper: Option<Upper>,
    /// Serializes changes to the upper directory (reads and data writes do not take it).
    pub(crate) write_lock: Mutex<()>,
    /// `O_PATH` fds of recently used upper entries; bounded by the open-file limit.
    pub(crate) fds: FdCache,
    pub(crate) tmp_seq: AtomicU64,
    /// Per layer, the names of every node, built on the first number asked for that this
    /// daemon never handed out (see [`Merged::inode`]).
    names: Vec<std::sync::OnceLock<NodeNames>>,
    /// The upper path of every upper entry's number, from one walk of the upper built on the
    /// first number asked for that neither this daemon nor a layer path gives.
    upper_paths: std::sync::OnceLock<HashMap<Ino, UpperPath>>,
}

/// The names leading from the upper's root to an entry.
type UpperPath = Vec<Box<[u8]>>;

/// The directory entries naming each node of one layer, as (parent dir, name).
type NodeNames = HashMap<NodeId, Vec<(NodeId, Box<[u8]>)>>;

impl std::fmt::Debug for Merged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Merged")
            .field("layers", &self.layers.len())
            .field("inodes", &self.inode_count())
            .finish()
    }
}

/// Attributes of the root of an empty stack.
fn empty_root_attr() -> NodeAttr {
    NodeAttr {
        kind: NodeKind::Dir,
        perm: 0o755,
        uid: 0,
        gid: 0,
        size: 0,
        mtime: Timestamp::default(),
        atime: Timestamp::default(),
        ctime: Timestamp::default(),
        rdev: 0,
        nlink: 2,
    }
}

impl Merged {
    /// A merged view of `layers` (bottom first). Cheap: nothing is read until asked.
    pub fn new(layers: LayerStack) -> Merged {
        Self::build(layers, None, FdCache::new(1))
    }

    /// A merged view of `layers` under the writable upper directory `upper`.
    pub(crate) fn with_upper(layers: LayerStack, upper: Upper) -> io::Result<Merged> {
        Ok(Self::build(
            layers,
            Some(upper),
            FdCache::for_this_process(),
        ))
    }

    /// Like [`Merged::with_upper`], keeping at most `fds` fds of upper entries.
    #[cfg(test)]
    pub(crate) fn with_upper_and_fds(layers: LayerStack, upper: Upper, fds: usize) -> Merged {
        Self::build(layers, Some(upper), FdCache::new(fds))
    }

    fn build(layers: LayerStack, upper: Option<Upper>, fds: FdCache) -> Merged {
        let sources: Vec<Origin> = (0..layers.len())
            .rev()
            .map(|i| Origin {
                layer: i as u32,
                node: layers[i].root(),
            })
            .collect();
        let merge_len = merge_len(&layers, &sources);
        let mut table = Table::default();
        let root_upper = upper.as_ref().map(|u| {
            table.by_upper.insert(u.root_id, ROOT_INO);
            UpperNode {
                id: u.root_id,
                pinned: Some(u.root.clone()),
            }
        });
        let root = Arc::new(Inode::new(
            ROOT_INO,
            ROOT_INO,
            b"",
            NodeKind::Dir,
            sources,
            merge_len,
            root_upper,
        ));
        if let Some(top) = root.sources.first() {
            table.by_origin.insert(*top, ROOT_INO);
        }
        table.inodes.insert(ROOT_INO, root);
        Merged {
            names: layers.iter().map(|_| std::sync::OnceLock::new()).collect(),
            upper_paths: std::sync::OnceLock::new(),
            layers,
            table: RwLock::new(table),
            upper,
            write_lock: Mutex::new(()),
            fds,
            tmp_seq: AtomicU64::new(0),
        }
    }

    /// True when the view has a writable upper directory.
    pub fn is_writable(&self) -> bool {
        self.upper.is_some()
    }

    /// The `O_PATH` fd of `inode`'s upper entry, if it has one. When it is not at hand, the
    /// names from the nearest ancestor whose fd is are opened beneath that ancestor
    /// ([`host::open_path_beneath`]: no symlink followed, never above it), and the result is
    /// checked to be the same host inode: `ESTALE` when that path now leads elsewhere.
    pub(crate) fn upper_fd(&self, inode: &Inode) -> io::Result<Option<Arc<OwnedFd>>> {
        let id = {
            let st = inode.state();
            let Some(u) = &st.upper else { return Ok(None) };
            if let Some(fd) = &u.pinned {
                return Ok(Some(fd.clone()));
            }
            u.id
        };
        if let Some(fd) = self.fds.get(inode.ino, id) {
            return Ok(Some(fd));
        }
        let stale = || io::Error::from_raw_os_error(libc::ESTALE);
        let mut names: Vec<Box<[u8]>> = Vec::new();
        let mut at = {
            let st = inode.state();
            (inode.ino, st.parent, st.name.clone())
        };
        let base = loop {
            let (ino, parent, name) = at;
            if parent == ino || names.len() > MAX_DEPTH {
                return Err(stale());
            }
            names.push(name);
            let p = self.inode(parent).ok_or_else(stale)?;
            let st = p.state();
            let u = st.upper.as_ref().ok_or_else(stale)?;
            if let Some(fd) = u.pinned.clone().or_else(|| self.fds.get(p.ino, u.id)) {
                break fd;
            }
            at = (p.ino, st.parent, st.name.clone());
        };
        let path: Vec<&[u8]> = names.iter().rev().map(|n| &**n).collect();
        let fd = host::open_path_beneath(base.as_fd(), &path)?;
        if host::host_id(&host::stat_fd(fd.as_fd())?) != id {
            return Err(stale());
        }
        let fd = Arc::new(fd);
        self.fds.put(inode.ino, id, fd.clone());
        Ok(Some(fd))
    }

    pub fn layers(&self) -> &LayerStack {
        &self.layers
    }

    fn layer(&self, o: Origin) -> &Arc<dyn LayerTree> {
        &self.layers[o.layer as usize]
    }

    /// The inode `ino`, if it was handed out, by this daemon or by an earlier one serving the
    /// same stack and upper.
    pub fn inode(&self, ino: Ino) -> Option<Arc<Inode>> {
        self.handed_out(ino)
            .or_else(|| self.find_again(ino))
            .or_else(|| self.find_in_upper(ino))
    }

    /// The inode `ino` if this daemon handed it out (no search).
    fn handed_out(&self, ino: Ino) -> Option<Arc<Inode>> {
        self.table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .inodes
            .get(&ino)
            .cloned()
    }

    /// Finds layer node `ino` again by merging the directories on one of its paths, which
    /// numbers it as it was numbered before, and checks that the path leads to it (a name
    /// whited out above, say, leads elsewhere).
    fn find_again(&self, ino: Ino) -> Option<Arc<Inode>> {
        let o = ino_origin(ino)?;
        let layer = self.layers.get(o.layer as usize)?;
        let names = self.names[o.layer as usize].get_or_init(|| node_names(layer.as_ref()));
        let _s = tracing::debug_span!("find_again", ino, layer = o.layer, node = o.node).entered();
        for (dir, name) in names.get(&o.node).into_iter().flatten() {
            let mut path = vec![&name[..]];
            let mut at = *dir;
            while at != layer.root() {
                let (up, n) = names.get(&at)?.first()?;
                path.push(&n[..]);
                at = *up;
                if path.len() > MAX_DEPTH {
                    return None;
                }
            }
            if self.at_path(path.iter().rev().copied()) == Some(ino) {
                return self.handed_out(ino);
            }
        }
        None
    }

    /// Finds upper entry `ino` (numbered by [`upper_ino`]: its own or, copied up and moved, its
    /// recorded lower number) by merging the directories on its upper path.
    fn find_in_upper(&self, ino: Ino) -> Option<Arc<Inode>> {
        let upper = self.upper.as_ref()?;
        let paths = self.upper_paths.get_or_init(|| {
            let _s = tracing::debug_span!("walk_upper").entered();
            walk_upper(upper)
        });
        let path = paths.get(&ino)?.iter().map(|n| &**n);
        if self.at_path(path) == Some(ino) {
            self.handed_out(ino)
        } else {
            None
        }
    }

    /// The entry the names `path` lead to from the root (no kernel reference counted).
    fn at_path<'a>(&self, path: impl IntoIterator<Item = &'a [u8]>) -> Option<Ino> {
        path.into_iter()
            .try_fold(ROOT_INO, |cur, name| self.child(cur, name))
    }

    /// How many inodes were handed out so far.
    pub fn inode_count(&self) -> u64 {
        let t = self.table.read().unwrap_or_else(PoisonError::into_inner);
        t.inodes.len() as u64
    }

    /// The merged content of directory `ino`; `None` if `ino` is unknown or not a directory.
    pub fn dir(&self, ino: Ino) -> Option<Arc<MergedDir>> {
        let inode = self.inode(ino)?;
        if inode.kind != NodeKind::Dir {
            return None;
        }
        Some(self.merge_dir(&inode))
    }

    /// The entry `name` of directory `parent` without counting a kernel reference.
    pub fn child(&self, parent: Ino, name: &[u8]) -> Option<Ino> {
        let dir = self.dir(parent)?;
        dir.get(name).map(|c| c.ino)
    }

    /// Looks `name` up in `parent` for the kernel: counts one reference on the result.
    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<(Ino, NodeAttr), Errno> {
        let pinode = self.inode(parent).ok_or(Errno::NoEntry)?;
        if pinode.kind != NodeKind::Dir {
            return Err(Errno::NotDir);
        }
        let ino = match name {
            b"." => parent,
            b".." => pinode.parent(),
            _ => {
                let dir = self.merge_dir(&pinode);
                dir.get(name).ok_or(Errno::NoEntry)?.ino
            }
        };
        let inode = self.inode(ino).ok_or(Errno::NoEntry)?;
        // Only a writable view has upper entries whose recorded name can go stale.
        if self.upper.is_some() && !matches!(name, b"." | b"..") {
            inode.seen_at(parent, name);
        }
        let (attr, _) = self.attr_ext(&inode)?;
        inode.lookups.fetch_add(1, Ordering::Relaxed);
        Ok((ino, attr))
    }

    /// Like [`Merged::lookup`], with the host's block count for upper files.
    pub fn lookup_ext(&self, parent: Ino, name: &[u8]) -> Result<(Ino, FullAttr), Errno> {
        let (ino, _) = self.lookup(parent, name)?;
        let inode = self.inode(ino).ok_or(Errno::NoEntry)?;
        Ok((ino, self.attr_ext(&inode)?))
    }

    /// Counts a kernel reference handed out by other means (readdirplus).
    pub fn add_lookup(&self, ino: Ino) {
        if let Some(inode) = self.inode(ino) {
            inode.lookups.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The kernel dropped `n` references. A directory nobody references drops its merged
    /// children (memory); its inode number and those of its children stay, because the table
    /// maps layer nodes to inodes for the whole mount.
    pub fn forget(&self, ino: Ino, n: u64) {
        // A number an earlier daemon handed out is not looked for just to be forgotten.
        let Some(inode) = self.handed_out(ino) else {
            return;
        };
        let prev = inode
            .lookups
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(n))
            })
            .unwrap_or(0);
        if prev <= n && ino != ROOT_INO {
            if inode.kind == NodeKind::Dir {
                self.invalidate_dir(ino);
            }
            // Nobody refers to it any more: its fd is reopened by name when needed again.
            if let Some(u) = inode.state().upper.as_mut() {
                u.pinned = None;
            }
            self.fds.remove(ino);
        }
    }

    /// Drops the cached merge of directory `ino`; the next use merges it again.
    pub fn invalidate_dir(&self, ino: Ino) {
        if let Some(inode) = self.handed_out(ino) {
            *inode.dir.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
    }

    /// The attributes of `ino`, nlink included.
    pub fn attr(&self, ino: Ino) -> Option<NodeAttr> {
        let inode = self.inode(ino)?;
        self.attr_ext(&inode).ok().map(|a| a.0)
    }

    /// The attributes of `ino` and, for upper entries, the host's 512-byte block count.
    pub fn attr_full(&self, ino: Ino) -> Result<FullAttr, Errno> {
        let inode = self.inode(ino).ok_or(Errno::NoEntry)?;
        self.attr_ext(&inode)
    }

    pub(crate) fn attr_ext(&self, inode: &Inode) -> Result<FullAttr, Errno> {
        if let Some(fd) = self.upper_fd(inode).map_err(Errno::Io)? {
            let (mut a, blocks) = upper::attr(fd.as_fd()).map_err(Errno::Io)?;
            if inode.kind == NodeKind::Dir {
                a.kind = NodeKind::Dir;
                a.nlink = 2u32.saturating_add(self.merge_dir(inode).subdirs);
            }
            return Ok((a, Some(blocks)));
        }
        Ok((self.attr_of(inode), None))
    }

    /// Where an inode's metadata comes from: its topmost source, unless that is a directory only
    /// implied by its children's paths and a lower layer has the directory itself.
    fn attr_source(&self, inode: &Inode) -> Option<Origin> {
        let first = *inode.sources.first()?;
        if inode.kind != NodeKind::Dir {
            return Some(first);
        }
        Some(
            inode
                .sources
                .iter()
                .copied()
                .find(|o| !self.layer(*o).is_implicit(o.node))
                .unwrap_or(first),
        )
    }

    pub(crate) fn attr_of(&self, inode: &Inode) -> NodeAttr {
        let Some(src) = self.attr_source(inode) else {
            let mut a = empty_root_attr();
            a.nlink = 2 + self.merge_dir(inode).subdirs;
            return a;
        };
        let mut a = self.layer(src).attr(src.node);
        if inode.kind == NodeKind::Dir {
            // The merged kind wins over a lower layer's record (never differs in a sane layer).
            a.kind = NodeKind::Dir;
            a.nlink = 2u32.saturating_add(self.merge_dir(inode).subdirs);
        } else if a.nlink > 1 {
            let cached = *inode.nlink.lock().unwrap_or_else(PoisonError::into_inner);
            a.nlink = match cached {
                Some(n) => n,
                None => {
                    let n = self.visible_links(inode);
                    *inode.nlink.lock().unwrap_or_else(PoisonError::into_inner) = Some(n);
                    n
                }
            };
        } else {
            a.nlink = 1;
        }
        a
    }

    /// How many of a hardlinked node's paths in its layer still lead to it in the merged view.
    fn visible_links(&self, inode: &Inode) -> u32 {
        (self.visible_link_places(inode).len() as u32).max(1)
    }

    /// The (directory, name) places where a lower node's paths in its layer still lead to it
    /// in the merged view.
    pub(crate) fn visible_link_places(&self, inode: &Inode) -> Vec<(Ino, Box<[u8]>)> {
        let mut places = Vec::new();
        let Some(&src) = inode.sources.first() else {
            return places;
        };
        let layer = self.layer(src);
        for (dir, name) in layer.links(src.node) {
            let Some(path) = layer_path(&**layer, dir) else {
                continue;
            };
            let Some(dir) = self.at_path(path.iter().map(|c| &c[..])) else {
                continue;
            };
            if self.child(dir, &name) == Some(inode.ino) {
                places.push((dir, name.into()));
            }
        }
        places
    }

    /// The merged children of a directory inode, merged now if not cached.
    pub(crate) fn merge_dir(&self, inode: &Inode) -> Arc<MergedDir> {
        // Held while merging so that concurrent first uses of one directory merge it once.
        // Lock order: a directory's lock, then the table; never two directory locks.
        let mut slot = inode.dir.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(d) = &*slot {
            return d.clone();
        }
        let merged = Arc::new(self.build_dir(inode));
        *slot = Some(merged.clone());
        merged
    }

    fn build_dir(&self, inode: &Inode) -> MergedDir {
        let mut lower_gone = inode.state().lower_gone;
        // The upper's entries win; its whiteouts hide lower names.
        let mut scan = upper::Scan::default();
        match self.upper_fd(inode) {
            Ok(Some(fd)) => match upper::scan_dir(fd.as_fd()) {
                Ok(s) => scan = s,
                Err(e) => warn!(dir = inode.ino, error = %e, "cannot list upper directory"),
            },
            Ok(None) => {}
            Err(e) => warn!(dir = inode.ino, error = %e, "upper directory is gone"),
        }
        if scan.opaque && !lower_gone {
            inode.state().lower_gone = true;
            lower_gone = true;
        }
        let hidden: HashSet<&[u8]> = scan
            .whiteouts
            .iter()
            .map(|n| &**n)
            .chain(scan.entries.iter().map(|e| &*e.name))
            .collect();

        // Visible lower children with their sources, keyed by name; `None` = whited out.
        let mut seen: HashMap<Box<[u8]>, Resolved> = HashMap::new();
        let dirs: &[Origin] = if lower_gone {
            &[]
        } else {
            inode.merged_sources()
        };
        for (i, dir) in dirs.iter().enumerate() {
            let layer = self.layer(*dir);
            layer.for_each_child(dir.node, &mut |name, entry| {
                if hidden.contains(name) {
                    return;
                }
                if let Entry::Vacant(v) = seen.entry(name.into()) {
                    let resolved = match entry {
                        DirEntry::Whiteout => None,
                        DirEntry::Node(node) => Some(self.resolve_child(&dirs[i..], name, node)),
                    };
                    v.insert(resolved);
                }
            });
        }
        let mut visible: Vec<(Box<[u8]>, NodeKind, Vec<Origin>)> = seen
            .into_iter()
            .filter_map(|(name, r)| r.map(|(kind, src)| (name, kind, src)))
            .collect();
        // An upper directory merges with the lower directories at its name.
        let upper_entries: Vec<(upper::ScanEntry, Vec<Origin>)> = scan
            .entries
            .into_iter()
            .map(|e| {
                let sources = if e.kind == NodeKind::Dir && !lower_gone {
                    self.lower_dirs_at(dirs, &e.name)
                } else {
                    Vec::new()
                };
                (e, sources)
            })
            .collect();

        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        let mut children = Vec::with_capacity(visible.len() + upper_entries.len());
        let mut subdirs = 0u32;
        for (name, kind, sources) in visible.drain(..) {
            if kind == NodeKind::Dir {
                subdirs += 1;
            }
            let key = sources[0];
            let ino = match table.by_origin.get(&key) {
                Some(ino) => *ino,
                None => {
                    let merge_len = if kind == NodeKind::Dir {
                        merge_len(&self.layers, &sources)
                    } else {
                        sources.len()
                    };
                    table.push_origin(key, |ino| {
                        Inode::new(ino, inode.ino, &name, kind, sources, merge_len, None)
                    })
                }
            };
            children.push(Child { name, ino, kind });
        }
        for (e, sources) in upper_entries {
            if e.kind == NodeKind::Dir {
                subdirs += 1;
            }
            let known = table
                .by_upper
                .get(&e.id)
                .and_then(|ino| table.inodes.get(ino))
                .filter(|i| i.kind == e.kind)
                .cloned();
            let ino = match known {
                Some(child) => {
                    child.seen_at(inode.ino, &e.name);
                    child.ino
                }
                None => {
                    let merge_len = merge_len(&self.layers, &sources);
                    let ino = table.push_upper(upper_ino(e.recorded, e.id.1), |ino| {
                        let up = UpperNode::new(e.id);
                        Inode::new(
                            ino,
                            inode.ino,
                            &e.name,
                            e.kind,
                            sources,
                            merge_len,
                            Some(up),
                        )
                    });
                    table.by_upper.insert(e.id, ino);
                    ino
                }
            };
            children.push(Child {
                name: e.name,
                ino,
                kind: e.kind,
            });
        }
        children.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        MergedDir { children, subdirs }
    }

    /// The lower directories at `name` under the lower directories `dirs` (topmost first),
    /// down to a whiteout or a non-directory.
    pub(crate) fn lower_dirs_at(&self, dirs: &[Origin], name: &[u8]) -> Vec<Origin> {
        let mut out = Vec::new();
        for dir in dirs {
            let layer = self.layer(*dir);
            match layer.lookup(dir.node, name) {
                None => continue,
                Some(DirEntry::Whiteout) => break,
                Some(DirEntry::Node(n)) => {
                    if layer.attr(n).kind != NodeKind::Dir {
                        break;
                    }
                    out.push(Origin {
                        layer: dir.layer,
                        node: n,
                    });
                }
            }
        }
        out
    }

    /// True when a lower layer has an entry `name` in directory `dir` that shows unless the
    /// upper hides it (so removing or replacing it needs a whiteout or an opaque marker).
    pub(crate) fn lower_has(&self, dir: &Inode, name: &[u8]) -> bool {
        if dir.state().lower_gone {
            return false;
        }
        for src in dir.merged_sources() {
            match self.layer(*src).lookup(src.node, name) {
                None => continue,
                Some(DirEntry::Whiteout) => return false,
                Some(DirEntry::Node(_)) => return true,
            }
        }
        false
    }

    /// Runs `f` on the cached merge of directory `ino`, if any (a change made through this view
    /// is applied to the cache rather than merging the directory again).
    pub(crate) fn patch_dir(&self, ino: Ino, f: impl FnOnce(&mut MergedDir)) {
        let Some(inode) = self.inode(ino) else { return };
        let mut slot = inode.dir.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(d) = slot.as_mut() {
            f(Arc::make_mut(d));
        }
    }

    /// The sources of child `name` whose topmost entry is `node` in `dirs[0]`'s layer; `dirs` are
    /// the parent directory's merged sources from that layer down. A directory collects the
    /// directories at its path below, past its own opaque marker (see `Inode::merge_len`).
    fn resolve_child(&self, dirs: &[Origin], name: &[u8], node: NodeId) -> (NodeKind, Vec<Origin>) {
        let top = Origin {
            layer: dirs[0].layer,
            node,
        };
        let kind = self.layer(top).attr(node).kind;
        let mut sources = vec![top];
        if kind != NodeKind::Dir {
            return (kind, sources);
        }
        for dir in &dirs[1..] {
            let layer = self.layer(*dir);
            match layer.lookup(dir.node, name) {
                None => continue,
                Some(DirEntry::Whiteout) => break,
                Some(DirEntry::Node(n)) => {
                    if layer.attr(n).kind != NodeKind::Dir {
                        break;
                    }
                    sources.push(Origin {
                        layer: dir.layer,
                        node: n,
                    });
                }
            }
        }
        (kind, sources)
    }

    /// The target of symlink `ino`.
    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>, Errno> {
        let inode = self.inode(ino).ok_or(Errno::NoEntry)?;
        if inode.kind != NodeKind::Symlink {
            return Err(Errno::Invalid);
        }
        if let Some(fd) = self.upper_fd(&inode).map_err(Errno::Io)? {
            return host::readlink_fd(fd.as_fd()).map_err(Errno::Io);
        }
        let src = *inode.sources.first().ok_or(Errno::Invalid)?;
        self.layer(src).readlink(src.node).map_err(Errno::Io)
    }

    /// The extended attributes of `ino` (from the layer its metadata comes from).
    pub fn xattrs(&self, ino: Ino) -> Result<Xattrs, Errno> {
        let inode = self.inode(ino).ok_or(Errno::NoEntry)?;
        if let Some(fd) = self.upper_fd(&inode).map_err(Errno::Io)? {
            return upper::xattrs(fd.as_fd()).map_err(Errno::Io);
        }
        Ok(match self.attr_source(&inode) {
            Some(src) => self.layer(src).xattrs(src.node),
            None => Vec::new(),
        })
    }

    /// What a read of file `ino` reads from: the layer, the node and the file size. The caller
    /// reads without any lock of the merged view held. `Errno::Upper` when the file is in the
    /// upper directory (read it through an fd of the upper file).
    pub fn file_source(&self, ino: Ino) -> Result<(Arc<dyn LayerTree>, NodeId, u64), Errno> {
        let inode = self.inode(ino).ok_or(Errno::NoEntry)?;
        match inode.kind {
            NodeKind::File => {}
            NodeKind::Dir => return Err(Errno::IsDir),
            _ => return Err(Errno::Invalid),
        }
        if inode.is_upper() {
            return Err(Errno::Upper);
        }
        let src = *inode.sources.first().ok_or(Errno::Invalid)?;
        let layer = self.layer(src).clone();
        let size = layer.attr(src.node).size;
        Ok((layer, src.node, size))
    }

    /// A human description of `ino` for logs: its layer and path inside that layer.
    pub fn describe(&self, ino: Ino) -> String {
        let Some(inode) = self.inode(ino) else {
            return format!("inode {ino} (unknown)");
        };
        let Some(&src) = inode.sources.first() else {
            return format!("inode {ino} (/)");
        };
        let layer = self.layer(src);
        let path = if inode.kind == NodeKind::Dir {
            layer_path(&**layer, src.node)
        } else {
            layer
                .links(src.node)
                .into_iter()
                .next()
                .and_then(|(dir, name)| {
                    let mut p = layer_path(&**layer, dir)?;
                    p.push(name);
                    Some(p)
                })
        };
        let path = match path {
            Some(p) => p
                .iter()
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect::<Vec<_>>()
                .join("/"),
            None => "?".to_string(),
        };
        format!(
            "inode {ino} (layer {} node {}: /{path})",
            src.layer, src.node
        )
    }
}

/// The components of directory `dir`'s path in `layer` (empty for the root); `None` when the
/// layer's parent chain is broken or loops.
fn layer_path(layer: &dyn LayerTree, dir: NodeId) -> Option<Vec<Vec<u8>>> {
    let mut comps = Vec::new();
    let mut cur = dir;
    while let Some((parent, name)) = layer.parent(cur) {
        comps.push(name);
        cur = parent;
        if comps.len() > 4096 {
            return None;
        }
    }
    if cur != layer.root() {
        return None;
    }
    comps.reverse();
    Some(comps)
}

/// Why a request on the merged view failed; maps onto an errno.
#[derive(Debug)]
pub enum Errno {
    NoEntry,
    NotDir,
    IsDir,
    Invalid,
    /// The file lives in the upper directory: not readable through a layer.
    Upper,
    /// Any other errno.
    Raw(i32),
    Io(io::Error),
}

impl From<io::Error> for Errno {
    fn from(e: io::Error) -> Errno {
        Errno::Io(e)
    }
}

impl Errno {
    pub fn raw(&self) -> i32 {
        match self {
            Errno::NoEntry => libc::ENOENT,
            Errno::NotDir => libc::ENOTDIR,
            Errno::IsDir => libc::EISDIR,
            Errno::Invalid => libc::EINVAL,
            Errno::Upper => libc::EIO,
            Errno::Raw(e) => *e,
            Errno::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}
