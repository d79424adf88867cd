//! `mount`: serve an image's (or committed snapshot's) merged root filesystem at a directory.
//! The daemon form re-executes the binary in the foreground form, detached, and waits on a
//! pipe until the mount is ready (or failed), so `lazysnap mount` returns a usable mount.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context as _};
use lazysnap_fuse::{MountOptions, Owners};
use tracing::{info, warn};

use crate::blob::SpanCache;
use crate::layer::open_stack;
use crate::root::Root;

/// Env var naming the fd the foreground child reports readiness on.
pub(crate) const READY_FD_ENV: &str = "LAZYSNAP_READY_FD";

pub struct MountRequest {
    /// Image name, or the key of a committed snapshot / chain ID; with `snapshot`, the key of
    /// an active snapshot or view.
    pub target: String,
    pub snapshot: bool,
    pub dir: PathBuf,
    pub cache_bytes: u64,
    pub threads: Option<usize>,
    /// Whose ids the mount shows.
    pub owners: Owners,
    /// Take over the live mount at `dir` whose `/dev/fuse` connection is this fd (passed by
    /// the mount's keeper, [`crate::keeper`]) instead of mounting.
    pub resume_fd: Option<i32>,
    /// With `resume_fd`: the [`lazysnap_fuse::INO_SCHEME`] of the daemon that mounted `dir`.
    pub ino_scheme: Option<u32>,
}

/// Env var that, set to `0`, mounts without a keeper (a dead daemon then leaves a stale mount).
pub const KEEPER_ENV: &str = "LAZYSNAP_FUSE_KEEPER";

/// The chain ID to mount for `target`: an image's top chain, or a committed snapshot's.
pub fn resolve_chain(root: &Root, target: &str) -> anyhow::Result<String> {
    if let Some(img) = root.meta.image(target)? {
        return img
            .chain_id
            .with_context(|| format!("image {target} has no layers to mount"));
    }
    if root.meta.chain(target)?.is_some() {
        return Ok(target.to_string());
    }
    let names = root.meta.image_names()?;
    bail!(
        "no image or committed snapshot named {target:?} (images: {})",
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    )
}

/// Checks the mountpoint: a stale mount of a dead daemon is cleaned (with a message); a live
/// mount is an error.
pub fn prepare_mountpoint(dir: &Path) -> anyhow::Result<()> {
    if lazysnap_fuse::is_stale_mount(dir) {
        eprintln!(
            "lazysnap: {} held a stale mount of a daemon that is gone; unmounting it",
            dir.display()
        );
        lazysnap_fuse::unmount(dir)
            .with_context(|| format!("cleaning the stale mount at {}", dir.display()))?;
    }
    let md = std::fs::metadata(dir)
        .with_context(|| format!("mountpoint {} does not exist", dir.display()))?;
    if !md.is_dir() {
        bail!("mountpoint {} is not a directory", dir.display());
    }
    if lazysnap_fuse::is_mountpoint(dir) {
        bail!(
            "{} is already a mount point (lazysnap umount {} first)",
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

/// Allocations from this size up get their own mapping, returned to the kernel when freed.
/// glibc's default starts here too but raises the threshold after each free of a big block (up
/// to 32 MiB), after which freed span buffers (1-4 MiB, decompressed by 16 workers) stay in the
/// threads' arenas: a read of every file left 82 MiB anonymous memory with an 8 MiB span cache
/// (45 MiB with two arenas). With the threshold fixed it is 12 MiB: the cache and 4 MiB.
const MMAP_THRESHOLD: libc::c_int = 128 << 10;

fn fix_malloc_mmap_threshold() {
    // SAFETY: mallopt only sets a glibc tunable.
    if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) } != 1 {
        tracing::debug!("mallopt(M_MMAP_THRESHOLD) refused; malloc keeps its dynamic threshold");
    }
}

/// Mounts in this process and serves until unmounted or signalled (SIGINT/SIGTERM unmount).
pub fn run_foreground(root: Root, req: &MountRequest) -> anyhow::Result<()> {
    let start = Instant::now();
    fix_malloc_mmap_threshold();
    // Before the mount appears: a signal that arrives while mounting is then held and
    // answered (unmount, exit 0) instead of killing the process with a live mount behind it.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
        crate::keeper::HANDOVER_SIGNAL,
    ])
    .context("installing signal handlers")?;
    let ready_fd = take_ready_fd();
    let result = (|| {
        // A mount being taken over is live (and nothing here may touch it: no daemon serves it).
        match (req.resume_fd, req.ino_scheme) {
            (None, _) => prepare_mountpoint(&req.dir)?,
            (Some(_), Some(s)) if s == lazysnap_fuse::INO_SCHEME => {}
            (Some(_), s) => bail!(
                "cannot take over {}: the kernel holds node ids numbered by scheme {} (the build \
                 that mounted it), this build numbers them by scheme {}; unmount and mount again \
                 to serve it from this build",
                req.dir.display(),
                s.map_or("unknown".to_string(), |s| s.to_string()),
                lazysnap_fuse::INO_SCHEME
            ),
        }
        let (chain, upper) = if req.snapshot {
            let spec = crate::snapshot::spec_for(&root, &req.target)?;
            (spec.chain_id, spec.upper)
        } else {
            (Some(resolve_chain(&root, &req.target)?), None)
        };
        let cache = SpanCache::new(req.cache_bytes);
        let stack = match &chain {
            Some(chain) => open_stack(&root, chain, cache)?,
            None => Vec::new(),
        };
        drop(root);
        let mut opts = MountOptions {
            fsname: format!("lazysnap:{}", short(&req.target)),
            upper,
            owners: req.owners,
            ..MountOptions::default()
        };
        if let Some(t) = req.threads {
            opts.threads = t.max(1);
        }
        opts.recoverable = std::env::var_os(KEEPER_ENV).is_none_or(|v| v != "0");
        if let Some(fd) = req.resume_fd {
            // SAFETY: the keeper passed us the connection on this fd.
            let device = unsafe { OwnedFd::from_raw_fd(fd) };
            let handle = lazysnap_fuse::serve_taken_over(stack, device, &req.dir, &opts)
                .with_context(|| format!("taking over the mount at {}", req.dir.display()))?;
            return anyhow::Ok((handle, true));
        }
        let writable = opts.upper.is_some();
        let mut handle = lazysnap_fuse::mount(stack, &req.dir, &opts)
            .with_context(|| format!("mounting at {}", req.dir.display()))?;
        let mut kept = false;
        if let Some(device) = handle.take_device_fd() {
            let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
            match crate::keeper::spawn(device, std::process::id(), writable, &args) {
                Ok(()) => kept = true,
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "no keeper for the mount: a crash of this daemon will leave it stale")
                }
            }
        }
        anyhow::Ok((handle, kept))
    })();
    let (handle, kept) = match result {
        Ok(h) => h,
        Err(e) => {
            if let Some(mut fd) = ready_fd {
                let _ = write!(fd, "error: {e:#}");
            }
            return Err(e);
        }
    };
    let elapsed = start.elapsed();
    info!(dir = %req.dir.display(), ms = elapsed.as_secs_f64() * 1000.0, "mounted");
    match ready_fd {
        Some(mut fd) => {
            let _ = write!(fd, "ok {}", elapsed.as_micros());
        }
        None => eprintln!(
            "mounted {} at {} in {:.1} ms (Ctrl-C unmounts)",
            req.target,
            req.dir.display(),
            elapsed.as_secs_f64() * 1000.0
        ),
    }
    let dir = req.dir.clone();
    let gate = handle.gate();
    std::thread::spawn(move || {
        for sig in signals.forever() {
            if sig == crate::keeper::HANDOVER_SIGNAL {
                if !kept {
                    warn!("asked to hand the mount over, but no keeper holds it: serving on");
                    continue;
                }
                // The keeper holds the connection and starts the successor once we are gone;
                // what we read and do not answer, the kernel resends to it.
                info!("handing the mount over: waiting for the changes in progress");
                gate.close();
                info!("handed over; exiting without unmounting");
                // SAFETY: ends the process at once, without unmounting in destructors.
                unsafe { libc::_exit(0) };
            }
            info!(signal = sig, "unmounting on signal");
            if let Err(e) = lazysnap_fuse::unmount(&dir) {
                warn!(error = %e, "unmount on signal failed");
            }
            break;
        }
    });
    handle.join().context("serving the mount")?;
    Ok(())
}

fn short(s: &str) -> String {
    s.chars().take(48).collect()
}

fn take_ready_fd() -> Option<std::fs::File> {
    let fd: i32 = std::env::var(READY_FD_ENV).ok()?.parse().ok()?;
    std::env::remove_var(READY_FD_ENV);
    // SAFETY: the parent passed us this fd for our exclusive use.
    let file = unsafe { std::fs::File::from(OwnedFd::from_raw_fd(fd)) };
    // Not inherited by the keeper: the parent waits for the pipe's end.
    // SAFETY: fcntl on an fd we own.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Some(file)
}

/// Starts a detached daemon serving the mount; returns once it is ready, with the time the
/// mount took.
pub fn spawn_daemon(root_path: &Path, req: &MountRequest, log: &Path) -> anyhow::Result<f64> {
    let exe = std::env::current_exe().context("finding the lazysnap binary")?;
    let logfile = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log {}", log.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--root")
        .arg(root_path)
        .arg("mount")
        .arg("--foreground")
        .arg("--cache-size")
        .arg(req.cache_bytes.to_string())
        .args(req.snapshot.then_some("--snapshot"))
        .arg(&req.target)
        .arg(&req.dir)
        .stderr(logfile);
    if let Some(t) = req.threads {
        cmd.arg("--threads").arg(t.to_string());
    }
    if let Owners::Squash { .. } = req.owners {
        // The daemon runs as this user: squashing to its own ids is the same.
        cmd.arg("--owners").arg("caller");
    }
    let (mut child, msg) = spawn_until_ready(cmd, None).context("starting the mount daemon")?;
    if let Some(us) = msg.strip_prefix("ok ") {
        return Ok(us.trim().parse::<f64>().unwrap_or(0.0) / 1000.0);
    }
    let status = child.wait().ok();
    if let Some(err) = msg.strip_prefix("error: ") {
        bail!("{err}");
    }
    bail!(
        "the mount daemon exited ({}) before the mount was ready; see {}",
        status.map(|s| s.to_string()).unwrap_or_default(),
        log.display()
    )
}

/// Starts `cmd` (a mount daemon) detached ([`detach`]), with `device` as its fd
/// [`crate::keeper::DEVICE_FD`] when given, and waits on its readiness pipe: returns the child
/// and what it reported (`ok <µs>` or `error: <why>`; empty when it died before either).
pub(crate) fn spawn_until_ready(
    mut cmd: Command,
    device: Option<&OwnedFd>,
) -> anyhow::Result<(std::process::Child, String)> {
    let (read_end, write_end) = pipe().context("creating a pipe")?;
    cmd.env(READY_FD_ENV, write_end.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    detach(&mut cmd, device, Some(write_end.as_raw_fd()));
    let child = cmd.spawn()?;
    drop(write_end);
    let mut msg = String::new();
    std::fs::File::from(read_end)
        .read_to_string(&mut msg)
        .context("waiting for the mount daemon")?;
    Ok((child, msg))
}

/// Makes `cmd` start in a session of its own with `/` as its working directory (a daemon must
/// not hold a directory busy, nor die with its caller's terminal), keeping `keep` open across
/// exec and passing `device` as fd [`crate::keeper::DEVICE_FD`].
pub(crate) fn detach(cmd: &mut Command, device: Option<&OwnedFd>, keep: Option<i32>) {
    let device = device.map(|d| d.as_raw_fd());
    let target = crate::keeper::DEVICE_FD;
    // SAFETY: only async-signal-safe calls (setsid, chdir, fcntl, dup2) between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            let inherit = |fd: i32| {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            };
            libc::setsid();
            libc::chdir(c"/".as_ptr());
            if let Some(fd) = keep {
                inherit(fd);
            }
            if let Some(fd) = device {
                if fd == target {
                    inherit(fd);
                } else if libc::dup2(fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// A pipe, both ends close-on-exec: (read end, write end).
pub(crate) fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned here.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The default span cache of a mount daemon. The kernel's page cache holds the file data a
/// mount has served (keep_cache), so the span cache only carries decompressed spans between
/// reads: measured on the bench's 341 MiB / 15k-entry images, 64M reads all within 1-7% of
/// 256M (32M: +21-23% on gzip), at a third of its RSS. Random reads over a file larger than
/// the cache decompress one span each: give such images `--cache-size` at least the file.
pub const DEFAULT_CACHE_SIZE: &str = "64M";
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;

/// Parses sizes like `512M`, `2G`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = s[i..].to_ascii_lowercase();
            let mult: u64 = match unit.trim_end_matches("ib").trim_end_matches('b') {
                "" => 1,
                "k" => 1 << 10,
                "m" => 1 << 20,
                "g" => 1 << 30,
                "t" => 1 << 40,
                _ => return Err(format!("unknown size unit in {s:?}")),
            };
            (&s[..i], mult)
        }
        None => (s, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid size {s:?}"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} too large"))
}

/// A default log location for a mount daemon.
pub fn daemon_log(root: &Path) -> PathBuf {
    root.join("logs").join("mount.log")
}

/// Serves snapshot filesystems with one detached `lazysnap mount --foreground --snapshot`
/// daemon each (the CLI's mounter; `serve` mounts in its own process instead).
pub struct DaemonMounter {
    pub root_path: PathBuf,
    pub cache_bytes: u64,
    pub threads: Option<usize>,
    pub owners: Owners,
}

impl crate::snapshot::Mounter for DaemonMounter {
    fn mount(&self, _root: &Root, spec: &crate::snapshot::MountSpec) -> anyhow::Result<()> {
        std::fs::create_dir_all(&spec.mountpoint)
            .with_context(|| format!("creating {}", spec.mountpoint.display()))?;
        let req = MountRequest {
            target: spec.key.clone(),
            // A shared lower is a chain served read-only, as the image's ids.
            snapshot: !spec.shared_lower,
            dir: spec.mountpoint.clone(),
            cache_bytes: self.cache_bytes,
            threads: self.threads,
            owners: if spec.shared_lower {
                Owners::Image
            } else {
                self.owners
            },
            resume_fd: None,
            ino_scheme: None,
        };
        let log = daemon_log(&self.root_path);
        if let Some(parent) = log.parent() {
            std::fs::create_dir_all(parent)?;
        }
        spawn_daemon(&self.root_path, &req, &log)?;
        Ok(())
    }

    fn unmount(&self, mountpoint: &Path) -> anyhow::Result<()> {
        lazysnap_fuse::unmount(mountpoint)
            .with_context(|| format!("unmounting {}", mountpoint.display()))?;
        Ok(())
    }

    fn is_mounted(&self, mountpoint: &Path) -> bool {
        lazysnap_fuse::is_mountpoint(mountpoint) && !lazysnap_fuse::is_stale_mount(mountpoint)
    }
}
