//! lazysnap as an ordinary user: a real unprivileged account (created here with `useradd`,
//! commands run through `runuser`), only the setuid `fusermount3` and `newuidmap` of Debian's
//! fuse3 and uidmap packages. Trees are compared with umoci's references through
//! scripts/tree-manifest.py run as that user (root cannot enter a FUSE mount made without
//! `allow_other`).
mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{have_cmd, image, is_root, reference_tree, require, testdata, TAG};

/// The unprivileged account the tests run as.
const USER: &str = "lazysnap-rootless";

#[derive(Clone, Copy)]
struct User {
    uid: u32,
    gid: u32,
}

/// Creates the test account (with subordinate ids for user namespaces) unless it exists.
/// The test user, created once per test process: tests run in parallel, and two `useradd`s of
/// one name at once can both succeed (seen on a fresh machine: uid 1001 then 1002, two subuid
/// ranges), so a test that read the first uid chowned its directories to a user that no longer
/// exists.
fn ensure_user() -> User {
    static USER_ONCE: std::sync::OnceLock<User> = std::sync::OnceLock::new();
    *USER_ONCE.get_or_init(create_user)
}

fn create_user() -> User {
    let id = |flag: &str| {
        Command::new("id")
            .args([flag, USER])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<u32>()
                    .ok()
            })
    };
    if id("-u").is_none() {
        let out = Command::new("useradd")
            .args(["--create-home", "--shell", "/bin/bash", USER])
            .output()
            .expect("running useradd");
        // Another test process may have created it first.
        assert!(
            out.status.success() || id("-u").is_some(),
            "useradd {USER}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let subuid = fs::read_to_string("/etc/subuid").unwrap_or_default();
    if !subuid.lines().any(|l| l.starts_with(&format!("{USER}:"))) {
        let out = Command::new("usermod")
            .args([
                "--add-subuids",
                "200000-265535",
                "--add-subgids",
                "200000-265535",
                USER,
            ])
            .output()
            .expect("running usermod");
        assert!(
            out.status.success(),
            "usermod: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    User {
        uid: id("-u").expect("uid of the test user"),
        gid: id("-g").expect("gid of the test user"),
    }
}

/// Everything these tests need; a missing piece fails in CI.
fn prerequisites() -> Option<User> {
    let ok = require(is_root(), "root (to create the unprivileged test user)")
        && require(have_cmd("runuser"), "runuser (util-linux)")
        && require(
            have_cmd("fusermount3"),
            "fusermount3 (Debian package fuse3)",
        )
        && require(have_cmd("newuidmap"), "newuidmap (Debian package uidmap)")
        && require(have_cmd("umoci"), "umoci (reference trees)")
        && require(have_cmd("python3"), "python3 (scripts/tree-manifest.py)");
    if !ok {
        return None;
    }
    let user = ensure_user();
    let fuse_ok = Command::new("runuser")
        .args([
            "-u",
            USER,
            "--",
            "test",
            "-r",
            "/dev/fuse",
            "-a",
            "-w",
            "/dev/fuse",
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !require(
        fuse_ok,
        "/dev/fuse usable by ordinary users (mode 0666, as Debian's udev rule sets it; \
         scripts/install-deps.sh applies it where udev does not run)",
    ) {
        return None;
    }
    Some(user)
}

/// The namespaces a script runs in.
#[derive(Clone, Copy)]
enum Ns {
    None,
    User,
    UserPid,
}

/// A scratch directory owned by the test user: its XDG dirs, mountpoints and outputs.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(user: &User, name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("lazysnap-rootless-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for sub in ["", "data", "run", "mnt", "rw", "out"] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).unwrap();
            std::os::unix::fs::chown(&d, Some(user.uid), Some(user.gid)).unwrap();
            fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
        }
        // The parent must let the user through.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        Scratch { dir }
    }

    /// Runs a bash script as the test user, with a clean environment; `$L` is lazysnap,
    /// `$S` this directory, `$TREE` the manifest script. `userns` runs it in a new user and
    /// mount namespace (root mapped to the user, 1..65535 to its subordinate ids).
    fn run(&self, userns: bool, script: &str) -> Output {
        self.run_in(if userns { Ns::User } else { Ns::None }, script)
    }

    fn run_in(&self, ns: Ns, script: &str) -> Output {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", USER, "--"]);
        match ns {
            Ns::None => {}
            Ns::User => {
                cmd.args(["unshare", "--map-root-user", "--map-auto", "--mount", "--"]);
            }
            // What rootlesskit sets up for rootless containerd: user, mount and pid namespaces.
            Ns::UserPid => {
                cmd.args([
                    "unshare",
                    "--map-root-user",
                    "--map-auto",
                    "--mount",
                    "--pid",
                    "--fork",
                    "--mount-proc",
                    "--",
                ]);
            }
        }
        cmd.arg("env")
            .arg("-i")
            .arg(format!("HOME=/home/{USER}"))
            .arg("PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .arg(format!("XDG_DATA_HOME={}", self.dir.join("data").display()))
            .arg(format!(
                "XDG_RUNTIME_DIR={}",
                self.dir.join("run").display()
            ))
            .arg(format!("L={}", common::lazysnap_bin().display()))
            .arg(format!("LAZYSNAP_BIN={}", common::lazysnap_bin().display()))
            .arg(format!("SCRIPTS={}", common::scripts_dir().display()))
            .arg(format!("S={}", self.dir.display()))
            .arg(format!(
                "TREE={}",
                common::scripts_dir().join("tree-manifest.py").display()
            ))
            .args(["bash", "-euo", "pipefail", "-c", script]);
        cmd.output().expect("running runuser")
    }

    /// [`Scratch::run`], asserting success; returns stdout.
    fn ok(&self, userns: bool, script: &str) -> String {
        let out = self.run(userns, script);
        assert!(
            out.status.success(),
            "as {USER}{}: {script}\nstdout: {}\nstderr: {}",
            if userns { " in a user namespace" } else { "" },
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Mounts made in the test's user namespaces end with them; plain ones are unmounted here.
        for sub in ["mnt", "rw"] {
            let _ = lazysnap_fuse::unmount(&self.dir.join(sub));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

type Manifest = BTreeMap<String, BTreeMap<String, String>>;

fn parse_manifest(text: &str) -> Manifest {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let mut f = l.split('\t');
            let path = f.next().unwrap_or_default().to_string();
            let fields = f
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            (path, fields)
        })
        .collect()
}

fn manifest_of(dir: &Path) -> Manifest {
    let out = Command::new("python3")
        .arg(common::scripts_dir().join("tree-manifest.py"))
        .arg(dir)
        .output()
        .expect("running tree-manifest.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_manifest(&String::from_utf8_lossy(&out.stdout))
}

/// The reference manifest of a test image, with directories no layer declares (umoci stamps
/// them with the unpack time) listed apart.
fn reference(layout: &Path, tag: &str) -> (Manifest, Vec<String>) {
    let rootfs = reference_tree(layout, tag);
    let implicit = fs::read_to_string(rootfs.parent().unwrap().join("implicit-dirs.txt"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            if l == "." {
                "/".to_string()
            } else {
                format!("/{l}")
            }
        })
        .collect();
    (manifest_of(&rootfs), implicit)
}

/// Every difference between two manifests, field by field; `skip` names fields not compared.
fn diff(actual: &Manifest, expected: &Manifest, implicit: &[String], skip: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for p in actual.keys().filter(|p| !expected.contains_key(*p)) {
        out.push(format!("{p}: only in the mount"));
    }
    for p in expected.keys().filter(|p| !actual.contains_key(*p)) {
        out.push(format!("{p}: only in the reference"));
    }
    for (p, a) in actual {
        let Some(e) = expected.get(p) else { continue };
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(e.keys()).collect();
        for k in keys {
            if skip.contains(&k.as_str()) || (k == "mtime" && implicit.contains(p)) {
                continue;
            }
            if a.get(k) != e.get(k) {
                out.push(format!(
                    "{p}: {k}: mount {:?}, reference {:?}",
                    a.get(k),
                    e.get(k)
                ));
            }
        }
    }
    out
}

/// `m` as seen in the tests' user namespaces (root and 1..65535 mapped, `--map-auto` with a
/// 65536-id subordinate range): the kernel shows unmapped ids as the overflow id 65534.
fn through_userns_map(m: &Manifest) -> Manifest {
    let mut m = m.clone();
    for f in m.values_mut() {
        for k in ["uid", "gid"] {
            if let Some(v) = f.get_mut(k) {
                if v.parse::<u64>().is_ok_and(|id| id > 65535) {
                    *v = "65534".into();
                }
            }
        }
    }
    m
}

fn assert_no_diffs(what: &str, diffs: &[String]) {
    assert!(
        diffs.is_empty(),
        "{what}: {} differences, first ones:\n{}",
        diffs.len(),
        diffs
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Import, mount through fusermount3 and read as a plain user (no user namespace): the image's
/// owners shown as recorded; with `--owners caller` every file is the user's and the whole tree
/// reads byte for byte like umoci's.
#[test]
fn plain_user_imports_mounts_and_reads() {
    let Some(user) = prerequisites() else { return };
    for name in ["debian-gzip", "debian-zstd"] {
        let layout = image(name);
        let (expected, implicit) = reference(&layout, TAG);
        let s = Scratch::new(&user, name);
        let out = s.ok(
            false,
            &format!(
                r#"$L import {layout} --name img:1 >/dev/null
                test -d "$XDG_DATA_HOME/lazysnap/index"
                $L mount img:1 $S/mnt >/dev/null
                grep -q " $S/mnt fuse.lazysnap .*user_id=$(id -u)" /proc/self/mounts
                python3 $TREE $S/mnt > $S/out/image-owners
                $L umount $S/mnt >/dev/null
                $L mount --owners caller img:1 $S/mnt >/dev/null
                python3 $TREE $S/mnt > $S/out/caller-owners
                $L umount $S/mnt"#,
                layout = layout.display()
            ),
        );
        assert!(out.contains("unmounted"), "{out}");
        let read =
            |f: &str| parse_manifest(&fs::read_to_string(s.dir.join("out").join(f)).unwrap());

        // Image owners: what the user may not read (root's 0700 dirs, 0600 files) is not
        // read, but every path the user can reach has the image's metadata.
        let image_owners = read("image-owners");
        let unreadable: Vec<String> = image_owners
            .iter()
            .filter(|(_, f)| f.contains_key("error"))
            .map(|(p, _)| format!("{}/", p.trim_end_matches('/')))
            .collect();
        let below_unreadable = |p: &String| unreadable.iter().any(|u| p.starts_with(u.as_str()));
        let reachable: Manifest = expected
            .iter()
            .filter(|(p, _)| !below_unreadable(p))
            .map(|(p, f)| (p.clone(), f.clone()))
            .collect();
        assert!(
            reachable.len() > expected.len() * 9 / 10,
            "{name}: only {} of {} paths reachable",
            reachable.len(),
            expected.len()
        );
        let diffs = diff(
            &image_owners,
            &reachable,
            &implicit,
            &["sha256", "error", "xattrs"],
        );
        assert_no_diffs(&format!("{name}, image owners"), &diffs);
        let root_owned = image_owners
            .values()
            .filter(|f| f.get("uid").map(String::as_str) == Some("0"));
        assert!(
            root_owned.count() > 1000,
            "{name}: the image's root-owned files show as root's"
        );

        // Squashed to the caller: the reference with every owner the user.
        let mut squashed = expected.clone();
        for f in squashed.values_mut() {
            f.insert("uid".into(), user.uid.to_string());
            f.insert("gid".into(), user.gid.to_string());
        }
        let diffs = diff(&read("caller-owners"), &squashed, &implicit, &[]);
        assert_no_diffs(&format!("{name}, --owners caller"), &diffs);
    }
}

/// In a user namespace (as rootless containerd and podman run): the mount shows the image's
/// owners through the namespace's id maps and reads exactly like umoci's tree; a `--rw` mount
/// records chown/chmod/mknod without privilege, and the commit and export carry them.
/// [upgrade] A plain user's read-only mount outlives its daemon too: passing an fd needs no
/// privilege, so the user's own keeper starts the next daemon, and the tree read after three
/// `kill -9`s equals the one read before.
#[test]
fn a_plain_users_mount_survives_kill_9_of_its_daemon() {
    let Some(user) = prerequisites() else { return };
    let layout = image("debian-zstd");
    let s = Scratch::new(&user, "keeper");
    s.ok(
        false,
        &format!(
            r#"$L import {layout} --name img >/dev/null
            $L mount img $S/mnt >/dev/null
            python3 $TREE $S/mnt > $S/out/before
            daemon() {{ pgrep -u "$(id -u)" -f "mount --foreground .* $S/mnt" | while read p; do
                grep -qa fuse-keeper /proc/$p/cmdline || echo $p; done; }}
            test -n "$(pgrep -u "$(id -u)" -f "fuse-keeper .* $S/mnt")"
            # Every readable file's bytes; any error but the user's own EACCES fails.
            sum() {{ {{ find $S/mnt -type f -readable -exec cat {{}} + 2>$S/out/err || true; }} | md5sum > $S/out/sum-$1
                ! grep -v "Permission denied" $S/out/err; }}
            sum 0
            for i in 1 2 3; do
                d=$(daemon); test -n "$d"; kill -9 $d
                for t in $(seq 100); do n=$(daemon); [ -n "$n" ] && [ "$n" != "$d" ] && break; sleep 0.1; done
                test "$n" != "$d"
                sum $i
            done
            python3 $TREE $S/mnt > $S/out/after
            $L umount $S/mnt >/dev/null"#,
            layout = layout.display()
        ),
    );
    let read = |f: &str| fs::read_to_string(s.dir.join("out").join(f)).unwrap();
    assert_eq!(read("after"), read("before"), "the tree after three kills");
    assert!(read("before").lines().count() > 1000);
    for i in 1..=3 {
        assert_eq!(
            read(&format!("sum-{i}")),
            read("sum-0"),
            "the bytes after kill {i}"
        );
    }
}

/// A plain user's `--rw` mount (FUSE upper: its daemon holds the writes) survives `kill -9` of
/// its daemon: a file held open for writing takes every line written across the kills, the
/// changes made before a kill stay, changes after it work, and the commit holds them all.
#[test]
fn a_plain_users_writable_mount_survives_kill_9_of_its_daemon() {
    let Some(user) = prerequisites() else { return };
    let layout = image("debian-zstd");
    let s = Scratch::new(&user, "keeper-rw");
    s.ok(
        false,
        &format!(
            r#"$L import {layout} --name img >/dev/null
            $L mount --rw img $S/rw >/dev/null
            daemon() {{ pgrep -u "$(id -u)" -f "mount --foreground .* $S/rw" | while read p; do
                grep -qa fuse-keeper /proc/$p/cmdline || echo $p; done; }}
            test -n "$(pgrep -u "$(id -u)" -f "fuse-keeper .* $S/rw")"
            mkdir $S/rw/work
            echo before > $S/rw/work/a
            echo appended >> $S/rw/etc/issue
            # A writer holding its file open for the whole run, one line every 10 ms.
            python3 -c '
import os, sys, time
f = open(sys.argv[1] + "/work/held", "w")
i = 0
while not os.path.exists(sys.argv[2]):
    f.write("line %d\n" % i); f.flush(); i += 1; time.sleep(0.01)
f.close()
print(i)' $S/rw $S/stop > $S/out/lines &
            writer=$!
            for i in 1 2 3; do
                sleep 0.3
                d=$(daemon); test -n "$d"; kill -9 $d
                for t in $(seq 100); do n=$(daemon); [ -n "$n" ] && [ "$n" != "$d" ] && break; sleep 0.1; done
                test "$n" != "$d"
                echo "after kill $i" >> $S/rw/work/a
                mv $S/rw/work/a $S/rw/work/b; mv $S/rw/work/b $S/rw/work/a
            done
            touch $S/stop
            wait $writer
            cat $S/rw/work/a > $S/out/a
            cat $S/rw/work/held > $S/out/held
            tail -n 1 $S/rw/etc/issue > $S/out/issue
            $L commit $S/rw img:2 >/dev/null
            $L umount $S/rw >/dev/null
            $L mount img:2 $S/mnt >/dev/null
            cmp $S/mnt/work/held $S/out/held
            cmp $S/mnt/work/a $S/out/a
            $L umount $S/mnt >/dev/null"#,
            layout = layout.display()
        ),
    );
    let read = |f: &str| fs::read_to_string(s.dir.join("out").join(f)).unwrap();
    assert_eq!(
        read("a"),
        "before\nafter kill 1\nafter kill 2\nafter kill 3\n"
    );
    assert_eq!(read("issue"), "appended\n");
    let lines: usize = read("lines").trim().parse().unwrap();
    let want: String = (0..lines).map(|i| format!("line {i}\n")).collect();
    assert!(lines > 20, "{lines} lines");
    assert_eq!(read("held"), want, "every line written through the held fd");
}

#[test]
fn user_namespace_mount_write_commit_export() {
    let Some(user) = prerequisites() else { return };
    let layout = image("debian-gzip");
    let (expected, implicit) = reference(&layout, TAG);
    let s = Scratch::new(&user, "userns");
    s.ok(
        true,
        &format!(
            r#"test "$(id -u)" = 0
            $L import {layout} --name img:1 >/dev/null
            $L mount img:1 $S/mnt >/dev/null
            python3 $TREE $S/mnt > $S/out/mounted
            $L umount $S/mnt >/dev/null

            $L mount --rw img:1 $S/rw >/dev/null
            cd $S/rw
            printf 'made in a user namespace\n' > new-file
            chown 5:6 new-file
            chmod 4711 new-file
            chown 1000:1000 bin/bash
            chmod 0700 bin/bash
            mkdir -m 0750 new-dir
            chown 7:8 new-dir
            mkfifo new-dir/fifo
            echo appended >> usr/bin/yes
            rm etc/os-release
            rm -r usr/share/man
            cd /
            $L commit $S/rw img:2 >/dev/null
            $L umount $S/rw >/dev/null
            $L export img:2 $S/out/img2 >/dev/null
            $L export img:2 $S/out/img2.tar >/dev/null

            $L mount img:2 $S/mnt >/dev/null
            python3 $TREE $S/mnt > $S/out/committed
            $L umount $S/mnt >/dev/null"#,
            layout = layout.display()
        ),
    );
    let read = |f: &str| parse_manifest(&fs::read_to_string(s.dir.join("out").join(f)).unwrap());

    // trusted.* xattrs are root's only; the Debian images carry none.
    let diffs = diff(
        &read("mounted"),
        &through_userns_map(&expected),
        &implicit,
        &[],
    );
    assert_no_diffs("mount in a user namespace", &diffs);

    // The commit as a peer sees it: umoci unpacks the exported image as root.
    let exported = s.dir.join("out/img2");
    let (committed_ref, implicit2) = reference(&exported, "2");
    let f = |p: &str, k: &str| {
        committed_ref
            .get(p)
            .and_then(|f| f.get(k))
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(
        (
            f("/new-file", "uid"),
            f("/new-file", "gid"),
            f("/new-file", "mode")
        ),
        ("5".into(), "6".into(), "4711".into())
    );
    assert_eq!(
        (f("/bin/bash", "uid"), f("/bin/bash", "mode")),
        ("1000".into(), "0700".into())
    );
    assert_eq!(
        f("/bin/bash", "sha256"),
        expected["/bin/bash"]["sha256"],
        "copy-up kept the content"
    );
    assert_eq!(
        (
            f("/new-dir", "uid"),
            f("/new-dir", "gid"),
            f("/new-dir", "mode")
        ),
        ("7".into(), "8".into(), "0750".into())
    );
    assert_eq!(f("/new-dir/fifo", "type"), "fifo");
    // Copied up by a write, without chown: the image's owner and mode stay.
    assert_eq!(
        (
            f("/usr/bin/yes", "uid"),
            f("/usr/bin/yes", "gid"),
            f("/usr/bin/yes", "mode")
        ),
        ("1000".into(), "1000".into(), "0750".into())
    );
    assert_ne!(
        f("/usr/bin/yes", "sha256"),
        expected["/usr/bin/yes"]["sha256"]
    );
    assert_eq!(
        f("/new-dir/fifo", "uid"),
        "0",
        "made by the namespace's root"
    );
    assert!(!committed_ref.contains_key("/etc/os-release"));
    assert!(!committed_ref
        .keys()
        .any(|p| p.starts_with("/usr/share/man/")));
    assert_eq!(
        f("/", "uid"),
        expected["/"]["uid"],
        "the root keeps the image's owner"
    );

    // The rest of the tree is untouched, and the committed image mounts like umoci's unpack.
    let untouched = |m: &Manifest| -> Manifest {
        m.iter()
            .filter(|(p, _)| {
                ![
                    "/new-file",
                    "/new-dir",
                    "/bin/bash",
                    "/usr/bin/yes",
                    "/etc",
                    "/usr/share",
                    "/usr/bin",
                    "/",
                ]
                .contains(&p.as_str())
                    && !p.starts_with("/new-dir/")
            })
            .map(|(p, f)| (p.clone(), f.clone()))
            .collect()
    };
    let base: Manifest = untouched(&expected)
        .into_iter()
        .filter(|(p, _)| {
            p != "/etc/os-release" && p != "/usr/share/man" && !p.starts_with("/usr/share/man/")
        })
        .collect();
    assert_no_diffs(
        "committed image vs the image",
        &diff(&untouched(&committed_ref), &base, &implicit, &[]),
    );
    assert_no_diffs(
        "committed image mounted vs umoci",
        &diff(
            &read("committed"),
            &through_userns_map(&committed_ref),
            &implicit2,
            &[],
        ),
    );

    // The OCI archive export holds the same image.
    let tar = Command::new("tar")
        .arg("-tf")
        .arg(s.dir.join("out/img2.tar"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&tar.stdout).contains("index.json"));
}

/// Rootless containerd (in user, mount and pid namespaces, as rootlesskit starts it) with
/// `lazysnap serve` as its proxy snapshotter, both run by the unprivileged user: an image is
/// imported, a container runs on a lazysnap snapshot and writes to it.
#[test]
fn rootless_containerd_runs_a_container_on_lazysnap() {
    let Some(user) = prerequisites() else { return };
    if !require(
        have_cmd("containerd") && have_cmd("runc") && have_cmd("ctr"),
        "containerd, ctr and runc",
    ) {
        return;
    }
    let s = Scratch::new(&user, "containerd");
    // Layers 1 and 2 of the Debian image: layer 3 has a file owned by uid 3000000, which no
    // rootless containerd can unpack (containerd's own applier chowns it: EINVAL) — a limit
    // of the user's subordinate ids, not of the snapshotter.
    let layers = testdata().join("debian-layers");
    let archive = s.dir.join("out/rootless.tar");
    let out = Command::new("python3")
        .arg(common::scripts_dir().join("mkimage.py"))
        .arg(s.dir.join("out/rootless-layout"))
        .arg(layers.join("layer1.tar"))
        .arg(layers.join("layer2.tar"))
        .arg("--docker-archive")
        .arg(&archive)
        .args(["--docker-name", "lazysnap-test/rootless:latest"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mkimage.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::os::unix::fs::chown(&archive, Some(user.uid), Some(user.gid)).unwrap();
    let out = s.run_in(
        Ns::UserPid,
        r#"# rootlesskit's --copy-up=/run: ctr keeps its fifos under /run/containerd.
        mount -t tmpfs none /run
        D=$S/env
        trap 'bash $SCRIPTS/containerd-env.sh stop $D >/dev/null 2>&1 || true' EXIT
        bash $SCRIPTS/containerd-env.sh start $D >/dev/null
        ctr() { command ctr -a $D/containerd.sock -n rootless "$@"; }
        ctr images import --snapshotter lazysnap $S/out/rootless.tar >/dev/null
        # No cgroup: an unprivileged user cannot create one without a delegated hierarchy.
        ctr run --rm --cgroup "" --cpu-shares 0 --snapshotter lazysnap \
          docker.io/lazysnap-test/rootless:latest c1 /bin/bash -c \
          'echo "uid=$(id -u)"; echo written > /tmp/w; cat /tmp/w; /usr/bin/python3.11 -c "print(6*7)"'
        echo "snapshots=$(ctr snapshots --snapshotter lazysnap ls | tail -n +2 | wc -l)"
        grep -c "fuse.lazysnap" /proc/self/mountinfo || true"#,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = fs::read_to_string(s.dir.join("env/lazysnap.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "rootless containerd: {stdout}\nstderr: {}\nlazysnap log (tail): {}",
        String::from_utf8_lossy(&out.stderr),
        log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    assert!(stdout.contains("uid=0\nwritten\n42\n"), "{stdout}");
    let snapshots = stdout
        .lines()
        .find_map(|l| l.strip_prefix("snapshots="))
        .and_then(|n| n.trim().parse::<u32>().ok());
    assert_eq!(
        snapshots,
        Some(2),
        "one committed snapshot per layer: {stdout}"
    );
}

/// The edge-case images (whiteouts, opaque dirs, hardlinks, long names, xattrs, devices,
/// sparse files, huge ids) mounted in a user namespace read exactly like umoci's tree, as the
/// namespace sees it: ids mapped, `trusted.*` xattrs (root of the initial namespace only)
/// hidden.
#[test]
fn user_namespace_mounts_the_edge_images() {
    let Some(user) = prerequisites() else { return };
    for name in ["edge-gzip", "edge-zstd"] {
        let layout = image(name);
        let (expected, implicit) = reference(&layout, TAG);
        let s = Scratch::new(&user, name);
        s.ok(
            true,
            &format!(
                r#"$L import {layout} --name img:1 >/dev/null
                $L mount img:1 $S/mnt >/dev/null
                python3 $TREE $S/mnt > $S/out/mounted
                $L umount $S/mnt >/dev/null"#,
                layout = layout.display()
            ),
        );
        let mut expected = through_userns_map(&expected);
        for f in expected.values_mut() {
            if let Some(x) = f.get_mut("xattrs") {
                *x = x
                    .split(',')
                    .filter(|kv| !kv.is_empty() && !kv.starts_with("trusted."))
                    .collect::<Vec<_>>()
                    .join(",");
            }
        }
        let mounted = parse_manifest(&fs::read_to_string(s.dir.join("out/mounted")).unwrap());
        assert_no_diffs(
            &format!("{name} in a user namespace"),
            &diff(&mounted, &expected, &implicit, &[]),
        );
    }
}

/// A writable mount as a plain user (no user namespace) is by default in `--owners caller`
/// mode, as a rootless container is, and says so: writes, chmod, removals and a new fifo
/// without any privilege; the commit records the caller as the image's root (0:0), and the
/// export unpacks (umoci, as root) to exactly that. `--owners image` stays the explicit choice
/// (and there the user cannot write into the image's root-owned directories).
#[test]
fn plain_user_writes_commits_and_exports() {
    let Some(user) = prerequisites() else { return };
    let layout = image("debian-zstd");
    let (expected, _) = reference(&layout, TAG);
    let s = Scratch::new(&user, "plain-rw");
    let out = s.run(
        false,
        &format!(
            r#"$L import {layout} --name img:1 >/dev/null
            mkdir $S/ro
            $L mount --rw --owners image img:1 $S/ro > $S/out/image-mode
            if printf x > $S/ro/etc/denied 2>/dev/null; then echo "wrote as image owners"; exit 1; fi
            $L umount $S/ro >/dev/null
            $L mount --rw img:1 $S/rw > $S/out/default-mode
            cd $S/rw
            printf 'by a plain user\n' > etc/plain
            chmod 0640 etc/plain
            chmod 0700 bin/bash
            mkfifo run-fifo
            rm etc/os-release
            test "$(stat -c %u etc/plain)" = "$(id -u)"
            cd /
            $L commit $S/rw img:2 >/dev/null
            $L umount $S/rw >/dev/null
            $L export img:2 $S/out/img2 >/dev/null"#,
            layout = layout.display()
        ),
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |f: &str| {
        fs::read_to_string(s.dir.join("out").join(f))
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("owners: "))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let default_mode = line("default-mode");
    assert_eq!(default_mode.len(), 1, "{default_mode:?}");
    assert!(
        default_mode[0].starts_with(&format!(
            "owners: caller: every file shows as yours ({}:{})",
            user.uid, user.gid
        )),
        "{default_mode:?}"
    );
    let image_mode = line("image-mode");
    assert_eq!(image_mode.len(), 1, "{image_mode:?}");
    assert!(
        image_mode[0].starts_with("owners: image:"),
        "{image_mode:?}"
    );
    let (committed, _) = reference(&s.dir.join("out/img2"), "2");
    let f = |p: &str, k: &str| {
        committed
            .get(p)
            .and_then(|f| f.get(k))
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(
        (
            f("/etc/plain", "uid"),
            f("/etc/plain", "gid"),
            f("/etc/plain", "mode")
        ),
        ("0".into(), "0".into(), "0640".into())
    );
    assert_eq!(f("/bin/bash", "mode"), "0700");
    assert_eq!(f("/bin/bash", "uid"), expected["/bin/bash"]["uid"]);
    assert_eq!(f("/bin/bash", "sha256"), expected["/bin/bash"]["sha256"]);
    assert_eq!(
        (f("/run-fifo", "type"), f("/run-fifo", "uid")),
        ("fifo".into(), "0".into())
    );
    assert!(!committed.contains_key("/etc/os-release"));
    assert_eq!(
        committed.len(),
        expected.len() + 1,
        "one file added, one removed, a fifo added"
    );
}
