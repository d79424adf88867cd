//! An in-memory [`LayerTree`], built path by path. It exists for tests (of this crate and of
//! its users) and for tools that want a small synthetic layer; it is not tuned for size.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::sync::Arc;

use crate::layer::{DirEntry, LayerTree, NodeAttr, NodeId, NodeKind, Timestamp};

/// Called with (offset, length) before every read of a node: it may sleep, block, or fail the
/// read.
pub type ReadHook = Arc<dyn Fn(u64, usize) -> io::Result<()> + Send + Sync>;

/// The mtime given to nodes unless set otherwise (with nanoseconds, to catch truncation).
pub const DEFAULT_MTIME: Timestamp = Timestamp {
    sec: 1_700_000_000,
    nsec: 123_456_789,
};

#[derive(Clone)]
struct Node {
    attr: NodeAttr,
    children: BTreeMap<Vec<u8>, DirEntry>,
    opaque: bool,
    implicit: bool,
    parent: Option<(NodeId, Vec<u8>)>,
    links: Vec<(NodeId, Vec<u8>)>,
    data: Vec<u8>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    read_hook: Option<ReadHook>,
}

impl Node {
    fn new(kind: NodeKind, perm: u32) -> Node {
        Node {
            attr: NodeAttr {
                kind,
                perm,
                uid: 0,
                gid: 0,
                size: 0,
                mtime: DEFAULT_MTIME,
                atime: DEFAULT_MTIME,
                ctime: DEFAULT_MTIME,
                rdev: 0,
                nlink: 1,
            },
            children: BTreeMap::new(),
            opaque: false,
            implicit: false,
            parent: None,
            links: Vec::new(),
            data: Vec::new(),
            xattrs: Vec::new(),
            read_hook: None,
        }
    }
}

/// One layer held in memory. Build it with [`MemLayer::builder`].
#[derive(Clone)]
pub struct MemLayer {
    nodes: Vec<Node>,
}

impl fmt::Debug for MemLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemLayer")
            .field("nodes", &self.nodes.len())
            .finish()
    }
}

impl MemLayer {
    pub fn builder() -> MemLayerBuilder {
        let mut root = Node::new(NodeKind::Dir, 0o755);
        root.implicit = true;
        MemLayerBuilder {
            layer: MemLayer { nodes: vec![root] },
        }
    }

    fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id as usize)
    }

    /// The node at `path` ("" = root), following no symlinks.
    pub fn resolve(&self, path: &str) -> Option<NodeId> {
        let mut cur: NodeId = 0;
        for comp in components(path) {
            match self.node(cur)?.children.get(comp.as_bytes())? {
                DirEntry::Node(id) => cur = *id,
                DirEntry::Whiteout => return None,
            }
        }
        Some(cur)
    }

    /// The file content of `path`, for comparisons in tests.
    pub fn content(&self, path: &str) -> Option<&[u8]> {
        Some(&self.node(self.resolve(path)?)?.data)
    }
}

fn components(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|c| !c.is_empty() && *c != ".")
}

/// Builds a [`MemLayer`]. Paths are relative to the layer root, `/`-separated; missing parent
/// directories are created as implicit directories (as a tar without directory entries implies
/// them). Adding at a path that exists replaces the entry, as a later tar entry would.
pub struct MemLayerBuilder {
    layer: MemLayer,
}

/// A handle on a node just added, to set more of its metadata.
pub struct NodeRef<'a> {
    layer: &'a mut MemLayer,
    id: NodeId,
}

impl NodeRef<'_> {
    fn node(&mut self) -> &mut Node {
        &mut self.layer.nodes[self.id as usize]
    }
    pub fn id(&self) -> NodeId {
        self.id
    }
    pub fn owner(mut self, uid: u32, gid: u32) -> Self {
        let a = &mut self.node().attr;
        a.uid = uid;
        a.gid = gid;
        self
    }
    pub fn perm(mut self, perm: u32) -> Self {
        self.node().attr.perm = perm;
        self
    }
    /// Sets mtime (and atime/ctime, as tar without PAX times would).
    pub fn mtime(mut self, sec: i64, nsec: u32) -> Self {
        let t = Timestamp { sec, nsec };
        let a = &mut self.node().attr;
        a.mtime = t;
        a.atime = t;
        a.ctime = t;
        self
    }
    pub fn times(mut self, atime: Timestamp, mtime: Timestamp, ctime: Timestamp) -> Self {
        let a = &mut self.node().attr;
        a.atime = atime;
        a.mtime = mtime;
        a.ctime = ctime;
        self
    }
    pub fn xattr(mut self, name: &[u8], value: &[u8]) -> Self {
        let x = &mut self.node().xattrs;
        x.retain(|(n, _)| n != name);
        x.push((name.to_vec(), value.to_vec()));
        self
    }
    /// Installs a hook run before each read of this node.
    pub fn read_hook(mut self, hook: ReadHook) -> Self {
        self.node().read_hook = Some(hook);
        self
    }
    /// Declares a logical size larger than the stored data: the rest reads as zeros (a sparse
    /// file's hole).
    pub fn sparse_size(mut self, size: u64) -> Self {
        self.node().attr.size = size;
        self
    }
}

impl MemLayerBuilder {
    /// The directory at `path`, created (implicit) with its parents if missing.
    fn ensure_dir(&mut self, path: &[&str]) -> NodeId {
        let mut cur: NodeId = 0;
        for comp in path {
            let existing = match self.layer.nodes[cur as usize].children.get(comp.as_bytes()) {
                Some(DirEntry::Node(id))
                    if self.layer.nodes[*id as usize].attr.kind == NodeKind::Dir =>
                {
                    Some(*id)
                }
                _ => None,
            };
            cur = match existing {
                Some(id) => id,
                None => {
                    let mut n = Node::new(NodeKind::Dir, 0o755);
                    n.implicit = true;
                    self.insert(cur, comp, n)
                }
            };
        }
        cur
    }

    fn split(path: &str) -> (Vec<&str>, &str) {
        let mut comps: Vec<&str> = components(path).collect();
        let name = comps.pop().unwrap_or("");
        (comps, name)
    }

    fn unlink(&mut self, dir: NodeId, name: &str) {
        if let Some(DirEntry::Node(old)) = self.layer.nodes[dir as usize]
            .children
            .remove(name.as_bytes())
        {
            let n = &mut self.layer.nodes[old as usize];
            n.links
                .retain(|(d, nm)| !(*d == dir && nm == name.as_bytes()));
            n.attr.nlink = n.attr.nlink.saturating_sub(1);
        }
    }

    fn insert(&mut self, dir: NodeId, name: &str, mut node: Node) -> NodeId {
        self.unlink(dir, name);
        let id = self.layer.nodes.len() as NodeId;
        if node.attr.kind == NodeKind::Dir {
            node.parent = Some((dir, name.as_bytes().to_vec()));
        }
        node.links = vec![(dir, name.as_bytes().to_vec())];
        self.layer.nodes.push(node);
        self.layer.nodes[dir as usize]
            .children
            .insert(name.as_bytes().to_vec(), DirEntry::Node(id));
        id
    }

    fn add(&mut self, path: &str, node: Node) -> NodeRef<'_> {
        let (parents, name) = Self::split(path);
        let dir = self.ensure_dir(&parents);
        let id = if name.is_empty() {
            0
        } else {
            self.insert(dir, name, node)
        };
        NodeRef {
            layer: &mut self.layer,
            id,
        }
    }

    /// An explicit directory (an entry of its own in the layer). An existing directory at
    /// `path` keeps its children and becomes explicit.
    pub fn dir(&mut self, path: &str, perm: u32) -> NodeRef<'_> {
        let comps: Vec<&str> = components(path).collect();
        let id = self.ensure_dir(&comps);
        let n = &mut self.layer.nodes[id as usize];
        n.implicit = false;
        n.attr.perm = perm;
        NodeRef {
            layer: &mut self.layer,
            id,
        }
    }

    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> NodeRef<'_> {
        let mut n = Node::new(NodeKind::File, perm);
        n.attr.size = data.len() as u64;
        n.data = data.to_vec();
        self.add(path, n)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> NodeRef<'_> {
        let mut n = Node::new(NodeKind::Symlink, 0o777);
        n.attr.size = target.len() as u64;
        n.data = target.as_bytes().to_vec();
        self.add(path, n)
    }

    /// A char or block device, fifo or socket (`rdev` is ignored for the last two).
    pub fn special(&mut self, path: &str, kind: NodeKind, perm: u32, rdev: u64) -> NodeRef<'_> {
        let mut n = Node::new(kind, perm);
        if matches!(kind, NodeKind::CharDev | NodeKind::BlockDev) {
            n.attr.rdev = rdev;
        }
        self.add(path, n)
    }

    /// A hardlink at `path` to the existing non-directory `target`.
    ///
    /// # Panics
    /// When `target` is missing or a directory (a test bug).
    pub fn hardlink(&mut self, path: &str, target: &str) -> NodeRef<'_> {
        let id = match self.layer.resolve(target) {
            Some(id) if self.layer.nodes[id as usize].attr.kind != NodeKind::Dir => id,
            _ => panic!("hardlink target {target} is not a non-directory of this layer"),
        };
        let (parents, name) = Self::split(path);
        let dir = self.ensure_dir(&parents);
        self.unlink(dir, name);
        self.layer.nodes[dir as usize]
            .children
            .insert(name.as_bytes().to_vec(), DirEntry::Node(id));
        let n = &mut self.layer.nodes[id as usize];
        n.attr.nlink += 1;
        n.links.push((dir, name.as_bytes().to_vec()));
        NodeRef {
            layer: &mut self.layer,
            id,
        }
    }

    /// A whiteout (`.wh.NAME`): hides `path` in the layers below.
    pub fn whiteout(&mut self, path: &str) -> &mut Self {
        let (parents, name) = Self::split(path);
        let dir = self.ensure_dir(&parents);
        self.unlink(dir, name);
        self.layer.nodes[dir as usize]
            .children
            .insert(name.as_bytes().to_vec(), DirEntry::Whiteout);
        self
    }

    /// Marks the directory at `path` opaque (`.wh..wh..opq`), creating it (implicit) if needed.
    pub fn opaque(&mut self, path: &str) -> &mut Self {
        let comps: Vec<&str> = components(path).collect();
        let id = self.ensure_dir(&comps);
        self.layer.nodes[id as usize].opaque = true;
        self
    }

    /// Metadata of an existing node, to change after the fact.
    ///
    /// # Panics
    /// When `path` does not exist (a test bug).
    pub fn at(&mut self, path: &str) -> NodeRef<'_> {
        let Some(id) = self.layer.resolve(path) else {
            panic!("no node at {path}")
        };
        NodeRef {
            layer: &mut self.layer,
            id,
        }
    }

    pub fn build(&mut self) -> MemLayer {
        self.layer.clone()
    }
}

impl LayerTree for MemLayer {
    fn root(&self) -> NodeId {
        0
    }

    fn lookup(&self, dir: NodeId, name: &[u8]) -> Option<DirEntry> {
        self.node(dir)?.children.get(name).copied()
    }

    fn for_each_child(&self, dir: NodeId, f: &mut dyn FnMut(&[u8], DirEntry)) {
        if let Some(n) = self.node(dir) {
            for (name, e) in &n.children {
                f(name, *e);
            }
        }
    }

    fn is_opaque(&self, dir: NodeId) -> bool {
        self.node(dir).is_some_and(|n| n.opaque)
    }

    fn is_implicit(&self, dir: NodeId) -> bool {
        self.node(dir).is_some_and(|n| n.implicit)
    }

    fn parent(&self, dir: NodeId) -> Option<(NodeId, Vec<u8>)> {
        self.node(dir)?.parent.clone()
    }

    fn links(&self, node: NodeId) -> Vec<(NodeId, Vec<u8>)> {
        self.node(node).map(|n| n.links.clone()).unwrap_or_default()
    }

    fn attr(&self, node: NodeId) -> NodeAttr {
        match self.node(node) {
            Some(n) => n.attr.clone(),
            None => Node::new(NodeKind::File, 0).attr,
        }
    }

    fn readlink(&self, node: NodeId) -> io::Result<Vec<u8>> {
        match self.node(node) {
            Some(n) if n.attr.kind == NodeKind::Symlink => Ok(n.data.clone()),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    fn xattrs(&self, node: NodeId) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.node(node)
            .map(|n| n.xattrs.clone())
            .unwrap_or_default()
    }

    fn read_at(&self, node: NodeId, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let n = self
            .node(node)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        if let Some(hook) = &n.read_hook {
            hook(offset, buf.len())?;
        }
        if offset >= n.attr.size {
            return Ok(0);
        }
        let len = buf.len().min((n.attr.size - offset) as usize);
        let start = offset as usize;
        for (i, b) in buf[..len].iter_mut().enumerate() {
            *b = n.data.get(start + i).copied().unwrap_or(0);
        }
        Ok(len)
    }
}
