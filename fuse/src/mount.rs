//! Mounting and unmounting the merged filesystem.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use fuser::{BackgroundSession, Config, MountOption, SessionACL};
use tracing::{debug, info, warn};

use crate::error::FuseError;
use crate::fs::{Gate, MergedFs};
use crate::layer::LayerStack;
use crate::merge::Merged;
use crate::owners::Owners;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// How to mount a merged view.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// The mount's source as `mount` lists it; the type is `fuse.lazysnap`.
    pub fsname: String,
    /// Let other users than the mounter in (needs root, or `user_allow_other` in
    /// `/etc/fuse.conf`). Permissions are then checked by the kernel against the layers' modes.
    pub allow_other: bool,
    /// Worker threads serving requests (each with its own cloned `/dev/fuse` fd). Reads may block
    /// on decompression, so more threads than cores pays off.
    pub threads: usize,
    /// Honour setuid/setgid bits (a container rootfs needs this). Only root can grant it.
    pub suid: bool,
    /// Honour device nodes. Only root can grant it.
    pub dev: bool,
    /// Readahead window to set on the mount's bdi after mounting, in KiB (best effort; the
    /// kernel caps the one negotiated at init to 128 KiB). `None` leaves the kernel's.
    pub read_ahead_kb: Option<u32>,
    /// The writable upper directory of an active snapshot (an existing host directory, not
    /// inside the mountpoint); `None` mounts read-only.
    pub upper: Option<PathBuf>,
    /// Record ownership and modes in the `user.lazysnap.override` xattr even as root (always
    /// done without root).
    pub record_ownership_in_xattr: bool,
    /// Whose ids the mount shows (the image's by default).
    pub owners: Owners,
    /// Serve from one `/dev/fuse` fd (no cloned fds, whose requests in flight would be lost with
    /// the daemon) and keep a duplicate of it ([`MountHandle::take_device_fd`]), so that another
    /// daemon can take the connection over ([`serve_taken_over`]).
    pub recoverable: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let root = is_root();
        let privileged = crate::owners::privileged();
        MountOptions {
            fsname: "lazysnap".to_string(),
            allow_other: root,
            threads: (2 * cores).clamp(4, 16),
            suid: privileged,
            dev: privileged,
            read_ahead_kb: Some(1024),
            upper: None,
            record_ownership_in_xattr: false,
            owners: Owners::Image,
            recoverable: false,
        }
    }
}

/// A mounted merged view served by background threads. Dropping it unmounts (best effort,
/// without waiting for the threads); prefer [`MountHandle::unmount`].
#[derive(Debug)]
pub struct MountHandle {
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
    merged: Arc<Merged>,
    /// A duplicate of the connection's `/dev/fuse` fd, for a keeper (recoverable mounts).
    device: Option<OwnedFd>,
    gate: Arc<Gate>,
}

impl MountHandle {
    /// The mountpoint (canonical).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The merged view being served.
    pub fn merged(&self) -> &Arc<Merged> {
        &self.merged
    }

    /// The gate of the changes to the upper: closed, no change is in progress or starts, and
    /// the process may exit for a successor to take the connection over.
    pub fn gate(&self) -> Arc<Gate> {
        self.gate.clone()
    }

    /// A duplicate of the connection's `/dev/fuse` fd (once; recoverable mounts only). While any
    /// process holds it, the kernel keeps the connection: a daemon that dies leaves requests
    /// waiting for the next one instead of a stale mount.
    pub fn take_device_fd(&mut self) -> Option<OwnedFd> {
        self.device.take()
    }

    /// Unmounts and waits for the serving threads to stop. When the mount is busy it is detached
    /// instead, and this waits until its last user lets go.
    pub fn unmount(mut self) -> Result<(), FuseError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        if !session.guard.is_finished() {
            unmount(&self.mountpoint)?;
        }
        finish(&self.mountpoint, session)
    }

    /// Waits until the filesystem is unmounted from outside (`umount`, `fusermount3 -u`) and the
    /// serving threads stopped.
    pub fn join(mut self) -> Result<(), FuseError> {
        match self.session.take() {
            Some(session) => finish(&self.mountpoint, session),
            None => Ok(()),
        }
    }
}

fn finish(mountpoint: &Path, session: BackgroundSession) -> Result<(), FuseError> {
    session.join().map_err(|source| FuseError::Session {
        path: mountpoint.to_path_buf(),
        source,
    })
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            if !session.guard.is_finished() {
                if let Err(e) = unmount(&self.mountpoint) {
                    warn!(mountpoint = %self.mountpoint.display(), error = %e, "unmount on drop failed");
                }
            }
        }
    }
}

/// The fuser configuration for `opts`.
pub fn fuser_config(opts: &MountOptions) -> Config {
    let mut mount_options = vec![
        if opts.upper.is_some() {
            MountOption::RW
        } else {
            MountOption::RO
        },
        MountOption::DefaultPermissions,
        MountOption::FSName(opts.fsname.clone()),
        // As a kernel option (not `Subtype`, which only fusermount understands) so that direct
        // mount(2) as root also gives the type `fuse.lazysnap`.
        MountOption::CUSTOM("subtype=lazysnap".to_string()),
        MountOption::NoAtime,
    ];
    mount_options.push(if opts.suid {
        MountOption::Suid
    } else {
        MountOption::NoSuid
    });
    mount_options.push(if opts.dev {
        MountOption::Dev
    } else {
        MountOption::NoDev
    });
    let mut config = Config::default();
    config.mount_options = mount_options;
    config.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = opts.threads > 1 && !opts.recoverable;
    config
}

/// Mounts the merged view of `stack` at `mountpoint` and serves it from background threads,
/// writable when `opts.upper` is set. Returns once the kernel handshake is done: the mount is
/// usable.
pub fn mount(
    stack: LayerStack,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<MountHandle, FuseError> {
    if is_stale_mount(mountpoint) {
        return Err(FuseError::StaleMount(mountpoint.to_path_buf()));
    }
    let bad = |source| FuseError::Mountpoint {
        path: mountpoint.to_path_buf(),
        source,
    };
    let canonical = mountpoint.canonicalize().map_err(bad)?;
    if !fs::metadata(&canonical).map_err(bad)?.is_dir() {
        return Err(bad(io::Error::from_raw_os_error(libc::ENOTDIR)));
    }
    let fs = merged_fs(stack, opts)?;
    let merged = fs.merged().clone();
    let gate = fs.gate();
    let config = fuser_config(opts);
    let mount_err = |source| FuseError::Mount {
        path: canonical.clone(),
        source,
    };
    // fusermount3 opens /dev/fuse with the caller's own rights, so a device the caller cannot
    // open means no FUSE at all for them: say so rather than report a bare EACCES.
    if let Err(e) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        return Err(FuseError::Unavailable(format!(
            "cannot open /dev/fuse ({e}): fusermount3 opens it with your rights, so FUSE needs \
             it readable and writable by users — mode 0666, as Debian's udev rule sets it \
             (without udev, as root: chmod 0666 /dev/fuse; scripts/install-deps.sh does it)"
        )));
    }
    let session = fuser::Session::new(fs, &canonical, &config).map_err(mount_err)?;
    let device = if opts.recoverable {
        Some(session.as_fd().try_clone_to_owned().map_err(mount_err)?)
    } else {
        None
    };
    let session = session.spawn().map_err(mount_err)?;
    let handle = MountHandle {
        session: Some(session),
        mountpoint: canonical,
        merged,
        device,
        gate,
    };
    if let Some(kb) = opts.read_ahead_kb {
        raise_read_ahead(&handle.mountpoint, kb);
    }
    info!(mountpoint = %handle.mountpoint.display(), "mounted");
    Ok(handle)
}

/// The filesystem `opts` asks for over `stack`.
fn merged_fs(stack: LayerStack, opts: &MountOptions) -> Result<MergedFs, FuseError> {
    let fs = match &opts.upper {
        Some(upper) => MergedFs::with_upper(stack, upper, opts.record_ownership_in_xattr).map_err(
            |source| FuseError::Upper {
                path: upper.clone(),
                source,
            },
        )?,
        None => MergedFs::new(stack),
    };
    Ok(fs.with_owners(opts.owners))
}

/// Serves the merged view of `stack` (and `opts.upper`) on `device`, the `/dev/fuse` fd of a
/// live mount at `mountpoint` whose daemon is gone (or handed over): no mount, no INIT (the
/// kernel sent it to the first daemon). The node ids the kernel holds are a pure function of
/// the stack and the upper ([`crate::merge::origin_ino`], [`crate::merge::upper_ino`]) and file
/// handles name their file, so they resolve here too; the requests the previous daemon had read
/// but not answered are asked for again (`FUSE_NOTIFY_RESEND`, Linux 6.9+).
pub fn serve_taken_over(
    stack: LayerStack,
    device: OwnedFd,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<MountHandle, FuseError> {
    let err = |source| FuseError::Mount {
        path: mountpoint.to_path_buf(),
        source,
    };
    let fs = merged_fs(stack, opts)?;
    let merged = fs.merged().clone();
    let gate = fs.gate();
    let config = fuser_config(&MountOptions {
        recoverable: true,
        ..opts.clone()
    });
    let keep = device.try_clone().map_err(err)?;
    let session = fuser::Session::from_initialized_fd(fs, device, config.acl, config);
    let session = session.spawn().map_err(err)?;
    match resend_pending(&keep) {
        Ok(()) => debug!("asked the kernel to resend the requests in flight"),
        Err(e) => warn!(
            error = %e,
            "FUSE_NOTIFY_RESEND refused (Linux < 6.9?): requests the previous daemon had read stay unanswered"
        ),
    }
    info!(mountpoint = %mountpoint.display(), "took the mount over");
    Ok(MountHandle {
        session: Some(session),
        mountpoint: mountpoint.to_path_buf(),
        merged,
        device: Some(keep),
        gate,
    })
}

/// `FUSE_NOTIFY_RESEND` (include/uapi/linux/fuse.h): the kernel queues again every request a
/// daemon read from this connection and did not answer.
pub fn resend_pending(device: &OwnedFd) -> io::Result<()> {
    const FUSE_NOTIFY_RESEND: i32 = 7;
    // struct fuse_out_header { u32 len; i32 error; u64 unique }: a notification has unique 0
    // and its code in `error`.
    let mut msg = [0u8; 16];
    msg[0..4].copy_from_slice(&16u32.to_ne_bytes());
    msg[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    // SAFETY: writes 16 bytes from a live buffer to an fd we own.
    let n = unsafe { libc::write(device.as_raw_fd(), msg.as_ptr().cast(), msg.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// True when the FUSE connection behind `device` is gone (unmounted or aborted): the device
/// then polls as an error. Does not read: requests stay for the daemon.
pub fn connection_gone(device: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: device.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd for a live fd, no waiting.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
}

/// Sets the readahead of the mount's bdi (named after its device number). Best effort: it
/// needs root, and only speeds sequential reads up.
fn raise_read_ahead(mountpoint: &Path, kb: u32) {
    let dev = match fs::metadata(mountpoint) {
        Ok(m) => m.dev(),
        Err(e) => return debug!(error = %e, "no stat of the new mount: readahead left as is"),
    };
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    match fs::write(&path, kb.to_string()) {
        Ok(()) => debug!(%path, kb, "readahead raised"),
        Err(e) => debug!(%path, error = %e, "readahead not raised"),
    }
}

/// True when `mountpoint` is the mount of a FUSE daemon that is gone (`ENOTCONN`). Such a mount
/// must be unmounted ([`unmount`]) before the directory can be used again.
///
/// `statfs` is asked rather than `stat`: with long attribute TTLs the kernel answers `stat` of
/// the root from its cache even after the daemon died, but `statfs` always reaches the daemon.
pub fn is_stale_mount(mountpoint: &Path) -> bool {
    let Ok(c) = CString::new(mountpoint.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid path; `buf` is a plain struct the call fills.
    let rc = unsafe {
        let mut buf: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut buf)
    };
    rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOTCONN)
}

/// True when `path` is a mount point in this mount namespace.
pub fn is_mountpoint(path: &Path) -> bool {
    mountpoints().contains(path)
}

/// Every mountpoint of this mount namespace (one read of `/proc/self/mountinfo`).
pub fn mountpoints() -> std::collections::HashSet<std::path::PathBuf> {
    use std::os::unix::ffi::OsStringExt as _;
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Default::default();
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|mp| std::path::PathBuf::from(std::ffi::OsString::from_vec(unescape_mountinfo(mp))))
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Unmounts the FUSE filesystem at `mountpoint`, live or stale. Returns false when nothing was
/// mounted there. A busy mount is detached (lazy unmount). Without root this goes through the
/// setuid `fusermount3 -u`.
pub fn unmount(mountpoint: &Path) -> Result<bool, FuseError> {
    // mountinfo lists absolute paths.
    let mountpoint = &std::path::absolute(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let err = |source| FuseError::Unmount {
        path: mountpoint.to_path_buf(),
        source,
    };
    let c = CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| err(io::Error::from_raw_os_error(libc::EINVAL)))?;
    let umount2 = |flags| {
        // SAFETY: `c` is a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    match umount2(0) {
        Ok(()) => Ok(true),
        Err(e) => match e.raw_os_error() {
            Some(libc::EBUSY) => {
                warn!(mountpoint = %mountpoint.display(), "mount busy: detaching it");
                umount2(libc::MNT_DETACH).map_err(err)?;
                Ok(true)
            }
            Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(false),
            Some(libc::EPERM) => {
                if !is_mountpoint(mountpoint) {
                    return Ok(false);
                }
                fusermount_unmount(mountpoint)?;
                Ok(true)
            }
            _ => Err(err(e)),
        },
    }
}

fn fusermount_unmount(mountpoint: &Path) -> Result<(), FuseError> {
    let mut last = String::new();
    for lazy in [false, true] {
        for bin in ["fusermount3", "fusermount"] {
            let mut cmd = Command::new(bin);
            cmd.arg("-u").arg("-q");
            if lazy {
                cmd.arg("-z");
            }
            match cmd.arg("--").arg(mountpoint).output() {
                Ok(out) if out.status.success() => return Ok(()),
                Ok(out) => last = String::from_utf8_lossy(&out.stderr).trim().to_string(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => last = e.to_string(),
            }
            break;
        }
    }
    Err(FuseError::Fusermount {
        path: mountpoint.to_path_buf(),
        message: last,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), b"/a b");
        assert_eq!(unescape_mountinfo(r"/a\\"), br"/a\\");
    }
}
