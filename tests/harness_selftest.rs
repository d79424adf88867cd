//! Tests of the test harness itself (tests/common): the images build, umoci makes references,
//! references agree across compressions, and the comparator notices every kind of change.

mod common;

use common::*;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn prerequisites() -> bool {
    require(
        is_root(),
        "root (umoci keeps owners and makes devices only as root)",
    ) && require(have_cmd("umoci"), "umoci (scripts/install-deps.sh)")
}

fn cp_a(src: &Path, dst: &Path) {
    let _ = std::fs::remove_dir_all(dst);
    let st = Command::new("cp")
        .arg("-a")
        .arg(src)
        .arg(dst)
        .status()
        .unwrap();
    assert!(st.success(), "cp -a {} {}", src.display(), dst.display());
}

fn scratch(name: &str) -> PathBuf {
    let d = testdata()
        .join("selftest")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Set mtime (sec, nsec) of `p` without following symlinks.
fn set_mtime(p: &Path, sec: i64, nsec: i64) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let ts = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: sec as libc::time_t,
            tv_nsec: nsec as _,
        },
    ];
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {}", p.display());
}

fn mtime_of(p: &Path) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.mtime(), m.mtime_nsec())
}

#[test]
fn comparator_sees_every_kind_of_change() {
    if !prerequisites() {
        return;
    }
    let reference = reference_tree(&image("edge-none"), TAG);
    let work = scratch("mutate");
    let copy = work.join("rootfs");
    cp_a(&reference, &copy);
    // cp -a keeps modes, owners, ns mtimes, xattrs, hardlinks, devices: nothing to report
    // (compare_trees reads implicit-dirs.txt beside `reference`, not beside the copy).
    let d = compare_trees(&copy, &reference);
    assert!(d.is_empty(), "cp -a copy differs:\n{}", d.join("\n"));

    // 1. mode
    std::fs::set_permissions(
        copy.join("modes/ro"),
        std::fs::Permissions::from_mode(0o440),
    )
    .unwrap();
    // 2. xattr value (binary)
    let p = CString::new(copy.join("xattrs/file").as_os_str().as_bytes()).unwrap();
    let n = CString::new("user.binary").unwrap();
    let v = b"\x00\x01\x02\xfe\xff\x00enD";
    assert_eq!(0, unsafe {
        libc::lsetxattr(p.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0)
    });
    // 3. one byte of content, same size and mtime
    let big = copy.join("big/random-5m");
    let t = mtime_of(&big);
    let mut data = std::fs::read(&big).unwrap();
    data[3_000_001] ^= 0x40;
    std::fs::write(&big, &data).unwrap();
    set_mtime(&big, t.0, t.1);
    // 4. a hardlink broken: hardlinks/h2 becomes its own inode (same bytes, mode, owner, mtime)
    let h2 = copy.join("hardlinks/h2");
    let dir_t = mtime_of(&copy.join("hardlinks"));
    let t = mtime_of(&h2);
    let tmp = copy.join("hardlinks/.h2.tmp");
    std::fs::copy(&h2, &tmp).unwrap();
    std::fs::rename(&tmp, &h2).unwrap();
    set_mtime(&h2, t.0, t.1);
    set_mtime(&copy.join("hardlinks"), dir_t.0, dir_t.1);
    // 5. mtime: one nanosecond
    let ns = copy.join("subsec/ns");
    let t = mtime_of(&ns);
    set_mtime(&ns, t.0, t.1 + 1);
    // 6. a directory's mtime
    let t = mtime_of(&copy.join("meta"));
    set_mtime(&copy.join("meta"), t.0 + 1, t.1);
    // 7. a path missing and one extra (parent mtime restored)
    let t = mtime_of(&copy.join("empty"));
    std::fs::remove_file(copy.join("empty/e2")).unwrap();
    std::fs::write(copy.join("empty/e3"), b"").unwrap();
    set_mtime(&copy.join("empty"), t.0, t.1);
    // 8. a symlink retargeted (mtime restored)
    let l = copy.join("subsec/link");
    let t = mtime_of(&l);
    let td = mtime_of(&copy.join("subsec"));
    std::fs::remove_file(&l).unwrap();
    std::os::unix::fs::symlink("us", &l).unwrap();
    set_mtime(&l, t.0, t.1);
    set_mtime(&copy.join("subsec"), td.0, td.1);
    // 9. owner
    let c = CString::new(copy.join("ids/big").as_os_str().as_bytes()).unwrap();
    assert_eq!(0, unsafe { libc::lchown(c.as_ptr(), 3000001, 4000000) });

    let d = compare_trees(&copy, &reference);
    let has = |path: &str, field: &str| {
        d.iter()
            .any(|l| l.starts_with(&format!("{path}: ")) && l.contains(field))
    };
    let expect = [
        ("/modes/ro", "mode: actual 0440, expected 0400"),
        ("/xattrs/file", "xattrs"),
        ("/big/random-5m", "content"),
        ("/hardlinks/h2", "hardlink group"),
        ("/hardlinks/h2", "nlink: actual 1, expected 3"),
        ("/hardlinks/h1", "nlink: actual 2, expected 3"),
        ("/subsec/ns", "mtime"),
        ("/meta", "mtime"),
        ("/empty/e2", "only in expected"),
        ("/empty/e3", "only in actual"),
        ("/subsec/link", "symlink target"),
        ("/ids/big", "uid: actual 3000001, expected 3000000"),
    ];
    let mut missing = vec![];
    for (p, f) in expect {
        if !has(p, f) {
            missing.push(format!("{p}: {f}"));
        }
    }
    assert!(
        missing.is_empty(),
        "not reported: {missing:?}\nreported:\n{}",
        d.join("\n")
    );
    // and nothing else: every line is about a path we touched
    let touched = [
        "/modes/ro",
        "/xattrs/file",
        "/big/random-5m",
        "/hardlinks/",
        "/subsec/ns",
        "/meta:",
        "/empty/e2",
        "/empty/e3",
        "/subsec/link",
        "/ids/big",
    ];
    let stray: Vec<&String> = d
        .iter()
        .filter(|l| !touched.iter().any(|t| l.starts_with(t)))
        .collect();
    assert!(stray.is_empty(), "unexpected reports: {stray:#?}");
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn comparator_sees_type_rdev_and_size_changes() {
    if !prerequisites() {
        return;
    }
    let reference = reference_tree(&image("edge-none"), TAG);
    let work = scratch("types");
    let copy = work.join("rootfs");
    cp_a(&reference, &copy);
    let restore = |p: &Path, t: (i64, i64)| set_mtime(p, t.0, t.1);
    let t = mtime_of(&copy.join("devices"));
    let null = copy.join("devices/null");
    let tn = mtime_of(&null);
    std::fs::remove_file(&null).unwrap();
    let c = CString::new(null.as_os_str().as_bytes()).unwrap();
    assert_eq!(0, unsafe {
        libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 5))
    });
    std::fs::set_permissions(&null, std::fs::Permissions::from_mode(0o666)).unwrap(); // umask
    restore(&null, tn);
    let fifo = copy.join("devices/fifo");
    let tf = mtime_of(&fifo);
    std::fs::remove_file(&fifo).unwrap();
    std::fs::write(&fifo, b"").unwrap();
    std::fs::set_permissions(&fifo, std::fs::Permissions::from_mode(0o620)).unwrap();
    restore(&fifo, tf);
    restore(&copy.join("devices"), t);
    let f = copy.join("dup/f");
    let tt = mtime_of(&f);
    std::fs::write(&f, b"third and last!\n").unwrap();
    restore(&f, tt);
    let d = compare_trees(&copy, &reference);
    assert!(
        d.iter()
            .any(|l| l.starts_with("/devices/null: rdev: actual 1:5, expected 1:3")),
        "{d:#?}"
    );
    assert!(
        d.iter()
            .any(|l| l.starts_with("/devices/fifo: type: actual file, expected fifo")),
        "{d:#?}"
    );
    assert!(d.iter().any(|l| l.starts_with("/dup/f: size")), "{d:#?}");
    assert_eq!(d.len(), 4, "{d:#?}"); // + /dup/f content
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn implicit_dirs_only_lose_their_mtime() {
    if !prerequisites() {
        return;
    }
    let reference = reference_tree(&image("edge-gzip"), TAG);
    let listed =
        std::fs::read_to_string(reference.parent().unwrap().join("implicit-dirs.txt")).unwrap();
    let listed: Vec<&str> = listed.lines().collect();
    assert_eq!(listed, [".", "implicit", "implicit/a", "implicit/a/b"]);
    let work = scratch("implicit");
    let copy = work.join("rootfs");
    cp_a(&reference, &copy);
    set_mtime(&copy.join("implicit/a"), 12345, 6);
    assert!(compare_trees(&copy, &reference).is_empty());
    std::fs::set_permissions(
        copy.join("implicit/a"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    set_mtime(&copy.join("implicit/a"), 12345, 6);
    let d = compare_trees(&copy, &reference);
    assert_eq!(d, ["/implicit/a: mode: actual 0700, expected 0755"]);
    let _ = std::fs::remove_dir_all(&work);
}

/// The reference method (umoci, after ocitool.py's zstd/sparse/index conversion) must give the
/// same tree whatever the compression: the images share their uncompressed layers.
#[test]
fn references_agree_across_compressions() {
    if !prerequisites() {
        return;
    }
    for set in [common::EDGE_IMAGES, common::DEBIAN_IMAGES] {
        let first = reference_tree(&image(set[0]), TAG);
        for other in &set[1..] {
            let r = reference_tree(&image(other), TAG);
            let d = compare_trees(&r, &first);
            assert!(
                d.is_empty(),
                "{other} vs {}:\n{}",
                set[0],
                d.iter().take(50).cloned().collect::<Vec<_>>().join("\n")
            );
        }
    }
    // the multi-platform image resolves to the host's manifest: layers 1-3 + a platform layer
    let m = reference_tree(&image("multiarch"), TAG);
    let plat = std::fs::read_to_string(m.join("etc/lazysnap-platform")).unwrap();
    assert_eq!(plat.trim(), "linux/amd64");
    let d = compare_trees(&m, &reference_tree(&image("debian-gzip"), TAG));
    assert_eq!(
        d,
        ["/etc/lazysnap-platform: only in actual (file)"],
        "{d:#?}"
    );
}

#[test]
fn debian_reference_runs_and_has_the_changes() {
    if !prerequisites() {
        return;
    }
    let r = reference_tree(&image("debian-zstd"), TAG);
    let work = scratch("debian");
    let copy = work.join("rootfs");
    cp_a(&r, &copy);
    assert_trees_equal(&copy, &r);
    // run the copy, never the cached reference (python could write __pycache__ into it)
    let out = Command::new("chroot")
        .arg(&copy)
        .args([
            "/usr/bin/python3",
            "-c",
            "import json,sqlite3;print(json.dumps([1]))",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "[1]",
        "{out:?}"
    );
    let out = Command::new("chroot")
        .arg(&copy)
        .args(["/bin/bash", "-c", "ls /usr/share/lazysnap"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("pair-a"),
        "{out:?}"
    );
    assert!(!r.join("usr/bin/tac").exists() && !r.join("usr/share/doc").exists());
    assert!(r.join("etc/issue.net").is_dir() && r.join("usr/share/common-licenses").is_file());
    let x = xattrs_of(&r.join("usr/local/bin/cap-true")).unwrap();
    assert_eq!(
        x.get(&b"security.capability"[..]).map(|v| v.len()),
        Some(20)
    );
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn require_skips_locally() {
    if in_ci() {
        return; // in CI require(false) panics by design
    }
    assert!(!require(false, "nothing (self-test)"));
    assert!(require(true, "nothing"));
    assert!(lazysnap_bin().ends_with("lazysnap"));
}
