//! The upper directory's on-disk form, read and written: an OCI layer in directory form. It
//! knows nothing of merging (the merge module does that): only of one upper directory's entries.
//! `.wh.NAME` (an empty regular file) deletes NAME below, `.wh..wh..opq` inside a directory
//! hides everything below it, and any other `.wh.*` name (temp files of copy-up) is never shown.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use crate::host::{self, HostId};
use crate::layer::{NodeAttr, NodeKind, Timestamp, Xattrs};
use crate::ownership::{self, Override};

/// Prefix of whiteout files.
pub const WH_PREFIX: &[u8] = b".wh.";
/// The opaque marker.
pub const OPAQUE: &[u8] = b".wh..wh..opq";

/// The writable upper directory of a mount.
#[derive(Debug)]
pub struct Upper {
    pub root: Arc<OwnedFd>,
    pub root_id: HostId,
    /// Record ownership and modes in [`ownership::OVERRIDE_XATTR`] instead of applying them.
    pub xattr_owner: bool,
}

impl Upper {
    pub fn open(path: &std::path::Path, record_in_xattr: bool) -> io::Result<Upper> {
        let root = host::open_root(path)?;
        let root_id = host::host_id(&host::stat_fd(root.as_fd())?);
        Ok(Upper {
            root: Arc::new(root),
            root_id,
            xattr_owner: record_in_xattr || !crate::owners::privileged(),
        })
    }
}

/// One visible entry of an upper directory.
#[derive(Debug)]
pub struct ScanEntry {
    pub name: Box<[u8]>,
    pub kind: NodeKind,
    pub id: HostId,
    /// The inode number it recorded when it was copied up ([`ownership::INO_XATTR`]).
    pub recorded: Option<u64>,
}

/// An upper directory read for merging.
#[derive(Debug, Default)]
pub struct Scan {
    pub entries: Vec<ScanEntry>,
    /// Names whited out (the part after `.wh.`).
    pub whiteouts: Vec<Box<[u8]>>,
    pub opaque: bool,
}

pub fn kind_of(mode: u32) -> NodeKind {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => NodeKind::Dir,
        libc::S_IFLNK => NodeKind::Symlink,
        libc::S_IFCHR => NodeKind::CharDev,
        libc::S_IFBLK => NodeKind::BlockDev,
        libc::S_IFIFO => NodeKind::Fifo,
        libc::S_IFSOCK => NodeKind::Socket,
        _ => NodeKind::File,
    }
}

pub fn mode_bits(kind: NodeKind) -> u32 {
    match kind {
        NodeKind::File => libc::S_IFREG,
        NodeKind::Dir => libc::S_IFDIR,
        NodeKind::Symlink => libc::S_IFLNK,
        NodeKind::CharDev => libc::S_IFCHR,
        NodeKind::BlockDev => libc::S_IFBLK,
        NodeKind::Fifo => libc::S_IFIFO,
        NodeKind::Socket => libc::S_IFSOCK,
    }
}

/// True for names a user may not create: OCI layers cannot carry them.
pub fn is_reserved(name: &[u8]) -> bool {
    name.starts_with(WH_PREFIX)
}

fn whiteout_name(name: &[u8]) -> Vec<u8> {
    let mut w = WH_PREFIX.to_vec();
    w.extend_from_slice(name);
    w
}

/// Creates the whiteout `.wh.NAME` in `dir` (an empty regular file).
pub fn make_whiteout(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    host::open_at(
        dir,
        &whiteout_name(name),
        libc::O_WRONLY | libc::O_CREAT,
        0o644,
    )?;
    Ok(())
}

/// Removes `.wh.NAME` from `dir` if there is one.
pub fn drop_whiteout(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    match host::unlink_at(dir, &whiteout_name(name), false) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Adds the opaque marker, keeping the directory's times: the marker is bookkeeping, not a
/// change the container made.
pub fn make_opaque(dir: BorrowedFd<'_>) -> io::Result<()> {
    let before = host::stat_fd(dir).ok();
    host::open_at(dir, OPAQUE, libc::O_WRONLY | libc::O_CREAT, 0o644)?;
    if let Some(st) = before {
        let times = [
            libc::timespec {
                tv_sec: st.st_atime,
                tv_nsec: st.st_atime_nsec,
            },
            libc::timespec {
                tv_sec: st.st_mtime,
                tv_nsec: st.st_mtime_nsec,
            },
        ];
        host::utimens_fd(dir, &times)?;
    }
    Ok(())
}

/// Removes the whiteouts and markers of an upper directory that shows no entries, so that it
/// can be removed or replaced.
pub fn clear_markers(dir: BorrowedFd<'_>) -> io::Result<()> {
    for name in host::list_dir(dir)? {
        if !name.starts_with(WH_PREFIX) {
            return Err(io::Error::from_raw_os_error(libc::ENOTEMPTY));
        }
        host::unlink_at(dir, &name, false)?;
    }
    Ok(())
}

pub fn scan_dir(dir: BorrowedFd<'_>) -> io::Result<Scan> {
    let mut scan = Scan::default();
    for name in host::list_dir(dir)? {
        if name == OPAQUE {
            scan.opaque = true;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WH_PREFIX) {
            if !hidden.is_empty() && !hidden.starts_with(WH_PREFIX) {
                scan.whiteouts.push(hidden.into());
            }
            continue;
        }
        // Gone since the listing: skip.
        let Some(st) = host::stat_at(dir, &name)? else {
            continue;
        };
        let mut kind = kind_of(st.st_mode);
        // Special files made without root are empty regular files carrying their real type.
        if kind == NodeKind::File && st.st_size == 0 {
            if let Ok(fd) = host::open_path(dir, &name) {
                if let Some(o) = ownership::read_override_fd(fd.as_fd()) {
                    kind = kind_of(o.mode);
                }
            }
        }
        // Only files and directories take `user.*` xattrs.
        let recorded = match st.st_mode & libc::S_IFMT {
            libc::S_IFREG | libc::S_IFDIR => recorded_ino(dir, &name),
            _ => None,
        };
        scan.entries.push(ScanEntry {
            name: name.into(),
            kind,
            id: host::host_id(&st),
            recorded,
        });
    }
    Ok(scan)
}

/// The inode number entry `name` of `dir` recorded at copy-up, if any (and well formed).
fn recorded_ino(dir: BorrowedFd<'_>, name: &[u8]) -> Option<u64> {
    let v = host::get_xattr_at(dir, name, ownership::INO_XATTR).ok()??;
    Some(u64::from_le_bytes(v.try_into().ok()?))
}

fn ts(sec: i64, nsec: i64) -> Timestamp {
    Timestamp {
        sec,
        nsec: nsec.clamp(0, 999_999_999) as u32,
    }
}

/// The attributes of an upper entry (override applied) and its 512-byte block count. nlink is
/// the host's; the caller fixes it for directories.
pub fn attr(fd: BorrowedFd<'_>) -> io::Result<(NodeAttr, u64)> {
    let st = host::stat_fd(fd)?;
    let mut a = NodeAttr {
        kind: kind_of(st.st_mode),
        perm: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        size: st.st_size as u64,
        mtime: ts(st.st_mtime, st.st_mtime_nsec),
        atime: ts(st.st_atime, st.st_atime_nsec),
        ctime: ts(st.st_ctime, st.st_ctime_nsec),
        rdev: st.st_rdev,
        nlink: st.st_nlink as u32,
    };
    if matches!(a.kind, NodeKind::File | NodeKind::Dir) {
        if let Some(o) = ownership::read_override_fd(fd) {
            apply_override(&mut a, &o);
        }
    }
    Ok((a, st.st_blocks as u64))
}

pub fn apply_override(a: &mut NodeAttr, o: &Override) {
    a.uid = o.uid;
    a.gid = o.gid;
    a.perm = o.mode & 0o7777;
    let kind = kind_of(o.mode);
    if kind != a.kind && a.kind == NodeKind::File && a.size == 0 {
        a.kind = kind;
        a.rdev = o.rdev;
    }
}

/// The visible xattrs of an upper entry (the filesystem's own hidden).
pub fn xattrs(fd: BorrowedFd<'_>) -> io::Result<Xattrs> {
    let mut out = Vec::new();
    for name in host::list_xattrs(fd)? {
        if crate::ownership::is_private(&name) {
            continue;
        }
        if let Some(v) = host::get_xattr(fd, &name)? {
            out.push((name, v));
        }
    }
    Ok(out)
}
