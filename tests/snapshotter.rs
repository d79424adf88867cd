//! [snapshotter] through the CLI: containerd's contract rule by rule, the seed's walkthrough
//! (import a layer, the next, run a container, commit), a script of file operations run on a
//! writable mount and on a plain copy of the reference tree, and the commit round trip
//! (commit, export, import elsewhere, mount, compare).

mod common;

use common::{can_mount, fails as err, json, lazysnap, ok, top_chain};

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Removes every snapshot (children first) so no mount outlives the test.
struct Cleanup(PathBuf);
impl Drop for Cleanup {
    fn drop(&mut self) {
        for _ in 0..10 {
            let out = lazysnap(
                &self.0,
                &["snapshot", "ls", "--json", "--filter", "kind!=committed"],
            );
            let Ok(list) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
                return;
            };
            let Some(list) = list.as_array() else { return };
            if list.is_empty() {
                return;
            }
            for s in list {
                let _ = lazysnap(
                    &self.0,
                    &["snapshot", "rm", s["name"].as_str().unwrap_or("")],
                );
            }
        }
    }
}

#[test]
fn contract_rules_and_errors() {
    if !can_mount() {
        return;
    }
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let _c = Cleanup(root.clone());
    ok(
        &root,
        &[
            "import",
            data.join("edge-none").to_str().unwrap(),
            "--name",
            "edge",
        ],
    );
    let parent = top_chain(&root, "edge");

    // Prepare, and the same key again: AlreadyExists (keys and names share one space).
    ok(
        &root,
        &[
            "snapshot",
            "prepare",
            "a1",
            &parent,
            "--label",
            "containerd.io/snapshot/x=1",
            "--label",
            "other=2",
        ],
    );
    assert!(err(&root, &["snapshot", "prepare", "a1", &parent]).contains("already exists"));
    assert!(err(&root, &["snapshot", "view", &parent, &parent]).contains("already exists"));
    // Parent must exist and be committed.
    assert!(err(&root, &["snapshot", "prepare", "a2", "nope"]).contains("not found"));
    assert!(err(&root, &["snapshot", "prepare", "a2", "a1"]).contains("failed precondition"));
    // Views can never be committed; committed snapshots have no mounts.
    ok(&root, &["snapshot", "view", "v1", &parent]);
    assert!(err(&root, &["snapshot", "commit", "c-v", "v1"]).contains("failed precondition"));
    assert!(err(&root, &["snapshot", "mounts", &parent]).contains("failed precondition"));
    let m = json(&root, &["snapshot", "mounts", "v1"]);
    assert_eq!(m[0]["type"], "bind");
    assert!(m[0]["options"]
        .as_array()
        .unwrap()
        .iter()
        .any(|o| o == "ro"));
    // Stat of both kinds; unknown keys are NotFound.
    assert_eq!(json(&root, &["snapshot", "stat", "a1"])["kind"], "active");
    assert_eq!(json(&root, &["snapshot", "stat", "v1"])["kind"], "view");
    assert_eq!(
        json(&root, &["snapshot", "stat", &parent])["kind"],
        "committed"
    );
    assert!(err(&root, &["snapshot", "stat", "nope"]).contains("not found"));

    // Commit keeps the active key; only inheritable labels pass on; the name must be new.
    let info = json(
        &root,
        &["snapshot", "commit", "c1", "a1", "--label", "mine=3"],
    );
    assert_eq!(info["kind"], "committed");
    assert_eq!(info["parent"], parent.as_str());
    assert_eq!(info["labels"]["containerd.io/snapshot/x"], "1");
    assert_eq!(info["labels"]["mine"], "3");
    assert!(info["labels"].get("other").is_none(), "{info}");
    assert_eq!(json(&root, &["snapshot", "stat", "a1"])["kind"], "active");
    assert!(err(&root, &["snapshot", "commit", "c1", "a1"]).contains("already exists"));
    // Commit may be called again on the same key.
    ok(&root, &["snapshot", "commit", "c2", "a1"]);

    // Remove fails while children exist.
    ok(&root, &["snapshot", "prepare", "child", "c1"]);
    assert!(err(&root, &["snapshot", "rm", "c1"]).contains("failed precondition"));
    ok(&root, &["snapshot", "rm", "child"]);
    ok(&root, &["snapshot", "rm", "c1"]);
    assert!(err(&root, &["snapshot", "stat", "c1"]).contains("not found"));

    // Update labels (set and delete), Walk with filters.
    let info = json(&root, &["snapshot", "label", "a1", "k=v", "other="]);
    assert_eq!(info["labels"]["k"], "v");
    assert!(info["labels"].get("other").is_none());
    let names = |f: &[&str]| -> Vec<String> {
        let mut args = vec!["snapshot", "ls", "--json"];
        for x in f {
            args.push("--filter");
            args.push(x);
        }
        let mut v: Vec<String> = json(&root, &args)
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&["kind==active"]), vec!["a1"]);
    assert_eq!(names(&["kind==view"]), vec!["v1"]);
    assert_eq!(names(&[r#"labels."k"==v"#]), vec!["a1"]);
    assert_eq!(names(&["name==c2", "name==v1"]), vec!["c2", "v1"]);
    assert!(names(&[&format!("parent=={parent}")]).contains(&"a1".to_string()));
    assert!(err(&root, &["snapshot", "ls", "--filter", "bogus==1"]).contains("invalid"));

    // Usage: an active snapshot's own changes; removing an active snapshot unmounts it.
    let m = json(&root, &["snapshot", "mounts", "a1"]);
    let mnt = common::SnapshotMount::new(&m, &tmp.path().join("a1"));
    fs::write(mnt.dir.join("new-file"), vec![7u8; 100_000]).unwrap();
    drop(mnt);
    let usage = json(&root, &["snapshot", "usage", "a1"]);
    assert!(usage["size"].as_i64().unwrap() >= 100_000, "{usage}");
    assert!(usage["inodes"].as_i64().unwrap() >= 1);
    let dirs = |root: &Path| {
        fs::read_dir(root.join("snapshots"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let before = dirs(&root);
    ok(&root, &["snapshot", "rm", "a1"]);
    assert_eq!(dirs(&root), before - 1, "its directory went with it");
}

/// Untars `layer` into `dir` as containerd's apply would (GNU tar keeps owners as root).
fn untar(layer: &Path, dir: &Path) {
    let st = Command::new("tar")
        .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf"])
        .arg(layer)
        .arg("-C")
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn seed_walkthrough_in_overlay_mode() {
    seed_walkthrough("overlay");
}

#[test]
fn seed_walkthrough_in_fuse_mode() {
    seed_walkthrough("fuse");
}

/// Importing layers into prepared snapshots, running a program in a container snapshot,
/// committing, exporting and importing elsewhere, with the returned mounts mounted as
/// containerd mounts them, in upper mode `mode`.
fn seed_walkthrough(mode: &str) {
    if !can_mount() {
        return;
    }
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let _c = Cleanup(root.clone());
    // Importing a layer: Prepare on "", apply the tar into the mounts, Commit, Remove.
    let layers: Vec<PathBuf> = {
        let mut v: Vec<PathBuf> = fs::read_dir(data.join("debian-layers"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "tar"))
            .collect();
        v.sort();
        v
    };
    assert!(layers.len() >= 2);
    let mut parent = String::new();
    for (i, layer) in layers.iter().take(2).enumerate() {
        let key = format!("extract-{i}");
        let m = json(
            &root,
            &["--upper", mode, "snapshot", "prepare", &key, &parent],
        );
        let mnt = common::SnapshotMount::new(&m, &tmp.path().join(&key));
        untar(layer, &mnt.dir);
        drop(mnt);
        let name = format!("layer-{i}");
        ok(&root, &["snapshot", "commit", &name, &key]);
        ok(&root, &["snapshot", "rm", &key]);
        parent = name;
    }
    // Running a container: Prepare on the top layer, run a program that writes, commit.
    let m = json(
        &root,
        &["--upper", mode, "snapshot", "prepare", "container", &parent],
    );
    let info = json(&root, &["snapshot", "stat", "container"]);
    assert_eq!(info["upper"], mode, "{info}");
    if mode == "overlay" {
        assert_eq!(m[0]["type"], "overlay", "{m}");
    }
    let mnt = common::SnapshotMount::new(&m, &tmp.path().join("container"));
    let out = Command::new("chroot")
        .arg(&mnt.dir)
        .args(["/usr/bin/python3", "-c", "open('/root/hello.txt','w').write('hi from python'); import os; os.remove('/etc/debian_version')"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(mnt);
    ok(&root, &["snapshot", "commit", "app", "container"]);
    ok(&root, &["snapshot", "rm", "container"]);
    // The committed chain, exported and imported elsewhere, shows the container's changes.
    let out_dir = tmp.path().join("exported");
    ok(&root, &["export", "app", out_dir.to_str().unwrap()]);
    let root2 = tmp.path().join("root2");
    let _c2 = Cleanup(root2.clone());
    ok(
        &root2,
        &["import", out_dir.to_str().unwrap(), "--name", "app:1"],
    );
    let m2 = tmp.path().join("m2");
    fs::create_dir_all(&m2).unwrap();
    ok(&root2, &["mount", "app:1", m2.to_str().unwrap()]);
    let hello = fs::read_to_string(m2.join("root/hello.txt"));
    let gone = m2.join("etc/debian_version").exists();
    let python = m2.join("usr/bin/python3").exists();
    ok(&root2, &["umount", m2.to_str().unwrap()]);
    assert_eq!(hello.unwrap(), "hi from python");
    assert!(!gone, "the deleted file must stay deleted");
    assert!(python);
    // umoci reads the export too, and agrees with our mount of it.
    if common::have_cmd("umoci") {
        let reference = common::reference_tree(&out_dir, "app");
        fs::create_dir_all(&m2).unwrap();
        ok(&root2, &["mount", "app:1", m2.to_str().unwrap()]);
        let diffs = common::compare_trees(&m2, &reference);
        ok(&root2, &["umount", m2.to_str().unwrap()]);
        assert!(
            diffs.is_empty(),
            "{}",
            diffs
                .iter()
                .take(50)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// File operations a container makes, run in a directory; ends by pinning the times of what it
/// touched so two runs at different moments compare equal.
const SCRIPT: &str = r#"
set -e
touch /tmp/.lazysnap-stamp-$$
sleep 0.01
echo "new file" > new.txt
printf 'appended\n' >> etc/os-release
printf 'appended\n' >> etc/issue
# Kernel overlayfs without `index` breaks a lower hardlink group on copy-up (containerd's
# overlayfs snapshotter too): only the FUSE upper keeps it.
if [ "$UPPER" = fuse ]; then printf 'through a hardlink\n' >> usr/share/lazysnap/hl/orig; fi
truncate -s 10 usr/bin/python3.11
rm -f etc/host.conf bin/ls
rm -rf usr/share/doc
mkdir -p usr/share/doc/again && echo again > usr/share/doc/again/file
mv etc/debian_version etc/debian_version.moved
mv usr/lib/python3.11/json usr/lib/python3.11/json-renamed
ln -s /etc/debian_version.moved version-link
ln new.txt new-hardlink.txt
chmod 0600 etc/issue.net
chown 1234:5678 etc/xattr.conf
chmod u+s new.txt
setfattr -n user.test -v hello new.txt
mkfifo a-fifo
mknod a-char c 1 3
head -c 4096 /dev/zero | tr "\\0" s | dd of=sparse bs=4096 count=1 seek=1000 status=none
echo replaced > usr/lib/os-release
mkdir -p deep/a/b/c && echo x > deep/a/b/c/f && rm -rf deep/a/b
rmdir opt 2>/dev/null || true
find . -xdev -newer /tmp/.lazysnap-stamp-$$ -exec touch -h -d @1700000000 {} +
touch -h -d @1700000000 .
rm -f /tmp/.lazysnap-stamp-$$
"#;

fn run_script(dir: &Path, mode: &str) {
    common::bash_in(dir, SCRIPT, &[("UPPER", std::ffi::OsStr::new(mode))]);
}

#[test]
fn writable_overlay_mount_matches_a_plain_copy_and_commit_round_trips() {
    writable_mount_round_trip("overlay");
}

#[test]
fn writable_fuse_mount_matches_a_plain_copy_and_commit_round_trips() {
    writable_mount_round_trip("fuse");
}

fn writable_mount_round_trip(mode: &str) {
    if !can_mount() || !common::require(common::have_cmd("umoci"), "umoci") {
        return;
    }
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let _c = Cleanup(root.clone());
    ok(
        &root,
        &[
            "import",
            data.join("debian-gzip").to_str().unwrap(),
            "--name",
            "deb",
        ],
    );
    let reference = common::reference_tree(&data.join("debian-gzip"), common::TAG);
    let plain = tmp.path().join("plain");
    assert!(Command::new("cp")
        .arg("-a")
        .arg(&reference)
        .arg(&plain)
        .status()
        .unwrap()
        .success());
    let mnt = tmp.path().join("rw");
    fs::create_dir_all(&mnt).unwrap();
    let out = ok(
        &root,
        &[
            "--upper",
            mode,
            "mount",
            "deb",
            mnt.to_str().unwrap(),
            "--rw",
        ],
    );
    assert!(out.contains(&format!("upper: {mode}")), "{out}");
    run_script(&mnt, mode);
    run_script(&plain, mode);
    let diffs = common::compare_trees(&mnt, &plain);
    assert!(
        diffs.is_empty(),
        "mount vs plain copy:\n{}",
        diffs
            .iter()
            .take(50)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Commit into a new image; export it; umoci's unpack of the export equals the plain copy.
    ok(&root, &["commit", mnt.to_str().unwrap(), "deb-changed:v2"]);
    let out_dir = tmp.path().join("export");
    ok(
        &root,
        &["export", "deb-changed:v2", out_dir.to_str().unwrap()],
    );
    let unpacked = common::reference_tree(&out_dir, "v2");
    let diffs = common::compare_trees(&unpacked, &plain);
    assert!(
        diffs.is_empty(),
        "umoci unpack of the commit vs plain copy:\n{}",
        diffs
            .iter()
            .take(50)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // And lazysnap mounts the new image the same way.
    let ro = tmp.path().join("ro");
    fs::create_dir_all(&ro).unwrap();
    ok(&root, &["mount", "deb-changed:v2", ro.to_str().unwrap()]);
    let diffs = common::compare_trees(&ro, &plain);
    ok(&root, &["umount", ro.to_str().unwrap()]);
    assert!(
        diffs.is_empty(),
        "mount of the commit vs plain copy:\n{}",
        diffs
            .iter()
            .take(50)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    ok(&root, &["umount", mnt.to_str().unwrap()]);
}
