//! Builds a [`LayerIndex`] from one pass over an uncompressed tar stream, applying the rules of
//! a layer: paths normalised inside the rootfs, the last duplicate wins, `.wh.NAME` whiteouts,
//! `.wh..wh..opq` opaque markers, hardlinks resolved to their target's node.

use std::collections::BTreeMap;
use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

use super::tar::{DataHook, EntryType, TarEntry, TarError, TarReader};
use super::{
    Dirent, Kind, LayerIndex, LayerStats, Node, Range, Span, Xattr, FLAG_IMPLICIT, FLAG_OPAQUE,
    FORMAT_VERSION, NO_PARENT, WHITEOUT,
};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// Longest path accepted (Linux's PATH_MAX is 4096; tar can carry more, `tar -x` could not).
const MAX_PATH: usize = 64 * 1024;
/// The index addresses its byte table and nodes with 32-bit numbers; a layer needing more is
/// refused rather than written wrapped.
const MAX_INDEX_BYTES: u64 = u32::MAX as u64;
const MAX_NODES: usize = (u32::MAX - 1) as usize;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Tar(#[from] TarError),
    #[error("entry {path:?}: hardlink to {target:?}, which is not an earlier non-directory entry of this layer")]
    HardlinkTarget { path: String, target: String },
    #[error("entry {path:?}: {why}")]
    BadEntry { path: String, why: String },
    #[error("layer too large to index: {0}")]
    TooLarge(String),
}

/// The result of indexing one layer.
pub struct BuiltLayer {
    pub index: LayerIndex,
}

/// Counts and hashes the bytes passing through, for the diffID.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Reads the whole uncompressed stream `reader` (to EOF, past the end-of-archive marker) and
/// builds its index. `progress` gets the uncompressed bytes read so far.
pub fn build_index<R: Read>(reader: R) -> Result<BuiltLayer, BuildError> {
    build_index_observed(reader, None)
}

/// As [`build_index`], telling `before_data` where each regular file's data lies before
/// reading it (see [`TarReader::before_data`]).
pub fn build_index_observed<R: Read>(
    reader: R,
    before_data: Option<DataHook>,
) -> Result<BuiltLayer, BuildError> {
    let hashing = HashingReader {
        inner: reader,
        hasher: Sha256::new(),
        count: 0,
    };
    let mut tar = TarReader::new(hashing);
    if let Some(hook) = before_data {
        tar.before_data(hook);
    }
    let mut tree = Tree::new();
    let mut entries = 0u64;
    while let Some(entry) = tar.next_entry()? {
        entries += 1;
        tree.apply(entry)?;
    }
    tar.drain()?;
    let hashing = tar.into_inner();
    let stats = LayerStats {
        diff_id: format!("sha256:{}", hex::encode(hashing.hasher.finalize())),
        uncompressed_size: hashing.count,
        entries,
    };
    Ok(BuiltLayer {
        index: tree.finish(stats),
    })
}

/// Builds an index from entries known without reading the stream (an eStargz TOC): the same
/// layer rules as [`build_index`]; `stats` are the caller's.
pub fn build_index_from_entries(
    entries: impl IntoIterator<Item = TarEntry>,
    stats: LayerStats,
) -> Result<BuiltLayer, BuildError> {
    let mut tree = Tree::new();
    for e in entries {
        tree.apply(e)?;
    }
    Ok(BuiltLayer {
        index: tree.finish(stats),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Child {
    Node(usize),
    Whiteout,
}

struct BNode {
    kind: Kind,
    perm: u16,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, u32),
    atime: Option<(i64, u32)>,
    ctime: Option<(i64, u32)>,
    rdev: (u32, u32),
    data_offset: u64,
    link: Vec<u8>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    sparse: Vec<(u64, u64)>,
    opaque: bool,
    implicit: bool,
    children: BTreeMap<Vec<u8>, Child>,
}

impl BNode {
    fn implicit_dir() -> Self {
        BNode {
            kind: Kind::Dir,
            perm: 0o755,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: (0, 0),
            atime: None,
            ctime: None,
            rdev: (0, 0),
            data_offset: 0,
            link: Vec::new(),
            xattrs: Vec::new(),
            sparse: Vec::new(),
            opaque: false,
            implicit: true,
            children: BTreeMap::new(),
        }
    }
}

struct Tree {
    nodes: Vec<BNode>,
    /// Bytes the names, link targets and xattrs of the entries seen so far may need.
    bytes: u64,
}

fn lossy(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// Splits a tar path into components inside the rootfs: leading `/` and `.` dropped, `..`
/// clamped at the root (as containerd's apply does), so no path can leave the tree.
pub fn normalize(path: &[u8]) -> Vec<&[u8]> {
    let mut out: Vec<&[u8]> = Vec::new();
    for comp in path.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

impl Tree {
    fn new() -> Self {
        let mut root = BNode::implicit_dir();
        root.implicit = true;
        Tree {
            nodes: vec![root],
            bytes: 0,
        }
    }

    /// Walks to the directory holding the last component, creating implicit directories.
    /// A non-directory or whiteout on the way is replaced, as `tar -x` (containerd) would.
    fn parent_dir(&mut self, comps: &[&[u8]]) -> usize {
        let mut dir = 0usize;
        for comp in comps {
            let existing = self.nodes[dir].children.get(*comp).copied();
            dir = match existing {
                Some(Child::Node(id)) if self.nodes[id].kind == Kind::Dir => id,
                other => {
                    let mut node = BNode::implicit_dir();
                    if other == Some(Child::Whiteout) {
                        // The whiteout deleted what was below: the new directory starts empty.
                        node.opaque = true;
                        node.implicit = false;
                    }
                    let id = self.push(node);
                    self.nodes[dir]
                        .children
                        .insert(comp.to_vec(), Child::Node(id));
                    id
                }
            };
        }
        dir
    }

    fn push(&mut self, node: BNode) -> usize {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    fn resolve(&self, comps: &[&[u8]]) -> Option<usize> {
        let mut node = 0usize;
        for comp in comps {
            if self.nodes[node].kind != Kind::Dir {
                return None;
            }
            match self.nodes[node].children.get(*comp)? {
                Child::Node(id) => node = *id,
                Child::Whiteout => return None,
            }
        }
        Some(node)
    }

    fn apply(&mut self, e: TarEntry) -> Result<(), BuildError> {
        if e.path.len() > MAX_PATH {
            return Err(BuildError::BadEntry {
                path: lossy(&e.path[..256]),
                why: format!("path of {} bytes is too long", e.path.len()),
            });
        }
        let size: usize = e.path.len()
            + e.link.len()
            + e.xattrs
                .iter()
                .map(|(n, v)| n.len() + v.len())
                .sum::<usize>();
        self.bytes += size as u64;
        if self.bytes > MAX_INDEX_BYTES {
            return Err(BuildError::TooLarge(format!(
                "names, link targets and xattrs pass {MAX_INDEX_BYTES} bytes"
            )));
        }
        if self.nodes.len() >= MAX_NODES {
            return Err(BuildError::TooLarge(format!(
                "more than {MAX_NODES} entries"
            )));
        }
        let path = e.path.clone();
        let comps = normalize(&path);
        let bad = |why: &str| BuildError::BadEntry {
            path: lossy(&path),
            why: why.to_string(),
        };
        let uid = u32::try_from(e.uid).map_err(|_| bad("uid does not fit in 32 bits"))?;
        let gid = u32::try_from(e.gid).map_err(|_| bad("gid does not fit in 32 bits"))?;
        let Some((name, parents)) = comps.split_last() else {
            // The root itself ("./"): only a directory entry can describe it.
            if e.kind == EntryType::Dir {
                let root = &mut self.nodes[0];
                root.perm = e.mode as u16;
                root.uid = uid;
                root.gid = gid;
                root.mtime = (e.mtime.sec, e.mtime.nsec);
                root.atime = e.atime.map(|t| (t.sec, t.nsec));
                root.ctime = e.ctime.map(|t| (t.sec, t.nsec));
                root.xattrs = e.xattrs;
                root.implicit = false;
            }
            return Ok(());
        };

        if name.starts_with(WHITEOUT_PREFIX) {
            let dir = self.parent_dir(parents);
            if *name == OPAQUE_MARKER {
                self.nodes[dir].opaque = true;
            } else if name.starts_with(b".wh..wh.") {
                // aufs bookkeeping (.wh..wh.plnk and such): not part of the tree.
            } else {
                let target = &name[WHITEOUT_PREFIX.len()..];
                if target.is_empty() {
                    return Err(bad("whiteout without a name"));
                }
                match self.nodes[dir].children.get(target).copied() {
                    // Entries of this layer win over its whiteouts, which only hide what is
                    // below; a directory kept here must not show the lower one through.
                    Some(Child::Node(id)) => {
                        if self.nodes[id].kind == Kind::Dir {
                            self.nodes[id].opaque = true;
                        }
                    }
                    _ => {
                        self.nodes[dir]
                            .children
                            .insert(target.to_vec(), Child::Whiteout);
                    }
                }
            }
            return Ok(());
        }

        if e.kind == EntryType::HardLink {
            let target_comps = normalize(&e.link);
            let target = self
                .resolve(&target_comps)
                .filter(|&id| id != 0 && self.nodes[id].kind != Kind::Dir)
                .ok_or_else(|| BuildError::HardlinkTarget {
                    path: lossy(&path),
                    target: lossy(&e.link),
                })?;
            let dir = self.parent_dir(parents);
            self.nodes[dir]
                .children
                .insert(name.to_vec(), Child::Node(target));
            return Ok(());
        }

        let dir = self.parent_dir(parents);
        let existing = self.nodes[dir].children.get(*name).copied();
        let attrs = |kind: Kind| BNode {
            kind,
            // A symlink's mode means nothing on Linux: lstat says 0777 whatever the tar says
            // (as after `tar -x` or umoci unpack).
            perm: if kind == Kind::Symlink {
                0o777
            } else {
                (e.mode & 0o7777) as u16
            },
            uid,
            gid,
            size: match kind {
                Kind::File => e.size,
                Kind::Symlink => e.link.len() as u64,
                _ => 0,
            },
            mtime: (e.mtime.sec, e.mtime.nsec),
            atime: e.atime.map(|t| (t.sec, t.nsec)),
            ctime: e.ctime.map(|t| (t.sec, t.nsec)),
            rdev: if matches!(kind, Kind::CharDev | Kind::BlockDev) {
                (e.devmajor, e.devminor)
            } else {
                (0, 0)
            },
            data_offset: if kind == Kind::File { e.data_offset } else { 0 },
            link: if kind == Kind::Symlink {
                e.link.clone()
            } else {
                Vec::new()
            },
            xattrs: e.xattrs.clone(),
            sparse: e.sparse.clone().unwrap_or_default(),
            opaque: false,
            implicit: false,
            children: BTreeMap::new(),
        };
        let kind = match e.kind {
            EntryType::Regular => Kind::File,
            EntryType::Symlink => Kind::Symlink,
            EntryType::CharDev => Kind::CharDev,
            EntryType::BlockDev => Kind::BlockDev,
            EntryType::Dir => Kind::Dir,
            EntryType::Fifo => Kind::Fifo,
            EntryType::HardLink => unreachable!("handled above"),
        };
        if kind == Kind::Dir {
            if let Some(Child::Node(id)) = existing {
                if self.nodes[id].kind == Kind::Dir {
                    // A directory listed again (or after its children): new attributes, same
                    // contents.
                    let mut updated = attrs(Kind::Dir);
                    updated.children = std::mem::take(&mut self.nodes[id].children);
                    updated.opaque = self.nodes[id].opaque;
                    self.nodes[id] = updated;
                    return Ok(());
                }
            }
        }
        let mut node = attrs(kind);
        if kind == Kind::Dir && existing == Some(Child::Whiteout) {
            node.opaque = true;
        }
        let id = self.push(node);
        self.nodes[dir]
            .children
            .insert(name.to_vec(), Child::Node(id));
        Ok(())
    }

    /// Lays the tree out breadth-first into the compact, serialisable form.
    fn finish(self, stats: LayerStats) -> LayerIndex {
        let mut out = LayerIndex {
            version: FORMAT_VERSION,
            stats,
            nodes: Vec::new(),
            dirents: Vec::new(),
            xattrs: Vec::new(),
            sparse: Vec::new(),
            bytes: Vec::new(),
            hardlinks: Vec::new(),
        };
        let mut new_id: Vec<u32> = vec![u32::MAX; self.nodes.len()];
        let mut order: Vec<usize> = vec![0];
        new_id[0] = 0;
        let mut links: Vec<(u32, u32)> = Vec::new();
        let mut parents: Vec<(u32, u32)> = vec![(super::NO_PARENT, u32::MAX)];
        let mut i = 0;
        // First assign ids and dirents in BFS order.
        let mut dirent_ranges: Vec<Range> = Vec::new();
        while i < order.len() {
            let old = order[i];
            let start = out.dirents.len() as u32;
            for (name, child) in &self.nodes[old].children {
                let name_span = push_bytes(&mut out.bytes, name);
                let target = match *child {
                    Child::Whiteout => WHITEOUT,
                    Child::Node(c) => {
                        if new_id[c] == u32::MAX {
                            new_id[c] = order.len() as u32;
                            order.push(c);
                            parents.push((i as u32, out.dirents.len() as u32));
                        }
                        links.push((new_id[c], out.dirents.len() as u32));
                        new_id[c]
                    }
                };
                out.dirents.push(Dirent {
                    name: name_span,
                    target,
                });
            }
            dirent_ranges.push(Range {
                start,
                len: out.dirents.len() as u32 - start,
            });
            i += 1;
        }
        let mut nlink = vec![0u32; order.len()];
        for &(node, _) in &links {
            nlink[node as usize] += 1;
        }
        for (new, &old) in order.iter().enumerate() {
            let b = &self.nodes[old];
            let link = push_bytes(&mut out.bytes, &b.link);
            let xstart = out.xattrs.len() as u32;
            for (name, value) in &b.xattrs {
                let name = push_bytes(&mut out.bytes, name);
                let value = push_bytes(&mut out.bytes, value);
                out.xattrs.push(Xattr { name, value });
            }
            let sstart = out.sparse.len() as u32;
            out.sparse.extend_from_slice(&b.sparse);
            let mut flags = 0;
            if b.opaque {
                flags |= FLAG_OPAQUE;
            }
            if b.implicit {
                flags |= FLAG_IMPLICIT;
            }
            let (parent, parent_dirent) = if b.kind == Kind::Dir {
                parents[new]
            } else {
                (NO_PARENT, u32::MAX)
            };
            out.nodes.push(Node {
                kind: b.kind,
                perm: b.perm,
                flags,
                uid: b.uid,
                gid: b.gid,
                size: b.size,
                mtime: b.mtime,
                atime: b.atime,
                ctime: b.ctime,
                rdev: b.rdev,
                data_offset: b.data_offset,
                link,
                xattrs: Range {
                    start: xstart,
                    len: out.xattrs.len() as u32 - xstart,
                },
                sparse: Range {
                    start: sstart,
                    len: out.sparse.len() as u32 - sstart,
                },
                children: dirent_ranges[new],
                parent,
                parent_dirent,
                nlink: if new == 0 { 1 } else { nlink[new] },
            });
        }
        links.retain(|&(node, _)| nlink[node as usize] > 1);
        links.sort_unstable();
        out.hardlinks = links;
        out
    }
}

fn push_bytes(bytes: &mut Vec<u8>, data: &[u8]) -> Span {
    let start = bytes.len() as u32;
    bytes.extend_from_slice(data);
    Span {
        start,
        len: data.len() as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(path: &str, kind: ::tar::EntryType, size: u64) -> ::tar::Header {
        let mut h = ::tar::Header::new_gnu();
        // Raw name bytes: the tar crate refuses to write `..`, hostile layers do not.
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_mtime(1_000_000);
        h.set_cksum();
        h
    }

    fn tar_of(entries: &[(&str, ::tar::EntryType, &[u8], &str)]) -> Vec<u8> {
        let mut b = ::tar::Builder::new(Vec::new());
        for (path, kind, data, link) in entries {
            let mut h = header(path, *kind, data.len() as u64);
            if !link.is_empty() {
                h.set_link_name(link).unwrap();
                h.set_cksum();
            }
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn indexes_files_links_whiteouts_and_offsets() {
        use ::tar::EntryType as T;
        let data = tar_of(&[
            ("etc/", T::Directory, b"", ""),
            ("etc/passwd", T::Regular, b"root:x:0:0", ""),
            ("etc/pw2", T::Link, b"", "etc/passwd"),
            ("bin/sh", T::Symlink, b"", "/bin/bash"),
            ("usr/.wh.lib", T::Regular, b"", ""),
            ("var/.wh..wh..opq", T::Regular, b"", ""),
            ("../../escape", T::Regular, b"x", ""),
        ]);
        let built = build_index(&data[..]).unwrap();
        let idx = built.index;
        assert_eq!(idx.stats.uncompressed_size, data.len() as u64);
        let passwd = idx.resolve("etc/passwd").unwrap();
        let node = &idx.nodes[passwd as usize];
        assert_eq!(node.nlink, 2);
        assert_eq!(idx.resolve("etc/pw2"), Some(passwd));
        let off = node.data_offset as usize;
        assert_eq!(&data[off..off + 10], b"root:x:0:0");
        let sh = idx.resolve("bin/sh").unwrap();
        assert_eq!(idx.bytes_of(idx.nodes[sh as usize].link), b"/bin/bash");
        // Written with mode 0644; a symlink reads 0777 on Linux (tests/bad_input.rs vs umoci).
        assert_eq!(idx.nodes[sh as usize].perm, 0o777);
        let usr = idx.resolve("usr").unwrap();
        assert_eq!(idx.lookup(usr, b"lib").unwrap().target, WHITEOUT);
        let var = idx.resolve("var").unwrap();
        assert_ne!(idx.nodes[var as usize].flags & FLAG_OPAQUE, 0);
        assert!(idx.resolve("escape").is_some());
        assert_ne!(idx.nodes[usr as usize].flags & FLAG_IMPLICIT, 0);
        assert_eq!(
            idx.nodes[idx.resolve("etc").unwrap() as usize].flags & FLAG_IMPLICIT,
            0
        );
        let round = LayerIndex::from_bytes(&idx.to_bytes(), std::path::Path::new("x")).unwrap();
        assert_eq!(round, idx);
    }

    #[test]
    fn last_duplicate_wins_and_dir_replaced_by_file() {
        use ::tar::EntryType as T;
        let data = tar_of(&[
            ("a", T::Regular, b"one", ""),
            ("a", T::Regular, b"two", ""),
            ("d/x", T::Regular, b"x", ""),
            ("d", T::Regular, b"file now", ""),
        ]);
        let idx = build_index(&data[..]).unwrap().index;
        let a = &idx.nodes[idx.resolve("a").unwrap() as usize];
        assert_eq!(&data[a.data_offset as usize..][..3], b"two");
        let d = &idx.nodes[idx.resolve("d").unwrap() as usize];
        assert_eq!(d.kind, Kind::File);
        assert!(idx.resolve("d/x").is_none());
    }

    #[test]
    fn hardlink_to_missing_target_is_an_error() {
        use ::tar::EntryType as T;
        let data = tar_of(&[("a", T::Link, b"", "nowhere")]);
        let err = build_index(&data[..]).err().unwrap().to_string();
        assert!(err.contains("nowhere"), "{err}");
    }

    #[test]
    fn truncated_tar_is_an_error() {
        use ::tar::EntryType as T;
        let data = tar_of(&[("a", T::Regular, &[7u8; 2000], "")]);
        assert!(build_index(&data[..1500]).is_err());
    }
}
