//! [overlay] Active snapshots as the kernel's overlayfs over one shared read-only lazysnap mount
//! per chain: every snapshot of an image uses the same lower mount and daemon, which goes with
//! the last of them; a commit of an overlay upper (0/0 whiteouts, opaque xattrs, copied-up
//! renames, hardlinks, xattrs, devices, sparse files) equals the kernel's merged tree. (A new
//! link to a copied-up lower file is left out: without `index=on` the kernel itself shows the
//! two names with different inode numbers, while the upper holds one hardlinked inode.)

mod common;

use common::{json, ok, top_chain, SnapshotMount};

use std::fs;
use std::path::{Path, PathBuf};

/// The lazysnap FUSE mounts under `root/lowers`.
fn lower_mounts(root: &Path) -> Vec<String> {
    let lowers = format!("{}/lowers/", root.display());
    fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(2) == Some(&"fuse.lazysnap") && f[1].starts_with(&lowers))
                .then(|| f[1].to_string())
        })
        .collect()
}

/// Mount daemons of `root`.
fn daemons(root: &Path) -> usize {
    common::lazysnap_processes(root).len()
}

/// Mount daemons of `root` left after up to 10 s: a daemon exits once the kernel has let go
/// of its connection.
fn daemons_after_exit(root: &Path) -> usize {
    let t = std::time::Instant::now();
    while daemons(root) > 0 && t.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    daemons(root)
}

/// Removes the test's snapshots even when it fails.
struct Cleanup(PathBuf, Vec<String>);
impl Drop for Cleanup {
    fn drop(&mut self) {
        for k in &self.1 {
            let _ = common::lazysnap(&self.0, &["snapshot", "rm", k]);
        }
    }
}

fn prerequisites() -> bool {
    common::can_mount() && common::require(common::is_root(), "root (kernel overlayfs)")
}

#[test]
fn every_snapshot_of_a_chain_shares_one_lower_which_goes_with_the_last() {
    if !prerequisites() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    common::import_image(&root, "debian-gzip", "deb");
    let chain = top_chain(&root, "deb");
    let keys: Vec<String> = (0..5).map(|i| format!("c{i}")).collect();
    let _c = Cleanup(root.clone(), keys.clone());
    let mut mounts = Vec::new();
    for k in &keys {
        let m = json(
            &root,
            &["--upper", "overlay", "snapshot", "prepare", k, &chain],
        );
        assert_eq!(m[0]["type"], "overlay", "{m}");
        mounts.push(SnapshotMount::new(&m, &tmp.path().join(k)));
    }
    assert_eq!(lower_mounts(&root).len(), 1, "one lower for five snapshots");
    assert_eq!(daemons(&root), 1, "one daemon for five snapshots");
    for (m, k) in mounts.iter().zip(&keys) {
        fs::write(m.dir.join("etc/who"), k).unwrap();
    }
    for (m, k) in mounts.iter().zip(&keys) {
        assert_eq!(fs::read_to_string(m.dir.join("etc/who")).unwrap(), *k);
        assert!(fs::read(m.dir.join("usr/bin/python3")).unwrap().len() > 1000);
    }
    // All but the last removed: the lower stays for it.
    let last = mounts.pop().unwrap();
    drop(mounts);
    for k in &keys[..4] {
        ok(&root, &["snapshot", "rm", k]);
    }
    assert_eq!(lower_mounts(&root).len(), 1);
    assert_eq!(fs::read_to_string(last.dir.join("etc/who")).unwrap(), "c4");
    let check = ok(&root, &["check"]);
    assert!(!check.contains("leftover"), "{check}");
    // The last one goes: so does the lower.
    drop(last);
    ok(&root, &["snapshot", "rm", "c4"]);
    assert!(
        lower_mounts(&root).is_empty(),
        "the lower went with its last snapshot"
    );
    assert_eq!(daemons_after_exit(&root), 0);
    let check = ok(&root, &["check"]);
    assert!(!check.contains("leftover"), "{check}");
}

/// `--root` given relative to the working directory: the second snapshot of a chain finds
/// the shared lower the first one mounted (mountinfo lists absolute paths).
#[test]
fn a_relative_root_shares_the_lower_too() {
    if !prerequisites() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    common::import_image(&root, "debian-gzip", "deb");
    let chain = top_chain(&root, "deb");
    let _c = Cleanup(root.clone(), vec!["r1".into(), "r2".into()]);
    for key in ["r1", "r2"] {
        let out = std::process::Command::new(common::lazysnap_bin())
            .current_dir(tmp.path())
            .args([
                "--root", "root", "--upper", "overlay", "snapshot", "prepare",
            ])
            .args([key, &chain])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "prepare {key} with a relative root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(lower_mounts(&root).len(), 1, "one lower for both");
    let m = json(&root, &["snapshot", "mounts", "r2"]);
    let mnt = SnapshotMount::new(&m, &tmp.path().join("r2"));
    assert!(fs::read(mnt.dir.join("usr/bin/python3")).unwrap().len() > 1000);
}

/// Changes that exercise every form an overlay upper holds a change in.
const CHANGES: &str = r#"
set -e
rm -f etc/host.conf bin/ls                      # whiteouts of lower files
rm -rf usr/share/doc                            # a whiteout of a lower directory
mkdir -p usr/share/doc/again && echo again > usr/share/doc/again/file
rm -rf usr/share/base-files && mkdir usr/share/base-files && echo only > usr/share/base-files/only  # opaque
mv usr/lib/python3.11/json usr/lib/python3.11/json-renamed   # a lower dir renamed (copied up)
mv etc/debian_version etc/debian_version.moved
echo new > new.txt && ln new.txt new-hardlink.txt
printf 'appended\n' >> etc/issue
truncate -s 10 usr/bin/python3.11
chmod 0600 etc/issue.net && chown 1234:5678 etc/xattr.conf
setfattr -n user.test -v hello new.txt
ln -s /etc/debian_version.moved version-link
mkfifo a-fifo && mknod a-char c 1 3
head -c 4096 /dev/zero | tr "\\0" s | dd of=sparse bs=4096 count=1 seek=1000 status=none
mkdir -p deep/a/b/c && echo x > deep/a/b/c/f && rm -rf deep/a/b
"#;

#[test]
fn a_commit_of_an_overlay_upper_equals_the_kernels_merged_tree() {
    if !prerequisites() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    common::import_image(&root, "debian-gzip", "deb");
    let chain = top_chain(&root, "deb");
    let _c = Cleanup(root.clone(), vec!["work".into()]);
    let m = json(
        &root,
        &["--upper", "overlay", "snapshot", "prepare", "work", &chain],
    );
    let merged = SnapshotMount::new(&m, &tmp.path().join("merged"));
    common::bash_in(&merged.dir, CHANGES, &[]);
    let upper = fs::read_dir(root.join("snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("upper"))
        .find(|u| u.join("new.txt").exists())
        .expect("the upper");
    let whiteout = fs::symlink_metadata(upper.join("etc/host.conf")).unwrap();
    assert!(
        std::os::unix::fs::FileTypeExt::is_char_device(&whiteout.file_type()),
        "the kernel's whiteout form"
    );
    ok(&root, &["snapshot", "commit", "committed", "work"]);
    // A view of the commit: a read-only bind of its chain's shared lower.
    let _v = Cleanup(root.clone(), vec!["view".into()]);
    let v = json(
        &root,
        &[
            "--upper",
            "overlay",
            "snapshot",
            "view",
            "view",
            "committed",
        ],
    );
    assert_eq!(v[0]["type"], "bind", "{v}");
    let view = SnapshotMount::new(&v, &tmp.path().join("view"));
    assert!(
        fs::write(view.dir.join("x"), b"x").is_err(),
        "a view is read-only"
    );
    let diffs = common::compare_trees(&view.dir, &merged.dir);
    assert!(
        diffs.is_empty(),
        "commit vs the kernel's merged tree:\n{}",
        diffs
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop(merged);
}

/// The regular files under `dir` with their sha256.
fn contents(dir: &Path) -> std::collections::BTreeMap<PathBuf, String> {
    common::entries_under(dir)
        .into_iter()
        .filter(|(_, md)| md.is_file())
        .map(|(p, _)| {
            let sum = common::file_sha256(&p).unwrap();
            (p.strip_prefix(dir).unwrap().to_path_buf(), sum)
        })
        .collect()
}

/// A lower directory renamed in the overlay (a kernel redirect) is committed whole, read from
/// the chain's lower, even when that lower was unmounted before the commit (a reboot, a
/// `check --repair`): the commit mounts it again rather than reading the empty directory.
#[test]
fn a_renamed_lower_directory_is_committed_whole_even_with_its_lower_unmounted() {
    if !prerequisites() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    common::import_image(&root, "debian-gzip", "deb");
    let chain = top_chain(&root, "deb");
    let _c = Cleanup(root.clone(), vec!["work".into(), "view".into()]);
    let m = json(
        &root,
        &["--upper", "overlay", "snapshot", "prepare", "work", &chain],
    );
    let renamed = {
        let merged = SnapshotMount::new(&m, &tmp.path().join("merged"));
        common::bash_in(
            &merged.dir,
            "mv usr/lib/python3.11/json usr/lib/python3.11/json-renamed\n\
             echo added > usr/lib/python3.11/json-renamed/added.txt\n\
             rm usr/lib/python3.11/json-renamed/decoder.py",
            &[],
        );
        contents(&merged.dir.join("usr/lib/python3.11/json-renamed"))
    };
    assert!(renamed.len() > 3, "{renamed:?}");
    for l in lower_mounts(&root) {
        assert!(std::process::Command::new("umount")
            .arg(&l)
            .status()
            .unwrap()
            .success());
    }
    assert!(lower_mounts(&root).is_empty());
    ok(&root, &["snapshot", "commit", "committed", "work"]);
    let v = json(
        &root,
        &[
            "--upper",
            "overlay",
            "snapshot",
            "view",
            "view",
            "committed",
        ],
    );
    let view = SnapshotMount::new(&v, &tmp.path().join("view"));
    assert!(!view.dir.join("usr/lib/python3.11/json").exists());
    assert_eq!(
        contents(&view.dir.join("usr/lib/python3.11/json-renamed")),
        renamed,
        "the renamed directory in the committed layer"
    );
}

/// `mount --rw DIR` then `umount DIR` leaves no daemon running; the snapshot and its changes
/// stay, and a second `mount --rw DIR` brings them back over a freshly mounted lower. A lower
/// another snapshot still uses stays.
#[test]
fn umount_of_a_rw_mount_lets_its_lower_go_and_a_remount_brings_the_changes_back() {
    if !prerequisites() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    common::import_image(&root, "debian-gzip", "deb");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&b).unwrap();
    let keys = [a.clone(), b.clone()]
        .iter()
        .map(|d| format!("rw:{}", d.canonicalize().unwrap().display()))
        .collect();
    let _c = Cleanup(root.clone(), keys);
    let rw = |d: &Path| {
        ok(
            &root,
            &[
                "--upper",
                "overlay",
                "mount",
                "--rw",
                "deb",
                d.to_str().unwrap(),
            ],
        )
    };
    rw(&a);
    rw(&b);
    fs::write(a.join("etc/kept"), "a\n").unwrap();
    assert_eq!(lower_mounts(&root).len(), 1);

    // b still uses the lower: it stays.
    ok(&root, &["umount", a.to_str().unwrap()]);
    assert_eq!(lower_mounts(&root).len(), 1);
    assert!(fs::read(b.join("usr/bin/python3")).unwrap().len() > 1000);

    // The last mount goes: so do the lower and its daemon.
    ok(&root, &["umount", b.to_str().unwrap()]);
    assert!(lower_mounts(&root).is_empty(), "{:?}", lower_mounts(&root));
    assert_eq!(
        daemons_after_exit(&root),
        0,
        "a daemon outlived every mount"
    );

    // Mounted again: the change is back, the lower files read.
    rw(&a);
    assert_eq!(fs::read_to_string(a.join("etc/kept")).unwrap(), "a\n");
    assert!(fs::read(a.join("usr/bin/python3")).unwrap().len() > 1000);
    ok(&root, &["umount", a.to_str().unwrap()]);
    let check = ok(&root, &["check"]);
    assert!(!check.contains("leftover"), "{check}");
}
