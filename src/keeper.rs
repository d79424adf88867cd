//! The keeper of a read-only mount's FUSE connection: a small process holding a duplicate of
//! the mount daemon's `/dev/fuse` fd. The kernel keeps a connection alive while any process
//! holds its fd, so a daemon that dies (kill -9, OOM, a panic) does not leave a stale mount:
//! requests wait, the keeper starts a new daemon on the same fd (`mount --foreground
//! --resume-fd`), which asks the kernel to resend what the dead one had read and answers the
//! node ids the kernel already holds (a pure function of layer and node). The keeper exits once
//! the connection is gone (unmounted, or aborted through `/sys/fs/fuse/connections`).
//!
//! The keeper knows nothing of layers or FUSE requests; the daemon knows nothing of keeping.

use std::ffi::OsString;
use std::io::Read as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tracing::{info, info_span, warn};

/// The fd number the keeper and the daemons it starts hold the connection on.
pub const DEVICE_FD: RawFd = 3;

/// Daemons in a row that die before serving, after which the keeper lets the mount go (it then
/// reads ENOTCONN, as without a keeper): a daemon that cannot start (its index deleted, say) is
/// not retried forever.
const MAX_FAILED_STARTS: u32 = 5;

/// Starts the keeper of the connection `device` for the daemon `daemon_pid`, which was started
/// with `daemon_args` (argv without the program; the keeper adds `--resume-fd`).
pub fn spawn(device: OwnedFd, daemon_pid: u32, daemon_args: &[OsString]) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the lazysnap binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("fuse-keeper")
        .arg("--pid")
        .arg(daemon_pid.to_string())
        .arg("--")
        .args(daemon_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    pass_fds(&mut cmd, &device, None);
    cmd.spawn().context("starting the mount's keeper")?;
    Ok(())
}

/// Makes `device` the child's fd [`DEVICE_FD`] and keeps `ready` (stderr and the rest as this
/// process has them).
fn pass_fds(cmd: &mut Command, device: &OwnedFd, ready: Option<RawFd>) {
    let raw = device.as_raw_fd();
    // SAFETY: only async-signal-safe calls (setsid, dup2, fcntl, chdir) between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            libc::setsid();
            // Not in the way of an unmount, wherever it was started.
            libc::chdir(c"/".as_ptr());
            if let Some(r) = ready {
                let flags = libc::fcntl(r, libc::F_GETFD);
                libc::fcntl(r, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            }
            if raw == DEVICE_FD {
                let flags = libc::fcntl(raw, libc::F_GETFD);
                libc::fcntl(raw, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            } else if libc::dup2(raw, DEVICE_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The keeper's main: holds fd [`DEVICE_FD`], waits for daemon `pid` (not its child) to end and
/// then, while the connection lives, starts a daemon on it with `daemon_args` and waits for that
/// one, and so on.
pub fn run(pid: u32, daemon_args: Vec<OsString>) -> anyhow::Result<()> {
    let _span = info_span!("fuse_keeper", pid).entered();
    // SAFETY: the daemon that started us passed the connection on this fd for our keeping.
    let device = unsafe { OwnedFd::from_raw_fd(DEVICE_FD) };
    // Signals aimed at the session (a terminal's ^C) are the daemon's to answer.
    // SAFETY: setting signal dispositions to ignore has no preconditions.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    wait_for_exit(pid).context("watching the mount daemon")?;
    let exe = std::env::current_exe().context("finding the lazysnap binary")?;
    let mut failed_starts = 0;
    let mut last = pid;
    loop {
        if lazysnap_fuse::connection_gone(&device) {
            info!("the mount is gone; the keeper exits");
            return Ok(());
        }
        let started = Instant::now();
        let (ready_read, ready_write) = pipe().context("creating a pipe")?;
        let mut cmd = Command::new(&exe);
        cmd.args(&daemon_args)
            .arg("--resume-fd")
            .arg(DEVICE_FD.to_string())
            .env(
                crate::mount::READY_FD_ENV,
                ready_write.as_raw_fd().to_string(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        pass_fds(&mut cmd, &device, Some(ready_write.as_raw_fd()));
        let mut child: Child = cmd.spawn().context("starting a mount daemon")?;
        drop(ready_write);
        let mut msg = String::new();
        let _ = std::fs::File::from(ready_read).read_to_string(&mut msg);
        if msg.starts_with("ok") {
            warn!(
                dead = last,
                new = child.id(),
                ms = started.elapsed().as_secs_f64() * 1000.0,
                "the mount daemon died; a new one took the mount over"
            );
        }
        last = child.id();
        let status = child.wait().context("waiting for the mount daemon")?;
        if !msg.starts_with("ok") && !lazysnap_fuse::connection_gone(&device) {
            failed_starts += 1;
            warn!(%status, message = %msg, failed_starts, "a mount daemon died before serving");
            if failed_starts >= MAX_FAILED_STARTS {
                anyhow::bail!(
                    "{failed_starts} mount daemons in a row died before serving (last: {status}, \
                     {msg}); letting the mount go"
                );
            }
            std::thread::sleep(Duration::from_millis(50 << failed_starts.min(5)));
        } else {
            failed_starts = 0;
        }
    }
}

/// A pipe, both ends close-on-exec: (read end, write end).
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned here.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Blocks until process `pid` has exited (it is not our child: a pidfd tells).
fn wait_for_exit(pid: u32) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        // Already gone.
        return if e.raw_os_error() == Some(libc::ESRCH) {
            Ok(())
        } else {
            Err(e)
        };
    }
    // SAFETY: the fd was just returned to us.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one pollfd for a live fd.
        let n = unsafe { libc::poll(&mut p, 1, -1) };
        if n > 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
