//! Overlay mode: an active snapshot is the kernel's overlayfs over one read-only lazysnap mount
//! of its parent chain (shared by every snapshot on that chain), with the upper and work
//! directories on the host. This module knows which mode works here, the overlay's mount
//! options and the `mount(2)` calls; the snapshotter decides when to mount what, and
//! [`super::commit`] reads the upper (overlay's whiteouts and opaque markers).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use super::Mount;

/// Who holds an active snapshot's writable layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpperMode {
    /// The kernel's overlayfs over a shared read-only lazysnap mount: writes at kernel speed.
    Overlay,
    /// lazysnap's FUSE mount serves the upper too (a plain user without a user namespace).
    Fuse,
}

impl UpperMode {
    pub fn as_str(self) -> &'static str {
        match self {
            UpperMode::Overlay => "overlay",
            UpperMode::Fuse => "fuse",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<Option<UpperMode>> {
        Ok(match s {
            "auto" => None,
            "overlay" => Some(UpperMode::Overlay),
            "fuse" => Some(UpperMode::Fuse),
            _ => bail!("unknown upper mode {s:?} (auto, overlay or fuse)"),
        })
    }

    /// What works for this process: overlay as root, or in a user namespace on a kernel that
    /// allows it there (5.11, with `userxattr`); FUSE otherwise.
    pub fn detect() -> (UpperMode, &'static str) {
        if lazysnap_fuse::privileged() {
            return (UpperMode::Overlay, "root: kernel overlayfs");
        }
        if lazysnap_fuse::in_user_namespace() && is_root_in_namespace() {
            if kernel_at_least(5, 11) {
                return (
                    UpperMode::Overlay,
                    "user namespace, kernel >= 5.11: overlayfs with userxattr",
                );
            }
            return (
                UpperMode::Fuse,
                "user namespace on a kernel before 5.11 (no unprivileged overlayfs): FUSE upper",
            );
        }
        (
            UpperMode::Fuse,
            "unprivileged, no user namespace (the kernel mounts no overlayfs): FUSE upper",
        )
    }
}

fn is_root_in_namespace() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// True when the running kernel is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (a, b) >= (major, minor)
}

/// The overlay's own xattr namespace on this host: `trusted.overlay.` as root,
/// `user.overlay.` (the `userxattr` option) in a user namespace.
pub fn uses_userxattr() -> bool {
    !lazysnap_fuse::privileged()
}

/// The mounts of an overlay-mode snapshot: an `overlay` over `lower` (no index or metacopy;
/// as root `redirect_dir=on`, so a directory of the lower can be renamed — containerd 2.x's
/// conformance suite renames one for every snapshotter but overlayfs, fuse-overlayfs and
/// erofs —, commit writing a renamed directory out whole from the lower), or a bind of the
/// upper when there is no lower.
pub fn mounts(lower: Option<&Path>, upper: &Path, work: &Path, readonly: bool) -> Vec<Mount> {
    let Some(lower) = lower else {
        return vec![bind(upper, readonly)];
    };
    if readonly {
        return vec![bind(lower, true)];
    }
    let mut options = vec!["index=off".to_string(), "metacopy=off".into()];
    if uses_userxattr() {
        // `userxattr` refuses `redirect_dir=off` (which still follows redirects); `nofollow`
        // neither makes nor follows them.
        options.push("redirect_dir=nofollow".into());
        options.push("userxattr".into());
    } else {
        options.push("redirect_dir=on".into());
    }
    options.push(format!("workdir={}", work.display()));
    options.push(format!("upperdir={}", upper.display()));
    options.push(format!("lowerdir={}", lower.display()));
    vec![Mount {
        kind: "overlay".into(),
        source: "overlay".into(),
        options,
    }]
}

pub fn bind(dir: &Path, readonly: bool) -> Mount {
    Mount {
        kind: "bind".into(),
        source: dir.display().to_string(),
        options: vec!["rbind".into(), if readonly { "ro" } else { "rw" }.into()],
    }
}

fn cstr(p: &Path) -> anyhow::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).context("path with a NUL byte")
}

/// Mounts `m` (an `overlay` or a `bind`) at `target`, as containerd would.
pub fn mount(m: &Mount, target: &Path) -> anyhow::Result<()> {
    let t = cstr(target)?;
    let call =
        |source: &CString, fstype: &CString, flags: libc::c_ulong, data: Option<&CString>| {
            // SAFETY: valid C strings that outlive the call.
            let rc = unsafe {
                libc::mount(
                    source.as_ptr(),
                    t.as_ptr(),
                    fstype.as_ptr(),
                    flags,
                    data.map_or(std::ptr::null(), |d| d.as_ptr().cast()),
                )
            };
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        };
    match m.kind.as_str() {
        "overlay" => {
            let data = CString::new(m.options.join(","))?;
            call(
                &CString::new("overlay")?,
                &CString::new("overlay")?,
                0,
                Some(&data),
            )
            .with_context(|| {
                format!(
                    "mounting overlay at {} ({})",
                    target.display(),
                    m.options.join(",")
                )
            })
        }
        "bind" => {
            let source = cstr(Path::new(&m.source))?;
            let none = CString::new("none")?;
            call(&source, &none, libc::MS_BIND | libc::MS_REC, None)
                .with_context(|| format!("binding {} at {}", m.source, target.display()))?;
            if m.options.iter().any(|o| o == "ro") {
                call(
                    &none,
                    &none,
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                    None,
                )
                .with_context(|| format!("making {} read-only", target.display()))?;
            }
            Ok(())
        }
        other => bail!("cannot mount a {other:?} mount"),
    }
}

/// Where the shared read-only mount of `chain` lives under the root.
pub fn lower_mountpoint(root: &Path, chain: &str) -> PathBuf {
    let hex = chain.strip_prefix("sha256:").unwrap_or(chain);
    root.join("lowers").join(hex)
}

/// The chain ID a lower mountpoint stands for (its directory name).
pub fn chain_of_lower(dir: &Path) -> Option<String> {
    let name = dir.file_name()?.to_str()?;
    (name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| format!("sha256:{name}"))
}

/// Serializes mounting and releasing shared lowers across processes (the CLI and `serve` may
/// share a root): an exclusive `flock` on `lowers/.lock`, released on drop.
pub fn lock_lowers(root: &Path) -> anyhow::Result<crate::root::StoreLock> {
    let dir = root.join("lowers");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::root::lock_file(&dir.join(".lock"), libc::LOCK_EX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_options_name_a_plain_diff_upper() {
        let m = mounts(
            Some(Path::new("/r/lowers/ab")),
            Path::new("/r/s/1/upper"),
            Path::new("/r/s/1/work"),
            false,
        );
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].kind, "overlay");
        for o in [
            "index=off",
            "redirect_dir=on",
            "metacopy=off",
            "lowerdir=/r/lowers/ab",
        ] {
            assert!(
                m[0].options.iter().any(|x| x == o),
                "{o}: {:?}",
                m[0].options
            );
        }
        let v = mounts(
            Some(Path::new("/l")),
            Path::new("/u"),
            Path::new("/w"),
            true,
        );
        assert_eq!(v, vec![bind(Path::new("/l"), true)]);
        let e = mounts(None, Path::new("/u"), Path::new("/w"), false);
        assert_eq!(e, vec![bind(Path::new("/u"), false)]);
    }

    #[test]
    fn lower_dirs_name_their_chain() {
        let c = format!("sha256:{}", "ab".repeat(32));
        let d = lower_mountpoint(Path::new("/r"), &c);
        assert_eq!(chain_of_lower(&d), Some(c));
        assert_eq!(chain_of_lower(Path::new("/r/lowers/.lock")), None);
    }
}
