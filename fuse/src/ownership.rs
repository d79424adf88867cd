//! Ownership and mode the container set but the host file cannot carry (no root, or
//! `record_ownership_in_xattr`): recorded in the xattr `user.lazysnap.override` as
//! `uid:gid:mode[:major:minor]` (mode in octal with its file-type bits, as fuse-overlayfs's
//! `user.fuseoverlayfs.override_stat`). A device node or fifo made without root is a regular
//! file whose override carries the real type. Linux refuses `user.*` xattrs on symlinks, so a
//! symlink's owner cannot be recorded this way.

use std::ffi::CString;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::host;

/// The xattr name.
pub const OVERRIDE_XATTR: &[u8] = b"user.lazysnap.override";

/// The xattr in which an entry copied up records the inode number it keeps (8 bytes, little
/// endian; see `merge::upper_ino`): after a rename its lower path no longer leads to it, and a
/// daemon taking the mount over reads the number here.
pub const INO_XATTR: &[u8] = b"user.lazysnap.ino";

/// xattrs the mount keeps for itself: hidden from the container and refused to it. Only the
/// exact names lazysnap writes, so images may carry other `user.lazysnap.*` xattrs.
pub fn is_private(name: &[u8]) -> bool {
    name == OVERRIDE_XATTR || name == INO_XATTR
}

/// Recorded ownership: what getattr reports instead of the host file's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Override {
    pub uid: u32,
    pub gid: u32,
    /// `st_mode`: file-type bits and permission bits.
    pub mode: u32,
    /// Device number (`makedev`) for char and block devices, else 0.
    pub rdev: u64,
}

impl Override {
    pub fn parse(v: &[u8]) -> Option<Override> {
        let s = std::str::from_utf8(v).ok()?;
        let mut it = s.trim_end_matches('\0').split(':');
        let uid = it.next()?.parse().ok()?;
        let gid = it.next()?.parse().ok()?;
        let mode = u32::from_str_radix(it.next()?, 8).ok()?;
        let rdev = match (it.next(), it.next()) {
            (Some(maj), Some(min)) => libc::makedev(maj.parse().ok()?, min.parse().ok()?),
            (None, None) => 0,
            _ => return None,
        };
        if it.next().is_some() {
            return None;
        }
        Some(Override {
            uid,
            gid,
            mode,
            rdev,
        })
    }

    pub fn format(&self) -> Vec<u8> {
        let t = self.mode & libc::S_IFMT;
        let mut s = format!("{}:{}:{:o}", self.uid, self.gid, self.mode);
        if t == libc::S_IFCHR || t == libc::S_IFBLK {
            s.push_str(&format!(
                ":{}:{}",
                libc::major(self.rdev),
                libc::minor(self.rdev)
            ));
        }
        s.into_bytes()
    }
}

/// The override of the inode behind `fd` (an `O_PATH` fd is fine), if one was recorded.
pub fn read_override_fd(fd: BorrowedFd<'_>) -> Option<Override> {
    host::get_xattr(fd, OVERRIDE_XATTR)
        .ok()
        .flatten()
        .and_then(|v| Override::parse(&v))
}

/// The override of the file at `path` (not following a final symlink), if one was recorded.
/// For commit, which tars the upper directory and must write these ids and modes in the tar.
pub fn read_override(path: &Path) -> Option<Override> {
    let p = CString::new(path.as_os_str().as_bytes()).ok()?;
    let n = CString::new(OVERRIDE_XATTR).ok()?;
    let mut buf = [0u8; 128];
    // SAFETY: valid C strings; `buf` is writable for its length.
    let rc = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if rc < 0 {
        return None;
    }
    Override::parse(&buf[..rc as usize])
}

pub fn write_override_fd(fd: BorrowedFd<'_>, o: &Override) -> std::io::Result<()> {
    host::set_xattr(fd, OVERRIDE_XATTR, &o.format(), 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let o = Override {
            uid: 1000,
            gid: 42,
            mode: libc::S_IFREG | 0o4755,
            rdev: 0,
        };
        assert_eq!(o.format(), b"1000:42:104755");
        assert_eq!(Override::parse(&o.format()), Some(o));
        let d = Override {
            uid: 0,
            gid: 6,
            mode: libc::S_IFBLK | 0o660,
            rdev: libc::makedev(8, 1),
        };
        assert_eq!(d.format(), b"0:6:60660:8:1");
        assert_eq!(Override::parse(&d.format()), Some(d));
        assert_eq!(Override::parse(b"1:2"), None);
        assert_eq!(Override::parse(b"1:2:777:1"), None);
    }
}
