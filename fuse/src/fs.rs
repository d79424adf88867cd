//! The FUSE glue: [`MergedFs`] answers kernel requests from a [`Merged`] view.
//!
//! Layers are immutable, so everything is cached by the kernel for as long as it likes: long
//! entry/attr TTLs, `FOPEN_KEEP_CACHE` and `FOPEN_CACHE_DIR`. Reads call the layer without any
//! lock of the merged view held, so slow decompression never stalls metadata requests.
//!
//! With a writable upper the TTLs stay long: every change goes through this mount, and the
//! kernel updates or invalidates what each change touches (the entry, its attributes, the
//! parent directories' attributes), while copy-up changes nothing it can see (inode numbers
//! stay). Directory listings are not cached by the kernel then, and each open directory reads
//! a snapshot of the merged listing so that offsets stay valid while entries come and go (as
//! `rm -rf` needs). Upper files are read and written through host fds kept per open.
//!
//! A daemon may take a live mount over from a dead or retiring one (see `crate::mount`): a file
//! handle names its inode and open flags ([`file_handle`]), so a handle this daemon never gave
//! out is opened again on its first use, and the changes to the upper pass a [`Gate`] that a
//! retiring daemon closes, so that none is half made when it exits.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tracing::{debug, debug_span, warn};

use crate::layer::{LayerStack, NodeAttr, NodeKind, Timestamp};
use crate::merge::write::{NewNode, SetAttr, SetTime};
use crate::merge::{self, FullAttr, Ino, Merged, MergedDir};
use crate::owners::{Caller, Owners};
use crate::upper::Upper;

/// How long the kernel may cache entries and attributes: the layers never change.
pub const TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Largest read or write request asked of the kernel (it caps this at its `max_pages_limit`).
const MAX_IO: u32 = 1 << 20;

/// The read-only merged filesystem. Mount it with [`crate::mount`], or hand it to
/// `fuser::mount` / `fuser::spawn_mount` to run it in the foreground.
#[derive(Debug)]
pub struct MergedFs {
    merged: Arc<Merged>,
    /// Open upper files by file handle (handle 0 = read from the layer), with how many opens
    /// share the handle.
    files: Mutex<HashMap<u64, (Arc<File>, u32)>>,
    /// Listing snapshots of open directories of a writable view, with the directory's number.
    dirs: Mutex<HashMap<u64, (Ino, Arc<MergedDir>)>>,
    /// Handles of directories and of files [`file_handle`] cannot name: from this daemon's pid
    /// up, so that a successor's do not meet them.
    next_fh: AtomicU64,
    /// Whose ids the mount shows (see [`Owners`]).
    owners: Owners,
    gate: Arc<Gate>,
}

/// What every change to the upper passes while it runs, reply included. A daemon handing the
/// mount over closes it and exits: each change is then either answered or not started, and the
/// kernel resends the requests not answered to the next daemon (reads and data writes are
/// idempotent at their offset and need not pass).
#[derive(Debug, Default)]
pub struct Gate(RwLock<()>);

impl Gate {
    fn pass(&self) -> RwLockReadGuard<'_, ()> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for the changes in progress to be answered and lets no other start, for good.
    pub fn close(&self) {
        let shut = self.0.write().unwrap_or_else(PoisonError::into_inner);
        std::mem::forget(shut);
    }
}

/// Set by the kernel in the `unique` of a request it sends again after `FUSE_NOTIFY_RESEND`:
/// a daemon read it before, and may have made the change before it died.
const FUSE_UNIQUE_RESEND: u64 = 1 << 63;

/// True when `e`, the answer to change `req`, is what the change gives once made (`already`:
/// `EEXIST` for a name it adds, `ENOENT` for one it removes) and the kernel resent it: the
/// daemon that first read it made it and died before answering, so it is done, not failed.
fn done_before(req: &Request, e: &merge::Errno, already: i32) -> bool {
    let done = req.unique().0 & FUSE_UNIQUE_RESEND != 0 && e.raw() == already;
    if done {
        debug!(
            unique = req.unique().0,
            already, "a resent change was made before"
        );
    }
    done
}

/// Bit set in every handle [`file_handle`] makes.
const FH_NAMED: u64 = 1 << 63;
/// Inode numbers up to here fit a named handle (origins and [`merge::upper_ino`]'s).
const FH_INO_BITS: u32 = 49;

/// The handle of an upper file `ino` opened with `flags`: the inode number and the flags that
/// matter for reopening it (access mode, O_SYNC/O_DSYNC). Opens that agree share a handle.
/// `None` for a number too large to name.
fn file_handle(ino: Ino, flags: i32) -> Option<u64> {
    if ino >> FH_INO_BITS != 0 {
        return None;
    }
    let acc = (flags & libc::O_ACCMODE) as u64 & 3;
    let sync = u64::from(flags & libc::O_SYNC == libc::O_SYNC);
    let dsync = u64::from(flags & libc::O_DSYNC != 0);
    Some(FH_NAMED | ((acc | sync << 2 | dsync << 3) << FH_INO_BITS) | ino)
}

/// The inode and open flags a [`file_handle`] names.
fn handle_file(fh: u64) -> Option<(Ino, i32)> {
    if fh & FH_NAMED == 0 {
        return None;
    }
    let ino = fh & ((1 << FH_INO_BITS) - 1);
    let bits = (fh & !FH_NAMED) >> FH_INO_BITS;
    let mut flags = (bits & 3) as i32;
    if bits & 4 != 0 {
        flags |= libc::O_SYNC;
    } else if bits & 8 != 0 {
        flags |= libc::O_DSYNC;
    }
    Some((ino, flags))
}

impl MergedFs {
    pub fn new(stack: LayerStack) -> MergedFs {
        Self::from_merged(Merged::new(stack))
    }

    /// A writable view: `upper` holds the changes (see the crate docs); `record_in_xattr`
    /// records ownership in an xattr even when running as root.
    pub fn with_upper(
        stack: LayerStack,
        upper: &Path,
        record_in_xattr: bool,
    ) -> io::Result<MergedFs> {
        let upper = Upper::open(upper, record_in_xattr)?;
        Ok(Self::from_merged(Merged::with_upper(stack, upper)?))
    }

    fn from_merged(merged: Merged) -> MergedFs {
        MergedFs {
            merged: Arc::new(merged),
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new((u64::from(std::process::id()) << 32) + 1),
            owners: Owners::Image,
            gate: Arc::default(),
        }
    }

    /// The gate every change to the upper passes ([`Gate::close`] before handing over).
    pub fn gate(&self) -> Arc<Gate> {
        self.gate.clone()
    }

    /// Shows ids as `owners` says (default: the image's).
    pub fn with_owners(mut self, owners: Owners) -> MergedFs {
        self.owners = owners;
        self
    }

    /// The attributes to send to the kernel, with ids as the mount shows them.
    fn attr_out(&self, ino: Ino, a: &FullAttr) -> FileAttr {
        let mut f = full_attr(ino, a);
        (f.uid, f.gid) = self.owners.show(f.uid, f.gid);
        f
    }

    fn caller(&self, req: &Request) -> Caller {
        self.owners.caller_in(Caller {
            uid: req.uid(),
            gid: req.gid(),
        })
    }

    /// The upper file open as `fh` on `ino`; a handle an earlier daemon gave out is opened
    /// again here (the kernel releases it once, as any other).
    fn file(&self, ino: Ino, fh: FileHandle) -> Option<Arc<File>> {
        {
            let files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((f, _)) = files.get(&fh.0) {
                return Some(f.clone());
            }
        }
        let (named, flags) = handle_file(fh.0)?;
        if named != ino {
            return None;
        }
        let _s = debug_span!("reopen", ino, flags).entered();
        let f = match self.merged.open_upper(ino, flags) {
            Ok(f) => Arc::new(f),
            Err(e) => {
                warn!(what = %self.merged.describe(ino), error = ?e, "cannot open a handle of an earlier daemon again");
                return None;
            }
        };
        let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        Some(files.entry(fh.0).or_insert((f, 1)).0.clone())
    }

    fn add_file(&self, ino: Ino, flags: i32, f: File) -> FileHandle {
        let fh =
            file_handle(ino, flags).unwrap_or_else(|| self.next_fh.fetch_add(1, Ordering::Relaxed));
        let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        files
            .entry(fh)
            .and_modify(|(_, opens)| *opens += 1)
            .or_insert((Arc::new(f), 1));
        FileHandle(fh)
    }

    /// The listing of directory `ino` as open directory `fh` sees it.
    fn listing(&self, ino: Ino, fh: FileHandle, offset: u64) -> Option<Arc<MergedDir>> {
        if fh.0 == 0 {
            return self.merged.dir(ino);
        }
        let mut dirs = self.dirs.lock().unwrap_or_else(PoisonError::into_inner);
        let snap = dirs.get(&fh.0).cloned();
        match snap {
            // A rewind sees the changes since the open.
            Some((of, d)) if offset > 0 && of == ino => Some(d),
            _ => {
                let d = self.merged.dir(ino)?;
                dirs.insert(fh.0, (ino, d.clone()));
                Some(d)
            }
        }
    }

    /// Replies with the entry of a node just made (the kernel takes a reference on it).
    /// Creates `node` (mknod, mkdir, symlink) and answers with its entry.
    fn create_node(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        node: NewNode,
        reply: ReplyEntry,
    ) {
        let _g = self.gate.pass();
        let kind = node.kind();
        match self
            .merged
            .create(self.caller(req), parent.0, name.as_bytes(), node)
        {
            Ok(ino) => self.reply_new(ino, reply),
            Err(e) if done_before(req, &e, libc::EEXIST) => {
                match self.merged.child(parent.0, name.as_bytes()) {
                    Some(ino) if self.merged.inode(ino).is_some_and(|i| i.kind == kind) => {
                        self.reply_new(ino, reply)
                    }
                    _ => reply.error(errno(&e)),
                }
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn reply_new(&self, ino: Ino, reply: ReplyEntry) {
        match self.merged.attr_full(ino) {
            Ok(a) => {
                self.merged.add_lookup(ino);
                reply.entry(&TTL, &self.attr_out(ino, &a), Generation(0))
            }
            Err(e) => reply.error(errno(&e)),
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

fn full_attr(ino: Ino, a: &FullAttr) -> FileAttr {
    let mut f = file_attr(ino, &a.0);
    if let Some(blocks) = a.1 {
        f.blocks = blocks;
    }
    f
}

fn timestamp(t: SystemTime) -> Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timestamp {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let (sec, nsec) = (d.as_secs() as i64, d.subsec_nanos());
            if nsec == 0 {
                Timestamp { sec: -sec, nsec: 0 }
            } else {
                Timestamp {
                    sec: -sec - 1,
                    nsec: 1_000_000_000 - nsec,
                }
            }
        }
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(timestamp(t)),
    })
}

/// The kernel's 32-bit device number back to `makedev` form.
fn rdev_from32(rdev: u32) -> u64 {
    let major = (rdev & 0xfff00) >> 8;
    let minor = (rdev & 0xff) | ((rdev >> 12) & 0xfff00);
    libc::makedev(major, minor)
}

fn io_errno(e: &io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
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
fn may_access(
    a: &NodeAttr,
    uid: u32,
    gid: u32,
    mask: AccessFlags,
    writable: bool,
) -> Result<(), Errno> {
    let want_w = mask.contains(AccessFlags::W_OK);
    if want_w && !writable {
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
    if (mask.contains(AccessFlags::R_OK) && bits & 4 == 0)
        || (want_w && bits & 2 == 0)
        || (want_x && bits & 1 == 0)
    {
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
        match self.merged.lookup_ext(parent.0, name.as_bytes()) {
            Ok((ino, attr)) => reply.entry(&TTL, &self.attr_out(ino, &attr), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.merged.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _s = debug_span!("getattr", ino = ino.0).entered();
        match self.merged.attr_full(ino.0) {
            Ok(a) => reply.attr(&TTL, &self.attr_out(ino.0, &a)),
            Err(e) => reply.error(errno(&e)),
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
        let writes = flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        if self.merged.is_writable() {
            let upper = self.merged.inode(ino.0).is_some_and(|i| i.is_upper());
            if writes || upper {
                // Copy-up and truncation change the upper.
                let _g = writes.then(|| self.gate.pass());
                return match self.merged.open_upper(ino.0, flags.0) {
                    Ok(f) => reply.opened(self.add_file(ino.0, flags.0, f), FopenFlags::empty()),
                    Err(e) => reply.error(errno(&e)),
                };
            }
        } else if writes {
            return reply.error(Errno::EROFS);
        }
        if !self.merged.is_writable() {
            // Zero-message opens: ENOSYS makes the kernel stop sending open/release for this
            // mount and open every file with FOPEN_KEEP_CACHE — the layers never change, and
            // a warm read then costs no round trip at all.
            return reply.error(Errno::ENOSYS);
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
        // Handles start at 1: 0 is a layer file (and every file of a read-only mount, whose
        // opens are zero-message), so the hot path takes no lock of the handle table.
        if _fh.0 != 0 {
            if let Some(f) = self.file(ino.0, _fh) {
                return read_file(&f, offset, size, reply);
            }
        }
        // `file_source` clones what it needs and releases the table lock before the read.
        let (layer, node, file_size) = match self.merged.file_source(ino.0) {
            Ok(s) => s,
            // Copied up since this read-only open: read the upper file.
            Err(merge::Errno::Upper) => {
                return match self.merged.open_upper(ino.0, libc::O_RDONLY) {
                    Ok(f) => read_file(&f, offset, size, reply),
                    Err(e) => reply.error(errno(&e)),
                }
            }
            Err(e) => return reply.error(errno(&e)),
        };
        if offset >= file_size {
            return reply.data(&[]);
        }
        let len = (file_size - offset).min(u64::from(size)) as usize;
        let mut buf = vec![0u8; len];
        // `LayerTree::read_at` fills the buffer (short only at the end of the file), so one call.
        match layer.read_at(node, offset, &mut buf) {
            Ok(n) => reply.data(&buf[..n]),
            Err(err) => {
                warn!(
                    what = %self.merged.describe(ino.0),
                    offset,
                    %err,
                    "layer read failed"
                );
                reply.error(Errno::EIO)
            }
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.merged.inode(ino.0) {
            Some(i) if i.kind == NodeKind::Dir && self.merged.is_writable() => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                reply.opened(FileHandle(fh), FopenFlags::empty())
            }
            // Read-only: zero-message opendir (the kernel then caches listings by default).
            Some(i) if i.kind == NodeKind::Dir => reply.error(Errno::ENOSYS),
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
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _s = debug_span!("readdir", ino = ino.0, offset).entered();
        let (Some(inode), Some(dir)) = (self.merged.inode(ino.0), self.listing(ino.0, fh, offset))
        else {
            return reply.error(Errno::ENOTDIR);
        };
        let dots = [(ino.0, b".".as_slice()), (inode.parent(), b"..".as_slice())];
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
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _s = debug_span!("readdirplus", ino = ino.0, offset).entered();
        let (Some(inode), Some(dir)) = (self.merged.inode(ino.0), self.listing(ino.0, fh, offset))
        else {
            return reply.error(Errno::ENOTDIR);
        };
        let total = 2 + dir.children().len() as u64;
        for idx in offset..total {
            let (ino, name) = match idx {
                0 => (ino.0, b".".as_slice()),
                1 => (inode.parent(), b"..".as_slice()),
                _ => {
                    let c = &dir.children()[(idx - 2) as usize];
                    (c.ino, &*c.name)
                }
            };
            let Ok(attr) = self.merged.attr_full(ino) else {
                continue;
            };
            let full = reply.add(
                INodeNo(ino),
                idx + 1,
                OsStr::from_bytes(name),
                &TTL,
                &self.attr_out(ino, &attr),
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
        if let Some(st) = self.merged.upper_statfs() {
            return reply.statfs(
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                st.f_bsize as u32,
                st.f_namemax as u32,
                st.f_frsize as u32,
            );
        }
        // Read-only and lazily discovered: no free space, inode count as known so far.
        reply.statfs(0, 0, 0, self.merged.inode_count(), 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _s = debug_span!("getxattr", ino = ino.0, name = ?name).entered();
        if crate::ownership::is_private(name.as_bytes()) {
            return reply.error(Errno::NO_XATTR);
        }
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
                for (n, _) in xs.iter().filter(|(n, _)| !crate::ownership::is_private(n)) {
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
            Some(mut a) => {
                (a.uid, a.gid) = self.owners.show(a.uid, a.gid);
                match may_access(&a, req.uid(), req.gid(), mask, self.merged.is_writable()) {
                    Ok(()) => reply.ok(),
                    Err(e) => reply.error(e),
                }
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _s = debug_span!("setattr", ino = ino.0, ?mode, ?uid, ?gid, ?size).entered();
        let change = SetAttr {
            perm: mode.map(|m| m & 0o7777),
            uid: uid.map(|u| self.owners.uid_in(u)),
            gid: gid.map(|g| self.owners.gid_in(g)),
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
        };
        let _g = self.gate.pass();
        let file = fh.and_then(|fh| self.file(ino.0, fh));
        let done = self
            .merged
            .setattr(ino.0, &change, file.as_deref())
            .and_then(|()| self.merged.attr_full(ino.0));
        match done {
            Ok(a) => reply.attr(&TTL, &self.attr_out(ino.0, &a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _s = debug_span!("mknod", parent = parent.0, name = ?name, mode).entered();
        let perm = mode & 0o7777;
        let node = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => NewNode::File { perm },
            libc::S_IFCHR => NewNode::Special {
                kind: NodeKind::CharDev,
                perm,
                rdev: rdev_from32(rdev),
            },
            libc::S_IFBLK => NewNode::Special {
                kind: NodeKind::BlockDev,
                perm,
                rdev: rdev_from32(rdev),
            },
            libc::S_IFIFO => NewNode::Special {
                kind: NodeKind::Fifo,
                perm,
                rdev: 0,
            },
            libc::S_IFSOCK => NewNode::Special {
                kind: NodeKind::Socket,
                perm,
                rdev: 0,
            },
            _ => return reply.error(Errno::EINVAL),
        };
        self.create_node(req, parent, name, node, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let _s = debug_span!("mkdir", parent = parent.0, name = ?name, mode).entered();
        let node = NewNode::Dir {
            perm: mode & 0o7777,
        };
        self.create_node(req, parent, name, node, reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _s = debug_span!("symlink", parent = parent.0, name = ?link_name).entered();
        let node = NewNode::Symlink {
            target: target.as_os_str().as_bytes().to_vec(),
        };
        self.create_node(req, parent, link_name, node, reply);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _g = self.gate.pass();
        let _s = debug_span!("create", parent = parent.0, name = ?name, mode).entered();
        let node = NewNode::File {
            perm: mode & 0o7777,
        };
        let made = self
            .merged
            .create(self.caller(req), parent.0, name.as_bytes(), node)
            .or_else(|e| match self.merged.child(parent.0, name.as_bytes()) {
                Some(ino) if done_before(req, &e, libc::EEXIST) => Ok(ino),
                _ => Err(e),
            })
            .and_then(|ino| {
                let f = self.merged.open_upper(ino, flags & !libc::O_TRUNC)?;
                let a = self.merged.attr_full(ino)?;
                Ok((ino, f, a))
            });
        match made {
            Ok((ino, f, a)) => {
                self.merged.add_lookup(ino);
                let fh = self.add_file(ino, flags, f);
                reply.created(
                    &TTL,
                    &self.attr_out(ino, &a),
                    Generation(0),
                    fh,
                    FopenFlags::empty(),
                )
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _g = self.gate.pass();
        let _s = debug_span!("unlink", parent = parent.0, name = ?name).entered();
        match self.merged.unlink(parent.0, name.as_bytes()) {
            Ok(()) => reply.ok(),
            Err(e) if done_before(req, &e, libc::ENOENT) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _g = self.gate.pass();
        let _s = debug_span!("rmdir", parent = parent.0, name = ?name).entered();
        match self.merged.rmdir(parent.0, name.as_bytes()) {
            Ok(()) => reply.ok(),
            Err(e) if done_before(req, &e, libc::ENOENT) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _g = self.gate.pass();
        let _s = debug_span!("rename", parent = parent.0, name = ?name, newparent = newparent.0,
            newname = ?newname)
        .entered();
        match self.merged.rename(
            parent.0,
            name.as_bytes(),
            newparent.0,
            newname.as_bytes(),
            flags.bits(),
        ) {
            Ok(()) => reply.ok(),
            // The source gone and the target there: moved before.
            Err(e)
                if self.merged.child(newparent.0, newname.as_bytes()).is_some()
                    && done_before(req, &e, libc::ENOENT) =>
            {
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _g = self.gate.pass();
        let _s =
            debug_span!("link", ino = ino.0, newparent = newparent.0, newname = ?newname).entered();
        match self.merged.link(ino.0, newparent.0, newname.as_bytes()) {
            Ok(()) => self.reply_new(ino.0, reply),
            Err(e)
                if self.merged.child(newparent.0, newname.as_bytes()) == Some(ino.0)
                    && done_before(req, &e, libc::EEXIST) =>
            {
                self.reply_new(ino.0, reply)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _s = debug_span!("write", ino = ino.0, offset, len = data.len()).entered();
        let Some(f) = self.file(ino.0, fh) else {
            return reply.error(Errno::EBADF);
        };
        match f.write_all_at(data, offset) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(io_errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        if self.merged.is_writable() {
            reply.ok();
        } else {
            // Nothing to flush in immutable layers: ENOSYS stops flush on every close.
            reply.error(Errno::ENOSYS);
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        if let Entry::Occupied(mut e) = files.entry(fh.0) {
            e.get_mut().1 -= 1;
            if e.get().1 == 0 {
                e.remove();
            }
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _s = debug_span!("fsync", ino = ino.0).entered();
        let Some(f) = self.file(ino.0, fh) else {
            // A read-only open of a layer file: nothing to write out.
            return reply.ok();
        };
        let done = if datasync {
            f.sync_data()
        } else {
            f.sync_all()
        };
        match done {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(io_errno(&e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let mut dirs = self.dirs.lock().unwrap_or_else(PoisonError::into_inner);
        dirs.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Directory changes are made by rename/unlink on the host, which orders them itself;
        // a container's fsync of a directory has nothing more to flush here.
        reply.ok();
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _g = self.gate.pass();
        let _s = debug_span!("setxattr", ino = ino.0, name = ?name).entered();
        match self.merged.set_xattr(ino.0, name.as_bytes(), value, flags) {
            Ok(()) => reply.ok(),
            Err(e) if done_before(req, &e, libc::EEXIST) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _g = self.gate.pass();
        let _s = debug_span!("removexattr", ino = ino.0, name = ?name).entered();
        match self.merged.remove_xattr(ino.0, name.as_bytes()) {
            Ok(()) => reply.ok(),
            Err(e) if done_before(req, &e, libc::ENODATA) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _s = debug_span!("fallocate", ino = ino.0, offset, length, mode).entered();
        let Some(f) = self.file(ino.0, fh) else {
            return reply.error(Errno::EBADF);
        };
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(length)) else {
            return reply.error(Errno::EINVAL);
        };
        // SAFETY: plain syscall on an open fd.
        if unsafe { libc::fallocate64(f.as_raw_fd(), mode, off, len) } == 0 {
            reply.ok()
        } else {
            reply.error(io_errno(&io::Error::last_os_error()))
        }
    }
}

fn read_file(f: &File, offset: u64, size: u32, reply: ReplyData) {
    let mut buf = vec![0u8; size as usize];
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return reply.error(io_errno(&e)),
        }
    }
    reply.data(&buf[..done]);
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
