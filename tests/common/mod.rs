//! Test support shared by the integration tests (`mod common;`).
//!
//! * [`testdata`] builds the test images once (scripts/make-test-images.sh,
//!   scripts/make-edge-images.py and scripts/make-estargz-images.py; each skips work whose
//!   stamp matches) and returns their dir.
//! * [`reference_tree`] unpacks an image with umoci (scripts/reference-unpack.sh), cached.
//! * [`compare_trees`] reports every difference between a mounted tree and a reference.
//! * [`require`] turns a missing prerequisite into a skip locally and a failure in CI.
//!
//! Images in `testdata()` (all tagged `latest`; see the scripts' headers for the contents):
//! `debian-gzip/`, `debian-zstd/`, `debian-none/` (OCI layouts, 3 layers), `debian-gzip.oci.tar`
//! (OCI archive), `debian-docker.tar` (docker save, by skopeo), `multiarch/` (nested index,
//! linux/amd64 + linux/arm64), `multiarch-flat/` (both manifests in index.json), `edge-gzip/`,
//! `edge-zstd/`, `edge-none/`, `edge-mixed/` (10 layers of tar edge cases), `edge.oci.tar`,
//! `edge-docker.tar` (classic docker save layout), `debian-layers/*.tar`, `edge-layers/*.tar`,
//! `debian-estargz/`, `edge-estargz/` (eStargz by the estargz Go library, 1 MiB chunks; not
//! built without Go and its sources, see that script).
#![allow(dead_code)]

pub mod containerd;
pub mod registry;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CString, OsStr};
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// The Debian images, one per compression (same three layers, same diff_ids).
pub const DEBIAN_IMAGES: &[&str] = &["debian-gzip", "debian-zstd", "debian-none"];
/// The edge-case images: one per compression plus a per-layer mix.
pub const EDGE_IMAGES: &[&str] = &["edge-gzip", "edge-zstd", "edge-none", "edge-mixed"];
/// The tag every test image carries.
pub const TAG: &str = "latest";

/// The repository root (the main crate's manifest dir).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn scripts_dir() -> PathBuf {
    repo_root().join("scripts")
}

/// The `lazysnap` binary built for this test run.
pub fn lazysnap_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lazysnap"))
}

/// Runs `lazysnap --root ROOT ARGS…` (the binary built for this test run).
pub fn lazysnap(root: &Path, args: &[&str]) -> std::process::Output {
    lazysnap_env(root, args, &[])
}

/// Like [`lazysnap`], with `envs` set.
pub fn lazysnap_env(root: &Path, args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    lazysnap_from(&lazysnap_bin(), root, args, envs)
}

/// Like [`lazysnap_env`], running the binary at `bin` (an installed copy of this build).
pub fn lazysnap_from(
    bin: &Path,
    root: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
) -> std::process::Output {
    Command::new(bin)
        .envs(envs.iter().copied())
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .expect("running lazysnap")
}

/// The number in environment variable `name` (a test's size knob), else `default`.
pub fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Like [`lazysnap`], asserting success; returns stdout.
pub fn ok(root: &Path, args: &[&str]) -> String {
    ok_from(&lazysnap_bin(), root, args)
}

/// Like [`ok`], running the binary at `bin`.
pub fn ok_from(bin: &Path, root: &Path, args: &[&str]) -> String {
    let out = lazysnap_from(bin, root, args, &[]);
    assert!(
        out.status.success(),
        "lazysnap {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Like [`lazysnap`], asserting failure; returns stderr.
pub fn fails(root: &Path, args: &[&str]) -> String {
    let out = lazysnap(root, args);
    assert!(!out.status.success(), "lazysnap {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Root and /dev/fuse, for tests that really mount (a skip fails in CI).
pub fn can_mount() -> bool {
    require(is_root(), "root (FUSE mounts)") && require(have_dev_fuse(), "/dev/fuse")
}

/// True when running in CI (env `CI=true`), where a skipped prerequisite is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// Check a prerequisite. Returns `cond`. When it is false: in CI (`CI=true`) panic, since a
/// skip must fail there; otherwise print `SKIP: <what>` to stderr and return false, so the
/// test can `return` early:
/// `if !require(is_root(), "root (FUSE mounts, umoci)") { return; }`
pub fn require(cond: bool, what: &str) -> bool {
    if cond {
        return true;
    }
    if in_ci() {
        panic!("prerequisite missing in CI (a skip must fail here): {what}");
    }
    eprintln!("SKIP: prerequisite missing: {what}");
    false
}

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

pub fn have_dev_fuse() -> bool {
    Path::new("/dev/fuse").exists()
}

/// Whether `cmd` is an executable on PATH.
pub fn have_cmd(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false)
}

/// An exclusive advisory lock on `path` (flock), held until the guard is dropped. Serialises
/// the test binaries that cargo runs in parallel.
pub struct FileLock(fs::File);

impl FileLock {
    pub fn acquire(path: &Path) -> FileLock {
        if let Some(d) = path.parent() {
            fs::create_dir_all(d).unwrap();
        }
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open lock {}: {e}", path.display()));
        use std::os::unix::io::AsRawFd;
        loop {
            let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
            if r == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                panic!("flock {}: {e}", path.display());
            }
        }
        FileLock(f)
    }
}

fn run_script(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The test-data directory (env `LAZYSNAP_TESTDATA`, default `<repo>/target/testdata`), with
/// every test image built. Built once per process; across processes a file lock serialises
/// the builders and the scripts' stamps make the second one a no-op. The first build needs
/// `apt-get download` (about 20 MB of .debs, cached in `testdata()/debs`) and takes ~30 s.
pub fn testdata() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::var_os("LAZYSNAP_TESTDATA")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target").join("testdata"));
        fs::create_dir_all(&dir).unwrap();
        let _lock = FileLock::acquire(&dir.join(".harness.lock"));
        run_script(
            Command::new("bash")
                .arg(scripts_dir().join("make-test-images.sh"))
                .arg(&dir),
            "scripts/make-test-images.sh",
        );
        run_script(
            Command::new("python3")
                .arg(scripts_dir().join("make-edge-images.py"))
                .arg(&dir),
            "scripts/make-edge-images.py",
        );
        run_script(
            Command::new("python3")
                .arg(scripts_dir().join("make-estargz-images.py"))
                .arg(&dir),
            "scripts/make-estargz-images.py",
        );
        dir
    })
    .clone()
}

/// `testdata().join(name)`, e.g. `image("debian-zstd")`.
pub fn image(name: &str) -> PathBuf {
    testdata().join(name)
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The reference root filesystem of `layout:tag`, unpacked by umoci through
/// scripts/reference-unpack.sh (root only: require `is_root()` and `have_cmd("umoci")`).
/// Cached under `testdata()/refs/<layout name>-<tag>-<hash>`; the hash covers the layout's
/// index.json and the reference scripts, so a rebuilt image gets a new reference.
/// The returned path is `.../rootfs`; beside it `implicit-dirs.txt` lists the directories no
/// layer declares, whose mtime [`compare_trees`] ignores.
pub fn reference_tree(layout: &Path, tag: &str) -> PathBuf {
    let layout = fs::canonicalize(layout)
        .unwrap_or_else(|e| panic!("reference_tree: layout {}: {e}", layout.display()));
    let mut h = Sha256::new();
    h.update(fs::read(layout.join("index.json")).expect("layout has no index.json"));
    h.update(tag.as_bytes());
    for s in ["reference-unpack.sh", "ocitool.py"] {
        h.update(fs::read(scripts_dir().join(s)).unwrap());
    }
    let key = hex::encode(h.finalize());
    let name = layout
        .file_name()
        .unwrap_or(OsStr::new("layout"))
        .to_string_lossy()
        .into_owned();
    // Under the test-data dir when the layout lives there, else beside the layout.
    let refs = match layout.parent() {
        Some(p) => p.join("refs"),
        None => std::env::temp_dir().join("lazysnap-refs"),
    };
    fs::create_dir_all(&refs).unwrap();
    let dest = refs.join(format!("{name}-{tag}-{}", &key[..12]));
    let rootfs = dest.join("rootfs");
    if dest.join(".complete").exists() {
        return rootfs;
    }
    let _lock = FileLock::acquire(&refs.join(".refs.lock"));
    if !dest.join(".complete").exists() {
        run_script(
            Command::new("bash")
                .arg(scripts_dir().join("reference-unpack.sh"))
                .arg(&layout)
                .arg(tag)
                .arg(&dest),
            "scripts/reference-unpack.sh",
        );
    }
    rootfs
}

/// Options of [`compare_trees_with`].
#[derive(Debug, Clone, Default)]
pub struct CompareOptions {
    /// Relative paths ("" = the root) whose mtime is not compared.
    pub ignore_mtime: BTreeSet<PathBuf>,
    /// Relative paths left out entirely (with everything below them).
    pub ignore_paths: BTreeSet<PathBuf>,
}

impl CompareOptions {
    /// The options [`compare_trees`] uses for `expected`: when `expected` is a reference made
    /// by `reference_tree` (a `rootfs` with `implicit-dirs.txt` beside it), the directories
    /// listed there (no layer declares them; umoci gave them the unpack time) have their
    /// mtime ignored — and only their mtime.
    pub fn for_reference(expected: &Path) -> CompareOptions {
        let mut o = CompareOptions::default();
        if let Some(parent) = expected.parent() {
            if let Ok(s) = fs::read_to_string(parent.join("implicit-dirs.txt")) {
                for l in s.lines().filter(|l| !l.is_empty()) {
                    o.ignore_mtime.insert(if l == "." {
                        PathBuf::new()
                    } else {
                        PathBuf::from(l)
                    });
                }
            }
        }
        o
    }
}

#[derive(Debug, Clone)]
struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    nlink: u64,
    rdev: u64,
    dev_ino: (u64, u64),
    target: Option<Vec<u8>>,
    xattrs: Result<BTreeMap<Vec<u8>, Vec<u8>>, String>,
    sha256: Option<Result<String, String>>,
}

fn kind_of(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "file",
        libc::S_IFDIR => "dir",
        libc::S_IFLNK => "symlink",
        libc::S_IFCHR => "chardev",
        libc::S_IFBLK => "blockdev",
        libc::S_IFIFO => "fifo",
        libc::S_IFSOCK => "socket",
        _ => "unknown",
    }
}

/// All extended attributes of `path` (not following a symlink), every namespace, raw bytes.
pub fn xattrs_of(path: &Path) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, String> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    let names = loop {
        let n = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOTSUP) {
                return Ok(out);
            }
            return Err(format!("llistxattr: {e}"));
        }
        if n == 0 {
            return Ok(out);
        }
        let mut buf = vec![0u8; n as usize];
        let m = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if m < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) {
                continue;
            }
            return Err(format!("llistxattr: {e}"));
        }
        buf.truncate(m as usize);
        break buf;
    };
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let cn = CString::new(name).unwrap();
        let value = loop {
            let n = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), std::ptr::null_mut(), 0) };
            if n < 0 {
                return Err(format!(
                    "lgetxattr {}: {}",
                    String::from_utf8_lossy(name),
                    std::io::Error::last_os_error()
                ));
            }
            let mut buf = vec![0u8; n as usize];
            let m = unsafe {
                libc::lgetxattr(c.as_ptr(), cn.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
            };
            if m < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ERANGE) {
                    continue;
                }
                return Err(format!("lgetxattr {}: {e}", String::from_utf8_lossy(name)));
            }
            buf.truncate(m as usize);
            break buf;
        };
        out.insert(name.to_vec(), value);
    }
    Ok(out)
}

/// sha256 (hex) of a file's content, read through the file system.
pub fn file_sha256(path: &Path) -> Result<String, String> {
    let mut f = fs::File::open(path).map_err(|e| format!("open: {e}"))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn walk(
    root: &Path,
    opts: &CompareOptions,
    errors: &mut Vec<String>,
    label: &str,
) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        if opts.ignore_paths.contains(&rel) {
            continue;
        }
        let abs = if rel.as_os_str().is_empty() {
            root.to_path_buf()
        } else {
            root.join(&rel)
        };
        let md = match fs::symlink_metadata(&abs) {
            Ok(m) => m,
            Err(e) => {
                errors.push(format!("{}: {label}: lstat failed: {e}", show(&rel)));
                continue;
            }
        };
        let kind = kind_of(md.mode());
        let target = if kind == "symlink" {
            match fs::read_link(&abs) {
                Ok(t) => Some(t.as_os_str().as_bytes().to_vec()),
                Err(e) => {
                    errors.push(format!("{}: {label}: readlink failed: {e}", show(&rel)));
                    None
                }
            }
        } else {
            None
        };
        let sha256 = (kind == "file").then(|| file_sha256(&abs));
        if kind == "dir" {
            match fs::read_dir(&abs) {
                Ok(rd) => {
                    for e in rd {
                        match e {
                            Ok(e) => stack.push(rel.join(e.file_name())),
                            Err(e) => errors.push(format!("{}: {label}: readdir: {e}", show(&rel))),
                        }
                    }
                }
                Err(e) => errors.push(format!("{}: {label}: opendir failed: {e}", show(&rel))),
            }
        }
        out.insert(
            rel.clone(),
            Entry {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                size: md.size(),
                mtime: (md.mtime(), md.mtime_nsec()),
                nlink: md.nlink(),
                rdev: md.rdev(),
                dev_ino: (md.dev(), md.ino()),
                target,
                xattrs: xattrs_of(&abs),
                sha256,
            },
        );
    }
    out
}

fn show(rel: &Path) -> String {
    format!("/{}", rel.display())
}

fn show_bytes(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) if !s.chars().any(|c| c.is_control()) => format!("{s:?}"),
        _ => format!("0x{}", hex::encode(b)),
    }
}

fn show_xattrs(x: &BTreeMap<Vec<u8>, Vec<u8>>) -> String {
    let v: Vec<String> = x
        .iter()
        .map(|(k, v)| format!("{}={}", String::from_utf8_lossy(k), show_bytes(v)))
        .collect();
    format!("{{{}}}", v.join(", "))
}

fn dev_str(rdev: u64) -> String {
    format!("{}:{}", libc::major(rdev), libc::minor(rdev))
}

/// Compare the tree at `actual` (e.g. a lazysnap mount) with the one at `expected` (e.g. a
/// [`reference_tree`]), walking both without following symlinks. Returns one human-readable
/// line per difference (empty = equal). Compared, field for field:
///
/// * the set of paths (`only in actual` / `only in expected`) and the file type;
/// * mode (all 12 permission bits incl. setuid/setgid/sticky), uid, gid;
/// * size (not for directories: a directory's st_size is file-system specific);
/// * mtime to the nanosecond, directories included — except the directories
///   [`CompareOptions::for_reference`] lists (no layer declares them, so umoci stamped them
///   with the unpack time; their mode/owner are still compared). The root directory is
///   treated like any other: when a layer has a "./" entry umoci applies it to the root,
///   otherwise the root is in that list;
/// * symlink targets (raw bytes), rdev of char/block devices (major:minor);
/// * hardlinks: the partition of non-directory paths by (st_dev, st_ino) must be the same in
///   both trees, and st_nlink must be equal (not for directories, whose link count is
///   file-system specific);
/// * extended attributes: all namespaces (user, security, trusted, system), binary values,
///   via llistxattr/lgetxattr;
/// * the sha256 of every regular file's content, read through the file system.
///
/// atime and ctime are not compared.
pub fn compare_trees(actual: &Path, expected: &Path) -> Vec<String> {
    compare_trees_with(actual, expected, &CompareOptions::for_reference(expected))
}

/// [`compare_trees`] with explicit options (no implicit-dirs.txt lookup).
pub fn compare_trees_with(actual: &Path, expected: &Path, opts: &CompareOptions) -> Vec<String> {
    let mut diffs = Vec::new();
    let a = walk(actual, opts, &mut diffs, "actual");
    let e = walk(expected, opts, &mut diffs, "expected");

    for p in a.keys().filter(|p| !e.contains_key(*p)) {
        diffs.push(format!("{}: only in actual ({})", show(p), a[p].kind));
    }
    for p in e.keys().filter(|p| !a.contains_key(*p)) {
        diffs.push(format!("{}: only in expected ({})", show(p), e[p].kind));
    }

    let groups = |m: &BTreeMap<PathBuf, Entry>| {
        let mut g: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
        for (p, en) in m.iter().filter(|(_, en)| en.kind != "dir") {
            g.entry(en.dev_ino).or_default().push(p.clone());
        }
        g
    };
    let ga = groups(&a);
    let ge = groups(&e);
    let mut reported_groups = BTreeSet::new();

    for (p, x) in &a {
        let Some(y) = e.get(p) else { continue };
        let s = show(p);
        let mut d = |field: &str, av: String, ev: String| {
            diffs.push(format!("{s}: {field}: actual {av}, expected {ev}"));
        };
        if x.kind != y.kind {
            d("type", x.kind.into(), y.kind.into());
            continue;
        }
        if x.mode != y.mode {
            d("mode", format!("{:04o}", x.mode), format!("{:04o}", y.mode));
        }
        if x.uid != y.uid {
            d("uid", x.uid.to_string(), y.uid.to_string());
        }
        if x.gid != y.gid {
            d("gid", x.gid.to_string(), y.gid.to_string());
        }
        if x.kind != "dir" && x.size != y.size {
            d("size", x.size.to_string(), y.size.to_string());
        }
        if x.mtime != y.mtime && !opts.ignore_mtime.contains(p) {
            d(
                "mtime",
                format!("{}.{:09}", x.mtime.0, x.mtime.1),
                format!("{}.{:09}", y.mtime.0, y.mtime.1),
            );
        }
        if x.target != y.target {
            let f =
                |t: &Option<Vec<u8>>| t.as_deref().map(show_bytes).unwrap_or_else(|| "-".into());
            d("symlink target", f(&x.target), f(&y.target));
        }
        if (x.kind == "chardev" || x.kind == "blockdev") && x.rdev != y.rdev {
            d("rdev", dev_str(x.rdev), dev_str(y.rdev));
        }
        if x.kind != "dir" {
            if x.nlink != y.nlink {
                d("nlink", x.nlink.to_string(), y.nlink.to_string());
            }
            let la = &ga[&x.dev_ino];
            let le = &ge[&y.dev_ino];
            if la != le && reported_groups.insert((la.clone(), le.clone())) {
                let f = |l: &Vec<PathBuf>| l.iter().map(|p| show(p)).collect::<Vec<_>>().join(" ");
                d(
                    "hardlink group",
                    format!("[{}]", f(la)),
                    format!("[{}]", f(le)),
                );
            }
        }
        match (&x.xattrs, &y.xattrs) {
            (Ok(xa), Ok(ya)) => {
                if xa != ya {
                    d("xattrs", show_xattrs(xa), show_xattrs(ya));
                }
            }
            (xa, ya) => {
                let f = |r: &Result<BTreeMap<Vec<u8>, Vec<u8>>, String>| match r {
                    Ok(m) => show_xattrs(m),
                    Err(e) => format!("error ({e})"),
                };
                d("xattrs", f(xa), f(ya));
            }
        }
        if let (Some(xs), Some(ys)) = (&x.sha256, &y.sha256) {
            if xs != ys {
                let f = |r: &Result<String, String>| match r {
                    Ok(h) => format!("sha256:{h}"),
                    Err(e) => format!("error ({e})"),
                };
                d("content", f(xs), f(ys));
            }
        }
    }
    diffs
}

/// Panic with the first 50 differences (and their count) unless the trees are equal.
pub fn assert_trees_equal(actual: &Path, expected: &Path) {
    let d = compare_trees(actual, expected);
    if !d.is_empty() {
        let shown: Vec<&String> = d.iter().take(50).collect();
        panic!(
            "{} differences between {} (actual) and {} (expected); first {}:\n{}",
            d.len(),
            actual.display(),
            expected.display(),
            shown.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

// keep sha256_hex available for tests that hash small buffers
pub fn sha256_of(data: &[u8]) -> String {
    sha256_hex(data)
}

/// A lazysnap mount that is unmounted when dropped, even when the test fails.
pub struct Mounted {
    pub root: PathBuf,
    pub dir: PathBuf,
}

impl Mounted {
    /// `lazysnap --root ROOT mount IMAGE DIR`.
    pub fn new(root: &Path, image: &str, dir: &Path) -> Mounted {
        fs::create_dir_all(dir).unwrap();
        let out = ok(root, &["mount", image, dir.to_str().unwrap()]);
        assert!(out.contains("mounted"), "{out}");
        Mounted {
            root: root.to_path_buf(),
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = lazysnap(&self.root, &["umount", self.dir.to_str().unwrap()]);
    }
}

/// The mounts a snapshot's Prepare or View returned, mounted at a directory as containerd would
/// (`mount -t overlay` / `mount --rbind`), unmounted when dropped.
pub struct SnapshotMount {
    pub dir: PathBuf,
}

impl SnapshotMount {
    /// Mounts `mounts` (the JSON list `snapshot prepare|view|mounts` prints) at `dir`.
    pub fn new(mounts: &serde_json::Value, dir: &Path) -> SnapshotMount {
        fs::create_dir_all(dir).unwrap();
        let list = mounts.as_array().expect("a list of mounts");
        assert_eq!(list.len(), 1, "one mount: {mounts}");
        let m = &list[0];
        let kind = m["type"].as_str().unwrap();
        let source = m["source"].as_str().unwrap();
        let options: Vec<&str> = m["options"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_str().unwrap())
            .collect();
        let out = match kind {
            "overlay" => Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o", &options.join(",")])
                .arg(dir)
                .output()
                .unwrap(),
            "bind" => Command::new("mount")
                .args(["--rbind", "-o", &options.join(",")])
                .arg(source)
                .arg(dir)
                .output()
                .unwrap(),
            other => panic!("unexpected mount type {other}: {mounts}"),
        };
        assert!(
            out.status.success(),
            "mounting {mounts} at {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        SnapshotMount {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for SnapshotMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-R").arg(&self.dir).status();
    }
}

/// `lazysnap --root ROOT ARGS…` whose stdout is JSON.
pub fn json(root: &Path, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(root, args)).unwrap()
}

/// The chain ID of an image's top layer.
pub fn top_chain(root: &Path, image: &str) -> String {
    json(root, &["inspect", image])["Snapshot"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Imports test image `src` (of [`testdata`]) as `name`.
pub fn import_image(root: &Path, src: &str, name: &str) {
    ok(
        root,
        &["import", image(src).to_str().unwrap(), "--name", name],
    );
}

/// The pids of this build's `lazysnap` processes whose command line names `path` (the mount
/// daemons of a root or of a mountpoint; their keepers are not counted).
pub fn lazysnap_processes(path: &Path) -> Vec<u32> {
    lazysnap_processes_of(path, false)
}

/// The `fuse-keeper`s (src/keeper.rs) with `path` in their arguments.
pub fn keeper_processes(path: &Path) -> Vec<u32> {
    lazysnap_processes_of(path, true)
}

fn lazysnap_processes_of(path: &Path, keepers: bool) -> Vec<u32> {
    let needle = path.as_os_str().as_bytes().to_vec();
    // /proc/PID/exe is the resolved path; the binary's may lead through a symlink.
    let bin = fs::canonicalize(lazysnap_bin()).unwrap_or_else(|_| lazysnap_bin());
    let Ok(proc) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let exe = fs::read_link(e.path().join("exe")).ok()?;
            let cmd = fs::read(e.path().join("cmdline")).ok()?;
            let keeper = cmd.split(|b| *b == 0).any(|a| a == b"fuse-keeper");
            (exe == bin && keeper == keepers && cmd.windows(needle.len()).any(|w| w == needle))
                .then_some(pid)
        })
        .collect()
}

/// Runs `script` with `bash -euo pipefail` in `dir` with `envs`; panics with its stderr when it
/// fails. Returns stdout.
pub fn bash_in(dir: &Path, script: &str, envs: &[(&str, &OsStr)]) -> String {
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "in {}: {script}\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every entry under `dir` (not following symlinks) with its metadata.
pub fn entries_under(dir: &Path) -> Vec<(PathBuf, fs::Metadata)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let md = fs::symlink_metadata(e.path()).unwrap();
            if md.is_dir() {
                todo.push(e.path());
            }
            out.push((e.path(), md));
        }
    }
    out
}

/// One run of a Go conformance suite (tests/conformance, tests/conformance2) against this
/// build's `lazysnap serve`: its stdout and its `--- PASS/FAIL/SKIP` lines.
pub struct GoSuiteRun {
    pub stdout: String,
    pub summary: Vec<String>,
}

impl GoSuiteRun {
    pub fn passed(&self, name: &str) -> bool {
        let name = format!("{name} ");
        self.summary
            .iter()
            .any(|l| l.contains("--- PASS") && l.contains(&name))
    }
}

/// Runs `go test -count=1 -v .` in `dir` with `envs` (plus LAZYSNAP_BIN and a log directory);
/// prints the summary and panics, with the servers' logs that hold warnings, when it fails.
pub fn run_go_suite(label: &str, dir: &Path, envs: &[(&str, &OsStr)]) -> GoSuiteRun {
    let logs_dir = tempfile::tempdir().unwrap();
    let logs = logs_dir.path().join("logs");
    let start = std::time::Instant::now();
    let out = Command::new("go")
        .args(["test", "-count=1", "-v", "-timeout", "15m", "."])
        .current_dir(dir)
        .envs(envs.iter().copied())
        .env("LAZYSNAP_BIN", lazysnap_bin())
        .env("LAZYSNAP_CONFORMANCE_LOGS", &logs)
        .output()
        .expect("running go test");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let summary: Vec<String> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("--- "))
        .map(str::to_string)
        .collect();
    eprintln!(
        "go test ({label}) took {:.1}s:\n{}",
        start.elapsed().as_secs_f64(),
        summary.join("\n")
    );
    if !out.status.success() {
        let warnings: String = fs::read_dir(&logs)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| {
                let text = fs::read_to_string(e.path()).unwrap_or_default();
                format!("== {}\n{text}", e.path().display())
            })
            .filter(|s| s.contains("ERROR") || s.contains("WARN"))
            .collect();
        panic!(
            "{label} failed:\n{stdout}\n{}\nserver logs with warnings:\n{warnings}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    GoSuiteRun { stdout, summary }
}

/// Builds the Go main in `tools/<tool>` (static, no network toolchain switch, the module's
/// go.sum as is) into `out`; panics with go's stderr on failure.
pub fn go_build_tool(tool: &str, out: &Path) {
    let built = std::process::Command::new("go")
        .args(["build", "-trimpath", "-o"])
        .arg(out)
        .arg(".")
        .current_dir(repo_root().join("tools").join(tool))
        .env("CGO_ENABLED", "0")
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-buildvcs=false -mod=readonly")
        .env("GOCACHE", repo_root().join("target/go-build-cache"))
        .output()
        .expect("running go build");
    assert!(
        built.status.success(),
        "go build tools/{tool}: {}",
        String::from_utf8_lossy(&built.stderr)
    );
}

/// The first `n` bytes of a tar of real files (libraries, binaries, text).
pub fn machine_corpus(n: usize) -> Vec<u8> {
    static DATA: OnceLock<Vec<u8>> = OnceLock::new();
    let all = DATA.get_or_init(|| {
        let mut child = Command::new("tar")
            .args([
                "-cf",
                "-",
                "/usr/lib/x86_64-linux-gnu",
                "/usr/share",
                "/usr/bin",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("tar");
        let mut out = Vec::new();
        child
            .stdout
            .take()
            .expect("stdout")
            .take(64 << 20)
            .read_to_end(&mut out)
            .expect("read tar");
        let _ = child.kill();
        let _ = child.wait();
        assert!(out.len() >= 48 << 20, "only {} bytes of corpus", out.len());
        out
    });
    all[..n].to_vec()
}
