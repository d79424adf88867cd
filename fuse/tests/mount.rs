//! Through a real FUSE mount: the mounted tree must be what `tar -x` of the same in-memory layers
//! gives (the naive model in `lazysnap_fuse::reference`), read with plain syscalls.
//!
//! These tests need `/dev/fuse` (and root or `fusermount3`). Without it they are skipped, except
//! under `CI=true`, where they fail.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CStr, CString};
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use lazysnap_fuse::mem::{MemLayer, MemLayerBuilder, ReadHook};
use lazysnap_fuse::reference::apply_layers;
use lazysnap_fuse::{
    is_mountpoint, is_stale_mount, mount, unmount, LayerStack, LayerTree, MountHandle,
    MountOptions, NodeKind, Timestamp,
};

fn fuse_available() -> bool {
    // fusermount3 opens /dev/fuse as the calling user too, so this is the test for root and
    // non-root alike.
    let ok = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_ok();
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "FUSE is not usable here (/dev/fuse cannot be opened) and CI=true: failing"
        );
        eprintln!("skipping: FUSE is not usable here");
    }
    ok
}

/// A mount on a fresh temporary directory, unmounted on drop.
struct Mounted {
    handle: Option<MountHandle>,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mounted {
    fn new(stack: LayerStack) -> Mounted {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mnt");
        fs::create_dir(&path).expect("mkdir");
        let opts = MountOptions {
            fsname: "lazysnap-test".into(),
            ..MountOptions::default()
        };
        let handle = mount(stack, &path, &opts).expect("mount");
        Mounted {
            handle: Some(handle),
            path: handle_path(&path),
            _dir: dir,
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }
}

fn handle_path(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
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

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Bytes like a `vfs_cap_data` (v2, cap_net_raw): binary, with NULs.
const CAP_BYTES: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00,
];

/// Three layers exercising every rule and every kind of metadata.
fn rich_layers() -> Vec<MemLayer> {
    let l0 = layer(|b| {
        b.dir("etc", 0o755);
        b.file("etc/passwd", 0o644, b"root:x:0:0::/root:/bin/sh\n");
        b.file("etc/shadow", 0o640, b"root:*:1::::::\n")
            .owner(0, 42);
        b.dir("usr/bin", 0o751).owner(0, 0);
        b.file("usr/bin/ping", 0o4755, b"\x7fELF ping")
            .xattr(b"user.cap", &CAP_BYTES)
            .xattr(b"trusted.note", b"text");
        b.file("usr/bin/sudo", 0o6755, b"\x7fELF sudo");
        b.file("usr/bin/dash", 0o755, b"\x7fELF dash");
        b.symlink("usr/bin/sh", "dash");
        b.file("usr/bin/python3", 0o755, b"\x7fELF python");
        b.hardlink("usr/bin/python", "usr/bin/python3");
        b.hardlink("usr/lib/python-link", "usr/bin/python3");
        b.special("dev/null", NodeKind::CharDev, 0o666, libc::makedev(1, 3));
        b.special("dev/sda", NodeKind::BlockDev, 0o660, libc::makedev(8, 0))
            .owner(0, 6);
        b.special(
            "dev/odd",
            NodeKind::CharDev,
            0o600,
            libc::makedev(259, 0x12345),
        );
        b.special("run/fifo", NodeKind::Fifo, 0o644, 0);
        b.dir("tmp", 0o1777);
        b.file("var/cache/a", 0o644, b"cache a");
        b.file("var/cache/b", 0o644, b"cache b");
        b.file("opt/app/old1", 0o644, b"old1");
        b.file("opt/app/old2", 0o644, b"old2");
        b.file("srv/tree/x/y", 0o644, b"y");
        b.file("home", 0o600, b"a file named home");
        b.file("times", 0o644, b"t").times(
            Timestamp {
                sec: 1_500_000_000,
                nsec: 1,
            },
            Timestamp {
                sec: 1_600_000_000,
                nsec: 987_654_321,
            },
            Timestamp {
                sec: 1_650_000_000,
                nsec: 999_999_999,
            },
        );
        b.file("old-times", 0o644, b"t").mtime(-86_400, 500);
        b.file("empty", 0o644, b"");
        b.file("data/big.bin", 0o644, &pseudo_random(3 << 20, 7));
        b.file("data/sparse", 0o644, b"head").sparse_size(1 << 20);
        for i in 0..1500 {
            b.file(
                &format!("many/a-rather-long-file-name-to-fill-readdir-buffers-{i:05}"),
                0o644,
                b"",
            );
        }
    });
    let l1 = layer(|b| {
        b.whiteout("var/cache/a");
        b.file(
            "etc/passwd",
            0o644,
            b"root:x:0:0::/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/sh\n",
        )
        .mtime(1_700_000_001, 42);
        b.dir("etc", 0o755).xattr(b"user.dir", b"etc-l1");
        b.opaque("opt/app");
        b.file("opt/app/new", 0o644, b"new app");
        b.whiteout("usr/lib/python-link");
        b.file("srv/tree", 0o644, b"tree is a file now");
        b.file("home/user/.profile", 0o644, b"export PS1=$\n")
            .owner(1000, 1000);
    });
    let l2 = layer(|b| {
        b.file("var/cache/a", 0o600, b"cache a again");
        b.file("usr/bin/new", 0o755, b"\x7fELF new");
    });
    vec![l0, l1, l2]
}

fn lxattrs(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let c = CString::new(path.as_os_str().as_bytes()).expect("path");
    // SAFETY: size probe with a null buffer, as documented.
    let len = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    assert!(
        len >= 0,
        "llistxattr {path:?}: {}",
        io::Error::last_os_error()
    );
    let mut names = vec![0u8; len as usize];
    // SAFETY: buffer of the probed length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert_eq!(n, len);
    names
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|name| (name.to_vec(), lgetxattr(path, name).expect("getxattr")))
        .collect()
}

fn lgetxattr(path: &Path, name: &[u8]) -> io::Result<Vec<u8>> {
    let c = CString::new(path.as_os_str().as_bytes()).expect("path");
    let n = CString::new(name).expect("name");
    // SAFETY: size probe with a null buffer.
    let len = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
    if len < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; len as usize];
    // SAFETY: buffer of the probed length.
    let got =
        unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(got as usize);
    Ok(buf)
}

/// Every path under `root` (relative, `/`-joined, root = "").
fn walk(root: &Path) -> BTreeSet<Vec<u8>> {
    let mut out = BTreeSet::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let md = fs::symlink_metadata(root.join(&rel)).expect("lstat");
        if md.is_dir() {
            for e in fs::read_dir(root.join(&rel)).expect("read_dir") {
                todo.push(rel.join(e.expect("entry").file_name()));
            }
        }
        out.insert(rel.as_os_str().as_bytes().to_vec());
    }
    out
}

/// The mounted tree against `tar -x` of the layers: paths, types, modes, owners, sizes, times
/// with nanoseconds, rdev, nlink, hardlink inodes, xattrs, symlink targets and contents.
fn compare_with_layers(root: &Path, layers: &[MemLayer]) {
    let st = stack(layers);
    let want = apply_layers(&st);
    let got = walk(root);
    let show = |s: &BTreeSet<Vec<u8>>| {
        s.iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(show(&got), show(&want.keys().cloned().collect()), "paths");
    let mut inodes: BTreeMap<(usize, u32), u64> = BTreeMap::new();
    for (p, w) in &want {
        let rel = String::from_utf8_lossy(p).into_owned();
        let path = root.join(&rel);
        let md = fs::symlink_metadata(&path).expect("lstat");
        let a = &w.attr;
        let ft = md.file_type();
        let kind_ok = match a.kind {
            NodeKind::File => ft.is_file(),
            NodeKind::Dir => ft.is_dir(),
            NodeKind::Symlink => ft.is_symlink(),
            NodeKind::CharDev => ft.is_char_device(),
            NodeKind::BlockDev => ft.is_block_device(),
            NodeKind::Fifo => ft.is_fifo(),
            NodeKind::Socket => ft.is_socket(),
        };
        assert!(kind_ok, "type of /{rel}: {ft:?} vs {:?}", a.kind);
        assert_eq!(md.mode() & 0o7777, a.perm, "mode of /{rel}");
        assert_eq!((md.uid(), md.gid()), (a.uid, a.gid), "owner of /{rel}");
        assert_eq!(md.size(), a.size, "size of /{rel}");
        assert_eq!(md.blocks(), a.size.div_ceil(512), "blocks of /{rel}");
        assert_eq!(
            (md.mtime(), md.mtime_nsec()),
            (a.mtime.sec, i64::from(a.mtime.nsec)),
            "mtime of /{rel}"
        );
        assert_eq!(
            (md.atime(), md.atime_nsec()),
            (a.atime.sec, i64::from(a.atime.nsec)),
            "atime of /{rel}"
        );
        assert_eq!(
            (md.ctime(), md.ctime_nsec()),
            (a.ctime.sec, i64::from(a.ctime.nsec)),
            "ctime of /{rel}"
        );
        assert_eq!(md.rdev(), a.rdev, "rdev of /{rel}");
        assert_eq!(md.nlink(), u64::from(a.nlink), "nlink of /{rel}");
        if a.kind != NodeKind::Dir {
            let prev = inodes.insert((w.layer, w.node), md.ino());
            assert!(
                prev.is_none() || prev == Some(md.ino()),
                "hardlinks of /{rel} share an inode"
            );
        }
        if matches!(a.kind, NodeKind::File | NodeKind::Dir) {
            let mut got_x = lxattrs(&path);
            let mut want_x = w.xattrs.clone();
            got_x.sort();
            want_x.sort();
            assert_eq!(got_x, want_x, "xattrs of /{rel}");
        }
        match a.kind {
            NodeKind::File => {
                let mut want_data = vec![0u8; a.size as usize];
                let n = st[w.layer]
                    .read_at(w.node, 0, &mut want_data)
                    .expect("read layer");
                want_data.truncate(n);
                assert!(
                    fs::read(&path).expect("read") == want_data,
                    "content of /{rel}"
                );
            }
            NodeKind::Symlink => {
                let target = fs::read_link(&path).expect("readlink");
                let want_t = st[w.layer].readlink(w.node).expect("layer readlink");
                assert_eq!(
                    target.as_os_str().as_bytes(),
                    &want_t[..],
                    "target of /{rel}"
                );
            }
            _ => {}
        }
    }
    let distinct: BTreeSet<u64> = inodes.values().copied().collect();
    assert_eq!(
        distinct.len(),
        inodes.len(),
        "distinct nodes must have distinct inodes"
    );
}

#[test]
fn mounted_tree_matches_layers() {
    if !fuse_available() {
        return;
    }
    let layers = rich_layers();
    let m = Mounted::new(stack(&layers));
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        // default_permissions: the kernel enforces the layers' modes (usr/bin is 0751).
        let err = fs::read_dir(m.p("usr/bin"))
            .map(|_| ())
            .expect_err("0751 dir");
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
        eprintln!("not root: the full comparison needs to read every directory");
        return;
    }
    compare_with_layers(&m.path, &layers);

    // Spot checks of the rules, in plain words.
    assert_eq!(fs::read(m.p("var/cache/a")).expect("a"), b"cache a again");
    assert!(fs::symlink_metadata(m.p("var/cache/b")).is_ok());
    assert_eq!(fs::read_dir(m.p("opt/app")).expect("opt/app").count(), 1);
    assert!(fs::symlink_metadata(m.p("srv/tree"))
        .expect("srv/tree")
        .is_file());
    assert!(fs::symlink_metadata(m.p("home")).expect("home").is_dir());
    let python = fs::symlink_metadata(m.p("usr/bin/python3")).expect("python3");
    assert_eq!(python.nlink(), 2);
    assert_eq!(
        python.ino(),
        fs::symlink_metadata(m.p("usr/bin/python"))
            .expect("python")
            .ino()
    );
    assert_eq!(
        fs::symlink_metadata(m.p("usr/bin"))
            .expect("usr/bin")
            .mode()
            & 0o7777,
        0o751
    );
    assert_eq!(
        lgetxattr(&m.p("usr/bin/ping"), b"user.cap").expect("cap"),
        CAP_BYTES
    );
    assert_eq!(fs::symlink_metadata(m.p("")).expect("root").ino(), 1);
}

#[test]
fn xattr_size_probe_and_erange() {
    if !fuse_available() {
        return;
    }
    let m = Mounted::new(stack(&rich_layers()));
    let ping = CString::new(m.p("usr/bin/ping").as_os_str().as_bytes()).expect("path");
    let name = c"user.cap";
    let mut small = [0u8; 4];
    // SAFETY: valid pointers and lengths.
    unsafe {
        assert_eq!(
            libc::getxattr(ping.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0),
            20
        );
        let r = libc::getxattr(
            ping.as_ptr(),
            name.as_ptr(),
            small.as_mut_ptr().cast(),
            small.len(),
        );
        assert_eq!(
            (r, io::Error::last_os_error().raw_os_error()),
            (-1, Some(libc::ERANGE))
        );
        let r = libc::listxattr(ping.as_ptr(), small.as_mut_ptr().cast(), small.len());
        assert_eq!(
            (r, io::Error::last_os_error().raw_os_error()),
            (-1, Some(libc::ERANGE))
        );
        let r = libc::getxattr(
            ping.as_ptr(),
            c"user.none".as_ptr(),
            small.as_mut_ptr().cast(),
            4,
        );
        assert_eq!(
            (r, io::Error::last_os_error().raw_os_error()),
            (-1, Some(libc::ENODATA))
        );
    }
}

/// Names from libc readdir, `.` and `..` included, with their d_ino.
fn raw_readdir(path: &Path) -> Vec<(Vec<u8>, u64)> {
    let c = CString::new(path.as_os_str().as_bytes()).expect("path");
    let mut out = Vec::new();
    // SAFETY: standard opendir/readdir/closedir use on a valid path.
    unsafe {
        let d = libc::opendir(c.as_ptr());
        assert!(!d.is_null(), "opendir: {}", io::Error::last_os_error());
        loop {
            let e = libc::readdir64(d);
            if e.is_null() {
                break;
            }
            let name = CStr::from_ptr((*e).d_name.as_ptr()).to_bytes().to_vec();
            out.push((name, (*e).d_ino));
        }
        libc::closedir(d);
    }
    out
}

#[test]
fn readdir_has_dots_and_stable_offsets() {
    if !fuse_available() {
        return;
    }
    let layers = rich_layers();
    let m = Mounted::new(stack(&layers));
    let root_ino = fs::metadata(m.p("")).expect("root").ino();
    let etc_ino = fs::metadata(m.p("etc")).expect("etc").ino();
    let etc = raw_readdir(&m.p("etc"));
    let names: BTreeSet<&[u8]> = etc.iter().map(|(n, _)| n.as_slice()).collect();
    let want: BTreeSet<&[u8]> = [&b"."[..], b"..", b"passwd", b"shadow"]
        .into_iter()
        .collect();
    assert_eq!(names, want);
    for (n, ino) in &etc {
        match n.as_slice() {
            b"." => assert_eq!(*ino, etc_ino),
            b".." => assert_eq!(*ino, root_ino),
            _ => {}
        }
    }

    // A directory larger than one readdir reply, read twice and with seekdir in the middle.
    let many = m.p("many");
    let first = raw_readdir(&many);
    assert_eq!(first.len(), 1502);
    assert_eq!(first, raw_readdir(&many));
    let c = CString::new(many.as_os_str().as_bytes()).expect("path");
    // SAFETY: standard opendir/readdir/telldir/seekdir use.
    unsafe {
        let d = libc::opendir(c.as_ptr());
        assert!(!d.is_null());
        for _ in 0..700 {
            assert!(!libc::readdir64(d).is_null());
        }
        let pos = libc::telldir(d);
        let next = CStr::from_ptr((*libc::readdir64(d)).d_name.as_ptr()).to_owned();
        for _ in 0..300 {
            assert!(!libc::readdir64(d).is_null());
        }
        libc::seekdir(d, pos);
        let again = CStr::from_ptr((*libc::readdir64(d)).d_name.as_ptr()).to_owned();
        libc::closedir(d);
        assert_eq!(next, again);
    }
}

#[test]
fn concurrent_readers() {
    if !fuse_available() {
        return;
    }
    let layers = rich_layers();
    let big = layers[0].content("data/big.bin").expect("big").to_vec();
    let m = Mounted::new(stack(&layers));
    let path = m.p("data/big.bin");
    let big = Arc::new(big);
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let (path, big) = (path.clone(), big.clone());
            thread::spawn(move || {
                let mut f = fs::File::open(&path).expect("open");
                let mut buf = vec![0u8; 200_000];
                let mut x = t + 1;
                for _ in 0..40 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let off = (x >> 33) % (big.len() as u64);
                    f.seek(SeekFrom::Start(off)).expect("seek");
                    let n = f.read(&mut buf).expect("read");
                    assert!(n > 0);
                    assert!(
                        buf[..n] == big[off as usize..off as usize + n],
                        "bytes at {off}"
                    );
                }
                assert!(fs::read(&path).expect("whole") == *big);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("reader thread");
    }
}

#[test]
fn read_error_is_eio_and_the_daemon_keeps_serving() {
    if !fuse_available() {
        return;
    }
    // Bytes past 4 MiB are "corrupt": far beyond what readahead of the first page fetches.
    let fail: ReadHook = Arc::new(|off, len| {
        if off + len as u64 > 4 << 20 {
            Err(io::Error::new(io::ErrorKind::InvalidData, "corrupt gzip"))
        } else {
            Ok(())
        }
    });
    let l0 = layer(|b| {
        b.file("bad", 0o644, &vec![1u8; 8 << 20]).read_hook(fail);
        b.file("good", 0o644, b"fine");
    });
    let m = Mounted::new(stack(&[l0]));
    let mut f = fs::File::open(m.p("bad")).expect("open");
    let mut head = vec![0u8; 4096];
    f.read_exact(&mut head).expect("the first bytes read");
    let err = fs::read(m.p("bad"))
        .map(|d| d.len())
        .expect_err("must fail");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert_eq!(fs::read(m.p("good")).expect("good"), b"fine");
    assert_eq!(fs::read_dir(&m.path).expect("ls").count(), 2);
}

#[test]
fn slow_read_does_not_block_metadata() {
    if !fuse_available() {
        return;
    }
    let entered = Arc::new(Barrier::new(2));
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = Arc::new(Mutex::new(release_rx));
    let blocked = Arc::new(AtomicBool::new(true));
    let hook: ReadHook = {
        let (entered, rx, blocked) = (entered.clone(), release_rx.clone(), blocked.clone());
        Arc::new(move |_, _| {
            if blocked.swap(false, Ordering::SeqCst) {
                entered.wait();
                let _ = rx.lock().map(|rx| rx.recv_timeout(Duration::from_secs(30)));
            }
            Ok(())
        })
    };
    let l0 = layer(|b| {
        b.file("slow", 0o644, b"slow bytes").read_hook(hook);
        for i in 0..50 {
            b.file(&format!("dir{i}/f"), 0o644, b"x");
        }
    });
    let m = Mounted::new(stack(&[l0]));
    let slow = m.p("slow");
    let reader = thread::spawn(move || fs::read(slow));
    entered.wait(); // the read is now stuck inside read_at
    let root = m.path.clone();
    let (done_tx, done_rx) = mpsc::channel();
    thread::spawn(move || {
        let n = (0..50)
            .filter(|i| fs::metadata(root.join(format!("dir{i}/f"))).is_ok())
            .count();
        let _ = done_tx.send(n);
    });
    let res = done_rx.recv_timeout(Duration::from_secs(10));
    let _ = release_tx.send(());
    assert_eq!(
        res,
        Ok(50),
        "metadata requests must be served while a read is slow"
    );
    assert_eq!(reader.join().expect("reader").expect("read"), b"slow bytes");
}

#[test]
fn mount_options_and_readahead() {
    if !fuse_available() {
        return;
    }
    let m = Mounted::new(stack(&rich_layers()));
    let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(m.path.to_str().expect("utf8")))
        .expect("mount listed");
    assert!(line.contains(" fuse.lazysnap lazysnap-test "), "{line}");
    let opts = line.split(' ').nth(5).expect("options");
    assert!(opts.split(',').any(|o| o == "ro"), "{line}");
    assert!(line.contains("default_permissions"), "{line}");
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        assert!(line.contains("allow_other"), "{line}");
        let dev = fs::metadata(&m.path).expect("stat").dev();
        let ra = fs::read_to_string(format!(
            "/sys/class/bdi/{}:{}/read_ahead_kb",
            libc::major(dev),
            libc::minor(dev)
        ))
        .expect("bdi");
        assert_eq!(ra.trim(), "1024");
    }
    // Writes are refused by the kernel on a read-only mount.
    let err = fs::OpenOptions::new()
        .write(true)
        .open(m.p("etc/passwd"))
        .expect_err("read-only");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    let c = CString::new(m.p("etc/passwd").as_os_str().as_bytes()).expect("path");
    // SAFETY: valid path; statvfs into a zeroed struct.
    unsafe {
        assert_eq!(libc::access(c.as_ptr(), libc::R_OK), 0);
        assert_eq!(libc::access(c.as_ptr(), libc::W_OK), -1);
        let mut s: libc::statvfs = std::mem::zeroed();
        assert_eq!(libc::statvfs(c.as_ptr(), &mut s), 0);
        assert_eq!(s.f_namemax, 255);
        assert_ne!(s.f_flag & libc::ST_RDONLY, 0);
    }
}

#[test]
fn mount_is_lazy() {
    if !fuse_available() {
        return;
    }
    let l0 = layer(|b| {
        for i in 0..20_000 {
            b.file(&format!("d{}/e{}/f{i}", i % 20, i % 7), 0o644, b"x");
        }
    });
    let st = stack(&[l0]);
    let started = Instant::now();
    let m = Mounted::new(st);
    eprintln!("mount of a 20k-file layer took {:?}", started.elapsed());
    let merged = m.handle.as_ref().expect("handle").merged().clone();
    // At most the root was merged (by the kernel's first getattr): its 20 directories.
    assert!(
        merged.inode_count() <= 21,
        "{} inodes",
        merged.inode_count()
    );
    assert_eq!(fs::read(m.p("d3/e3/f3")).expect("f3"), b"x");
}

#[test]
fn unmount_and_join() {
    if !fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = handle_path(dir.path());
    let h = mount(stack(&rich_layers()), &path, &MountOptions::default()).expect("mount");
    assert!(is_mountpoint(&path));
    h.unmount().expect("unmount");
    assert!(!is_mountpoint(&path));
    assert_eq!(fs::read_dir(&path).expect("ls").count(), 0);

    // Unmounted from outside: join returns.
    let h = mount(stack(&rich_layers()), &path, &MountOptions::default()).expect("mount");
    let joiner = thread::spawn(move || h.join());
    assert!(unmount(&path).expect("unmount"));
    joiner.join().expect("join thread").expect("session");
    assert!(!is_mountpoint(&path));
    assert!(!unmount(&path).expect("nothing mounted"));
}

const CHILD_ENV: &str = "LAZYSNAP_FUSE_TEST_CHILD_MOUNT";

/// Run in a child process by `stale_mount_after_daemon_death`: mounts and serves until killed.
#[test]
fn child_mount_helper() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let h = mount(
        stack(&rich_layers()),
        Path::new(&path),
        &MountOptions::default(),
    )
    .expect("mount");
    let _ = h.join();
}

#[test]
fn stale_mount_after_daemon_death() {
    if !fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = handle_path(dir.path());
    /// Kills the child even when an assertion fails first.
    struct Child(std::process::Child);
    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Child(
        Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "child_mount_helper",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn child"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !is_mountpoint(&path) {
        assert!(Instant::now() < deadline, "child never mounted");
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        fs::read(path.join("empty")).expect("served by the child"),
        b""
    );
    assert!(!is_stale_mount(&path));
    child.0.kill().expect("kill");
    child.0.wait().expect("wait");
    assert!(is_stale_mount(&path), "a dead daemon leaves a stale mount");
    assert!(unmount(&path).expect("cleanup"));
    assert!(!is_stale_mount(&path));
    assert!(!is_mountpoint(&path));
    // And the directory can be mounted again.
    let h = mount(stack(&rich_layers()), &path, &MountOptions::default()).expect("remount");
    assert!(fs::metadata(path.join("etc/passwd")).is_ok());
    h.unmount().expect("unmount");
}
