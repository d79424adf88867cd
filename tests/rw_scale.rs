//! A writable FUSE-upper mount (`--upper fuse`, the rootless mode) at the scale package managers
//! work at, with few file descriptors: the mount daemon runs under `ulimit -n 256` (soft and
//! hard, so it cannot lift it) while 100k files are untarred into the mount, 20k lower files are
//! copied up, everything is chmod'ed, touched and half of it removed. The committed image must
//! equal the same steps run on a plain directory, field for field, and the daemon's open files
//! stay under the limit throughout.

mod common;

use common::{ok, Mounted};

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// The daemon's open-file limit (soft and hard).
const FD_LIMIT: u32 = 256;
/// Files of the lower image (in `lower/dNN/`), plus links.
const LOWER_FILES: u32 = 20_000;
/// Files of the tar untarred into the mount (in `newdir/dNNN/`).
const UNTAR_FILES: u32 = 100_000;

/// Writes `count` small files of varied content under `dir/dNNN/`, `per_dir` to a directory,
/// with a symlink and a hardlink every 200 files.
fn make_files(dir: &Path, count: u32, per_dir: u32) {
    for i in 0..count {
        let sub = dir.join(format!("d{:03}", i / per_dir));
        if i % per_dir == 0 {
            fs::create_dir_all(&sub).unwrap();
        }
        let name = sub.join(format!("file-{i:06}.txt"));
        let body = format!("{i}\n").repeat((i % 37) as usize + 1);
        fs::write(&name, body).unwrap();
        if i % 200 == 7 {
            std::os::unix::fs::symlink(format!("file-{i:06}.txt"), sub.join(format!("link-{i}")))
                .unwrap();
            fs::hard_link(&name, sub.join(format!("hard-{i}"))).unwrap();
        }
    }
}

fn tar_dir(src: &Path, tar: &Path) {
    let st = Command::new("tar")
        .args(["--owner=0", "--group=0", "--mtime=@1600000000", "-C"])
        .arg(src)
        .arg("-cf")
        .arg(tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success(), "tar of {}", src.display());
}

/// What a package manager does to a root filesystem, in bulk: (what, bash script with `$D` the
/// tree and `$BIG` the tar to untar).
const STEPS: &[(&str, &str)] = &[
    (
        "untar 100k files",
        r#"mkdir "$D/newdir" && tar -xf "$BIG" -C "$D/newdir""#,
    ),
    (
        "append 1 byte to 20k lower files",
        r#"find "$D/lower" -type f -print0 | while IFS= read -r -d '' f; do printf x >> "$f"; done"#,
    ),
    ("chmod -R", r#"chmod -R g+w,o-r "$D""#),
    (
        "rm -rf half",
        r#"rm -rf "$D"/newdir/d0[0-4]* "$D"/lower/d1*"#,
    ),
    (
        "touch every entry",
        r#"find "$D" -exec touch -h -d @1700000000 {} +"#,
    ),
];

/// Runs [`STEPS`] in `dir`; panics on the first failure. Prints what each took.
fn run_steps(dir: &Path, big: &Path, label: &str) {
    for (what, script) in STEPS {
        let t = Instant::now();
        common::bash_in(
            dir,
            script,
            &[("D", dir.as_os_str()), ("BIG", big.as_os_str())],
        );
        eprintln!("{label}: {what}: {:.2} s", t.elapsed().as_secs_f64());
    }
}

fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn a_daemon_under_ulimit_256_takes_100k_files_copy_up_chmod_rm_and_commit() {
    if !common::can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let src = t.join("src");
    make_files(&src.join("lower"), LOWER_FILES, 500);
    let lower_tar = t.join("lower.tar");
    tar_dir(&src, &lower_tar);
    let big_src = t.join("big");
    make_files(&big_src, UNTAR_FILES, 1000);
    let big = t.join("big.tar");
    tar_dir(&big_src, &big);
    fs::remove_dir_all(&big_src).unwrap();

    let layout = t.join("layout");
    let out = Command::new("python3")
        .arg(common::scripts_dir().join("mkimage.py"))
        .arg(&layout)
        .arg(format!("{}:gzip", lower_tar.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root = t.join("root");
    ok(
        &root,
        &["import", layout.to_str().unwrap(), "--name", "many"],
    );

    // The reference: the same steps on a plain directory.
    let plain = t.join("plain");
    fs::create_dir_all(&plain).unwrap();
    let st = Command::new("tar")
        .arg("-xf")
        .arg(&lower_tar)
        .arg("-C")
        .arg(&plain)
        .status()
        .unwrap();
    assert!(st.success());
    run_steps(&plain, &big, "plain dir");

    let mnt = t.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -n {FD_LIMIT} && exec {lz} --root {root} --upper fuse mount --rw many {mnt}",
            lz = common::lazysnap_bin().display(),
            root = root.display(),
            mnt = mnt.display()
        ))
        .output()
        .unwrap();
    let mounted = Mounted {
        root: root.clone(),
        dir: mnt.clone(),
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid = *common::lazysnap_processes(&mnt)
        .first()
        .expect("the mount daemon's pid");
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(&format!(" {FD_LIMIT} "))),
        "the daemon runs under the limit: {limits}"
    );
    // The daemon's open files, sampled while the steps run.
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut most = 0;
            while !done.load(Ordering::Relaxed) {
                most = most.max(open_fds(pid));
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            most
        })
    };
    run_steps(&mnt, &big, "mount --rw");
    done.store(true, Ordering::Relaxed);
    let most = sampler.join().unwrap();
    let fds = open_fds(pid);
    eprintln!(
        "daemon {pid}: at most {most} open files during the steps, {fds} after (limit {FD_LIMIT})"
    );
    assert!(most < FD_LIMIT as usize, "{most} open files");

    let started = Instant::now();
    ok(&root, &["commit", mnt.to_str().unwrap(), "many:2"]);
    eprintln!("commit: {:.2} s", started.elapsed().as_secs_f64());
    drop(mounted);
    let view = t.join("view");
    let _v = Mounted::new(&root, "many:2", &view);
    common::assert_trees_equal(&view, &plain);
}
