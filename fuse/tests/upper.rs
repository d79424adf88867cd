//! The writable upper directory through a real FUSE mount: each operation's merged view and
//! upper contents, a randomized comparison with the same operations on a real directory, and
//! "commit equivalence" (the upper applied as an OCI layer over the lower ones gives the
//! mounted tree).
//!
//! These need `/dev/fuse` and root; without them they are skipped, except under `CI=true`.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lazysnap_fuse::mem::{MemLayer, MemLayerBuilder};
use lazysnap_fuse::reference::apply_layers;
use lazysnap_fuse::{
    mount, read_override, LayerStack, LayerTree, MountHandle, MountOptions, NodeKind, Timestamp,
};

fn usable() -> bool {
    let ok = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_ok()
        // SAFETY: no preconditions.
        && unsafe { libc::geteuid() } == 0;
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "FUSE as root is not available here and CI=true: failing"
        );
        eprintln!("skipping: needs /dev/fuse and root");
    }
    ok
}

struct Mounted {
    handle: Option<MountHandle>,
    mnt: PathBuf,
    upper: PathBuf,
    dir: tempfile::TempDir,
}

impl Mounted {
    fn new(layers: &[MemLayer], xattr_owner: bool) -> Mounted {
        let dir = tempfile::tempdir().expect("tempdir");
        let mnt = dir.path().join("mnt");
        let upper = dir.path().join("upper");
        fs::create_dir(&mnt).expect("mkdir");
        fs::create_dir(&upper).expect("mkdir");
        Self::with_upper(layers, dir, mnt, upper, xattr_owner)
    }

    fn with_upper(
        layers: &[MemLayer],
        dir: tempfile::TempDir,
        mnt: PathBuf,
        upper: PathBuf,
        xattr_owner: bool,
    ) -> Mounted {
        let opts = MountOptions {
            fsname: "lazysnap-upper-test".into(),
            upper: Some(upper.clone()),
            record_ownership_in_xattr: xattr_owner,
            ..MountOptions::default()
        };
        let handle = mount(stack(layers), &mnt, &opts).expect("mount");
        Mounted {
            handle: Some(handle),
            mnt,
            upper,
            dir,
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    fn u(&self, rel: &str) -> PathBuf {
        self.upper.join(rel)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            if let Err(e) = h.unmount() {
                eprintln!("unmount failed: {e}");
            }
        }
    }
}

fn stack(layers: &[MemLayer]) -> LayerStack {
    layers
        .iter()
        .map(|l| Arc::new(l.clone()) as Arc<dyn LayerTree>)
        .collect()
}

fn layer(f: impl FnOnce(&mut MemLayerBuilder)) -> MemLayer {
    let mut b = MemLayer::builder();
    f(&mut b);
    b.build()
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path")
}

fn errno_of(rc: i32) -> Result<(), i32> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error().raw_os_error().unwrap_or(-1))
    }
}

fn lxattrs(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let cp = c(path);
    let mut names = vec![0u8; 4096];
    // SAFETY: buffer writable for its length.
    let n = unsafe { libc::llistxattr(cp.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(
        n >= 0,
        "llistxattr {path:?}: {}",
        io::Error::last_os_error()
    );
    names.truncate(n as usize);
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = names
        .split(|b| *b == 0)
        // The number a copy-up records for a daemon taking the mount over is the mount's own.
        .filter(|n| {
            !n.is_empty()
                && !n.starts_with(b"security.")
                && *n != lazysnap_fuse::ownership::INO_XATTR
        })
        .map(|name| {
            let cn = CString::new(name).expect("name");
            let mut v = vec![0u8; 65536];
            // SAFETY: buffer writable for its length.
            let got = unsafe {
                libc::lgetxattr(cp.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len())
            };
            assert!(got >= 0, "lgetxattr {path:?}");
            v.truncate(got as usize);
            (name.to_vec(), v)
        })
        .collect();
    out.sort();
    out
}

fn lsetxattr(path: &Path, name: &str, value: &[u8]) -> Result<(), i32> {
    let n = CString::new(name).expect("name");
    // SAFETY: valid strings and buffer.
    errno_of(unsafe {
        libc::lsetxattr(
            c(path).as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
}

fn lchown(path: &Path, uid: u32, gid: u32) -> Result<(), i32> {
    // SAFETY: valid string.
    errno_of(unsafe { libc::lchown(c(path).as_ptr(), uid, gid) })
}

fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn base_layers() -> Vec<MemLayer> {
    let l0 = layer(|b| {
        b.dir("etc", 0o755).owner(0, 0).mtime(1_600_000_000, 5);
        b.file("etc/passwd", 0o644, b"root:x:0:0\n")
            .owner(0, 0)
            .mtime(1_600_000_001, 7);
        b.file("etc/shadow", 0o640, b"root:*\n").owner(0, 42);
        b.dir("usr/bin", 0o751).owner(3, 4).mtime(1_500_000_000, 9);
        b.file("usr/bin/ping", 0o4755, b"\x7fELF ping")
            .owner(0, 0)
            .xattr(b"user.cap", b"\x01\x00bin")
            .xattr(b"trusted.note", b"text")
            .mtime(1_400_000_000, 123_456_789);
        b.file("usr/bin/python3", 0o755, b"\x7fELF python");
        b.hardlink("usr/bin/python", "usr/bin/python3");
        b.hardlink("usr/lib/python-link", "usr/bin/python3");
        b.symlink("usr/bin/sh", "dash");
        b.special("dev/null", NodeKind::CharDev, 0o666, libc::makedev(1, 3));
        b.special("run/fifo", NodeKind::Fifo, 0o644, 0);
        b.file("var/cache/a", 0o644, b"cache a");
        b.file("var/cache/b", 0o644, b"cache b");
        b.file("srv/tree/x/y", 0o644, b"y");
        b.file("srv/tree/x/z", 0o600, b"z").owner(7, 8);
        b.dir("srv/empty", 0o700);
        b.file("data/sparse", 0o644, b"head").sparse_size(64 << 20);
        b.dir("tmp", 0o1777);
    });
    let l1 = layer(|b| {
        b.whiteout("var/cache/a");
        b.file("etc/passwd", 0o644, b"root:x:0:0\nuser:x:1000:1000\n")
            .mtime(1_700_000_001, 42);
        b.opaque("srv/tree/x");
        b.file("srv/tree/x/w", 0o644, b"w over opaque");
        b.file("home/user/.profile", 0o644, b"PS1=$\n")
            .owner(1000, 1000);
    });
    let l2 = layer(|b| {
        b.file("usr/bin/new", 0o755, b"\x7fELF new");
        b.file("var/cache/c", 0o644, b"cache c");
    });
    vec![l0, l1, l2]
}

#[test]
fn copy_up_on_write_keeps_metadata_and_parents() {
    if !usable() {
        return;
    }
    let m = Mounted::new(&base_layers(), false);
    let before = fs::symlink_metadata(m.p("usr/bin")).expect("stat");
    let ping_ino = fs::symlink_metadata(m.p("usr/bin/ping"))
        .expect("stat")
        .ino();
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(m.p("usr/bin/ping"))
        .expect("open for write");
    f.write_all(b" more").expect("write");
    drop(f);
    assert_eq!(
        fs::read(m.p("usr/bin/ping")).expect("read"),
        b"\x7fELF ping more"
    );
    // Inode numbers stay.
    assert_eq!(
        fs::symlink_metadata(m.p("usr/bin/ping"))
            .expect("stat")
            .ino(),
        ping_ino
    );
    // The upper copy: data, mode (setuid), owner, xattrs.
    let up = fs::symlink_metadata(m.u("usr/bin/ping")).expect("upper copy");
    assert_eq!(up.mode() & 0o7777, 0o4755);
    assert_eq!((up.uid(), up.gid()), (0, 0));
    assert_eq!(
        fs::read(m.u("usr/bin/ping")).expect("read"),
        b"\x7fELF ping more"
    );
    let xs = lxattrs(&m.u("usr/bin/ping"));
    assert!(
        xs.contains(&(b"user.cap".to_vec(), b"\x01\x00bin".to_vec())),
        "{xs:?}"
    );
    assert!(
        xs.contains(&(b"trusted.note".to_vec(), b"text".to_vec())),
        "{xs:?}"
    );
    // The parent was copied with its own mode, owner and times.
    let ud = fs::symlink_metadata(m.u("usr/bin")).expect("upper dir");
    assert_eq!(ud.mode() & 0o7777, 0o751);
    assert_eq!((ud.uid(), ud.gid()), (3, 4));
    assert_eq!((ud.mtime(), ud.mtime_nsec()), (1_500_000_000, 9));
    let after = fs::symlink_metadata(m.p("usr/bin")).expect("stat");
    assert_eq!(before.mtime(), after.mtime());
    // Only what was needed went up.
    assert_eq!(names(&m.upper), set(&["usr"]));
    assert_eq!(names(&m.u("usr")), set(&["bin"]));
    assert_eq!(names(&m.u("usr/bin")), set(&["ping"]));

    // chmod/chown/utimens of a lower file copy it up with its times.
    fs::set_permissions(m.p("etc/shadow"), fs::Permissions::from_mode(0o600)).expect("chmod");
    lchown(&m.p("etc/shadow"), 5, 6).expect("chown");
    let s = fs::symlink_metadata(m.u("etc/shadow")).expect("copied");
    assert_eq!((s.mode() & 0o7777, s.uid(), s.gid()), (0o600, 5, 6));
    assert_eq!(fs::read(m.u("etc/shadow")).expect("read"), b"root:*\n");
    let e = fs::symlink_metadata(m.u("etc")).expect("etc");
    assert_eq!((e.mtime(), e.mtime_nsec()), (1_600_000_000, 5));
    // O_TRUNC copies up to an empty file.
    fs::write(m.p("etc/passwd"), b"new").expect("truncate+write");
    assert_eq!(fs::read(m.u("etc/passwd")).expect("read"), b"new");
    // setxattr/removexattr copy up.
    lsetxattr(&m.p("var/cache/b"), "user.k", b"v").expect("setxattr");
    assert_eq!(
        lxattrs(&m.u("var/cache/b")),
        vec![(b"user.k".to_vec(), b"v".to_vec())]
    );
    // utimens with explicit and "now" times.
    let t = libc::timespec {
        tv_sec: 1_234_567_890,
        tv_nsec: 42,
    };
    let now = libc::timespec {
        tv_sec: 0,
        tv_nsec: libc::UTIME_NOW,
    };
    // SAFETY: valid path and two timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c(&m.p("var/cache/c")).as_ptr(),
            [now, t].as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(rc, 0);
    let cc = fs::symlink_metadata(m.p("var/cache/c")).expect("stat");
    assert_eq!((cc.mtime(), cc.mtime_nsec()), (1_234_567_890, 42));
    assert!(cc.atime() > 1_700_000_000);
    // A read-only open of a lower file does not copy up.
    assert_eq!(fs::read(m.p("var/cache/b")).expect("read"), b"cache b");
    assert!(!m.u("usr/bin/new").exists());
    fs::read(m.p("usr/bin/new")).expect("read");
    assert!(!m.u("usr/bin/new").exists());
}

#[test]
fn reader_sees_writes_after_copy_up() {
    if !usable() {
        return;
    }
    let m = Mounted::new(&base_layers(), false);
    let mut reader = fs::File::open(m.p("var/cache/b")).expect("open ro");
    fs::write(m.p("var/cache/b"), b"changed").expect("write");
    let mut s = String::new();
    io::Read::read_to_string(&mut reader, &mut s).expect("read");
    assert_eq!(s, "changed");
}

#[test]
fn unlink_rmdir_whiteouts_and_opaque_dirs() {
    if !usable() {
        return;
    }
    let m = Mounted::new(&base_layers(), false);
    fs::remove_file(m.p("var/cache/b")).expect("unlink lower");
    assert_eq!(names(&m.p("var/cache")), set(&["c"]));
    assert!(fs::symlink_metadata(m.u("var/cache/.wh.b"))
        .expect("whiteout")
        .is_file());
    assert_eq!(
        fs::symlink_metadata(m.u("var/cache/.wh.b"))
            .expect("wh")
            .len(),
        0
    );
    // An upper-only file leaves no whiteout.
    fs::write(m.p("var/cache/new"), b"n").expect("create");
    fs::remove_file(m.p("var/cache/new")).expect("unlink upper");
    assert_eq!(names(&m.u("var/cache")), set(&[".wh.b"]));
    // rmdir: non-empty refused, empty lower dir whited out.
    let e = fs::remove_dir(m.p("srv/tree/x")).expect_err("not empty");
    assert_eq!(e.raw_os_error(), Some(libc::ENOTEMPTY));
    fs::remove_dir(m.p("srv/empty")).expect("rmdir");
    assert!(m.u("srv/.wh.empty").is_file());
    // A directory emptied through whiteouts can be removed, leaving only a whiteout.
    fs::remove_file(m.p("srv/tree/x/w")).expect("unlink");
    fs::remove_dir(m.p("srv/tree/x")).expect("rmdir emptied");
    assert_eq!(names(&m.u("srv/tree")), set(&[".wh.x"]));
    assert_eq!(names(&m.p("srv/tree")), set(&[]));
    // mkdir over a whiteout: opaque, nothing of the old content shows.
    fs::create_dir(m.p("srv/tree/x")).expect("mkdir over whiteout");
    assert_eq!(names(&m.p("srv/tree/x")), set(&[]));
    assert_eq!(names(&m.u("srv/tree")), set(&["x"]));
    assert_eq!(names(&m.u("srv/tree/x")), set(&[".wh..wh..opq"]));
    // A new directory where nothing was below needs no marker.
    fs::create_dir(m.p("srv/fresh")).expect("mkdir");
    assert_eq!(names(&m.u("srv/fresh")), set(&[]));
    // rm -rf of a merged tree.
    fs::remove_dir_all(m.p("usr")).expect("rm -rf usr");
    assert!(!m.p("usr").exists());
    assert!(m.u(".wh.usr").is_file());
    // Names OCI layers cannot carry are refused.
    for bad in [".wh.foo", ".wh..wh..opq"] {
        let e = fs::write(m.p(bad), b"x").expect_err("reserved name");
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{bad}");
        let e = fs::create_dir(m.p(bad)).expect_err("reserved name");
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{bad}");
    }
    let e = fs::rename(m.p("etc/passwd"), m.p("etc/.wh.passwd")).expect_err("reserved");
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    // The upper's whiteouts never show.
    assert!(!names(&m.p("var/cache"))
        .iter()
        .any(|n| n.starts_with(".wh.")));
}

#[test]
fn rename_files_and_lower_directories() {
    if !usable() {
        return;
    }
    let m = Mounted::new(&base_layers(), false);
    let ino = fs::symlink_metadata(m.p("srv/tree")).expect("stat").ino();
    fs::rename(m.p("srv/tree"), m.p("moved")).expect("rename lower dir");
    assert_eq!(fs::symlink_metadata(m.p("moved")).expect("stat").ino(), ino);
    assert!(!m.p("srv/tree").exists());
    assert_eq!(names(&m.p("moved/x")), set(&["w"]));
    assert_eq!(fs::read(m.p("moved/x/w")).expect("read"), b"w over opaque");
    assert!(m.u("srv/.wh.tree").is_file());
    assert!(m.u("moved/.wh..wh..opq").is_file());
    assert_eq!(
        fs::read(m.u("moved/x/w")).expect("copied"),
        b"w over opaque"
    );
    // File rename over an existing lower file.
    fs::rename(m.p("etc/shadow"), m.p("etc/passwd")).expect("rename over");
    assert_eq!(fs::read(m.p("etc/passwd")).expect("read"), b"root:*\n");
    assert_eq!(names(&m.p("etc")), set(&["passwd"]));
    assert_eq!(names(&m.u("etc")), set(&["passwd", ".wh.shadow"]));
    // RENAME_NOREPLACE.
    fs::write(m.p("a"), b"a").expect("create");
    fs::write(m.p("b"), b"b").expect("create");
    let (ca, cb) = (c(&m.p("a")), c(&m.p("b")));
    // SAFETY: valid paths.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    assert_eq!(errno_of(rc), Err(libc::EEXIST));
    // A directory over a non-empty one is refused, over an empty lower one it works.
    fs::create_dir(m.p("d1")).expect("mkdir");
    fs::write(m.p("d1/f"), b"f").expect("create");
    let e = fs::rename(m.p("d1"), m.p("moved")).expect_err("non-empty target");
    assert_eq!(e.raw_os_error(), Some(libc::ENOTEMPTY));
    fs::rename(m.p("d1"), m.p("srv/empty")).expect("over empty lower dir");
    assert_eq!(names(&m.p("srv/empty")), set(&["f"]));
    assert!(m.u("srv/empty/.wh..wh..opq").is_file());
    // rename back onto a name that had a whiteout.
    fs::rename(m.p("moved"), m.p("srv/tree")).expect("back");
    assert!(!m.u("srv/.wh.tree").exists());
    assert_eq!(names(&m.p("srv/tree/x")), set(&["w"]));
}

#[test]
fn hardlink_groups_stay_groups_across_copy_up() {
    if !usable() {
        return;
    }
    let m = Mounted::new(&base_layers(), false);
    let ino = fs::symlink_metadata(m.p("usr/bin/python3"))
        .expect("stat")
        .ino();
    assert_eq!(
        fs::symlink_metadata(m.p("usr/bin/python3"))
            .expect("stat")
            .nlink(),
        3
    );
    fs::OpenOptions::new()
        .append(true)
        .open(m.p("usr/bin/python"))
        .expect("open")
        .write_all(b"!")
        .expect("write");
    for p in ["usr/bin/python3", "usr/bin/python", "usr/lib/python-link"] {
        assert_eq!(fs::read(m.p(p)).expect("read"), b"\x7fELF python!", "{p}");
        let md = fs::symlink_metadata(m.p(p)).expect("stat");
        assert_eq!((md.ino(), md.nlink()), (ino, 3), "{p}");
    }
    let up: BTreeSet<u64> = ["usr/bin/python3", "usr/bin/python", "usr/lib/python-link"]
        .iter()
        .map(|p| fs::symlink_metadata(m.u(p)).expect("upper").ino())
        .collect();
    assert_eq!(up.len(), 1);
    assert_eq!(
        fs::symlink_metadata(m.u("usr/bin/python"))
            .expect("up")
            .nlink(),
        3
    );
    // Unlinking one name keeps the group right.
    fs::remove_file(m.p("usr/lib/python-link")).expect("unlink");
    assert_eq!(
        fs::symlink_metadata(m.p("usr/bin/python"))
            .expect("stat")
            .nlink(),
        2
    );
    assert!(m.u("usr/lib/.wh.python-link").is_file());
    // A new link of a lower file copies it up and links it.
    fs::hard_link(m.p("etc/shadow"), m.p("shadow-link")).expect("link");
    let (a, b) = (
        fs::symlink_metadata(m.u("etc/shadow")).expect("up"),
        fs::symlink_metadata(m.u("shadow-link")).expect("up"),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    assert_eq!(
        fs::symlink_metadata(m.p("shadow-link"))
            .expect("stat")
            .nlink(),
        2
    );
    // A lower hardlink group whose other member was unlinked before copy-up.
    let m2 = Mounted::new(&base_layers(), false);
    fs::remove_file(m2.p("usr/bin/python")).expect("unlink");
    assert_eq!(
        fs::symlink_metadata(m2.p("usr/bin/python3"))
            .expect("stat")
            .nlink(),
        2
    );
    fs::write(m2.p("usr/lib/python-link"), b"x").expect("write");
    assert_eq!(fs::read(m2.p("usr/bin/python3")).expect("read"), b"x");
    assert!(!m2.u("usr/bin/python").exists());
}

#[test]
fn sparse_copy_up_keeps_holes() {
    if !usable() {
        return;
    }
    let m = Mounted::new(&base_layers(), false);
    fs::set_permissions(m.p("data/sparse"), fs::Permissions::from_mode(0o600)).expect("chmod");
    let up = fs::symlink_metadata(m.u("data/sparse")).expect("copied");
    assert_eq!(up.len(), 64 << 20);
    assert!(
        up.blocks() < 1024,
        "{} blocks: holes were filled",
        up.blocks()
    );
    let md = fs::symlink_metadata(m.p("data/sparse")).expect("stat");
    assert!(md.blocks() < 1024, "the mount reports the host's blocks");
    let data = fs::read(m.p("data/sparse")).expect("read");
    assert_eq!(&data[..4], b"head");
    assert!(data[4..].iter().all(|b| *b == 0));
}

#[test]
fn symlinks_in_the_upper_never_lead_outside() {
    if !usable() {
        return;
    }
    let layers = vec![layer(|b| {
        b.file("d/f", 0o644, b"lower f");
        b.dir("d/sub", 0o755);
        b.file("e/g", 0o644, b"g");
    })];
    let m = Mounted::new(&layers, false);
    let outside = m.dir.path().join("outside");
    fs::create_dir(&outside).expect("mkdir");
    fs::write(outside.join("f"), b"outside f").expect("write");
    // Look everything up, then plant symlinks in the upper behind the mount's back, where copy-up
    // will create the parents.
    for p in ["d/f", "d/sub", "e/g"] {
        fs::symlink_metadata(m.p(p)).expect("stat");
    }
    std::os::unix::fs::symlink(&outside, m.u("d")).expect("plant");
    std::os::unix::fs::symlink("/etc", m.u("e")).expect("plant");
    let _ = fs::write(m.p("d/f"), b"pwned");
    let _ = lchown(&m.p("d/f"), 1234, 1234);
    let _ = fs::write(m.p("d/sub/new"), b"pwned");
    let _ = fs::create_dir(m.p("d/sub/newdir"));
    let _ = lsetxattr(&m.p("e/g"), "user.x", b"pwned");
    let _ = fs::rename(m.p("e/g"), m.p("e/h"));
    assert_eq!(fs::read(outside.join("f")).expect("read"), b"outside f");
    assert_eq!(names(&outside), set(&["f"]));
    let o = fs::symlink_metadata(outside.join("f")).expect("stat");
    assert_eq!((o.uid(), o.gid()), (0, 0));
    assert!(!Path::new("/etc/g").exists() && !Path::new("/etc/h").exists());

    // A symlink made through the mount is only ever a symlink: lchown and xattrs act on it.
    let m = Mounted::new(&layers, false);
    std::os::unix::fs::symlink("/etc", m.p("x")).expect("symlink");
    assert_eq!(
        fs::read_link(m.p("x")).expect("readlink"),
        Path::new("/etc")
    );
    lchown(&m.p("x"), 77, 78).expect("lchown");
    let l = fs::symlink_metadata(m.u("x")).expect("upper link");
    assert!(l.file_type().is_symlink());
    assert_eq!((l.uid(), l.gid()), (77, 78));
    assert_eq!(fs::symlink_metadata("/etc").expect("etc").uid(), 0);
}

#[test]
fn ownership_recorded_in_xattr() {
    if !usable() {
        return;
    }
    let m = Mounted::new(&base_layers(), true);
    fs::write(m.p("tmp/new"), b"n").expect("create");
    lchown(&m.p("tmp/new"), 1000, 1001).expect("chown");
    fs::set_permissions(m.p("tmp/new"), fs::Permissions::from_mode(0o4710)).expect("chmod");
    let md = fs::symlink_metadata(m.p("tmp/new")).expect("stat");
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o7777),
        (1000, 1001, 0o4710)
    );
    let host = fs::symlink_metadata(m.u("tmp/new")).expect("host");
    assert_eq!(
        (host.uid(), host.gid()),
        (0, 0),
        "the host file keeps its real owner"
    );
    let o = read_override(&m.u("tmp/new")).expect("override");
    assert_eq!((o.uid, o.gid, o.mode), (1000, 1001, libc::S_IFREG | 0o4710));
    // Hidden from the container, and not settable by it.
    assert!(lxattrs(&m.p("tmp/new")).is_empty());
    assert_eq!(
        lsetxattr(&m.p("tmp/new"), "user.lazysnap.override", b"0:0:100777"),
        Err(libc::EPERM)
    );
    // A device node becomes a regular file carrying its type.
    let dev = c(&m.p("tmp/null"));
    // SAFETY: valid path.
    let rc = unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o644, libc::makedev(1, 3)) };
    assert_eq!(rc, 0, "{}", io::Error::last_os_error());
    let md = fs::symlink_metadata(m.p("tmp/null")).expect("stat");
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &md.file_type()
    ));
    assert_eq!(md.rdev(), libc::makedev(1, 3));
    assert!(fs::symlink_metadata(m.u("tmp/null"))
        .expect("host")
        .is_file());
    let o = read_override(&m.u("tmp/null")).expect("override");
    assert_eq!(
        (o.mode, o.rdev),
        (libc::S_IFCHR | 0o644, libc::makedev(1, 3))
    );
    // Copy-up records the lower owner.
    fs::write(m.p("home/user/.profile"), b"zz").expect("write");
    let o = read_override(&m.u("home/user/.profile")).expect("override");
    assert_eq!((o.uid, o.gid, o.mode), (1000, 1000, libc::S_IFREG | 0o644));
    let md = fs::symlink_metadata(m.p("home/user/.profile")).expect("stat");
    assert_eq!((md.uid(), md.gid()), (1000, 1000));
    let md = fs::symlink_metadata(m.u("home/user/.profile")).expect("host");
    assert_eq!((md.uid(), md.gid()), (0, 0));
}

#[test]
fn statfs_and_special_files_as_root() {
    if !usable() {
        return;
    }
    let m = Mounted::new(&base_layers(), false);
    // SAFETY: plain struct filled by the call.
    let (a, b) = unsafe {
        let mut a: libc::statvfs = std::mem::zeroed();
        let mut b: libc::statvfs = std::mem::zeroed();
        libc::statvfs(c(&m.mnt).as_ptr(), &mut a);
        libc::statvfs(c(&m.upper).as_ptr(), &mut b);
        (a, b)
    };
    assert_eq!((a.f_blocks, a.f_bsize), (b.f_blocks, b.f_bsize));
    let dev = c(&m.p("tmp/sda"));
    // SAFETY: valid path.
    let rc = unsafe { libc::mknod(dev.as_ptr(), libc::S_IFBLK | 0o660, libc::makedev(8, 1)) };
    assert_eq!(rc, 0);
    let host = fs::symlink_metadata(m.u("tmp/sda")).expect("host");
    assert!(std::os::unix::fs::FileTypeExt::is_block_device(
        &host.file_type()
    ));
    assert_eq!(host.rdev(), libc::makedev(8, 1));
    let fifo = c(&m.p("tmp/fifo"));
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(
        &fs::symlink_metadata(m.u("tmp/fifo"))
            .expect("host")
            .file_type()
    ));
    // Copy-up of a device node (chown).
    lchown(&m.p("dev/null"), 0, 5).expect("chown dev");
    let h = fs::symlink_metadata(m.u("dev/null")).expect("host");
    assert_eq!((h.rdev(), h.gid()), (libc::makedev(1, 3), 5));
    // fallocate and fsync through the mount.
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(m.p("tmp/alloc"))
        .expect("create");
    // SAFETY: plain syscall on an open fd.
    let rc = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, 1 << 20) };
    assert_eq!(rc, 0, "{}", io::Error::last_os_error());
    f.sync_all().expect("fsync");
    assert_eq!(f.metadata().expect("stat").len(), 1 << 20);
}

#[test]
fn upper_survives_remount() {
    if !usable() {
        return;
    }
    let layers = base_layers();
    let mut m = Mounted::new(&layers, false);
    fs::remove_file(m.p("etc/passwd")).expect("unlink");
    fs::create_dir(m.p("srv/tree/x/n")).expect("mkdir");
    fs::write(m.p("srv/tree/x/n/f"), b"f").expect("write");
    fs::rename(m.p("var/cache"), m.p("var/cache2")).expect("rename");
    let tree = tree_of(&m.mnt);
    let h = m.handle.take().expect("handle");
    h.unmount().expect("unmount");
    let dir = std::mem::replace(&mut m.dir, tempfile::tempdir().expect("tmp"));
    let (mnt, upper) = (m.mnt.clone(), m.upper.clone());
    drop(m);
    let m = Mounted::with_upper(&layers, dir, mnt, upper, false);
    assert_eq!(tree_of(&m.mnt), tree);
}

// ---------- randomized comparison with a real directory ----------

#[derive(Debug, Clone, PartialEq)]
struct Entry {
    kind: u32,
    perm: u32,
    uid: u32,
    gid: u32,
    size: u64,
    nlink: u64,
    rdev: u64,
    /// Only when the time is not "now" (set by the layers or by an explicit utimens).
    mtime: Option<(i64, i64)>,
    target: Option<Vec<u8>>,
    content: Option<Vec<u8>>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Path → entry, plus the hardlink groups (sets of paths sharing an inode).
type Tree = (BTreeMap<String, Entry>, BTreeSet<BTreeSet<String>>);

fn tree_of(root: &Path) -> Tree {
    let mut map = BTreeMap::new();
    let mut groups: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    let mut todo = vec![String::new()];
    while let Some(rel) = todo.pop() {
        let p = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&rel)
        };
        let md = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("lstat {p:?}: {e}"));
        let kind = md.mode() & libc::S_IFMT;
        let is_dir = kind == libc::S_IFDIR;
        if is_dir {
            for e in fs::read_dir(&p).expect("read_dir") {
                let n = e.expect("entry").file_name().to_string_lossy().into_owned();
                todo.push(if rel.is_empty() {
                    n
                } else {
                    format!("{rel}/{n}")
                });
            }
        } else {
            groups.entry(md.ino()).or_default().insert(rel.clone());
        }
        let mtime = (md.mtime(), md.mtime_nsec());
        map.insert(
            rel.clone(),
            Entry {
                kind,
                perm: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                size: if kind == libc::S_IFREG || kind == libc::S_IFLNK {
                    md.len()
                } else {
                    0
                },
                nlink: md.nlink(),
                rdev: md.rdev(),
                mtime: (!is_dir && mtime.0 < 1_750_000_000).then_some(mtime),
                target: (kind == libc::S_IFLNK).then(|| {
                    fs::read_link(&p)
                        .expect("readlink")
                        .as_os_str()
                        .as_bytes()
                        .to_vec()
                }),
                content: (kind == libc::S_IFREG).then(|| fs::read(&p).expect("read")),
                xattrs: lxattrs(&p),
            },
        );
    }
    let groups = groups.into_values().filter(|g| g.len() > 1).collect();
    (map, groups)
}

fn ts(t: Timestamp) -> libc::timespec {
    libc::timespec {
        tv_sec: t.sec,
        tv_nsec: i64::from(t.nsec),
    }
}

/// Extracts `layers` to `root` the way `tar -x` would (the reference model's result).
fn extract(layers: &[MemLayer], root: &Path) {
    let st = stack(layers);
    let applied = apply_layers(&st);
    let mut first_link: BTreeMap<(usize, u32), PathBuf> = BTreeMap::new();
    for (path, a) in &applied {
        let p = root.join(Path::new(std::ffi::OsStr::from_bytes(path)));
        let layer = &st[a.layer];
        let at = &a.attr;
        match at.kind {
            NodeKind::Dir => {
                if !path.is_empty() {
                    fs::create_dir(&p).expect("mkdir");
                }
            }
            NodeKind::Symlink => {
                let t = layer.readlink(a.node).expect("readlink");
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&t), &p).expect("ln -s");
            }
            NodeKind::File => {
                if let Some(first) = first_link.get(&(a.layer, a.node)) {
                    fs::hard_link(first, &p).expect("link");
                    continue;
                }
                first_link.insert((a.layer, a.node), p.clone());
                let f = fs::File::create(&p).expect("create");
                let mut buf = vec![0u8; at.size as usize];
                let mut done = 0;
                while done < buf.len() {
                    let n = layer
                        .read_at(a.node, done as u64, &mut buf[done..])
                        .expect("read");
                    if n == 0 {
                        break;
                    }
                    done += n;
                }
                // Keep holes like copy-up does (only the content is compared).
                let end = buf.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
                std::os::unix::fs::FileExt::write_all_at(&f, &buf[..end], 0).expect("write");
                f.set_len(at.size).expect("truncate");
            }
            kind => {
                let t = match kind {
                    NodeKind::CharDev => libc::S_IFCHR,
                    NodeKind::BlockDev => libc::S_IFBLK,
                    NodeKind::Fifo => libc::S_IFIFO,
                    _ => libc::S_IFSOCK,
                };
                // SAFETY: valid path.
                let rc = unsafe { libc::mknod(c(&p).as_ptr(), t | 0o600, at.rdev) };
                assert_eq!(rc, 0, "mknod {p:?}");
            }
        }
        lchown(&p, at.uid, at.gid).expect("chown");
        for (n, v) in &a.xattrs {
            lsetxattr(&p, std::str::from_utf8(n).expect("name"), v).expect("xattr");
        }
        if at.kind != NodeKind::Symlink {
            fs::set_permissions(&p, fs::Permissions::from_mode(at.perm)).expect("chmod");
        }
    }
    // Times last, deepest first, so that making children does not change them.
    for (path, a) in applied.iter().rev() {
        let p = root.join(Path::new(std::ffi::OsStr::from_bytes(path)));
        let times = [ts(a.attr.atime), ts(a.attr.mtime)];
        // SAFETY: valid path and two timespecs.
        let rc = unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c(&p).as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        assert_eq!(rc, 0);
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

#[derive(Debug, Clone)]
enum Op {
    Create(String, Vec<u8>, u32),
    WriteAt(String, u64, Vec<u8>),
    Truncate(String, u64),
    Unlink(String),
    Rmdir(String),
    Mkdir(String, u32),
    Rename(String, String, bool),
    Chmod(String, u32),
    Chown(String, u32, u32),
    Symlink(String, String),
    Link(String, String),
    SetXattr(String, String, Vec<u8>),
    Utime(String, i64),
}

fn apply(root: &Path, op: &Op) -> Result<(), i32> {
    let p = |r: &str| root.join(r);
    let io = |r: io::Result<()>| r.map_err(|e| e.raw_os_error().unwrap_or(-1));
    match op {
        Op::Create(path, data, mode) => io((|| {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(*mode)
                .open(p(path))?;
            f.write_all(data)
        })()),
        Op::WriteAt(path, off, data) => io((|| {
            let f = fs::OpenOptions::new().write(true).open(p(path))?;
            std::os::unix::fs::FileExt::write_all_at(&f, data, *off)
        })()),
        Op::Truncate(path, len) => io((|| {
            let f = fs::OpenOptions::new().write(true).open(p(path))?;
            f.set_len(*len)
        })()),
        Op::Unlink(path) => io(fs::remove_file(p(path))),
        Op::Rmdir(path) => io(fs::remove_dir(p(path))),
        Op::Mkdir(path, mode) => io((|| {
            fs::create_dir(p(path))?;
            fs::set_permissions(p(path), fs::Permissions::from_mode(*mode))
        })()),
        Op::Rename(a, b, noreplace) => {
            let flags = if *noreplace {
                libc::RENAME_NOREPLACE
            } else {
                0
            };
            // SAFETY: valid paths.
            errno_of(unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    c(&p(a)).as_ptr(),
                    libc::AT_FDCWD,
                    c(&p(b)).as_ptr(),
                    flags,
                )
            })
        }
        Op::Chmod(path, mode) => io(fs::set_permissions(
            p(path),
            fs::Permissions::from_mode(*mode),
        )),
        Op::Chown(path, u, g) => lchown(&p(path), *u, *g),
        Op::Symlink(target, path) => io(std::os::unix::fs::symlink(target, p(path))),
        Op::Link(a, b) => io(fs::hard_link(p(a), p(b))),
        Op::SetXattr(path, n, v) => lsetxattr(&p(path), n, v),
        Op::Utime(path, sec) => {
            let t = libc::timespec {
                tv_sec: *sec,
                tv_nsec: 17,
            };
            // SAFETY: valid path and two timespecs.
            errno_of(unsafe {
                libc::utimensat(
                    libc::AT_FDCWD,
                    c(&p(path)).as_ptr(),
                    [t, t].as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            })
        }
    }
}

fn random_op(rng: &mut Rng, tree: &BTreeMap<String, Entry>) -> Op {
    let all: Vec<&String> = tree.keys().filter(|k| !k.is_empty()).collect();
    let dirs: Vec<&String> = tree
        .iter()
        .filter(|(_, e)| e.kind == libc::S_IFDIR)
        .map(|(k, _)| k)
        .collect();
    let files: Vec<&String> = tree
        .iter()
        .filter(|(_, e)| e.kind == libc::S_IFREG)
        .map(|(k, _)| k)
        .collect();
    let plain: Vec<&String> = tree
        .iter()
        .filter(|(k, e)| !k.is_empty() && e.kind != libc::S_IFLNK)
        .map(|(k, _)| k)
        .collect();
    let new_path = |rng: &mut Rng| {
        let d = rng.pick(&dirs).to_string();
        let n = ["a", "b", "c", "x", "passwd", "cache", "tree"][rng.below(7)];
        if d.is_empty() {
            n.to_string()
        } else {
            format!("{d}/{n}")
        }
    };
    let any = |rng: &mut Rng| rng.pick(&all).to_string();
    let data = |rng: &mut Rng| {
        let len = rng.below(3) * 1000 + rng.below(100);
        (0..len).map(|_| rng.next() as u8).collect::<Vec<u8>>()
    };
    loop {
        let op = match rng.below(13) {
            0 => Op::Create(new_path(rng), data(rng), 0o640),
            1 if !files.is_empty() => {
                let off = rng.below(5000) as u64;
                Op::WriteAt(rng.pick(&files).to_string(), off, data(rng))
            }
            2 if !files.is_empty() => {
                Op::Truncate(rng.pick(&files).to_string(), rng.below(3000) as u64)
            }
            3 if !all.is_empty() => Op::Unlink(any(rng)),
            4 if !all.is_empty() => Op::Rmdir(any(rng)),
            5 => Op::Mkdir(new_path(rng), 0o750),
            6 if !all.is_empty() => Op::Rename(any(rng), new_path(rng), rng.below(4) == 0),
            7 if !plain.is_empty() => Op::Chmod(
                rng.pick(&plain).to_string(),
                0o600 | (rng.below(8) as u32) << 3,
            ),
            8 if !all.is_empty() => Op::Chown(
                any(rng),
                1000 + rng.below(3) as u32,
                2000 + rng.below(3) as u32,
            ),
            9 => Op::Symlink(format!("../t{}", rng.below(10)), new_path(rng)),
            10 if !files.is_empty() => Op::Link(rng.pick(&files).to_string(), new_path(rng)),
            11 if !plain.is_empty() => Op::SetXattr(
                rng.pick(&plain).to_string(),
                format!("user.k{}", rng.below(3)),
                data(rng),
            ),
            12 if !all.is_empty() => Op::Utime(any(rng), 1_000_000_000 + rng.below(1000) as i64),
            _ => continue,
        };
        return op;
    }
}

fn random_layers() -> Vec<MemLayer> {
    let l0 = layer(|b| {
        b.dir("etc", 0o755);
        b.file("etc/passwd", 0o644, b"root\n").owner(0, 0);
        b.file("etc/group", 0o644, b"root\n").xattr(b"user.g", b"1");
        b.file("usr/bin/a", 0o755, b"aaa").owner(5, 5);
        b.hardlink("usr/bin/b", "usr/bin/a");
        b.hardlink("etc/a-link", "usr/bin/a");
        b.symlink("usr/bin/c", "a");
        b.file("var/cache/x", 0o600, b"x");
        b.file("var/cache/tree", 0o600, b"tree");
        b.file("srv/tree/x/y", 0o644, b"y");
        b.special("run/fifo", NodeKind::Fifo, 0o644, 0);
        b.file("big", 0o644, &vec![7u8; 300_000]);
        b.file("sparse", 0o644, b"s").sparse_size(5 << 20);
    });
    let l1 = layer(|b| {
        b.whiteout("var/cache/x");
        b.opaque("srv/tree");
        b.file("srv/tree/c", 0o644, b"c");
        b.dir("usr/bin", 0o750).xattr(b"user.d", b"dir");
        b.file("etc/passwd", 0o644, b"root\nuser\n").owner(0, 0);
    });
    let l2 = layer(|b| {
        b.file("var/cache/x", 0o644, b"x again");
        b.dir("home/u", 0o700).owner(1000, 1000);
    });
    vec![l0, l1, l2]
}

/// The upper directory read back as an OCI layer (what commit would tar).
fn layer_from_upper(upper: &Path) -> MemLayer {
    let mut b = MemLayer::builder();
    let mut seen: BTreeMap<u64, String> = BTreeMap::new();
    let mut todo = vec![String::new()];
    let mut dirs = Vec::new();
    while let Some(rel) = todo.pop() {
        let dir = upper.join(&rel);
        let mut entries: Vec<String> = fs::read_dir(&dir)
            .expect("read_dir")
            .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
            .collect();
        entries.sort();
        for n in entries {
            let path = if rel.is_empty() {
                n.clone()
            } else {
                format!("{rel}/{n}")
            };
            let p = upper.join(&path);
            if n == ".wh..wh..opq" {
                b.opaque(&rel);
                continue;
            }
            if let Some(hidden) = n.strip_prefix(".wh.") {
                assert!(!hidden.starts_with(".lazysnap-tmp"), "leftover temp {path}");
                let target = if rel.is_empty() {
                    hidden.to_string()
                } else {
                    format!("{rel}/{hidden}")
                };
                b.whiteout(&target);
                continue;
            }
            let md = fs::symlink_metadata(&p).expect("lstat");
            let t = Timestamp {
                sec: md.mtime(),
                nsec: md.mtime_nsec() as u32,
            };
            let at = Timestamp {
                sec: md.atime(),
                nsec: md.atime_nsec() as u32,
            };
            let kind = md.mode() & libc::S_IFMT;
            let perm = md.mode() & 0o7777;
            let xs = lxattrs(&p);
            let mut node = match kind {
                libc::S_IFDIR => {
                    todo.push(path.clone());
                    dirs.push(path.clone());
                    b.dir(&path, perm)
                }
                libc::S_IFLNK => {
                    let t = fs::read_link(&p).expect("readlink");
                    b.symlink(&path, &t.to_string_lossy())
                }
                libc::S_IFREG if md.nlink() > 1 && seen.contains_key(&md.ino()) => {
                    let first = seen[&md.ino()].clone();
                    b.hardlink(&path, &first);
                    continue;
                }
                libc::S_IFREG => {
                    seen.insert(md.ino(), path.clone());
                    let data = fs::read(&p).expect("read");
                    b.file(&path, perm, &data)
                }
                libc::S_IFCHR => b.special(&path, NodeKind::CharDev, perm, md.rdev()),
                libc::S_IFBLK => b.special(&path, NodeKind::BlockDev, perm, md.rdev()),
                libc::S_IFIFO => b.special(&path, NodeKind::Fifo, perm, 0),
                _ => b.special(&path, NodeKind::Socket, perm, 0),
            };
            node = node.owner(md.uid(), md.gid()).times(at, t, t);
            for (k, v) in xs {
                node = node.xattr(&k, &v);
            }
        }
    }
    b.build()
}

/// The applied model as a [`Tree`] (same fields as read from a real directory).
fn tree_of_model(layers: &[MemLayer]) -> Tree {
    let st = stack(layers);
    let applied = apply_layers(&st);
    let mut map = BTreeMap::new();
    let mut groups: BTreeMap<(usize, u32), BTreeSet<String>> = BTreeMap::new();
    for (path, a) in &applied {
        let p = String::from_utf8(path.clone()).expect("utf8");
        let layer = &st[a.layer];
        let at = &a.attr;
        let kind = match at.kind {
            NodeKind::Dir => libc::S_IFDIR,
            NodeKind::File => libc::S_IFREG,
            NodeKind::Symlink => libc::S_IFLNK,
            NodeKind::CharDev => libc::S_IFCHR,
            NodeKind::BlockDev => libc::S_IFBLK,
            NodeKind::Fifo => libc::S_IFIFO,
            NodeKind::Socket => libc::S_IFSOCK,
        };
        if kind != libc::S_IFDIR {
            groups
                .entry((a.layer, a.node))
                .or_default()
                .insert(p.clone());
        }
        let content = (kind == libc::S_IFREG).then(|| {
            let mut buf = vec![0u8; at.size as usize];
            let mut done = 0;
            while done < buf.len() {
                let n = layer
                    .read_at(a.node, done as u64, &mut buf[done..])
                    .expect("read");
                if n == 0 {
                    break;
                }
                done += n;
            }
            buf
        });
        let mut xattrs = a.xattrs.clone();
        xattrs.sort();
        map.insert(
            p,
            Entry {
                kind,
                perm: if kind == libc::S_IFLNK {
                    0o777
                } else {
                    at.perm
                },
                uid: at.uid,
                gid: at.gid,
                size: if kind == libc::S_IFREG || kind == libc::S_IFLNK {
                    at.size
                } else {
                    0
                },
                nlink: u64::from(at.nlink),
                rdev: at.rdev,
                mtime: (kind != libc::S_IFDIR && at.mtime.sec < 1_750_000_000)
                    .then_some((at.mtime.sec, i64::from(at.mtime.nsec))),
                target: (kind == libc::S_IFLNK).then(|| layer.readlink(a.node).expect("link")),
                content,
                xattrs,
            },
        );
    }
    let groups = groups.into_values().filter(|g| g.len() > 1).collect();
    (map, groups)
}

fn assert_same(what: &str, a: &Tree, b: &Tree) {
    let keys_a: BTreeSet<&String> = a.0.keys().collect();
    let keys_b: BTreeSet<&String> = b.0.keys().collect();
    assert_eq!(keys_a, keys_b, "{what}: paths differ");
    for (k, ea) in &a.0 {
        let eb = &b.0[k];
        let mut ea = ea.clone();
        let mut eb = eb.clone();
        if ea.kind == libc::S_IFDIR {
            // Directory sizes are the host filesystem's business.
            ea.size = 0;
            eb.size = 0;
        }
        assert_eq!(ea, eb, "{what}: {k:?} differs");
    }
    assert_eq!(a.1, b.1, "{what}: hardlink groups differ");
}

fn random_run(seed: u64, steps: usize) {
    let layers = random_layers();
    let m = Mounted::new(&layers, false);
    let real = m.dir.path().join("real");
    fs::create_dir(&real).expect("mkdir");
    extract(&layers, &real);
    assert_same("before any op", &tree_of(&real), &tree_of(&m.mnt));
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut log = Vec::new();
    let mut ok = 0;
    for step in 0..steps {
        let tree = tree_of(&real).0;
        let op = random_op(&mut rng, &tree);
        let want = apply(&real, &op);
        let got = apply(&m.mnt, &op);
        log.push(format!("{op:?} -> {want:?}"));
        ok += usize::from(want.is_ok());
        assert_eq!(
            got,
            want,
            "seed {seed} step {step}: {op:?}\nlog:\n{}",
            log.join("\n")
        );
        if step % 10 == 9 {
            let (a, b) = (tree_of(&real), tree_of(&m.mnt));
            if a != b {
                assert_same(
                    &format!("seed {seed} step {step}\n{}", log.join("\n")),
                    &a,
                    &b,
                );
            }
        }
    }
    assert!(
        ok * 3 > steps,
        "seed {seed}: only {ok} of {steps} ops succeeded"
    );
    let mounted = tree_of(&m.mnt);
    assert_same(&format!("seed {seed} end"), &tree_of(&real), &mounted);
    // Commit equivalence: the upper as a layer over the lower ones gives the mounted tree.
    let mut all = layers.clone();
    all.push(layer_from_upper(&m.upper));
    let model = tree_of_model(&all);
    assert_same(&format!("seed {seed} commit"), &model, &mounted);
}

#[test]
fn random_ops_match_a_real_directory_and_commit() {
    if !usable() {
        return;
    }
    // More with LAZYSNAP_FUZZ_SEEDS=N.
    let seeds = std::env::var("LAZYSNAP_FUZZ_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6u64);
    for seed in 1..=seeds {
        random_run(seed, 120);
    }
}
