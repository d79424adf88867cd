//! Thin wrappers over the `*at()` syscalls the upper directory is touched with. Every call takes
//! a directory fd and a single name component (never a path), and never follows a symlink in
//! that component; whole-inode operations go through an `O_PATH` fd of the inode itself, reached
//! via `/proc/self/fd/N` (which lands on the inode, a symlink included, and follows nothing
//! further).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU8, Ordering};

/// Identity of a host inode: (st_dev, st_ino). Hardlinks share it; rename keeps it.
pub type HostId = (u64, u64);

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn cvt_size(rc: libc::ssize_t) -> io::Result<usize> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

/// A single path component as a C string: no `/`, no NUL, not `.`/`..`, not empty.
pub fn component(name: &[u8]) -> io::Result<CString> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `/proc/self/fd/N`: the inode behind `fd` itself.
pub fn proc_path(fd: BorrowedFd<'_>) -> CString {
    // Digits only: cannot contain NUL.
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful syscall and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `openat(dir, name, flags | O_NOFOLLOW | O_CLOEXEC, mode)`.
pub fn open_at(dir: BorrowedFd<'_>, name: &[u8], flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let c = component(name)?;
    // SAFETY: valid C string and fd.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })?;
    Ok(owned(fd))
}

/// An `O_PATH` fd of entry `name` of `dir`, the entry itself even if it is a symlink.
pub fn open_path(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<OwnedFd> {
    open_at(dir, name, libc::O_PATH, 0)
}

/// An `O_PATH` fd of directory `name` of `dir`; fails on anything else (symlinks included).
pub fn open_dir_path(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<OwnedFd> {
    open_at(dir, name, libc::O_PATH | libc::O_DIRECTORY, 0)
}

/// Whether `openat2` works here: unknown, yes, no (a kernel before 5.6, or a seccomp filter).
static OPENAT2: AtomicU8 = AtomicU8::new(0);

/// An `O_PATH` fd of the entry reached from `dir` through `names` (single components), the last
/// one itself even if it is a symlink. No symlink is followed on the way and the walk never
/// leaves `dir`: one `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, or where the kernel has
/// no `openat2`, one `O_NOFOLLOW` open per name (the same guarantee, since no name is `..`).
pub fn open_path_beneath(dir: BorrowedFd<'_>, names: &[&[u8]]) -> io::Result<OwnedFd> {
    let Some((last, walk)) = names.split_last() else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    if walk.is_empty() {
        return open_path(dir, last);
    }
    let mut path = Vec::with_capacity(names.iter().map(|n| n.len() + 1).sum());
    for (i, n) in names.iter().enumerate() {
        component(n)?;
        if i > 0 {
            path.push(b'/');
        }
        path.extend_from_slice(n);
    }
    if OPENAT2.load(Ordering::Relaxed) != 2 && path.len() < libc::PATH_MAX as usize {
        match openat2_beneath(dir, path) {
            Ok(fd) => {
                OPENAT2.store(1, Ordering::Relaxed);
                return Ok(fd);
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EPERM)) => {
                OPENAT2.store(2, Ordering::Relaxed);
            }
            Err(e) => return Err(e),
        }
    }
    let mut cur = open_dir_path(dir, walk[0])?;
    for n in &walk[1..] {
        cur = open_dir_path(cur.as_fd(), n)?;
    }
    open_path(cur.as_fd(), last)
}

fn openat2_beneath(dir: BorrowedFd<'_>, path: Vec<u8>) -> io::Result<OwnedFd> {
    let c = CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `open_how` is plain data (zero = no flags); it is non-exhaustive, hence zeroed.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid fd, C string and `open_how` of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(owned(rc as RawFd))
}

/// The upper root, opened once by path (the one host path this crate ever resolves).
pub fn open_root(path: &std::path::Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: valid C string.
    let fd = cvt(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    Ok(owned(fd))
}

/// Opens the inode behind the `O_PATH` fd `fd` for I/O. Only for regular files and directories
/// (opening a device node would reach its driver).
pub fn reopen(fd: BorrowedFd<'_>, flags: i32) -> io::Result<OwnedFd> {
    let p = proc_path(fd);
    // SAFETY: valid C string.
    let fd = cvt(unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC | libc::O_NOCTTY) })?;
    Ok(owned(fd))
}

pub fn stat_fd(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: `st` is a plain struct the call fills; "" with AT_EMPTY_PATH means `fd` itself.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        cvt(libc::fstatat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        ))?;
        Ok(st)
    }
}

/// `lstat` of `name` in `dir`; `None` when it does not exist.
pub fn stat_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Option<libc::stat>> {
    let c = component(name)?;
    // SAFETY: as above.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        match cvt(libc::fstatat(
            dir.as_raw_fd(),
            c.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )) {
            Ok(_) => Ok(Some(st)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

pub fn host_id(st: &libc::stat) -> HostId {
    (st.st_dev, st.st_ino)
}

pub fn mkdir_at(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<()> {
    let c = component(name)?;
    // SAFETY: valid C string and fd.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode as libc::mode_t) })?;
    Ok(())
}

pub fn mknod_at(dir: BorrowedFd<'_>, name: &[u8], mode: u32, rdev: u64) -> io::Result<()> {
    let c = component(name)?;
    // SAFETY: valid C string and fd.
    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), c.as_ptr(), mode as libc::mode_t, rdev) })?;
    Ok(())
}

pub fn symlink_at(target: &[u8], dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    let c = component(name)?;
    let t = CString::new(target).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: valid C strings and fd.
    cvt(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), c.as_ptr()) })?;
    Ok(())
}

/// `unlinkat`; `dir_flag` removes a directory.
pub fn unlink_at(dir: BorrowedFd<'_>, name: &[u8], dir_flag: bool) -> io::Result<()> {
    let c = component(name)?;
    let flags = if dir_flag { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: valid C string and fd.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) })?;
    Ok(())
}

pub fn rename_at(
    from: BorrowedFd<'_>,
    name: &[u8],
    to: BorrowedFd<'_>,
    new: &[u8],
    flags: u32,
) -> io::Result<()> {
    let (a, b) = (component(name)?, component(new)?);
    // SAFETY: valid C strings and fds.
    cvt(unsafe {
        libc::renameat2(
            from.as_raw_fd(),
            a.as_ptr(),
            to.as_raw_fd(),
            b.as_ptr(),
            flags,
        )
    })?;
    Ok(())
}

/// Hard-links entry `name` of `from` (never following it) as `new` in `to`.
pub fn link_at(
    from: BorrowedFd<'_>,
    name: &[u8],
    to: BorrowedFd<'_>,
    new: &[u8],
) -> io::Result<()> {
    let (a, b) = (component(name)?, component(new)?);
    // SAFETY: valid C strings and fds.
    cvt(unsafe { libc::linkat(from.as_raw_fd(), a.as_ptr(), to.as_raw_fd(), b.as_ptr(), 0) })?;
    Ok(())
}

/// Hard-links the inode behind `O_PATH` fd `fd` as `new` in `to`.
pub fn link_fd(fd: BorrowedFd<'_>, to: BorrowedFd<'_>, new: &[u8]) -> io::Result<()> {
    let b = component(new)?;
    let p = proc_path(fd);
    // SAFETY: valid C strings and fds. Following the magic link lands on the inode itself.
    cvt(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            p.as_ptr(),
            to.as_raw_fd(),
            b.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })?;
    Ok(())
}

pub fn readlink_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: `buf` is writable for its length.
    let n = cvt_size(unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(n);
    Ok(buf)
}

/// The names in directory `dir` (`O_PATH` fd), without `.` and `..`.
pub fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    let fd = reopen(dir, libc::O_RDONLY | libc::O_DIRECTORY)?;
    let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
    // SAFETY: `raw` is an open directory fd whose ownership passes to the DIR stream.
    let d = unsafe { libc::fdopendir(raw) };
    if d.is_null() {
        let e = io::Error::last_os_error();
        drop(owned(raw));
        return Err(e);
    }
    let mut names = Vec::new();
    loop {
        // SAFETY: `d` is a valid stream; the entry is read before the next readdir call.
        let ent = unsafe { libc::readdir64(d) };
        if ent.is_null() {
            break;
        }
        // SAFETY: d_name is NUL-terminated.
        let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) }.to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    // SAFETY: `d` is valid and closed once.
    unsafe { libc::closedir(d) };
    Ok(names)
}

pub fn chown_fd(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let p = proc_path(fd);
    let (u, g) = (uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX));
    // SAFETY: valid C string; -1 leaves an id unchanged. The magic link lands on the inode.
    cvt(unsafe { libc::chown(p.as_ptr(), u, g) })?;
    Ok(())
}

pub fn chmod_fd(fd: BorrowedFd<'_>, perm: u32) -> io::Result<()> {
    let p = proc_path(fd);
    // SAFETY: valid C string.
    cvt(unsafe { libc::chmod(p.as_ptr(), (perm & 0o7777) as libc::mode_t) })?;
    Ok(())
}

/// Sets atime and mtime (`tv_nsec` may be `UTIME_NOW` / `UTIME_OMIT`).
pub fn utimens_fd(fd: BorrowedFd<'_>, times: &[libc::timespec; 2]) -> io::Result<()> {
    let p = proc_path(fd);
    // SAFETY: valid C string and array of two timespecs.
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) })?;
    Ok(())
}

fn xattr_name(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

pub fn get_xattr(fd: BorrowedFd<'_>, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
    get_xattr_path(&proc_path(fd), name, false)
}

/// xattr `name` of entry `entry` of `dir`, not following a symlink (no fd opened: one syscall).
pub fn get_xattr_at(dir: BorrowedFd<'_>, entry: &[u8], name: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let entry = component(entry)?;
    let mut p = proc_path(dir).into_bytes();
    p.push(b'/');
    p.extend_from_slice(entry.as_bytes());
    let p = CString::new(p).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    get_xattr_path(&p, name, true)
}

fn get_xattr_path(p: &CString, name: &[u8], nofollow: bool) -> io::Result<Option<Vec<u8>>> {
    let n = xattr_name(name)?;
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: valid C strings; `buf` is writable for its length.
        let rc = unsafe {
            if nofollow {
                libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
            } else {
                libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
            }
        };
        if rc >= 0 {
            buf.truncate(rc as usize);
            return Ok(Some(buf));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::ENOTSUP) => return Ok(None),
            Some(libc::ERANGE) if buf.len() < (1 << 20) => buf.resize(buf.len() * 4, 0),
            _ => return Err(e),
        }
    }
}

pub fn list_xattrs(fd: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    let p = proc_path(fd);
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: valid C string; `buf` is writable for its length.
        let rc = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if rc >= 0 {
            buf.truncate(rc as usize);
            return Ok(buf
                .split(|b| *b == 0)
                .filter(|n| !n.is_empty())
                .map(<[u8]>::to_vec)
                .collect());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            Some(libc::ERANGE) if buf.len() < (1 << 20) => buf.resize(buf.len() * 4, 0),
            _ => return Err(e),
        }
    }
}

pub fn set_xattr(fd: BorrowedFd<'_>, name: &[u8], value: &[u8], flags: i32) -> io::Result<()> {
    let p = proc_path(fd);
    let n = xattr_name(name)?;
    // SAFETY: valid C strings; `value` readable for its length.
    cvt(unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })?;
    Ok(())
}

pub fn remove_xattr(fd: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    let p = proc_path(fd);
    let n = xattr_name(name)?;
    // SAFETY: valid C strings.
    cvt(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) })?;
    Ok(())
}

pub fn pwrite_all(fd: BorrowedFd<'_>, mut buf: &[u8], mut off: u64) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` readable for its length.
        let rc = unsafe {
            libc::pwrite64(
                fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                off as libc::off64_t,
            )
        };
        match cvt_size(rc) {
            Ok(0) => return Err(io::Error::from_raw_os_error(libc::EIO)),
            Ok(n) => {
                buf = &buf[n..];
                off += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    let size = i64::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: plain syscall on a valid fd.
    cvt(unsafe { libc::ftruncate64(fd.as_raw_fd(), size) })?;
    Ok(())
}

pub fn fsync(fd: BorrowedFd<'_>, datasync: bool) -> io::Result<()> {
    // SAFETY: plain syscalls on a valid fd.
    cvt(unsafe {
        if datasync {
            libc::fdatasync(fd.as_raw_fd())
        } else {
            libc::fsync(fd.as_raw_fd())
        }
    })?;
    Ok(())
}

pub fn statvfs(fd: BorrowedFd<'_>) -> io::Result<libc::statvfs> {
    // SAFETY: `st` is a plain struct the call fills.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        cvt(libc::fstatvfs(fd.as_raw_fd(), &mut st))?;
        Ok(st)
    }
}

/// Writes the runs of `buf` that are not all-zero 4 KiB blocks: holes stay holes (the final
/// ftruncate of a copy-up extends the file over skipped zeros).
pub fn pwrite_non_zero(fd: BorrowedFd<'_>, buf: &[u8], off: u64) -> io::Result<()> {
    const BLOCK: usize = 4096;
    let mut run: Option<usize> = None;
    let mut at = 0;
    while at < buf.len() {
        let end = (at + BLOCK).min(buf.len());
        let zero = buf[at..end].iter().all(|b| *b == 0);
        match (zero, run) {
            (false, None) => run = Some(at),
            (true, Some(start)) => {
                pwrite_all(fd, &buf[start..at], off + start as u64)?;
                run = None;
            }
            _ => {}
        }
        at = end;
    }
    if let Some(start) = run {
        pwrite_all(fd, &buf[start..], off + start as u64)?;
    }
    Ok(())
}
