//! A layer as the filesystem sees it: its index plus a random-access reader of its blob,
//! behind the `LayerTree` trait of the fuse crate.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use lazysnap_fuse::{DirEntry, LayerTree, NodeAttr, NodeId, NodeKind, Timestamp};
use tracing::warn;

use crate::blob::{BlobReader, SpanCache, SpanMap};
use crate::digest::Digest;
use crate::index::{Kind, LayerIndex, FLAG_IMPLICIT, FLAG_OPAQUE, NO_PARENT, WHITEOUT};
use crate::meta::{BlobRow, ChainRow};
use crate::registry::lazy::{RemoteBlob, RemoteInfo};
use crate::root::Root;

pub struct IndexedLayer {
    index: LayerIndex,
    reader: BlobReader,
    name: String,
    /// Records first reads (lazily pulled layers, first mount): see [`crate::trace`].
    tracer: Option<Arc<crate::trace::Recorder>>,
}

/// What one layer blob is read with, from the root's metadata: its index (the blob's own when
/// its span map is laid out on an eStargz/zstd:chunked TOC, else its layer's), its span map,
/// and for a lazily pulled blob the remote record.
pub struct LayerFiles {
    pub digest: Digest,
    pub blob: BlobRow,
    pub index_path: PathBuf,
    pub remote: Option<RemoteInfo>,
}

impl LayerFiles {
    pub fn of(root: &Root, blob_digest: &str) -> anyhow::Result<Self> {
        let blob = root
            .meta
            .blob(blob_digest)?
            .with_context(|| format!("blob {blob_digest} is not indexed"))?;
        let layer = root
            .meta
            .layer(&blob.diff_id)?
            .with_context(|| format!("layer {} is not indexed", blob.diff_id))?;
        let digest = Digest::parse(blob_digest)?;
        let remote = match blob.remote.as_deref() {
            Some(rel) => Some(RemoteInfo::load(&root.abs(rel), &digest)?),
            None => None,
        };
        let index_path = match remote.as_ref().and_then(|r| r.toc_index.as_deref()) {
            Some(own) => root.abs(own),
            None => root.abs(&layer.index_path),
        };
        Ok(Self {
            digest,
            blob,
            index_path,
            remote,
        })
    }

    pub fn index(&self) -> anyhow::Result<LayerIndex> {
        LayerIndex::load(&self.index_path)
            .with_context(|| format!("loading the index of layer {}", self.blob.diff_id))
    }

    pub fn span_map(&self, root: &Root) -> anyhow::Result<SpanMap> {
        Ok(SpanMap::load(&root.abs(&self.blob.spans_path))?)
    }

    /// The lazily pulled blob as a remote source, while it is not in the store.
    pub fn remote_blob(&self, root: &Root) -> anyhow::Result<Option<Arc<RemoteBlob>>> {
        let Some(info) = self.remote.clone() else {
            return Ok(None);
        };
        if root.store.contains(&self.digest) {
            return Ok(None);
        }
        let source = RemoteBlob::open(&root.store, &self.digest, info, root.chunk_cache()?)
            .with_context(|| format!("opening remote blob {}", self.digest))?;
        Ok(Some(source))
    }
}

impl IndexedLayer {
    pub fn new(index: LayerIndex, reader: BlobReader, name: String) -> Self {
        Self {
            index,
            reader,
            name,
            tracer: None,
        }
    }

    /// Opens the layer of one chain level from the root's metadata.
    pub fn open(root: &Root, chain: &ChainRow, cache: Arc<SpanCache>) -> anyhow::Result<Self> {
        let files = LayerFiles::of(root, &chain.blob_digest)?;
        let index = files.index()?;
        let map = Arc::new(files.span_map(root)?);
        let local = files.blob.local_copy.as_deref().map(|p| root.abs(p));
        let digest = &files.digest;
        let mut tracer = None;
        let mut reader = match files.remote_blob(root)? {
            // Lazily pulled and not downloaded yet: ranges from the registry.
            Some(source) => {
                // What an earlier run read comes first, then (once reads pause) the rest.
                match crate::trace::Trace::load(&root.path, digest) {
                    Some(t) => {
                        source.prefetch_in_background(source.chunks_for_trace(&t, &index, &map))
                    }
                    None => tracer = crate::trace::Recorder::start(&root.path, digest),
                }
                source.start_background(root.store.clone(), root.path.join(crate::chunks::DIR));
                let size = source.size();
                BlobReader::open_bytes(
                    source,
                    size,
                    format!("remote blob {digest}"),
                    map,
                    local.as_deref(),
                    cache,
                )
            }
            None => BlobReader::open(&root.store.blob_path(digest), map, local.as_deref(), cache),
        }
        .with_context(|| format!("opening blob {digest}"))?;
        if let Some(r) = files.remote.as_ref().filter(|r| !r.span_digests.is_empty()) {
            reader.set_span_digests(Arc::new(r.span_digests.clone()));
        }
        let mut layer = Self::new(index, reader, chain.blob_digest.clone());
        layer.tracer = tracer;
        Ok(layer)
    }

    pub fn index(&self) -> &LayerIndex {
        &self.index
    }

    pub fn reader(&self) -> &BlobReader {
        &self.reader
    }

    fn node(&self, id: NodeId) -> Option<&crate::index::Node> {
        self.index.nodes.get(id as usize)
    }

    /// Reads stored bytes of an entry whose data spans `data_offset..data_end` of the stream.
    fn read_plain(
        &self,
        data_offset: u64,
        data_end: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let n = self
                .reader
                .read_within(data_offset + offset + done as u64, &mut buf[done..], data_end)
                .map_err(|e| {
                    warn!(blob = %self.name, offset = data_offset + offset, error = %e, "read failed");
                    io::Error::other(e.to_string())
                })?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }
}

fn ts(t: (i64, u32)) -> Timestamp {
    Timestamp {
        sec: t.0,
        nsec: t.1,
    }
}

impl LayerTree for IndexedLayer {
    fn root(&self) -> NodeId {
        0
    }

    fn lookup(&self, dir: NodeId, name: &[u8]) -> Option<DirEntry> {
        self.index.lookup(dir, name).map(|d| {
            if d.target == WHITEOUT {
                DirEntry::Whiteout
            } else {
                DirEntry::Node(d.target)
            }
        })
    }

    fn for_each_child(&self, dir: NodeId, f: &mut dyn FnMut(&[u8], DirEntry)) {
        for d in self.index.children(dir) {
            let entry = if d.target == WHITEOUT {
                DirEntry::Whiteout
            } else {
                DirEntry::Node(d.target)
            };
            f(self.index.bytes_of(d.name), entry);
        }
    }

    fn is_opaque(&self, dir: NodeId) -> bool {
        self.node(dir).is_some_and(|n| n.flags & FLAG_OPAQUE != 0)
    }

    fn is_implicit(&self, dir: NodeId) -> bool {
        self.node(dir).is_some_and(|n| n.flags & FLAG_IMPLICIT != 0)
    }

    fn parent(&self, dir: NodeId) -> Option<(NodeId, Vec<u8>)> {
        let n = self.node(dir)?;
        if n.parent == NO_PARENT {
            return None;
        }
        let d = self.index.dirents.get(n.parent_dirent as usize)?;
        Some((n.parent, self.index.bytes_of(d.name).to_vec()))
    }

    fn links(&self, node: NodeId) -> Vec<(NodeId, Vec<u8>)> {
        let start = self.index.hardlinks.partition_point(|&(n, _)| n < node);
        let mut out = Vec::new();
        for &(n, dirent) in &self.index.hardlinks[start..] {
            if n != node {
                break;
            }
            // The dirent's directory: the node whose children range holds it.
            let Some(d) = self.index.dirents.get(dirent as usize) else {
                continue;
            };
            // Children ranges are laid out in node order, so the directory holding the dirent
            // is the last non-empty range starting at or before it.
            let upto = self
                .index
                .nodes
                .partition_point(|p| p.children.start <= dirent);
            let dir = self.index.nodes[..upto].iter().rposition(|p| {
                p.kind == Kind::Dir && p.children.as_range().contains(&(dirent as usize))
            });
            if let Some(dir) = dir {
                out.push((dir as NodeId, self.index.bytes_of(d.name).to_vec()));
            }
        }
        out
    }

    fn attr(&self, node: NodeId) -> NodeAttr {
        let Some(n) = self.node(node) else {
            return NodeAttr {
                kind: NodeKind::File,
                perm: 0,
                uid: 0,
                gid: 0,
                size: 0,
                mtime: Timestamp::default(),
                atime: Timestamp::default(),
                ctime: Timestamp::default(),
                rdev: 0,
                nlink: 1,
            };
        };
        let kind = match n.kind {
            Kind::File => NodeKind::File,
            Kind::Dir => NodeKind::Dir,
            Kind::Symlink => NodeKind::Symlink,
            Kind::CharDev => NodeKind::CharDev,
            Kind::BlockDev => NodeKind::BlockDev,
            Kind::Fifo => NodeKind::Fifo,
        };
        let mtime = ts(n.mtime);
        NodeAttr {
            kind,
            perm: u32::from(n.perm),
            uid: n.uid,
            gid: n.gid,
            size: n.size,
            mtime,
            atime: n.atime.map(ts).unwrap_or(mtime),
            ctime: n.ctime.map(ts).unwrap_or(mtime),
            rdev: libc::makedev(n.rdev.0, n.rdev.1),
            nlink: n.nlink.max(1),
        }
    }

    fn readlink(&self, node: NodeId) -> io::Result<Vec<u8>> {
        match self.node(node) {
            Some(n) if n.kind == Kind::Symlink => Ok(self.index.bytes_of(n.link).to_vec()),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    fn xattrs(&self, node: NodeId) -> Vec<(Vec<u8>, Vec<u8>)> {
        let Some(n) = self.node(node) else {
            return Vec::new();
        };
        self.index
            .xattrs
            .get(n.xattrs.as_range())
            .unwrap_or(&[])
            .iter()
            .map(|x| {
                (
                    self.index.bytes_of(x.name).to_vec(),
                    self.index.bytes_of(x.value).to_vec(),
                )
            })
            .collect()
    }

    fn read_at(&self, node: NodeId, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let n = match self.node(node) {
            Some(n) if n.kind == Kind::File => n,
            _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
        };
        if offset >= n.size || buf.is_empty() {
            return Ok(0);
        }
        let want = (n.size - offset).min(buf.len() as u64) as usize;
        let buf = &mut buf[..want];
        if let Some(t) = &self.tracer {
            t.record(node, offset + want as u64);
        }
        let extents = self.index.sparse.get(n.sparse.as_range()).unwrap_or(&[]);
        if extents.is_empty() {
            return self.read_plain(n.data_offset, n.data_offset + n.size, offset, buf);
        }
        // Sparse: zeros except in the extents, whose data is stored back to back.
        buf.fill(0);
        let end = offset + want as u64;
        let stored_len: u64 = extents.iter().map(|e| e.1).sum();
        let mut stored = 0u64;
        for &(ext_off, ext_len) in extents {
            let ext_end = ext_off + ext_len;
            if ext_end > offset && ext_off < end {
                let from = offset.max(ext_off);
                let to = end.min(ext_end);
                let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
                let got = self.read_plain(
                    n.data_offset,
                    n.data_offset + stored_len,
                    stored + (from - ext_off),
                    dst,
                )?;
                if got < dst.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "sparse extent beyond the end of the layer",
                    ));
                }
            }
            stored += ext_len;
        }
        Ok(want)
    }
}

/// Loads the layer stack of a chain (bottom first) for mounting.
pub fn open_stack(
    root: &Root,
    chain_id: &str,
    cache: Arc<SpanCache>,
) -> anyhow::Result<Vec<Arc<dyn LayerTree>>> {
    let chain = root.meta.chain_stack(chain_id)?;
    chain
        .iter()
        .map(|c| {
            IndexedLayer::open(root, c, cache.clone()).map(|l| Arc::new(l) as Arc<dyn LayerTree>)
        })
        .collect()
}
