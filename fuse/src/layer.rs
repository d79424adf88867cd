//! The read-only layer trees the merged view stacks. A layer is given to this crate through
//! [`LayerTree`]; this crate knows nothing of how the layer is stored (OCI, tar, SQLite).

use std::io;
use std::sync::Arc;

/// A node inside one layer: an index into that layer's node table. Two directory entries that
/// share a `NodeId` are hardlinks of one file.
/// Extended attributes as (name, value).
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

pub type NodeId = u32;

/// What a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeKind {
    File,
    Dir,
    Symlink,
    CharDev,
    BlockDev,
    Fifo,
    Socket,
}

/// A timestamp as tar records it: seconds since the epoch (may be negative) and nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: u32,
}

/// The metadata of one node, as recorded in its layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAttr {
    pub kind: NodeKind,
    /// Permission bits including setuid, setgid and sticky (`0o7777`); no file-type bits.
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    /// Logical size in bytes (for sparse files: including the holes). 0 for non-files
    /// except symlinks, whose size is the target's length.
    pub size: u64,
    pub mtime: Timestamp,
    /// From PAX `atime`/`ctime` when the layer recorded them, else `mtime`.
    pub atime: Timestamp,
    pub ctime: Timestamp,
    /// Device number for char/block devices (`makedev(major, minor)`), else 0.
    pub rdev: u64,
    /// Number of directory entries in this layer that refer to this node (hardlinks).
    pub nlink: u32,
}

/// One entry of a directory in a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirEntry {
    /// A real node.
    Node(NodeId),
    /// A whiteout (`.wh.NAME` in the tar): NAME is deleted from the layers below.
    Whiteout,
}

/// A read-only layer tree. Implementations must be cheap to query: the merged view calls these
/// on every lookup. Paths never leave the tree: names are single components (no `/`, never `.`
/// or `..`).
pub trait LayerTree: Send + Sync {
    /// The root directory.
    fn root(&self) -> NodeId;

    /// The entry `name` of directory `dir`, if this layer has one.
    fn lookup(&self, dir: NodeId, name: &[u8]) -> Option<DirEntry>;

    /// Calls `f` for every entry of directory `dir` (whiteouts included, marker files excluded).
    fn for_each_child(&self, dir: NodeId, f: &mut dyn FnMut(&[u8], DirEntry));

    /// True when `dir` carried an opaque marker (`.wh..wh..opq`): nothing below shows through.
    fn is_opaque(&self, dir: NodeId) -> bool;

    /// True when `dir` was not itself an entry of the layer but only implied by the paths of its
    /// children. Its metadata then comes from the layers below when they have the directory
    /// (as when `tar -x` applies the layer onto them).
    fn is_implicit(&self, dir: NodeId) -> bool;

    /// The parent directory and the name under which `dir` appears in it; `None` for the root.
    /// Only defined for directories.
    fn parent(&self, dir: NodeId) -> Option<(NodeId, Vec<u8>)>;

    /// The directory entries that refer to `node`, as (parent dir, name). Only needed when
    /// `attr(node).nlink > 1`, to count the hardlinks that stay visible in the merged view.
    fn links(&self, node: NodeId) -> Vec<(NodeId, Vec<u8>)>;

    fn attr(&self, node: NodeId) -> NodeAttr;

    /// The target of a symlink.
    fn readlink(&self, node: NodeId) -> io::Result<Vec<u8>>;

    /// Extended attributes as (name, value); values may be binary.
    fn xattrs(&self, node: NodeId) -> Xattrs;

    /// Reads file bytes at `offset` into `buf`; returns how many were read (short only at the end
    /// of the file). Holes of sparse files read as zeros. May be slow (decompression): the merged
    /// view calls it without holding locks that lookups need.
    fn read_at(&self, node: NodeId, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
}

/// A stack of layers, bottom first.
pub type LayerStack = Vec<Arc<dyn LayerTree>>;
