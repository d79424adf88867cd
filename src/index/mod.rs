//! The layer index: every entry of a layer's tar, arranged as a tree, with where each file's
//! bytes start in the uncompressed stream. Built in one streaming pass (see [`builder`]) and
//! stored as one compact file per layer. Knows nothing of SQLite or FUSE.

pub mod builder;
pub mod tar;
pub mod toc;

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use builder::{build_index, build_index_observed, BuildError, BuiltLayer};

/// Bumped when the on-disk format changes; older files are rebuilt.
pub const FORMAT_VERSION: u32 = 1;

pub const NO_PARENT: u32 = u32::MAX;
/// `Dirent::target` value of a whiteout.
pub const WHITEOUT: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    CharDev,
    BlockDev,
    Fifo,
}

/// A byte range in [`LayerIndex::bytes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Span {
    pub start: u32,
    pub len: u32,
}

/// A range of indices into one of the index's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Range {
    pub start: u32,
    pub len: u32,
}

impl Range {
    pub fn as_range(self) -> std::ops::Range<usize> {
        self.start as usize..(self.start + self.len) as usize
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub kind: Kind,
    /// Permission bits incl. setuid/setgid/sticky.
    pub perm: u16,
    pub flags: u8,
    pub uid: u32,
    pub gid: u32,
    /// Logical size (files: incl. sparse holes; symlinks: target length).
    pub size: u64,
    pub mtime: (i64, u32),
    pub atime: Option<(i64, u32)>,
    pub ctime: Option<(i64, u32)>,
    pub rdev: (u32, u32),
    /// Files: offset of the first data byte in the uncompressed stream.
    pub data_offset: u64,
    /// Symlinks: the target, in `bytes`.
    pub link: Span,
    /// Into `xattrs`.
    pub xattrs: Range,
    /// Files: into `sparse` (empty = not sparse).
    pub sparse: Range,
    /// Directories: into `dirents`, sorted by name.
    pub children: Range,
    /// Directories: parent node and the dirent naming this one.
    pub parent: u32,
    pub parent_dirent: u32,
    /// Number of dirents naming this node (hardlinks).
    pub nlink: u32,
}

pub const FLAG_OPAQUE: u8 = 1;
pub const FLAG_IMPLICIT: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dirent {
    pub name: Span,
    /// A node id, or [`WHITEOUT`].
    pub target: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    pub name: Span,
    pub value: Span,
}

/// What the indexing pass learnt about the layer as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerStats {
    /// sha256 of the uncompressed stream, `sha256:<hex>`.
    pub diff_id: String,
    pub uncompressed_size: u64,
    /// Tar entries (incl. whiteouts, markers, duplicates).
    pub entries: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerIndex {
    pub version: u32,
    pub stats: LayerStats,
    /// Node 0 is the root directory.
    pub nodes: Vec<Node>,
    pub dirents: Vec<Dirent>,
    pub xattrs: Vec<Xattr>,
    pub sparse: Vec<(u64, u64)>,
    /// Names, link targets, xattr names and values.
    pub bytes: Vec<u8>,
    /// For hardlinked nodes (nlink > 1): (node, dirent) pairs sorted by node.
    pub hardlinks: Vec<(u32, u32)>,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexFileError {
    #[error("reading index {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("index {path} is corrupt: {why}")]
    Corrupt { path: String, why: String },
}

impl LayerIndex {
    pub fn bytes_of(&self, span: Span) -> &[u8] {
        let start = span.start as usize;
        self.bytes
            .get(start..start + span.len as usize)
            .unwrap_or(&[])
    }

    pub fn children(&self, dir: u32) -> &[Dirent] {
        match self.nodes.get(dir as usize) {
            Some(n) if n.kind == Kind::Dir => {
                self.dirents.get(n.children.as_range()).unwrap_or(&[])
            }
            _ => &[],
        }
    }

    pub fn lookup(&self, dir: u32, name: &[u8]) -> Option<Dirent> {
        let children = self.children(dir);
        children
            .binary_search_by(|d| self.bytes_of(d.name).cmp(name))
            .ok()
            .map(|i| children[i])
    }

    /// Resolves a '/'-separated path from the root (for tests and tools).
    pub fn resolve(&self, path: &str) -> Option<u32> {
        let mut node = 0u32;
        for comp in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            let d = self.lookup(node, comp.as_bytes())?;
            if d.target == WHITEOUT {
                return None;
            }
            node = d.target;
        }
        Some(node)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising plain data with postcard cannot fail short of OOM.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    pub fn from_bytes(data: &[u8], path: &Path) -> Result<Self, IndexFileError> {
        let corrupt = |why: String| IndexFileError::Corrupt {
            path: path.display().to_string(),
            why,
        };
        let index: LayerIndex = postcard::from_bytes(data).map_err(|e| corrupt(e.to_string()))?;
        if index.version != FORMAT_VERSION {
            return Err(corrupt(format!(
                "format version {} (expected {FORMAT_VERSION})",
                index.version
            )));
        }
        index.validate().map_err(corrupt)?;
        Ok(index)
    }

    pub fn load(path: &Path) -> Result<Self, IndexFileError> {
        let data = std::fs::read(path).map_err(|source| IndexFileError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes(&data, path)
    }

    /// Checks every reference stays inside its table, so lookups never index out of bounds.
    fn validate(&self) -> Result<(), String> {
        let n_nodes = self.nodes.len() as u64;
        if self.nodes.first().map(|n| n.kind) != Some(Kind::Dir) {
            return Err("root is not a directory".into());
        }
        let span_ok = |s: Span| u64::from(s.start) + u64::from(s.len) <= self.bytes.len() as u64;
        let range_ok = |r: Range, len: usize| u64::from(r.start) + u64::from(r.len) <= len as u64;
        for d in &self.dirents {
            if !span_ok(d.name) || (d.target != WHITEOUT && u64::from(d.target) >= n_nodes) {
                return Err("dirent out of range".into());
            }
        }
        for x in &self.xattrs {
            if !span_ok(x.name) || !span_ok(x.value) {
                return Err("xattr out of range".into());
            }
        }
        for n in &self.nodes {
            if !span_ok(n.link)
                || !range_ok(n.xattrs, self.xattrs.len())
                || !range_ok(n.sparse, self.sparse.len())
                || !range_ok(n.children, self.dirents.len())
            {
                return Err("node out of range".into());
            }
        }
        for &(node, dirent) in &self.hardlinks {
            if u64::from(node) >= n_nodes || dirent as usize >= self.dirents.len() {
                return Err("hardlink table out of range".into());
            }
        }
        Ok(())
    }
}
