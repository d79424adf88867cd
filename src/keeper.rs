//! The keeper of a mount's FUSE connection: a small process holding a duplicate of
//! the mount daemon's `/dev/fuse` fd. The kernel keeps a connection alive while any process
//! holds its fd, so a daemon that dies (kill -9, OOM, a panic) does not leave a stale mount:
//! requests wait, the keeper starts a new daemon on the same fd (`mount --foreground
//! --resume-fd`), which asks the kernel to resend what the dead one had read and answers the
//! node ids the kernel already holds (a pure function of layer and node, or of the upper entry)
//! and the file handles (which name their file). The keeper exits once the connection is gone
//! (unmounted, or aborted through `/sys/fs/fuse/connections`).
//!
//! An upgrade of a read-only mount starts the new daemon beside the old one (both may answer
//! anything); a writable mount's daemon is asked to hand over first ([`HANDOVER_SIGNAL`]: it
//! finishes the changes in progress and exits), since two daemons must not change one upper.
//!
//! The keeper knows nothing of layers or FUSE requests; the daemon knows nothing of keeping.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
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
pub fn spawn(
    device: OwnedFd,
    daemon_pid: u32,
    writable: bool,
    daemon_args: &[OsString],
) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the lazysnap binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("fuse-keeper")
        .arg("--pid")
        .arg(daemon_pid.to_string());
    if writable {
        cmd.arg("--writable");
    }
    cmd.arg("--")
        .args(daemon_args)
        // What every daemon taking over must number nodes by.
        .arg("--ino-scheme")
        .arg(lazysnap_fuse::INO_SCHEME.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    crate::mount::detach(&mut cmd, Some(&device), None);
    cmd.spawn().context("starting the mount's keeper")?;
    Ok(())
}

/// The signal that asks a keeper to replace its daemon by one started from the binary now at
/// the keeper's path (`lazysnap upgrade`).
pub const UPGRADE_SIGNAL: i32 = libc::SIGUSR1;

/// The signal that asks a daemon with a keeper to hand its mount over: it waits for the changes
/// to the upper in progress, starts no other, and exits without unmounting.
pub const HANDOVER_SIGNAL: i32 = libc::SIGUSR2;

/// How long a writable mount's daemon may take to finish its changes in progress and exit
/// before it is killed (what it had read is resent either way).
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// The daemon being kept: a pid and a pidfd that polls readable once it has exited.
struct Daemon {
    pid: u32,
    exited: OwnedFd,
    /// Set when it is our child (to be reaped); the first daemon started us instead.
    child: Option<Child>,
}

impl Daemon {
    fn watch(pid: u32, child: Option<Child>) -> std::io::Result<Daemon> {
        Ok(Daemon {
            pid,
            exited: pidfd_open(pid)?,
            child,
        })
    }

    /// Waits for it to exit (reaping it when it is ours); returns how, when we know.
    fn wait(&mut self) -> String {
        let _ = poll_readable(&[self.exited.as_raw_fd()], -1);
        match self.child.as_mut().map(|c| c.wait()) {
            Some(Ok(s)) => s.to_string(),
            _ => "exited".to_string(),
        }
    }

    fn kill(&mut self) {
        self.signal(libc::SIGKILL);
    }

    fn signal(&self, sig: i32) {
        // SAFETY: signalling the daemon we keep; a pidfd names it even if it exited meanwhile.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.exited.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }

    /// Asks it to hand the mount over and waits until it exited (killing it after
    /// [`HANDOVER_TIMEOUT`]).
    fn hand_over(&mut self) -> String {
        self.signal(HANDOVER_SIGNAL);
        let ms = i32::try_from(HANDOVER_TIMEOUT.as_millis()).unwrap_or(i32::MAX);
        if !matches!(
            poll_readable(&[self.exited.as_raw_fd()], ms).as_deref(),
            Ok([true])
        ) {
            warn!(
                pid = self.pid,
                "the daemon did not hand over in time; killing it"
            );
            self.kill();
        }
        self.wait()
    }
}

/// The keeper's main: holds fd [`DEVICE_FD`] and the daemon `pid` that started it (not its
/// child). When the daemon dies while the connection lives, it starts a new one on it from
/// `daemon_args`; on [`UPGRADE_SIGNAL`] it starts a new one beside it, and once that serves,
/// kills the old one and has the kernel resend what it had read (both serve the same
/// read-only tree, so either may answer any request). A `writable` mount's daemon hands over
/// first, once the new binary is known to number nodes as the kernel was told.
pub fn run(pid: u32, writable: bool, daemon_args: Vec<OsString>) -> anyhow::Result<()> {
    let _span = info_span!("fuse_keeper", pid).entered();
    // SAFETY: the daemon that started us passed the connection on this fd for our keeping.
    let device = unsafe { OwnedFd::from_raw_fd(DEVICE_FD) };
    // The path, not /proc/self/exe: an upgrade replaces the file there, and new daemons start
    // from what is there then.
    let exe = std::env::current_exe().context("finding the lazysnap binary")?;
    let (upgrades, upgrade_write) = crate::mount::pipe().context("creating a pipe")?;
    signal_hook::low_level::pipe::register(UPGRADE_SIGNAL, upgrade_write)
        .context("installing the upgrade signal")?;
    // Signals aimed at the session (a terminal's ^C) are the daemon's to answer.
    // SAFETY: setting signal dispositions to ignore has no preconditions.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let mut daemon = match Daemon::watch(pid, None) {
        Ok(d) => Some(d),
        // Gone already.
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => None,
        Err(e) => return Err(e).context("watching the mount daemon"),
    };
    let mut failed_starts = 0;
    // Set while the daemon just handed over for an upgrade (not a crash).
    let mut handed_over = false;
    loop {
        if let Some(d) = daemon.as_mut() {
            let ready = poll_readable(&[d.exited.as_raw_fd(), upgrades.as_raw_fd()], -1)
                .context("waiting on the mount daemon")?;
            if ready[1] && writable {
                drain(&upgrades);
                let _s = info_span!("upgrade", old = d.pid).entered();
                match ino_scheme_of(&exe) {
                    Ok(s) if s == lazysnap_fuse::INO_SCHEME => {
                        let how = d.hand_over();
                        info!(pid = d.pid, how, "the mount daemon handed over");
                        handed_over = true;
                        // Started below as after a crash; the kernel resends what it had read.
                    }
                    Ok(s) => {
                        warn!(
                            "upgrade refused: {} numbers nodes by scheme {s}, the kernel holds scheme {} \
                             numbers; the old daemon goes on serving (unmount and mount again to \
                             serve the mount from the new build)",
                            exe.display(),
                            lazysnap_fuse::INO_SCHEME
                        );
                        continue;
                    }
                    Err(e) => {
                        warn!(error = %format!("{e:#}"), "upgrade refused; the old daemon goes on serving");
                        continue;
                    }
                }
            } else if ready[1] {
                drain(&upgrades);
                let _s = info_span!("upgrade", old = d.pid).entered();
                match start_daemon(&exe, &daemon_args, &device) {
                    Ok(new) => {
                        d.kill();
                        d.wait();
                        // What the old one had read and not answered is read by the new one.
                        if let Err(e) = lazysnap_fuse::resend_pending(&device) {
                            warn!(error = %e, "FUSE_NOTIFY_RESEND refused: requests the old daemon had read stay unanswered");
                        }
                        info!(old = d.pid, new = new.pid, "mount daemon upgraded");
                        daemon = Some(new);
                    }
                    Err(e) => {
                        warn!(error = %format!("{e:#}"), "upgrade failed; the old daemon goes on serving")
                    }
                }
                continue;
            } else {
                if !ready[0] {
                    continue;
                }
                let how = d.wait();
                info!(pid = d.pid, how, "the mount daemon ended");
            }
        }
        daemon = None;
        if lazysnap_fuse::connection_gone(&device) {
            info!("the mount is gone; the keeper exits");
            return Ok(());
        }
        match start_daemon(&exe, &daemon_args, &device) {
            Ok(new) if std::mem::take(&mut handed_over) => {
                info!(new = new.pid, "mount daemon upgraded");
                failed_starts = 0;
                daemon = Some(new);
            }
            Ok(new) => {
                warn!(
                    new = new.pid,
                    "the mount daemon died; a new one took the mount over"
                );
                failed_starts = 0;
                daemon = Some(new);
            }
            Err(e) if lazysnap_fuse::connection_gone(&device) => {
                info!(error = %format!("{e:#}"), "the mount is gone; the keeper exits");
                return Ok(());
            }
            Err(e) => {
                failed_starts += 1;
                warn!(error = %format!("{e:#}"), failed_starts, "a mount daemon died before serving");
                if failed_starts >= MAX_FAILED_STARTS {
                    anyhow::bail!(
                        "{failed_starts} mount daemons in a row died before serving; letting the \
                         mount go (last: {e:#})"
                    );
                }
                std::thread::sleep(Duration::from_millis(50 << failed_starts.min(5)));
            }
        }
    }
}

/// The node numbering of the binary at `exe` (`lazysnap fuse-ino-scheme`; a build without it
/// predates handing writable mounts over).
fn ino_scheme_of(exe: &Path) -> anyhow::Result<u32> {
    let out = Command::new(exe)
        .arg("fuse-ino-scheme")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.trim().parse() {
        Ok(s) if out.status.success() => Ok(s),
        _ => anyhow::bail!(
            "{} does not say how it numbers nodes (`fuse-ino-scheme`: {}): too old to take a              writable mount over",
            exe.display(),
            out.status
        ),
    }
}

/// Starts a daemon that takes the connection over and returns once it serves.
fn start_daemon(exe: &Path, daemon_args: &[OsString], device: &OwnedFd) -> anyhow::Result<Daemon> {
    let started = Instant::now();
    let mut cmd = Command::new(exe);
    cmd.args(daemon_args)
        .arg("--resume-fd")
        .arg(DEVICE_FD.to_string());
    let (mut child, msg) = crate::mount::spawn_until_ready(cmd, Some(device))
        .with_context(|| format!("starting {}", exe.display()))?;
    if !msg.starts_with("ok") {
        let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
        anyhow::bail!(
            "the daemon exited ({status}) before serving: {}",
            msg.trim()
        );
    }
    let pid = child.id();
    info!(
        pid,
        ms = started.elapsed().as_secs_f64() * 1000.0,
        "a daemon took the mount over"
    );
    Daemon::watch(pid, Some(child)).context("watching the new daemon")
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the fd was just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Polls `fds` for input (`timeout_ms` -1: until one is ready); which are ready.
fn poll_readable(fds: &[RawFd], timeout_ms: i32) -> std::io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `p` is a live array of pollfds of live fds.
        let n = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
        if n >= 0 {
            return Ok(p.iter().map(|x| x.revents != 0).collect());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Empties the upgrade pipe (signals that came together ask for one upgrade).
fn drain(fd: &OwnedFd) {
    let mut buf = [0u8; 64];
    // SAFETY: reads into a live buffer from a non-blocking-enough pipe: only after poll said
    // it is readable, and one read takes what a burst of signals wrote.
    unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
}

/// One kept mount replaced by `lazysnap upgrade`, or why not (`refused`: its old daemon
/// serves on, `new` is `old`).
#[derive(Debug)]
pub struct Upgraded {
    pub mountpoint: PathBuf,
    pub old: u32,
    pub new: u32,
    pub ms: f64,
    pub refused: Option<String>,
}

/// `lazysnap upgrade`: every kept mount of `root` gets a daemon started from the binary now at
/// its keeper's path, one mount at a time (a read-only mount's old daemon serves until the new
/// one does; a writable one's hands over first). A binary that numbers nodes otherwise than
/// the kernel was told is refused for that mount, whose old daemon serves on.
pub fn upgrade_all(root: &Path) -> anyhow::Result<Vec<Upgraded>> {
    upgrade_where(root, |_| true)
}

/// `serve` at its start: the kept mounts whose daemon runs another binary than this process
/// (an older build, replaced since) are upgraded to this one.
pub fn upgrade_outdated(root: &Path) -> anyhow::Result<Vec<Upgraded>> {
    let Ok(this) = std::fs::metadata("/proc/self/exe") else {
        return Ok(Vec::new());
    };
    upgrade_where(root, |daemon| {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(format!("/proc/{daemon}/exe"))
            .map(|m| (m.dev(), m.ino()) != (this.dev(), this.ino()))
            .unwrap_or(false)
    })
}

fn upgrade_where(root: &Path, outdated: impl Fn(u32) -> bool) -> anyhow::Result<Vec<Upgraded>> {
    let mut done = Vec::new();
    for keeper in keepers_of(root) {
        let _s = info_span!("upgrade", keeper.pid).entered();
        let Some(old) = daemon_of(keeper.pid) else {
            warn!(keeper = keeper.pid, "a keeper without a daemon; skipped");
            continue;
        };
        if !outdated(old) {
            continue;
        }
        let started = Instant::now();
        // The keeper checks this too; asked here, a refusal is told at once, not by a timeout.
        let scheme = ino_scheme_of(&keeper.exe);
        if scheme.as_ref().ok() != Some(&keeper.ino_scheme) {
            let why = match scheme {
                Ok(s) => format!(
                    "{} numbers nodes by scheme {s}, the kernel holds scheme {} numbers; unmount \
                     and mount again to serve it from the new build",
                    keeper.exe.display(),
                    keeper.ino_scheme
                ),
                Err(e) => format!("{e:#}"),
            };
            warn!(mountpoint = %keeper.mountpoint.display(), why, "upgrade refused");
            done.push(Upgraded {
                mountpoint: keeper.mountpoint,
                old,
                new: old,
                ms: 0.0,
                refused: Some(why),
            });
            continue;
        }
        // SAFETY: signalling a keeper of this root (its handler only writes to a pipe).
        if unsafe { libc::kill(keeper.pid as i32, UPGRADE_SIGNAL) } != 0 {
            continue; // gone meanwhile (its mount with it)
        }
        let new = loop {
            match daemon_of(keeper.pid) {
                Some(d) if d != old && !is_alive(old) => break d,
                _ if !is_alive(keeper.pid) => anyhow::bail!(
                    "the keeper of {} exited during the upgrade",
                    keeper.mountpoint.display()
                ),
                _ if started.elapsed() > Duration::from_secs(60) => anyhow::bail!(
                    "no new daemon for {} after 60 s (see the mount log)",
                    keeper.mountpoint.display()
                ),
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        done.push(Upgraded {
            mountpoint: keeper.mountpoint,
            old,
            new,
            ms: started.elapsed().as_secs_f64() * 1000.0,
            refused: None,
        });
    }
    Ok(done)
}

struct KeeperProcess {
    pid: u32,
    mountpoint: PathBuf,
    /// The binary it starts daemons from (its own path, where an upgrade installs).
    exe: PathBuf,
    /// How the kernel's node ids of its mount are numbered (its daemons' `--ino-scheme`).
    ino_scheme: u32,
}

/// The keepers whose daemons serve mounts of `root`.
fn keepers_of(root: &Path) -> Vec<KeeperProcess> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let root = root.as_os_str().as_encoded_bytes();
    let mut out: Vec<KeeperProcess> = procs
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .collect();
            let is_keeper = args.get(1) == Some(&b"fuse-keeper".as_slice());
            let of_root = args.windows(2).any(|w| w[0] == b"--root" && w[1] == root);
            // The daemon's arguments end `DIR --ino-scheme N`.
            let [.., dir, flag, scheme] = args[..] else {
                return None;
            };
            let ino_scheme = std::str::from_utf8(scheme).ok()?.parse().ok()?;
            (is_keeper && of_root && flag == b"--ino-scheme").then(|| KeeperProcess {
                pid,
                mountpoint: PathBuf::from(std::ffi::OsStr::from_bytes(dir)),
                exe: PathBuf::from(std::ffi::OsStr::from_bytes(args[0])),
                ino_scheme,
            })
        })
        .collect();
    out.sort_by_key(|k| k.pid);
    out
}

/// The daemon a keeper keeps: its child, or before its first restart the daemon that started
/// it (its parent).
fn daemon_of(keeper: u32) -> Option<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{keeper}/task/{keeper}/children")).ok()?;
    if let Some(c) = children
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .next()
    {
        return Some(c);
    }
    let stat = std::fs::read_to_string(format!("/proc/{keeper}/stat")).ok()?;
    // pid (comm) state ppid ...: comm may hold spaces, so from the last ')'.
    let ppid: u32 = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{ppid}/cmdline")).ok()?;
    cmdline
        .split(|b| *b == 0)
        .any(|a| a == b"--foreground")
        .then_some(ppid)
}

fn is_alive(pid: u32) -> bool {
    // A zombie has exited: it serves nothing.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s.rsplit_once(')')?.1.split_whitespace().next()? != "Z"))
        .unwrap_or(false)
}
