//! Changes to a merged view with a writable upper directory: copy-up and the namespace
//! operations. Every change holds `Merged::write_lock`, so the upper directory only ever goes
//! from one consistent state to the next as seen by this view; data writes to already open
//! upper files do not take it.
//!
//! The upper is touched through `O_PATH` fds of its directories and single-name `*at()` calls
//! that never follow a symlink (see [`crate::host`]): a symlink planted in the upper cannot lead
//! a copy-up, chown or write outside it. New entries are made under a hidden temp name
//! (`.wh..lazysnap-tmp.*`), given their owner, mode and xattrs, and renamed into place, so a
//! crash never leaves a half-made or half-copied file visible.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use tracing::{debug, debug_span};

use super::{upper_ino, Child, Errno, Ino, Inode, Merged, UpperNode, INO_XATTR};
use crate::host;
use crate::layer::{NodeAttr, NodeKind, Timestamp, Xattrs};
use crate::owners::Caller;
use crate::ownership::{self, Override};
use crate::upper;

#[cfg(test)]
mod tests;

/// Chunk size of copy-up reads; all-zero chunks are skipped to keep holes.
const COPY_CHUNK: usize = 1 << 20;

/// What to create.
#[derive(Debug, Clone)]
pub enum NewNode {
    File {
        perm: u32,
    },
    Dir {
        perm: u32,
    },
    Symlink {
        target: Vec<u8>,
    },
    /// Char/block device, fifo or socket; `rdev` as `makedev` gives it.
    Special {
        kind: NodeKind,
        perm: u32,
        rdev: u64,
    },
}

impl NewNode {
    pub fn kind(&self) -> NodeKind {
        match self {
            NewNode::File { .. } => NodeKind::File,
            NewNode::Dir { .. } => NodeKind::Dir,
            NewNode::Symlink { .. } => NodeKind::Symlink,
            NewNode::Special { kind, .. } => *kind,
        }
    }
}

/// A time to set: a given one or now.
#[derive(Debug, Clone, Copy)]
pub enum SetTime {
    At(Timestamp),
    Now,
}

/// The changes of a setattr.
#[derive(Debug, Default)]
pub struct SetAttr {
    pub perm: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

fn raw(e: i32) -> Errno {
    Errno::Raw(e)
}

fn timespec(t: Timestamp) -> libc::timespec {
    libc::timespec {
        tv_sec: t.sec as libc::time_t,
        tv_nsec: i64::from(t.nsec.min(999_999_999)) as _,
    }
}

fn set_time(t: Option<SetTime>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(SetTime::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(SetTime::At(t)) => timespec(t),
    }
}

fn check_name(name: &[u8]) -> Result<(), Errno> {
    host::component(name)?;
    if upper::is_reserved(name) {
        // OCI layers cannot carry such a name: it would read as a whiteout.
        return Err(Errno::Invalid);
    }
    Ok(())
}

impl Merged {
    fn lock_writes(&self) -> Result<std::sync::MutexGuard<'_, ()>, Errno> {
        if self.upper.is_none() {
            return Err(raw(libc::EROFS));
        }
        Ok(self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner))
    }

    fn xattr_owner(&self) -> bool {
        self.upper.as_ref().is_some_and(|u| u.xattr_owner)
    }

    fn tmp_name(&self) -> Vec<u8> {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        format!(".wh..lazysnap-tmp.{}.{n}", std::process::id()).into_bytes()
    }

    fn inode_of(&self, ino: Ino) -> Result<Arc<Inode>, Errno> {
        self.inode(ino).ok_or(Errno::NoEntry)
    }

    fn dir_inode(&self, ino: Ino) -> Result<Arc<Inode>, Errno> {
        let i = self.inode_of(ino)?;
        if i.kind != NodeKind::Dir {
            return Err(Errno::NotDir);
        }
        Ok(i)
    }

    /// Records that `inode` is now the upper entry behind `fd`.
    fn register(&self, inode: &Inode, fd: &Arc<OwnedFd>) -> Result<(), Errno> {
        let id = host::host_id(&host::stat_fd(fd.as_fd())?);
        self.table
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .by_upper
            .insert(id, inode.ino);
        inode.state().upper = Some(UpperNode::new(id));
        self.fds.put(inode.ino, id, fd.clone());
        Ok(())
    }

    /// Owner, xattrs, mode and times of a copied-up entry (in that order: chown clears setuid
    /// bits and file capabilities).
    fn apply_meta(&self, fd: BorrowedFd<'_>, a: &NodeAttr, xattrs: &Xattrs) -> Result<(), Errno> {
        let record = self.xattr_owner();
        if !record {
            host::chown_fd(fd, Some(a.uid), Some(a.gid))?;
        }
        for (name, value) in xattrs {
            if crate::ownership::is_private(name) {
                continue;
            }
            if let Err(e) = host::set_xattr(fd, name, value, 0) {
                // trusted.* without root, user.* on a symlink: nothing this host can store.
                debug!(name = %String::from_utf8_lossy(name), error = %e, "xattr not copied up");
            }
        }
        self.apply_owner_mode(fd, a.kind, a.uid, a.gid, a.perm, a.rdev, record)?;
        host::utimens_fd(fd, &[timespec(a.atime), timespec(a.mtime)])?;
        Ok(())
    }

    /// Sets the mode (and, when recording, the owner) of a new or copied-up entry whose real
    /// owner is already right.
    #[allow(clippy::too_many_arguments)]
    fn apply_owner_mode(
        &self,
        fd: BorrowedFd<'_>,
        kind: NodeKind,
        uid: u32,
        gid: u32,
        perm: u32,
        rdev: u64,
        record: bool,
    ) -> Result<(), Errno> {
        if kind == NodeKind::Symlink {
            return Ok(());
        }
        if record {
            let o = Override {
                uid,
                gid,
                mode: upper::mode_bits(kind) | (perm & 0o7777),
                rdev,
            };
            if let Err(e) = ownership::write_override_fd(fd, &o) {
                // Only the upper root of an old store can be a real fifo here.
                debug!(error = %e, "ownership not recorded");
            }
            // The host file stays usable by this (maybe unprivileged) process.
            let keep = if kind == NodeKind::Dir { 0o700 } else { 0o600 };
            host::chmod_fd(fd, (perm & 0o777) | keep)?;
        } else {
            host::chmod_fd(fd, perm)?;
        }
        Ok(())
    }

    /// Copies `ino` up if it is only in the layers, with its parents; returns the `O_PATH` fd
    /// of its upper entry. The inode number stays.
    pub fn copy_up(&self, ino: Ino) -> Result<Arc<OwnedFd>, Errno> {
        let _g = self.lock_writes()?;
        let inode = self.inode_of(ino)?;
        self.copy_up_locked(&inode)
    }

    pub(crate) fn copy_up_locked(&self, inode: &Arc<Inode>) -> Result<Arc<OwnedFd>, Errno> {
        if let Some(fd) = self.upper_fd(inode)? {
            return Ok(fd);
        }
        let _s = debug_span!("copy_up", ino = inode.ino).entered();
        if inode.kind == NodeKind::Dir {
            let (parent, name) = {
                let st = inode.state();
                (st.parent, st.name.clone())
            };
            if parent == inode.ino {
                return Err(raw(libc::ESTALE));
            }
            let pinode = self.inode_of(parent)?;
            let pfd = self.copy_up_locked(&pinode)?;
            let ptimes = self.attr_ext(&pinode)?.0;
            let attr = self.attr_of(inode);
            let xattrs = self.xattrs(inode.ino)?;
            let tmp = self.tmp_name();
            host::mkdir_at(pfd.as_fd(), &tmp, 0o700)?;
            let fd = Arc::new(host::open_dir_path(pfd.as_fd(), &tmp)?);
            let placed = self.apply_meta(fd.as_fd(), &attr, &xattrs).and_then(|()| {
                record_ino(fd.as_fd(), inode.ino);
                host::rename_at(
                    pfd.as_fd(),
                    &tmp,
                    pfd.as_fd(),
                    &name,
                    libc::RENAME_NOREPLACE,
                )
                .map_err(Errno::from)
            });
            if let Err(e) = placed {
                let _ = host::unlink_at(pfd.as_fd(), &tmp, true);
                return Err(e);
            }
            self.register(inode, &fd)?;
            restore_times(pfd.as_fd(), &ptimes);
            return Ok(fd);
        }

        // A lower hardlink group is copied once and linked at each of its visible names, so
        // that it stays one group in the upper.
        let mut places = if self.attr_of(inode).nlink > 1 {
            self.visible_link_places(inode)
        } else {
            Vec::new()
        };
        if places.is_empty() {
            let st = inode.state();
            places.push((st.parent, st.name.clone()));
        }
        let (p0, n0) = places[0].clone();
        let pinode = self.dir_inode(p0)?;
        let pfd = self.copy_up_locked(&pinode)?;
        let ptimes = self.attr_ext(&pinode)?.0;
        let attr = self.attr_of(inode);
        let xattrs = self.xattrs(inode.ino)?;
        let tmp = self.tmp_name();
        let made = self
            .make_copy(pfd.as_fd(), &tmp, inode, &attr)
            .and_then(|fd| {
                self.apply_meta(fd.as_fd(), &attr, &xattrs)?;
                record_ino(fd.as_fd(), inode.ino);
                host::rename_at(pfd.as_fd(), &tmp, pfd.as_fd(), &n0, libc::RENAME_NOREPLACE)?;
                Ok(fd)
            });
        let fd = match made {
            Ok(fd) => Arc::new(fd),
            Err(e) => {
                let _ = host::unlink_at(pfd.as_fd(), &tmp, false);
                return Err(e);
            }
        };
        self.register(inode, &fd)?;
        restore_times(pfd.as_fd(), &ptimes);
        for (p, n) in places.iter().skip(1) {
            let other = self.dir_inode(*p)?;
            let ofd = self.copy_up_locked(&other)?;
            let otimes = self.attr_ext(&other)?.0;
            host::link_at(pfd.as_fd(), &n0, ofd.as_fd(), n)?;
            restore_times(ofd.as_fd(), &otimes);
        }
        {
            let mut st = inode.state();
            st.parent = p0;
            st.name = n0;
        }
        inode.clear_nlink();
        Ok(fd)
    }

    /// Makes the copy of non-directory `inode` at `tmp` in `dir`; returns its `O_PATH` fd.
    fn make_copy(
        &self,
        dir: BorrowedFd<'_>,
        tmp: &[u8],
        inode: &Inode,
        attr: &NodeAttr,
    ) -> Result<OwnedFd, Errno> {
        match attr.kind {
            NodeKind::File => {
                let (layer, node, size) = self.file_source(inode.ino)?;
                let f = host::open_at(
                    dir,
                    tmp,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                    0o600,
                )?;
                let mut buf = vec![0u8; COPY_CHUNK.min(size as usize).max(1)];
                let mut off = 0u64;
                while off < size {
                    let want = buf.len().min((size - off) as usize);
                    let mut got = 0;
                    while got < want {
                        match layer.read_at(node, off + got as u64, &mut buf[got..want]) {
                            Ok(0) => break,
                            Ok(n) => got += n,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                    if got == 0 {
                        break;
                    }
                    host::pwrite_non_zero(f.as_fd(), &buf[..got], off)?;
                    off += got as u64;
                }
                host::ftruncate(f.as_fd(), size)?;
                host::fsync(f.as_fd(), true)?;
            }
            NodeKind::Symlink => {
                let target = self.readlink(inode.ino)?;
                host::symlink_at(&target, dir, tmp)?;
            }
            kind => self.make_special(dir, tmp, kind, attr.rdev)?,
        }
        Ok(host::open_path(dir, tmp)?)
    }

    /// A device, fifo or socket at `name`. When ownership is recorded in xattrs, an empty
    /// regular file whose override carries the type (devices need root, and fifos and sockets
    /// cannot carry `user.*` xattrs); the kernel handles fifos and sockets by type alone.
    fn make_special(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        kind: NodeKind,
        rdev: u64,
    ) -> Result<(), Errno> {
        let device = matches!(kind, NodeKind::CharDev | NodeKind::BlockDev);
        if self.xattr_owner() {
            host::open_at(
                dir,
                name,
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                0o600,
            )?;
        } else {
            let rdev = if device { rdev } else { 0 };
            host::mknod_at(dir, name, upper::mode_bits(kind) | 0o600, rdev)?;
        }
        Ok(())
    }

    /// Creates `name` in `parent`; the kernel's reference is counted. Returns the new inode.
    pub fn create(
        &self,
        caller: Caller,
        parent: Ino,
        name: &[u8],
        node: NewNode,
    ) -> Result<Ino, Errno> {
        check_name(name)?;
        let _g = self.lock_writes()?;
        let pinode = self.dir_inode(parent)?;
        if self.child(parent, name).is_some() {
            return Err(raw(libc::EEXIST));
        }
        let pfd = self.copy_up_locked(&pinode)?;
        let pattr = self.attr_ext(&pinode)?.0;
        let kind = node.kind();
        // A directory over a lower name (whited out or not) must not show that name's content.
        let opaque = kind == NodeKind::Dir && self.lower_has(&pinode, name);
        let setgid_dir = pattr.perm & libc::S_ISGID != 0;
        let gid = if setgid_dir { pattr.gid } else { caller.gid };
        let tmp = self.tmp_name();
        let (perm, rdev) = match &node {
            NewNode::File { perm } => {
                host::open_at(
                    pfd.as_fd(),
                    &tmp,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                    0o600,
                )?;
                (*perm, 0)
            }
            NewNode::Dir { perm } => {
                host::mkdir_at(pfd.as_fd(), &tmp, 0o700)?;
                let perm = if setgid_dir {
                    perm | libc::S_ISGID
                } else {
                    *perm
                };
                (perm, 0)
            }
            NewNode::Symlink { target } => {
                host::symlink_at(target, pfd.as_fd(), &tmp)?;
                (0o777, 0)
            }
            NewNode::Special { kind, perm, rdev } => {
                self.make_special(pfd.as_fd(), &tmp, *kind, *rdev)?;
                (*perm, *rdev)
            }
        };
        let finish = || -> Result<Arc<OwnedFd>, Errno> {
            let fd = Arc::new(host::open_path(pfd.as_fd(), &tmp)?);
            if opaque {
                upper::make_opaque(fd.as_fd())?;
            }
            let record = self.xattr_owner();
            if !record {
                let st = host::stat_fd(fd.as_fd())?;
                if st.st_uid != caller.uid || st.st_gid != gid {
                    host::chown_fd(fd.as_fd(), Some(caller.uid), Some(gid))?;
                }
            }
            self.apply_owner_mode(fd.as_fd(), kind, caller.uid, gid, perm, rdev, record)?;
            host::rename_at(pfd.as_fd(), &tmp, pfd.as_fd(), name, libc::RENAME_NOREPLACE)?;
            Ok(fd)
        };
        let fd = match finish() {
            Ok(fd) => fd,
            Err(e) => {
                if kind == NodeKind::Dir {
                    if let Ok(d) = host::open_dir_path(pfd.as_fd(), &tmp) {
                        let _ = upper::clear_markers(d.as_fd());
                    }
                }
                let _ = host::unlink_at(pfd.as_fd(), &tmp, kind == NodeKind::Dir);
                return Err(e);
            }
        };
        upper::drop_whiteout(pfd.as_fd(), name)?;
        let id = host::host_id(&host::stat_fd(fd.as_fd())?);
        let ino = {
            let mut t = self.table.write().unwrap_or_else(PoisonError::into_inner);
            let ino = t.push_upper(upper_ino(None, id.1), |ino| {
                Inode::new(
                    ino,
                    parent,
                    name,
                    kind,
                    Vec::new(),
                    0,
                    Some(UpperNode::new(id)),
                )
            });
            t.by_upper.insert(id, ino);
            ino
        };
        // Its host inode number names another inode (a deleted entry's, reused by the host):
        // a successor daemon reads the number it got instead.
        if Some(ino) != upper_ino(None, id.1) {
            record_ino(fd.as_fd(), ino);
        }
        self.fds.put(ino, id, fd);
        if opaque {
            if let Some(i) = self.inode(ino) {
                i.state().lower_gone = true;
            }
        }
        self.patch_dir(parent, |d| {
            d.insert(Child {
                name: name.into(),
                ino,
                kind,
            })
        });
        Ok(ino)
    }

    /// After the upper name `name` of `parent` that led to `inode` (through `fd`) was removed:
    /// forgets the upper entry when its last host link is gone (its host inode number may be
    /// reused by a new file). A file the kernel still refers to (open, or known by another
    /// name) keeps its fd pinned, since no recorded name leads to it any more.
    fn drop_if_unlinked(&self, inode: &Inode, fd: Option<&Arc<OwnedFd>>, parent: Ino, name: &[u8]) {
        let gone = match fd {
            Some(fd) => host::stat_fd(fd.as_fd()).map_or(true, |st| st.st_nlink == 0),
            None => true,
        };
        if let (Some(fd), false) = (fd, inode.kind == NodeKind::Dir) {
            let mut st = inode.state();
            let was_its_name = st.parent == parent && *st.name == *name;
            if gone || was_its_name {
                if let Some(u) = st.upper.as_mut() {
                    u.pinned = Some(fd.clone());
                }
            }
        }
        if !gone {
            return;
        }
        let id = {
            let mut st = inode.state();
            let id = st.upper.as_ref().map(|u| u.id);
            if inode.kind == NodeKind::Dir {
                st.upper = None;
                st.lower_gone = true;
            }
            id
        };
        if let Some(id) = id {
            let mut t = self.table.write().unwrap_or_else(PoisonError::into_inner);
            if t.by_upper.get(&id) == Some(&inode.ino) {
                t.by_upper.remove(&id);
            }
        }
    }

    /// Removes non-directory `name` from `parent`.
    pub fn unlink(&self, parent: Ino, name: &[u8]) -> Result<(), Errno> {
        self.remove(parent, name, false)
    }

    /// Removes the empty directory `name` from `parent`.
    pub fn rmdir(&self, parent: Ino, name: &[u8]) -> Result<(), Errno> {
        self.remove(parent, name, true)
    }

    fn remove(&self, parent: Ino, name: &[u8], dir: bool) -> Result<(), Errno> {
        let _g = self.lock_writes()?;
        let pinode = self.dir_inode(parent)?;
        let ino = self.child(parent, name).ok_or(Errno::NoEntry)?;
        let inode = self.inode_of(ino)?;
        match (dir, inode.kind == NodeKind::Dir) {
            (false, true) => return Err(Errno::IsDir),
            (true, false) => return Err(Errno::NotDir),
            _ => {}
        }
        if dir && !self.merge_dir(&inode).children().is_empty() {
            return Err(raw(libc::ENOTEMPTY));
        }
        let lower = self.lower_has(&pinode, name);
        let pfd = self.copy_up_locked(&pinode)?;
        let fd = self.upper_fd(&inode)?;
        if let Some(fd) = &fd {
            if dir {
                upper::clear_markers(fd.as_fd())?;
            }
            host::unlink_at(pfd.as_fd(), name, dir)?;
            self.drop_if_unlinked(&inode, Some(fd), parent, name);
        } else if dir {
            let mut st = inode.state();
            st.lower_gone = true;
        }
        if lower {
            upper::make_whiteout(pfd.as_fd(), name)?;
        }
        if dir {
            self.invalidate_dir(ino);
        }
        inode.clear_nlink();
        self.patch_dir(parent, |d| {
            d.remove(name);
        });
        Ok(())
    }

    /// Copies directory `inode` up with everything under it that still comes from the layers,
    /// so that it can move: afterwards no lower source contributes to it.
    fn copy_up_tree(&self, inode: &Arc<Inode>) -> Result<(), Errno> {
        self.copy_up_locked(inode)?;
        if inode.state().lower_gone || inode.merged_sources().is_empty() {
            return Ok(());
        }
        let dir = self.merge_dir(inode);
        for c in dir.children() {
            let child = self.inode_of(c.ino)?;
            if child.kind == NodeKind::Dir {
                self.copy_up_tree(&child)?;
            } else {
                self.copy_up_locked(&child)?;
            }
        }
        inode.state().lower_gone = true;
        Ok(())
    }

    /// Renames `name` in `parent` to `newname` in `newparent`. `flags`: `RENAME_NOREPLACE` or
    /// nothing (`RENAME_EXCHANGE` and the rest are `EINVAL`).
    pub fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        newparent: Ino,
        newname: &[u8],
        flags: u32,
    ) -> Result<(), Errno> {
        if flags & !libc::RENAME_NOREPLACE != 0 {
            return Err(Errno::Invalid);
        }
        check_name(newname)?;
        let _g = self.lock_writes()?;
        let pinode = self.dir_inode(parent)?;
        let qinode = self.dir_inode(newparent)?;
        let sino = self.child(parent, name).ok_or(Errno::NoEntry)?;
        let sinode = self.inode_of(sino)?;
        let dst = self.child(newparent, newname);
        if dst == Some(sino) {
            // Two names of one file (or the same name): nothing to do, as rename(2) says.
            return Ok(());
        }
        let dinode = match dst {
            Some(d) => {
                if flags & libc::RENAME_NOREPLACE != 0 {
                    return Err(raw(libc::EEXIST));
                }
                let d = self.inode_of(d)?;
                match (sinode.kind == NodeKind::Dir, d.kind == NodeKind::Dir) {
                    (true, false) => return Err(Errno::NotDir),
                    (false, true) => return Err(Errno::IsDir),
                    (true, true) if !self.merge_dir(&d).children().is_empty() => {
                        return Err(raw(libc::ENOTEMPTY))
                    }
                    _ => {}
                }
                Some(d)
            }
            None => None,
        };
        let sfd = if sinode.kind == NodeKind::Dir {
            self.copy_up_tree(&sinode)?;
            self.copy_up_locked(&sinode)?
        } else {
            self.copy_up_locked(&sinode)?
        };
        let pfd = self.copy_up_locked(&pinode)?;
        let qfd = self.copy_up_locked(&qinode)?;
        let src_lower = self.lower_has(&pinode, name);
        let dst_lower = self.lower_has(&qinode, newname);
        if sinode.kind == NodeKind::Dir && (dst_lower || sinode.state().lower_gone) {
            upper::make_opaque(sfd.as_fd())?;
            sinode.state().lower_gone = true;
        }
        let dfd = match &dinode {
            Some(d) => self.upper_fd(d)?,
            None => None,
        };
        if let (Some(d), Some(fd)) = (&dinode, &dfd) {
            if d.kind == NodeKind::Dir {
                upper::clear_markers(fd.as_fd())?;
            }
        }
        host::rename_at(pfd.as_fd(), name, qfd.as_fd(), newname, 0)?;
        upper::drop_whiteout(qfd.as_fd(), newname)?;
        if src_lower {
            upper::make_whiteout(pfd.as_fd(), name)?;
        }
        if let Some(d) = &dinode {
            if dfd.is_some() {
                self.drop_if_unlinked(d, dfd.as_ref(), newparent, newname);
            } else if d.kind == NodeKind::Dir {
                d.state().lower_gone = true;
            }
            d.clear_nlink();
            if d.kind == NodeKind::Dir {
                self.invalidate_dir(d.ino);
            }
        }
        {
            let mut st = sinode.state();
            st.parent = newparent;
            st.name = newname.into();
        }
        sinode.clear_nlink();
        let kind = sinode.kind;
        self.patch_dir(parent, |d| {
            d.remove(name);
        });
        self.patch_dir(newparent, |d| {
            d.insert(Child {
                name: newname.into(),
                ino: sino,
                kind,
            })
        });
        Ok(())
    }

    /// Makes `newname` in `newparent` another name of `ino`.
    pub fn link(&self, ino: Ino, newparent: Ino, newname: &[u8]) -> Result<(), Errno> {
        check_name(newname)?;
        let _g = self.lock_writes()?;
        let inode = self.inode_of(ino)?;
        if inode.kind == NodeKind::Dir {
            return Err(raw(libc::EPERM));
        }
        let qinode = self.dir_inode(newparent)?;
        if self.child(newparent, newname).is_some() {
            return Err(raw(libc::EEXIST));
        }
        let fd = self.copy_up_locked(&inode)?;
        let qfd = self.copy_up_locked(&qinode)?;
        host::link_fd(fd.as_fd(), qfd.as_fd(), newname)?;
        upper::drop_whiteout(qfd.as_fd(), newname)?;
        inode.clear_nlink();
        let kind = inode.kind;
        self.patch_dir(newparent, |d| {
            d.insert(Child {
                name: newname.into(),
                ino,
                kind,
            })
        });
        Ok(())
    }

    /// chmod, chown, truncate, utimens. `file` is an open handle of the file, if the kernel
    /// gave one (truncate through it).
    pub fn setattr(&self, ino: Ino, s: &SetAttr, file: Option<&File>) -> Result<(), Errno> {
        let fd = self.copy_up(ino)?;
        let inode = self.inode_of(ino)?;
        let fd = fd.as_fd();
        if let Some(size) = s.size {
            if inode.kind != NodeKind::File {
                return Err(Errno::Invalid);
            }
            match file {
                Some(f) => host::ftruncate(f.as_fd(), size)?,
                None => {
                    let f = host::reopen(fd, libc::O_WRONLY)?;
                    host::ftruncate(f.as_fd(), size)?;
                }
            }
        }
        if s.uid.is_some() || s.gid.is_some() || s.perm.is_some() {
            let current = ownership::read_override_fd(fd);
            let record = self.xattr_owner() || current.is_some();
            if !self.xattr_owner() && (s.uid.is_some() || s.gid.is_some()) {
                host::chown_fd(fd, s.uid, s.gid)?;
            }
            if record && inode.kind != NodeKind::Symlink {
                let (a, _) = upper::attr(fd)?;
                let uid = s.uid.unwrap_or(a.uid);
                let gid = s.gid.unwrap_or(a.gid);
                let mut perm = s.perm.unwrap_or(a.perm);
                // chown clears setuid/setgid of non-directories, as the kernel would.
                if (s.uid.is_some() || s.gid.is_some())
                    && s.perm.is_none()
                    && inode.kind != NodeKind::Dir
                {
                    perm &= !(libc::S_ISUID | libc::S_ISGID);
                }
                let rdev = current.map_or(a.rdev, |o| o.rdev);
                self.apply_owner_mode(fd, a.kind, uid, gid, perm, rdev, true)?;
            } else if let Some(perm) = s.perm {
                if inode.kind != NodeKind::Symlink {
                    host::chmod_fd(fd, perm)?;
                }
            }
        }
        if s.atime.is_some() || s.mtime.is_some() {
            host::utimens_fd(fd, &[set_time(s.atime), set_time(s.mtime)])?;
        }
        Ok(())
    }

    /// Sets an xattr (copying the file up first). The filesystem's own are refused.
    pub fn set_xattr(&self, ino: Ino, name: &[u8], value: &[u8], flags: i32) -> Result<(), Errno> {
        if crate::ownership::is_private(name) {
            return Err(raw(libc::EPERM));
        }
        let fd = self.copy_up(ino)?;
        host::set_xattr(fd.as_fd(), name, value, flags)?;
        Ok(())
    }

    pub fn remove_xattr(&self, ino: Ino, name: &[u8]) -> Result<(), Errno> {
        if crate::ownership::is_private(name) {
            return Err(raw(libc::ENODATA));
        }
        let fd = self.copy_up(ino)?;
        host::remove_xattr(fd.as_fd(), name)?;
        Ok(())
    }

    /// Opens `ino` for I/O on its upper file, copying it up first when `flags` write.
    pub fn open_upper(&self, ino: Ino, flags: i32) -> Result<File, Errno> {
        let inode = self.inode_of(ino)?;
        let writes = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        let fd = if writes {
            self.copy_up(ino)?
        } else {
            self.upper_fd(&inode)?.ok_or(Errno::Upper)?
        };
        // O_APPEND is left out: the kernel gives the offset of every write itself.
        let keep = libc::O_ACCMODE | libc::O_TRUNC | libc::O_SYNC | libc::O_DSYNC;
        Ok(File::from(host::reopen(fd.as_fd(), flags & keep)?))
    }

    /// The statfs of the upper directory's filesystem.
    pub fn upper_statfs(&self) -> Option<libc::statvfs> {
        let u = self.upper.as_ref()?;
        host::statvfs(u.root.as_fd()).ok()
    }
}

/// Records in a copy the inode number it keeps ([`INO_XATTR`]), before it takes its name. Best
/// effort: a symlink takes no `user.*` xattr, and then only a successor daemon misses it (after
/// the entry moved, `ESTALE`), never this one.
fn record_ino(fd: BorrowedFd<'_>, ino: Ino) {
    if let Err(e) = host::set_xattr(fd, INO_XATTR, &ino.to_le_bytes(), 0) {
        debug!(ino, error = %e, "inode number not recorded in the copy");
    }
}

/// Puts a directory's times back after a copy-up made a temp entry in it and renamed it: the
/// directory did not change for the container.
fn restore_times(dir: BorrowedFd<'_>, a: &NodeAttr) {
    if let Err(e) = host::utimens_fd(dir, &[timespec(a.atime), timespec(a.mtime)]) {
        debug!(error = %e, "directory times not restored after copy-up");
    }
}
