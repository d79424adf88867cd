//! The FUSE glue: [`MergedFs`] answers kernel requests from a [`Merged`] view.
//!
//! Layers are immutable, so everything is cached by the kernel for as long as it likes: long
//! entry/attr TTLs, `FOPEN_KEEP_CACHE` and `FOPEN_CACHE_DIR`. Reads call the layer without any
//! lock of the merged view held, so slow decompression never stalls metadata requests.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr,
    Request,
};
use tracing::{debug, debug_span, warn};

use crate::layer::{LayerStack, NodeAttr, NodeKind, Timestamp};
use crate::merge::{self, Ino, Merged};

/// How long the kernel may cache entries and attributes: the layers never change.
pub const TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Largest read or write request asked of the kernel (it caps this at its `max_pages_limit`).
const MAX_IO: u32 = 1 << 20;

/// The read-only merged filesystem. Mount it with [`crate::mount`], or hand it to
/// `fuser::mount` / `fuser::spawn_mount` to run it in the foreground.
#[derive(Debug)]
pub struct MergedFs {
    merged: Arc<Merged>,
}

impl MergedFs {
    pub fn new(stack: LayerStack) -> MergedFs {
        MergedFs {
            merged: Arc::new(Merged::new(stack)),
        }
    }

    /// The merged view this filesystem serves.
    pub fn merged(&self) -> &Arc<Merged> {
        &self.merged
    }
}

fn errno(e: &merge::Errno) -> Errno {
    Errno::from_i32(e.raw())
}

fn system_time(t: Timestamp) -> SystemTime {
    let nsec = Duration::from_nanos(u64::from(t.nsec.min(999_999_999)));
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::from_secs(t.sec.unsigned_abs()) + nsec
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs()) + nsec
    }
}

fn file_type(kind: NodeKind) -> FileType {
    match kind {
        NodeKind::File => FileType::RegularFile,
        NodeKind::Dir => FileType::Directory,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::CharDev => FileType::CharDevice,
        NodeKind::BlockDev => FileType::BlockDevice,
        NodeKind::Fifo => FileType::NamedPipe,
        NodeKind::Socket => FileType::Socket,
    }
}

/// The kernel's 32-bit device encoding (`new_encode_dev`), which FUSE carries: glibc's 64-bit
/// `makedev` value does not fit as is for large minors.
fn rdev32(rdev: u64) -> u32 {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

pub(crate) fn file_attr(ino: Ino, a: &NodeAttr) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: system_time(a.atime),
        mtime: system_time(a.mtime),
        ctime: system_time(a.ctime),
        crtime: system_time(a.mtime),
        kind: file_type(a.kind),
        perm: (a.perm & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: rdev32(a.rdev),
        blksize: 4096,
        flags: 0,
    }
}

/// Answers a getxattr/listxattr: `size` 0 asks for the length; too small a buffer is ERANGE.
fn reply_sized(reply: ReplyXattr, size: u32, data: &[u8]) {
    let Ok(len) = u32::try_from(data.len()) else {
        return reply.error(Errno::E2BIG);
    };
    if size == 0 {
        reply.size(len);
    } else if len > size {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

/// Permission check for `access(2)` when the kernel does not do it (no `default_permissions`).
fn may_access(a: &NodeAttr, uid: u32, gid: u32, mask: AccessFlags) -> Result<(), Errno> {
    if mask.contains(AccessFlags::W_OK) {
        return Err(Errno::EROFS);
    }
    let want_x = mask.contains(AccessFlags::X_OK);
    if uid == 0 {
        // Root reads anything; executes only what someone may execute (or any directory).
        if want_x && a.kind != NodeKind::Dir && a.perm & 0o111 == 0 {
            return Err(Errno::EACCES);
        }
        return Ok(());
    }
    let bits = if uid == a.uid {
        (a.perm >> 6) & 7
    } else if gid == a.gid {
        (a.perm >> 3) & 7
    } else {
        a.perm & 7
    };
    if (mask.contains(AccessFlags::R_OK) && bits & 4 == 0) || (want_x && bits & 1 == 0) {
        return Err(Errno::EACCES);
    }
    Ok(())
}

impl Filesystem for MergedFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_ASYNC_DIO
            | InitFlags::FUSE_MAX_PAGES;
        let caps = config.capabilities();
        // Ask only for what this kernel has; a missing capability is a speed loss, not an error.
        let _ = config.add_capabilities(wanted & caps);
        if let Err(max) = config.set_max_readahead(u32::MAX) {
            let _ = config.set_max_readahead(max);
        }
        if let Err(max) = config.set_max_write(MAX_IO) {
            let _ = config.set_max_write(max);
        }
        // Room for many readahead requests in flight across the worker threads.
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        debug!(?caps, "FUSE init");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _s = debug_span!("lookup", parent = parent.0, name = ?name).entered();
        match self.merged.lookup(parent.0, name.as_bytes()) {
            Ok((ino, attr)) => reply.entry(&TTL, &file_attr(ino, &attr), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.merged.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _s = debug_span!("getattr", ino = ino.0).entered();
        match self.merged.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &file_attr(ino.0, &a)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _s = debug_span!("readlink", ino = ino.0).entered();
        match self.merged.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => {
                if let merge::Errno::Io(err) = &e {
                    warn!(what = %self.merged.describe(ino.0), %err, "readlink failed");
                }
                reply.error(errno(&e))
            }
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _s = debug_span!("open", ino = ino.0).entered();
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.merged.file_source(ino.0) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _s = debug_span!("read", ino = ino.0, offset, size).entered();
        // `file_source` clones what it needs and releases the table lock before the read.
        let (layer, node, file_size) = match self.merged.file_source(ino.0) {
            Ok(s) => s,
            Err(e) => return reply.error(errno(&e)),
        };
        if offset >= file_size {
            return reply.data(&[]);
        }
        let len = (file_size - offset).min(u64::from(size)) as usize;
        let mut buf = vec![0u8; len];
        let mut done = 0;
        while done < len {
            match layer.read_at(node, offset + done as u64, &mut buf[done..]) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    warn!(
                        what = %self.merged.describe(ino.0),
                        offset = offset + done as u64,
                        %err,
                        "layer read failed"
                    );
                    return reply.error(Errno::EIO);
                }
            }
        }
        reply.data(&buf[..done]);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.merged.inode(ino.0) {
            Some(i) if i.kind == NodeKind::Dir => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    /// Offsets: 1 = after `.`, 2 = after `..`, 2 + i + 1 = after child i (children are sorted,
    /// so an offset keeps its meaning for the whole mount).
    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _s = debug_span!("readdir", ino = ino.0, offset).entered();
        let (Some(inode), Some(dir)) = (self.merged.inode(ino.0), self.merged.dir(ino.0)) else {
            return reply.error(Errno::ENOTDIR);
        };
        let dots = [(ino.0, b".".as_slice()), (inode.parent, b"..".as_slice())];
        let total = 2 + dir.children().len() as u64;
        for idx in offset..total {
            let (ino, kind, name) = match idx {
                0 | 1 => (dots[idx as usize].0, NodeKind::Dir, dots[idx as usize].1),
                _ => {
                    let c = &dir.children()[(idx - 2) as usize];
                    (c.ino, c.kind, &*c.name)
                }
            };
            if reply.add(
                INodeNo(ino),
                idx + 1,
                file_type(kind),
                OsStr::from_bytes(name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _s = debug_span!("readdirplus", ino = ino.0, offset).entered();
        let (Some(inode), Some(dir)) = (self.merged.inode(ino.0), self.merged.dir(ino.0)) else {
            return reply.error(Errno::ENOTDIR);
        };
        let total = 2 + dir.children().len() as u64;
        for idx in offset..total {
            let (ino, name) = match idx {
                0 => (ino.0, b".".as_slice()),
                1 => (inode.parent, b"..".as_slice()),
                _ => {
                    let c = &dir.children()[(idx - 2) as usize];
                    (c.ino, &*c.name)
                }
            };
            let Some(attr) = self.merged.attr(ino) else {
                continue;
            };
            let full = reply.add(
                INodeNo(ino),
                idx + 1,
                OsStr::from_bytes(name),
                &TTL,
                &file_attr(ino, &attr),
                Generation(0),
            );
            if full {
                break;
            }
            // The kernel takes a reference on every entry but `.` and `..`.
            if idx >= 2 {
                self.merged.add_lookup(ino);
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // Read-only and lazily discovered: no free space, inode count as known so far.
        reply.statfs(0, 0, 0, self.merged.inode_count(), 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _s = debug_span!("getxattr", ino = ino.0, name = ?name).entered();
        match self.merged.xattrs(ino.0) {
            Ok(xs) => match xs.iter().find(|(n, _)| n.as_slice() == name.as_bytes()) {
                Some((_, v)) => reply_sized(reply, size, v),
                None => reply.error(Errno::NO_XATTR),
            },
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _s = debug_span!("listxattr", ino = ino.0).entered();
        match self.merged.xattrs(ino.0) {
            Ok(xs) => {
                let mut names = Vec::new();
                for (n, _) in &xs {
                    names.extend_from_slice(n);
                    names.push(0);
                }
                reply_sized(reply, size, &names)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match self.merged.attr(ino.0) {
            Some(a) => match may_access(&a, req.uid(), req.gid(), mask) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            },
            None => reply.error(Errno::ENOENT),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rdev_encoding_matches_kernel() {
        assert_eq!(rdev32(libc::makedev(1, 3)), 0x103);
        assert_eq!(rdev32(libc::makedev(8, 0x12345)), 0x1230_0845);
    }

    #[test]
    fn negative_times_keep_nanoseconds() {
        let t = system_time(Timestamp {
            sec: -2,
            nsec: 500_000_000,
        });
        assert_eq!(
            UNIX_EPOCH.duration_since(t).ok(),
            Some(Duration::from_millis(1500))
        );
    }
}
